"""The embedded default model: committed weights, accuracy through an exported bundle, the demo command."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cogvlm2_lite.demo import task
from cogvlm2_lite.demo.cli import demo
from cogvlm2_lite.demo.embedded import CACHE_ENV, MODEL_DIR, SAMPLE_IMAGE, SAMPLE_INDEX, bundle_path
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


def test_greedy_accuracy_through_the_exported_bundle(demo_cache, monkeypatch):
    """A real check of the trained model: held-out samples, greedy, runtime engine, exact match."""
    monkeypatch.setenv(CACHE_ENV, str(demo_cache))
    result = CliRunner().invoke(demo_eval, [str(bundle_path()), "-n", "20", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["overall"]["total"] == 20
    assert r["overall"]["accuracy"] >= 0.9, r["mistakes"]


def test_demo_command_end_to_end(demo_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(demo_cache))
    exported = sorted(p.name for p in demo_cache.iterdir())
    result = CliRunner().invoke(demo, [], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in demo_cache.iterdir()) == exported  # the cached bundle was reused
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


@pytest.fixture(scope="module")
def fp32_first_100(demo_cache):
    from cogvlm2_lite.demo.evaluate import evaluate
    return evaluate(bundle_path(), 100)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])   # the schemes that quantize activations too
def test_quantized_demo_model_keeps_its_accuracy(scheme, demo_cache, fp32_first_100, monkeypatch, tmp_path):
    """Issue 10's target on the trained model: the demo task's exact match quantized stays within
    2 answers in 100 of fp32 on the same held-out samples, run by onnxruntime's integer / 4-bit
    kernels (500 samples, measured: fp32 98.0%, w8a8 97.8%, w4a8 97.6%, on both backends).
    w8a8 is smoothed with statistics collected here from the training split, as `calibrate` does."""
    from safetensors.numpy import save_file

    from cogvlm2_lite.calib.data import train_samples
    from cogvlm2_lite.calib.eager import EagerModel, load_fp32_bundle
    from cogvlm2_lite.calib.stats import collect
    from cogvlm2_lite.demo.embedded import BUCKETS
    from cogvlm2_lite.demo.evaluate import evaluate
    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.runtime.engine import Engine
    monkeypatch.setenv(CACHE_ENV, str(demo_cache))
    fp32 = fp32_first_100
    stats = None
    if scheme == "w8a8":
        b, cfg, weights = load_fp32_bundle(bundle_path())
        model = EagerModel(cfg, b.tokenizer_path, b.manifest["preprocess"])
        stats = tmp_path / "calib_stats.safetensors"
        save_file(collect(model, weights, train_samples(16, cfg.vision.image_size)), str(stats))
    out = export_bundle(tmp_path / scheme, hf_dir=MODEL_DIR, buckets=BUCKETS, progress=False, formats=("onnx",),
                        quant=scheme, calib_stats=stats)
    q = evaluate(out, 100, engine=Engine(out, "onnxruntime"))
    assert q["overall"]["correct"] >= fp32["overall"]["correct"] - 2, (fp32["overall"], q["overall"], q["mistakes"])


def test_demo_eval_compares_bundles_on_the_same_samples(demo_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(demo_cache))
    b = str(bundle_path())
    result = CliRunner().invoke(demo_eval, [b, b, "-n", "5", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    assert first["overall"] == second["overall"] and first["overall"]["total"] == 5
    table = CliRunner().invoke(demo_eval, [b, b, "-n", "5"], catch_exceptions=False).stdout
    assert table.splitlines()[-1].split() == ["vs", "first", "+0", "+0"]
