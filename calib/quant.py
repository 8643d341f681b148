"""Weight quantization schemes as transformations of a weight table (gpt-fast quantize.py style:
one handler per scheme).

A quantized linear weight `NAME` [out, in] (or a conv weight [out, C, k, k], viewed as [out, C*k*k])
is replaced by two tensors:

    NAME.qweight  int8 [out, in]   (the same shape as NAME)
    NAME.scale    fp32 [out]       per-output-channel scale

and dequantizes as `qweight.astype(f) * scale[:, None]`. Everything else (embeddings, norms, biases,
position/cls/boi/eoi embeddings) is left as it is.
"""
import numpy as np

from cogvlm2_lite.graphs.quant import QWEIGHT, SCALE, is_linear_weight  # noqa: F401  (one rule for both)


class W8A16:
    """int8 weights, symmetric, one fp32 scale per output channel; activations stay in float.

    scale = absmax(row) / 127 (1 for an all-zero row), q = clip(round(w / scale), -127, 127), so
    |w - q * scale| <= scale / 2 element-wise (round-to-nearest, no clipping since |w / scale| <= 127).
    """
    name = "w8a16"
    bits = 8
    qmax = 127

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w2 = np.asarray(w, np.float32).reshape(w.shape[0], -1)
        absmax = np.abs(w2).max(axis=1)
        scale = np.where(absmax > 0, absmax / self.qmax, 1.0).astype(np.float32)
        q = np.clip(np.rint(w2 / scale[:, None]), -self.qmax, self.qmax).astype(np.int8)
        return q.reshape(w.shape), scale

    @staticmethod
    def dequantize(q: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
        q2 = q.reshape(q.shape[0], -1).astype(np.float32)
        return (q2 * scale[:, None].astype(np.float32)).astype(dtype).reshape(q.shape)


SCHEMES = {"w8a16": W8A16}


def get_scheme(name: str):
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}: choose one of {', '.join(SCHEMES)} "
                         "(w8a8 SmoothQuant and w4a16 are not implemented yet).")
    return SCHEMES[name]()


def quantize_weights(weights: dict, scheme: str = "w8a16", skip=()) -> dict:
    """{name: array} -> {name: array} with every linear weight replaced by NAME.qweight / NAME.scale."""
    h = get_scheme(scheme)
    out = {}
    for name, w in weights.items():
        if is_linear_weight(name, w.shape) and name not in skip:
            out[name + QWEIGHT], out[name + SCALE] = h.quantize(w)
        else:
            out[name] = w
    return out


def dequantize_weights(qweights: dict, dtype=np.float32) -> dict:
    """Inverse layout of quantize_weights: every NAME.qweight/NAME.scale pair back to NAME in `dtype`."""
    out = {}
    for name, a in qweights.items():
        if name.endswith(QWEIGHT):
            base = name[:-len(QWEIGHT)]
            out[base] = W8A16.dequantize(a, qweights[base + SCALE], dtype)
        elif not name.endswith(SCALE):
            out[name] = a
    return out


def fake_quantize(weights: dict, scheme: str = "w8a16", only=None) -> dict:
    """Weights quantized and dequantized back to float (what an in-graph dequantizing model computes).
    `only`: quantize just these names (per-layer error attribution)."""
    h = get_scheme(scheme)
    out = dict(weights)
    for name, w in weights.items():
        if is_linear_weight(name, w.shape) and (only is None or name in only):
            out[name] = h.dequantize(*h.quantize(w), dtype=w.dtype)
    return out


def quantized_bytes(weights: dict, scheme: str = "w8a16", ref_dtype=np.float16) -> dict:
    """Bytes of the quantized matrices (int8 + scales) vs the same matrices stored in `ref_dtype`."""
    q = quantize_weights({n: w for n, w in weights.items() if is_linear_weight(n, w.shape)}, scheme)
    qb = sum(a.nbytes for a in q.values())
    rb = sum(w.size * np.dtype(ref_dtype).itemsize for n, w in weights.items() if is_linear_weight(n, w.shape))
    return {"quantized_bytes": int(qb), "reference_bytes": int(rb), "ratio": qb / rb if rb else float("nan")}
