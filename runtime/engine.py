"""The runtime, top-down: one request from image bytes to streamed text.

    Engine(bundle)                    load + validate the bundle, the backend, tokenizer, KV cache
      .generate([Request(...)])       hands the requests to the scheduler (scheduler.py), which
         load_image -> preprocess       Pillow, bit-identical to torchvision  (preprocess.py)
         tokenizer.build_inputs         [bos, image slots..., prompt ids], token types, position ids
         admits each into a free row of the B-row KV cache, then step by step:
         image_embeddings               the `vision` graph
         prefill_image                  bos + the image section + the first text chunk, one call
         extend                         the rest of the text, in chunks of C tokens (`extend_<C>_<T>`)
         decode                         one token for every running row (`decode_<T>`)
         Sampler, StreamDecoder         next token per row; ids -> text pieces, never broken UTF-8
The raw graph calls (image_embeddings, prefill_image, extend, prefill, decode) are public so other
implementations can be compared against the bundle.
"""
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from .backends import open_backend
from .bundle import Bundle
from .encoder_cache import ENCODER_SHARE, PREFIX_SHARE, ByteLRU, budget_bytes
from .errors import UserError
from .kv_cache import KVCache, affordable_buckets
from .preprocess import batch_pixels
from .request import Request, Result  # noqa: F401  (the public API: engine.Request, engine.Result)
from .scheduler import Scheduler
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Accumulated time inside graph calls vs the whole decode loop (host overhead = the rest)."""
    graph_s: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    decode_loop_s: float = 0.0
    decode_steps: int = 0

    def add(self, kind, seconds):
        self.graph_s[kind] = self.graph_s.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1


def _msrun_rank(tp: int) -> int:
    """Join the communication group when launched by msrun; a tp > 1 bundle needs that."""
    if tp == 1:
        return 0
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        raise UserError(f"this bundle is split over {tp} ranks: run it under msrun "
                        f"(`cogvlm2-lite run` launches it for you).")
    from mindspore.communication import get_group_size, get_rank, init

    from .mindspore_backend import use_device
    use_device("CPU", mode=None)
    init()
    if get_group_size() != tp:
        raise UserError(f"this bundle has {tp} ranks but msrun started {get_group_size()} processes.")
    return get_rank()


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


class Engine:
    """A loaded bundle: its backend, tokenizer, KV cache of B rows and the scheduler over them.

    bundle: a bundle folder or Bundle; backend: auto | mindspore | onnxruntime | lite (backends.py);
    verify: hash every file, weights included, before loading; prefix_cache: in `generate`, a request
    that extends what a free row last held (multi-turn chat) reuses those K/V instead of recomputing,
    and an image seen before brings its cached embeddings and image prefix (encoder_cache.py);
    encoder_cache_mb, prefix_cache_mb: the bounds of those two caches in MiB (0: off; None: a share of
    the memory free once loaded, `encoder_cache.ENCODER_SHARE` and `PREFIX_SHARE`).
    Raises UserError for a bundle that cannot run here (damaged, wrong format, missing backend,
    a tensor-parallel bundle outside msrun).
    """

    def __init__(self, bundle, backend: str = "auto", verify: bool = False, prefix_cache: bool = True,
                 encoder_cache_mb: float | None = None, prefix_cache_mb: float | None = None, **backend_options):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        m = self.bundle.manifest
        self.rank = _msrun_rank(self.bundle.tp)
        self.backend = open_backend(self.bundle, backend, self.rank, **backend_options)
        self.tokenizer = Tokenizer(self.bundle.tokenizer_path)
        self.batch = self.bundle.batch
        self.n_image = m["num_image_tokens"]
        self.template = m["template"]
        self.stop_ids = tuple(m["tokenizer"]["stop_ids"])
        self.pre = m["preprocess"]
        self.vocab_size = m["model"]["vocab_size"]
        self.chunks = sorted(self.bundle.buckets["chunk"])
        kv = m["kv_cache"]
        shape = (kv["layers"], self.batch, kv["kv_heads"], kv["head_dim"])
        buckets = self.bundle.buckets["decode"]
        free = psutil.virtual_memory().available
        fits = affordable_buckets(buckets, KVCache.slot_bytes(*shape, kv["dtype"]), free)
        if len(fits) < len(buckets):
            log.warning(f"the KV cache is sized to the memory free after loading: decode buckets {fits} of {buckets}, "
                        f"so prompts and answers together hold at most {max(fits)} tokens.")
        self.cache = KVCache(*shape, fits, kv["dtype"])
        self.image_prefix_bytes = KVCache.slot_bytes(kv["layers"], 1, kv["kv_heads"], kv["head_dim"], kv["dtype"]) \
            * (self.n_image + 1)
        # what the caches' default shares apply to: the memory left after the KV cache; with tp > 1 every rank must
        # evict alike (the scheduler's decisions agree without messages), so a figure all ranks compute alike
        if self.bundle.tp == 1:
            free = max(free - self.cache.nbytes, 0)
        else:
            free = psutil.virtual_memory().total // (2 * self.bundle.tp)
        self.encoder_cache = ByteLRU(budget_bytes(encoder_cache_mb, ENCODER_SHARE, free))
        self.image_prefixes = ByteLRU(budget_bytes(prefix_cache_mb, PREFIX_SHARE, free))
        self.timings = Timings()
        self.scheduler = Scheduler(self, prefix_cache=prefix_cache, encoder_cache=prefix_cache)

    def generate(self, requests: list, on_text=None) -> list[Result]:
        """Run any number of requests through the scheduler (B rows in flight) -> their Results, in
        order. on_text(i, piece) streams request i's text as it is decoded. Raises UserError for a
        request that cannot run (bad image, prompt longer than the cache) before any of them runs."""
        return self.scheduler.run(requests, on_text)

    def prompt(self, request: Request) -> tuple[list, list]:
        """A request's prompt -> (token ids, token types): bos, the image slots when it has an image,
        the templated text. Raises UserError when it is longer than the cache (the largest decode bucket)."""
        ids, types = self.tokenizer.build_inputs(request.prompt, request.history, request.template or self.template,
                                                 self.n_image if request.image is not None else 0)
        if len(ids) > self.cache.max_len:
            raise UserError(f"the prompt is {len(ids)} tokens long, more than this bundle's cache holds "
                            f"({self.cache.max_len}, its largest decode bucket): shorten it or export with larger "
                            "--buckets.")
        return ids, types

    def clear_prefix_cache(self):
        """Forget what the rows hold, the cached image embeddings and image prefixes: the next requests are
        computed from their first token."""
        self.cache.held[:] = [None] * self.batch
        self.encoder_cache.clear()
        self.image_prefixes.clear()

    @property
    def image_caches(self) -> dict:
        """The image caches by name (what /metrics and bench count)."""
        return {"encoder": self.encoder_cache, "image_prefix": self.image_prefixes}

    def image_prefix(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the K/V of row `row`'s bos and image section (its first n_image + 1 slots), each
        [L, 1, KV, n_image + 1, D]: what `load_prefix` writes into another row."""
        return self.cache.read(row, self.n_image + 1)

    def load_prefix(self, row: int, k: np.ndarray, v: np.ndarray):
        """Row `row` starts over holding K/V [L, 1, KV, n, D] in its first n slots (as a prefill wrote them)."""
        self.cache.lengths[row] = 0
        self.cache.reserve(k.shape[3])
        self.cache.write(row, k, v, k.shape[3])

    # --- raw graph calls ----------------------------------------------------------------
    def _run(self, kind, name, inputs):
        t = time.perf_counter()
        out = self.backend.run(name, inputs)
        self.timings.add(kind, time.perf_counter() - t)
        return out

    def pixels(self, images) -> np.ndarray:
        """Images (path, bytes, PIL, or float32 [3, S, S] already preprocessed) -> float32 [N, 3, S, S].
        Raises UserError for a file that is not a readable image."""
        return batch_pixels(images, self.pre["image_size"], self.pre["mean"], self.pre["std"])

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
        tokens = np.full((1, n + c), self.tokenizer.pad_id, np.int32)
        tokens[0, 0] = self.tokenizer.bos_id
        tokens[0, n:m] = ids[n:m]
        pos = np.zeros((1, n + c), np.int32)
        pos[0, :m] = positions[:m]
        inputs = [tokens, np.ascontiguousarray(image_embeds[None]), pos, np.array([m], np.int32)]
        logits, k, v = self._run("prefill", f"prefill_image_{c}", inputs)
        self.cache.write(row, k, v, m)
        return logits[0], m

    def chunk_plan(self, remaining: int) -> tuple:
        """The prefill chunks for `remaining` tokens (padding only in the last): see `chunk_plan`."""
        return chunk_plan(remaining, tuple(self.chunks), CALL_OVERHEAD_CHUNKS * self.chunks[0])

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
        tokens = np.full((1, c), self.tokenizer.pad_id, np.int32)
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
