"""Everything `bench` measures with one backend, in a fresh worker process per backend (clean peak RSS
and load time): `python -m cogvlm2_lite.bench.measure SPEC.json OUT.json`.

Sections, in order (each a function below, each with warm-up and repetitions): load; preprocessing;
the vision graph; TTFT phase by phase; prefill per chunk size; TTFT by prompt length; an image asked
about again (the encoder and image-prefix caches); serving (in-flight vs lockstep); decode per cache
bucket; the host's share of a decode step; generation end to end; a per-op profile (MindSpore,
onnxruntime). RSS is read after each phase.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from cogvlm2_lite.runtime.errors import UserError

from .photo import test_photo
from .profile import Recorder, mindspore_cell_call, profile_mindspore, profile_onnxruntime
from .timing import minor_faults, peak_rss_bytes, repeat, rss_bytes, stats

PROMPT = "Describe the image in detail."
# what `bench --sections` chooses from, in the order they run (generate needs decode)
SECTIONS = ("preprocess", "vision", "ttft", "ttft_text", "prefill", "ttft_curve", "image_reuse", "serving", "decode",
            "generate", "profile")
TORCHVISION_1344_S = 0.030  # FINDINGS: torchvision's Compose 27-32 ms per photo at 1344 on this machine class


def measure_backend(bundle_path: str, backend: str, o: dict) -> dict:
    """Every section with one backend -> its part of the report (`o`: the bench options)."""
    t = time.perf_counter()
    from cogvlm2_lite.runtime.engine import Engine
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    engine = Engine(bundle_path, backend=backend, prefix_cache=False)  # generate(): every request from its first token
    res = {"backend": backend,
           "load": {"import_s": import_s, "load_s": time.perf_counter() - t, "rss_after_load_bytes": rss_bytes()},
           "settings": {k: getattr(engine.backend, k) for k in ("threads", "spinning") if hasattr(engine.backend, k)}}
    rss = {"after_load": (rss_bytes(), peak_rss_bytes())}   # (current, peak) after each phase: who holds memory
    first_calls = res["load"]["first_call_s"] = {}          # a graph's first call compiles/allocates
    rng = np.random.default_rng(0)
    photo = test_photo()

    # the exported decode's logits for a fixed input, for the eager baseline to compare with
    engine.cache.lengths[:] = 0
    t = time.perf_counter()
    ref = engine.decode(np.full(engine.batch, 5, np.int32), np.zeros(engine.batch, np.int32))
    first_calls[f"decode_{engine.cache.bucket}"] = time.perf_counter() - t
    res["reference_logits"] = {"bucket": engine.cache.bucket, "token": 5, "position": 0}
    if o.get("ref_out"):
        np.save(o["ref_out"], ref)

    want = set(o.get("sections") or SECTIONS)
    if "preprocess" in want:
        res["preprocess"] = _preprocess(engine, photo, o)
    embeds = None
    if "vision" in want:
        res["vision"], embeds = _vision(engine, photo, o)
        first_calls["vision"] = res["vision"]["first_call_s"]
        rss["after_vision"] = (rss_bytes(), peak_rss_bytes())
    if "ttft" in want:
        res["ttft"] = _ttft(engine, photo, o, first_calls)
        rss["after_ttft"] = (rss_bytes(), peak_rss_bytes())
    if "ttft_text" in want:
        res["ttft_text"] = _ttft_text(engine, o)
    if "prefill" in want:
        if embeds is None:
            embeds = _vision(engine, photo, {**o, "warmup": 0, "reps": 1})[1]
        res["prefill"] = _prefill(engine, embeds, rng, o, rss)
    if "ttft_curve" in want:
        res["ttft_by_prompt_length"] = _ttft_curve(engine, rng, photo, max(1, o["reps"] // 3))
    if "image_reuse" in want:
        res["image_reuse"] = _image_reuse(engine, photo, o)
    if "serving" in want:
        res["serving"] = _serving(engine, rng, o)
    if "decode" in want:
        res["decode"], last_call = _decode(engine, o, rss)
        if "generate" in want:
            res["generate"] = _generate(engine, photo, o, _host(engine, res["decode"], last_call, ref, o))
    if "profile" in want and o.get("profile") and engine.backend.name in ("mindspore", "onnxruntime"):
        res["profile"] = _profile(engine, rng, o)
    rss["end"] = (rss_bytes(), peak_rss_bytes())
    res["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "kv_cache_bytes": int(engine.cache.nbytes),
                     "packed_weight_bytes": sum(getattr(engine.backend, "packed_bytes", {}).values()),
                     "weight_bytes": int(engine.bundle.weight_bytes(0)),
                     "rss_by_phase": {k: {"rss_bytes": a, "peak_rss_bytes": b} for k, (a, b) in rss.items()}}
    return res


def _preprocess(engine, photo: bytes, o: dict) -> dict:
    """JPEG decode, preprocessing at the bundle's size and at 1344 (split into resize and normalize,
    into a fresh and a reused buffer), and torchvision's Compose (or its stand-in) on the same photo."""
    from cogvlm2_lite.runtime.preprocess import SIZE, load_image, preprocess
    warmup, reps = o["warmup"], o["reps"]
    img = load_image(photo)
    pre = {"photo": {"width": img.width, "height": img.height, "jpeg_bytes": len(photo)}}
    pre["jpeg_decode_s"] = stats(repeat(lambda: load_image(photo), warmup, reps)[0])
    for label, s in (("bundle_size", engine.pre["image_size"]), ("size_1344", SIZE)):
        pre[label] = {"size": s, "s": stats(repeat(lambda: preprocess(img, s), warmup, reps)[0])}
    pre["size_1344_minor_faults_per_call"] = minor_faults(lambda: preprocess(img, SIZE))
    buf = np.empty((3, SIZE, SIZE), np.float32)   # the same into a reused buffer: no fresh pages to fault in
    pre["size_1344_reused_output_s"] = stats(repeat(lambda: preprocess(img, SIZE, out=buf), warmup, reps)[0])
    pre["resize_1344_s"] = stats(repeat(lambda: img.resize((SIZE, SIZE), 3), warmup, reps)[0])   # 3 = BICUBIC
    big = img.resize((SIZE, SIZE), 3)
    pre["normalize_1344_s"] = stats(repeat(lambda: preprocess(big, SIZE), warmup, reps)[0])
    pre["torchvision_1344_s"] = _torchvision_1344(img, warmup, reps)
    return pre


def _torchvision_1344(img, warmup: int, reps: int) -> dict:
    """torchvision's own Compose on the same image, when torchvision is installed (not a dependency)."""
    from importlib.util import find_spec

    from cogvlm2_lite.runtime.preprocess import MEAN, SIZE, STD
    if find_spec("torchvision") is None:
        # torchvision resizes PIL input with the same Pillow call, then ToTensor (uint8 HWC -> float32 CHW / 255)
        # and Normalize ((x - mean) / std): that arithmetic in numpy, timed here and now, is the stand-in
        big = img.resize((SIZE, SIZE), 3)
        mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(STD, np.float32).reshape(3, 1, 1)

        def torchvision_like():
            x = np.ascontiguousarray(np.asarray(big).transpose(2, 0, 1)).astype(np.float32)
            x /= np.float32(255)
            x -= mean
            x /= std
            return x
        return {"measured": False, "findings_reference_s": TORCHVISION_1344_S,
                "normalize_numpy_standin_s": stats(repeat(torchvision_like, warmup, reps)[0]),
                "note": "torchvision not installed: goal = Pillow resize (the call torchvision makes) + torchvision's "
                        "ToTensor/Normalize arithmetic in numpy, timed in the same run; FINDINGS measured torchvision "
                        "itself at 27-32 ms on a quiet machine"}
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize((SIZE, SIZE), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return {"measured": True, "s": stats(repeat(lambda: tf(img), warmup, reps)[0])}


def _vision(engine, photo: bytes, o: dict):
    """-> ({"s", "first_call_s"} of the vision graph, the photo's image embeddings)."""
    from cogvlm2_lite.runtime.preprocess import load_image
    pixels = engine.pixels([load_image(photo)])
    times, first = repeat(lambda: engine.image_embeddings(pixels), o["warmup"], o["reps"])
    return {"s": stats(times), "first_call_s": first}, engine.image_embeddings(pixels)


def _ttft(engine, photo: bytes, o: dict, first_calls: dict) -> dict:
    """TTFT of the image prompt, phase by phase with the raw calls as generate() runs them, and as
    generate() reports it."""
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.preprocess import load_image
    from cogvlm2_lite.runtime.sampling import Sampler, SamplingParams
    from cogvlm2_lite.runtime.tokenizer import position_ids
    greedy = SamplingParams(max_new_tokens=1)
    phases = {k: [] for k in ("tokenize", "preprocess", "vision", "prefill", "first_sample")}
    for i in range(o["warmup"] + o["reps"]):
        t0 = time.perf_counter()
        ids, types = engine.tokenizer.build_inputs(PROMPT, (), engine.template, engine.n_image)
        pos = position_ids(types)
        t1 = time.perf_counter()
        px = engine.pixels([load_image(photo)])
        t2 = time.perf_counter()
        emb = engine.image_embeddings(px)
        t3 = time.perf_counter()
        logits = engine.prefill([ids], emb, [pos])
        t4 = time.perf_counter()
        Sampler(greedy, ids)(logits[0])
        t5 = time.perf_counter()
        if i == 0:
            first_calls["prefill_image+extend"] = t4 - t3
        if i >= o["warmup"]:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(dt)
    gen = [engine.generate([Request(PROMPT, image=photo, params=greedy)])[0].ttft_s for _ in range(max(1, o["reps"] // 2))]
    return {"prompt_tokens": len(ids), "s": stats([sum(p) for p in zip(*phases.values())]),
            "breakdown": {k: stats(v) for k, v in phases.items()}, "generate_ttft_s": stats(gen)}


def _ttft_text(engine, o: dict) -> dict:
    """TTFT of the same question without the image, phase by phase."""
    from cogvlm2_lite.runtime.sampling import Sampler, SamplingParams
    from cogvlm2_lite.runtime.tokenizer import position_ids
    greedy = SamplingParams(max_new_tokens=1)
    phases = {k: [] for k in ("tokenize", "prefill", "first_sample")}
    for i in range(o["warmup"] + o["reps"]):
        t0 = time.perf_counter()
        ids, types = engine.tokenizer.build_inputs(PROMPT, (), engine.template, 0)
        t1 = time.perf_counter()
        logits = engine.prefill([ids], None, [position_ids(types)])
        t2 = time.perf_counter()
        Sampler(greedy, ids)(logits[0])
        if i >= o["warmup"]:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                phases[k].append(dt)
    return {"prompt_tokens": len(ids), "s": stats([sum(p) for p in zip(*phases.values())]),
            "breakdown": {k: stats(v) for k, v in phases.items()}}


def _prefill(engine, embeds, rng, o: dict, rss: dict) -> list:
    """Per chunk size C, filled, row 0: an image prompt's first chunk (bos + image + C text tokens) and
    a text chunk against the empty cache."""
    from cogvlm2_lite.runtime.tokenizer import position_ids
    tok, n_image = engine.tokenizer, engine.n_image
    ranks = engine.bundle.manifest["tokenizer"]["bpe_ranks"]
    runs = []
    for c in engine.chunks:
        row = [tok.bos_id] + [tok.pad_id] * n_image + rng.integers(0, ranks, c).tolist()
        pos = position_ids([0] + [1] * n_image + [0] * c)
        runs.append(("prefill_image", c, n_image + 1 + c, lambda row=row, pos=pos: engine.prefill_image(0, embeds[0], row, pos)))
    for c in engine.chunks:
        row = rng.integers(0, ranks, c).tolist()
        runs.append(("extend", c, c, lambda row=row: engine.prefill([row])))
    out = []
    for kind, c, tokens, fn in runs:
        times, first = repeat(fn, o["warmup"], o["reps"])
        out.append({"kind": kind, "bucket": c, "tokens": tokens, "s": stats(times), "first_call_s": first,
                    "tokens_per_s": tokens / stats(times)["median"]})
        rss[f"after_{kind}_{c}"] = (rss_bytes(), peak_rss_bytes())
    return out


def _random_prompts(engine, rng, n_tokens: int) -> list[str]:
    """Token-sized pieces of text (random vocabulary ids decoded), to build prompts of known length."""
    ranks = engine.bundle.manifest["tokenizer"]["bpe_ranks"]
    return [engine.tokenizer.decode([int(i)]) for i in rng.integers(0, ranks, n_tokens)]


def _ttft_curve(engine, rng, photo: bytes, reps: int) -> list:
    """TTFT of text-only and image prompts of growing length (greedy, one token): with chunked
    prefill it grows with the prompt, in steps no larger than the smallest chunk's padding."""
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    top = min(engine.cache.max_len - 1, 4 * engine.chunks[-1])
    lengths = sorted({max(8, int(x)) for x in np.linspace(8, top, 12)})
    words = _random_prompts(engine, rng, 4 * top)
    rows = []
    for with_image in (False, True):
        for n in lengths:
            req = Request("".join(words[:n]), image=photo if with_image else None, template="base", params=one)
            try:
                times = [engine.generate([req])[0] for _ in range(reps + 1)][1:]  # the first warms up
            except UserError:  # longer than the cache once tokenized
                continue
            rows.append({"image": with_image, "prompt_tokens": times[0].prompt_tokens,
                         "ttft_s": stats(r.ttft_s for r in times)})
    return rows


def _image_reuse(engine, photo: bytes, o: dict) -> dict:
    """Image X + question 1, image Y, image X + question 2, one after another with the caches on (issue 30): the
    third request's TTFT against the first's (it copies X's cached image prefix and prefills only its text), its
    tokens against the same request computed from nothing, and the caches' counters over the sequence."""
    from io import BytesIO

    from PIL import Image

    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    other = Image.open(BytesIO(photo)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)   # image Y: other pixels
    asks = [Request(PROMPT, image=photo, params=params), Request("What is in the picture?", image=other, params=params),
            Request("Which colours are in the picture, and where?", image=photo, params=params)]
    def since(before: dict) -> dict:   # the caches' counters since `before`, their sizes now
        return {name: {k: v - before[name][k] if k in ("hits", "misses", "evictions") else v
                       for k, v in c.stats().items()} for name, c in engine.image_caches.items()}
    runs = []
    warmup = min(1, o["warmup"])
    for i in range(warmup + max(1, o["reps"] // 3)):
        engine.clear_prefix_cache()
        before = {name: c.stats() for name, c in engine.image_caches.items()}
        with engine.scheduler.policy(prefix_cache=True, encoder_cache=True):   # one request at a time, caches on
            results = [engine.generate([r])[0] for r in asks]
        if i >= warmup:
            runs.append((results, since(before)))
    with engine.scheduler.policy(prefix_cache=False, encoder_cache=False):
        fresh = engine.generate([asks[2]])[0]
    engine.clear_prefix_cache()
    results, caches = runs[-1]
    return {"ttft_s": [stats(rs[k].ttft_s for rs, _ in runs) for k in range(3)],
            "third_over_first": stats(rs[2].ttft_s / rs[0].ttft_s for rs, _ in runs),
            "reused_tokens": [r.reused_tokens for r in results], "prompt_tokens": [r.prompt_tokens for r in results],
            "tokens_equal_fresh": all(rs[2].token_ids == fresh.token_ids for rs, _ in runs), "caches": caches}


def _serving(engine, rng, o: dict) -> dict:
    """Output tokens/s of one stream of mixed requests (text-only prompts of 16..200 tokens, max_new_tokens
    spread 8..128, ignore_eos; both ranges shrunk to fit a smaller cache) kept at concurrency 1, B and 2B by a
    closed-loop client, with in-flight batching; and the same stream under lockstep batching (a batch
    admits only when all rows are free)."""
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    n = max(4 * engine.batch, 12) if not o.get("quick") else 2 * engine.batch + 2
    top = max(17, min(200, engine.cache.max_len // 2))                  # prompt tokens, up to
    new_top = max(9, min(129, engine.cache.max_len - top - 2))          # new tokens, up to
    words = _random_prompts(engine, rng, 4 * top)
    reqs = [Request("".join(words[:int(rng.integers(16, top))]), template="base",
                    params=SamplingParams(max_new_tokens=int(rng.integers(8, new_top)), ignore_eos=True))
            for _ in range(n)]
    out = []
    for lockstep in (False, True):
        for conc in sorted({1, engine.batch, 2 * engine.batch}):
            if lockstep and conc == 1:
                continue
            with engine.scheduler.policy(prefix_cache=False, lockstep=lockstep):
                todo = list(reqs)
                seqs = [engine.add(todo.pop(0)) for _ in range(min(conc, len(todo)))]
                t = time.perf_counter()
                while engine.busy:
                    engine.step()
                    while todo and sum(not s.done for s in seqs) < conc:
                        seqs.append(engine.add(todo.pop(0)))
                wall = time.perf_counter() - t
            tokens = sum(len(s.tokens) for s in seqs)
            out.append({"policy": "lockstep" if lockstep else "in-flight", "concurrency": conc, "requests": n,
                        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
                        "ttft_s": stats(s.result().ttft_s for s in seqs)})
    return {"batch": engine.batch, "runs": out}


def _decode(engine, o: dict, rss: dict):
    """Decode per cache bucket (the graph of bucket T reads all T slots, so T, not the fill, sets the
    cost) -> (rows, the last decode graph call (name, inputs, outputs))."""
    cache, warmup = engine.cache, o["warmup"]
    cache.materialize()   # the slots below each depth are read from memory, as after a real prefill
    decode, prev, last = [], 0, None
    tokens = np.full(engine.batch, 7, np.int32)
    for t_bucket in engine.cache.buckets:
        n = min(warmup + o["decode_reps"], t_bucket - prev)
        w = min(warmup, n - 1)
        if n - w < 1:
            continue
        length = max(prev, t_bucket - n)
        cache.lengths[:] = length
        step, graph, first = [], [], None
        with Recorder(engine.backend) as rec:
            for i in range(n):
                g0 = engine.timings.graph_s.get("decode", 0.0)
                t = time.perf_counter()
                engine.decode(tokens, cache.lengths.copy())
                dt = time.perf_counter() - t
                first = first if first is not None else dt
                if i >= w:
                    step.append(dt)
                    graph.append(engine.timings.graph_s["decode"] - g0)
        last = name, inputs, _ = rec.last
        # the same graph call again, alternating the backend's run() and the bare graph (same inputs):
        # interleaved, so a busy machine slows both alike and their difference is the adapter's cost
        cell = mindspore_cell_call(engine.backend, name, inputs)
        run_times, cell_times = [], []
        for i in range(1 + max(2, o["decode_reps"] // 2)):
            t = time.perf_counter()
            rec.run(name, inputs)
            t1 = time.perf_counter()
            if cell:
                cell()
            t2 = time.perf_counter()
            if i:
                run_times.append(t1 - t)
                if cell:
                    cell_times.append(t2 - t1)
        decode.append({"bucket": t_bucket, "cache_len_from": length, "cache_len_to": length + n,
                       "step_s": stats(step), "graph_s": stats(graph),
                       "outside_graph_s": stats(a - b for a, b in zip(step, graph)),
                       "backend_run_s": stats(run_times), "graph_cell_s": stats(cell_times),
                       "adapter_s": max(0.0, min(run_times) - min(cell_times)) if cell_times else None,
                       "first_call_s": first})
        prev = t_bucket
        rss[f"after_decode_{t_bucket}"] = (rss_bytes(), peak_rss_bytes())
    return decode, last


def _host(engine, decode: list, last_call, ref_logits, o: dict) -> dict:
    """The host-side pieces of a decode step, in isolation: sampling, the cache append, the engine's own
    work around the graph call and the backend adapter's."""
    from cogvlm2_lite.runtime.sampling import Sampler, SamplingParams
    cache = engine.cache
    _, inputs, outputs = last_call
    lengths = cache.lengths.copy()
    cache.lengths[:] = 0
    append_times, _ = repeat(lambda: cache.append(outputs[1], outputs[2]), o["warmup"], o["reps"])
    cache.lengths[:] = lengths
    sampler = Sampler(SamplingParams(max_new_tokens=10 ** 6), [1, 2, 3])
    sample_times, _ = repeat(lambda: sampler(ref_logits[0]), o["warmup"], o["reps"])
    host = {"sample_s": stats(sample_times)["median"], "cache_append_s": stats(append_times)["median"]}
    # structured output: the JSON-schema mask (runtime/structured.py) on the same logits; an open-ended schema
    # (an array of strings) so that every step computes a real mask
    from cogvlm2_lite.runtime.structured import TokenMask
    schema = {"type": "array", "items": {"type": "string"}}
    TokenMask(schema, engine.tokenizer, engine.stop_ids)           # the vocabulary is read once per engine
    masked = Sampler(SamplingParams(max_new_tokens=10 ** 6, json_schema=schema), [1, 2, 3],
                     TokenMask(schema, engine.tokenizer, engine.stop_ids))
    masked_times, _ = repeat(lambda: masked(ref_logits[0]), o["warmup"], o["reps"])
    host["structured_sample_s"] = stats(masked_times)["median"]
    host["structured_mask_s"] = max(0.0, host["structured_sample_s"] - host["sample_s"])
    if decode:
        host["structured_mask_share_of_decode_step"] = host["structured_mask_s"] / decode[0]["step_s"]["median"]
        host["engine_decode_outside_graph_s"] = decode[0]["outside_graph_s"]["median"]   # inputs, bucket, append
        if decode[0]["adapter_s"] is not None:   # best-of differences: the adapter's intrinsic cost, not the noise
            host["backend_adapter_s"] = decode[0]["adapter_s"]   # inside the timed graph call, for reference
            host["inputs_per_decode_call"] = len(inputs)
    return host


def _generate(engine, photo: bytes, o: dict, host: dict) -> dict:
    """Generation end to end, the decode loop as generate() runs it; the host's share of a step."""
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    gen = []
    params = SamplingParams(max_new_tokens=o["gen_tokens"], ignore_eos=True)
    for i in range(o["warmup"] + o["gen_reps"]):
        tm = engine.timings
        g0, l0, s0 = tm.graph_s.get("decode", 0.0), tm.decode_loop_s, tm.decode_steps
        r = engine.generate([Request(PROMPT, image=photo, params=params)])[0]
        if i >= o["warmup"]:
            loop, graph, steps = tm.decode_loop_s - l0, tm.graph_s.get("decode", 0.0) - g0, tm.decode_steps - s0
            gen.append({"total_s": r.total_s, "ttft_s": r.ttft_s, "tokens": r.completion_tokens, "loop_s": loop,
                        "graph_s": graph, "steps": steps})
    loop = sum(g["loop_s"] for g in gen)
    graph = sum(g["graph_s"] for g in gen)
    steps = sum(g["steps"] for g in gen)
    host["loop_step_s"] = loop / max(steps, 1)
    host["graph_per_step_s"] = graph / max(steps, 1)
    return {
        "new_tokens": o["gen_tokens"], "reps": len(gen), "prompt_tokens": r.prompt_tokens,
        "e2e_tokens_per_s": stats(g["tokens"] / g["total_s"] for g in gen),
        "decode_tokens_per_s": stats((g["tokens"] - 1) / (g["total_s"] - g["ttft_s"]) for g in gen if g["tokens"] > 1),
        "tpot_s": stats(g["loop_s"] / g["steps"] for g in gen if g["steps"]),
        "host_overhead_share": (loop - graph) / loop if loop > 0 else 0.0,
        "host_breakdown": host,
        "note": "host overhead share = (decode loop time - time inside decode graph calls) / decode loop time, "
                "Engine.timings; graph time includes the backend adapter (input wrapping, output copies)"}


def _profile(engine, rng, o: dict) -> dict:
    """The backend's own per-op profile of a decode step (smallest and largest bucket); with MindSpore, of
    a prefill chunk too."""
    cache, tokens, backend = engine.cache, np.full(engine.batch, 7, np.int32), engine.backend
    out = {}

    cache.materialize()

    def decode_profile(length):
        cache.fit(length + 1)   # the smallest bucket holding it (decoding only grows the cache)
        cache.lengths[:] = length
        with Recorder(backend) as rec:
            engine.decode(tokens, cache.lengths.copy())
        name, inputs, _ = rec.last
        if backend.name == "onnxruntime":
            return {"graph": name, **profile_onnxruntime(backend, name, inputs, o["profile_steps"])}
        rec.run(name, inputs)
        return {"graph": name, **profile_mindspore(lambda: rec.run(name, inputs), o["profile_steps"])}

    try:
        out["decode"] = decode_profile(0)
        if len(engine.cache.buckets) > 1:   # the largest bucket too: does the cache length matter?
            out["decode_largest"] = decode_profile(engine.cache.max_len - 2)
        if backend.name != "mindspore":
            return out
        c = engine.chunks[-1]
        ranks = engine.bundle.manifest["tokenizer"]["bpe_ranks"]
        row = [engine.tokenizer.bos_id] + rng.integers(0, ranks, c - 1).tolist()
        out["prefill"] = {"graph": f"extend_{c}_{engine.cache.bucket}",
                          **profile_mindspore(lambda: engine.prefill([row]), 1)}
    except Exception as e:  # the profiler is a diagnostic: never lose the run for it
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main(spec_path: str, out_path: str):
    spec = json.loads(Path(spec_path).read_text())
    try:
        res = measure_backend(spec["bundle"], spec["backend"], spec["options"])
    except UserError as e:
        res = {"backend": spec["backend"], "error": str(e)}
    Path(out_path).write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
