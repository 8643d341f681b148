"""Issue 30: the encoder cache and image-prefix reuse across rows: an image seen before costs neither its
vision graph nor its image prefill again, and changes no answer."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvlm2_lite.runtime.encoder_cache import ByteLRU, pixel_digest
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.sampling import SamplingParams

from conftest import prompt


def greedy(n=8):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def pictures():
    """Two different random pictures (X, Y), as uint8 arrays."""
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (36 + 8 * i, 44, 3), dtype=np.uint8) for i in range(2)]


@pytest.fixture(scope="module")
def fresh(onnx_bundle):
    """The reference: nothing reused, every request from its first token, vision run every time."""
    return Engine(onnx_bundle, prefix_cache=False, encoder_cache_mb=0, prefix_cache_mb=0)


def tokens_alone(engine, request):
    return engine.generate([request])[0].token_ids


def test_byte_lru_evicts_the_least_recently_used_under_its_bound():
    entry = lambda i: np.full(25, i, np.float32)   # noqa: E731  (100 bytes)
    cache = ByteLRU(350)
    for i in range(3):
        assert cache.put(i, entry(i))
    assert cache.get(0)[0] == 0                     # 0 is now the most recently used
    assert cache.put(3, (entry(3), entry(3)))       # 200 bytes: 1 and 2 must go, 0 stays
    assert 1 not in cache and 2 not in cache and 0 in cache and 3 in cache
    assert cache.bytes == 300 <= cache.capacity and cache.evictions == 2
    assert cache.get(1) is None and (cache.hits, cache.misses) == (1, 1)
    assert not cache.put(4, np.zeros(100, np.float32)) and len(cache) == 2   # larger than the bound: kept out, nothing evicted
    assert cache.put(0, entry(9)) and cache.bytes == 300 and cache.get(0)[0] == 9   # replaced, not counted twice
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.hits == 2    # counters are monotonic (Prometheus)
    assert not ByteLRU(0).put(0, entry(0))


def test_the_same_pixels_from_any_source_are_one_entry(onnx_bundle, fresh, pictures, tmp_path):
    """Path, bytes, PIL and preprocessed ndarray of one picture hit one encoder-cache entry (Y in between,
    so that the row never still holds X: the embeddings, not the row, are reused)."""
    x, y = (Image.fromarray(p) for p in pictures)
    path = tmp_path / "x.png"
    x.save(path)
    e = Engine(onnx_bundle, prefix_cache_mb=0)
    sources = [path, path.read_bytes(), Image.open(io.BytesIO(path.read_bytes())), e.pixels([x])[0]]
    assert len({pixel_digest(e.pixels([s])[0]) for s in sources}) == 1
    want = tokens_alone(fresh, Request("What is it?", image=x, params=greedy()))
    for source in sources:
        assert tokens_alone(e, Request("What is it?", image=source, params=greedy())) == want
        e.generate([Request("And this?", image=y, params=greedy(2))])
    st = e.encoder_cache.stats()
    assert (st["misses"], st["hits"], st["entries"]) == (2, 6, 2)   # X and Y once each, then every time from the cache
    assert e.timings.calls["vision"] == 2
    assert st["bytes"] == 2 * e.n_image * e.bundle.manifest["model"]["hidden_size"] * 4
    assert len(e.image_prefixes) == 0   # --prefix-cache-mb 0: none kept


def test_an_edited_pil_image_misses(onnx_bundle, fresh, pictures):
    """The same PIL object, edited in place: pixels are compared, not the object."""
    img = Image.fromarray(pictures[0])
    e = Engine(onnx_bundle)
    e.generate([Request("What is it?", image=img, params=greedy(2))])
    img.paste((255, 0, 0), (0, 0, 20, 20))
    request = Request("What is it?", image=img, params=greedy())
    r = e.generate([request])[0]
    assert r.reused_tokens == 0
    assert e.encoder_cache.stats()["hits"] == 0 and e.image_prefixes.stats()["hits"] == 0
    assert len(e.encoder_cache) == 2 and len(e.image_prefixes) == 2
    assert r.token_ids == tokens_alone(fresh, request)


def test_the_encoder_cache_evicts_under_its_bound(onnx_bundle, pictures):
    """Room for one image's embeddings: X, Y, X all run the vision graph."""
    probe = Engine(onnx_bundle, encoder_cache_mb=0)
    one = probe.image_embeddings(probe.pixels([Image.fromarray(pictures[0])]))[0].nbytes
    e = Engine(onnx_bundle, prefix_cache_mb=0, encoder_cache_mb=1.5 * one / 2**20)   # B = 1: the row never holds X
    for p in (pictures[0], pictures[1], pictures[0]):
        e.generate([Request("What is it?", image=Image.fromarray(p), params=greedy(1))])
    st = e.encoder_cache.stats()
    assert (st["hits"], st["misses"], st["evictions"], st["entries"]) == (0, 3, 2, 1) and st["bytes"] == one
    assert e.timings.calls["vision"] == 3


@pytest.mark.parametrize("bundle", ["tiny_bundle", "onnx_bundle"])
def test_image_x_again_after_image_y_prefills_only_its_text(bundle, request, pictures):
    """B = 1: X + question 1, Y, X + question 2. The third reuses X's bos + image K/V (copied into the row Y
    held), runs no vision graph, and its greedy tokens equal a fresh engine's (MindIR and ONNX)."""
    path = request.getfixturevalue(bundle)
    x, y = (Image.fromarray(p) for p in pictures)
    e = Engine(path)
    fresh = Engine(path, prefix_cache=False, encoder_cache_mb=0, prefix_cache_mb=0)
    asks = [Request("What is in the picture?", image=x, params=greedy()), Request("Describe it.", image=y, params=greedy()),
            Request("How many colours does the picture have, and where are they?", image=x, params=greedy(12))]
    results = [e.generate([r])[0] for r in asks]
    assert [r.reused_tokens for r in results] == [0, 0, e.n_image + 1]
    assert e.timings.calls["vision"] == 2 and e.image_prefixes.stats()["hits"] == 1
    want = fresh.generate([asks[2]])[0]
    assert results[2].token_ids == want.token_ids
    ids = prompt(e, asks[2].prompt, True)[0]
    assert int(e.cache.lengths[0]) == int(fresh.cache.lengths[0]) == len(ids) + 11   # the last token is not fed back
    n = e.n_image + 1
    for mine, theirs in zip(e.cache.read(0, n), fresh.cache.read(0, n)):   # the K/V a fresh prefill writes
        assert np.abs(mine - theirs).max() <= 1e-5
    e.clear_prefix_cache()
    assert len(e.encoder_cache) == len(e.image_prefixes) == 0
    again = e.generate([asks[2]])[0]
    assert again.reused_tokens == 0 and again.token_ids == want.token_ids


def test_several_rows_read_one_cached_prefix(engine4, fresh, pictures):
    """B = 4: four questions about a new image arrive together. The first row prefills the image; the
    other three copy its prefix in the same step; the vision graph runs once; each answer is its answer alone."""
    engine4.clear_prefix_cache()
    img = Image.fromarray(pictures[1][::-1].copy())
    questions = ["What is it?", "Which colour is on top?", "Is there a circle?", "Describe the image in a word."]
    vision = engine4.timings.calls.get("vision", 0)
    hits = engine4.image_prefixes.stats()["hits"]   # the shared engine's counters only grow
    seqs = [engine4.add(Request(q, image=img, params=greedy(6 + i))) for i, q in enumerate(questions)]
    engine4.step()
    assert sorted(s.row for s in seqs) == [0, 1, 2, 3] and all(s.first_token_at is not None for s in seqs)
    while engine4.busy:
        engine4.step()
    assert [s.reused for s in seqs] == [0] + [engine4.n_image + 1] * 3
    assert engine4.timings.calls["vision"] == vision + 1
    assert engine4.image_prefixes.stats()["hits"] == hits + 3 and engine4.encoder_cache.stats()["misses"] >= 1
    for s in seqs:
        assert s.result().token_ids == tokens_alone(fresh, s.request)


def test_prefix_cache_off_recomputes_everything(onnx_bundle, pictures):
    """prefix_cache=False, encoder_cache=False: what bench measures, every image from its pixels."""
    e = Engine(onnx_bundle)
    x = Image.fromarray(pictures[0])
    with e.scheduler.policy(prefix_cache=False, encoder_cache=False):
        results = e.generate([Request("What is it?", image=x, params=greedy(2)) for _ in range(2)])
    assert [r.reused_tokens for r in results] == [0, 0] and e.timings.calls["vision"] == 2
    assert len(e.encoder_cache) == len(e.image_prefixes) == 0


def test_tp2_ranks_keep_their_own_slice_and_answer_as_tp1(tiny_bundle, tiny_bundle_tp2, pictures, tmp_path):
    """Under msrun, X + question 1, Y, X + question 2: each rank caches the prefix of its own KV heads, both reuse
    it alike, and the third answer equals tp 1's computed from nothing."""
    np.savez(tmp_path / "pictures.npz", *pictures)
    script = tmp_path / "tp_reuse.py"
    script.write_text(f"""
import numpy as np
from PIL import Image
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.sampling import SamplingParams
pictures = np.load({str(tmp_path / "pictures.npz")!r})
x, y = (Image.fromarray(pictures[k]) for k in ("arr_0", "arr_1"))
e = Engine({str(tiny_bundle_tp2)!r})
g = SamplingParams(max_new_tokens=8, ignore_eos=True)
asks = [Request("What is in the picture?", image=x, params=g), Request("Describe it.", image=y, params=g),
        Request("How many colours are there?", image=x, params=g)]
if e.rank == 0:   # rank 0 schedules; every rank's runner executes its plans
    rs = [e.generate([r])[0] for r in asks]
    e.close()
    np.savez({str(tmp_path)!r} + "/rank0-results.npz", tokens=rs[2].token_ids, reused=[r.reused_tokens for r in rs],
             hits=e.image_prefixes.hits)
else:
    e.follow()
k, v = next(iter(e.runner.prefixes.values()))
np.savez({str(tmp_path)!r} + f"/rank{{e.rank}}.npz", heads=k.shape[2], entries=len(e.runner.prefixes))
""")
    msrun = Path(sys.executable).parent / "msrun"
    env = {**os.environ, "PATH": f"{msrun.parent}:{os.environ['PATH']}", "GLOG_v": "3"}
    subprocess.run([str(msrun), "--worker_num=2", "--local_worker_num=2", "--master_port=29733", "--join=True",
                    f"--log_dir={tmp_path / 'logs'}", str(script)], check=True, env=env, capture_output=True, timeout=300)
    fresh = Engine(tiny_bundle, prefix_cache=False)
    want = fresh.generate([Request("How many colours are there?", image=Image.fromarray(pictures[0]),
                                   params=greedy())])[0].token_ids
    got = np.load(tmp_path / "rank0-results.npz")
    assert got["tokens"].tolist() == want and got["reused"].tolist() == [0, 0, fresh.n_image + 1]
    assert int(got["hits"]) == 1
    kv_heads = fresh.bundle.manifest["kv_cache"]["kv_heads"]
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["heads"]) * 2 == kv_heads and int(got["entries"]) == 2
