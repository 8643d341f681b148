"""In-flight batching over the B rows of the KV cache, with chunked prefill: what runs at each step.

The scheduler decides and never runs a graph: `schedule()` returns the step's Plan (plan.py), the runner
executes it (runner.py), and `update()` samples from the logits it returns. vLLM v1's loop at our size,
driven by the engine (engine.py). A request waits in a queue until a row is free; from then on every step:

  1. cancelled sequences end and free their rows;
  2. queued requests are admitted into free rows (the row whose previous request shares the
     longest prefix with this one, when the prefix cache is on: its K/V are reused); a request
     added with `parent` (another choice of the same prompt, OpenAI's `n`) waits until the parent's
     prompt is in its row, then starts from a copy of those K/V and the parent's last logits: the
     prompt is prefilled once for all choices;
  3. prefill: rows still reading their prompt feed it chunk by chunk (an image prompt's first
     chunk holds bos, the image section and the first text tokens; `runner.chunk_plan` gives
     the chunk sizes). An image seen before skips what is cached of it (encoder_cache.py): with
     its image prefix cached, the row is given a copy of those K/V and prefills only the text;
     else with its embeddings cached, the vision graph is not run. Policy: while other rows are
     decoding, one step prefills at most `step_tokens` prompt tokens (default: the largest
     chunk), so a long prompt delays each running stream by about one chunk's time per token
     instead of freezing it; with no row decoding, prompts are prefilled without a limit. A row
     that finishes its prompt samples its first token;
  4. decode: every row with a token to feed runs in one `decode_<T>` call, T the smallest bucket
     holding the longest occupied row, and samples its next token;
  5. a row is freed the moment its sequence ends (stop, length, context, cancel).

Rows never see each other's K/V: a graph reads only a row's own slots below its length, so what a
previous request left in a freed row is masked out. The scheduler keeps what each free row holds
(`held`) and the index of the image caches; the runner keeps the tensors. `lockstep=True` admits only
when every row is free (a batch runs until its longest member ends: what batching did before this
scheduler; kept for comparison in `bench`).

Tensor parallel: only rank 0 schedules; every rank's runner executes rank 0's plans (tp_channel.py).
"""
import contextlib
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .encoder_cache import ByteLRU
from .plan import CopyRow, Decode, Evict, Extend, LoadPrefix, Plan, PrefillImage, Vision
from .request import Prepared, Result
from .runner import chunk_plan
from .sampling import Sampler
from .stop_strings import StopStrings
from .structured import TokenMask
from .tokenizer import StreamDecoder

SEED_ENV = "COGVLM2_LITE_SEED"


@dataclass(eq=False)
class Sequence:
    """One request in flight: its prompt, where it is in the cache, what it has generated."""
    number: int                          # arrival order
    request: object
    ids: list                            # prompt token ids (bos, image slots, text)
    positions: list                      # RoPE position of each prompt id
    pixels: np.ndarray | None            # float32 [3, S, S] or None (text only)
    digest: bytes | None                 # identity of the pixels: prefixes are reused only for equal pixels
    sampler: Sampler
    stream: StreamDecoder
    stops: StopStrings                   # the request's stop strings over the decoded text
    on_text: object = None               # on_text(piece)
    on_finish: object = None             # on_finish(sequence)
    arrived: float = field(default_factory=time.perf_counter)
    row: int | None = None
    fed: int = 0                         # prompt tokens whose K/V are in the row (or planned to be)
    decoded: int = 0                     # generated tokens whose K/V are in the row (or planned to be)
    reused: int = 0                      # prompt tokens whose K/V came from a cache (a row's, an image prefix)
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token, when asked: (id, logprob, [(id, logprob), ...])
    pieces: list = field(default_factory=list)
    pending: int | None = None           # last sampled token, not yet fed
    next_pos: int = 0
    first_token_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    parent: "Sequence | None" = None     # another choice of the same prompt, whose prefill this one shares
    prompt_logits: np.ndarray | None = None  # logits [V] of the last prompt token, kept while children wait

    def cancel(self):
        """Ask the scheduler to end this request: its row is freed at the next step."""
        self.cancelled = True

    @property
    def slots(self) -> int:
        """The row's filled cache slots (once the current plan has run)."""
        return self.fed + self.decoded

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> Result:
        end = self.ended_at or time.perf_counter()
        return Result("".join(self.pieces), list(self.tokens), self.finish_reason, len(self.ids), len(self.tokens),
                      (self.first_token_at or end) - self.arrived, end - self.arrived, self.reused,
                      list(self.logprobs) if self.sampler.params.logprobs is not None else None)


@dataclass(frozen=True)
class Limits:
    """What the scheduler must know of the bundle and the runner's cache to plan (runner.py)."""
    batch: int
    chunks: tuple            # prefill chunk sizes, ascending
    buckets: tuple           # the KV cache's lengths, ascending (max: the longest sequence)
    n_image: int             # image slots after bos
    embed_bytes: int         # one image's embeddings
    prefix_bytes: int        # one image prefix's K/V (this rank's)
    overhead: int            # a graph call's fixed cost in tokens (runner.CALL_OVERHEAD_CHUNKS x smallest chunk)

    @property
    def max_len(self) -> int:
        return self.buckets[-1]


class Scheduler:
    """The step planner over B rows (see the module docstring for the policy).

    tokenizer: for the streamed text and schema masks; stop_ids: the model's; encoder_bytes, prefix_bytes: the
    bounds of the encoder and image-prefix caches. prefix_cache: reuse K/V, a free row's and the cached image
    prefixes (off: every prompt is prefilled from its first token); encoder_cache: reuse cached image embeddings
    (the same bits as running the vision graph again, so it changes no result)."""

    def __init__(self, limits: Limits, tokenizer, stop_ids: tuple, encoder_bytes: int, prefix_bytes: int,
                 prefix_cache: bool = True, encoder_cache: bool = True, step_tokens: int | None = None,
                 lockstep: bool = False):
        self.limits, self.tokenizer, self.stop_ids = limits, tokenizer, stop_ids
        self.prefix_cache = prefix_cache
        self.encoder_cache = encoder_cache
        self.step_tokens = step_tokens or limits.chunks[-1]
        self.lockstep = lockstep
        self.queue: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * limits.batch
        self.held: list = [None] * limits.batch    # per free row: (digest, the token ids its K/V slots hold)
        self.encoder_index = ByteLRU(encoder_bytes)   # digests whose embeddings the runner keeps, by size
        self.prefix_index = ByteLRU(prefix_bytes)     # digests whose image prefix K/V the runner keeps
        self._numbers = itertools.count()
        seed = os.environ.get(SEED_ENV)
        self._seed_base = int(seed) if seed is not None else None
        self._samples: list = []    # who samples from each of the current plan's logits

    # --- requests in ----------------------------------------------------------------------
    def add(self, prepared: Prepared, on_text=None, on_finish=None, parent: Sequence | None = None) -> Sequence:
        """Queue a prepared request (engine.prepare: tokenized, its image preprocessed) -> its Sequence (cancel() it,
        read result() when done). parent: the Sequence of another choice of this same prompt (its prefill is
        shared; its sampling settings, seed aside, should be this one's)."""
        number = next(self._numbers)
        params = prepared.request.params
        stops = () if params.ignore_eos else self.stop_ids
        params = replace(params, stop_ids=tuple(dict.fromkeys(stops + params.stop_ids)))
        if params.seed is None and self._seed_base is not None:
            params = replace(params, seed=self._seed_base + number)
        ids, pos = prepared.ids, prepared.positions
        mask = TokenMask(params.json_schema, self.tokenizer, params.stop_ids) if params.json_schema is not None else None
        same = parent is not None and parent.ids == ids and parent.digest == prepared.digest
        seq = Sequence(number, prepared.request, ids, pos, prepared.pixels, prepared.digest, Sampler(params, ids, mask),
                       StreamDecoder(self.tokenizer), StopStrings(params.stop), on_text, on_finish,
                       next_pos=pos[-1] + 1, parent=parent if same else None)
        self.queue.append(seq)
        return seq

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.rows)

    @property
    def rows_in_use(self) -> int:
        return sum(s is not None for s in self.rows)

    @contextlib.contextmanager
    def policy(self, **settings):
        """Plan with other settings for a while (prefix_cache, encoder_cache, lockstep, step_tokens), then the old."""
        old = {k: getattr(self, k) for k in settings}
        for k, v in settings.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    def clear(self) -> Evict:
        """Forget what the free rows hold and every cached image -> the op that empties the runner's caches."""
        self.held = [None] * self.limits.batch
        self.encoder_index.clear()
        self.prefix_index.clear()
        return Evict(everything=True)

    # --- one step ---------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """The next step: cancel, admit, prefill (within the budget), decode -> its Plan (empty: nothing to run)."""
        plan = Plan()
        self._samples = []
        for s in self.rows:
            if s is not None and s.cancelled:
                self._finish(s, "cancel")
        self._admit(plan)
        self._prefill(plan)
        self._decode(plan)
        evict = Evict(encoder=self.encoder_index.evicted, prefix=self.prefix_index.evicted)
        self.encoder_index.evicted, self.prefix_index.evicted = [], []
        if evict.encoder or evict.prefix:
            plan.add(evict)
        return plan

    def update(self, logits: list):
        """The runner's logits for the last plan (in its `logits_of` order) -> each row's next token."""
        for who, x in zip(self._samples, logits, strict=True):
            if isinstance(who, list):   # the decode: [B, V] for its live rows
                for s in who:
                    s.pending = None
                    self._accept(s, s.sampler(x[s.row]))
            else:
                if any(s.parent is who for s in self.queue):
                    who.prompt_logits = x
                self._accept(who, who.sampler(x))
        self._samples = []

    def _admit(self, plan: Plan):
        all_free = not any(s is not None for s in self.rows)
        while None in self.rows and (all_free or not self.lockstep):
            seq = next((s for s in self.queue if s.cancelled or self._parent_ready(s) is not False), None)
            if seq is None:
                return
            self.queue.remove(seq)
            if seq.cancelled:
                self._finish(seq, "cancel")
                continue
            free = [r for r, s in enumerate(self.rows) if s is None]
            if self._parent_ready(seq):
                self._fork(plan, seq, free[0])
                continue
            reuse = {r: self._reusable(r, seq) for r in free}
            row = max(free, key=lambda r: (reuse[r], -r))
            seq.row, seq.fed = row, reuse[row]
            seq.reused = seq.fed
            self.rows[row] = seq
            self.held[row] = None

    @staticmethod
    def _parent_ready(seq: Sequence):
        """None: no parent to share with (none, or it ended); True: its prompt is in its row; False: not yet."""
        p = seq.parent
        if p is None or p.done:
            return None
        return p.prompt_logits is not None

    def _fork(self, plan: Plan, seq: Sequence, row: int):
        """Start `seq` in `row` from its parent's prompt K/V and last logits: no prefill of its own."""
        seq.row, seq.fed = row, len(seq.ids)
        seq.reused = seq.fed
        self.rows[row] = seq
        self.held[row] = None
        plan.add(CopyRow(seq.parent.row, row, seq.fed))
        self._accept(seq, seq.sampler(seq.parent.prompt_logits))

    def _reusable(self, row: int, seq: Sequence) -> int:
        """Prompt tokens of `seq` whose K/V row `row` still holds (0: none, or the image differs)."""
        held = self.held[row]
        if not self.prefix_cache or held is None or held[0] != seq.digest:
            return 0
        old = held[1]
        n = next((i for i, (a, b) in enumerate(zip(old, seq.ids)) if a != b), min(len(old), len(seq.ids)))
        n = min(n, len(seq.ids) - 1)  # the last prompt token is fed again: its logits give the first token
        return n if n > (self.limits.n_image if seq.pixels is not None else 0) else 0

    def _chunk(self, remaining: int) -> int:
        return chunk_plan(remaining, self.limits.chunks, self.limits.overhead)[0]

    def _prefill(self, plan: Plan):
        budget = self.step_tokens
        decoding = any(s is not None and s.pending is not None for s in self.rows)
        for seq in sorted((s for s in self.rows if s is not None and s.fed < len(s.ids)), key=lambda s: s.number):
            while seq.fed < len(seq.ids) and (budget > 0 or not decoding):
                if seq.pixels is not None and seq.fed == 0:
                    if self._load_image_prefix(plan, seq):
                        continue
                    n = self.limits.n_image + 1
                    text = len(seq.ids) - n
                    m = n + min(self._chunk(text) if text > 0 else self.limits.chunks[0], max(text, 0))
                    self._image_embeddings(plan, seq)
                    keep = self._keep_image_prefix(seq)
                    seq.fed += m
                    plan.add(PrefillImage(seq.row, seq.digest, seq.ids, seq.positions, m, keep),
                             logits=seq.fed == len(seq.ids))
                else:
                    m = min(self._chunk(len(seq.ids) - seq.fed), len(seq.ids) - seq.fed)
                    plan.add(Extend(seq.row, seq.fed, seq.ids[seq.fed:seq.fed + m], seq.positions[seq.fed:seq.fed + m]),
                             logits=seq.fed + m == len(seq.ids))
                    seq.fed += m
                budget -= m
            if seq.fed == len(seq.ids):
                self._samples.append(seq)

    def _image_embeddings(self, plan: Plan, seq: Sequence):
        """Plan the vision graph for seq's pixels unless the encoder cache holds its embeddings."""
        if self.encoder_cache and self.encoder_index.get(seq.digest) is not None:
            return
        keep = self.encoder_cache and self.encoder_index.put(seq.digest, self.limits.embed_bytes)
        plan.add(Vision(seq.digest, seq.pixels, keep))

    def _load_image_prefix(self, plan: Plan, seq: Sequence) -> bool:
        """Give seq's row a copy of its image's cached prefix (bos + image section) -> whether it was cached."""
        n = self.limits.n_image + 1
        if not self.prefix_cache or len(seq.ids) <= n:   # the last prompt token must be fed: its logits sample
            return False
        if self.prefix_index.get(seq.digest) is None:
            return False
        plan.add(LoadPrefix(seq.row, seq.digest))
        seq.fed = seq.reused = n
        return True

    def _keep_image_prefix(self, seq: Sequence) -> bool:
        """Whether the runner keeps seq's bos + image section K/V after its image prefill, for the next question."""
        return (self.prefix_cache and seq.digest not in self.prefix_index
                and self.prefix_index.put(seq.digest, self.limits.prefix_bytes))

    def _decode(self, plan: Plan):
        live = [s for s in self.rows if s is not None and s.pending is not None]
        if not live:
            return
        needed = max(s.slots + (s.pending is not None) for s in self.rows if s is not None)
        bucket = next(t for t in self.limits.buckets if t >= needed)
        for r, held in enumerate(self.held):   # a smaller bucket keeps only its first slots of a free row
            if held is not None and len(held[1]) > bucket:
                self.held[r] = (held[0], held[1][:bucket])
        tokens = np.full(self.limits.batch, self.tokenizer.pad_id, np.int32)
        positions = np.zeros(self.limits.batch, np.int32)
        for s in live:
            tokens[s.row], positions[s.row] = s.pending, s.next_pos
            s.next_pos += 1
            s.decoded += 1
        plan.add(Decode(tokens, positions, [s.row for s in live], needed), logits=True)
        self._samples.append(live)

    # --- per sequence -------------------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int):
        """A sampled token: stop (a stop id, or the text reached a stop string: that token counts), or stream
        it and keep it to feed at the next decode."""
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in seq.sampler.params.stop_ids:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        if seq.sampler.logprobs is not None:
            seq.logprobs.append(seq.sampler.logprobs)
        piece, hit = seq.stops.push(seq.stream.push(token))
        self._emit(seq, piece)
        if hit:
            return self._finish(seq, "stop")
        if len(seq.tokens) >= seq.sampler.params.max_new_tokens:
            return self._finish(seq, "length")
        if seq.slots >= self.limits.max_len:
            return self._finish(seq, "context")
        seq.pending = token

    def _emit(self, seq: Sequence, piece: str):
        """Keep and stream a token's text; a token without text (a special token, a partial character)
        still streams "" so that listeners see every token's time."""
        if piece:
            seq.pieces.append(piece)
        if seq.on_text:
            seq.on_text(piece)

    def _finish(self, seq: Sequence, reason: str):
        seq.finish_reason = reason
        seq.pending = None
        seq.prompt_logits = None
        seq.ended_at = time.perf_counter()
        tail = seq.stops.push(seq.stream.flush())[0] + seq.stops.flush()
        if tail:
            self._emit(seq, tail)
        if seq.row is not None:
            self.rows[seq.row] = None
            self.held[seq.row] = (seq.digest, seq.ids[:seq.fed] + seq.tokens[:seq.decoded])  # what its K/V hold
            seq.row = None
        if seq.on_finish:
            seq.on_finish(seq)
