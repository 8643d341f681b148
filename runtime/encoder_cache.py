"""What an image costs, kept for its next question: the encoder cache and the image-prefix cache.

An image is paid for twice: the `vision` graph turns its pixels into embeddings (at full size, 800 s
on 2 cores), then the image prefill writes the K/V of `bos + image section` (240 s). Both depend on
the preprocessed pixels alone, so both are kept under the pixels' digest (`pixel_digest`):

  - the encoder cache: the vision graph's output, [num_image_tokens, hidden] (38 MB at full size, fp32);
  - image prefixes: the K/V of the first num_image_tokens + 1 slots, [L, 1, KV, n, D] each, as the
    image prefill wrote them (605 MB at full size, fp32). Copied into any free row, they let a new
    conversation about a known image prefill only its text. A tensor-parallel rank holds its own
    KV heads: each rank keeps its own slice.

Each is a `ByteLRU`: bounded in bytes, least recently used evicted first. Pixels, not object
identity, are compared: the same picture as a path, bytes, a PIL image or an ndarray is one entry, and
an edited PIL image is another. The scheduler keeps their index (what is cached, by size: a ByteLRU of
sizes) and decides when to read, fill and evict them (scheduler.py); the runner holds the tensors of its rank
and copies K/V in and out of its rows as the plans say (runner.py).
"""
import hashlib
from collections import OrderedDict

import numpy as np

# By default the caches may take these shares of the memory left once the weights and the KV cache are in.
# Per byte the encoder cache saves the most (vision is ~3/4 of an image's cost, in 1/16 of the bytes).
ENCODER_SHARE = 0.10
PREFIX_SHARE = 0.25


def pixel_digest(pixels: np.ndarray) -> bytes:
    """The caches' key: BLAKE2b-128 of the preprocessed float32 pixels [3, S, S] (a collision between two
    images is impossible in practice: 2^-64 after 2^32 images)."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


def budget_bytes(mb: float | None, share: float, free_bytes: int) -> int:
    """A cache's bound: `mb` MiB when given (0: off), else `share` of the memory free once loaded."""
    return max(0, int(mb * 2**20 if mb is not None else share * free_bytes))


def _nbytes(value) -> int:
    if isinstance(value, int):   # an index entry: only its size
        return value
    return sum(a.nbytes for a in value) if isinstance(value, tuple) else value.nbytes


class ByteLRU:
    """Arrays (or tuples of arrays, or only their sizes in bytes: an index of what another holder keeps) by key,
    at most `capacity` bytes in all, the least recently used evicted first; capacity 0 keeps nothing. Counts hits, misses and evictions (for /metrics and bench: they grow
    monotonically, `clear` keeps them)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.evicted: list = []   # keys evicted since the holder last took them (the scheduler: into a plan)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` can be kept at all (no larger than the capacity)."""
        return nbytes <= self.capacity

    def get(self, key):
        """The value under `key`, now the most recently used (a hit), or None (a miss; a cache of capacity 0
        counts nothing)."""
        if not self.capacity:
            return None
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value) -> bool:
        """Keep `value` under `key`, evicting the least recently used entries to make room -> whether it was
        kept (not when larger than the whole capacity; nothing is evicted for it then)."""
        nbytes = _nbytes(value)
        if not self.fits(nbytes):
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        while self.bytes + nbytes > self.capacity:
            gone, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
            self.evictions += 1
            self.evicted.append(gone)
        self._entries[key] = value
        self.bytes += nbytes
        return True

    def clear(self):
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self),
                "bytes": self.bytes, "capacity_bytes": self.capacity}
