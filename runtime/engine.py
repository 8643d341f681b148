"""The runtime, top-down: one request from image bytes to streamed text.

    Engine(bundle)                    load + validate the bundle, the backend, tokenizer, KV cache
      .generate([Request(...)])
         load_image -> preprocess     Pillow, bit-identical to torchvision  (preprocess.py)
         tokenizer.build_inputs       [bos, image slots..., prompt ids], token types, position ids
         image_embeddings             the `vision` graph
         prefill                      smallest `prefill_<kind>_<S>` bucket that fits; K/V -> cache
         loop: Sampler -> decode      smallest `decode_<T>` bucket holding the cache; K/V appended
         StreamDecoder                token ids -> text pieces, never broken UTF-8
The raw graph calls (image_embeddings, prefill, decode) are public so other implementations can
be compared against the bundle. A batch-B bundle runs up to B requests together, each stopping
on its own; with B = 1, a request that extends the previous one (multi-turn chat) reuses the
cached prefix and only feeds the new tokens.
"""
import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .backends import open_backend
from .bundle import Bundle
from .errors import UserError
from .kv_cache import KVCache
from .preprocess import load_image, preprocess
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer, position_ids

EXTEND_LIMIT = 256  # new tokens fed one decode step each when extending a cached prefix; more -> prefill


@dataclass
class Request:
    prompt: str
    image: object = None                 # path, bytes, PIL image or preprocessed float32 [3, S, S]; None: text-only
    history: tuple = ()                  # ((question, answer), ...) earlier turns
    template: str | None = None          # chat | vqa | base; None: the bundle's
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    text: str
    token_ids: list
    finish_reason: str                   # stop | length | context
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    reused_tokens: int = 0


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
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    try:
        ms.set_device("CPU")
    except RuntimeError:
        pass
    init()
    if get_group_size() != tp:
        raise UserError(f"this bundle has {tp} ranks but msrun started {get_group_size()} processes.")
    return get_rank()


class Engine:
    def __init__(self, bundle, backend: str = "auto", verify: bool = False, **backend_options):
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
        kv = m["kv_cache"]
        self.cache = KVCache(kv["layers"], self.batch, kv["kv_heads"], kv["head_dim"], self.bundle.buckets["decode"],
                             kv["dtype"])
        self.timings = Timings()
        self._pixels = None   # preprocessing buffer, allocated on first use
        self._cached = None   # (image key, token ids whose K/V are in the cache) for B = 1 prefix reuse
        self.reuse_prefix = True  # False: every request starts from prefill (batch files: results independent of order)

    # --- raw graph calls ----------------------------------------------------------------
    def _run(self, kind, name, inputs):
        t = time.perf_counter()
        out = self.backend.run(name, inputs)
        self.timings.add(kind, time.perf_counter() - t)
        return out

    def pixels(self, images) -> np.ndarray:
        """Images (path, bytes, PIL) -> float32 [B, 3, S, S], padded with zeros to the bundle batch.

        Fills one buffer kept for the session (a fresh 21 MiB array per 1344 px image costs ~9 ms of
        page faults): the result is valid until the next call."""
        s = self.pre["image_size"]
        if self._pixels is None:
            self._pixels = np.zeros((self.batch, 3, s, s), np.float32)
        out = self._pixels
        out[len(images):] = 0
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):  # already preprocessed (e.g. on a background thread)
                if img.shape != (3, s, s):
                    raise UserError(f"preprocessed pixels must have shape (3, {s}, {s}), not {img.shape}.")
                out[i] = img
            else:
                preprocess(load_image(img), s, self.pre["mean"], self.pre["std"], out=out[i])
        return out

    def image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] -> [B, num_image_tokens, hidden] (boi, patches, eoi)."""
        return self._run("vision", "vision", [np.ascontiguousarray(pixel_values, np.float32)])[0]

    def prefill(self, input_ids: list, image_embeds=None, positions: list | None = None) -> np.ndarray:
        """Rows of token ids (with image slots when image_embeds is given) -> last-token logits [B, V];
        the cache then holds each row's K/V. Rows beyond len(input_ids) are padding."""
        kind = "prefill_image" if image_embeds is not None else "prefill_text"
        longest = max(len(ids) for ids in input_ids)
        bucket = next((s for s in self.bundle.buckets[kind] if s >= longest), None)
        if bucket is None:
            top = max(self.bundle.buckets[kind], default=0)
            raise UserError(f"the prompt is {longest} tokens long, more than this bundle's largest "
                            f"{'image' if image_embeds is not None else 'text'} prompt bucket ({top}): "
                            "shorten it or export with larger --buckets.")
        b = self.batch
        ids = np.full((b, bucket), self.tokenizer.pad_id, np.int32)
        pos = np.zeros((b, bucket), np.int32)
        lengths = np.ones(b, np.int32)
        for r, row in enumerate(input_ids):
            ids[r, :len(row)] = row
            pos[r, :len(row)] = positions[r] if positions is not None else np.arange(len(row))
            lengths[r] = len(row)
        inputs = [ids] + ([np.ascontiguousarray(image_embeds)] if image_embeds is not None else []) + [pos, lengths]
        logits, k, v = self._run("prefill", f"{kind}_{bucket}", inputs)
        self.cache.write_prefill(k, v, lengths)
        return logits

    def decode(self, tokens, positions, rows=None) -> np.ndarray | None:
        """One token per row at the given RoPE positions -> logits [B, V]; K/V appended for `rows`
        (default all). None when the cache has no room left (the largest decode bucket is full)."""
        if not self.cache.fit(int(self.cache.lengths.max()) + 1):
            return None
        kc, vc = self.cache.views()
        inputs = [np.asarray(tokens, np.int32).reshape(self.batch, 1), np.asarray(positions, np.int32),
                  self.cache.lengths.copy()]
        inputs += list(kc) + list(vc)
        logits, k_new, v_new = self._run("decode", f"decode_{self.cache.bucket}", inputs)
        self.cache.append(k_new, v_new, rows)
        return logits

    # --- generation -------------------------------------------------------------------------
    def generate(self, requests: list, on_text=None) -> list[Result]:
        """Run up to `batch` requests together; on_text(row, piece) streams text as it is decoded."""
        if not 1 <= len(requests) <= self.batch:
            raise UserError(f"this bundle runs batches of at most {self.batch} requests, got {len(requests)}.")
        with_image = [r.image is not None for r in requests]
        if any(with_image) and not all(with_image):
            raise UserError("requests with and without an image cannot share a batch: group them.")
        start = time.perf_counter()
        rows = [self._inputs(r) for r in requests]
        images = [(r.image if isinstance(r.image, np.ndarray) else load_image(r.image), _image_key(r.image))
                  for r in requests] if all(with_image) else None
        logits, reused = self._start(rows, images)
        return self._decode_loop(requests, rows, logits, reused, start, on_text)

    def _inputs(self, r: Request):
        n = self.n_image if r.image is not None else 0
        ids, types = self.tokenizer.build_inputs(r.prompt, r.history, r.template or self.template, n)
        return ids, position_ids(types)

    def _start(self, rows, images):
        """Prefill, or (B = 1) extend the cached prefix of the previous request with decode steps."""
        key = images[0][1] if images else None
        if self.batch == 1 and self.reuse_prefix and self._cached is not None and self._cached[0] == key:
            ids, pos = rows[0]
            old = self._cached[1]
            common = next((i for i, (a, b) in enumerate(zip(old, ids)) if a != b), min(len(old), len(ids)))
            if common == len(ids):
                common -= 1  # the last prompt token must be fed again to get its logits
            if common > (self.n_image if images else 0) and len(ids) - common <= EXTEND_LIMIT:
                self.cache.lengths[0] = common
                logits = None
                for i in range(common, len(ids)):
                    logits = self.decode([ids[i]], [pos[i]])
                    if logits is None:
                        break
                if logits is not None:
                    self._cached = (key, list(ids))
                    return logits, common
        embeds = self.image_embeddings(self.pixels([img for img, _ in images])) if images else None
        logits = self.prefill([ids for ids, _ in rows], embeds, [pos for _, pos in rows])
        self._cached = (key, list(rows[0][0])) if self.batch == 1 else None
        return logits, 0

    def _decode_loop(self, requests, rows, logits, reused, start, on_text):
        b = len(requests)
        samplers = [Sampler(_with_stops(r.params, self.stop_ids), ids) for r, (ids, _) in zip(requests, rows)]
        streams = [StreamDecoder(self.tokenizer) for _ in requests]
        out = [[] for _ in requests]
        text = [[] for _ in requests]
        finish = [None] * b
        next_pos = [pos[-1] + 1 for _, pos in rows]
        ttft = None
        loop_start = time.perf_counter()
        while True:
            tokens = np.full(self.batch, self.tokenizer.pad_id, np.int32)
            for r in range(b):
                if finish[r]:
                    continue
                tok = samplers[r](logits[r])
                if ttft is None:
                    ttft = time.perf_counter() - start
                if tok in samplers[r].params.stop_ids:
                    finish[r] = "stop"
                    continue
                out[r].append(tok)
                piece = streams[r].push(tok)
                if piece:
                    text[r].append(piece)
                    if on_text:
                        on_text(r, piece)
                tokens[r] = tok
                if len(out[r]) >= requests[r].params.max_new_tokens:
                    finish[r] = "length"
            live = [r for r in range(b) if not finish[r]]
            if not live:
                break
            logits = self.decode(tokens, np.array(next_pos + [0] * (self.batch - b), np.int32), rows=live)
            if logits is None:
                for r in live:
                    finish[r] = "context"
                break
            if self._cached is not None:
                self._cached[1].append(int(tokens[0]))
            self.timings.decode_steps += 1
            for r in live:
                next_pos[r] += 1
        self.timings.decode_loop_s += time.perf_counter() - loop_start
        total = time.perf_counter() - start
        results = []
        for r in range(b):
            tail = streams[r].flush()
            if tail:
                text[r].append(tail)
                if on_text:
                    on_text(r, tail)
            results.append(Result("".join(text[r]), out[r], finish[r], len(rows[r][0]), len(out[r]),
                                  ttft or total, total, reused))
        return results


def _with_stops(params: SamplingParams, stop_ids) -> SamplingParams:
    """The model's stop ids always apply; a request may add its own."""
    return dataclasses.replace(params, stop_ids=tuple(dict.fromkeys(tuple(stop_ids) + params.stop_ids)))


_PIXELS = itertools.count()


def _image_key(image):
    """Identity of an image for prefix reuse: the same path/bytes/PIL object means the same pixels."""
    if isinstance(image, (str, os.PathLike)):
        st = os.stat(image)
        return ("path", os.fspath(image), st.st_mtime_ns, st.st_size)
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", hash(bytes(image)))
    if isinstance(image, np.ndarray):  # preprocessed pixels: never assumed equal to earlier ones
        return ("pixels", next(_PIXELS))
    return ("object", id(image))
