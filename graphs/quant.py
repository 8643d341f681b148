"""Quantized weights: a transformation of a graph's WeightTable (one rule per scheme, as gpt-fast's
quantize.py swaps layers through a handler per scheme), and the in-graph arithmetic that runs them.

A linear weight NAME [out, in] is stored in one of three forms (kinds):

  int8    NAME.qweight int8 [out, in] (conv weights [out, C, k, k] alike), NAME.scale fp32 [out]:
          weight-only, symmetric, per output channel; the graph dequantizes `q * scale`.
  int4    NAME.qweight uint8 [out, in/2]: two 4-bit codes per byte, low nibble first, each code
          q + 8 for q in [-7, 7]; NAME.scale fp32 [out, in/GROUP]: symmetric, per group of GROUP
          inputs; the graph dequantizes. This is onnxruntime's MatMulNBits layout (bits 4, zero point 8).
  int8x8  NAME.qweight int8 [in, out] (transposed: integer GEMMs take B as [K, N]), NAME.scale fp32
          [out], NAME.smooth fp32 [in]: SmoothQuant. The graph multiplies the activations by `smooth`,
          quantizes them per token (symmetric int8, at run time) and multiplies integers.
  int4x8  int4's tensors; the activations are quantized to int8 per GROUP inputs of a token at run
          time (llama.cpp's Q4_0 x Q8_0): what onnxruntime's MatMulNBits computes with accuracy_level 4.

A scheme picks a kind per weight: w8a16 -> int8; w8a8 -> int8x8; w4a16 / w4a8 -> int4 / int4x8 where
each rank's input width is a multiple of GROUP. Convolutions, and weights a scheme cannot take, fall
back to int8.
"""
from dataclasses import replace

import mindspore as ms
from mindspore import ops

from .weights import REPLICATED, Split, WeightSpec, WeightTable

QWEIGHT, SCALE, SMOOTH = ".qweight", ".scale", ".smooth"
SCHEMES = ("w8a16", "w8a8", "w4a16", "w4a8")
GROUP = 32                 # int4 group size (inputs per scale)
NOT_LINEAR = ("embed_tokens", "position_embedding", "cls_embedding", ".boi", ".eoi")
_matmul = ops.MatMul()
_matmul_t = ops.MatMul(transpose_b=True)
_QMAX = ms.Tensor(127.0, ms.float32)


def is_linear_weight(name: str, shape) -> bool:
    return (name.endswith(".weight") and len(shape) in (2, 4)
            and not any(s in name for s in NOT_LINEAR))


def kind_of(spec: WeightSpec, scheme: str, tp: int = 1) -> str | None:
    """The stored form of one checkpoint tensor under `scheme` (None: kept as it is)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if not is_linear_weight(spec.name, spec.shape):
        return None
    if len(spec.shape) == 4 or scheme == "w8a16":
        return "int8"
    if scheme == "w8a8":
        return "int8x8"
    k = spec.shape[1] // (tp if spec.split.dim == 1 else 1)
    if k % GROUP:
        return "int8"
    return "int4" if scheme == "w4a16" else "int4x8"


def _transposed(split: Split) -> Split:
    return split if split.dim is None else Split(1 - split.dim, split.parts)


def _per_output(split: Split) -> Split:
    return Split(0, split.parts) if split.dim == 0 else REPLICATED


def _per_input(split: Split) -> Split:
    return Split(0) if split.dim == 1 else REPLICATED


def stored_specs(spec: WeightSpec, kind: str | None) -> list[WeightSpec]:
    """The bundle tensors (and graph inputs) that stand for `spec`, in order."""
    out, inp = spec.shape[0], spec.shape[1] if len(spec.shape) == 2 else None
    if kind is None:
        return [spec]
    if kind == "int8":
        return [replace(spec, name=spec.name + QWEIGHT, dtype="int8"),
                WeightSpec(spec.name + SCALE, (out,), _per_output(spec.split), "float32")]
    if kind in ("int4", "int4x8"):
        return [WeightSpec(spec.name + QWEIGHT, (out, inp // 2), spec.split, "uint8"),
                WeightSpec(spec.name + SCALE, (out, inp // GROUP), spec.split, "float32")]
    return [WeightSpec(spec.name + QWEIGHT, (inp, out), _transposed(spec.split), "int8"),
            WeightSpec(spec.name + SCALE, (out,), _per_output(spec.split), "float32"),
            WeightSpec(spec.name + SMOOTH, (inp,), _per_input(spec.split), "float32")]


def quantized_table(table: WeightTable, scheme: str, tp: int = 1):
    """-> (the table of graph inputs, plan): plan[i] = (kind, first input index, rank) for the
    original table's i-th weight, kind None for one kept as it is."""
    out, plan = WeightTable(), []
    for s in table.specs:
        kind = kind_of(s, scheme, tp)
        plan.append((kind, len(out.specs), len(s.shape)))
        out.specs.extend(stored_specs(s, kind))
    return out, tuple(plan)


def unpack_int4(packed):
    """uint8 [out, in/2] -> float32 codes [out, in] in [-7, 7] (arithmetic, not bit operations: ONNX
    opset 11 and Lite have none)."""
    p = packed.astype(ms.float32)
    high = ops.floor(p * 0.0625)
    low = p - high * 16
    n, half = packed.shape
    return ops.concat((low.expand_dims(-1), high.expand_dims(-1)), -1).reshape(n, 2 * half) - 8


def dequantize(w, plan, dtype):
    """The graph's weight inputs `w` -> the tuple the blocks read: float weights for kept, int8 and
    int4 tensors; (qweight, scale, smooth) for int8x8 and (qweight, scale) for int4x8 linears, which
    `layers.linear` hands to int8_linear / int4x8_linear."""
    out = ()
    for kind, i, rank in plan:
        if kind is None:
            out = out + (w[i],)
        elif kind == "int8":
            scale = w[i + 1].reshape((-1,) + (1,) * (rank - 1))
            out = out + (ops.cast(w[i], dtype) * ops.cast(scale, dtype),)
        elif kind == "int4":
            out = out + (ops.cast(dequantize_int4(w[i], w[i + 1]), dtype),)
        elif kind == "int4x8":
            out = out + ((w[i], w[i + 1]),)
        else:
            out = out + ((w[i], w[i + 1], w[i + 2]),)
    return out


def dequantize_int4(packed, scale):
    """uint8 [out, in/2] + fp32 [out, in/GROUP] -> fp32 [out, in]."""
    codes = unpack_int4(packed)
    n, k = codes.shape
    groups = scale.shape[1]
    return (codes.reshape(n, groups, k // groups) * scale.reshape(n, groups, 1)).reshape(n, k)


def int8_linear(x, qweight_t, scale, smooth, b=None):
    """SmoothQuant linear: x [.., in] -> [.., out] in x's dtype.

    Per token: step = max|x * smooth| / 127, xq = floor(x * smooth / step + 1/2) in [-127, 127]
    (rounding half up: MindSpore exports Round to ONNX with an extra input);
    y = (xq @ qweight_t) * step * scale (+ b). The integer product is computed in fp32 here, exact
    while the sums stay below 2^24; onnxruntime runs it as MatMulInteger (export/onnx_quant.py).
    """
    xs = _rows(x) * smooth
    step = ops.maximum(ops.abs(xs).max(-1, keepdims=True), 1e-30) * (1 / 127)
    xq = ops.clamp(ops.floor(xs / step + 0.5), -127.0, 127.0)
    return _unrows(_matmul(xq, ops.cast(qweight_t, ms.float32)) * step * scale, b, x)


def int4x8_linear(x, packed, scale, b=None):
    """4-bit weights x int8 activations: x [.., in] -> [.., out] in x's dtype.

    Per GROUP inputs of a token: xq = round(x * (127 / amax)) (onnxruntime's MLAS quantizer: 127 / amax
    once, then a product; rounding half up here, half to even there: a difference only on exact .5
    ties), multiplied back by amax / 127; then the float product with the dequantized weights, which
    equals MatMulNBits' per-block integer dot products scaled by both block scales.
    """
    x2 = _rows(x)
    blocks = x2.reshape(x2.shape[0], -1, GROUP)
    amax = ops.abs(blocks).max(-1, keepdims=True)
    inverse = ops.div(_QMAX, ops.maximum(amax, 1e-30))  # a Div, not `127 / t` (Reciprocal: no ONNX export)
    xq = ops.clamp(ops.floor(blocks * inverse + 0.5), -127.0, 127.0)
    xdq = (xq * (amax * (1 / 127))).reshape(x2.shape)
    return _unrows(_matmul_t(xdq, dequantize_int4(packed, scale)), b, x)


def _rows(x):
    """[.., in] -> [rows, in] float32: the quantized linears compute in fp32 whatever the dtype."""
    return x.reshape(-1, x.shape[-1]).astype(ms.float32)


def _unrows(y, b, x):
    """[rows, out] fp32 (+ bias) -> [.., out] in x's dtype."""
    if b is not None:
        y = y + b.astype(ms.float32)
    return y.astype(x.dtype).reshape(x.shape[:-1] + (y.shape[-1],))
