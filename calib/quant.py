"""Weight quantization in numpy: the arrays behind each stored form of graphs/quant.py, and the
reference arithmetic of each form (what the graphs compute, written plainly for reports and tests).

    qz = Quantizer("w8a8", stats=load_stats(bundle), alpha=0.5)
    for stored_spec, array in qz.tensors(spec, full_weight): ...

Round-to-nearest everywhere, so |w - deq(q(w))| <= step / 2 element-wise, step = the scale of the
channel (int8) or group (int4). SmoothQuant (w8a8) migrates activation range into the weights:
s_j = absmax(x_j)^alpha / absmax(W[:, j])^(1 - alpha), W' = W diag(s), x' = x / s (x * smooth).
"""
import numpy as np

from cogvlm2_lite.graphs.quant import GROUP, SCHEMES, is_linear_weight, kind_of, stored_specs  # noqa: F401
from cogvlm2_lite.graphs.weights import REPLICATED, WeightSpec


CHUNK_ROWS = 4096   # rows quantized at a time: float temporaries stay small for the 19B's 2 GB lm_head


def by_rows(fn, w: np.ndarray, *args) -> tuple:
    """fn(rows, *args) -> arrays with one leading row each, applied chunk by chunk and joined."""
    parts = [fn(w[i:i + CHUNK_ROWS], *args) for i in range(0, w.shape[0], CHUNK_ROWS)]
    return tuple(np.concatenate(p) for p in zip(*parts))


# int8x8 weights use 7 bits (onnxruntime's `reduce_range`): without VNNI, MLAS's uint8 x int8 kernel adds pairs
# of products in int16 (AVX2 vpmaddubsw), which saturates past 255 * 63 * 2. Measured on an AVX2-only AMD EPYC:
# 8-bit weights put w8a8 decode logits 0.8 off the exact integer result; 7-bit ones match it.
INT8X8_QMAX = 63


def quantize_rows(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row (output channel) int8: -> (q int8 like w, scale fp32 [rows])."""
    w2 = np.asarray(w, np.float32).reshape(w.shape[0], -1)
    absmax = np.abs(w2).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w2 / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(w.shape), scale


def quantize_groups4(w: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit per group of `group` inputs: -> (packed uint8 [out, in/2], scale fp32 [out, in/group])."""
    out, inp = w.shape
    g = np.asarray(w, np.float32).reshape(out, inp // group, group)
    absmax = np.abs(g).max(axis=2)
    scale = np.where(absmax > 0, absmax / 7, 1.0).astype(np.float32)
    codes = (np.clip(np.rint(g / scale[:, :, None]), -7, 7) + 8).astype(np.uint8).reshape(out, inp)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scale


def unpack4(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, in/2] -> int8 codes [out, in] in [-7, 7] (low nibble first)."""
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    codes[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    codes[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return codes


def smoothing(w: np.ndarray, act_absmax: np.ndarray | None, alpha: float) -> np.ndarray:
    """SmoothQuant per-input-channel factors s (>0); all ones without statistics."""
    if act_absmax is None:
        return np.ones(w.shape[1], np.float32)
    wmax = np.max([np.abs(np.asarray(w[i:i + CHUNK_ROWS], np.float32)).max(axis=0)
                   for i in range(0, w.shape[0], CHUNK_ROWS)], axis=0).astype(np.float64)
    amax = np.asarray(act_absmax, np.float64)
    ok = (wmax > 0) & (amax > 0)
    s = np.ones_like(amax)
    s[ok] = amax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


class Quantizer:
    """One scheme applied tensor by tensor (export streams the checkpoint through `tensors`)."""

    def __init__(self, scheme: str, tp: int = 1, stats: dict | None = None, alpha: float = 0.5):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        self.scheme, self.tp, self.stats, self.alpha = scheme, tp, stats or {}, alpha

    def tensors(self, spec: WeightSpec, w: np.ndarray) -> list[tuple[WeightSpec, np.ndarray]]:
        kind = kind_of(spec, self.scheme, self.tp)
        if kind is None:
            arrays = [w]
        elif kind == "int8":
            arrays = list(by_rows(quantize_rows, w))
        elif kind in ("int4", "int4x8"):
            arrays = list(by_rows(quantize_groups4, w))
        else:
            s = smoothing(w, self.stats.get(spec.name), self.alpha)
            q, scale = by_rows(lambda rows: quantize_rows(np.asarray(rows, np.float32) * s[None, :], INT8X8_QMAX), w)
            arrays = [np.ascontiguousarray(q.T), scale, (1 / s).astype(np.float32)]
        return list(zip(stored_specs(spec, kind), arrays))

    def quantize(self, weights: dict) -> dict:
        """{name: array} (one rank's full weights) -> the stored tensors {stored name: array}."""
        out = {}
        for name, w in weights.items():
            for spec, a in self.tensors(WeightSpec(name, w.shape, REPLICATED), w):
                out[spec.name] = a
        return out


def dequantize(stored: dict, name: str, kind: str) -> np.ndarray:
    """The float32 weight [out, in...] a stored form stands for (int8x8: the smoothing undone)."""
    q, scale = stored[name + ".qweight"], stored[name + ".scale"]
    if kind == "int8":
        return (q.reshape(q.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(q.shape)
    if kind in ("int4", "int4x8"):
        codes = unpack4(q).astype(np.float32)
        g = codes.shape[1] // scale.shape[1]
        return (codes.reshape(codes.shape[0], -1, g) * scale[:, :, None]).reshape(codes.shape)
    return q.T.astype(np.float32) * scale[:, None] * stored[name + ".smooth"][None, :]


def reference_linear(x: np.ndarray, stored: dict, name: str, kind: str) -> np.ndarray:
    """x [N, in] -> [N, out] as the graphs compute the stored form (float64; no bias)."""
    x = np.asarray(x, np.float64)
    w = dequantize(stored, name, kind).reshape(stored[name + ".scale"].shape[0], -1).astype(np.float64)
    if kind == "int4x8":
        blocks = x.reshape(x.shape[0], -1, GROUP)
        amax = np.abs(blocks).max(-1, keepdims=True)
        xq = np.clip(np.floor(blocks * (127 / np.maximum(amax, 1e-30)) + 0.5), -127, 127)
        return (xq * amax / 127).reshape(x.shape) @ w.T
    if kind != "int8x8":
        return x @ w.T
    xs = x * stored[name + ".smooth"].astype(np.float64)
    step = np.maximum(np.abs(xs).max(-1, keepdims=True), 1e-30) / 127
    xq = np.clip(np.floor(xs / step + 0.5), -127, 127)
    return (xq @ stored[name + ".qweight"].astype(np.float64)) * step * stored[name + ".scale"].astype(np.float64)


def quantized_bytes(weights: dict, qz: Quantizer, ref_dtype=np.float16) -> dict:
    """Bytes of the quantized matrices (codes + scales + smoothing) vs the same matrices in `ref_dtype`."""
    lin = {n: w for n, w in weights.items() if is_linear_weight(n, w.shape)}
    qb = sum(a.nbytes for a in qz.quantize(lin).values())
    rb = sum(w.size * np.dtype(ref_dtype).itemsize for w in lin.values())
    return {"quantized_bytes": int(qb), "reference_bytes": int(rb), "ratio": qb / rb if rb else float("nan")}
