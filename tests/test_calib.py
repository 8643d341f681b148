"""calib/: w8a16 quantize/dequantize bounds, calibration statistics, accuracy of the quantized tiny model."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cogvlm2_lite.calib.quant import (dequantize_weights, fake_quantize, get_scheme, is_linear_weight,
                                      quantize_weights, quantized_bytes)

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "demo" / "assets" / "tokenizer.model"


def test_w8a16_round_trip_bound_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 53)).astype(np.float32) * np.exp(rng.uniform(-6, 3, (37, 1))).astype(np.float32)
    w[5] = 0.0                       # an all-zero channel
    w[7, 3] = 1e4                    # an outlier channel
    h = get_scheme("w8a16")
    q, scale = h.quantize(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (37,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    # independently: symmetric per-output-channel scale absmax / 127, error at most half a step
    ref_scale = np.abs(w.astype(np.float64)).max(1) / 127
    nz = ref_scale > 0
    np.testing.assert_allclose(scale[nz], ref_scale[nz], rtol=1e-6)
    err = np.abs(w.astype(np.float64) - h.dequantize(q, scale).astype(np.float64))
    bound = ref_scale[:, None] / 2 * (1 + 1e-5) + 1e-30
    assert (err <= bound).all(), float((err / bound).max())
    assert (err[5] == 0).all() and (q[5] == 0).all()
    # each channel's largest magnitude is represented exactly by +-127
    assert (np.abs(q[nz]).max(1) == 127).all()


def test_conv_weight_quantized_per_output_channel():
    w = np.random.default_rng(1).standard_normal((8, 3, 2, 2)).astype(np.float32)
    h = get_scheme("w8a16")
    q, scale = h.quantize(w)
    assert q.shape == w.shape and scale.shape == (8,)
    err = np.abs(w - h.dequantize(q, scale)).reshape(8, -1).max(1)
    assert (err <= np.abs(w).reshape(8, -1).max(1) / 127 / 2 * (1 + 1e-5)).all()


def test_weight_table_transformation(tiny_weights):
    q = quantize_weights(tiny_weights, "w8a16")
    linears = [n for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)]
    assert "lm_head.weight" in linears and "model.embed_tokens.weight" not in linears
    assert not any("norm" in n or n.endswith(".bias") for n in linears)
    for n in linears:
        assert n not in q and q[n + ".qweight"].dtype == np.int8 and q[n + ".scale"].dtype == np.float32
    for n in set(tiny_weights) - set(linears):
        assert q[n] is tiny_weights[n]
    back = dequantize_weights(q)
    assert set(back) == set(tiny_weights)
    fake = fake_quantize(tiny_weights)
    for n in linears:
        np.testing.assert_array_equal(back[n], fake[n])
    b = quantized_bytes(tiny_weights)
    assert b["ratio"] <= 0.55, b   # int8 + one fp32 scale per row vs fp16: 0.5 + 2 / in_features


@pytest.fixture(scope="module")
def model(tiny_cfg):
    from cogvlm2_lite.calib.eager import EagerModel
    from cogvlm2_lite.export.bundle import IMAGE_MEAN, IMAGE_STD
    return EagerModel(tiny_cfg, DEMO_TOKENIZER, {"image_size": tiny_cfg.vision.image_size,
                                                 "mean": IMAGE_MEAN, "std": IMAGE_STD})


def test_stats_cover_every_linear_and_match_an_independent_patch_absmax(model, tiny_cfg, tiny_weights):
    from cogvlm2_lite.calib.data import train_samples
    from cogvlm2_lite.calib.stats import collect
    samples = train_samples(3, tiny_cfg.vision.image_size)
    stats = collect(model, tiny_weights, samples)
    linears = {n: w for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)}
    assert set(stats) == set(linears)
    for n, s in stats.items():
        assert s.shape == (int(np.prod(linears[n].shape[1:])),) and s.dtype == np.float32 and (s >= 0).all()
    # the patch embedding's inputs are the preprocessed pixels cut into patches: computable by hand
    k = tiny_cfg.vision.patch_size
    ref = 0
    for image, prompt in samples:
        px = model.inputs(image, prompt)[2][0]
        c, hgt, wid = px.shape
        p = px.reshape(c, hgt // k, k, wid // k, k).transpose(1, 3, 0, 2, 4).reshape(-1, c * k * k)
        ref = np.maximum(ref, np.abs(p).max(0))
    np.testing.assert_array_equal(stats["model.vision.patch_embedding.proj.weight"], ref)
    again = collect(model, tiny_weights, samples)   # same process: equal up to eager-kernel last bits
    for n in stats:
        np.testing.assert_allclose(again[n], stats[n], rtol=1e-5)


def test_calibrate_cli_is_deterministic_and_lands_in_the_bundle(tiny_bundle, tmp_path):
    from safetensors.numpy import load_file

    from cogvlm2_lite.runtime.bundle import Bundle
    outs = []
    for i in range(2):   # two fresh processes over the same set: bit-identical files
        b = shutil.copytree(tiny_bundle, tmp_path / f"b{i}")
        r = subprocess.run([sys.executable, "-c", "from cogvlm2_lite.runtime.cli import main; main()",
                            "calibrate", str(b), "-n", "2"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        bundle = Bundle(b, verify=True)
        assert bundle.manifest["calibration"]["samples"] == 2
        assert "calib_stats.safetensors" in bundle.manifest["files"]
        outs.append(load_file(str(b / "calib_stats.safetensors")))
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 0
    for n in outs[0]:
        np.testing.assert_array_equal(outs[0][n], outs[1][n])


def test_quantized_tiny_model_stays_close_to_fp32(model, tiny_cfg, tiny_weights):
    """Bound: w8a16 perturbs each weight by <= scale/2 (relative weight error ~0.6%, measured per
    layer). On the tiny random model the logits are nearly flat, so a few near-ties may flip: top-1
    agreement >= 90% (measured ~95%), logit cosine >= 0.99 everywhere (measured >= 0.998),
    mean KL < 1e-2 nats (measured ~3e-4)."""
    from cogvlm2_lite.calib.data import heldout_samples
    from cogvlm2_lite.calib.report import accuracy_report, format_report
    r = accuracy_report(model, tiny_weights, heldout_samples(4, tiny_cfg.vision.image_size), "w8a16", steps=4)
    print(format_report(r))
    assert r["top1_agreement"] >= 0.90
    assert r["cosine_min"] >= 0.99
    assert r["kl_mean"] < 1e-2
    assert len(r["layers"]) == len([n for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)])
    assert all(0 < row["output_rel_err"] < 0.05 for row in r["layers"])


QUANT_BUCKETS = {"text": [16], "image": [24], "decode": [32]}


@pytest.fixture(scope="module")
def quant_bundle(tmp_path_factory, tiny_hf):
    from cogvlm2_lite.export.bundle import export_bundle
    return export_bundle(tmp_path_factory.mktemp("bundles") / "w8a16", hf_dir=tiny_hf, buckets=QUANT_BUCKETS,
                         progress=False, formats=("mindir", "onnx"), quant="w8a16")


def test_w8a16_bundle_stores_int8_and_its_graphs_dequantize_exactly(quant_bundle, tiny_cfg, tiny_weights):
    """The exported graphs (both formats) compute the fp32 model with deq(q(W)) weights: their logits
    match the eager cells run with fake-quantized weights; the bundle stores int8 + fp32 scales."""
    from cogvlm2_lite.calib.eager import pynative
    from cogvlm2_lite.graphs.entry import PrefillGraph
    from cogvlm2_lite.runtime.backends import BACKENDS, load_rank_weights
    from cogvlm2_lite.runtime.bundle import Bundle
    import mindspore as ms
    b = Bundle(quant_bundle, verify=True)
    assert b.manifest["quant"]["scheme"] == "w8a16"
    stored = load_rank_weights(b, 0)
    linears = [n for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)]
    q = quantize_weights(tiny_weights)
    for n in linears:
        assert n not in stored and stored[n + ".qweight"].dtype == np.int8
        np.testing.assert_array_equal(stored[n + ".qweight"], q[n + ".qweight"])
        np.testing.assert_array_equal(stored[n + ".scale"], q[n + ".scale"])
    qbytes = sum(stored[n + s].nbytes for n in linears for s in (".qweight", ".scale"))
    assert qbytes <= 0.55 * sum(tiny_weights[n].size * 2 for n in linears)   # vs the same matrices in fp16

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 768, (1, 16)).astype(np.int32)
    pos = np.arange(16, dtype=np.int32)[None]
    valid = np.array([13], np.int32)
    fake = fake_quantize(tiny_weights)
    g = PrefillGraph(tiny_cfg, 16, 1, image=False)
    with pynative():
        ref = g(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(valid), *[ms.Tensor(fake[n]) for n in g.table.names])
    ref = ref[0].asnumpy()
    for backend in ("mindspore", "onnxruntime"):
        out = BACKENDS[backend](b, 0).run("prefill_text_16", [ids, pos, valid])[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=backend)
