"""What a bundle's graphs must read and compute, from its manifest and safetensors headers (no weights loaded):
the bytes of one decode step (the memory roofline's numerator) and the FLOPs of each prefill chunk."""
import math

import numpy as np

from cogvlm2_lite.graphs.quant import weight_forms
from cogvlm2_lite.runtime.bundle import Bundle, safetensors_header


def tensor_table(bundle: Bundle, rank: int = 0) -> dict:
    """name -> (shape, bytes as stored), from the safetensors headers (the data offsets give the bytes)."""
    table = {}
    for path in bundle.weight_files(rank):
        for name, info in safetensors_header(path).items():
            a, b = info["data_offsets"]
            table[name] = (tuple(info["shape"]), b - a)
    return table


def is_vision_expert(name: str) -> bool:
    return "vision_expert" in name or "vision_mlp" in name


def linear_matrices(bundle: Bundle, table: dict) -> dict:
    """{stored tensor name: [out, in]} of every linear weight as a decode step reads it (a quantized
    one's NAME.qweight, its form taken from the manifest)."""
    stored = {base + s: (base, form) for base, form in weight_forms(bundle.manifest.get("quant")).items()
              for s in form.suffixes}
    out = {}
    for name in bundle.weight_names("language"):
        shape = table[name][0]
        if name in stored:
            base, form = stored[name]
            if name == base + form.suffixes[0]:   # the codes; scales and smoothing are read alongside
                out[name] = form.matrix(shape)
        elif len(shape) == 2:
            out[name] = list(shape)
    return out


def model_costs(bundle: Bundle) -> dict:
    """Bytes one decode step reads (weights of the language-expert path, one embedding row per
    sequence, the K/V of each cache bucket) and FLOPs of each prefill chunk, for the rank-0 graphs."""
    m = bundle.manifest
    cfg, kv = m["model"], m["kv_cache"]
    table = tensor_table(bundle)
    matrices = linear_matrices(bundle, table)
    b = bundle.batch
    weight_bytes, gemv_shapes, layer_params = 0, [], 0
    for name in bundle.weight_names("language"):
        shape, nbytes = table[name]
        if is_vision_expert(name):
            continue
        if name == "model.embed_tokens.weight":
            weight_bytes += b * nbytes // shape[0]          # one row per sequence
            continue
        weight_bytes += nbytes
        if name in matrices:
            gemv_shapes.append(matrices[name])
            if not name.startswith("lm_head."):
                layer_params += math.prod(matrices[name])
    itemsize = np.dtype(kv["dtype"]).itemsize
    kv_bytes = {str(t): 2 * kv["layers"] * b * kv["kv_heads"] * t * kv["head_dim"] * itemsize
                for t in bundle.buckets["decode"]}
    hidden, vocab, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    lm_head = (vocab // m["tp"], hidden)

    def prefill_flops(s):  # one row's chunk of s tokens (padding included), lm_head on its last token
        return 2 * s * layer_params + layers * 4 * s * s * hidden + 2 * lm_head[0] * lm_head[1]

    image = m["num_image_tokens"] + 1
    flops = {"extend": {str(c): prefill_flops(c) for c in bundle.buckets["chunk"]},
             "prefill_image": {str(c): prefill_flops(image + c) for c in bundle.buckets["chunk"]}}
    params = {fam: sum(math.prod(table[n][0]) for n in bundle.weight_names(fam)) for fam in ("vision", "language")}
    return {"decode_weight_bytes": weight_bytes, "kv_read_bytes": kv_bytes, "gemv_shapes": gemv_shapes,
            "prefill_flops": flops, "params": params,
            "note": "decode reads the language-expert path (qkv, dense, MLP, norms of every layer), lm_head, one "
                    "embedding row per sequence, and the whole K/V of its cache bucket (masked slots included)"}
