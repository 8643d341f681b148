"""Tensor parallelism as a transformation of the weights: cut each tensor for one rank.

The graphs are the same for every rank (they only see local shapes and add the collectives);
which slice of which tensor a rank holds is decided here, from each weight's `Split`.
"""
from cogvlm2_lite.graphs.config import CogVLM2Config
from cogvlm2_lite.graphs.weights import WeightSpec
from cogvlm2_lite.runtime.errors import UserError

TP_SIZES = (1, 2, 4, 8)


def check_tp(cfg: CogVLM2Config, tp: int):
    """Refuse a tp that does not divide every split dimension, naming the first that fails."""
    if tp not in TP_SIZES:
        raise UserError(f"--tp {tp} is not supported: use one of {', '.join(map(str, TP_SIZES))}.")
    v = cfg.vision
    dims = [("attention heads", cfg.num_attention_heads), ("kv heads (num_multi_query_heads)", cfg.num_multi_query_heads),
            ("hidden size", cfg.hidden_size), ("intermediate size", cfg.intermediate_size),
            ("vocabulary", cfg.vocab_size), ("vision heads", v.num_heads),
            ("vision intermediate size", v.intermediate_size)]
    for what, n in dims:
        if n % tp:
            raise UserError(f"--tp {tp} does not divide the model's {what} ({n}): choose a tp that divides it.")


def shard_index(spec: WeightSpec, rank: int, tp: int) -> list[tuple]:
    """Index tuples (one per fused segment) selecting rank's part of the full tensor."""
    split = spec.split
    if split.dim is None or tp == 1:
        return [()]
    parts = split.parts or (spec.shape[split.dim],)
    index, offset = [], 0
    for size in parts:
        n = size // tp
        lead = (slice(None),) * split.dim
        index.append(lead + (slice(offset + rank * n, offset + (rank + 1) * n),))
        offset += size
    return index
