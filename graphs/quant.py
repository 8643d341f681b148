"""Quantized weight inputs: a transformation of a graph's WeightTable (one handler per scheme, as
gpt-fast's quantize.py), and the in-graph dequantization that turns them back into the weights the
blocks read.

w8a16: every linear weight NAME [out, in] (conv weights [out, C, k, k] alike) becomes two inputs,
    NAME.qweight  int8, the weight's shape and tensor-parallel split
    NAME.scale    float32 [out], split like the weight's output axis (replicated for row-parallel)
and the graph computes `qweight.astype(compute dtype) * scale` before the blocks run: the honest
MindSpore-CPU fallback (no int8 matmul kernel), with the bundle storing int8.
Which weights are linear: calib-independent, by name and rank (the same rule as calib.quant).
"""
from mindspore import ops

from .weights import REPLICATED, Split, WeightSpec, WeightTable

QWEIGHT, SCALE = ".qweight", ".scale"
SCHEMES = ("w8a16",)
NOT_LINEAR = ("embed_tokens", "position_embedding", "cls_embedding", ".boi", ".eoi")


def is_linear_weight(name: str, shape) -> bool:
    return (name.endswith(".weight") and len(shape) in (2, 4)
            and not any(s in name for s in NOT_LINEAR))


def scale_split(split: Split) -> Split:
    return Split(0, split.parts) if split.dim == 0 else REPLICATED


def quantized_table(table: WeightTable, scheme: str):
    """-> (the table of graph inputs, plan): plan[i] is (input index, None, None) for a weight kept
    as is, or (qweight index, scale index, rank) for a quantized one, in the original table order."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    out = WeightTable()
    plan = []
    for s in table.specs:
        if is_linear_weight(s.name, s.shape):
            q = len(out.specs)
            out.specs.append(WeightSpec(s.name + QWEIGHT, s.shape, s.split, "int8"))
            out.specs.append(WeightSpec(s.name + SCALE, (s.shape[0],), scale_split(s.split), "float32"))
            plan.append((q, q + 1, len(s.shape)))
        else:
            out.specs.append(s)
            plan.append((len(out.specs) - 1, None, None))
    return out, tuple(plan)


def dequantize(w, plan, dtype):
    """The quantized inputs `w` -> the original weight tuple (int8 * per-row scale, in `dtype`)."""
    out = ()
    for i, j, rank in plan:
        if j is None:
            out = out + (w[i],)
        else:
            scale = w[j].reshape((-1,) + (1,) * (rank - 1))
            out = out + ((ops.cast(w[i], dtype) * ops.cast(scale, dtype)),)
    return out
