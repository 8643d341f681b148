"""Issue 4: the runtime answers exactly like the eager model, reuses what it can, and turns every
bad input into one sentence."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import eager
from cogvlm2_lite.runtime.cli import main
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.kv_cache import KVCache
from cogvlm2_lite.runtime.sampling import SamplingParams
from cogvlm2_lite.runtime.tokenizer import position_ids

from conftest import DEMO_TOKENIZER

GREEDY = SamplingParams(max_new_tokens=16)


def eager_tokens(engine, cfg, weights, text, image=None, history=(), steps=16):
    n = engine.n_image if image is not None else 0
    ids, types = engine.tokenizer.build_inputs(text, history, "chat", n)
    embeds = eager.image_embeds(cfg, weights, engine.pixels([image])[0]) if image is not None else None
    return eager.greedy(cfg, weights, ids, position_ids(types), embeds, steps, engine.stop_ids)[0]


def test_text_only_greedy_matches_eager(engine, tiny_cfg, tiny_weights):
    r = engine.generate([Request("Hello, who are you?", params=GREEDY)])[0]
    assert r.token_ids == eager_tokens(engine, tiny_cfg, tiny_weights, "Hello, who are you?")
    assert r.prompt_tokens > 5 and r.finish_reason in ("stop", "length") and r.ttft_s > 0


def test_generation_across_decode_buckets_matches_eager(engine, tiny_cfg, tiny_weights, photo):
    """16-token image prompt + 40 new tokens crosses the 32 -> 64 cache bucket."""
    params = SamplingParams(max_new_tokens=40)
    r = engine.generate([Request("go on", image=photo, params=params)])[0]
    expected = eager_tokens(engine, tiny_cfg, tiny_weights, "go on", photo, steps=40)
    assert r.token_ids == expected
    assert r.prompt_tokens + len(expected) > 32


def test_context_full_stops_with_a_reason(engine):
    r = engine.generate([Request("tell me a long story", params=SamplingParams(max_new_tokens=500))])[0]
    if r.finish_reason != "stop":
        assert r.finish_reason == "context" and r.prompt_tokens + r.completion_tokens == 64 + 1


def test_multi_turn_reuses_cache_and_matches_fresh_engine(tiny_bundle, photo):
    chat = Engine(tiny_bundle)
    chat.generate([Request("what is this?", image=photo, params=SamplingParams(max_new_tokens=3))])
    history = (("what is this?", "a cat"),)
    second = chat.generate([Request("and the colour?", image=photo, history=history, params=GREEDY)])[0]
    fresh = Engine(tiny_bundle).generate([Request("and the colour?", image=photo, history=history, params=GREEDY)])[0]
    assert second.reused_tokens > chat.n_image
    assert second.token_ids == fresh.token_ids and fresh.reused_tokens == 0


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7, max_new_tokens=12)
    a = engine.generate([Request("say something", params=params)])[0]
    b = engine.generate([Request("say something", params=params)])[0]
    c = engine.generate([Request("say something", params=SamplingParams(**{**params.__dict__, "seed": 8}))])[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert c.token_ids != a.token_ids


def test_kv_cache_relayout_keeps_filled_slots():
    c = KVCache(layers=2, batch=2, kv_heads=3, head_dim=4, buckets=[4, 8, 16], dtype="float32")
    k = np.random.default_rng(0).standard_normal((2, 2, 3, 4, 4)).astype(np.float32)
    for row, n in ((0, 3), (1, 4)):
        c.write(row, k[:, row:row + 1], -k[:, row:row + 1], n)
    assert c.bucket == 4 and list(c.lengths) == [3, 4]
    assert c.fit(9) and c.bucket == 16
    kc, vc = c.views()
    np.testing.assert_array_equal(kc[:, 0, :, :3], k[:, 0, :, :3])
    np.testing.assert_array_equal(vc[:, 1, :, :4], -k[:, 1])
    assert not c.fit(17) and not c.reserve(17)
    assert c.reserve(5) and c.bucket == 16  # reserve never shrinks
    assert c.fit(3) and c.bucket == 4 and list(c.lengths) == [3, 4]  # back down: the filled slots survive
    kc, _ = c.views()
    np.testing.assert_array_equal(kc[:, 1], k[:, 1])
    c.lengths[1] = 0
    c.write(1, k[:, 1:2], k[:, 1:2], 2)  # a row starts over: the new slots overwrite its first ones
    np.testing.assert_array_equal(c.views()[0][:, 1, :, :2], k[:, 1, :, :2])


def test_tp2_run_prints_the_same_answer_as_tp1(tiny_bundle, tiny_bundle_tp2, photo):
    cli = Path(sys.executable).parent / "cogvlm2-lite"
    args = ["run", "--image", str(photo), "--prompt", "what is it?", "--max-new-tokens", "12", "--json"]
    outs = []
    for b in (tiny_bundle, tiny_bundle_tp2):
        p = subprocess.run([str(cli), args[0], str(b), *args[1:]], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert outs[0]["text"] == outs[1]["text"] and outs[0]["completion_tokens"] == outs[1]["completion_tokens"]


# --- bad input: one sentence, non-zero exit, no stack trace ------------------------------------------
def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # a handled error, not a crash
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output
    return lines[0]


def test_unreadable_and_truncated_images(tiny_bundle, photo, tmp_path):
    assert "does not exist" in cli("run", tiny_bundle, "--image", tmp_path / "nope.png", "--prompt", "hi")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "notes.png" in cli("run", tiny_bundle, "--image", text, "--prompt", "hi")
    cut = tmp_path / "cut.jpg"
    Image.open(photo).convert("RGB").save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    assert "cut.jpg" in cli("run", tiny_bundle, "--image", cut, "--prompt", "hi")


def test_unusual_image_modes_are_converted(engine, tmp_path):
    for mode in ("CMYK", "P", "LA", "I;16"):
        img = Image.new("RGB", (60, 50), (200, 30, 90)).convert(mode if mode != "I;16" else "L")
        if mode == "I;16":
            img = img.convert("I;16")
        r = engine.generate([Request("hi", image=img, params=SamplingParams(max_new_tokens=2))])[0]
        assert r.completion_tokens >= 1 or r.finish_reason == "stop"


def test_raw_prefill_with_image_embeddings_checks_the_image_slots(engine, photo):
    embeds = engine.image_embeddings(engine.pixels([photo]))
    with pytest.raises(UserError, match=f"starts with bos and {engine.n_image} image slots"):
        engine.prefill([[1, 2, 3]], embeds, [[0, 1, 2]])


def test_prompt_longer_than_largest_bucket(tiny_bundle):
    assert "than this bundle's cache holds (64" in cli("run", tiny_bundle, "--prompt", "word " * 100)


def test_bad_sampling_flags(tiny_bundle):
    assert "top_p" in cli("run", tiny_bundle, "--prompt", "hi", "--top-p", "1.5")


def test_bundle_problems(tiny_bundle, tmp_path):
    assert "not a bundle" in cli("run", tmp_path / "missing", "--prompt", "hi")
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    assert "format version 0" in cli("run", old, "--prompt", "hi")
    (old / "manifest.json").write_text("[]")
    assert "is not a cogvlm2-lite bundle" in cli("inspect", old)
    del m["model"]
    m["format_version"], m["tp"] = json.loads((tiny_bundle / "manifest.json").read_text())["format_version"], "one"
    (old / "manifest.json").write_text(json.dumps(m))
    assert "lacks model, tp (or holds the wrong kind of value)" in cli("run", old, "--prompt", "hi")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "rank0" / "vision.mindir").write_bytes(b"garbage")
    assert "vision.mindir" in cli("run", broken, "--prompt", "hi")


def test_export_problems(tiny_hf, tmp_path):
    assert "does not divide" in cli("export", tiny_hf, tmp_path / "b", "--tp", "4")
    bad = tmp_path / "hf"
    shutil.copytree(tiny_hf, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing lm_head.weight" in cli("export", bad, tmp_path / "b2")
    assert "not a folder" in cli("export", tmp_path / "nothing", tmp_path / "b3")
    for key, value, says in (("template_version", "foo", "template_version 'foo' is not a CogVLM2 prompt template"),
                             ("vocab_size", "1024", "vocab_size must be int, not '1024'")):
        odd = tmp_path / f"hf-{key}"
        shutil.copytree(tiny_hf, odd)
        config = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({**config, key: value}))
        assert says in cli("export", odd, tmp_path / f"b-{key}")
    (tmp_path / "cfg.json").write_text("{bad")
    assert f"{tmp_path / 'cfg.json'} is not a valid CogVLM2 config.json" in cli(
        "export", "--random-init", tmp_path / "cfg.json", tmp_path / "b7", "--tokenizer", DEMO_TOKENIZER)
    assert "replaced by prefill chunks" in cli("export", tiny_hf, tmp_path / "b4", "--buckets", "text=abc")
    assert "--buckets" in cli("export", tiny_hf, tmp_path / "b6", "--buckets", "chunk=abc")
    assert "unknown preset 'huge'" in cli("export", "--random-init", "huge", tmp_path / "b5", "--tokenizer",
                                          DEMO_TOKENIZER)
