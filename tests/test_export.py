"""Issue 3: exported graphs reproduce the eager cells; tensor-parallel bundles reproduce tp 1;
the bundle describes itself and protects itself."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from click.testing import CliRunner

import eager
from cogvlm2_lite.export import bundle as bundle_module
from cogvlm2_lite.export.bundle import default_buckets, export_bundle
from cogvlm2_lite.graphs.config import preset
from cogvlm2_lite.graphs.entry import ExtendGraph
from cogvlm2_lite.graphs.model import weight_specs
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.cli import main
from cogvlm2_lite.runtime.errors import UserError

from conftest import BUCKETS, DEMO_TOKENIZER, prompt


def test_manifest_describes_everything(tiny_bundle, tiny_cfg):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["tp"] == 1 and m["batch"] == 1 and m["dtype"] == "fp32"
    assert m["buckets"] == {"chunk": [8, 16], "decode": [32, 64]}
    assert set(m["graphs"]) == {"vision", "prefill_image_8", "prefill_image_16", "extend_8_32", "extend_16_32",
                                "extend_8_64", "extend_16_64", "decode_32", "decode_64"}
    assert [i["shape"] for i in m["graphs"]["prefill_image_8"]["inputs"][:2]] == [[1, 15], [1, 6, 64]]  # 1 + 6 + 8
    e = m["graphs"]["extend_16_64"]
    assert [(i["name"], i["shape"]) for i in e["inputs"][:5]] == [
        ("tokens", [1, 16]), ("positions", [1, 16]), ("write_index", [1]), ("valid_len", [1]), ("k_0", [1, 2, 64, 8])]
    d = m["graphs"]["decode_32"]
    assert [i["name"] for i in d["inputs"][:3]] == ["token", "position", "write_index"]
    assert d["inputs"][3] == {"name": "k_0", "shape": [1, 2, 32, 8], "dtype": "float32"}
    assert [o["name"] for o in d["outputs"]] == ["logits", "k_new", "v_new"]
    assert m["tokenizer"]["bos_id"] == 768 and m["tokenizer"]["stop_ids"] == [769, 777]
    assert m["preprocess"]["image_size"] == 56 and len(m["preprocess"]["mean"]) == 3
    assert m["model"] == tiny_cfg.to_hf() | {"architectures": ["CogVLMForCausalLM"], "torch_dtype": "float32"}
    assert {"mindspore", "numpy", "python", "cogvlm2-lite"} <= set(m["tools"])
    on_disk = {str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk == set(m["files"]) | {"manifest.json"}
    assert (tiny_bundle / "tokenizer.model").read_bytes() == DEMO_TOKENIZER.read_bytes()
    # graphs hold no weights: the weights are stored once per rank
    graphs = sum(v["bytes"] for k, v in m["files"].items() if k.endswith(".mindir"))
    assert graphs < 0.5 * Bundle(tiny_bundle).weight_bytes(0) * len(m["graphs"])


def test_exported_vision_and_prefill_match_eager(engine, tiny_cfg, tiny_weights, photo):
    pixels = engine.pixels([photo])
    exported = engine.image_embeddings(pixels)
    ref = eager.image_embeds(tiny_cfg, tiny_weights, pixels[0])
    assert np.abs(exported - ref).max() <= 1e-5
    ids, pos = prompt(engine, "what is this?", image=True)
    logits = engine.prefill([ids], exported, [pos])
    ref_logits = eager.full_logits(tiny_cfg, tiny_weights, ids, pos, ref)[-1]
    assert np.abs(logits[0] - ref_logits).max() <= 1e-5


def test_exported_decode_matches_eager_cell_for_16_greedy_steps(engine, tiny_cfg, tiny_weights):
    """Each step: the exported decode graph and the eager decode cell (ExtendGraph, C = 1) on the same cache."""
    eager.use_device()
    ids, pos = prompt(engine, "count to ten", image=False)
    logits = engine.prefill([ids], None, [pos])
    cell = eager.cell(ExtendGraph, tiny_cfg, 1, 32, 1)
    weights = eager.weight_args(cell.table, tiny_weights)
    next_pos = pos[-1] + 1
    for _ in range(16):
        tok = int(np.argmax(logits[0]))
        engine.cache.fit(int(engine.cache.lengths[0]) + 1)
        assert engine.cache.bucket == 32
        kc, vc = engine.cache.views()
        data = [np.array([[tok]], np.int32), np.array([next_pos], np.int32), engine.cache.lengths.copy()]
        ref = cell(*[ms.Tensor(x) for x in data + list(kc) + list(vc)], *weights)[0].asnumpy()
        logits = engine.decode([tok], [next_pos])
        assert np.abs(logits - ref).max() <= 1e-5
        next_pos += 1


def test_greedy_through_bundle_matches_eager_recompute(engine, tiny_cfg, tiny_weights, photo):
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    r = engine.generate([Request("describe it", image=photo, params=SamplingParams(max_new_tokens=16))])[0]
    ids, pos = prompt(engine, "describe it", image=True)
    embeds = eager.image_embeds(tiny_cfg, tiny_weights, engine.pixels([photo])[0])
    tokens, _ = eager.greedy(tiny_cfg, tiny_weights, ids, pos, embeds, 16, engine.stop_ids)
    assert r.token_ids == tokens and len(tokens) > 4


def run_tp2_logits(bundle, out):
    script = f"""
import numpy as np, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from cogvlm2_lite.runtime.engine import Engine
from conftest import prompt
e = Engine({str(bundle)!r})
ids, pos = prompt(e, "count to ten", image=False)
first = e.prefill([ids], None, [pos])
second = e.decode([int(np.argmax(first[0]))], [pos[-1] + 1])
embeds = e.image_embeddings(np.full((1, 3, 56, 56), 0.25, np.float32))
if e.rank == 0:
    np.savez({str(out)!r}, prefill=first, decode=second, embeds=embeds)
"""
    (out.parent / "tp_probe.py").write_text(script)
    msrun = Path(sys.executable).parent / "msrun"
    env = {**os.environ, "PATH": f"{msrun.parent}:{os.environ['PATH']}", "GLOG_v": "3"}
    subprocess.run([str(msrun), "--worker_num=2", "--local_worker_num=2", "--master_port=29731", "--join=True",
                    f"--log_dir={out.parent / 'logs'}", str(out.parent / "tp_probe.py")],
                   check=True, env=env, capture_output=True, timeout=300)
    return np.load(out)


def probe_logits(engine) -> dict:
    """What run_tp2_logits' script computes, here with a tp 1 engine."""
    ids, pos = prompt(engine, "count to ten", image=False)
    first = engine.prefill([ids], None, [pos])
    return {"prefill": first, "decode": engine.decode([int(np.argmax(first[0]))], [pos[-1] + 1]),
            "embeds": engine.image_embeddings(np.full((1, 3, 56, 56), 0.25, np.float32))}


def test_tp2_bundle_under_msrun_matches_tp1(tiny_bundle_tp2, engine, tmp_path):
    m = json.loads((tiny_bundle_tp2 / "manifest.json").read_text())
    assert m["tp"] == 2 and [r["dir"] for r in m["ranks"]] == ["rank0", "rank1"]
    assert m["kv_cache"]["kv_heads"] == 1
    got, want = run_tp2_logits(tiny_bundle_tp2, tmp_path / "tp2.npz"), probe_logits(engine)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name


def test_flipped_byte_is_detected(tiny_bundle, tmp_path):
    for rel, verify in (("rank0/decode_32.mindir", False), ("tokenizer.model", False),
                        ("rank0/weights-00000.safetensors", True)):
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny_bundle, copy)
        f = copy / rel
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(UserError, match="does not match its checksum"):
            Bundle(copy, verify=verify)
    Bundle(tiny_bundle, verify=True)


SMALL = {"chunk": [8], "decode": [32]}  # the fewest graphs: for tests about the folder, not the graphs


def test_refuses_non_empty_target_unless_forced(tiny_hf, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        export_bundle(out, hf_dir=tiny_hf, buckets=SMALL, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a bundle.*--force replaces only an earlier export"):
        export_bundle(out, hf_dir=tiny_hf, buckets=SMALL, progress=False, force=True)   # a folder of yours stays
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a bundle"):
        export_bundle(tiny_hf, hf_dir=tiny_hf, buckets=SMALL, progress=False, force=True)   # nor the checkpoint
    assert (tiny_hf / "config.json").is_file()
    bundle = tmp_path / "bundle"
    export_bundle(bundle, hf_dir=tiny_hf, buckets=SMALL, progress=False)
    (bundle / "keep.txt").write_text("stale")
    export_bundle(bundle, hf_dir=tiny_hf, buckets=SMALL, progress=False, force=True)   # an earlier export is replaced
    Bundle(bundle)
    assert not (bundle / "keep.txt").exists()


def test_failed_export_leaves_nothing_that_looks_valid(tiny_hf, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(bundle_module, "write_weights", broken)
    with pytest.raises(OSError):
        export_bundle(tmp_path / "b", hf_dir=tiny_hf, buckets=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tp, message", [(3, "--tp 3 is not supported"),
                                         (4, r"does not divide the model's kv heads \(num_multi_query_heads\) \(2\)")])
def test_tp_that_does_not_divide_is_refused(tiny_hf, tmp_path, tp, message):
    with pytest.raises(UserError, match=message):
        export_bundle(tmp_path / "b", hf_dir=tiny_hf, tp=tp, buckets=BUCKETS, progress=False)


def test_cli_random_init_fp16_export(tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["export", "--random-init", "tiny", "--tokenizer", str(DEMO_TOKENIZER), "--dtype",
                                  "fp16", "--buckets", "chunk=8;decode=32", str(out)])
    assert r.exit_code == 0, r.output
    b = Bundle(out)
    assert b.manifest["kv_cache"]["dtype"] == "float16"
    params = sum(int(np.prod(s.shape)) for s in weight_specs(preset("tiny")))
    assert params * 2 < b.weight_bytes(0) < params * 2 + 64 * 1024  # 2 bytes per weight + safetensors header


def test_default_buckets_for_the_full_model():
    b = default_buckets(preset("full"))
    assert b == {"chunk": [16, 64, 256], "decode": [512, 2048, 3072, 4096, 8192]}


def test_tokenizer_that_does_not_fit_the_model_is_refused(tiny_hf, tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"".join(line + b"\n" for line in DEMO_TOKENIZER.read_bytes().splitlines()[:700]))
    with pytest.raises(UserError, match="700 BPE ranks.*bos id is 768"):
        export_bundle(tmp_path / "b", hf_dir=tiny_hf, tokenizer=bad, buckets=BUCKETS, progress=False)
