"""The embedded default model: committed weights, accuracy through an exported bundle, the demo command."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cogvlm2_lite.demo import task
from cogvlm2_lite.demo.cli import demo
from cogvlm2_lite.demo.embedded import CACHE_ENV, MODEL_DIR, SAMPLE_IMAGE, SAMPLE_INDEX, bundle_path, ensure_bundle
from cogvlm2_lite.demo.evaluate import demo_eval
from cogvlm2_lite.demo.train import demo_config
from cogvlm2_lite.export.hf_checkpoint import Checkpoint
from cogvlm2_lite.runtime.errors import UserError


def test_committed_weights_are_a_valid_small_checkpoint():
    ckpt = Checkpoint(MODEL_DIR)
    ckpt.validate()  # every tensor of the architecture, with its shape, nothing else
    assert ckpt.config.replace(extra={}) == demo_config()
    assert ckpt.config.extra == {"architectures": ["CogVLMForCausalLM"], "torch_dtype": "float16"}
    assert (MODEL_DIR / "tokenizer.model").read_bytes() == (MODEL_DIR.parent / "tokenizer.model").read_bytes()
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8 << 20
    w = ckpt.read("lm_head.weight")
    assert w.dtype == np.float16 and np.isfinite(w).all()
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert 769 in gen["eos_token_id"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private cache folder holding the embedded model's bundle, exported once per session."""
    folder = tmp_path_factory.mktemp("cogvlm2-lite-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(folder))
    try:
        ensure_bundle()
        yield folder
    finally:
        mp.undo()


def test_greedy_accuracy_through_the_exported_bundle(cache, monkeypatch):
    """A real check of the trained model: held-out samples, greedy, runtime engine, exact match."""
    monkeypatch.setenv(CACHE_ENV, str(cache))
    result = CliRunner().invoke(demo_eval, [str(bundle_path()), "-n", "20", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["overall"]["total"] == 20
    assert r["overall"]["accuracy"] >= 0.9, r["mistakes"]


def test_demo_command_end_to_end(cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(cache))
    exported = sorted(p.name for p in cache.iterdir())
    result = CliRunner().invoke(demo, [], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in cache.iterdir()) == exported  # the cached bundle was reused
    expected = task.generate(task.HELDOUT_SEED, SAMPLE_INDEX + 1, 56)[SAMPLE_INDEX].scene.describe()
    assert f"answer: {expected}\n" in result.stdout
    assert "TTFT" in result.stdout and "tokens/s" in result.stdout
    result = CliRunner().invoke(demo, ["--image", str(SAMPLE_IMAGE), "--prompt", "How many shapes are there?"])
    assert result.exit_code == 0, result.output
    assert f"answer: {task.NUMBER_WORDS[expected.count(' a ') + 1]}\n" in result.stdout


def test_demo_bad_image_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(demo, ["--image", str(bad)])
    assert isinstance(result.exception, UserError) and "broken.png" in str(result.exception)
    assert not (tmp_path / "cache").exists()  # refused before any export work
    from cogvlm2_lite.runtime.cli import main
    result = CliRunner().invoke(main, ["demo", "--image", str(tmp_path / "missing.png")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
