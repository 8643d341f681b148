"""Our quantized matmul kernels (kernels/, onnxruntime custom operators): each instruction set against a
numpy reference of the same integer arithmetic, and the exported graphs that use them against the
graphs that use onnxruntime's own kernels. Skipped, saying why, where the library is not built."""
import numpy as np
import pytest

from cogvlm2_lite.runtime import kernels

INV127 = np.float32(1 / 127)   # the graphs' `* (1 / 127)`
ISAS = ("avx2", "avxvnni", "avx512", "avx512vnni", "amx")
BUILT, WHY = kernels.isa()
needs_library = pytest.mark.skipif(not BUILT, reason=f"our kernels cannot run here: {WHY}")


def isa_param(name):
    """An instruction set, skipped on CPUs without it."""
    ok = name in kernels.supported()
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"this CPU (or build) lacks {name}"))


def w4a8_reference(x, codes, scales):
    """x [M, K] fp32, codes uint8 [N, K/2], scales fp32 [N, K/32] -> (y float64 [M, N], integer sums
    int64 [M, N, K/32]): graphs/quant.py Int4x8's arithmetic, its float steps in float32 as the graph does."""
    m, k = x.shape
    n = codes.shape[0]
    blocks = x.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(-1)
    inverse = np.float32(127) / np.maximum(amax, np.float32(1e-30))
    q = np.clip(np.floor(blocks * inverse[..., None] + np.float32(0.5)), -127, 127).astype(np.int64)
    w = np.empty((n, k), np.int64)
    w[:, 0::2] = (codes & 15).astype(np.int64) - 8
    w[:, 1::2] = (codes >> 4).astype(np.int64) - 8
    sums = np.einsum("mbj,nbj->mnb", q, w.reshape(n, k // 32, 32))
    step = scales[None] * (amax * INV127)[:, None, :]        # float32, as the kernel multiplies them
    return (sums * step.astype(np.float64)).sum(-1), sums


def w8a8_reference(x, smooth, weight, scale):
    """x [M, K], smooth [K], weight int8 [K, N], scale [N] -> (y float32 [M, N], integer sums int64 [M, N]):
    graphs/quant.py Int8x8's arithmetic in float32, the integer product exact."""
    xs = x * smooth
    step = np.maximum(np.abs(xs).max(-1, keepdims=True), np.float32(1e-30)) * INV127
    q = np.clip(np.floor(xs / step + np.float32(0.5)), -127, 127).astype(np.int64)
    sums = q @ weight.astype(np.int64)
    return (sums.astype(np.float32) * step) * scale, sums


def session(op: str, x_shape: list, k: int, n: int):
    """A one-node graph of our operator `op` with its weights as inputs (as the bundles bind them), their
    shapes left open (the kernel checks them)."""
    import onnxruntime as ort
    from onnx import TensorProto as T, helper
    x = helper.make_tensor_value_info("x", T.FLOAT, x_shape)
    if op == "MatMulW4A8":
        inputs = [x, helper.make_tensor_value_info("codes", T.UINT8, [None, None]),
                  helper.make_tensor_value_info("scales", T.FLOAT, [None, None])]
    else:
        inputs = [x, helper.make_tensor_value_info("smooth", T.FLOAT, [None]),
                  helper.make_tensor_value_info("weight", T.INT8, [None, None]), helper.make_tensor_value_info("scale", T.FLOAT, [None])]
    node = helper.make_node(op, [i.name for i in inputs], ["y"], domain="com.cogvlm2")
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("y", T.FLOAT, x_shape[:-1] + [n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.cogvlm2", 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library_path()))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options)


def w4a8_inputs(rng, rows, k, n):
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    return x, codes, rng.uniform(1e-3, 2e-2, (n, k // 32)).astype(np.float32)


def w8a8_inputs(rng, rows, k, n):
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    return (x, rng.uniform(0.5, 2, k).astype(np.float32), rng.integers(-63, 64, (k, n), dtype=np.int8),
            rng.uniform(1e-3, 2e-2, n).astype(np.float32))


# (leading dims, K, N): one row (decode), a few (B > 1 rows), 16 or more (amx: tiles of 32 rows, the last
# ones padded), more than a chunk of 128 rows; K and N that
# are not multiples of the vectors (w4a8: blocks of 32 left over past 64 / 128 bytes; w8a8: odd K, N)
W4A8_SHAPES = [([1], 32, 1), ([1, 1], 96, 7), ([3], 160, 33), ([2, 1], 1056, 70), ([40], 1056, 70), ([131], 288, 67),
               ([1], 2816, 300), ([1], 64, 1001)]
W8A8_SHAPES = [([1], 1, 1), ([1, 1], 33, 5), ([3], 1027, 70), ([2, 1], 64, 129), ([40], 200, 130), ([131], 101, 67),
               ([1], 2816, 300)]


@needs_library
@pytest.mark.parametrize("isa", [isa_param(i) for i in ISAS])
def test_each_instruction_set_computes_the_graphs_integer_arithmetic(isa, monkeypatch):
    """Random codes, weights and activations of every magnitude: outputs within 1e-6 of the largest,
    on every shape; integer-valued activations whose steps are exactly 1, with unit scales: every output is
    the exact integer sum."""
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    rng = np.random.default_rng(0)
    for lead, k, n in W4A8_SHAPES:
        x, codes, scales = w4a8_inputs(rng, int(np.prod(lead)), k, n)
        y = session("MatMulW4A8", lead + [k], k, n).run(None, {"x": x.reshape(lead + [k]), "codes": codes, "scales": scales})[0]
        want, _ = w4a8_reference(x, codes, scales)
        assert y.shape == tuple(lead + [n])
        assert np.abs(y.reshape(want.shape) - want).max() <= 1e-6 * np.abs(want).max(), (isa, lead, k, n)
        # exact: each block's largest |x| is 127 (step 127 * (1/127) == 1 in float32) and every scale is 1
        x = rng.integers(-127, 128, x.shape).astype(np.float32)
        x.reshape(x.shape[0], -1, 32)[:, :, 0] = 127
        y = session("MatMulW4A8", lead + [k], k, n).run(None, {"x": x.reshape(lead + [k]), "codes": codes,
                                                               "scales": np.ones_like(scales)})[0]
        np.testing.assert_array_equal(y.reshape(-1, n), w4a8_reference(x, codes, scales)[1].sum(-1))
    for lead, k, n in W8A8_SHAPES:
        x, smooth, weight, scale = w8a8_inputs(rng, int(np.prod(lead)), k, n)
        feed = {"x": x.reshape(lead + [k]), "smooth": smooth, "weight": weight, "scale": scale}
        y = session("MatMulW8A8", lead + [k], k, n).run(None, feed)[0]
        want, _ = w8a8_reference(x, smooth, weight, scale)
        assert y.shape == tuple(lead + [n])
        assert np.abs(y.reshape(want.shape) - want).max() <= 1e-6 * np.abs(want).max(), (isa, lead, k, n)
        x = rng.integers(-127, 128, x.shape).astype(np.float32)
        x[:, 0] = 127
        feed.update(x=x.reshape(lead + [k]), smooth=np.ones_like(smooth), scale=np.ones_like(scale))
        y = session("MatMulW8A8", lead + [k], k, n).run(None, feed)[0]
        np.testing.assert_array_equal(y.reshape(-1, n), w8a8_reference(x, feed["smooth"], weight, feed["scale"])[1])


@needs_library
def test_a_bad_instruction_set_or_shape_is_one_sentence(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "sse2")
    assert kernels.isa() == ("", "COGVLM2_KERNELS_ISA=sse2 is not one of amx, avx512vnni, avx512, avxvnni, avx2")
    with pytest.raises(Exception, match="COGVLM2_KERNELS_ISA=sse2 is not one of"):
        session("MatMulW4A8", [1, 64], 64, 8)
    monkeypatch.delenv(kernels.ISA_ENV)
    rng = np.random.default_rng(0)
    x, codes, scales = w4a8_inputs(rng, 1, 64, 8)
    with pytest.raises(Exception, match="codes must be \\[N, K/2\\] and scales \\[N, K/32\\]"):
        session("MatMulW4A8", [1, 64], 64, 8).run(None, {"x": x, "codes": codes, "scales": scales[:, :1]})


@needs_library
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_demo_model_answers_with_the_same_greedy_tokens_as_onnxruntimes_kernels(scheme, tmp_path, monkeypatch):
    """The trained demo model, exported quantized: its graphs with our kernels (every graph: vision, prefill,
    decode) and its graphs with onnxruntime's give the same greedy tokens on held-out samples."""
    from safetensors.numpy import save_file

    from cogvlm2_lite.calib.data import train_samples
    from cogvlm2_lite.calib.eager import EagerModel, load_fp32_bundle
    from cogvlm2_lite.calib.stats import collect
    from cogvlm2_lite.demo import task
    from cogvlm2_lite.demo.embedded import BUCKETS, CACHE_ENV, MODEL_DIR, bundle_path, ensure_bundle
    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.runtime.engine import Engine, Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    stats = None
    if scheme == "w8a8":   # SmoothQuant's statistics, from the fp32 bundle as `calibrate` makes them
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
        ensure_bundle()
        b, cfg, weights = load_fp32_bundle(bundle_path())
        stats = tmp_path / "calib_stats.safetensors"
        save_file(collect(EagerModel(cfg, b.tokenizer_path, b.manifest["preprocess"]), weights,
                          train_samples(8, cfg.vision.image_size)), str(stats))
    out = export_bundle(tmp_path / scheme, hf_dir=MODEL_DIR, buckets=BUCKETS, progress=False, formats=("onnx",),
                        quant=scheme, calib_stats=stats)
    from cogvlm2_lite.demo.train import demo_config
    samples = task.generate(task.HELDOUT_SEED, 16, demo_config().vision.image_size)
    tokens = {}
    for library in (str(kernels.library_path()), str(tmp_path / "none.so")):
        monkeypatch.setenv(kernels.LIBRARY_ENV, library)
        engine = Engine(out, "onnxruntime")
        assert engine.backend.kernels == (library if library.endswith("libcogvlm2_kernels.so") else None)
        tokens[library] = [engine.generate([Request(s.question, image=s.image, params=SamplingParams(max_new_tokens=12))])[0]
                           .token_ids for s in samples]
    ours, theirs = tokens.values()
    assert ours == theirs
