"""The KV cache: one preallocated buffer per K and V, reused across requests.

Decode and extend graphs come in cache-length buckets T and take per-layer caches [B, KV, T, D]
(decode, all B rows) or [1, KV, T, D] (extend, one row). The buffer is laid out for the current
bucket ([L, B, KV, T, D] over its first elements), so every per-layer view handed to a graph, of
all rows or of one, is contiguous (passed without a copy) and a step only reads T slots. Moving
to another bucket re-lays the filled slots in place, once per bucket crossing.

Row b holds `lengths[b]` valid slots; a graph masks every slot at or after it, so whatever an
earlier request left beyond that point is never read.
"""
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name, a manifest's dtype for bf16 bundles)
import numpy as np

from .errors import UserError

CACHE_SHARE = 0.5  # the cache may take this share of the memory free after loading; the rest is for activations


def affordable_buckets(buckets: list[int], slot_bytes: int, free_bytes: int) -> list[int]:
    """The decode buckets whose cache (`slot_bytes` per slot: K and V of every layer and row) fits
    in CACHE_SHARE of `free_bytes`, the memory free once the weights are loaded: the largest ones
    are dropped, which shortens the longest prompt rather than failing later in a graph. Raises
    UserError when not even the smallest fits."""
    fits = [t for t in sorted(buckets) if t * slot_bytes <= CACHE_SHARE * free_bytes]
    if not fits:
        t = min(buckets)
        raise UserError(f"the KV cache of the smallest decode bucket ({t} slots, {t * slot_bytes / 2**30:.1f} GiB) "
                        f"does not fit in the {free_bytes / 2**30:.1f} GiB of memory free after loading the weights: "
                        "free memory, or export with a smaller --batch or smaller --buckets.")
    return fits


class KVCache:
    """K and V of every layer for `batch` rows of up to max(buckets) slots, in the manifest's `dtype`
    (a numpy dtype name). `bucket` is the current cache length T the views are laid out for."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, buckets: list[int], dtype: str):
        self.layers, self.batch, self.kv_heads, self.head_dim = layers, batch, kv_heads, head_dim
        self.buckets = sorted(buckets)
        n = layers * batch * kv_heads * self.buckets[-1] * head_dim
        self._k = np.zeros(n, dtype)
        self._v = np.zeros(n, dtype)
        self.bucket = self.buckets[0]
        self.lengths = np.zeros(batch, np.int32)   # filled slots per row

    def materialize(self, value: float = 0.01):
        """Write `value` into every slot. np.zeros leaves the buffers' pages unmapped until first written, and
        until then every read of them is of the kernel's one shared zero page, always in cache: a benchmark
        that sets `lengths` without a prefill must call this, or a step at depth reads no memory for its cache."""
        self._k.fill(value)
        self._v.fill(value)

    @staticmethod
    def slot_bytes(layers: int, batch: int, kv_heads: int, head_dim: int, dtype: str) -> int:
        """Bytes of one cache slot: K and V of every layer, row and KV head."""
        return 2 * layers * batch * kv_heads * head_dim * np.dtype(dtype).itemsize

    @property
    def max_len(self) -> int:
        """Slots per row in the largest bucket: the longest sequence the cache holds."""
        return self.buckets[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V buffers."""
        return self._k.nbytes + self._v.nbytes

    def _view(self, buf, t):
        return buf[:self.layers * self.batch * self.kv_heads * t * self.head_dim].reshape(
            self.layers, self.batch, self.kv_heads, t, self.head_dim)

    def views(self) -> tuple[np.ndarray, np.ndarray]:
        """K and V as [L, B, KV, T, D] for the current bucket T (contiguous per layer)."""
        return self._view(self._k, self.bucket), self._view(self._v, self.bucket)

    def fit(self, needed: int) -> bool:
        """Switch to the smallest bucket holding `needed` slots (larger or smaller than the current
        one; rows longer than a smaller bucket keep its first slots); False when none can."""
        if needed > self.max_len:
            return False
        target = next(t for t in self.buckets if t >= needed)
        if target != self.bucket:
            self._relayout(target)
        return True

    def reserve(self, needed: int) -> bool:
        """Grow (never shrink) the current bucket to hold `needed` slots; False when none can."""
        return self.fit(max(needed, self.bucket))

    def _relayout(self, target):
        rows = self.layers * self.batch * self.kv_heads
        keep = min(self.bucket, target) * self.head_dim
        for buf in (self._k, self._v):
            old = buf[:rows * self.bucket * self.head_dim].reshape(rows, -1)
            new = buf[:rows * target * self.head_dim].reshape(rows, -1)
            order = range(rows - 1, -1, -1) if target > self.bucket else range(rows)  # never overwrite unread rows
            for r in order:
                new[r, :keep] = old[r, :keep].copy()
        self.bucket = target
        np.minimum(self.lengths, target, out=self.lengths)

    def row_views(self, row: int) -> tuple[list, list]:
        """Per-layer K and V of one row, each [1, KV, T, D] and contiguous (an extend graph's inputs)."""
        kc, vc = self.views()
        return [kc[i, row:row + 1] for i in range(self.layers)], [vc[i, row:row + 1] for i in range(self.layers)]

    def read(self, row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the first n slots of one row's K and V, each [L, 1, KV, n, D] (what `write` takes)."""
        kc, vc = self.views()
        return kc[:, row:row + 1, :, :n].copy(), vc[:, row:row + 1, :, :n].copy()

    def write(self, row: int, k, v, n: int):
        """Store the first n slots of one row's new K/V [L, 1, KV, C, D] after its filled slots."""
        kc, vc = self.views()
        i = int(self.lengths[row])
        kc[:, row, :, i:i + n] = k[:, 0, :, :n]
        vc[:, row, :, i:i + n] = v[:, 0, :, :n]
        self.lengths[row] = i + n

    def copy_row(self, src: int, dst: int, n: int):
        """Row `dst` starts over with the first n slots of row `src` (choices of one prompt share its prefill)."""
        kc, vc = self.views()
        kc[:, dst, :, :n] = kc[:, src, :, :n]
        vc[:, dst, :, :n] = vc[:, src, :, :n]
        self.lengths[dst] = n

    def append(self, k_new, v_new, rows=None):
        """Store one decode step's K/V [L, B, KV, 1, D] at each row's next slot and advance it."""
        kc, vc = self.views()
        for b in (range(self.batch) if rows is None else rows):
            i = self.lengths[b]
            kc[:, b, :, i] = k_new[:, b, :, 0]
            vc[:, b, :, i] = v_new[:, b, :, 0]
            self.lengths[b] += 1
