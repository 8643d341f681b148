"""GELU as one node (onnxruntime's com.microsoft Gelu) in the graphs' form with our kernels.

MindSpore's ONNX exporter has no Erf, so graphs/layers.py writes the vision tower's and the adapter's exact
GELU with elementary ops: 0.5 x (1 + erf(x / sqrt 2)), erf(u) = u P(u^2) / Q(u^2) on u clipped to [-4, 4].
onnxruntime runs that as ~30 passes over the MLP's activations: at the 19B's 9217 patches x 15360, 100 s
of an image's 470. Gelu (onnxruntime's own kernel, MLAS's erf) is one pass.

The pattern is found by its ends, Clip(Mul(x, 1/sqrt 2), -4, 4) and Mul(Mul(x, 0.5), Add(1, erf)), and the
region between them (only Add, Sub, Mul, Div of it and constants) is then evaluated with numpy on probe
values: it is replaced only if it computes GELU within 2e-6 x max(1, |x|) (the rational erf is within
4.2e-7 of erf), so a graph with another function of the same shape is left as it is.
"""
import math

import numpy as np
import onnx
from onnx import helper

from .onnx_graph import OnnxGraph

MS = "com.microsoft"
ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
PROBE = np.linspace(-10, 10, 20001, dtype=np.float32)
EXACT = np.array([0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in PROBE.astype(np.float64)])


def _scaled(G: OnnxGraph, t: str, factor: float):
    """x when `t` is Mul(x, c) (either order) with c == factor in float32, else None."""
    n = G.producer.get(t)
    if n is None or n.op_type != "Mul":
        return None
    for x, c in (tuple(n.input), tuple(reversed(n.input))):
        if G.scalar(c) is not None and np.float32(G.scalar(c)) == np.float32(factor) and G.const(x) is None:
            return x
    return None


def _region(G: OnnxGraph, clip, order: dict):
    """The nodes computed from the Clip's output and constants only (Add, Sub, Mul, Div), in graph order, and
    the tensors they compute."""
    inside, nodes, todo = {clip.output[0]}, [], [clip.output[0]]
    while todo:
        for n in G.readers.get(todo.pop(), []):
            ins = [i for i in n.input if G.const(i) is None]
            if n.op_type in ARITHMETIC and n.output[0] not in inside and all(i in inside for i in ins):
                inside.add(n.output[0])
                nodes.append(n)
                todo.append(n.output[0])
    return sorted(nodes, key=lambda n: order[id(n)]), inside


def _evaluate(G: OnnxGraph, clip, nodes, x):
    """The region's tensors for Clip input values x (float32, as onnxruntime computes them)."""
    lo, hi = (np.float32(G.scalar(i)) for i in clip.input[1:3])
    values = {clip.output[0]: np.clip(x, lo, hi)}
    for n in nodes:
        a, b = (values[i] if i in values else G.const(i).astype(np.float32) for i in n.input)
        values[n.output[0]] = ARITHMETIC[n.op_type](a, b).astype(np.float32)
    return values


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (module docstring) -> how many GELUs became one Gelu node."""
    G = OnnxGraph(model)
    fused = {}   # the output tensor -> the node that now produces it
    order = {id(n): i for i, n in enumerate(G.g.node)}
    for clip in G.g.node:
        if clip.op_type != "Clip" or len(clip.input) != 3 or G.scalar(clip.input[1]) != -4 or G.scalar(clip.input[2]) != 4:
            continue
        x = _scaled(G, clip.input[0], 1 / math.sqrt(2))
        if x is None:
            continue
        nodes, inside = _region(G, clip, order)
        own = {id(n) for n in nodes}
        exits = {t for t in inside - {clip.output[0]} if any(id(r) not in own for r in G.readers.get(t, []))}
        last = G.readers.get(next(iter(exits)), []) if len(exits) == 1 else []
        if len(last) != 1 or last[0].op_type != "Mul":
            continue
        (exit_,) = exits
        half = next(iter(set(last[0].input) - {exit_}), None)
        if half is None or _scaled(G, half, 0.5) != x:
            continue
        values = _evaluate(G, clip, nodes, PROBE * np.float32(1 / math.sqrt(2)))
        got = (PROBE * np.float32(0.5)) * values[exit_]
        if not np.all(np.abs(got - EXACT) <= 2e-6 * np.maximum(1, np.abs(PROBE))):
            continue
        fused[last[0].output[0]] = helper.make_node("Gelu", [x], [last[0].output[0]], domain=MS,
                                                    name=f"fused_gelu_{len(fused)}")
    return G.replace_producers(fused, MS)
