"""Issue 16: chunked prefill equals whole-prompt prefill; in-flight batching changes no request's
tokens; rows never see each other's K/V; cancel, bucket and prefill-budget policies."""
import numpy as np
import pytest
from PIL import Image

import eager
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.sampling import SamplingParams

from conftest import BUCKETS, prompt


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.fixture
def planning(monkeypatch):
    """planning(engine, **policy) -> the engine, its one scheduler planning with `policy` (prefix_cache off by
    default) for this test; at the end whatever the test left in flight is cancelled: the engine is shared."""
    used = []

    def plan(engine, **policy):
        for k, v in {"prefix_cache": False, **policy}.items():
            monkeypatch.setattr(engine.scheduler, k, v)
        used.append(engine)
        return engine
    yield plan
    for e in used:
        for s in [*e.scheduler.queue, *(r for r in e.scheduler.rows if r is not None)]:
            s.cancel()
        while e.busy:
            e.step()


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 50 - 4 * i, 3), dtype=np.uint8)) for i in range(4)]


def mixed_requests(pictures, n=12):
    """Image and text-only requests of different prompt and answer lengths."""
    return [Request(f"request {i}:" + " and more" * (i % 5), image=pictures[i % 4] if i % 3 else None,
                    params=greedy(3 + (7 * i) % 17)) for i in range(n)]


def test_chunk_plan_pays_for_tokens_not_buckets():
    from cogvlm2_lite.runtime.runner import chunk_plan
    assert chunk_plan(52, (16, 64, 256), 32) == (64,)
    assert chunk_plan(128, (16, 64, 256), 32) == (64, 64)  # not one half-empty 256
    assert chunk_plan(300, (16, 64, 256), 32) == (64, 256)  # padding only in the last chunk
    for n in range(1, 400):
        plan = chunk_plan(n, (16, 64, 256), 32)
        assert sum(plan[:-1]) < n <= sum(plan) and sum(plan) - n < 256


def test_chunked_prefill_equals_whole_prompt_logits(engine, tiny_cfg, tiny_weights, photo):
    """Chunk boundaries inside the text (chunks of 8 and 16), after the image chunk's text and right
    after the image section itself."""
    assert engine.chunks == BUCKETS["chunk"]
    embeds = engine.image_embeddings(engine.pixels([photo]))
    ref_embeds = eager.image_embeds(tiny_cfg, tiny_weights, engine.pixels([photo])[0])
    n = engine.n_image + 1
    for words in (1, 3, 6, 9, 14):
        for image in (False, True):
            ids, pos = prompt(engine, "word " * words, image)
            assert len(engine.chunk_plan(len(ids) - (n if image else 0))) >= (1 if words < 6 else 2)
            logits = engine.prefill([ids], embeds if image else None, [pos])[0]
            ref = eager.full_logits(tiny_cfg, tiny_weights, ids, pos, ref_embeds if image else None)[-1]
            assert np.abs(logits - ref).max() <= 1e-5, (words, image)
            assert engine.cache.lengths[0] == len(ids)
            if image:  # the image chunk alone, then all of the text against the cache
                _, fed = engine.prefill_image(0, embeds[0], ids[:n], pos)
                assert fed == n
                split = engine.extend(0, ids[n:], pos[n:])
                assert np.abs(split - ref).max() <= 1e-5, words


def test_in_flight_batching_changes_no_request(engine, engine4, pictures, planning):
    """B = 4, 12 requests arriving while others run: each one's greedy tokens equal its tokens alone."""
    requests = mixed_requests(pictures)
    alone = [engine.generate([r])[0].token_ids for r in requests]
    sched = planning(engine4)
    seqs, occupied = [], []
    for i, r in enumerate(requests):
        seqs.append(sched.add(r))
        for _ in range(i % 3):  # a few steps between arrivals
            sched.step()
            occupied.append(sched.scheduler.rows_in_use)
    while sched.busy:
        sched.step()
        occupied.append(sched.scheduler.rows_in_use)
    assert [s.result().token_ids for s in seqs] == alone
    assert all(s.result().finish_reason == "length" for s in seqs)
    assert max(occupied) == 4


def test_generate_runs_more_requests_than_rows(engine4, pictures):
    requests = mixed_requests(pictures, 6)
    texts = []
    results = engine4.generate(requests, on_text=lambda i, piece: texts.append((i, piece)))
    for i, r in enumerate(results):
        assert r.completion_tokens == requests[i].params.max_new_tokens
        assert "".join(p for j, p in texts if j == i) == r.text


def test_a_freed_row_never_leaks_into_the_next_request(engine4, pictures):
    """Fill every slot beyond each row's length with large garbage: answers do not change."""
    requests = mixed_requests(pictures, 5)
    clean = engine4.generate(requests)
    engine4.clear_prefix_cache()
    for buf in (engine4.cache._k, engine4.cache._v):
        buf[:] = np.random.default_rng(0).uniform(-1e4, 1e4, buf.shape).astype(buf.dtype)
    dirty = engine4.generate(requests)
    assert [r.token_ids for r in dirty] == [r.token_ids for r in clean]


def test_cancel_frees_the_row_at_the_next_step(engine, pictures, planning):
    sched = planning(engine)
    first = sched.add(Request("a long answer", params=greedy(40)))
    second = sched.add(Request("what is it?", image=pictures[1], params=greedy(6)))
    for _ in range(3):
        sched.step()
    assert first.row == 0 and second.row is None and len(first.tokens) == 3  # one token per step
    first.cancel()
    sched.step()
    assert first.result().finish_reason == "cancel" and second.row == 0
    while sched.busy:
        sched.step()
    assert second.result().token_ids == engine.generate([second.request])[0].token_ids
    queued = sched.add(Request("never runs", params=greedy(5)))
    queued.cancel()
    sched.step()
    assert queued.result().finish_reason == "cancel" and queued.result().token_ids == []


def test_decode_bucket_follows_the_longest_active_row(engine4, planning):
    sched = planning(engine4)
    long = sched.add(Request("go on " * 5, params=greedy(20)))
    short = sched.add(Request("hi", params=greedy(24)))
    assert len(long.ids) + 20 > 32 >= len(short.ids) + 24
    buckets = []
    while sched.busy:
        sched.step()
        buckets.append((long.done, engine4.cache.bucket))
    assert max(b for done, b in buckets if not done) == 64   # the long row crossed 32 slots
    assert buckets[-1] == (True, 32)  # after it ended, the short row decodes in the smaller bucket again
    assert short.result().completion_tokens == 24


def test_a_long_prompt_does_not_freeze_running_streams(engine4, planning):
    """Policy: while rows decode, one step prefills at most one largest chunk (16 tokens here)."""
    sched = planning(engine4)
    running = sched.add(Request("hi", params=greedy(30)))
    sched.step()
    sched.step()
    long = sched.add(Request("word " * 20, params=greedy(2)))
    before = len(running.tokens)
    steps = 0
    while long.first_token_at is None:
        sched.step()
        steps += 1
    assert len(long.ids) > 32 and steps >= 3  # the long prompt took several steps ...
    assert len(running.tokens) - before == steps  # ... and the running stream got a token in each of them


def test_lockstep_admits_only_when_every_row_is_free(engine4, pictures, planning):
    sched = planning(engine4, lockstep=True)
    seqs = [sched.add(r) for r in mixed_requests(pictures, 6)]
    sched.step()
    assert sched.scheduler.rows_in_use == 4 and len(sched.scheduler.queue) == 2
    while not seqs[0].done:
        sched.step()
    assert len(sched.scheduler.queue) == 2  # a row is free, but lockstep waits for the whole batch
    while sched.busy:
        sched.step()
    assert [s.result().token_ids for s in seqs] == [r.token_ids for r in engine4.generate(mixed_requests(pictures, 6))]


def test_prefix_is_reused_only_for_the_same_pixels(tiny_bundle):
    """Fresh PIL images of two pictures, alternating (the user report): never the previous one's K/V (from the
    third request on, each picture's own image prefix, from the image-prefix cache)."""
    rng = np.random.default_rng(5)
    data = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    chat = Engine(tiny_bundle)
    fresh = Engine(tiny_bundle, prefix_cache=False)
    for i in range(4):
        request = Request("Describe the image.", image=Image.fromarray(data[i % 2]), params=greedy(6))
        r = chat.generate([request])[0]
        assert r.reused_tokens == (0 if i < 2 else chat.n_image + 1)  # another picture than the row's last one
        assert r.token_ids == fresh.generate([request])[0].token_ids
    again = chat.generate([Request("Describe the image.", image=Image.fromarray(data[1].copy()), params=greedy(6))])[0]
    assert again.reused_tokens == len(prompt(chat, "Describe the image.", True)[0]) - 1  # same pixels: reused


def test_ignore_eos_generates_exactly_max_new_tokens(engine):
    stops = engine.generate([Request("hi", params=SamplingParams(max_new_tokens=60, stop_ids=()))])[0]
    forced = engine.generate([Request("hi", params=SamplingParams(max_new_tokens=20, ignore_eos=True))])[0]
    assert forced.completion_tokens == 20 and forced.finish_reason == "length"
    assert forced.token_ids[:len(stops.token_ids)] == stops.token_ids[:20]


def test_any_other_write_to_a_row_ends_its_reuse(tiny_bundle):
    """Raw graph calls or another request overwrite a row: its old prefix is not reused."""
    e = Engine(tiny_bundle)
    request = Request("Describe the image.", params=greedy(4))
    first = e.generate([request])[0]
    assert e.generate([request])[0].reused_tokens > 0
    e.prefill([prompt(e, "something else entirely", False)[0]])
    again = e.generate([request])[0]
    assert again.reused_tokens == 0 and again.token_ids == first.token_ids
    with e.scheduler.policy(prefix_cache=False):
        e.generate([Request("other words here", params=greedy(3))])
    other, mine = prompt(e, "other words here", False)[0], prompt(e, "Describe the image.", False)[0]
    common = next(i for i, (a, b) in enumerate(zip(other, mine)) if a != b)
    last = e.generate([request])[0]
    assert last.reused_tokens == common < len(mine) - 1  # only what the other request really left: bos, "Question:"
    assert last.token_ids == first.token_ids
