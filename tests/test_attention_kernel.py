"""Our fused attention (kernels/attention.h, the custom operator Attention): each vector width against a float64
numpy reference of softmax(q k^T * scale + bias) v, and the graphs rewritten to use it (export/onnx_attention.py)
and onnxruntime's Gelu (export/onnx_gelu.py), as the form with our kernels is, against the graphs as MindSpore
exports them. Skipped, saying why, where the library is not built."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cogvlm2_lite.export.onnx_attention import fuse_attention
from cogvlm2_lite.export.onnx_gelu import fuse_gelu
from cogvlm2_lite.graphs.quant import KERNELS_DOMAIN
from cogvlm2_lite.runtime import kernels

from test_kernels import isa_param, needs_library

INPUTS = ("q", "k0", "v0", "bias0", "k1", "v1", "bias1")


def reference(q, sources, groups, scale):
    """q [B, H, G*S, D]; sources [(k, v, bias or None)], k, v [B, H, T, D], bias broadcast to [B, H, G, S, T]
    -> float64 [B, H, G*S, D]: the scores of every source joined, one softmax per row."""
    b, h, r, d = q.shape
    q5 = q.astype(np.float64).reshape(b, h, groups, r // groups, d)
    scores = [np.einsum("bhgsd,bhtd->bhgst", q5, k.astype(np.float64)) * scale + (0 if bias is None else bias)
              for k, _, bias in sources]
    x = np.concatenate(scores, -1)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    v = np.concatenate([v for _, v, _ in sources], 2).astype(np.float64)
    return np.einsum("bhgst,bhtd->bhgsd", p, v).reshape(b, h, r, d)


def session(model: onnx.ModelProto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library_path()))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def attention_node_model(n_inputs: int, groups: int, scale: float, present=None) -> onnx.ModelProto:
    names = [n if present is None or present[i] else "" for i, n in enumerate(INPUTS[:n_inputs])]
    node = helper.make_node("Attention", names, ["o"], domain=KERNELS_DOMAIN, scale=scale, groups=groups)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n]
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(KERNELS_DOMAIN, 1)])


def masked(rng, shape, share):
    """An additive mask of the graphs' NEG_INF (-1e9) over `share` of the entries, 0 elsewhere."""
    return np.where(rng.random(shape) < share, np.float32(-1e9), np.float32(0))


def bias(rng, spec, s, t):
    """None, "causal" ([S, T]: key j of row i masked when j > i), or a shape: the graphs' NEG_INF over 30% of the
    entries, and over the first two blocks of 64 keys whole when there are more (skipped for every row); the last
    key of every row unmasked (a row masked whole has no softmax to agree on: fp32 rounds -1e9 + score to -1e9)."""
    if spec is None:
        return None
    if spec == "causal":
        return np.triu(np.full((s, t), -1e9, np.float32), 1)
    b = masked(rng, spec, 0.3)
    if spec[-1] > 128:
        b[..., :128] = -1e9
    b[..., -1] = 0
    return b


# (B, H, G, S, D, T0, T1, bias0, bias1): one query row, rows and keys that are not multiples of the 4-row tiles,
# the 64-key blocks or the vectors (D = 8, 24, 112), grouped heads (G > 1), batch rows, a bias per key (the KV
# cache's) whose leading blocks are masked whole, a causal bias (the chunk's own keys; over 200 keys its blocks
# past a tile's rows are skipped), one per (batch, head) row and key, one per row and key, none
CASES = [(1, 1, 1, 1, 8, 1, 0, None, None), (1, 2, 1, 5, 8, 7, 0, None, None), (2, 3, 4, 9, 24, 70, 9, (2, 1, 1, 1, 70), "causal"),
         (1, 2, 1, 130, 112, 200, 0, (1, 2, 1, 130, 200), None), (2, 2, 4, 16, 128, 300, 16, (2, 1, 1, 1, 300), (4, 16, 16)),
         (1, 4, 1, 67, 40, 129, 0, (67, 129), None), (1, 2, 2, 200, 16, 200, 0, "causal", None)]


@needs_library
@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
def test_attention_matches_a_float64_reference(isa, monkeypatch):
    """Within 2e-6 of the largest output on every case, with either vector width (avx512: the AVX-512 copy
    every AVX-512 set uses)."""
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    rng = np.random.default_rng(0)
    for b, h, g, s, d, t0, t1, bias0, bias1 in CASES:
        q = (rng.standard_normal((b, h, g * s, d)) * 2).astype(np.float32)
        k0, v0 = rng.standard_normal((2, b, h, t0, d)).astype(np.float32)
        b0 = bias(rng, bias0, s, t0)
        sources, feed = [(k0, v0, b0)], {"q": q, "k0": k0, "v0": v0}
        if b0 is not None:
            feed["bias0"] = b0
        if t1:
            k1, v1 = rng.standard_normal((2, b, h, t1, d)).astype(np.float32)
            b1 = bias(rng, bias1, s, t1)
            sources.append((k1, v1, b1))
            feed.update(k1=k1, v1=v1, **({"bias1": b1} if b1 is not None else {}))
        n = 7 if t1 else 4 if b0 is not None else 3
        present = [True] * 3 + [b0 is not None] + ([True, True, sources[-1][2] is not None] if t1 else [])
        scale = d ** -0.5
        out = session(attention_node_model(n, g, scale, present[:n])).run(None, feed)[0]
        want = reference(q, sources, g, scale)
        assert out.shape == want.shape
        assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max(), (isa, b, h, g, s, d, t0, t1)


@needs_library
def test_attention_says_what_is_wrong_with_its_inputs():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 2, 4, 8)).astype(np.float32)
    with pytest.raises(Exception, match=r"k and v must be \[B, H, T, D\] for q \[B, H, G\*S, D\]"):
        session(attention_node_model(3, 1, 1.0)).run(None, {"q": q, "k0": k[:, :, :, :4], "v0": k[:, :, :, :4]})
    with pytest.raises(Exception, match=r"a bias does not broadcast to \[B, H, G, S, T\]"):
        session(attention_node_model(4, 1, 1.0)).run(None, {"q": q, "k0": k, "v0": k, "bias0": np.zeros((3, 4), np.float32)})
    with pytest.raises(Exception, match=r"q must be \[B, H, G\*S, D\] with G = groups"):
        session(attention_node_model(3, 3, 1.0)).run(None, {"q": q, "k0": k, "v0": k})


def _graph_inputs(graph, weights, vocab, seed):
    """Random data inputs of a graph (token ids in the vocabulary, a cache filled to a different slot per row,
    the last two tokens padding), and the weights it reads."""
    rng = np.random.default_rng(seed)
    tokens = getattr(graph, "seq_len", None) or getattr(graph, "chunk", 1)
    feed = {}
    for name, shape, dtype in graph.inputs:
        if name == "write_index":
            x = rng.integers(1, graph.cache_len // 2, shape)
        elif name == "valid_len":
            x = np.full(shape, tokens - 2)
        elif dtype == "int32":   # ids, positions
            x = rng.integers(0, vocab, shape)
        else:
            x = rng.standard_normal(shape)
        feed[name] = x.astype(dtype)
    feed.update({n: weights[n] for n in graph.table.names})
    return feed


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_cfg):
    """The tiny model's vision graph (its queries in blocks of 7, so that a layer has several attentions), an
    image prefill and a text chunk over a cache (two batch rows), as MindSpore exports them to ONNX."""
    from cogvlm2_lite.export.onnx_export import export_onnx
    from cogvlm2_lite.export.trace import example_inputs, prepare_tracing
    from cogvlm2_lite.graphs.entry import ExtendGraph, VisionGraph, image_prefix_graph
    prepare_tracing()
    vision = VisionGraph(tiny_cfg, 1)
    for layer in vision.model.layers:
        layer.attention.query_block = 7
    out = {}
    folder = tmp_path_factory.mktemp("attention")
    for graph in (vision, image_prefix_graph(tiny_cfg, 8), ExtendGraph(tiny_cfg, 8, 32, 2)):
        path = folder / f"{graph.name}.onnx"
        export_onnx(graph, example_inputs(graph, "fp32", 1), path)
        out[graph.name] = graph, onnx.load(str(path))
    return out


@needs_library
@pytest.mark.parametrize("name", ["vision", "prefill_image_8", "extend_8_32"])
def test_fused_graphs_compute_what_the_exported_graphs_compute(exported, name, tiny_cfg, tiny_weights):
    """Every attention of the graph becomes one Attention node (vision: one per block of queries), every GELU
    (the vision layers' and the adapter's) one Gelu, and the graph's outputs stay within 1e-5 of the unfused
    graph's (onnxruntime's own ops)."""
    graph, model = exported[name]
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    attentions, gelus = fuse_attention(fused), fuse_gelu(fused)
    onnx.checker.check_model(fused)
    vision = name == "vision"
    layers = tiny_cfg.vision.num_hidden_layers if vision else tiny_cfg.num_hidden_layers
    assert attentions == layers * (-(-tiny_cfg.vision.num_positions // 7) if vision else 1)
    assert gelus == (layers + 1 if vision else 0)
    assert not any(n.op_type in ("Softmax", "Clip", "Div") for n in fused.graph.node)
    feed = _graph_inputs(graph, tiny_weights, tiny_cfg.vocab_size, 0)
    want = session(model).run(None, feed)
    got = session(fused).run(None, feed)
    for w, g in zip(want, got):
        assert np.abs(g - w).max() <= 1e-5 * max(np.abs(w).max(), 1.0), name


def test_a_gelu_shaped_region_that_is_not_gelu_is_left_alone(exported):
    """The same ops with one coefficient of erf's numerator changed: the probe values disagree, nothing fused."""
    model = onnx.ModelProto()
    model.CopyFrom(exported["vision"][1])
    changed = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size == 1 and a.dtype == np.float32 and a.item() == np.float32(-1.60960333262415e-02):
            t.CopyFrom(numpy_helper.from_array(np.full(a.shape, 0.5, np.float32), t.name))
            changed += 1
    assert changed
    assert fuse_gelu(model) == 0


def test_a_graph_without_the_pattern_is_left_alone():
    """A Softmax whose scores do not come from a product of queries and keys is not attention."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 4, 4])
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, v], [y]))
    assert fuse_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Softmax", "MatMul"]
