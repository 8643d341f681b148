"""The graphs take their weights as inputs, named by the HF checkpoint keys.

Weights as graph inputs (not baked-in Parameters) is what lets vision, every prefill bucket and
every decode bucket share ONE resident copy of the weights per rank: the runtime loads the rank's
safetensors once and hands the same tensors to each graph. Graph files hold no weights at all.

A `WeightTable` is filled by the blocks as they are built: each block registers the tensors it
needs (full HF shape + how tensor parallelism splits it) and keeps the returned index; its
`construct` then reads `w[index]` from the tuple of weight inputs.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """How a weight is cut across tensor-parallel ranks.

    dim: the axis that is split (None: replicated on every rank).
    parts: for fused projections (qkv), the sizes of the segments along `dim`; each segment is
           split evenly so rank r gets its slice of q, of k and of v.
    """
    dim: int | None = None
    parts: tuple = ()


REPLICATED = Split()
COLUMN = Split(0)      # output features split: no communication after
ROW = Split(1)         # input features split: all-reduce after


def fused(*parts: int) -> Split:
    return Split(0, tuple(parts))


def local_shape(shape: tuple, split: Split, tp: int) -> tuple:
    if split.dim is None or tp == 1:
        return tuple(shape)
    out = list(shape)
    out[split.dim] //= tp
    return tuple(out)


@dataclass(frozen=True)
class WeightSpec:
    name: str          # HF checkpoint key
    shape: tuple       # full (unsplit) shape, as in the checkpoint
    split: Split
    dtype: str | None = None   # numpy dtype name of the graph input; None: the bundle's compute dtype


class WeightTable:
    """Ordered weight specs of one graph family (vision or language)."""

    def __init__(self):
        self.specs: list[WeightSpec] = []

    def add(self, name: str, shape, split: Split = REPLICATED) -> int:
        self.specs.append(WeightSpec(name, tuple(shape), split))
        return len(self.specs) - 1

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def local_shapes(self, tp: int) -> list[tuple]:
        return [local_shape(s.shape, s.split, tp) for s in self.specs]
