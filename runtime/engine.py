"""The runtime, top-down: one request from image bytes to streamed text.

    Engine(bundle)                    the front: loads the bundle, tokenizer, runner and scheduler
      .generate([Request(...)])       or .add(...) + .step() (the server's and batch's loop):
         prepare                        in the caller's thread, once: Pillow preprocessing, bit-identical to
                                        torchvision (preprocess.py); [bos, image slots..., prompt ids], token types,
                                        RoPE positions (tokenizer.py); the pixels' digest (encoder_cache.py)
         step: scheduler.schedule()     what runs now (scheduler.py): admissions into free rows of the B-row KV
                                        cache, prefill chunks, decode rows, cache reuse -> a Plan (plan.py)
               runner.execute(plan)     the graph calls (runner.py): `vision`, `prefill_image_<C>` (bos + the image
                                        section + the first text chunk), `extend_<C>_<T>`, `decode_<T>`
               scheduler.update(logits) Sampler, StreamDecoder: next token per row; ids -> text pieces, never
                                        broken UTF-8; stop strings; a finished row is freed at once

Calls go one way: front -> scheduler (decides) and runner (executes) -> backends. Under tensor parallelism
(msrun) rank 0 is the front and the scheduler and sends each step's plan to every rank (tp_channel.py); the
other ranks only execute plans (`follow`). The raw graph calls (image_embeddings, prefill_image, extend,
prefill, decode) are the runner's, exposed here so other implementations can be compared against the bundle.
"""
import functools
import os
import time

import numpy as np

from .bundle import Bundle
from .encoder_cache import ENCODER_SHARE, PREFIX_SHARE, budget_bytes, pixel_digest
from .errors import UserError
from .kv_cache import KVCache
from .plan import STOP, Plan
from .preprocess import batch_pixels
from .request import Prepared, Request, Result  # noqa: F401  (the public API: engine.Request, engine.Result)
from .runner import CALL_OVERHEAD_CHUNKS, Runner
from .scheduler import Limits, Scheduler, Sequence
from .tokenizer import Tokenizer, position_ids


@functools.lru_cache(maxsize=1)
def join_ranks(tp: int) -> int:
    """Join the communication group when launched by msrun (once per process; a tp > 1 bundle needs it) -> this
    process's rank. Raises UserError outside msrun or with another number of processes."""
    if tp == 1:
        return 0
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        raise UserError(f"this bundle is split over {tp} ranks: run it under msrun "
                        f"(`cogvlm2-lite run` and `serve` launch it for you).")
    from mindspore.communication import get_group_size, get_rank, init

    from .mindspore_backend import use_device
    use_device("CPU", mode=None)
    init()
    if get_group_size() != tp:
        raise UserError(f"this bundle has {tp} ranks but msrun started {get_group_size()} processes.")
    return get_rank()


class Engine:
    """A loaded bundle: the front over its runner (backend, KV cache of B rows) and its one scheduler.

    bundle: a bundle folder or Bundle; backend: auto | mindspore | onnxruntime | lite (backends.py);
    verify: hash every file, weights included, before loading; prefix_cache: a request that extends what a
    free row last held (multi-turn chat) reuses those K/V instead of recomputing, and an image seen before
    brings its cached embeddings and image prefix (encoder_cache.py); False: every request is computed from
    nothing (references, benchmarks); encoder_cache_mb, prefix_cache_mb: the
    bounds of those two caches in MiB (0: off; None: a share of the memory free once loaded,
    `encoder_cache.ENCODER_SHARE` and `PREFIX_SHARE`). Raises UserError for a bundle that cannot run here
    (damaged, wrong format, missing backend, a tensor-parallel bundle outside msrun).
    """

    def __init__(self, bundle, backend: str = "auto", verify: bool = False, prefix_cache: bool = True,
                 encoder_cache_mb: float | None = None, prefix_cache_mb: float | None = None, **backend_options):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        m = self.bundle.manifest
        self.rank = join_ranks(self.bundle.tp)
        self.tokenizer = Tokenizer(self.bundle.tokenizer_path)
        self.runner = Runner(self.bundle, backend, self.rank, self.tokenizer, **backend_options)
        self.channel = None
        if self.bundle.tp > 1:
            from .tp_channel import PlanChannel
            self.channel = PlanChannel(self.rank)
        self.batch = self.bundle.batch
        self.n_image = m["num_image_tokens"]
        self.template = m["template"]
        self.stop_ids = tuple(m["tokenizer"]["stop_ids"])
        self.pre = m["preprocess"]
        self.vocab_size = m["model"]["vocab_size"]
        self.chunks = sorted(self.bundle.buckets["chunk"])
        kv = m["kv_cache"]
        cache = self.runner.cache
        limits = Limits(self.batch, tuple(self.chunks), tuple(cache.buckets), self.n_image,
                        embed_bytes=self.n_image * m["model"]["hidden_size"] * 4,
                        prefix_bytes=KVCache.slot_bytes(kv["layers"], 1, kv["kv_heads"], kv["head_dim"], kv["dtype"])
                        * (self.n_image + 1),
                        overhead=CALL_OVERHEAD_CHUNKS * self.chunks[0])
        free = max(self.runner.free_after_load - cache.nbytes, 0)   # what the caches' default shares apply to
        self.scheduler = Scheduler(limits, self.tokenizer, self.stop_ids,
                                   budget_bytes(encoder_cache_mb, ENCODER_SHARE, free),
                                   budget_bytes(prefix_cache_mb, PREFIX_SHARE, free),
                                   prefix_cache=prefix_cache, encoder_cache=prefix_cache)

    # --- the front: requests in, results and text out -------------------------------------------------
    def prepare(self, request: Request) -> Prepared:
        """Tokenize and preprocess a request, once, in the caller's thread. Raises UserError for a bad image or a
        prompt longer than the cache."""
        ids, types = self.prompt(request)
        if request.image is None:
            return Prepared(request, ids, position_ids(types))
        pixels = self.pixels([request.image])[0]
        return Prepared(request, ids, position_ids(types), pixels, pixel_digest(pixels))

    def add(self, request: Request | Prepared, on_text=None, on_finish=None, parent: Sequence | None = None) -> Sequence:
        """Queue a request for the next steps -> its Sequence (cancel() it, read result() when done). on_text(piece)
        streams its text, on_finish(sequence) tells its end; parent: another choice of the same prompt (OpenAI's
        `n`), whose prefill it shares. Raises UserError as `prepare` does."""
        prepared = request if isinstance(request, Prepared) else self.prepare(request)
        return self.scheduler.add(prepared, on_text, on_finish, parent)

    def step(self):
        """One step: the scheduler's plan, run by every rank's runner, then sampled."""
        plan = self.scheduler.schedule()
        self.scheduler.update(self._execute(plan) if plan else [])

    def _execute(self, plan: Plan) -> list:
        if self.channel is not None:
            t = time.perf_counter()
            self.channel.send(plan)
            self.runner.timings.plan_broadcast_s += time.perf_counter() - t
            self.runner.timings.plans_sent += 1
        return self.runner.execute(plan)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def generate(self, requests: list, on_text=None) -> list[Result]:
        """Run any number of requests (B rows in flight) -> their Results, in order. on_text(i, piece) streams
        request i's text as it is decoded. Raises UserError for a request that cannot run (bad image, prompt longer
        than the cache) before any of them runs."""
        prepared = [self.prepare(r) for r in requests]   # all or none
        seqs = [self.add(p, on_text=(lambda piece, i=i: on_text(i, piece)) if on_text else None)
                for i, p in enumerate(prepared)]
        while not all(s.done for s in seqs):
            self.step()
        return [s.result() for s in seqs]

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

    def pixels(self, images) -> np.ndarray:
        """Images (path, bytes, PIL, or float32 [3, S, S] already preprocessed) -> float32 [N, 3, S, S].
        Raises UserError for a file that is not a readable image."""
        return batch_pixels(images, self.pre["image_size"], self.pre["mean"], self.pre["std"])

    def clear_prefix_cache(self):
        """Forget what the rows hold, the cached image embeddings and image prefixes: the next requests are
        computed from their first token."""
        self._execute(Plan([self.scheduler.clear()]))

    @property
    def image_caches(self) -> dict:
        """The image caches' indexes by name (what /metrics and bench count: hits, misses, bytes)."""
        return {"encoder": self.encoder_cache, "image_prefix": self.image_prefixes}

    @property
    def encoder_cache(self):
        """The encoder cache's index (encoder_cache.ByteLRU of sizes; the runner holds the embeddings)."""
        return self.scheduler.encoder_index

    @property
    def image_prefixes(self):
        """The image-prefix cache's index (the runner holds the K/V)."""
        return self.scheduler.prefix_index

    # --- tensor parallel: the other ranks ------------------------------------------------------------
    def follow(self):
        """A rank other than 0: execute rank 0's plans until it says stop."""
        while (plan := self.channel.receive()) != STOP:
            self.runner.execute(plan)

    def close(self):
        """Rank 0 of a tensor-parallel run: tell the other ranks to stop following."""
        if self.channel is not None and self.rank == 0:
            self.channel.send(STOP)
            self.channel = None

    # --- bundle facts and the runner's raw graph calls --------------------------------------------------
    def __getattr__(self, name):
        """cache, backend, timings and the raw graph calls (image_embeddings, prefill_image, extend_chunk, extend,
        prefill, decode, chunk_plan): the runner's, for tp 1 (or when every rank calls them alike)."""
        if name in _RUNNER_API and "runner" in self.__dict__:
            return getattr(self.runner, name)
        if name in _RUNNER_WRITES and "runner" in self.__dict__:
            call = getattr(self.runner, name)

            def write(*args, **kwargs):   # the rows' K/V change behind the scheduler: it forgets what they held
                self.scheduler.held = [None] * self.batch
                return call(*args, **kwargs)
            return write
        raise AttributeError(f"'Engine' object has no attribute '{name}'")


_RUNNER_API = {"cache", "backend", "timings", "image_embeddings", "chunk_plan"}
_RUNNER_WRITES = {"prefill_image", "extend_chunk", "extend", "prefill", "decode"}
