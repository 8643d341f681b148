"""The fixed-shape entry points that export traces: vision, prefill_image_<C>, extend_<C>_<T>, decode_<T>.

A prompt is prefilled in chunks against the cache. An image prompt starts with `prefill_image_<C>`:
bos, the image section (boi, patches, eoi) at its fixed place and up to C text tokens, in one call
(one read of the weights); it is the only graph that routes tokens to the vision expert, through a
static slice. The rest of the text goes through `extend_<C>_<T>` chunks of C tokens over a cache
bucket of T slots, and decode is the C = 1 member of that family (`decode_<T>`), over B rows.

Each takes its data inputs first, then its weights (the `table` order). `inputs`/`outputs` describe
the data tensors (name, shape, dtype) for the manifest; shapes are per rank.
"""
import mindspore as ms
from mindspore import nn, ops

from .config import CogVLM2Config
from .language import LanguageModel
from .layers import NEG_INF
from .quant import dequantize, quantized_table
from .vision import VisionModel

NUMPY_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}   # --dtype -> the manifest's dtype names


def _quantize(cell, table, dtype: str, quant, tp: int):
    """Weight inputs of `cell`: `table` as is, or (quant) its quantized transformation."""
    cell.compute = getattr(ms, NUMPY_NAMES[dtype])
    cell.dequant = None
    if quant is None:
        return table
    qtable, cell.dequant = quantized_table(table, quant, tp)
    return qtable


def _weights(cell, w):
    return w if cell.dequant is None else dequantize(w, cell.dequant, cell.compute)


class VisionGraph(nn.Cell):
    """pixel_values [B, 3, S, S] float32 -> image_embeds [B, n_image, hidden] (compute dtype)."""

    def __init__(self, cfg: CogVLM2Config, batch: int, dtype: str = "fp32", tp: int = 1, quant=None):
        super().__init__()
        self.name = "vision"
        self.model = VisionModel(cfg, tp)
        self.table = _quantize(self, self.model.table, dtype, quant, tp)
        s = cfg.vision.image_size
        self.inputs = [("pixel_values", (batch, 3, s, s), "float32")]
        self.outputs = [("image_embeds", (batch, cfg.num_image_tokens, cfg.hidden_size), NUMPY_NAMES[dtype])]

    def construct(self, *args):
        return self.model(args[0], _weights(self, args[1:]))


class PrefillGraph(nn.Cell):
    """One prompt bucket of S tokens, padded at the end; `valid_len` says where each row ends.

    -> logits of each row's last valid token [B, V] float32, and K, V of all S positions
       [layers, B, KV, S, D] (the runtime keeps the first valid_len slots).
    With `image`, input_ids[:, 1:1+n_image] are placeholders replaced by image_embeds.
    `all_logits` returns logits for every position instead (eager reference, not exported).
    """

    def __init__(self, cfg: CogVLM2Config, seq_len: int, batch: int, image: bool, dtype: str = "fp32",
                 tp: int = 1, all_logits: bool = False, quant=None):
        super().__init__()
        n = cfg.num_image_tokens
        if image and seq_len < n + 1:
            raise ValueError(f"an image prompt needs at least {n + 1} tokens (bos and the image), not {seq_len}")
        self.name = f"prefill_{'image' if image else 'text'}_{seq_len}"
        self.image, self.all_logits, self.seq_len = image, all_logits, seq_len
        self.lm = LanguageModel(cfg, tp, vision_span=(1, n) if image else None)
        self.table = _quantize(self, self.lm.table, dtype, quant, tp)
        kv = (cfg.num_hidden_layers, batch, cfg.num_multi_query_heads // tp, seq_len, cfg.head_dim)
        dt = NUMPY_NAMES[dtype]
        self.inputs = [("input_ids", (batch, seq_len), "int32")]
        if image:
            self.inputs.append(("image_embeds", (batch, n, cfg.hidden_size), dt))
        self.inputs += [("position_ids", (batch, seq_len), "int32"), ("valid_len", (batch,), "int32")]
        self.outputs = [("logits", (batch, cfg.vocab_size), "float32"), ("k", kv, dt), ("v", kv, dt)]

    def construct(self, *args):
        if self.image:
            input_ids, image_embeds, positions, valid_len = args[0], args[1], args[2], args[3]
            w = args[4:]
        else:
            input_ids, positions, valid_len = args[0], args[1], args[2]
            image_embeds = None
            w = args[3:]
        w = _weights(self, w)
        h = self.lm.embed_tokens(input_ids, image_embeds, w)
        h, k, v = self.lm(h, positions, causal_bias(self.seq_len, valid_len), w, None, None)
        if self.all_logits:
            return self.lm.logits(h, w), k, v
        b, s = input_ids.shape
        last = ops.arange(0, b, dtype=ms.int32) * s + valid_len - 1
        return self.lm.logits(ops.gather(h.reshape(b * s, -1), last, 0), w), k, v


def causal_bias(s, anchor):
    """[S, S] additive mask computed at run time: tied to an input (`anchor`, an int32 tensor of values >= 0) so
    the compiler cannot fold it into a constant of S*S floats stored in the graph file."""
    i = ops.arange(0, s, dtype=ms.int32) + ops.minimum(anchor, 0).sum().astype(ms.int32)  # not anchor[0] (Lite)
    future = i.reshape(1, -1) > i.reshape(-1, 1)
    return masked_bias(future)


def masked_bias(masked):
    return masked.astype(ms.float32) * NEG_INF  # arithmetic, not select: no shape-only constants


def image_prefix_graph(cfg: CogVLM2Config, chunk: int, dtype: str = "fp32", tp: int = 1, quant=None) -> PrefillGraph:
    """The first chunk of an image prompt, batch 1: bos + the num_image_tokens image slots (boi,
    patches, eoi) + `chunk` text slots, valid_len of them real ("prefill_image_<chunk>")."""
    g = PrefillGraph(cfg, cfg.num_image_tokens + 1 + chunk, 1, image=True, dtype=dtype, tp=tp, quant=quant)
    g.name = f"prefill_image_{chunk}"
    return g


class ExtendGraph(nn.Cell):
    """C new tokens per row against a cache bucket of T slots (chunked prefill; decode when C = 1).

    C > 1 ("extend_<C>_<T>"): tokens [B, C], positions [B, C] (RoPE), write_index [B] (slots
    already filled), valid_len [B] (real tokens among the C; the rest is padding at the end).
    C = 1 ("decode_<T>"): token [B, 1], position [B], write_index [B].
    Both also take k_0..k_{L-1}, v_0..v_{L-1}, each [B, KV, T, D] (one input per layer: contiguous
    views of the runtime's buffer, passed without copies) -> logits of each row's last valid token
    [B, V] float32, k_new, v_new [L, B, KV, C, D] (the runtime stores the first valid_len).
    Text only: the vision expert runs only in `prefill_image_<C>`.
    """

    def __init__(self, cfg: CogVLM2Config, chunk: int, cache_len: int, batch: int, dtype: str = "fp32", tp: int = 1,
                 quant=None):
        super().__init__()
        self.name = f"decode_{cache_len}" if chunk == 1 else f"extend_{chunk}_{cache_len}"
        self.chunk, self.layers, self.cache_len = chunk, cfg.num_hidden_layers, cache_len
        self.lm = LanguageModel(cfg, tp)
        self.table = _quantize(self, self.lm.table, dtype, quant, tp)
        dt = NUMPY_NAMES[dtype]
        cache = (batch, cfg.num_multi_query_heads // tp, cache_len, cfg.head_dim)
        new = (cfg.num_hidden_layers, batch, cfg.num_multi_query_heads // tp, chunk, cfg.head_dim)
        if chunk == 1:
            self.inputs = [("token", (batch, 1), "int32"), ("position", (batch,), "int32"),
                           ("write_index", (batch,), "int32")]
        else:
            self.inputs = [("tokens", (batch, chunk), "int32"), ("positions", (batch, chunk), "int32"),
                           ("write_index", (batch,), "int32"), ("valid_len", (batch,), "int32")]
        self.inputs += [(f"k_{i}", cache, dt) for i in range(self.layers)]
        self.inputs += [(f"v_{i}", cache, dt) for i in range(self.layers)]
        self.outputs = [("logits", (batch, cfg.vocab_size), "float32"), ("k_new", new, dt), ("v_new", new, dt)]

    def construct(self, *args):
        n, c = self.layers, self.chunk
        d = 3 if c == 1 else 4
        tokens, positions, write_index = args[0], args[1], args[2]
        k_caches, v_caches, w = args[d:d + n], args[d + n:d + 2 * n], _weights(self, args[d + 2 * n:])
        b = tokens.shape[0]
        empty = ops.arange(0, self.cache_len, dtype=ms.int32).reshape(1, -1) >= write_index.reshape(-1, 1)
        h = self.lm.embed_tokens(tokens, None, w)
        if c == 1:
            h, k, v = self.lm(h, positions.reshape(b, 1), masked_bias(empty), w, k_caches, v_caches)
            return self.lm.logits(h.reshape(b, -1), w), k, v  # not h[:, 0]: an ONNX Slice Lite 2.0 cannot run
        valid_len = args[3]
        h, k, v = self.lm(h, positions, masked_bias(empty), w, k_caches, v_caches, causal_bias(c, valid_len))
        last = ops.arange(0, b, dtype=ms.int32) * c + valid_len - 1
        return self.lm.logits(ops.gather(h.reshape(b * c, -1), last, 0), w), k, v
