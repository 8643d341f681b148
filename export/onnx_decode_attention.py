"""A decode step's attention as our own kernel (kernels/attention.h DecodeAttention), in the decode graphs' form
with our kernels.

After the weights, the KV cache is a decode step's largest read: 1 GiB at the 19B's full 4096-slot cache, a
sixth of the step. onnxruntime's GroupQueryAttention (export/onnx_fuse.py puts it in each decode graph) streams
it at ~19 GB/s; our kernel reads each key head's K, then its V, in order, prefetching a few keys ahead. It keeps
GroupQueryAttention's contract: the new key and value written at slot `write_index` of the cache inputs, its
present outputs bound to the cache inputs' memory by the runtime (runtime/onnx_backend.py), and a row whose
cache is full (write_index == T) idle.

  GroupQueryAttention(q, k, v, k_i, v_i, seqlens, total, ...; num_heads, kv_num_heads[, scale])   (com.microsoft)
  ->  DecodeAttention(q, k, v, k_i, v_i, write_index; num_heads, kv_num_heads, scale)             (com.cogvlm2)

The seqlens arithmetic that only GroupQueryAttention read is pruned. fp32 caches only (the kernel's type).
"""
import math

import onnx
from onnx import TensorProto, helper

from cogvlm2_lite.graphs.quant import KERNELS_DOMAIN

from .onnx_graph import OnnxGraph


def use_decode_attention(model: onnx.ModelProto) -> int:
    """Replace each GroupQueryAttention of a decode graph over fp32 graph-input caches, in place -> how many."""
    G = OnnxGraph(model)
    if "write_index" not in G.inputs:
        return 0
    fused = {}
    for n in G.g.node:
        if n.op_type != "GroupQueryAttention" or len(n.input) < 5 or any(c not in G.inputs for c in n.input[3:5]):
            continue
        cache = G.inputs[n.input[3]].type.tensor_type
        if cache.elem_type != TensorProto.FLOAT or len(cache.shape.dim) != 4:
            continue
        head_dim = cache.shape.dim[3].dim_value
        scale = G.attr(n, "scale", 0.0) or 1.0 / math.sqrt(head_dim)
        fused[n.output[0]] = helper.make_node(
            "DecodeAttention", list(n.input[:5]) + ["write_index"], list(n.output), name=n.name, domain=KERNELS_DOMAIN,
            num_heads=G.attr(n, "num_heads"), kv_num_heads=G.attr(n, "kv_num_heads"), scale=float(scale))
    return G.replace_producers(fused, KERNELS_DOMAIN)
