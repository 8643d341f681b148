"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Runs once per decode step on a [V] = 128256 row, so it avoids full-vocabulary sorts and cumsums:
top-k partitions only logits above a block-maximum floor, top-p sorts only the tokens that can
matter, and sampling sums blocks before elements. Processing order is Hugging Face's:
repetition penalty -> temperature -> top-k -> top-p -> sample.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 = greedy; top_k 0, top_p 1, penalty 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop_ids: tuple = field(default_factory=tuple)  # ids that end the sequence, besides the model's own
    ignore_eos: bool = False  # True: the model's stop ids do not end it (benchmarks: exactly max_new_tokens)
    stop: tuple = field(default_factory=tuple)      # stop strings: the text ends before the first one (stop_strings.py)
    logprobs: int | None = None  # None: none; k in 0..20: each token's logprob and its k most likely alternatives
    json_schema: dict | None = None  # the answer is JSON matching this schema (structured.py)

    def __post_init__(self):
        def number(name, ok, rule):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise UserError(f"{name}={v!r} is invalid: it must be {rule}.")

        def integer(name, ok, rule):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not ok(v):
                raise UserError(f"{name}={v!r} is invalid: it must be {rule}.")

        number("temperature", lambda v: v >= 0, "a number >= 0 (0 means greedy)")
        integer("top_k", lambda v: v >= 0, "an integer >= 0 (0 turns it off)")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 turns it off)")
        number("repetition_penalty", lambda v: v > 0, "a number > 0 (1 turns it off)")
        integer("max_new_tokens", lambda v: v >= 1, "an integer >= 1")
        if self.seed is not None:
            integer("seed", lambda v: v >= 0, "an integer >= 0 or None")
        try:
            object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        except (TypeError, ValueError):
            raise UserError(f"stop_ids={self.stop_ids!r} is invalid: it must be a list of token ids.") from None
        if any(i < 0 for i in self.stop_ids):
            raise UserError(f"stop_ids={self.stop_ids!r} is invalid: token ids are >= 0.")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) and x for x in stop):
            raise UserError(f"stop={self.stop!r:.80} is invalid: it must be non-empty strings (an empty one would "
                            "end every answer before it starts).")
        object.__setattr__(self, "stop", tuple(stop))
        if self.logprobs is not None:
            integer("logprobs", lambda v: 0 <= v <= 20, "an integer in 0..20 (the alternatives per token) or None")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise UserError(f"json_schema must be a JSON schema object (a dict), not {type(self.json_schema).__name__}.")


class Sampler:
    """Chooses the next token of one sequence; keeps its seen tokens and its own random stream,
    so a seed reproduces the same tokens whatever else shares the batch. mask: a structured.TokenMask
    (the tokens a JSON schema allows), applied before everything else.

    logprobs (when params.logprobs is set): the log-softmax of the model's logits for the step, before the
    schema mask, the repetition penalty, temperature and top-k/top-p, as vLLM reports by default: the
    model's own belief, the same whatever the sampling settings."""

    def __init__(self, params=None, prompt_ids=(), mask=None):
        self.params = params or SamplingParams()
        self.mask = mask
        self.logprobs = None  # after a call with params.logprobs set: (token, its logprob, [(id, logprob), ...] best first)
        self.rng = np.random.default_rng(self.params.seed)
        self._pending = list(prompt_ids)  # recorded once the vocabulary size is known
        self._seen = None
        self._seen_ids = np.zeros(0, dtype=np.int64)

    def observe(self, ids):
        """Record tokens for the repetition penalty (the sampler records its own picks itself)."""
        if self._seen is None:
            self._pending.extend(ids)
            return
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        new = ids[~self._seen[ids]]
        self._seen[new] = True
        self._seen_ids = np.concatenate([self._seen_ids, new])

    def __call__(self, logits):
        """logits [V] float32 -> the next token id (int)."""
        p = self.params
        raw = x = np.asarray(logits, dtype=np.float32)
        if self.mask is not None:
            x = self.mask.apply(x)
        if p.repetition_penalty != 1.0:
            x = self._penalize(x)
        if p.temperature < 1e-5:  # the T -> 0 limit, and no float32 division by ~0
            tok = int(np.argmax(x))
        else:
            tok = self._sample(x)
        if p.repetition_penalty != 1.0:
            self.observe((tok,))
        if self.mask is not None:
            self.mask.accept(tok)
        if p.logprobs is not None:
            self.logprobs = log_probs(raw, tok, p.logprobs)
        return tok

    def _penalize(self, x):
        """HF's rule: positive logits of seen tokens are divided by the penalty, negative multiplied."""
        if self._seen is None:
            self._seen = np.zeros(x.shape[-1], dtype=bool)
            pending, self._pending = self._pending, []
            self.observe(pending)
        x = x.copy()
        v = x[self._seen_ids]
        rp = np.float32(self.params.repetition_penalty)
        x[self._seen_ids] = np.where(v > 0, v / rp, v * rp)
        return x

    def _sample(self, x):
        p = self.params
        cand = None
        if 0 < p.top_k < x.size:
            cand = _top_k(x, p.top_k)
            x = x[cand]
        z = np.exp((x - x.max()) / np.float32(p.temperature))
        if p.top_p < 1.0:
            keep = _top_p(z, p.top_p)
            z = z[keep]
            cand = keep if cand is None else cand[keep]
        i = _search_cumsum(z, self.rng.random() * z.sum(dtype=np.float64), "right")
        return int(cand[i]) if cand is not None else i


def log_probs(logits, token: int, k: int) -> tuple[int, float, list]:
    """log-softmax of logits [V] -> (token, its logprob, the k most likely [(id, logprob)], best first)."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top = np.argpartition(-x, k)[:k] if 0 < k < x.size else np.arange(x.size)[:k]
    top = top[np.argsort(-x[top], kind="stable")]
    return token, float(x[token] - lse), [(int(i), float(x[i] - lse)) for i in top]


_BLOCK = 256


def _top_k(x, k):
    """Indices of the logits >= the k-th largest (ties kept, as HF does).

    The k-th largest of the per-block maxima is a floor that at least k logits reach, so only the
    logits above it are partitioned, not the whole row.
    """
    starts = np.arange(0, x.size, _BLOCK)
    idx, vals = None, x
    if k <= starts.size:
        block_max = np.maximum.reduceat(x, starts)
        idx = np.flatnonzero(x >= np.partition(block_max, block_max.size - k)[block_max.size - k])
        vals = x[idx]
    keep = np.flatnonzero(vals >= np.partition(vals, vals.size - k)[vals.size - k])
    return keep if idx is None else idx[keep]


def _top_p(z, top_p):
    """Indices HF's top-p keeps: the least likely tokens go while their summed mass is <= 1 - p
    (at least one token stays; ties at the boundary stay).

    When the tokens below 1e-4 of the peak fit in the removed mass (the usual, peaked case), only
    the tokens above it are sorted: a handful of values instead of the vocabulary.
    """
    total = z.sum(dtype=np.float64)
    budget = total * (1.0 - top_p)
    idx = np.flatnonzero(z >= z.max() * np.float32(1e-4))
    vals = z[idx]
    outside = total - vals.sum(dtype=np.float64)
    if outside > budget:  # a flat distribution: the boundary lies among the small values
        idx, vals, outside = None, z, 0.0
    asc = np.sort(vals)
    keep = np.flatnonzero(vals >= asc[_search_cumsum(asc, budget - outside, "right")])
    return keep if idx is None else idx[keep]


def _search_cumsum(z, value, side):
    """np.searchsorted(np.cumsum(z), value, side), clamped to a valid index, without a cumsum over
    the whole vocabulary: block sums locate the block, then one block is summed element-wise."""
    starts = np.arange(0, z.size, _BLOCK)
    blocks = np.cumsum(np.add.reduceat(z, starts, dtype=np.float64))
    b = min(int(np.searchsorted(blocks, value, side)), blocks.size - 1)
    inner = np.cumsum(z[starts[b]:starts[b] + _BLOCK], dtype=np.float64) + (blocks[b - 1] if b else 0.0)
    return int(starts[b]) + min(int(np.searchsorted(inner, value, side)), inner.size - 1)
