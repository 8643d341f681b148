"""Issue 8: the same graphs as ONNX, run by onnxruntime, answer like the MindIR bundle; what ONNX
cannot carry is refused in one sentence; the onnxruntime backend needs no MindSpore."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cogvlm2_lite.runtime.backends import BACKENDS, open_backend, usable_backends
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.cli import main
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.sampling import SamplingParams

from conftest import DEMO_TOKENIZER, prompt

TOL = 1e-4
FP16_TOL = 1e-2   # of the largest logit: fp16 products and sums, in another order on each backend


@pytest.fixture(scope="session")
def engines(tiny_bundle, onnx_bundle):
    return Engine(tiny_bundle, backend="mindspore"), Engine(onnx_bundle, backend="onnxruntime")


def test_manifest_lists_onnx_graphs_and_they_pass_the_checker(onnx_bundle, tiny_bundle):
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    assert m["formats"] == ["onnx"] and "onnx" in m["tools"]
    mindir = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(m["graphs"]) == set(mindir["graphs"])
    for name, g in m["graphs"].items():
        assert g["files"] == {"onnx": f"{name}.onnx"} and "file" not in g
        assert g["inputs"] == mindir["graphs"][name]["inputs"]
        rel = f"rank0/{name}.onnx"
        assert rel in m["files"] and len(m["files"][rel]["sha256"]) == 64
        model = onnx.load(str(onnx_bundle / rel))
        onnx.checker.check_model(model, full_check=True)
        # self-describing: data inputs, then the weights by HF name; no weight is baked in
        assert [i.name for i in model.graph.input] == [i["name"] for i in g["inputs"]] + m["weights"][g["weights"]]
        # decode graphs also write their KV-cache slot in place: present.<k_i|v_i> (export/onnx_fuse.py)
        extra = [f"present.{x}_{i}" for i in range(m["model"]["num_hidden_layers"]) for x in "kv"] \
            if name.startswith("decode_") else []
        assert [o.name for o in model.graph.output] == [o["name"] for o in g["outputs"]] + extra
        assert sum(t.ByteSize() for t in model.graph.initializer) < 64 * 1024
    assert mindir["graphs"]["vision"]["files"] == {"mindir": "vision.mindir"}
    # weights are the same bytes: only the graph files differ
    assert {k: v for k, v in m["files"].items() if "weights" in k} == \
        {k: v for k, v in mindir["files"].items() if "weights" in k}


def test_vision_prefill_and_decode_match_mindir(engines, photo):
    ms_engine, ort_engine = engines
    pixels = ms_engine.pixels([photo])
    emb = [e.image_embeddings(pixels) for e in engines]
    assert np.abs(emb[0] - emb[1]).max() <= TOL
    for image in (photo, None):
        ids, pos = prompt(ms_engine, "what is in the picture?", image)
        logits = [e.prefill([ids], emb[0] if image is not None else None, [pos]) for e in engines]
        assert np.abs(logits[0] - logits[1]).max() <= TOL
        L = ms_engine.cache.layers
        for e in engines:
            assert e.cache.lengths[0] == len(ids)
        kv = [e.cache.views() for e in engines]
        n = len(ids)
        assert np.abs(kv[0][0][:, :, :, :n] - kv[1][0][:, :, :, :n]).max() <= TOL
        assert np.abs(kv[0][1][:, :, :, :n] - kv[1][1][:, :, :, :n]).max() <= TOL
        token = int(np.argmax(logits[0][0]))
        for step in range(3):
            out = [e.decode([token], [pos[-1] + 1 + step]) for e in engines]
            assert np.abs(out[0] - out[1]).max() <= TOL
            token = int(np.argmax(out[0][0]))
        assert L == ort_engine.cache.layers


def test_fp16_graphs_export_and_match_mindir(tiny_hf, tmp_path, photo):
    """fp16 graphs end in the Cast of their logits to fp32, an output MindSpore's ONNX exporter left unnamed
    (onnx_export.name_cast_output): they export, and agree with the MindIR graphs within fp16 rounding."""
    from cogvlm2_lite.export.bundle import export_bundle
    out = export_bundle(tmp_path / "f16", hf_dir=tiny_hf, dtype="fp16", formats="mindir,onnx",
                        buckets={"chunk": [8], "decode": [32]}, progress=False)
    pair = Engine(out, backend="mindspore"), Engine(out, backend="onnxruntime")
    emb = [e.image_embeddings(e.pixels([photo])) for e in pair]
    ids, pos = prompt(pair[0], "what is in the picture?", photo)
    logits = [e.prefill([ids], emb[0], [pos]) for e in pair]
    assert logits[0].dtype == logits[1].dtype == np.float32
    scale = np.abs(logits[0]).max()
    assert np.abs(logits[0] - logits[1]).max() <= FP16_TOL * scale, np.abs(logits[0] - logits[1]).max() / scale


@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
def test_greedy_generation_is_token_identical(engines, photo, image):
    """24 new tokens after a 10-20 token prompt: decode crosses the 32 -> 64 cache bucket."""
    params = SamplingParams(max_new_tokens=24)
    req = Request("describe this in detail" if image else "tell me a long story about it",
                  image=photo if image else None, params=params)
    for e in engines:
        e.clear_prefix_cache()  # no prefix reuse from the parity test: both start from their first token
    ms_r, ort_r = (e.generate([req])[0] for e in engines)
    assert ms_r.token_ids == ort_r.token_ids
    assert len(ort_r.token_ids) >= 16 and ort_r.text == ms_r.text
    assert ort_r.prompt_tokens + len(ort_r.token_ids) > 32


def test_backend_choice(tiny_bundle, onnx_bundle):
    assert {"mindspore", "onnxruntime"} <= set(BACKENDS)
    assert open_backend(Bundle(onnx_bundle)).name == "onnxruntime"
    assert open_backend(Bundle(tiny_bundle)).name == "mindspore"
    assert usable_backends(SimpleNamespace(formats=["mindir", "onnx"], tp=1)) == ["mindspore", "onnxruntime"]
    assert usable_backends(SimpleNamespace(formats=["mindir"], tp=2)) == ["mindspore"]
    with pytest.raises(UserError, match="no MindIR graphs.*--backend onnxruntime"):
        open_backend(Bundle(onnx_bundle), "mindspore")
    with pytest.raises(UserError, match="no ONNX graphs.*--format onnx"):
        open_backend(Bundle(tiny_bundle), "onnxruntime")
    with pytest.raises(UserError, match="not available"):
        open_backend(Bundle(tiny_bundle), "tensorrt")


def test_run_cli_with_backend_flag(onnx_bundle, photo):
    r = CliRunner().invoke(main, ["run", str(onnx_bundle), "--image", str(photo), "--prompt", "what?",
                                  "--max-new-tokens", "4", "--backend", "onnxruntime", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["completion_tokens"] >= 1


def test_inputs_are_checked_and_views_are_read_in_place(engines):
    _, ort_engine = engines
    be = ort_engine.backend
    ids, pos = prompt(ort_engine, "hi", None)
    ort_engine.prefill([ids], None, [pos])
    kc, vc = ort_engine.cache.views()
    base = [np.array([[5]], np.int32), np.array([len(ids)], np.int32), ort_engine.cache.lengths.copy()]
    first = be.run(f"decode_{ort_engine.cache.bucket}", base + list(kc) + list(vc))[0]
    saved = kc[0, :, :, 0].copy()
    kc[0, :, :, 0] += 1.0  # the graph reads the buffer itself, not a snapshot taken earlier
    second = be.run(f"decode_{ort_engine.cache.bucket}", base + list(kc) + list(vc))[0]
    kc[0, :, :, 0] = saved
    assert np.abs(first - second).max() > 0
    with pytest.raises(ValueError, match="expected float32"):
        be.run(f"decode_{ort_engine.cache.bucket}", base + [k.astype(np.float64) for k in kc] + list(vc))
    strided = [np.asfortranarray(k) for k in kc]  # not C-contiguous: copied, same answer
    again = be.run(f"decode_{ort_engine.cache.bucket}", base + strided + list(vc))[0]
    assert np.array_equal(again, first)


@pytest.mark.parametrize("args, message", [
    (["--tp", "2", "--format", "onnx"], "--format onnx cannot be combined with --tp 2: onnxruntime has no collectives"),
    (["--tp", "2", "--format", "mindir,onnx"], "cannot be combined with --tp 2"),
    (["--dtype", "bf16", "--format", "onnx"], "cannot write bfloat16"),
    (["--format", "tflite"], "choose one or more of mindir, onnx"),
    (["--dtype", "fp16", "--format", "lite"], "--format lite is fp32 only, not --dtype fp16"),
])
def test_what_onnx_cannot_carry_is_refused(tmp_path, args, message):
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["export", "--random-init", "tiny", "--tokenizer", str(DEMO_TOKENIZER), *args,
                                  str(out)])
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


def test_tp_with_onnx_refused_in_python_api(tiny_hf, tmp_path):
    from cogvlm2_lite.export.bundle import export_bundle
    with pytest.raises(UserError, match="onnxruntime has no collectives"):
        export_bundle(tmp_path / "b", hf_dir=tiny_hf, tp=2, formats=("mindir", "onnx"), progress=False)


def test_onnxruntime_backend_runs_without_mindspore(onnx_bundle, photo):
    """A deployment with onnxruntime alone: MindSpore cannot even be imported."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mindspore" or name.startswith("mindspore."):
            raise ModuleNotFoundError("No module named 'mindspore'")
sys.meta_path.insert(0, Block())
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.sampling import SamplingParams
e = Engine({str(onnx_bundle)!r})
r = e.generate([Request("what?", image={str(photo)!r}, params=SamplingParams(max_new_tokens=4))])[0]
assert e.backend.name == "onnxruntime" and not any(m.startswith("mindspore") for m in sys.modules)
print("tokens", r.token_ids)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tokens [" in p.stdout


def test_idle_workers_spin_briefly_and_only_on_free_cores(onnx_bundle, monkeypatch):
    """Spinning is on when the machine's CPUs are idle at load, off beside a process that keeps one busy,
    as the caller says when told; a spinning worker gives up after SPIN_US."""
    from cogvlm2_lite.runtime import onnx_backend
    b = Bundle(onnx_bundle)
    cpus = onnx_backend.psutil.cpu_count()
    monkeypatch.setattr(onnx_backend.psutil, "cpu_percent", lambda interval: 0.0)
    idle = onnx_backend.OnnxRuntimeBackend(b, threads=cpus)
    monkeypatch.setattr(onnx_backend.psutil, "cpu_percent", lambda interval: 100.0 / cpus)   # one CPU busy
    busy = onnx_backend.OnnxRuntimeBackend(b, threads=cpus)
    told = onnx_backend.OnnxRuntimeBackend(b, threads=cpus, spinning=True)
    assert (idle.spinning, busy.spinning, told.spinning) == (True, False, True)
    options = idle._options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == str(onnx_backend.SPIN_US)
    assert busy._options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
