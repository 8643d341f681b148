"""Llama-3 with CogVLM2's visual expert: every layer has a language and a vision copy of qkv, dense
and MLP. Routing is static: in image graphs the vision-expert tokens are the slice [1, n_image - 1)
(boi + patches; eoi and all text use the language expert), so each expert runs only on its tokens.
"""
import mindspore as ms
from mindspore import nn, ops

from .config import ROPE_THETA, CogVLM2Config
from .layers import (SwiGLU, TensorParallel, apply_rope, attention, cached_attention, linear, rms_norm,
                     rope_cos_sin, split_heads)
from .weights import ROW, Split, WeightTable, fused

HIDDEN_SPLIT = Split(1)  # embedding table split by hidden columns: the same graph serves every rank


def split_experts(x, span):
    """-> (language tokens, vision tokens) for a static vision span (start, end) on axis 1."""
    s, e = span
    return ops.concat((x[:, :s], x[:, e:]), 1), x[:, s:e]


def join_experts(text, vision, span):
    s = span[0]
    return ops.concat((text[:, :s], vision, text[:, s:]), 1)


class ExpertAttention(TensorParallel):
    def __init__(self, table: WeightTable, prefix: str, cfg: CogVLM2Config, tp: int, span):
        super().__init__(tp)
        h, d, kv = cfg.hidden_size, cfg.head_dim, cfg.num_multi_query_heads
        self.span = span
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads // tp, kv // tp, d
        qkv, parts = (h + 2 * kv * d, h), fused(h, kv * d, kv * d)  # [q | k | v]
        self.lang_qkv = table.add(f"{prefix}.language_expert_query_key_value.weight", qkv, parts)
        self.vis_qkv = table.add(f"{prefix}.vision_expert_query_key_value.weight", qkv, parts)
        self.vis_qkv_b = table.add(f"{prefix}.vision_expert_query_key_value.bias", qkv[:1], parts)
        self.lang_dense = table.add(f"{prefix}.language_expert_dense.weight", (h, h), ROW)
        self.vis_dense = table.add(f"{prefix}.vision_expert_dense.weight", (h, h), ROW)

    def construct(self, x, cos, sin, bias, w, k_cache, v_cache, new_bias):
        if self.span is None:
            qkv = linear(x, w[self.lang_qkv])
        else:
            text, vis = split_experts(x, self.span)
            qkv = join_experts(linear(text, w[self.lang_qkv]), linear(vis, w[self.vis_qkv], w[self.vis_qkv_b]),
                               self.span)
        nq, nk, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        q = apply_rope(split_heads(qkv[:, :, :nq], self.heads, d), cos, sin)
        k = apply_rope(split_heads(qkv[:, :, nq:nq + nk], self.kv_heads, d), cos, sin).transpose(0, 2, 1, 3)
        v = split_heads(qkv[:, :, nq + nk:], self.kv_heads, d).transpose(0, 2, 1, 3)
        if k_cache is None:
            o = attention(q, k, v, bias)
        else:
            o = cached_attention(q, k_cache, v_cache, bias, k, v, new_bias)
        if self.span is None:
            out = linear(o, w[self.lang_dense])
        else:
            text, vis = split_experts(o, self.span)
            out = join_experts(linear(text, w[self.lang_dense]), linear(vis, w[self.vis_dense]), self.span)
        return self.reduce(out), k, v


class ExpertMLP(TensorParallel):
    def __init__(self, table: WeightTable, prefix: str, cfg: CogVLM2Config, tp: int, span):
        super().__init__(tp)
        self.span = span
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.language = SwiGLU(table, *(f"{prefix}.language_mlp.{n}_proj.weight" for n in ("gate", "up", "down")), h, i)
        self.vision = SwiGLU(table, *(f"{prefix}.vision_mlp.{n}_proj.weight" for n in ("gate", "up", "down")), h, i)

    def construct(self, x, w):
        if self.span is None:
            return self.reduce(self.language(x, w))
        text, vis = split_experts(x, self.span)
        return self.reduce(join_experts(self.language(text, w), self.vision(vis, w), self.span))


class DecoderLayer(nn.Cell):
    def __init__(self, table: WeightTable, prefix: str, cfg: CogVLM2Config, tp: int, span):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        h = (cfg.hidden_size,)
        self.ln_in = table.add(f"{prefix}.input_layernorm.weight", h)
        self.attn = ExpertAttention(table, f"{prefix}.self_attn", cfg, tp, span)
        self.ln_post = table.add(f"{prefix}.post_attention_layernorm.weight", h)
        self.mlp = ExpertMLP(table, f"{prefix}.mlp", cfg, tp, span)

    def construct(self, h, cos, sin, bias, w, k_cache, v_cache, new_bias):
        a, k, v = self.attn(rms_norm(h, w[self.ln_in], self.eps), cos, sin, bias, w, k_cache, v_cache, new_bias)
        h = h + a
        return h + self.mlp(rms_norm(h, w[self.ln_post], self.eps), w), k, v


class LanguageModel(TensorParallel):
    """Embedding, decoder layers, final norm and lm_head. `vision_span` is the static slice of
    vision-expert tokens of image graphs, None for text-only and decode graphs."""

    def __init__(self, cfg: CogVLM2Config, tp: int = 1, vision_span=None):
        super().__init__(tp)
        self.table = t = WeightTable()
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.embed = t.add("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), HIDDEN_SPLIT)
        self.layers = nn.CellList([DecoderLayer(t, f"model.layers.{i}", cfg, tp, vision_span)
                                   for i in range(cfg.num_hidden_layers)])
        self.norm = t.add("model.norm.weight", (cfg.hidden_size,))
        self.lm_head = t.add("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), Split(0))

    def embed_tokens(self, input_ids, image_embeds, w):
        """Token embeddings; the image embeddings replace the slots right after bos."""
        h = self.gather_last(ops.gather(w[self.embed], input_ids, 0))
        if image_embeds is not None:
            n = image_embeds.shape[1]
            h = ops.concat((h[:, :1], image_embeds.astype(h.dtype), h[:, 1 + n:]), 1)
        return h

    def construct(self, h, positions, bias, w, k_caches, v_caches, new_bias=None):
        """-> final-normed hidden states, and this call's K and V stacked as [layers, B, KV, S, D].

        Without caches `bias` is the [S, S] mask of a whole prompt; with them it is the cache mask
        [B, T] and `new_bias` the [C, C] causal mask of the C new tokens (None for C = 1)."""
        cos, sin = rope_cos_sin(positions, self.head_dim, ROPE_THETA)
        ks = ()
        vs = ()
        for i in range(len(self.layers)):
            if k_caches is None:
                h, k, v = self.layers[i](h, cos, sin, bias, w, None, None, None)
            else:
                h, k, v = self.layers[i](h, cos, sin, bias, w, k_caches[i], v_caches[i], new_bias)
            ks = ks + (ops.expand_dims(k, 0),)  # concat of [1, ...] slices, not ops.stack: stack exports to
            vs = vs + (ops.expand_dims(v, 0),)  # ONNX as SequenceConstruct/ConcatFromSequence (no Lite 2.0)
        return rms_norm(h, w[self.norm], self.eps), ops.concat(ks, 0), ops.concat(vs, 0)

    def logits(self, h, w):
        return self.gather_last(linear(h, w[self.lm_head])).astype(ms.float32)
