"""Attention as one node of our own kernel (kernels/attention.h), in the graphs' form with our kernels.

MindSpore writes layers.attention and cached_attention op by op, and onnxruntime runs them so: the scores
[rows, keys] are written, scaled, masked, normalized and read back, a pass through memory each. In the 19B's
vision tower that is 16 x 1024 x 9217 floats per block of queries, and half of an image's time. Our
Attention kernel does the same arithmetic a block of 64 keys at a time, in cache. Patterns (fp32 graphs):

  one source    Softmax(Mul(MatMul(q, Transpose(k, perm=[0, 1, 3, 2])), c)) -> MatMul(., v)
                (or Softmax(Reshape(Add(Reshape(Mul(MatMul(q, Transpose(k))), c), bias))): with a mask)
  two sources   Softmax(Concat(Add(Reshape(Mul(MatMul(q, Transpose(k_i)), c)), bias_i) for i = 0, 1))
                -> Reshape -> Slice [0, T0) and Slice [T0, T0 + T1) of the last axis -> MatMul(., v_i) -> Add
                (each Add of a bias, and each Reshape, optional)
  ->  Attention(q, k_0, v_0, bias_0, k_1, v_1, bias_1; scale=c, groups=G)   (domain com.cogvlm2)

q is cached_attention's grouped query [B, H, G*S, D] (graphs/layers.py `_grouped`); G is read off the scores'
Reshape to [B, H, G, S, T] (1 without one). The nodes whose outputs only the fused node needed are pruned;
a graph that matches nothing is left as it is.
"""
import onnx
from onnx import helper

from cogvlm2_lite.graphs.quant import KERNELS_DOMAIN

from .onnx_graph import OnnxGraph

KEYS_LAST = [0, 1, 3, 2]


def _product(G: OnnxGraph, t: str):
    """(q, k, scale, the scores' shape) when `t` is [Reshape(] Mul(MatMul(q, Transpose(k)), c) [)], else None."""
    n = G.producer.get(t)
    shape = G.shapes.get(t)
    if n is not None and n.op_type == "Reshape":
        n = G.producer.get(n.input[0])
    if n is None or n.op_type != "Mul" or shape is None:
        return None
    for a, c in (tuple(n.input), tuple(reversed(n.input))):
        mm, scale = G.producer.get(a), G.scalar(c)
        if mm is None or mm.op_type != "MatMul" or scale is None:
            continue
        tr = G.producer.get(mm.input[1])
        if tr is None or tr.op_type != "Transpose" or list(G.attr(tr, "perm", [])) != KEYS_LAST:
            return None
        return mm.input[0], tr.input[0], scale, shape
    return None


def _source(G: OnnxGraph, t: str):
    """(q, k, scale, bias or "", the scores' shape) of one source's scores `t`, else None."""
    n = G.producer.get(t)
    if n is not None and n.op_type == "Reshape":   # the masked scores back to [B, H, G*S, T]
        inner = G.producer.get(n.input[0])
        if inner is not None and inner.op_type == "Add":
            n = inner
    if n is not None and n.op_type == "Add":
        for a, b in (tuple(n.input), tuple(reversed(n.input))):
            p = _product(G, a)
            if p is not None:
                return p[0], p[1], p[2], b, p[3]
        return None
    p = _product(G, t)
    return None if p is None else (p[0], p[1], p[2], "", p[3])


def _last_axis(G: OnnxGraph, node, name: str, t: str) -> bool:
    axis, rank = G.attr(node, name, -1), len(G.shapes.get(t, ()))
    return rank > 0 and axis in (-1, rank - 1)


def _values(G: OnnxGraph, p: str, keys: list[int]):
    """(values of each source, the attention output) downstream of the probabilities `p`, else None."""
    r = G.only_reader(p, "Reshape")
    if len(keys) == 1:
        mm = G.only_reader(r.output[0] if r is not None else p, "MatMul")
        return None if mm is None or mm.input[1] == "" else ([mm.input[1]], mm.output[0])
    if r is None:
        return None
    slices = G.readers.get(r.output[0], [])
    if len(slices) != 2 or any(s.op_type != "Slice" or len(s.input) < 4 for s in slices):
        return None
    bounds = [0, keys[0], keys[0] + keys[1]]
    values, add = [None, None], None
    for s in slices:
        start, end, axes = (G.const(s.input[i]) for i in (1, 2, 3))
        steps = G.const(s.input[4]) if len(s.input) > 4 and s.input[4] else None
        if (start is None or end is None or axes is None or axes.size != 1 or int(axes.reshape(())) not in (-1, 3)
                or (steps is not None and int(steps.reshape(())) != 1)):
            return None
        start, end = int(start.reshape(())), min(int(end.reshape(())), bounds[2])
        i = bounds.index(start) if start in bounds[:2] else None
        mm = G.only_reader(s.output[0], "MatMul")
        if i is None or end != bounds[i + 1] or mm is None or mm.input[0] != s.output[0]:
            return None
        readers = G.readers.get(mm.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Add" or (add is not None and readers[0] is not add):
            return None
        values[i], add = mm.input[1], readers[0]
    return (values, add.output[0]) if None not in values else None


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (module docstring) -> how many attentions became one Attention node."""
    G = OnnxGraph(model, shapes=True)
    fused = {}   # the output tensor -> the node that now produces it
    for sm in [n for n in G.g.node if n.op_type == "Softmax"]:
        x = sm.input[0]
        if not _last_axis(G, sm, "axis", x):
            continue
        cat = G.producer.get(x)
        two = cat is not None and cat.op_type == "Concat" and len(cat.input) == 2 and _last_axis(G, cat, "axis", x)
        sources = [_source(G, t) for t in (cat.input if two else [x])]
        if None in sources or len({(s[0], s[2]) for s in sources}) != 1:
            continue
        q, scale = sources[0][0], sources[0][2]
        qs, shape = G.shapes.get(q), sources[0][4]
        if qs is None or len(qs) != 4 or len(shape) not in (4, 5):
            continue
        groups = shape[2] if len(shape) == 5 else 1
        if shape[:2] != qs[:2] or groups * (shape[3] if len(shape) == 5 else shape[2]) != qs[2]:
            continue
        found = _values(G, sm.output[0], [s[4][-1] for s in sources])
        if found is None:
            continue
        values, out = found
        want = [(qs[0], qs[1], src[4][-1], qs[3]) for src in sources]   # what the kernel takes: k, v [B, H, T, D]
        if any(G.shapes.get(t) != w for (_, k, _, _, _), v, w in zip(sources, values, want) for t in (k, v)):
            continue
        inputs = []
        for (_, k, _, bias, _), v in zip(sources, values):
            inputs += [k, v, bias]
        while inputs[-1] == "":
            inputs.pop()
        fused[out] = helper.make_node("Attention", [q] + inputs, [out], domain=KERNELS_DOMAIN, scale=scale,
                                      groups=groups, name=f"fused_attention_{len(fused)}")
    return G.replace_producers(fused, KERNELS_DOMAIN)
