"""Issue 18: the decode graphs' fusion pass (export/onnx_fuse.py) computes what the unrewritten graph
computes (fp32: within 1e-5, as the eager cell), writes the new K/V into the cache in place when the
present outputs are bound to the cache inputs, and leaves a row with a full cache untouched."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cogvlm2_lite.export.onnx_fuse import PRESENT, fuse_decode

T, B = 32, 2


@pytest.fixture(scope="module")
def decode_onnx(tmp_path_factory, tiny_cfg):
    """decode_32 of the tiny model (two rows) as MindSpore exports it, and the cell it was traced from."""
    from cogvlm2_lite.export.onnx_export import export_onnx
    from cogvlm2_lite.export.trace import example_inputs
    from cogvlm2_lite.runtime.mindspore_backend import use_device
    from cogvlm2_lite.graphs.entry import ExtendGraph
    use_device()
    g = ExtendGraph(tiny_cfg, 1, T, B)
    path = tmp_path_factory.mktemp("fuse") / "decode.onnx"
    export_onnx(g, example_inputs(g, "fp32", 1), path)
    return g, onnx.load(str(path))


def _fused(model, cfg):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    counts = fuse_decode(m, (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_multi_query_heads, cfg.head_dim, T))
    onnx.checker.check_model(m)
    return m, counts


def _inputs(graph, weights, write_index, seed):
    rng = np.random.default_rng(seed)
    cache = (B, graph.lm.layers[0].attn.kv_heads, T, graph.lm.head_dim)
    feed = {"token": rng.integers(0, 700, (B, 1)).astype(np.int32),
            "position": (np.array(write_index) + rng.integers(0, 5, B)).astype(np.int32),  # CogVLM2: id != slot
            "write_index": np.array(write_index, np.int32)}
    for i in range(graph.layers):
        feed[f"k_{i}"] = rng.standard_normal(cache).astype(np.float32)
        feed[f"v_{i}"] = rng.standard_normal(cache).astype(np.float32)
    feed.update({n: weights[n] for n in graph.table.names})
    return feed


def _run(model, feed, in_place, options=None):
    """Run through IOBinding; with in_place the present outputs share the cache inputs' memory."""
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {n: np.array(x) for n, x in feed.items()}
    b = s.io_binding()
    for n, x in feed.items():
        b.bind_input(n, "cpu", 0, x.dtype, x.shape, x.ctypes.data)
    out = {}
    for o in s.get_outputs():
        if in_place and o.name.startswith(PRESENT):
            x = feed[o.name[len(PRESENT):]]
            b.bind_output(o.name, "cpu", 0, x.dtype, x.shape, x.ctypes.data)
        else:
            b.bind_output(o.name, "cpu")
    s.run_with_iobinding(b)
    names = [o.name for o in s.get_outputs()]
    out = {n: v for n, v in zip(names, b.copy_outputs_to_cpu()) if not (in_place and n.startswith(PRESENT))}
    return out, feed


def test_fusion_replaces_the_small_ops(decode_onnx, tiny_cfg):
    _, model = decode_onnx
    fused, counts = _fused(model, tiny_cfg)
    layers = tiny_cfg.num_hidden_layers
    assert counts == {"GroupQueryAttention": layers, "SkipSimplifiedLayerNormalization": 2 * layers}
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * layers and "Softmax" not in ops
    assert len(ops) < len(model.graph.node) / 2
    # the contract is unchanged: same inputs, same outputs first; the present outputs come after
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output] + \
        [f"{PRESENT}{x}_{i}" for i in range(layers) for x in "kv"]


@pytest.mark.parametrize("write_index", [(0, 5), (17, 31), (31, 1)])
def test_fused_decode_matches_unfused_and_eager(decode_onnx, tiny_cfg, tiny_weights, write_index):
    graph, model = decode_onnx
    fused, _ = _fused(model, tiny_cfg)
    feed = _inputs(graph, tiny_weights, write_index, seed=sum(write_index))
    ref, _ = _run(model, feed, in_place=False)
    for in_place in (False, True):
        got, after = _run(fused, feed, in_place)
        for n in ("logits", "k_new", "v_new"):
            assert np.abs(got[n] - ref[n]).max() <= 1e-5, (n, in_place)
        if in_place:  # slot write_index of each row now holds that row's new K/V; nothing else moved
            for i in range(graph.layers):
                for x in "kv":
                    c, new = after[f"{x}_{i}"].copy(), got[f"{x}_new"][i]
                    for r, w in enumerate(write_index):
                        assert np.array_equal(c[r, :, w], new[r, :, 0])
                        c[r, :, w] = feed[f"{x}_{i}"][r, :, w]
                    assert np.array_equal(c, feed[f"{x}_{i}"])
    import mindspore as ms
    from cogvlm2_lite.calib.eager import pynative
    with pynative():
        eager = graph(*[ms.Tensor(feed[n]) for n in [i.name for i in model.graph.input]])
    assert np.abs(eager[0].asnumpy() - got["logits"]).max() <= 1e-5
    assert np.abs(eager[1].asnumpy() - got["k_new"]).max() <= 1e-5


def test_a_row_with_a_full_cache_is_left_alone(decode_onnx, tiny_cfg, tiny_weights):
    """write_index == T (the runtime never decodes such a row, but the batch carries it): no write,
    and the other row is unaffected."""
    graph, model = decode_onnx
    fused, _ = _fused(model, tiny_cfg)
    feed = _inputs(graph, tiny_weights, (T, 9), seed=7)
    got, after = _run(fused, feed, in_place=True)
    for i in range(graph.layers):
        assert np.array_equal(after[f"k_{i}"][0], feed[f"k_{i}"][0])
        assert np.array_equal(after[f"v_{i}"][0], feed[f"v_{i}"][0])
    feed2 = dict(feed, write_index=np.array([5, 9], np.int32))
    ref, _ = _run(model, feed2, in_place=False)
    assert np.abs(got["logits"][1] - ref["logits"][1]).max() <= 1e-5


def test_w8a8_decode_quantizes_activations_in_two_operators(tmp_path, tiny_cfg, tiny_weights):
    """B = 1: per-token int8 quantization + MatMulInteger + rescale -> QuantizeLinear + MatMulIntegerToFloat,
    the integer sums unchanged (only exact .5 ties could round differently)."""
    from cogvlm2_lite.graphs.quant import Quantizer, is_linear_weight
    from cogvlm2_lite.export.onnx_export import export_onnx
    from cogvlm2_lite.export.onnx_fuse import fuse_int8_activations
    from cogvlm2_lite.export.onnx_quant import rewrite_quantized_matmuls
    from cogvlm2_lite.export.trace import Plan, example_inputs
    from cogvlm2_lite.runtime.mindspore_backend import use_device
    from cogvlm2_lite.graphs.entry import ExtendGraph
    use_device()
    g = ExtendGraph(tiny_cfg, 1, T, 1, quant="w8a8")
    export_onnx(g, example_inputs(g, "fp32", 1), tmp_path / "d.onnx")
    model = onnx.load(str(tmp_path / "d.onnx"))
    rewrite_quantized_matmuls(model, Plan(tiny_cfg.to_hf(), quant="w8a8").forms())
    rng = np.random.default_rng(0)
    stats = {n: rng.uniform(0.5, 3, int(np.prod(w.shape[1:]))).astype(np.float32)
             for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)}
    q = Quantizer("w8a8", 1, stats).quantize(tiny_weights)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    n = fuse_int8_activations(fused)
    onnx.checker.check_model(fused)
    ops = [x.op_type for x in fused.graph.node]
    assert n == ops.count("MatMulIntegerToFloat") == [x.op_type for x in model.graph.node].count("MatMulInteger") > 0
    assert "MatMulInteger" not in ops and "Floor" not in ops
    for wi in (0, 13, 31):
        feed = {"token": np.array([[wi * 7 + 3]], np.int32), "position": np.array([wi + 2], np.int32),
                "write_index": np.array([wi], np.int32)}
        for i in range(g.layers):
            for x in "kv":
                feed[f"{x}_{i}"] = rng.standard_normal((1, 2, T, 8)).astype(np.float32)
        feed.update({name: q[name] for name in g.table.names})
        ref = ort.InferenceSession(model.SerializeToString()).run(None, feed)
        got = ort.InferenceSession(fused.SerializeToString()).run(None, feed)
        for a, b in zip(ref, got):
            assert np.abs(a - b).max() <= 1e-5


def test_in_flight_batching_on_fused_graphs_answers_like_mindspore(tmp_path_factory, tiny_hf):
    """B = 2 rows through the scheduler: rows go idle, one at a full bucket (32 slots) while the other
    decodes on; the fused graphs write the cache in place. Greedy tokens equal MindSpore's."""
    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.runtime.engine import Engine, Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    from conftest import BUCKETS
    b = export_bundle(tmp_path_factory.mktemp("bundles") / "b2", hf_dir=tiny_hf, buckets=BUCKETS, progress=False,
                      batch=2, formats="mindir,onnx")
    engines = [Engine(b, backend=name) for name in ("mindspore", "onnxruntime")]
    n = len(engines[0].prompt(Request("hi"))[0])
    requests = [Request("hi", params=SamplingParams(max_new_tokens=33 - n, ignore_eos=True)),  # ends at 32 slots
                Request("tell me a long story about it", params=SamplingParams(max_new_tokens=20, ignore_eos=True)),
                Request("and now?", params=SamplingParams(max_new_tokens=9, ignore_eos=True)),
                Request("hi", params=SamplingParams(max_new_tokens=40, ignore_eos=True))]
    got = [[r.token_ids for r in e.generate(requests)] for e in engines]
    assert got[0] == got[1]


def _row_reshapes(model):
    """Matmuls that read a Reshape's output or feed one."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    mms = [n for n in model.graph.node if n.op_type in ("Gemm", "FusedMatMul", "MatMulNBits")]
    return sum(1 for m in mms if getattr(producer.get(m.input[0]), "op_type", "") == "Reshape"
               or any(r.op_type == "Reshape" for r in readers.get(m.output[0], ())))


def test_decode_matmuls_take_their_rows_without_reshapes(decode_onnx, tiny_cfg, tiny_weights):
    """fp32, two rows: every Gemm between row reshapes becomes FusedMatMul on the [B, 1, K] activations (all but
    lm_head's: the logits are [B, V]); the results stay within 1e-5 of the unrewritten graph."""
    from cogvlm2_lite.export.onnx_fuse import drop_row_reshapes
    from cogvlm2_lite.export.onnx_graph import OnnxGraph
    graph, model = decode_onnx
    shapes = OnnxGraph(model, shapes=True).shapes
    fused, _ = _fused(model, tiny_cfg)
    gemms = [n.op_type for n in fused.graph.node].count("Gemm")
    assert gemms >= 5 * tiny_cfg.num_hidden_layers and _row_reshapes(fused) == gemms
    n = drop_row_reshapes(fused, shapes)
    onnx.checker.check_model(fused)
    ops = [x.op_type for x in fused.graph.node]
    assert n == gemms - 1 == ops.count("FusedMatMul") and ops.count("Gemm") == 1 and _row_reshapes(fused) == 1
    assert next(x for x in fused.graph.node if x.op_type == "Gemm").input[1] == "lm_head.weight"
    feed = _inputs(graph, tiny_weights, (3, 20), seed=5)
    ref, _ = _run(model, feed, in_place=False)
    got, _ = _run(fused, feed, in_place=False)
    for name in ("logits", "k_new", "v_new"):
        assert np.abs(got[name] - ref[name]).max() <= 1e-5, name


@pytest.mark.parametrize("ours", [False, True], ids=["onnxruntime", "ours"])
@pytest.mark.parametrize("scheme", ["w4a8", "w8a8"])
def test_quantized_decode_matmuls_take_their_rows_without_reshapes(tmp_path, tiny_cfg, tiny_weights, scheme, ours):
    """The export's order (fuse_decode, the quantized matmuls, w8a8's one-row activation quantization, then
    this): every MatMulNBits / MatMulIntegerToFloat but lm_head's reads [1, 1, K] (w8a8: its SmoothQuant
    multiply and per-token quantization do) as it read [1, K], the same kernels on the same row:
    bit-identical logits. The same for our kernels (MatMulW4A8 / MatMulW8A8, `ours`)."""
    from cogvlm2_lite.runtime import kernels as own
    if ours and not own.library():
        pytest.skip(f"our kernels cannot run here: {own.isa()[1]}")
    from cogvlm2_lite.graphs.quant import Quantizer, is_linear_weight
    from cogvlm2_lite.export.onnx_export import export_onnx
    from cogvlm2_lite.export.onnx_fuse import drop_row_reshapes, fuse_int8_activations
    from cogvlm2_lite.export.onnx_graph import OnnxGraph
    from cogvlm2_lite.export.onnx_quant import rewrite_quantized_matmuls
    from cogvlm2_lite.export.trace import Plan, example_inputs
    from cogvlm2_lite.runtime.mindspore_backend import use_device
    from cogvlm2_lite.graphs.entry import ExtendGraph
    use_device()
    g = ExtendGraph(tiny_cfg, 1, T, 1, quant=scheme)
    export_onnx(g, example_inputs(g, "fp32", 1), tmp_path / "d.onnx")
    model = onnx.load(str(tmp_path / "d.onnx"))
    shapes = OnnxGraph(model, shapes=True).shapes
    model, _ = _fused(model, tiny_cfg)
    rewrite_quantized_matmuls(model, Plan(tiny_cfg.to_hf(), quant=scheme).forms(), kernels=ours)
    fuse_int8_activations(model)
    kernel = {"w4a8": "MatMulNBits", "w8a8": "MatMulIntegerToFloat"}[scheme]
    if ours:
        kernel = {"w4a8": "MatMulW4A8", "w8a8": "MatMulW8A8"}[scheme]
    kernels = [x.op_type for x in model.graph.node].count(kernel)
    reshapes = [x.op_type for x in model.graph.node].count("Reshape")
    dropped = onnx.ModelProto()
    dropped.CopyFrom(model)
    n = drop_row_reshapes(dropped, shapes)
    onnx.checker.check_model(dropped)
    assert n == kernels - 1 > 0 and [x.op_type for x in dropped.graph.node].count(kernel) == kernels
    assert [x.op_type for x in dropped.graph.node].count("Reshape") <= reshapes - n - 1   # the rows' Reshapes go too
    rng = np.random.default_rng(3)
    stats = {n: rng.uniform(0.5, 3, int(np.prod(w.shape[1:]))).astype(np.float32)
             for n, w in tiny_weights.items() if is_linear_weight(n, w.shape)}
    q = Quantizer(scheme, 1, stats).quantize(tiny_weights)
    feed = {"token": np.array([[11]], np.int32), "position": np.array([9], np.int32),
            "write_index": np.array([7], np.int32)}
    for i in range(g.layers):
        for x in "kv":
            feed[f"{x}_{i}"] = rng.standard_normal((1, 2, T, 8)).astype(np.float32)
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    feed.update({name: q[name].reshape(declared[name]) for name in g.table.names if name in declared})
    options = ort.SessionOptions()
    if ours:
        options.register_custom_ops_library(own.library())
    ref = ort.InferenceSession(model.SerializeToString(), options).run(None, feed)
    got = ort.InferenceSession(dropped.SerializeToString(), options).run(None, feed)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_sole_sources_matches_walking_back_from_every_tensor(decode_onnx):
    """The one-pass index of which weight input a tensor comes from (the quantized-matmul rewrite's) says, for every
    tensor of a real exported graph, what walking back from it says: the one input, several (MANY), or none."""
    from cogvlm2_lite.export.onnx_graph import MANY, OnnxGraph
    _, model = decode_onnx
    G = OnnxGraph(model)
    wanted = {i for i in G.inputs if i.endswith(".weight")}
    sole = G.sole_sources(wanted)
    assert len(wanted) > 4
    counts = {0: 0, 1: 0, 2: 0}
    for node in G.g.node:
        for t in node.output:
            walked = G.sources(t) & wanted
            counts[min(len(walked), 2)] += 1
            assert sole.get(t) == (None if not walked else next(iter(walked)) if len(walked) == 1 else MANY), t
    assert min(counts.values()) > 0   # the graph has tensors of all three kinds
