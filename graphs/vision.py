"""EVA2-CLIP-E vision tower and the conv + GLU adapter: pixels -> [boi, patch tokens, eoi] embeddings."""
from mindspore import nn, ops

from .config import CogVLM2Config, VisionConfig
from .layers import SwiGLU, TensorParallel, attention, gelu, layer_norm, linear
from .weights import COLUMN, ROW, WeightTable, fused

# Vision attention is full (non-causal) over every patch: at 1344 px that is 9217 x 9217 scores per head,
# 5.4 GB of fp32 for the 16 heads at once. Queries go in blocks of this many rows instead (layers.attention).
QUERY_BLOCK = 1024


def patchify(x, k):
    """[B, C, H, W] -> [B, (H/k)*(W/k), C*k*k]: a kernel=stride=k Conv2d becomes one matmul with the
    conv weight viewed as [out, C*k*k] (same (c, kh, kw) order), patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // k, k, w // k, k).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // k) * (w // k), c * k * k)


def strided_conv(x, weight, bias, k):
    return linear(patchify(x, k), weight.reshape(weight.shape[0], -1), bias)


class VisionAttention(TensorParallel):
    """Fused qkv split as (B, L, 3, H, D), non-causal, dense with bias."""

    def __init__(self, table: WeightTable, prefix: str, cfg: VisionConfig, tp: int):
        super().__init__(tp)
        h = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads // tp, cfg.head_dim
        self.query_block = QUERY_BLOCK
        self.qkv_w = table.add(f"{prefix}.query_key_value.weight", (3 * h, h), fused(h, h, h))
        self.qkv_b = table.add(f"{prefix}.query_key_value.bias", (3 * h,), fused(h, h, h))
        self.dense_w = table.add(f"{prefix}.dense.weight", (h, h), ROW)
        self.dense_b = table.add(f"{prefix}.dense.bias", (h,))

    def construct(self, x, w):
        b, s, _ = x.shape
        qkv = linear(x, w[self.qkv_w], w[self.qkv_b]).reshape(b, s, 3, self.heads, self.head_dim)
        k = qkv[:, :, 1].transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        o = attention(qkv[:, :, 0], k, v, None, self.query_block)
        return self.reduce(linear(o, w[self.dense_w])) + w[self.dense_b]


class VisionMLP(TensorParallel):
    def __init__(self, table: WeightTable, prefix: str, cfg: VisionConfig, tp: int):
        super().__init__(tp)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.fc1_w = table.add(f"{prefix}.fc1.weight", (i, h), COLUMN)
        self.fc1_b = table.add(f"{prefix}.fc1.bias", (i,), COLUMN)
        self.fc2_w = table.add(f"{prefix}.fc2.weight", (h, i), ROW)
        self.fc2_b = table.add(f"{prefix}.fc2.bias", (h,))

    def construct(self, x, w):
        return self.reduce(linear(gelu(linear(x, w[self.fc1_w], w[self.fc1_b])), w[self.fc2_w])) + w[self.fc2_b]


class VisionLayer(nn.Cell):
    """Post-branch norms: h + LN_in(attn(h)), then h + LN_post(mlp(h))."""

    def __init__(self, table: WeightTable, prefix: str, cfg: VisionConfig, tp: int):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.attention = VisionAttention(table, f"{prefix}.attention", cfg, tp)
        self.mlp = VisionMLP(table, f"{prefix}.mlp", cfg, tp)
        h = (cfg.hidden_size,)
        self.ln_in = (table.add(f"{prefix}.input_layernorm.weight", h), table.add(f"{prefix}.input_layernorm.bias", h))
        self.ln_post = (table.add(f"{prefix}.post_attention_layernorm.weight", h),
                        table.add(f"{prefix}.post_attention_layernorm.bias", h))

    def construct(self, h, w):
        h = h + layer_norm(self.attention(h, w), w[self.ln_in[0]], w[self.ln_in[1]], self.eps)
        return h + layer_norm(self.mlp(h, w), w[self.ln_post[0]], w[self.ln_post[1]], self.eps)


class VisionModel(TensorParallel):
    """pixels [B, 3, S, S] -> image embeddings [B, num_image_tokens, LM hidden] (boi/eoi included)."""

    def __init__(self, cfg: CogVLM2Config, tp: int = 1):
        super().__init__(tp)
        v = cfg.vision
        self.table = t = WeightTable()
        p = "model.vision"
        self.patch = v.patch_size
        self.proj_w = t.add(f"{p}.patch_embedding.proj.weight", (v.hidden_size, v.in_channels, v.patch_size, v.patch_size))
        self.proj_b = t.add(f"{p}.patch_embedding.proj.bias", (v.hidden_size,))
        self.cls = t.add(f"{p}.patch_embedding.cls_embedding", (1, v.hidden_size))
        self.pos = t.add(f"{p}.patch_embedding.position_embedding.weight", (v.num_positions, v.hidden_size))
        self.layers = nn.CellList([VisionLayer(t, f"{p}.transformer.layers.{i}", v, tp)
                                   for i in range(v.num_hidden_layers)])
        # adapter: 2x2 stride-2 conv on the patch grid, then the GLU
        self.grid = v.grid
        self.conv_w = t.add(f"{p}.conv.weight", (v.hidden_size, v.hidden_size, 2, 2))
        self.conv_b = t.add(f"{p}.conv.bias", (v.hidden_size,))
        hl = cfg.hidden_size
        self.linear_proj = t.add(f"{p}.linear_proj.linear_proj.weight", (hl, v.hidden_size))
        self.norm1 = (t.add(f"{p}.linear_proj.norm1.weight", (hl,)), t.add(f"{p}.linear_proj.norm1.bias", (hl,)))
        self.glu = SwiGLU(t, f"{p}.linear_proj.gate_proj.weight", f"{p}.linear_proj.dense_h_to_4h.weight",
                          f"{p}.linear_proj.dense_4h_to_h.weight", hl, cfg.intermediate_size)
        self.boi = t.add(f"{p}.boi", (1, 1, hl))
        self.eoi = t.add(f"{p}.eoi", (1, 1, hl))

    def construct(self, pixel_values, w):
        dtype = w[self.proj_w].dtype
        x = strided_conv(pixel_values.astype(dtype), w[self.proj_w], w[self.proj_b], self.patch)
        b = x.shape[0]
        cls = ops.broadcast_to(w[self.cls].expand_dims(0), (b, 1, x.shape[-1]))
        h = ops.concat((cls, x), 1) + w[self.pos]
        for layer in self.layers:
            h = layer(h, w)
        g = self.grid
        grid = h[:, 1:].reshape(b, g, g, -1).transpose(0, 3, 1, 2)
        x = linear(strided_conv(grid, w[self.conv_w], w[self.conv_b], 2), w[self.linear_proj])
        x = gelu(layer_norm(x, w[self.norm1[0]], w[self.norm1[1]], 1e-5))
        x = self.reduce(self.glu(x, w))
        hl = x.shape[-1]
        return ops.concat((ops.broadcast_to(w[self.boi], (b, 1, hl)), x, ops.broadcast_to(w[self.eoi], (b, 1, hl))), 1)
