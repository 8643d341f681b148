"""Building blocks shared by the vision tower, the adapter and the language model.

Plain functions over tensors; weights arrive as arguments (see weights.py). Written for export:
fixed shapes, tuples not lists, no lambdas, `pow(x, -0.5)` instead of rsqrt/reciprocal (ONNX), norms
and softmax in fp32 whatever the matmul dtype (as the release's MindFormers graphs did).
"""
import mindspore as ms
from mindspore import nn, ops

from .weights import COLUMN, ROW, WeightTable

_matmul_t = ops.MatMul(transpose_b=True)
_bmm = ops.BatchMatMul()
_bmm_t = ops.BatchMatMul(transpose_b=True)
NEG_INF = -1e9  # additive mask value: finite so fully-masked rows never produce NaN


def linear(x, w, b=None):
    """PyTorch Linear on the last axis; w is [out, in] as stored in the checkpoint, or (form, tensors...)
    for a quantized form that quantizes the activations too (quant.py `Form.graph_weight`)."""
    if isinstance(w, tuple):
        return w[0].graph_linear(x, w, b)
    lead = x.shape[:-1]
    y = _matmul_t(x.reshape(-1, x.shape[-1]), w)
    if b is not None:
        y = y + b
    return y.reshape(lead + (w.shape[0],))


def rms_norm(x, w, eps):
    """Normalise in fp32 and multiply by the weight before casting back (COGVLM2.md numerics)."""
    x32 = x.astype(ms.float32)
    y = x32 * ops.pow(ops.mean(x32 * x32, -1, True) + eps, -0.5)
    return (y * w.astype(ms.float32)).astype(x.dtype)


def layer_norm(x, w, b, eps):
    """Mean / centred variance written out: converts correctly to ONNX and MindSpore Lite."""
    x32 = x.astype(ms.float32)
    c = x32 - ops.mean(x32, -1, True)
    y = c * ops.pow(ops.mean(c * c, -1, True) + eps, -0.5)
    return (y * w.astype(ms.float32) + b.astype(ms.float32)).astype(x.dtype)


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (+-1 in fp32 beyond): the rational approximation of Eigen and
# XLA, within 4.2e-7 of the exact erf. MindSpore's ONNX exporter has no Erf, so both formats use this.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x):
    """fp32 erf from elementary ops (Clip, Mul, Add, Div): exports to MindIR and ONNX alike."""
    x = ops.clamp(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * _ERF_P[0] + _ERF_P[1]
    for c in _ERF_P[2:]:
        p = p * x2 + c
    q = x2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


def gelu(x):
    """Exact (erf) GELU, as the vision tower and the adapter use; computed in fp32."""
    x32 = x.astype(ms.float32)
    return (0.5 * x32 * (1.0 + erf(x32 * 0.7071067811865476))).astype(x.dtype)


def silu(x):
    return x * ops.sigmoid(x)


def split_heads(x, heads, head_dim):
    return x.reshape(x.shape[:-1] + (heads, head_dim))


def _grouped(q, kv_heads):
    """[B, Sq, H, D] -> [B, KV, G*Sq, D]: query head h reads kv head h // G (GQA, like repeat_kv)."""
    b, s, h, d = q.shape
    g = h // kv_heads
    return q.reshape(b, s, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * s, d)


def _ungrouped(o, b, s, h, d):
    kv = o.shape[1]
    return o.reshape(b, kv, h // kv, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h * d)


def attention(q, k, v, bias, query_block=None):
    """softmax(q k^T / sqrt(d) + bias) v over full key sets.

    q [B, Sq, H, D]; k, v [B, KV, Sk, D]; bias [Sq, Sk] additive (None: no mask) -> [B, Sq, H*D].
    query_block: compute the queries in blocks of this many rows (None: all at once). Each row's
    softmax is its own, so the result is the same; the scores held at once shrink from
    H x Sq x Sk floats to H x query_block x Sk (the 19B's 9217 vision patches: 5.4 GB -> 0.6 GB).
    """
    s = q.shape[1]
    if query_block is None or s <= query_block:
        return _attention(q, k, v, bias)
    blocks = ()
    for i in range(0, s, query_block):
        blocks = blocks + (_attention(q[:, i:i + query_block], k, v, None if bias is None else bias[i:i + query_block]),)
    return ops.concat(blocks, 1)


def _attention(q, k, v, bias):
    b, s, h, d = q.shape
    kv = k.shape[1]
    qg = _grouped(q, kv)
    scores = _bmm_t(qg, k).astype(ms.float32) * (d ** -0.5)
    if bias is not None:
        scores = (scores.reshape(b, kv, h // kv, s, k.shape[2]) + bias).reshape(b, kv, h // kv * s, k.shape[2])
    p = ops.softmax(scores, -1).astype(v.dtype)
    return _ungrouped(_bmm(p, v), b, s, h, d)


def cached_attention(q, k_cache, v_cache, cache_bias, k_new, v_new, new_bias=None):
    """Attention of C new query tokens over the KV cache plus their own keys, without concatenating
    the cache (that would copy it every step): scores are computed per block and joined.

    q [B, C, H, D]; k/v_cache [B, KV, T, D]; cache_bias [B, T] (0 for filled slots, NEG_INF for
    empty ones); k/v_new [B, KV, C, D]; new_bias [C, C] causal mask among the new tokens (None
    when C = 1: decode) -> [B, C, H*D].
    """
    b, s, h, d = q.shape
    kv, t = k_cache.shape[1], k_cache.shape[2]
    g = h // kv
    qg = _grouped(q, kv)
    scale = d ** -0.5
    s_cache = (_bmm_t(qg, k_cache).astype(ms.float32) * scale).reshape(b, kv, g, s, t) + cache_bias.reshape(b, 1, 1, 1, t)
    s_new = (_bmm_t(qg, k_new).astype(ms.float32) * scale).reshape(b, kv, g, s, s)
    if new_bias is not None:
        s_new = s_new + new_bias
    p = ops.softmax(ops.concat((s_cache, s_new), -1), -1).reshape(b, kv, g * s, t + s).astype(v_cache.dtype)
    o = _bmm(p[:, :, :, :t], v_cache) + _bmm(p[:, :, :, t:], v_new)
    return _ungrouped(o, b, s, h, d)


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin tables [.., D] from exact integer positions in fp32 (not the release's bf16 rounding)."""
    inv_freq = ms.Tensor([theta ** (-i / head_dim) for i in range(0, head_dim, 2)], ms.float32)
    freqs = positions.astype(ms.float32).expand_dims(-1) * inv_freq
    emb = ops.concat((freqs, freqs), -1)
    half = ops.sin(emb * 0.5)  # cos x = 1 - 2 sin^2(x/2): MindSpore Lite 2.0's Cos is off by up to 1.6e-3, its Sin
    return 1 - 2 * half * half, ops.sin(emb)  # is exact (x/2 is exact in fp32, so nothing is lost)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE. x [B, S, N, D]; cos/sin [B, S, D]."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    cos = cos.expand_dims(2).astype(x.dtype)
    sin = sin.expand_dims(2).astype(x.dtype)
    return x * cos + rotated * sin


class TensorParallel(nn.Cell):
    """A block with collectives when tp > 1 (the only place graphs know about parallelism):
    `reduce` sums the partial outputs of row-parallel layers; `gather_last` joins the ranks'
    slices of the last axis (embedding columns, vocabulary)."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp
        self.all_reduce = ops.AllReduce() if tp > 1 else None
        self.all_gather = ops.AllGather() if tp > 1 else None

    def reduce(self, x):
        if self.tp > 1:
            x = self.all_reduce(x)
        return x

    def gather_last(self, x):
        if self.tp > 1:
            lead, n = x.shape[:-1], x.shape[-1]
            g = self.all_gather(x.reshape(-1, n))  # [tp * M, n], rank-major
            x = g.reshape(self.tp, -1, n).transpose(1, 0, 2).reshape(lead + (self.tp * n,))
        return x


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)), no biases: the LM experts' MLP and the adapter's GLU.
    Row-parallel down projection: the caller reduces (once, after joining experts)."""

    def __init__(self, table: WeightTable, gate: str, up: str, down: str, hidden: int, inter: int):
        super().__init__()
        self.gate = table.add(gate, (inter, hidden), COLUMN)
        self.up = table.add(up, (inter, hidden), COLUMN)
        self.down = table.add(down, (hidden, inter), ROW)

    def construct(self, x, w):
        return linear(silu(linear(x, w[self.gate])) * linear(x, w[self.up]), w[self.down])
