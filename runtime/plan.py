"""One step's plan: what the scheduler decided, as the runner executes it, op by op, in order.

The scheduler (scheduler.py) writes a Plan and never touches a graph or the KV cache; the runner (runner.py)
executes it and decides nothing; under tensor parallelism rank 0 sends the same Plan to every rank
(tp_channel.py), so all ranks' caches change alike. Ops are plain data (numpy arrays, ints, bytes).
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Vision:
    """Run the vision graph on `pixels` [3, S, S] and keep the embeddings under `digest` (in the encoder cache
    when `keep`, else only for this step's image prefill)."""
    digest: bytes
    pixels: np.ndarray
    keep: bool


@dataclass
class PrefillImage:
    """Row `row` starts over with bos, the image section (the embeddings under `digest`) and the first text tokens
    of `ids` (RoPE `positions`): `tokens` slots in all. `keep_prefix`: then keep the K/V of its bos + image section
    under `digest`."""
    row: int
    digest: bytes
    ids: list
    positions: list
    tokens: int
    keep_prefix: bool


@dataclass
class LoadPrefix:
    """Row `row` starts over holding the cached K/V of the bos + image section under `digest`."""
    row: int
    digest: bytes


@dataclass
class CopyRow:
    """Row `dst` starts over with the first `n` slots of row `src` (choices of one prompt share its prefill)."""
    src: int
    dst: int
    n: int


@dataclass
class Extend:
    """Feed `ids` (RoPE `positions`) to row `row` after its first `start` slots, in the cheapest chunks."""
    row: int
    start: int
    ids: list
    positions: list


@dataclass
class Decode:
    """One token per row (`tokens`, `positions` [B]) in one decode call, K/V appended for `rows`; the cache laid
    out for `needed` slots."""
    tokens: np.ndarray
    positions: np.ndarray
    rows: list
    needed: int


@dataclass
class Evict:
    """Drop cached entries: `encoder` embeddings and `prefix` K/V by digest; `everything` empties both."""
    encoder: list = field(default_factory=list)
    prefix: list = field(default_factory=list)
    everything: bool = False


@dataclass
class Plan:
    """One step: ops in order. `logits_of`: the indices of the ops whose last logits the scheduler samples from
    (a prompt's last chunk, the decode); the runner returns them in that order."""
    ops: list = field(default_factory=list)
    logits_of: list = field(default_factory=list)

    def add(self, op, logits: bool = False):
        if logits:
            self.logits_of.append(len(self.ops))
        self.ops.append(op)

    def __bool__(self):
        return bool(self.ops)


STOP = "stop"  # what rank 0 sends the other ranks at the end, instead of a Plan
