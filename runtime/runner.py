"""The runner: the backend, the KV cache and the cached image tensors of one rank, and the graph calls on them.

It executes plans (plan.py) op by op and decides nothing: which rows, tokens, images and cache entries a step
touches is the scheduler's choice; how a run of tokens is cut into the bundle's chunk graphs is the only thing it
works out (`chunk_plan`, from the graph shapes). Under tensor parallelism every rank has a runner holding its
own KV heads and executes the same plans; the graphs' collectives join the ranks.

The raw graph calls (image_embeddings, prefill_image, extend, prefill, decode) are public, so other
implementations can be compared against the bundle (Engine exposes them).
"""
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from .backends import open_backend
from .errors import UserError
from .kv_cache import KVCache, affordable_buckets
from .plan import CopyRow, Decode, Evict, Extend, LoadPrefix, Plan, PrefillImage, Vision

log = logging.getLogger(__name__)

# A graph call costs about its chunk plus a fixed part, as it reads every weight once: on the bench preset
# (onnxruntime, 2 cores) extend_16 took 106 ms and extend_64 206 ms, ~70 ms + 2.1 ms per token, i.e. the fixed
# part is worth ~33 tokens: two smallest chunks.
CALL_OVERHEAD_CHUNKS = 2


@functools.lru_cache(maxsize=4096)
def chunk_plan(n: int, chunks: tuple, overhead: int) -> tuple:
    """Chunk sizes that cover n tokens at the least cost, a call costing its chunk + `overhead` tokens
    (padding only in the last chunk): e.g. chunks (16, 64, 256), overhead 32: 52 -> (64,),
    128 -> (64, 64), 200 -> (256,), 300 -> (64, 256)."""
    cost, first = [0] * (n + 1), [0] * (n + 1)
    for r in range(1, n + 1):
        cost[r], first[r] = min((c + overhead + cost[max(r - c, 0)], c) for c in chunks)
    plan, r = [], n
    while r > 0:
        plan.append(first[r])
        r -= first[r]
    return tuple(plan)


@dataclass
class Timings:
    """Accumulated time inside graph calls vs the whole decode loop (host overhead = the rest); for tp > 1, rank
    0's time sending the steps' plans to the other ranks (runtime/tp_channel.py)."""
    graph_s: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    decode_loop_s: float = 0.0
    decode_steps: int = 0
    plan_broadcast_s: float = 0.0
    plans_sent: int = 0

    def add(self, kind, seconds):
        self.graph_s[kind] = self.graph_s.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1


class Runner:
    """One rank's backend, B-row KV cache and cached image tensors. bundle: a loaded Bundle; tokenizer: its
    Tokenizer (bos and pad ids). Raises UserError for a bundle its backend cannot run."""

    def __init__(self, bundle, backend: str, rank: int, tokenizer, **backend_options):
        m = bundle.manifest
        self.backend = open_backend(bundle, backend, rank, **backend_options)
        self.bos_id, self.pad_id = tokenizer.bos_id, tokenizer.pad_id
        self.batch = bundle.batch
        self.n_image = m["num_image_tokens"]
        self.vocab_size = m["model"]["vocab_size"]
        self.chunks = sorted(bundle.buckets["chunk"])
        kv = m["kv_cache"]
        shape = (kv["layers"], self.batch, kv["kv_heads"], kv["head_dim"])
        buckets = bundle.buckets["decode"]
        self.free_after_load = psutil.virtual_memory().available
        fits = affordable_buckets(buckets, KVCache.slot_bytes(*shape, kv["dtype"]), self.free_after_load)
        if len(fits) < len(buckets):
            log.warning(f"the KV cache is sized to the memory free after loading: decode buckets {fits} of {buckets}, "
                        f"so prompts and answers together hold at most {max(fits)} tokens.")
        self.cache = KVCache(*shape, fits, kv["dtype"])
        self.embeddings: dict = {}   # digest -> [n_image, hidden]: the encoder cache's tensors
        self.prefixes: dict = {}     # digest -> (K, V) [L, 1, KV, n_image + 1, D]: cached image prefixes
        self._transient: set = set()  # embeddings kept only for this step's image prefill
        self.timings = Timings()

    # --- plans ---------------------------------------------------------------------------------
    def execute(self, plan: Plan) -> list:
        """Run a step's ops in order -> the logits the plan asks for ([V] per prompt end, [B, V] for a decode)."""
        out = []
        for i, op in enumerate(plan.ops):
            logits = self._op(op)
            if i in plan.logits_of:
                out.append(logits)
        return out

    def _op(self, op):
        if isinstance(op, Decode):
            t = time.perf_counter()
            self.cache.fit(op.needed)
            logits = self.decode(op.tokens, op.positions, op.rows)
            self.timings.decode_steps += 1
            self.timings.decode_loop_s += time.perf_counter() - t
            return logits
        if isinstance(op, Extend):
            self.cache.lengths[op.row] = op.start
            return self.extend(op.row, op.ids, op.positions)
        if isinstance(op, Vision):
            self.embeddings[op.digest] = self.image_embeddings(op.pixels[None])[0]
            if not op.keep:
                self._transient.add(op.digest)
            return None
        if isinstance(op, PrefillImage):
            embeds = self.embeddings[op.digest]
            if op.digest in self._transient:
                self._transient.discard(op.digest)
                del self.embeddings[op.digest]
            logits, m = self.prefill_image(op.row, embeds, op.ids, op.positions)
            assert m == op.tokens, (m, op.tokens)   # the scheduler's count of the first chunk is the graph's
            if op.keep_prefix:
                self.prefixes[op.digest] = self.cache.read(op.row, self.n_image + 1)
            return logits
        if isinstance(op, LoadPrefix):
            k, v = self.prefixes[op.digest]
            self.cache.lengths[op.row] = 0
            self.cache.reserve(k.shape[3])
            self.cache.write(op.row, k, v, k.shape[3])
            return None
        if isinstance(op, CopyRow):
            self.cache.copy_row(op.src, op.dst, op.n)
            return None
        if isinstance(op, Evict):
            if op.everything:
                self.embeddings.clear()
                self.prefixes.clear()
            for d in op.encoder:
                self.embeddings.pop(d, None)
            for d in op.prefix:
                self.prefixes.pop(d, None)
            return None
        raise TypeError(f"not a plan op: {op!r}")

    # --- raw graph calls ----------------------------------------------------------------------
    def _run(self, kind, name, inputs):
        t = time.perf_counter()
        out = self.backend.run(name, inputs)
        self.timings.add(kind, time.perf_counter() - t)
        return out

    def chunk_plan(self, remaining: int) -> tuple:
        """The prefill chunks for `remaining` tokens (padding only in the last): see `chunk_plan`."""
        return chunk_plan(remaining, tuple(self.chunks), CALL_OVERHEAD_CHUNKS * self.chunks[0])

    def image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> [N, num_image_tokens, hidden] (boi, patches, eoi), one image per call."""
        return np.concatenate([self._run("vision", "vision", [np.ascontiguousarray(p[None], np.float32)])[0]
                               for p in pixel_values])

    def prefill_image(self, row: int, image_embeds: np.ndarray, ids, positions) -> tuple[np.ndarray, int]:
        """Row `row` starts over with the first chunk of an image prompt: bos, the image section
        (image_embeds [n_image, hidden]) and the first text tokens of `ids` (RoPE `positions`), in one
        `prefill_image_<C>` call -> (logits [V] of the last token fed, tokens fed)."""
        n = self.n_image + 1
        text = len(ids) - n
        c = self.chunk_plan(text)[0] if text > 0 else self.chunks[0]
        m = n + min(c, max(text, 0))
        self.cache.lengths[row] = 0
        self.cache.reserve(m)
        tokens = np.full((1, n + c), self.pad_id, np.int32)
        tokens[0, 0] = self.bos_id
        tokens[0, n:m] = ids[n:m]
        pos = np.zeros((1, n + c), np.int32)
        pos[0, :m] = positions[:m]
        inputs = [tokens, np.ascontiguousarray(image_embeds[None]), pos, np.array([m], np.int32)]
        logits, k, v = self._run("prefill", f"prefill_image_{c}", inputs)
        self.cache.write(row, k, v, m)
        return logits[0], m

    def extend_chunk(self, row: int, ids, positions) -> tuple[np.ndarray, int]:
        """Feed the first chunk of `ids` (RoPE `positions`) to row `row` after its filled slots ->
        (logits [V] of the last token fed, tokens fed). Raises UserError when the cache is full."""
        start = int(self.cache.lengths[row])
        c = self.chunk_plan(len(ids))[0]
        if not self.cache.reserve(start + min(c, len(ids))):
            raise UserError(f"the conversation needs {start + len(ids)} cache slots, more than this bundle's largest "
                            f"decode bucket ({self.cache.max_len}): shorten it or export with larger --buckets.")
        c = min(c, max(x for x in self.chunks if x <= self.cache.bucket))  # a small bucket has only the chunks it holds
        m = min(c, len(ids))
        tokens = np.full((1, c), self.pad_id, np.int32)
        pos = np.zeros((1, c), np.int32)
        tokens[0, :m] = ids[:m]
        pos[0, :m] = positions[:m]
        kc, vc = self.cache.row_views(row)
        inputs = [tokens, pos, self.cache.lengths[row:row + 1].copy(), np.array([m], np.int32), *kc, *vc]
        logits, k, v = self._run("prefill", f"extend_{c}_{self.cache.bucket}", inputs)
        self.cache.write(row, k, v, m)
        return logits[0], m

    def extend(self, row: int, ids, positions) -> np.ndarray:
        """Feed all of `ids` to row `row`, chunk by chunk -> logits [V] of the last one."""
        done = 0
        logits = None
        while done < len(ids):
            logits, m = self.extend_chunk(row, ids[done:], positions[done:])
            done += m
        return logits

    def prefill(self, input_ids: list, image_embeds=None, positions: list | None = None) -> np.ndarray:
        """Rows of token ids (bos and the image slots first when image_embeds [N, n_image, hidden] is
        given) -> last-token logits [B, V]; row r of the cache then holds exactly row r's K/V."""
        if len(input_ids) > self.batch:
            raise UserError(f"this bundle has {self.batch} rows, got {len(input_ids)} prompts.")
        if image_embeds is not None and (len(image_embeds) < len(input_ids)
                                         or any(len(ids) <= self.n_image for ids in input_ids)):
            raise UserError(f"with image embeddings each row of ids starts with bos and {self.n_image} image slots "
                            "(tokenizer.build_inputs(..., n_image_tokens=engine.n_image)), one embedding per row.")
        out = np.zeros((self.batch, self.vocab_size), np.float32)
        for r, ids in enumerate(input_ids):
            pos = positions[r] if positions is not None else list(range(len(ids)))
            self.cache.lengths[r] = 0
            start = 0
            if image_embeds is not None:
                out[r], start = self.prefill_image(r, image_embeds[r], ids, pos)
            if start < len(ids):
                out[r] = self.extend(r, ids[start:], pos[start:])
        return out

    def decode(self, tokens, positions, rows=None) -> np.ndarray | None:
        """One token per row at the given RoPE positions -> logits [B, V]; K/V appended for `rows`
        (default all). None when the cache has no room left (the largest decode bucket is full)."""
        live = range(self.batch) if rows is None else rows
        if not self.cache.reserve(max(int(self.cache.lengths[r]) for r in live) + 1):
            return None
        kc, vc = self.cache.views()
        inputs = [np.asarray(tokens, np.int32).reshape(self.batch, 1), np.asarray(positions, np.int32),
                  self.cache.lengths.copy()]
        inputs += list(kc) + list(vc)
        logits, k_new, v_new = self._run("decode", f"decode_{self.cache.bucket}", inputs)
        self.cache.append(k_new, v_new, rows)
        return logits
