"""Our decode attention (kernels/attention.h DecodeAttention): each vector width against a float64 numpy reference,
the cache written in place or copied, idle rows, bad inputs; and the decode graph rewritten to use it
(export/onnx_decode_attention.py) against the graph with onnxruntime's GroupQueryAttention. Skipped, saying why,
where the library is not built."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cogvlm2_lite.export.onnx_decode_attention import use_decode_attention
from cogvlm2_lite.graphs.quant import KERNELS_DOMAIN
from cogvlm2_lite.runtime import kernels

from test_attention_kernel import session
from test_kernels import isa_param, needs_library
from test_onnx_fuse import T, _fused, _inputs, _run, decode_onnx  # noqa: F401  (decode_onnx: a fixture)

NAMES = ("query", "key", "value", "past_key", "past_value", "write_index")
OUTPUTS = ("output", "present.past_key", "present.past_value")


def node_model(heads: int, kv_heads: int, scale: float) -> onnx.ModelProto:
    node = helper.make_node("DecodeAttention", list(NAMES), list(OUTPUTS), domain=KERNELS_DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads, scale=scale)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "write_index" else TensorProto.FLOAT, None)
              for n in NAMES]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in OUTPUTS]
    graph = helper.make_graph([node], "decode_attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(KERNELS_DOMAIN, 1)])


def reference(q, k, v, past_k, past_v, write_index, scale):
    """-> (output float64 [B, 1, H*D], the caches after the step): row b's new K/V at slot w = write_index[b], then
    each query head i over slots 0..w of key head i // G; a row with w == T untouched, its output zeros."""
    b, kv, t, d = past_k.shape
    h = q.shape[-1] // d
    past_k, past_v, out = past_k.copy(), past_v.copy(), np.zeros((b, h, d))
    for r, w in enumerate(write_index):
        if w == t:
            continue
        past_k[r, :, w], past_v[r, :, w] = k[r].reshape(kv, d), v[r].reshape(kv, d)
        for i in range(h):
            s = past_k[r, i // (h // kv), :w + 1].astype(np.float64) @ q[r].reshape(h, d)[i].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[r, i] = p / p.sum() @ past_v[r, i // (h // kv), :w + 1]
    return out.reshape(b, 1, h * d), past_k, past_v


# (B, H, KV, T, D, write_index): one key, keys past a block of 64 and not a multiple of it, D below, between and above
# the vectors (8, 24, 40, 128), one to eight query heads per key head, an idle row (write_index == T) beside busy ones
CASES = [(1, 1, 1, 8, 8, [0]), (1, 4, 2, 70, 8, [69]), (2, 6, 2, 130, 24, [0, 129]), (3, 8, 8, 64, 40, [63, 64, 5]),
         (1, 32, 4, 300, 128, [200]), (2, 16, 2, 200, 128, [200, 131])]


@needs_library
@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
def test_decode_attention_matches_a_float64_reference(isa, monkeypatch):
    """Outputs within 2e-6 of the largest; the caches, written in place (present bound to past) or copied
    (unbound), exactly the reference's."""
    import onnxruntime as ort
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    rng = np.random.default_rng(0)
    for b, h, kv, t, d, w in CASES:
        q = (rng.standard_normal((b, 1, h * d)) * 2).astype(np.float32)
        k, v = rng.standard_normal((2, b, 1, kv * d)).astype(np.float32)
        past_k, past_v = rng.standard_normal((2, b, kv, t, d)).astype(np.float32)
        write_index = np.array(w, np.int32)
        want, want_k, want_v = reference(q, k, v, past_k, past_v, write_index, d ** -0.5)
        s = session(node_model(h, kv, d ** -0.5))
        out, new_k, new_v = s.run(None, dict(zip(NAMES, (q, k, v, past_k, past_v, write_index))))
        assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max(), (isa, b, h, kv, t, d, w)
        assert np.array_equal(new_k, want_k) and np.array_equal(new_v, want_v)
        assert not np.array_equal(past_k, want_k) or all(x == t for x in w)   # unbound: the inputs untouched
        values = {n: ort.OrtValue.ortvalue_from_numpy(x) for n, x in zip(NAMES, (q, k, v, past_k, past_v, write_index))}
        io = s.io_binding()
        for n, x in values.items():
            io.bind_ortvalue_input(n, x)
        io.bind_output("output")
        io.bind_ortvalue_output("present.past_key", values["past_key"])
        io.bind_ortvalue_output("present.past_value", values["past_value"])
        s.run_with_iobinding(io)
        assert np.abs(io.get_outputs()[0].numpy() - want).max() <= 2e-6 * np.abs(want).max()
        assert np.array_equal(values["past_key"].numpy(), want_k) and np.array_equal(values["past_value"].numpy(), want_v)


@needs_library
def test_decode_attention_says_what_is_wrong_with_its_inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 4 * 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 2 * 8)).astype(np.float32)
    cache = rng.standard_normal((1, 2, 16, 8)).astype(np.float32)
    feed = dict(zip(NAMES, (q, k, k, cache, cache, np.array([3], np.int32))))
    with pytest.raises(Exception, match=r"a write_index is outside \[0, T\]"):
        session(node_model(4, 2, 1.0)).run(None, dict(feed, write_index=np.array([17], np.int32)))
    with pytest.raises(Exception, match=r"num_heads must be a multiple of kv_num_heads"):
        session(node_model(3, 2, 1.0)).run(None, feed)
    with pytest.raises(Exception, match=r"past_key and past_value must be \[B, kv_num_heads, T, D\]"):
        session(node_model(4, 2, 1.0)).run(None, dict(feed, past_value=cache[:, :, :8]))
    with pytest.raises(Exception, match=r"query must hold B x num_heads x D values"):
        session(node_model(4, 2, 1.0)).run(None, dict(feed, query=q[:, :, :16]))


@needs_library
@pytest.mark.parametrize("write_index", [(0, 5), (31, 17), (T, 9)])
def test_decode_graph_with_our_attention_computes_what_group_query_attention_computes(
        decode_onnx, tiny_cfg, tiny_weights, write_index):  # noqa: F811
    """Every GroupQueryAttention of the fused decode graph becomes one DecodeAttention (the seqlens arithmetic
    pruned); logits and the new K/V within 1e-5 of the graph with GroupQueryAttention, and the caches written in
    place at slot write_index only (a row whose cache is full, write_index == T, untouched)."""
    import onnxruntime as ort
    graph, model = decode_onnx
    gqa, _ = _fused(model, tiny_cfg)
    ours = onnx.ModelProto()
    ours.CopyFrom(gqa)
    assert use_decode_attention(ours) == tiny_cfg.num_hidden_layers
    ops = [n.op_type for n in ours.graph.node]
    assert "GroupQueryAttention" not in ops and "Less" not in ops
    assert [o.name for o in ours.graph.output] == [o.name for o in gqa.graph.output]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library_path()))
    feed = _inputs(graph, tiny_weights, write_index, seed=sum(write_index))
    want, _ = _run(gqa, feed, in_place=True)
    got, after = _run(ours, feed, in_place=True, options=options)
    rows = [r for r, w in enumerate(write_index) if w < T]   # a full row's outputs are undefined
    assert np.abs(got["logits"][rows] - want["logits"][rows]).max() <= 1e-5
    for n in ("k_new", "v_new"):   # [L, B, KV, 1, D]
        assert np.abs(got[n][:, rows] - want[n][:, rows]).max() <= 1e-5, n
    for i in range(graph.layers):   # slot w of each busy row holds its new K/V; nothing else moved
        for x in "kv":
            c = after[f"{x}_{i}"].copy()
            for r in rows:
                assert np.array_equal(c[r, :, write_index[r]], got[f"{x}_new"][i][r, :, 0])
                c[r, :, write_index[r]] = feed[f"{x}_{i}"][r, :, write_index[r]]
            assert np.array_equal(c, feed[f"{x}_{i}"])
