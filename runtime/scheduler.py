"""In-flight batching over the B rows of the KV cache, with chunked prefill.

A request waits in a queue until a row is free; from then on every `step()`:

  1. cancelled sequences end and free their rows;
  2. queued requests are admitted into free rows (the row whose previous request shares the
     longest prefix with this one, when the prefix cache is on: its K/V are reused);
  3. prefill: rows still reading their prompt feed it chunk by chunk (an image prompt's first
     chunk holds bos, the image section and the first text tokens; `Engine.chunk_plan` picks
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
previous request left in a freed row is masked out. `lockstep=True` admits only when every row is
free (a batch runs until its longest member ends: what batching did before this scheduler; kept
for comparison in `bench`).

Tensor parallel: every rank runs this same scheduler over the same requests in the same order.
Its decisions depend only on that order, on the logits, which the graphs all-gather, and on the
image caches, which every rank fills alike under a bound every rank computes alike (engine.py), so
the ranks agree without messages; requests without a seed draw their seed from COGVLM2_LITE_SEED,
which the msrun launcher (cli.py) sets alike for every rank.
"""
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .encoder_cache import pixel_digest
from .errors import UserError
from .request import Result
from .sampling import Sampler
from .tokenizer import StreamDecoder, position_ids

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
    on_text: object = None               # on_text(piece)
    on_finish: object = None             # on_finish(sequence)
    arrived: float = field(default_factory=time.perf_counter)
    row: int | None = None
    fed: int = 0                         # prompt tokens whose K/V are in the row
    reused: int = 0                      # prompt tokens whose K/V came from a cache (a row's, an image prefix)
    tokens: list = field(default_factory=list)
    pieces: list = field(default_factory=list)
    pending: int | None = None           # last sampled token, not yet fed
    next_pos: int = 0
    first_token_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False

    def cancel(self):
        """Ask the scheduler to end this request: its row is freed at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> Result:
        end = self.ended_at or time.perf_counter()
        return Result("".join(self.pieces), list(self.tokens), self.finish_reason, len(self.ids), len(self.tokens),
                      (self.first_token_at or end) - self.arrived, end - self.arrived, self.reused)


class Scheduler:
    """The step loop over the engine's B rows (see the module docstring for the policy).

    prefix_cache: reuse K/V, a free row's and the engine's cached image prefixes (off: every prompt is
    prefilled from its first token); encoder_cache: reuse the engine's cached image embeddings (the same
    bits as running the vision graph again, so it changes no result)."""

    def __init__(self, engine, prefix_cache: bool = True, encoder_cache: bool = True, step_tokens: int | None = None,
                 lockstep: bool = False):
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.encoder_cache = encoder_cache
        self.step_tokens = step_tokens or engine.chunks[-1]
        self.lockstep = lockstep
        self.queue: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * engine.batch
        self._numbers = itertools.count()
        seed = os.environ.get(SEED_ENV)
        self._seed_base = int(seed) if seed is not None else (0 if engine.bundle.tp > 1 else None)

    # --- requests in ----------------------------------------------------------------------
    def add(self, request, on_text=None, on_finish=None) -> Sequence:
        """Queue a request -> its Sequence (cancel() it, read result() when done). The prompt is
        tokenized and the image loaded and preprocessed here, so a bad request raises UserError
        now, not inside a step."""
        e = self.engine
        with_image = request.image is not None
        ids, types = e.prompt(request)
        pixels = e.pixels([request.image])[0] if with_image else None
        digest = pixel_digest(pixels) if with_image else None
        number = next(self._numbers)
        params = request.params
        stops = () if params.ignore_eos else e.stop_ids
        params = replace(params, stop_ids=tuple(dict.fromkeys(stops + params.stop_ids)))
        if params.seed is None and self._seed_base is not None:
            params = replace(params, seed=self._seed_base + number)
        pos = position_ids(types)
        seq = Sequence(number, request, ids, pos, pixels, digest, Sampler(params, ids), StreamDecoder(e.tokenizer),
                       on_text, on_finish, next_pos=pos[-1] + 1)
        self.queue.append(seq)
        return seq

    def run(self, requests, on_text=None) -> list:
        """Add every request (all or none: a bad one raises before any runs), step until they are
        done -> their Results in order. on_text(i, piece) streams request i."""
        seqs = []
        try:
            for i, r in enumerate(requests):
                seqs.append(self.add(r, on_text=(lambda piece, i=i: on_text(i, piece)) if on_text else None))
        except UserError:
            for s in seqs:
                self.queue.remove(s)
            raise
        while not all(s.done for s in seqs):
            self.step()
        return [s.result() for s in seqs]

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.rows)

    @property
    def rows_in_use(self) -> int:
        return sum(s is not None for s in self.rows)

    # --- one step ---------------------------------------------------------------------------
    def step(self):
        """One scheduling step: cancel, admit, prefill (within the budget), decode."""
        for s in self.rows:
            if s is not None and s.cancelled:
                self._finish(s, "cancel")
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self):
        all_free = not any(s is not None for s in self.rows)
        while self.queue and None in self.rows and (all_free or not self.lockstep):
            seq = self.queue.popleft()
            if seq.cancelled:
                self._finish(seq, "cancel")
                continue
            free = [r for r, s in enumerate(self.rows) if s is None]
            reuse = {r: self._reusable(r, seq) for r in free}
            row = max(free, key=lambda r: (reuse[r], -r))
            seq.row, seq.fed = row, reuse[row]
            seq.reused = seq.fed
            self.rows[row] = seq
            self.engine.cache.held[row] = None
            self.engine.cache.lengths[row] = seq.fed

    def _reusable(self, row: int, seq: Sequence) -> int:
        """Prompt tokens of `seq` whose K/V row `row` still holds (0: none, or the image differs)."""
        held = self.engine.cache.held[row]
        if not self.prefix_cache or held is None or held[0] != seq.digest:
            return 0
        old = held[1][:int(self.engine.cache.lengths[row])]
        n = next((i for i, (a, b) in enumerate(zip(old, seq.ids)) if a != b), min(len(old), len(seq.ids)))
        n = min(n, len(seq.ids) - 1)  # the last prompt token is fed again: its logits give the first token
        return n if n > (self.engine.n_image if seq.pixels is not None else 0) else 0

    def _prefill(self):
        e = self.engine
        budget = self.step_tokens
        decoding = any(s is not None and s.pending is not None for s in self.rows)
        for seq in sorted((s for s in self.rows if s is not None and s.fed < len(s.ids)), key=lambda s: s.number):
            logits = None
            while seq.fed < len(seq.ids) and (budget > 0 or not decoding):
                if seq.pixels is not None and seq.fed == 0:
                    if self._load_image_prefix(seq):
                        continue
                    logits, n = e.prefill_image(seq.row, self._image_embeddings(seq), seq.ids, seq.positions)
                    self._keep_image_prefix(seq)
                else:
                    logits, n = e.extend_chunk(seq.row, seq.ids[seq.fed:], seq.positions[seq.fed:])
                seq.fed += n
                budget -= n
            if seq.fed == len(seq.ids):
                self._accept(seq, seq.sampler(logits))

    def _image_embeddings(self, seq: Sequence) -> np.ndarray:
        """The vision graph's output for seq's pixels [n_image, hidden], from the encoder cache when it holds them."""
        cache = self.engine.encoder_cache
        embeds = cache.get(seq.digest) if self.encoder_cache else None
        if embeds is None:
            embeds = self.engine.image_embeddings(seq.pixels[None])[0]
            if self.encoder_cache:
                cache.put(seq.digest, embeds)
        return embeds

    def _load_image_prefix(self, seq: Sequence) -> bool:
        """Give seq's row a copy of its image's cached prefix (bos + image section) -> whether it was cached."""
        e = self.engine
        n = e.n_image + 1
        if not self.prefix_cache or len(seq.ids) <= n:   # the last prompt token must be fed: its logits sample
            return False
        kv = e.image_prefixes.get(seq.digest)
        if kv is None:
            return False
        e.load_prefix(seq.row, *kv)
        seq.fed = seq.reused = n
        return True

    def _keep_image_prefix(self, seq: Sequence):
        """After seq's image prefill: keep a copy of its row's bos + image section K/V for the next question."""
        e = self.engine
        if self.prefix_cache and seq.digest not in e.image_prefixes and e.image_prefixes.fits(e.image_prefix_bytes):
            e.image_prefixes.put(seq.digest, e.image_prefix(seq.row))

    def _decode(self):
        live = [s for s in self.rows if s is not None and s.pending is not None]
        if not live:
            return
        e = self.engine
        start = time.perf_counter()
        e.cache.fit(max(int(e.cache.lengths[s.row]) + (s.pending is not None) for s in self.rows if s is not None))
        tokens = np.full(e.batch, e.tokenizer.pad_id, np.int32)
        positions = np.zeros(e.batch, np.int32)
        for s in live:
            tokens[s.row], positions[s.row] = s.pending, s.next_pos
        logits = e.decode(tokens, positions, rows=[s.row for s in live])
        e.timings.decode_steps += 1
        for s in live:
            s.pending = None
            s.next_pos += 1
            self._accept(s, s.sampler(logits[s.row]))
        e.timings.decode_loop_s += time.perf_counter() - start

    # --- per sequence -------------------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int):
        """A sampled token: stop, or stream it and keep it to feed at the next decode."""
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in seq.sampler.params.stop_ids:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        self._emit(seq, seq.stream.push(token))
        if len(seq.tokens) >= seq.sampler.params.max_new_tokens:
            return self._finish(seq, "length")
        if int(self.engine.cache.lengths[seq.row]) >= self.engine.cache.max_len:
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
        seq.ended_at = time.perf_counter()
        tail = seq.stream.flush()
        if tail:
            self._emit(seq, tail)
        if seq.row is not None:
            self.rows[seq.row] = None
            self.engine.cache.held[seq.row] = (seq.digest, seq.ids[:seq.fed] + seq.tokens)  # what its K/V hold
            seq.row = None
        if seq.on_finish:
            seq.on_finish(seq)
