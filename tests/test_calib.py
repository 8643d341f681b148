"""calib/: quantize/dequantize bounds of every stored form, calibration statistics, accuracy of the
quantized tiny model, quantized bundles in both formats."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cogvlm2_lite.calib.report import quantized_bytes
from cogvlm2_lite.graphs.quant import (FORMS, GROUP, Quantizer, form_of, is_linear_weight, quantize_groups4,
                                       quantize_rows, smoothing, unpack4)
from cogvlm2_lite.graphs.weights import REPLICATED, WeightSpec

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "demo" / "assets" / "tokenizer.model"
SCHEMES = ("w8a16", "w8a8", "w4a16", "w4a8")


def _spread_weights(rng, rows, cols):
    """Rows spanning 9 orders of magnitude, an all-zero row and an outlier."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp(rng.uniform(-6, 3, (rows, 1))).astype(np.float32)
    w[5] = 0.0
    w[7, 3] = 1e4
    return w


def test_int8_round_trip_bound_per_channel():
    w = _spread_weights(np.random.default_rng(0), 37, 53)
    q, scale = quantize_rows(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (37,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    # independently: symmetric per-output-channel scale absmax / 127, error at most half a step
    ref_scale = np.abs(w.astype(np.float64)).max(1) / 127
    nz = ref_scale > 0
    np.testing.assert_allclose(scale[nz], ref_scale[nz], rtol=1e-6)
    err = np.abs(w.astype(np.float64) - FORMS["int8"].dequantize([q, scale]))
    bound = ref_scale[:, None] / 2 * (1 + 1e-5) + 1e-30
    assert (err <= bound).all(), float((err / bound).max())
    assert (err[5] == 0).all() and (q[5] == 0).all()
    # each channel's largest magnitude is represented exactly by +-127
    assert (np.abs(q[nz]).max(1) == 127).all()


def test_conv_weight_quantized_per_output_channel():
    w = np.random.default_rng(1).standard_normal((8, 3, 2, 2)).astype(np.float32)
    q, scale = quantize_rows(w)
    assert q.shape == w.shape and scale.shape == (8,)
    err = np.abs(w - FORMS["int8"].dequantize([q, scale])).reshape(8, -1).max(1)
    assert (err <= np.abs(w).reshape(8, -1).max(1) / 127 / 2 * (1 + 1e-5)).all()


def test_int4_round_trip_bound_per_group_and_packing_layout():
    rng = np.random.default_rng(2)
    w = _spread_weights(rng, 12, 4 * GROUP)
    w[3, GROUP:2 * GROUP] = 0.0                       # an all-zero group
    packed, scale = quantize_groups4(w)
    assert packed.dtype == np.uint8 and packed.shape == (12, 2 * GROUP) and scale.shape == (12, 4)
    # the layout, read independently: byte j holds input 2j in its low nibble and 2j+1 in its high one,
    # each as code + 8 (onnxruntime MatMulNBits, zero point 8)
    low, high = packed % 16, packed // 16
    codes = np.stack([low, high], -1).reshape(12, 4 * GROUP).astype(np.int64) - 8
    assert codes.min() >= -7 and codes.max() <= 7
    np.testing.assert_array_equal(codes, unpack4(packed))
    groups = w.astype(np.float64).reshape(12, 4, GROUP)
    ref_scale = np.abs(groups).max(-1) / 7
    nz = ref_scale > 0
    np.testing.assert_allclose(scale[nz], ref_scale[nz], rtol=1e-6)
    deq = codes.reshape(12, 4, GROUP) * scale[:, :, None].astype(np.float64)
    bound = ref_scale[:, :, None] / 2 * (1 + 1e-5) + 1e-30
    assert (np.abs(groups - deq) <= bound).all()
    assert (codes.reshape(12, 4, GROUP)[3, 1] == 0).all()
    np.testing.assert_allclose(FORMS["int4"].dequantize([packed, scale]), deq.reshape(12, -1),
                               rtol=1e-6)


def test_smoothing_balances_activation_and_weight_ranges():
    """SmoothQuant at alpha 0.5: after migration, every input channel's activation range equals the
    weight's range in that channel (max|x_j| / s_j == max|W_j| s_j); the product is unchanged."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    x = rng.standard_normal((50, 40)) * np.exp(rng.uniform(-3, 4, 40))       # outlier channels
    amax = np.abs(x).max(0).astype(np.float32)
    s = smoothing(w, amax, 0.5).astype(np.float64)
    np.testing.assert_allclose(amax / s, np.abs(w).max(0) * s, rtol=1e-5)
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T.astype(np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(smoothing(w, None, 0.5), np.ones(40, np.float32))
    np.testing.assert_allclose(smoothing(w, amax, 0.0), 1 / np.abs(w).max(0), rtol=1e-6)


def test_int8x8_linear_cell_matches_numpy_and_bounds_its_error():
    """graphs/quant.py Int8x8.graph_linear (MindSpore ops) against its `reference` (numpy), and the
    error of per-token int8 activations x int8 weights against the float product."""
    import mindspore as ms

    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = (rng.standard_normal((9, 64)) * np.exp(rng.uniform(-2, 2, 64))).astype(np.float32)
    x[4] = 0.0                                                            # an all-zero token
    qz = Quantizer("w8a8", stats={"l.weight": np.abs(x).max(0)}, alpha=0.5)
    stored = {spec.name: a for spec, a in qz.tensors(WeightSpec("l.weight", w.shape, REPLICATED), w)}
    assert stored["l.weight.qweight"].shape == (64, 48) and stored["l.weight.qweight"].dtype == np.int8
    form = FORMS["int8x8"]
    ref = form.reference(x, form.arrays(stored, "l.weight"))
    got = form.graph_linear(ms.Tensor(x), (form, *[ms.Tensor(a) for a in form.arrays(stored, "l.weight")]))
    np.testing.assert_allclose(got.asnumpy(), ref, rtol=1e-5, atol=1e-5)
    assert (ref[4] == 0).all()
    exact = x.astype(np.float64) @ w.T
    # per-token activation error <= step/2 per element, weight error <= scale/2: relative error ~1%
    assert np.linalg.norm(ref - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stored_forms_agree_between_graphs_and_quantizer(scheme, tiny_weights):
    """Every tensor the Quantizer writes has the name, shape and dtype the graphs declare for it."""
    qz = Quantizer(scheme, stats={})
    kinds = {}
    for name, w in tiny_weights.items():
        spec = WeightSpec(name, w.shape, REPLICATED)
        form = form_of(spec, scheme)
        kinds[name] = form and form.name
        got = qz.tensors(spec, w)
        assert [(s.name, s.shape) for s, _ in got] == [(s.name, a.shape) for s, a in got]
        assert [s for s, _ in got] == (form.stored(spec) if form else [spec])
        for s, a in got:
            assert s.dtype is None or a.dtype == np.dtype(s.dtype), s
    linears = [n for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)]
    assert "lm_head.weight" in linears and "model.embed_tokens.weight" not in linears
    assert not any("norm" in n or n.endswith(".bias") for n in linears)
    assert {n for n, k in kinds.items() if k} == set(linears)
    convs = {n for n in linears if tiny_weights[n].ndim == 4}
    assert convs and all(kinds[n] == "int8" for n in convs)
    if scheme == "w8a8":
        assert all(kinds[n] == "int8x8" for n in set(linears) - convs)
    if scheme in ("w4a16", "w4a8"):   # 4 bits where the input width is a multiple of the group, else int8
        four = "int4" if scheme == "w4a16" else "int4x8"
        assert all(kinds[n] == (four if tiny_weights[n].shape[1] % GROUP == 0 else "int8") for n in set(linears) - convs)
        assert kinds["lm_head.weight"] == four


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_in_row_chunks_is_bit_identical(scheme, monkeypatch):
    """Export quantizes big tensors a few thousand rows at a time (bounded memory for the 19B's
    lm_head): the result must not depend on where the chunks fall."""
    import cogvlm2_lite.graphs.quant as cq
    rng = np.random.default_rng(7)
    w = _spread_weights(rng, 37, 2 * GROUP)
    spec = WeightSpec("model.layers.0.mlp.language_mlp.down_proj.weight", w.shape, REPLICATED)
    qz = Quantizer(scheme, stats={spec.name: np.abs(rng.standard_normal(2 * GROUP)).astype(np.float32)})
    whole = qz.tensors(spec, w)
    monkeypatch.setattr(cq, "CHUNK_ROWS", 5)   # 8 chunks, the last one short
    chunked = qz.tensors(spec, w)
    for (s1, a1), (s2, a2) in zip(whole, chunked):
        assert s1 == s2 and a1.dtype == a2.dtype
        np.testing.assert_array_equal(a1, a2)


def test_quantized_bytes_against_fp16():
    """The 8-bit schemes store <= 0.55x of fp16 and 4 bits 0.31x (codes + fp32 scales + smoothing),
    checked against sizes computed by hand."""
    rng = np.random.default_rng(6)
    weights = {"model.layers.0.mlp.language_mlp.down_proj.weight": rng.standard_normal((128, 448)).astype(np.float32),
               "model.layers.0.self_attn.language_expert_query_key_value.weight":
                   rng.standard_normal((192, 128)).astype(np.float32)}
    ratio = {s: quantized_bytes(weights, Quantizer(s))["ratio"] for s in SCHEMES}
    # int8: 1 byte + 4 / in per weight; w8a8 also 4 / out; int4: 0.5 + 4 / GROUP: vs 2 bytes
    np.testing.assert_allclose(ratio["w8a16"], (448 * 128 + 4 * 128 + 128 * 192 + 4 * 192) / (2 * (448 * 128 + 128 * 192)))
    assert ratio["w8a16"] <= 0.55 and ratio["w8a8"] <= 0.55
    assert abs(ratio["w4a16"] - (0.5 + 4 / GROUP) / 2) < 1e-12 and ratio["w4a16"] <= 0.35
    assert ratio["w4a8"] == ratio["w4a16"]   # the same tensors: only the activations differ


@pytest.fixture(scope="module")
def model(tiny_cfg):
    from cogvlm2_lite.calib.eager import EagerModel
    from cogvlm2_lite.runtime.preprocess import MEAN, STD
    return EagerModel(tiny_cfg, DEMO_TOKENIZER, {"image_size": tiny_cfg.vision.image_size,
                                                 "mean": MEAN, "std": STD})


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
        assert "\r" not in r.stderr and "\nstatistics: 2/2 [" in "\n" + r.stderr   # its phase, as one line
        bundle = Bundle(b, verify=True)
        assert bundle.manifest["calibration"]["samples"] == 2
        assert "calib_stats.safetensors" in bundle.manifest["files"]
        outs.append(load_file(str(b / "calib_stats.safetensors")))
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 0
    for n in outs[0]:
        np.testing.assert_array_equal(outs[0][n], outs[1][n])


# Bounds measured on the tiny random model (logits nearly flat, so near-ties flip easily) with some
# margin: w8a16 / w8a8 perturb weights (and activations) by half a step of 1/127 of their range, w4a16
# by half a step of 1/7 of each group's: an order of magnitude more.
CLOSE = {"w8a16": dict(top1=0.90, cos=0.99, kl=1e-2, layer=0.05),
         "w8a8": dict(top1=0.85, cos=0.99, kl=2e-2, layer=0.08),
         "w4a16": dict(top1=0.60, cos=0.90, kl=0.2, layer=0.6),
         "w4a8": dict(top1=0.60, cos=0.90, kl=0.2, layer=0.6)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_tiny_model_stays_close_to_fp32(scheme, model, tiny_cfg, tiny_weights):
    from cogvlm2_lite.calib.data import heldout_samples, train_samples
    from cogvlm2_lite.calib.eager import EagerModel
    from cogvlm2_lite.calib.report import accuracy_report, format_report
    from cogvlm2_lite.calib.stats import collect
    stats = collect(model, tiny_weights, train_samples(3, tiny_cfg.vision.image_size)) if scheme == "w8a8" else None
    qmodel = EagerModel(tiny_cfg, DEMO_TOKENIZER, model.pre, scheme)
    r = accuracy_report(model, qmodel, tiny_weights, heldout_samples(4, tiny_cfg.vision.image_size),
                        Quantizer(scheme, stats=stats), steps=4)
    print(format_report(r))
    b = CLOSE[scheme]
    assert r["top1_agreement"] >= b["top1"]
    assert r["cosine_min"] >= b["cos"]
    assert r["kl_mean"] < b["kl"]
    assert len(r["layers"]) == len([n for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)])
    assert all(0 < row["output_rel_err"] < b["layer"] for row in r["layers"])


QUANT_BUCKETS = {"chunk": [16], "decode": [32]}


@pytest.fixture(scope="module")
def calib_stats(tmp_path_factory, model, tiny_cfg, tiny_weights):
    from cogvlm2_lite.calib.data import train_samples
    from cogvlm2_lite.calib.stats import collect
    from safetensors.numpy import save_file
    path = tmp_path_factory.mktemp("calib") / "calib_stats.safetensors"
    save_file(collect(model, tiny_weights, train_samples(3, tiny_cfg.vision.image_size)), str(path),
              metadata={"samples": "3"})
    return path


@pytest.fixture(scope="module", params=SCHEMES)
def quant_bundle(request, tmp_path_factory, tiny_hf, calib_stats):
    from cogvlm2_lite.export.bundle import export_bundle
    scheme = request.param
    return scheme, export_bundle(tmp_path_factory.mktemp("bundles") / scheme, hf_dir=tiny_hf, buckets=QUANT_BUCKETS,
                                 progress=False, formats=("mindir", "onnx"), quant=scheme,
                                 calib_stats=calib_stats if scheme == "w8a8" else None)


def test_quantized_bundle_stores_the_quantizer_output_and_its_graphs_compute_it(quant_bundle, tiny_cfg, tiny_weights,
                                                                                 calib_stats):
    """The bundle holds exactly the Quantizer's tensors; the MindIR graphs equal the eager quantized
    cells; onnxruntime's integer / 4-bit kernels (prefill as inputs, decode pre-packed) agree with
    them. w8a8 / w4a8 bound: the float ops before rounding may round differently by an ulp between
    the two runtimes, or a .5 tie the other way, moving an activation code by one step (rare):
    most outputs agree to 1e-5, all within 3% of the output range."""
    import mindspore as ms
    import onnx
    from safetensors.numpy import load_file

    from cogvlm2_lite.calib.eager import pynative
    from cogvlm2_lite.graphs.entry import ExtendGraph, PrefillGraph
    from cogvlm2_lite.graphs.model import weight_specs
    from cogvlm2_lite.runtime.backends import BACKENDS
    from cogvlm2_lite.runtime.weights import load_rank_weights
    from cogvlm2_lite.runtime.bundle import Bundle
    scheme, path = quant_bundle
    b = Bundle(path, verify=True)
    assert b.manifest["quant"]["scheme"] == scheme
    stored = load_rank_weights(b, 0)
    used = {spec.name: tiny_weights[spec.name] for spec in weight_specs(tiny_cfg)}
    expected = Quantizer(scheme, stats=load_file(str(calib_stats)) if scheme == "w8a8" else None).quantize(used)
    assert stored.keys() == expected.keys()
    for n in expected:
        assert stored[n].dtype == expected[n].dtype, n
        np.testing.assert_array_equal(stored[n], expected[n], err_msg=n)
    from cogvlm2_lite.graphs.quant import weight_forms
    forms = {s.name: form_of(s, scheme) for s in weight_specs(tiny_cfg)}
    assert weight_forms(b.manifest["quant"]) == {n: f for n, f in forms.items() if f is not None}
    decode = onnx.load(str(b.rank_dir(0) / "decode_32.onnx"))
    ops = [n.op_type for n in decode.graph.node]
    lm_linears = sum(1 for n in b.weight_names("language") if n.endswith(".qweight")
                     and "vision" not in n)   # a text-only decode step runs the language expert
    # decode graphs of one row run w8a8 as MatMulIntegerToFloat (export/onnx_fuse.py)
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == (lm_linears if scheme == "w8a8" else 0)
    assert ops.count("MatMulNBits") == (lm_linears if scheme in ("w4a16", "w4a8") else 0)
    levels = {a.i for n in decode.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == ({4} if scheme == "w4a8" else {0} if scheme == "w4a16" else set())
    # the same graph with our kernels (kernels/): one node per quantized language linear, for the schemes that have one
    ours = {"w8a8": "MatMulW8A8", "w4a8": "MatMulW4A8"}.get(scheme)
    assert ("onnx_kernels" in b.graph("decode_32").files) == bool(ours)
    if ours:
        kernel_ops = [n.op_type for n in onnx.load(str(b.rank_dir(0) / b.graph("decode_32").files["onnx_kernels"])).graph.node]
        assert kernel_ops.count(ours) == lm_linears and not {"MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat"} & set(kernel_ops)

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 768, (1, 16)).astype(np.int32)
    pos = np.arange(16, dtype=np.int32)[None]
    valid = np.array([13], np.int32)
    t = {n: ms.Tensor(a) for n, a in stored.items()}
    g = PrefillGraph(tiny_cfg, 16, 1, image=False, quant=scheme)
    with pynative():
        ref = [x.asnumpy() for x in g(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(valid), *[t[n] for n in g.table.names])]
    cache = np.zeros((2, 1, 2, 32, 8), np.float32)
    cache[:, :, :, :13] = ref[1][:, :, :, :13]
    vcache = np.zeros_like(cache)
    vcache[:, :, :, :13] = ref[2][:, :, :, :13]
    step = [np.array([[5]], np.int32), np.array([13], np.int32), np.array([13], np.int32),
            *[cache[i] for i in range(2)], *[vcache[i] for i in range(2)]]
    d = ExtendGraph(tiny_cfg, 1, 32, 1, quant=scheme)
    with pynative():
        ref_step = d(*[ms.Tensor(x) for x in step], *[t[n] for n in d.table.names])[0].asnumpy()
    empty = [np.zeros((1, 2, 32, 8), np.float32)] * 4  # the first chunk of a prompt: nothing cached yet
    for backend in ("mindspore", "onnxruntime"):
        be = BACKENDS[backend](b, 0)
        for got, want in ((be.run("extend_16_32", [ids, pos, np.zeros(1, np.int32), valid, *empty])[0], ref[0]),
                          (be.run("decode_32", step)[0], ref_step)):
            diff = np.abs(got - want)
            if backend == "onnxruntime" and scheme in ("w8a8", "w4a8"):
                assert np.median(diff) <= 1e-5 and diff.max() <= 0.03 * np.abs(want).max(), (diff.max(), np.median(diff))
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{backend} {scheme}")


def test_w8a8_export_refuses_without_this_models_statistics(tiny_hf, tmp_path):
    from safetensors.numpy import save_file

    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.runtime.errors import UserError
    kw = dict(hf_dir=tiny_hf, buckets=QUANT_BUCKETS, progress=False, quant="w8a8")
    with pytest.raises(UserError, match="needs activation statistics"):
        export_bundle(tmp_path / "x", **kw)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.fc.weight": np.ones(8, np.float32)}, str(other))
    with pytest.raises(UserError, match="names none of this model's linear layers"):
        export_bundle(tmp_path / "x", calib_stats=other, **kw)
    wider = tmp_path / "wider.safetensors"   # the same names, another model's widths
    save_file({"lm_head.weight": np.ones(1024, np.float32)}, str(wider))
    with pytest.raises(UserError, match="belong to another model"):
        export_bundle(tmp_path / "x", calib_stats=wider, **kw)
    assert not (tmp_path / "x").exists()


def test_w8a8_tp2_under_msrun_stays_close_to_tp1(tiny_hf, calib_stats, engine, tmp_path):
    """Tensor parallelism of a quantized bundle: the transposed int8 weights, their scales and the
    smoothing vectors are cut like the weights they stand for. Not bit-equal to tp 1, by design: a
    row-parallel layer (o_proj, down_proj) quantizes each rank's slice of a token with its own step
    (no extra collective per layer), a finer grid than tp 1's one step per token. Bound: tp 2 moves
    the outputs less than quantizing did (measured, as max |diff| / max |output|: prefill 3.2% vs
    4.7% w8a8-vs-fp32, decode 2.6% vs 4.9%, with the fp32-drawn random weights of issue 20; 1.8% vs 3.5%
    and 1.6% vs 2.5% with the earlier draw); with margin, <= 1.5x that and <= 5%.
    A wrongly cut scale or smoothing vector would be off by the size of the output itself."""
    from test_export import probe_logits, run_tp2_logits

    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.runtime.engine import Engine
    kw = dict(hf_dir=tiny_hf, buckets=QUANT_BUCKETS, progress=False, quant="w8a8", calib_stats=calib_stats)
    want = probe_logits(Engine(export_bundle(tmp_path / "tp1", **kw)))
    got = run_tp2_logits(export_bundle(tmp_path / "tp2", tp=2, **kw), tmp_path / "tp2.npz")
    fp32 = probe_logits(engine)
    for name in want:
        scale = np.abs(want[name]).max()
        rel, noise = np.abs(got[name] - want[name]).max() / scale, np.abs(fp32[name] - want[name]).max() / scale
        assert rel <= 0.05 and rel <= 1.5 * noise, (name, rel, noise)


def test_w4a16_tp2_under_msrun_equals_tp1(tiny_cfg, tmp_path):
    """4-bit codes and their group scales are cut with the weights: with an MLP width whose per-rank
    slices stay multiples of the group (128 -> 64 per rank), tp 2 picks the same forms as tp 1 and,
    with no activation quantization, computes the same numbers (<= 1e-5, as the fp32 tp test)."""
    import json

    from test_export import probe_logits, run_tp2_logits

    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.export.hf_checkpoint import write_checkpoint
    from cogvlm2_lite.runtime.engine import Engine
    hf = write_checkpoint(tmp_path / "hf", tiny_cfg.replace(intermediate_size=128), seed=2)
    shutil.copyfile(DEMO_TOKENIZER, hf / "tokenizer.model")
    kw = dict(hf_dir=hf, buckets=QUANT_BUCKETS, progress=False, quant="w4a16")
    b1, b2 = export_bundle(tmp_path / "tp1", **kw), export_bundle(tmp_path / "tp2", tp=2, **kw)
    forms = [json.loads((b / "manifest.json").read_text())["quant"]["forms"] for b in (b1, b2)]
    assert forms[0] == forms[1] and len(forms[0]["int4"]["names"]) >= 11
    got, want = run_tp2_logits(b2, tmp_path / "tp2.npz"), probe_logits(Engine(b1))
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-5, name


def test_bench_sees_the_matrices_behind_the_stored_forms(quant_bundle, tiny_bundle):
    """The bench's decode roofline reads a quantized bundle's own bytes, and its GEMV probe the same
    [out, in] matrices as the fp32 bundle's (w8a8 stores [in, out], 4-bit two codes per byte)."""
    from cogvlm2_lite.bench.costs import model_costs
    from cogvlm2_lite.runtime.bundle import Bundle
    scheme, path = quant_bundle
    q, f = model_costs(Bundle(path)), model_costs(Bundle(tiny_bundle))
    assert sorted(q["gemv_shapes"]) == sorted(f["gemv_shapes"])
    assert q["decode_weight_bytes"] < 0.5 * f["decode_weight_bytes"]
    assert q["prefill_flops"]["extend"]["16"] == f["prefill_flops"]["extend"]["16"]
