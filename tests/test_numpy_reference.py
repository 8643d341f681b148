"""Self-checks of the plain-numpy CogVLM2 reference (tests/numpy_reference.py).

These need no MindSpore: they check the reference against the facts of COGVLM2.md directly
(position rule, expert routing, causality, grid order, numerics of the building blocks).
"""
import copy
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_reference as ref  # noqa: E402

# [bos, boi, 4 patches, eoi, t, t] (the tiny config's 6 image embeddings)
TYPES = np.array([0, 1, 1, 1, 1, 1, 1, 0, 0])
PLACEHOLDER = 3


@pytest.fixture(scope="module")
def cfg():
    return ref.tiny_config()


@pytest.fixture(scope="module")
def weights(cfg):
    return ref.random_hf_weights(cfg, seed=1234)


@pytest.fixture(scope="module")
def pixels(cfg):
    side = cfg["vision_config"]["image_size"]
    return np.random.default_rng(7).standard_normal((3, side, side)).astype(np.float32)


def image_prompt(cfg, text=(17, 42, 99)):
    n = ref.n_image_tokens(cfg)
    ids = np.array([cfg["bos_token_id"]] + [PLACEHOLDER] * n + list(text))
    types = np.array([0] + [1] * n + [0] * len(text))
    return ids, types


def with_nan(weights, keys):
    w = dict(weights)
    for k in keys:
        w[k] = np.full_like(w[k], np.nan)
    return w


# ------------------------------------------------------------------ rules from COGVLM2.md
def test_position_ids_example():
    assert ref.reference_position_ids(TYPES).tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5]


def test_position_ids_release_shape():
    # bos=0, boi=1, every patch=2, eoi=3, first text token=4 (2304 patches)
    types = np.array([0] + [1] * 2306 + [0, 0])
    pos = ref.reference_position_ids(types)
    assert pos[0] == 0 and pos[1] == 1 and set(pos[2:2306]) == {2}
    assert pos[2306] == 3 and pos[2307] == 4 and pos[2308] == 5


def test_position_ids_text_only_is_arange():
    assert ref.reference_position_ids(np.zeros(7, int)).tolist() == list(range(7))


def test_expert_mask_example():
    assert ref.reference_expert_mask(TYPES).tolist() == [
        False, True, True, True, True, True, False, False, False]


def test_expert_mask_last_token_is_language():
    # sequence cut right after the image: the last token has no next token -> language
    assert ref.reference_expert_mask(np.array([0, 1, 1, 1])).tolist() == [False, True, True, False]
    assert ref.reference_expert_mask(np.zeros(4, int)).tolist() == [False] * 4


# ------------------------------------------------------------------ building blocks
def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.0, 3.0, -3.0, 6.5, 1e-8, 30.0, -30.0]])
    want = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(ref.erf(x) - want)) < 1e-14


def test_rms_norm_formula():
    x = np.array([[3.0, 4.0]])
    w = np.array([1.0, 2.0])
    inv = 1 / math.sqrt((9 + 16) / 2 + 1e-5)
    np.testing.assert_allclose(ref.rms_norm(x, w, 1e-5), [[3 * inv, 8 * inv]], rtol=1e-15)


def test_conv_matches_naive_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 4))
    w = rng.standard_normal((5, 3, 2, 2))
    b = rng.standard_normal(5)
    got = ref.conv2d_stride_eq_kernel(x, w, b)
    want = np.zeros((5, 3, 2))
    for o in range(5):
        for r in range(3):
            for c in range(2):
                want[o, r, c] = b[o] + np.sum(w[o] * x[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_rope_is_relative_and_uses_base_500000():
    d = 16
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, d)), rng.standard_normal((1, 1, d))

    def dot(m, n):
        cq, sq = ref.rope_cos_sin(np.array([m]), d)
        ck, sk = ref.rope_cos_sin(np.array([n]), d)
        return float(ref.apply_rope(q, cq, sq).ravel() @ ref.apply_rope(k, ck, sk).ravel())

    assert abs(dot(7, 3) - dot(1004, 1000)) < 1e-9
    cos, sin = ref.rope_cos_sin(np.array([1000]), d)
    assert np.isclose(cos[0, 1], math.cos(1000 * 500000 ** (-2 / d)), rtol=0, atol=1e-12)
    assert np.array_equal(cos[:, : d // 2], cos[:, d // 2:])  # rotate-half layout


def test_gqa_kv_head_j_serves_query_heads_jg_to_jg_plus_g():
    """Llama repeat_kv convention: with H=4 q heads and KV=2, q heads 0,1 read kv head 0 and
    q heads 2,3 read kv head 1."""
    s, d = 3, 4
    q = np.zeros((4, s, d))
    k = np.zeros((2, s, d))
    v = np.stack([np.full((s, d), 1.0), np.full((s, d), 2.0)])
    out = ref.causal_gqa_attention(q, k, v)
    assert out[:, -1, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_vision_qkv_split_is_L_3_H_D():
    """Fused qkv output rows are [q (all heads) | k | v]: with q = k = 0 and v = identity the
    non-causal attention is uniform and returns the mean token (dense = identity)."""
    hid, heads, L = 8, 2, 5
    w = {"a.query_key_value.weight": np.vstack([np.zeros((2 * hid, hid)), np.eye(hid)]),
         "a.query_key_value.bias": np.zeros(3 * hid),
         "a.dense.weight": np.eye(hid), "a.dense.bias": np.zeros(hid)}
    h = np.random.default_rng(4).standard_normal((L, hid))
    out = ref.vision_attention(h, w, "a.", heads)
    np.testing.assert_allclose(out, np.broadcast_to(h.mean(0), (L, hid)), rtol=1e-12)


def test_vision_norms_are_post_branch(cfg, weights):
    """h = h + LN_in(attn(h)); h = h + LN_post(mlp(h)): with both LNs' affine set to zero the
    layer is the identity (a pre-norm layer would still add attn/mlp of zeros plus biases)."""
    w = dict(weights)
    p = "model.vision.transformer.layers.0."
    for n in ("input_layernorm", "post_attention_layernorm"):
        for t in ("weight", "bias"):
            w[f"{p}{n}.{t}"] = np.zeros_like(w[f"{p}{n}.{t}"])
    h = np.random.default_rng(5).standard_normal((17, cfg["vision_config"]["hidden_size"]))
    np.testing.assert_array_equal(ref.vision_layer(h, w, 0, cfg["vision_config"]), h)
    assert not np.allclose(ref.vision_layer(h, weights, 0, cfg["vision_config"]), h)


def test_attention_is_causal_softmax():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 4, 8)) for _ in range(3))
    out = ref.causal_gqa_attention(q, k, v)
    for i in range(4):
        sc = q[0, i] @ k[0, : i + 1].T / math.sqrt(8)
        p = np.exp(sc - sc.max())
        np.testing.assert_allclose(out[0, i], (p / p.sum()) @ v[0, : i + 1], rtol=1e-12)


# ------------------------------------------------------------------ weights helper
def test_random_weights_cover_keys_and_experts_differ(cfg, weights):
    assert set(weights) == set(ref.hf_weight_shapes(cfg))
    for k, shp in ref.hf_weight_shapes(cfg).items():
        assert weights[k].shape == shp, k
    p = "model.layers.0."
    for a, b in (("self_attn.vision_expert_query_key_value.weight",
                  "self_attn.language_expert_query_key_value.weight"),
                 ("self_attn.vision_expert_dense.weight", "self_attn.language_expert_dense.weight"),
                 ("mlp.vision_mlp.up_proj.weight", "mlp.language_mlp.up_proj.weight")):
        assert not np.allclose(weights[p + a], weights[p + b])
    again = ref.random_hf_weights(cfg, seed=1234)
    assert all(np.array_equal(again[k], weights[k]) for k in weights)


# ------------------------------------------------------------------ whole model
def test_pixel_embeds_shape_and_boi_eoi(cfg, weights, pixels):
    emb = ref.reference_pixel_embeds(weights, cfg, pixels)
    assert emb.shape == (6, cfg["hidden_size"])
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb[0], weights["model.vision.boi"].reshape(-1))
    np.testing.assert_array_equal(emb[-1], weights["model.vision.eoi"].reshape(-1))


def test_logits_finite_and_shaped(cfg, weights, pixels):
    ids, types = image_prompt(cfg)
    logits = ref.reference_logits(weights, cfg, ids, types, pixels)
    assert logits.shape == (len(ids), cfg["vocab_size"]) and logits.dtype == np.float64
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1  # not degenerate


def test_causality(cfg, weights, pixels):
    ids, types = image_prompt(cfg, text=(17, 42, 99, 5))
    a = ref.reference_logits(weights, cfg, ids, types, pixels)
    ids2 = ids.copy()
    ids2[-2] = 123
    b = ref.reference_logits(weights, cfg, ids2, types, pixels)
    np.testing.assert_array_equal(a[:-2], b[:-2])
    assert not np.allclose(a[-2:], b[-2:])
    # the image comes after bos: bos logits ignore the pixels, later tokens do not
    c = ref.reference_logits(weights, cfg, ids, types, pixels * 0.5)
    np.testing.assert_array_equal(a[0], c[0])
    assert not np.allclose(a[-1], c[-1])


def test_text_only_never_touches_vision_weights(cfg, weights):
    vision_keys = [k for k in weights if k.startswith("model.vision.") or "vision_expert" in k
                   or "vision_mlp" in k]
    poisoned = with_nan(weights, vision_keys)
    ids = np.array([0, 17, 42, 99, 5])
    types = np.zeros_like(ids)
    a = ref.reference_logits(poisoned, cfg, ids, types, None)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, ref.reference_logits(weights, cfg, ids, types, None))


@pytest.mark.parametrize("part", ["mlp", "dense"])
def test_each_token_uses_exactly_its_expert(cfg, weights, pixels, part):
    """NaN in the LAST layer's per-token ops (MLP or o-proj) of one expert poisons exactly the
    tokens routed to that expert, because those ops never mix tokens. So: vision-expert NaN
    must hit boi + patches only, language-expert NaN must hit bos, eoi and the text only."""
    ids, types = image_prompt(cfg)
    last = cfg["num_hidden_layers"] - 1
    p = f"model.layers.{last}."
    keys = {
        "mlp": lambda e: [p + f"mlp.{e}_mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")],
        "dense": lambda e: [p + f"self_attn.{e}_expert_dense.weight"],
    }[part]
    vision_rows = np.zeros(len(ids), bool)
    vision_rows[1:ref.n_image_tokens(cfg)] = True  # boi + patches; eoi (last image slot) excluded
    assert np.array_equal(vision_rows, ref.reference_expert_mask(types))

    nan_v = ref.reference_logits(with_nan(weights, keys("vision")), cfg, ids, types, pixels)
    assert np.isnan(nan_v).any(axis=1).tolist() == vision_rows.tolist()
    nan_l = ref.reference_logits(with_nan(weights, keys("language")), cfg, ids, types, pixels)
    assert np.isnan(nan_l).any(axis=1).tolist() == (~vision_rows).tolist()
    # and the eoi row specifically is untouched by the vision expert
    clean = ref.reference_logits(weights, cfg, ids, types, pixels)
    eoi = ref.n_image_tokens(cfg)
    np.testing.assert_array_equal(nan_v[eoi], clean[eoi])


def test_vision_expert_qkv_bias_is_used(cfg, weights, pixels):
    ids, types = image_prompt(cfg)
    w = dict(weights)
    k = "model.layers.0.self_attn.vision_expert_query_key_value.bias"
    w[k] = np.zeros_like(w[k])
    a = ref.reference_logits(weights, cfg, ids, types, pixels)
    b = ref.reference_logits(w, cfg, ids, types, pixels)
    np.testing.assert_array_equal(a[0], b[0])  # bos precedes the image
    assert not np.allclose(a[-1], b[-1])


def test_grid_order_is_row_major(cfg):
    """With no vision layers, a change in patch (r, c) changes only vision token r*G+c and only
    adapter token (r//2)*(G/2) + c//2 (after boi)."""
    c0 = copy.deepcopy(cfg)
    c0["vision_config"]["num_hidden_layers"] = 0
    w = ref.random_hf_weights(c0, seed=3)
    ps, g = c0["vision_config"]["patch_size"], ref.vision_grid(c0)
    base = np.random.default_rng(1).standard_normal((3, g * ps, g * ps)).astype(np.float32)
    v0 = ref.vision_tower(w, c0, base)
    e0 = ref.reference_pixel_embeds(w, c0, base)
    for r, c in ((0, 1), (1, 0), (0, 2), (2, 0), (1, 3), (3, 2)):
        px = base.copy()
        px[:, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] += 1.0
        dv = np.abs(ref.vision_tower(w, c0, px) - v0).max(axis=1) > 0
        assert np.flatnonzero(dv).tolist() == [r * g + c]
        de = np.abs(ref.reference_pixel_embeds(w, c0, px) - e0).max(axis=1) > 0
        assert np.flatnonzero(de).tolist() == [1 + (r // 2) * (g // 2) + c // 2]


def test_vision_tower_is_not_causal(cfg, weights, pixels):
    ps = cfg["vision_config"]["patch_size"]
    px = pixels.copy()
    px[:, -ps:, -ps:] += 1.0  # last patch only
    a = ref.vision_tower(weights, cfg, pixels)
    b = ref.vision_tower(weights, cfg, px)
    assert not np.allclose(a[0], b[0])  # the first token sees the last patch


def test_missing_num_multi_query_heads_defaults_to_8():
    c = ref.tiny_config(num_attention_heads=8)
    del c["num_multi_query_heads"]
    assert ref.kv_heads(c) == 8
    w = ref.random_hf_weights(c, seed=5)
    assert w["model.layers.0.self_attn.language_expert_query_key_value.weight"].shape == (64 + 2 * 64, 64)
    ids, types = image_prompt(c)
    side = c["vision_config"]["image_size"]
    px = np.zeros((3, side, side), np.float32)
    assert np.isfinite(ref.reference_logits(w, c, ids, types, px)).all()


def test_bad_inputs_are_refused(cfg, weights, pixels):
    ids, types = image_prompt(cfg)
    with pytest.raises(ValueError):
        ref.reference_logits(weights, cfg, ids, types, None)
    with pytest.raises(ValueError):
        ref.reference_logits(weights, cfg, ids[:-1], types, pixels)
    short = types.copy()
    short[ref.n_image_tokens(cfg)] = 0  # 5 image slots for 6 image embeddings
    with pytest.raises(ValueError):
        ref.reference_logits(weights, cfg, ids, short, pixels)
    with pytest.raises(ValueError):
        ref.reference_logits(weights, cfg, ids, np.zeros_like(types), pixels)
    with pytest.raises(ValueError):
        ref.reference_pixel_embeds(weights, cfg, pixels[:, :28, :28])
