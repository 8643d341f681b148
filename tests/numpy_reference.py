"""Plain-numpy float64 reference forward pass of CogVLM2-Image (cogvlm2-llama3-chat-19B).

Written only from the model facts in ``shared/COGVLM2.md`` and independent of ``graphs/``,
``export/`` and ``runtime/`` on purpose: a test that compares the two catches mistakes in either.
Slow and simple; meant for tiny random models (see :func:`random_hf_weights`).

Weights use the HF checkpoint key names (PyTorch layouts: Linear ``[out, in]``, Conv2d
``[out, in, kh, kw]``); ``config`` is the parsed HF ``config.json`` dict.

Public API
----------
- :func:`reference_logits` -- full-sequence logits ``(S, vocab)`` for one sequence.
- :func:`reference_pixel_embeds` -- vision tower + adapter, ``[boi, tokens, eoi]``.
- :func:`reference_position_ids` -- the shared-id position rule.
- :func:`reference_expert_mask` -- True where a token uses the vision expert.
- :func:`random_hf_weights` -- random weights with every checkpoint key, for tests.
"""
from __future__ import annotations

import math

import numpy as np

VISION_TYPE = 1
LANGUAGE_TYPE = 0
ROPE_BASE = 500000.0  # "RoPE ... base 500000" (a fact of the model, not in config.json)
DEFAULT_KV_HEADS = 8  # "num_multi_query_heads ... comes from the config class default (8)"
GLU_LN_EPS = 1e-5  # "the GLU's LayerNorm ... with the default eps 1e-5"


# --------------------------------------------------------------------------- config helpers
def kv_heads(config: dict) -> int:
    """Number of K/V heads: ``num_multi_query_heads``, defaulting to 8 when absent."""
    n = config.get("num_multi_query_heads")
    return DEFAULT_KV_HEADS if n is None else int(n)


def head_dim(config: dict) -> int:
    """LM head_dim = hidden_size / num_attention_heads."""
    return config["hidden_size"] // config["num_attention_heads"]


def vision_grid(config: dict) -> int:
    """Side of the patch grid: image_size / patch_size (96 for the release)."""
    vc = config["vision_config"]
    return vc["image_size"] // vc["patch_size"]


def n_image_tokens(config: dict) -> int:
    """(grid/2)^2 adapter tokens + boi + eoi (2306 for the release)."""
    return (vision_grid(config) // 2) ** 2 + 2


def _f64(weights: dict, key: str) -> np.ndarray:
    return np.asarray(weights[key], dtype=np.float64)


# --------------------------------------------------------------------------- elementwise math
_SQRT_PI = math.sqrt(math.pi)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf accurate to ~1e-15 (no scipy).

    |x| <= 3: erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n (2x^2)^n x / (2n+1)!!  (all terms positive,
    no cancellation). 3 < |x| < 6.5: erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
    evaluated backwards. |x| >= 6.5: erf = sign(x) (erfc < 1e-19).
    """
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    out = np.sign(x).astype(np.float64)  # |x| >= 6.5 branch (and 0 -> 0)

    small = ax <= 3.0
    if np.any(small):
        a = ax[small]
        a2 = 2.0 * a * a
        term = a.copy()
        total = a.copy()
        for n in range(1, 120):
            term = term * a2 / (2 * n + 1)
            total += term
        out[small] = np.sign(x[small]) * (2.0 / _SQRT_PI) * np.exp(-a * a) * total

    mid = (ax > 3.0) & (ax < 6.5)
    if np.any(mid):
        a = ax[mid]
        t = a.copy()
        for n in range(120, 0, -1):
            t = a + (n / 2.0) / t
        erfc = np.exp(-a * a) / _SQRT_PI / t
        out[mid] = np.sign(x[mid]) * (1.0 - erfc)
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2)) -- vision MLP and adapter."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), written to stay finite for large |x|."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance), then affine."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm: x * 1/sqrt(mean(x^2) + eps) * weight (LM, eps 1e-5)."""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """PyTorch Linear with weight [out, in]: x @ w.T (+ b)."""
    y = x @ w.T
    return y if b is None else y + b


def conv2d_stride_eq_kernel(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv2d whose stride equals its kernel (no padding): non-overlapping patches.

    x: (C, H, W); w: (O, C, k, k); returns (O, H // k, W // k). Remainder rows/cols are dropped,
    as a strided conv does.
    """
    c, h, wd = x.shape
    o, c2, k, k2 = w.shape
    assert c == c2 and k == k2, (x.shape, w.shape)
    gh, gw = h // k, wd // k
    x = x[:, : gh * k, : gw * k]
    patches = x.reshape(c, gh, k, gw, k).transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * k * k)
    y = patches @ w.reshape(o, c * k * k).T + b  # (gh*gw, O), row-major over the grid
    return y.T.reshape(o, gh, gw)


# --------------------------------------------------------------------------- vision tower
def vision_attention(h: np.ndarray, w: dict, p: str, num_heads: int) -> np.ndarray:
    """EVA2-CLIP attention: fused qkv split as (L, 3, H, D), non-causal, scale D^-0.5, dense."""
    L, hid = h.shape
    d = hid // num_heads
    qkv = linear(h, _f64(w, p + "query_key_value.weight"), _f64(w, p + "query_key_value.bias"))
    qkv = qkv.reshape(L, 3, num_heads, d)
    q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))  # (H, L, D)
    probs = softmax(q @ k.transpose(0, 2, 1) * d ** -0.5)
    ctx = (probs @ v).transpose(1, 0, 2).reshape(L, hid)
    return linear(ctx, _f64(w, p + "dense.weight"), _f64(w, p + "dense.bias"))


def vision_mlp(h: np.ndarray, w: dict, p: str) -> np.ndarray:
    """fc1 (bias) -> exact GELU -> fc2 (bias)."""
    x = gelu(linear(h, _f64(w, p + "fc1.weight"), _f64(w, p + "fc1.bias")))
    return linear(x, _f64(w, p + "fc2.weight"), _f64(w, p + "fc2.bias"))


def vision_layer(h: np.ndarray, w: dict, i: int, vc: dict) -> np.ndarray:
    """Post-branch norms: h = h + LN_in(attn(h)); h = h + LN_post(mlp(h))."""
    p = f"model.vision.transformer.layers.{i}."
    eps = vc["layer_norm_eps"]
    a = vision_attention(h, w, p + "attention.", vc["num_heads"])
    h = h + layer_norm(a, _f64(w, p + "input_layernorm.weight"),
                       _f64(w, p + "input_layernorm.bias"), eps)
    m = vision_mlp(h, w, p + "mlp.")
    h = h + layer_norm(m, _f64(w, p + "post_attention_layernorm.weight"),
                       _f64(w, p + "post_attention_layernorm.bias"), eps)
    return h


def vision_tower(weights: dict, config: dict, pixel_values: np.ndarray) -> np.ndarray:
    """EVA2-CLIP: patch conv, prepend cls, add the whole position table, layers, drop cls.

    Returns (grid*grid, vision_hidden), tokens in row-major order of the patch grid.
    """
    vc = config["vision_config"]
    px = np.asarray(pixel_values, dtype=np.float64)
    if px.ndim == 4 and px.shape[0] == 1:
        px = px[0]
    side = vc["image_size"]
    if px.shape != (vc["in_channels"], side, side):
        raise ValueError(f"pixel_values must be ({vc['in_channels']}, {side}, {side}), "
                         f"got {px.shape}: the position table is not interpolated")
    pe = "model.vision.patch_embedding."
    x = conv2d_stride_eq_kernel(px, _f64(weights, pe + "proj.weight"), _f64(weights, pe + "proj.bias"))
    x = x.reshape(x.shape[0], -1).T  # (grid*grid, hidden), row-major
    cls = _f64(weights, pe + "cls_embedding").reshape(1, -1)
    h = np.concatenate([cls, x], axis=0)
    h = h + _f64(weights, pe + "position_embedding.weight")
    for i in range(vc["num_hidden_layers"]):
        h = vision_layer(h, weights, i, vc)
    return h[1:]


# --------------------------------------------------------------------------- adapter
def adapter(weights: dict, config: dict, vis: np.ndarray) -> np.ndarray:
    """GLU adapter: 2x2 stride-2 conv on the grid, linear_proj -> LN(1e-5) -> GELU ->
    silu(gate_proj) * dense_h_to_4h -> dense_4h_to_h; wrapped by learned boi/eoi."""
    g = vision_grid(config)
    n, hid = vis.shape
    assert n == g * g, (n, g)
    grid = vis.reshape(g, g, hid).transpose(2, 0, 1)  # (C, rows, cols)
    y = conv2d_stride_eq_kernel(grid, _f64(weights, "model.vision.conv.weight"),
                                _f64(weights, "model.vision.conv.bias"))
    x = y.reshape(hid, -1).T  # ((g/2)^2, hidden), row-major over the half grid
    p = "model.vision.linear_proj."
    x = linear(x, _f64(weights, p + "linear_proj.weight"))
    x = gelu(layer_norm(x, _f64(weights, p + "norm1.weight"), _f64(weights, p + "norm1.bias"),
                        GLU_LN_EPS))
    x = silu(linear(x, _f64(weights, p + "gate_proj.weight"))) * linear(
        x, _f64(weights, p + "dense_h_to_4h.weight"))
    x = linear(x, _f64(weights, p + "dense_4h_to_h.weight"))
    boi = _f64(weights, "model.vision.boi").reshape(1, -1)
    eoi = _f64(weights, "model.vision.eoi").reshape(1, -1)
    return np.concatenate([boi, x, eoi], axis=0)


def reference_pixel_embeds(weights: dict, config: dict, pixel_values: np.ndarray) -> np.ndarray:
    """Vision tower + adapter: (n_image_tokens, lm_hidden) = [boi, (grid/2)^2 tokens, eoi]."""
    return adapter(weights, config, vision_tower(weights, config, pixel_values))


# --------------------------------------------------------------------------- routing, positions
def reference_expert_mask(token_type_ids: np.ndarray) -> np.ndarray:
    """True = vision expert: own type is vision AND the next token's type is vision.

    The last token has no next token, so it uses the language expert. For an image run this
    routes boi + patch tokens to the vision expert and eoi to the language expert.
    """
    t = np.asarray(token_type_ids).reshape(-1)
    mask = np.zeros(t.shape, dtype=bool)
    mask[:-1] = (t[:-1] == VISION_TYPE) & (t[1:] == VISION_TYPE)
    return mask


def reference_position_ids(token_type_ids: np.ndarray) -> np.ndarray:
    """Shared-id rule: boi and eoi (first/last token of each vision run) count as text and get
    their own id; all inner image tokens of a run share one id.

    E.g. types [0, 1, 1, 1, 1, 1, 1, 0, 0] -> [0, 1, 2, 2, 2, 2, 3, 4, 5].
    """
    t = np.asarray(token_type_ids).reshape(-1)
    s = t.shape[0]
    is_vis = t == VISION_TYPE
    prev_vis = np.concatenate([[False], is_vis[:-1]])
    next_vis = np.concatenate([is_vis[1:], [False]])
    inner = is_vis & prev_vis & next_vis  # image tokens that are neither boi nor eoi
    pos = np.zeros(s, dtype=np.int64)
    for i in range(1, s):
        # an inner image token that follows another inner image token reuses its id
        pos[i] = pos[i - 1] + (0 if (inner[i] and inner[i - 1]) else 1)
    return pos


# --------------------------------------------------------------------------- language model
def rope_cos_sin(positions: np.ndarray, dim: int, base: float = ROPE_BASE):
    """cos/sin tables (S, dim) in float64 from exact integer positions;
    inv_freq = 1 / base^(arange(0, dim, 2)/dim), duplicated as cat(freqs, freqs)."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    freqs = np.asarray(positions, dtype=np.int64).astype(np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """Non-interleaved rotate-half: [x1, x2] -> [-x2, x1]."""
    d = x.shape[-1] // 2
    return np.concatenate([-x[..., d:], x[..., :d]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, S, D); cos/sin: (S, D)."""
    return x * cos[None] + rotate_half(x) * sin[None]


def by_expert(x: np.ndarray, mask: np.ndarray, f_vision, f_language) -> np.ndarray:
    """Apply f_vision to rows where mask is True and f_language elsewhere (rows never mixed,
    so a NaN in one expert cannot leak into the other expert's tokens)."""
    outs = {}
    if mask.any():
        outs[True] = f_vision(x[mask])
    if (~mask).any():
        outs[False] = f_language(x[~mask])
    width = next(iter(outs.values())).shape[-1]
    y = np.zeros((x.shape[0], width), dtype=np.float64)
    for m, v in outs.items():
        y[mask if m else ~mask] = v
    return y


def causal_gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q: (H, S, D); k, v: (KV, S, D). KV heads are repeated (kv head j serves q heads
    j*g .. j*g+g-1, g = H/KV, Llama's repeat_kv); causal softmax with scale 1/sqrt(D)."""
    h, s, d = q.shape
    g = h // k.shape[0]
    k = np.repeat(k, g, axis=0)
    v = np.repeat(v, g, axis=0)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    causal = np.tril(np.ones((s, s), dtype=bool))
    scores = np.where(causal[None], scores, -np.inf)
    return softmax(scores) @ v  # (H, S, D)


def lm_attention(x, weights, i, config, mask, cos, sin):
    """Visual-expert attention: qkv by expert ([q | k | v]; vision qkv has a bias), RoPE,
    causal GQA over the whole sequence, dense (o-proj) by expert."""
    p = f"model.layers.{i}.self_attn."
    nh, nkv, d = config["num_attention_heads"], kv_heads(config), head_dim(config)
    s = x.shape[0]
    qkv = by_expert(
        x, mask,
        lambda t: linear(t, _f64(weights, p + "vision_expert_query_key_value.weight"),
                         _f64(weights, p + "vision_expert_query_key_value.bias")),
        lambda t: linear(t, _f64(weights, p + "language_expert_query_key_value.weight")))
    q = qkv[:, : nh * d].reshape(s, nh, d).transpose(1, 0, 2)
    k = qkv[:, nh * d: (nh + nkv) * d].reshape(s, nkv, d).transpose(1, 0, 2)
    v = qkv[:, (nh + nkv) * d: (nh + 2 * nkv) * d].reshape(s, nkv, d).transpose(1, 0, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ctx = causal_gqa_attention(q, k, v).transpose(1, 0, 2).reshape(s, nh * d)
    return by_expert(ctx, mask,
                     lambda t: linear(t, _f64(weights, p + "vision_expert_dense.weight")),
                     lambda t: linear(t, _f64(weights, p + "language_expert_dense.weight")))


def swiglu(x: np.ndarray, weights: dict, p: str) -> np.ndarray:
    """down(silu(gate(x)) * up(x)), no biases."""
    g = silu(linear(x, _f64(weights, p + "gate_proj.weight")))
    u = linear(x, _f64(weights, p + "up_proj.weight"))
    return linear(g * u, _f64(weights, p + "down_proj.weight"))


def lm_layer(h, weights, i, config, mask, cos, sin):
    """Pre-norm decoder layer: h += attn(rms(h)); h += mlp_by_expert(rms(h))."""
    p = f"model.layers.{i}."
    eps = config["rms_norm_eps"]
    h = h + lm_attention(rms_norm(h, _f64(weights, p + "input_layernorm.weight"), eps),
                         weights, i, config, mask, cos, sin)
    x = rms_norm(h, _f64(weights, p + "post_attention_layernorm.weight"), eps)
    h = h + by_expert(x, mask,
                      lambda t: swiglu(t, weights, p + "mlp.vision_mlp."),
                      lambda t: swiglu(t, weights, p + "mlp.language_mlp."))
    return h


def input_embeddings(weights, config, input_ids, token_type_ids, pixel_values):
    """Token embeddings, with the positions of type 1 replaced (in order) by the image
    embeddings. Placeholder ids at image slots are never looked up."""
    ids = np.asarray(input_ids).reshape(-1)
    types = np.asarray(token_type_ids).reshape(-1)
    if ids.shape != types.shape:
        raise ValueError(f"input_ids {ids.shape} and token_type_ids {types.shape} differ")
    is_img = types == VISION_TYPE
    emb = np.zeros((ids.shape[0], config["hidden_size"]), dtype=np.float64)
    emb[~is_img] = _f64(weights, "model.embed_tokens.weight")[ids[~is_img]]
    n_img = int(is_img.sum())
    if n_img:
        if pixel_values is None:
            raise ValueError("token_type_ids mark image slots but pixel_values is None")
        img = reference_pixel_embeds(weights, config, pixel_values)
        if img.shape[0] != n_img:
            raise ValueError(f"{n_img} image slots but {img.shape[0]} image embeddings")
        emb[is_img] = img
    elif pixel_values is not None:
        raise ValueError("pixel_values given but no token has token type 1")
    return emb


def reference_logits(weights: dict, config: dict, input_ids: np.ndarray,
                     token_type_ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
    """Full-sequence logits (S, vocab), float64, for ONE sequence."""
    types = np.asarray(token_type_ids).reshape(-1)
    h = input_embeddings(weights, config, input_ids, types, pixel_values)
    mask = reference_expert_mask(types)
    cos, sin = rope_cos_sin(reference_position_ids(types), head_dim(config))
    for i in range(config["num_hidden_layers"]):
        h = lm_layer(h, weights, i, config, mask, cos, sin)
    h = rms_norm(h, _f64(weights, "model.norm.weight"), config["rms_norm_eps"])
    return linear(h, _f64(weights, "lm_head.weight"))


# --------------------------------------------------------------------------- test helpers
def hf_weight_shapes(config: dict) -> dict[str, tuple]:
    """Every HF checkpoint key (COGVLM2.md 'Checkpoint key names') with its shape."""
    hid, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d, nkv = head_dim(config), kv_heads(config)
    qkv_out = hid + 2 * nkv * d
    vc = config["vision_config"]
    vh, vi, ps, ch = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["in_channels"]
    s = {
        "lm_head.weight": (vocab, hid),
        "model.embed_tokens.weight": (vocab, hid),
        "model.norm.weight": (hid,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (hid,)
        s[p + "post_attention_layernorm.weight"] = (hid,)
        s[p + "self_attn.language_expert_query_key_value.weight"] = (qkv_out, hid)
        s[p + "self_attn.vision_expert_query_key_value.weight"] = (qkv_out, hid)
        s[p + "self_attn.vision_expert_query_key_value.bias"] = (qkv_out,)
        s[p + "self_attn.language_expert_dense.weight"] = (hid, hid)
        s[p + "self_attn.vision_expert_dense.weight"] = (hid, hid)
        s[p + "self_attn.rotary_emb.inv_freq"] = (d // 2,)
        for e in ("language_mlp", "vision_mlp"):
            s[p + f"mlp.{e}.gate_proj.weight"] = (inter, hid)
            s[p + f"mlp.{e}.up_proj.weight"] = (inter, hid)
            s[p + f"mlp.{e}.down_proj.weight"] = (hid, inter)
    s["model.vision.boi"] = (1, 1, hid)
    s["model.vision.eoi"] = (1, 1, hid)
    s["model.vision.conv.weight"] = (vh, vh, 2, 2)
    s["model.vision.conv.bias"] = (vh,)
    lp = "model.vision.linear_proj."
    s[lp + "linear_proj.weight"] = (hid, vh)
    s[lp + "norm1.weight"] = (hid,)
    s[lp + "norm1.bias"] = (hid,)
    s[lp + "gate_proj.weight"] = (inter, hid)
    s[lp + "dense_h_to_4h.weight"] = (inter, hid)
    s[lp + "dense_4h_to_h.weight"] = (hid, inter)
    pe = "model.vision.patch_embedding."
    s[pe + "cls_embedding"] = (1, vh)
    s[pe + "position_embedding.weight"] = (vc["num_positions"], vh)
    s[pe + "proj.weight"] = (vh, ch, ps, ps)
    s[pe + "proj.bias"] = (vh,)
    for i in range(vc["num_hidden_layers"]):
        p = f"model.vision.transformer.layers.{i}."
        for name, shp in (("attention.query_key_value", (3 * vh, vh)), ("attention.dense", (vh, vh)),
                          ("mlp.fc1", (vi, vh)), ("mlp.fc2", (vh, vi))):
            s[p + name + ".weight"] = shp
            s[p + name + ".bias"] = (shp[0],)
        for name in ("input_layernorm", "post_attention_layernorm"):
            s[p + name + ".weight"] = (vh,)
            s[p + name + ".bias"] = (vh,)
    return s


def random_hf_weights(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights for every HF key, deterministic in ``seed``. Linear/conv weights are
    N(0, 1/fan_in); norm weights near 1; biases, boi/eoi, cls and position table small random.
    Vision- and language-expert copies are drawn independently, so they differ."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shp in hf_weight_shapes(config).items():
        if key.endswith("rotary_emb.inv_freq"):
            d = 2 * shp[0]
            arr = 1.0 / ROPE_BASE ** (np.arange(0, d, 2, dtype=np.float64) / d)
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shp)
        elif key.endswith(".bias"):
            arr = 0.1 * rng.standard_normal(shp)
        elif key.endswith(("boi", "eoi", "cls_embedding", "position_embedding.weight")):
            arr = 0.5 * rng.standard_normal(shp)
        elif key in ("model.embed_tokens.weight",):
            arr = rng.standard_normal(shp)
        else:  # Linear [out, in] or Conv [out, in, kh, kw]
            fan_in = int(np.prod(shp[1:]))
            arr = rng.standard_normal(shp) / math.sqrt(fan_in)
        out[key] = np.asarray(arr, dtype=dtype)
    return out


def tiny_config(**overrides) -> dict:
    """A tiny CogVLM2-shaped config (LM hidden 64, 2 layers, 4 heads, 2 kv heads; vision hidden
    32, 2 layers, 4 heads, patch 14, image 56 -> 16 patches -> 4 tokens -> 6 image embeddings)."""
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_heads=4,
              patch_size=14, image_size=56, in_channels=3, layer_norm_eps=1e-6,
              num_positions=(56 // 14) ** 2 + 1, hidden_act="gelu", dropout_prob=0.0)
    vc.update(overrides.pop("vision_config", {}))
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_multi_query_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=8192, bos_token_id=0, eos_token_id=[1, 2],
               pad_token_id=3, template_version="chat", vision_config=vc)
    cfg.update(overrides)
    return cfg
