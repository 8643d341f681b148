"""`cogvlm2-lite bench BUNDLE`: how fast a bundle runs here, and how far from what this machine allows.

One run measures, with warm-up and repetitions (median, p90, p99):
  - bundle load time, first call of each graph, peak RSS, KV-cache and weight bytes;
  - image preprocessing (JPEG decode, resize, normalize) at the bundle's size and at 1344;
  - the vision graph; TTFT with its breakdown (tokenize, preprocess, vision, prefill, first sample);
  - prefill tokens/s per bucket; decode time per token per cache bucket;
  - generation end to end (tokens/s) and the host share of a decode step (time outside graph calls,
    from Engine.timings, split further into sampling, cache writes and the backend adapter);
and the reference points that give those numbers a meaning:
  - the machine's read bandwidth with all cores and the bytes one decode step must read -> decode's
    fraction of the memory roofline; numpy's GEMV over the same matrices (what plain BLAS reaches);
  - BLAS fp32 GEMM FLOP/s -> prefill's fraction of peak;
  - the same decode step run eagerly (MindSpore PyNative, graphs/ cells, same weights): the no-AOT
    baseline, in `cogvlm2_lite.export.eager` (it needs the model code; the runtime does not);
  - a per-op MindSpore profile of a decode step (where the time inside the graph goes).
Every available backend is measured side by side, each in its own process (clean peak RSS and load
time); the machine probes and the eager baseline run in their own processes too. Targets are
reported, never asserted: where one is missed the report says what the measurements show limits it.

`cogvlm2-lite bench-suite` exports the tiny and bench presets once (cached under bundles/) and
benchmarks both into out/bench/ (JSON + PNG), comparing with the previous run when there is one.
"""
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from .errors import UserError
from .options import stack

SCHEMA = "cogvlm2-lite-bench/1"
PROMPT = "Describe the image in detail."
TORCHVISION_1344_S = 0.030  # FINDINGS: torchvision's Compose 27-32 ms per photo at 1344 on this machine class
TARGETS = {"decode_roofline_fraction": 0.60, "host_overhead_share": 0.03, "eager_over_exported": 10.0,
           "preprocess_1344_s": TORCHVISION_1344_S}


# --- statistics and small helpers ---------------------------------------------------------------
def stats(xs) -> dict:
    a = np.asarray(list(xs), np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def repeat(fn, warmup: int, reps: int):
    """-> (times of the timed reps, time of the very first call)."""
    first = None
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        first = first if first is not None else time.perf_counter() - t
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out, first if first is not None else out[0]


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return peak_rss_bytes()


def test_photo(width=1024, height=768, seed=0) -> bytes:
    """A deterministic photo-like JPEG (smooth gradients, shapes, sensor noise): realistic decode and
    resize cost without shipping an image."""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, 120))
        d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    buf = BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- what the bundle must read and compute (from its manifest and safetensors headers) --------------
def tensor_table(bundle, rank: int = 0) -> dict:
    """name -> (dtype, shape, bytes), read from the safetensors headers only (no weights loaded)."""
    from .bundle import safetensors_header
    table = {}
    for path in bundle.weight_files(rank):
        for name, info in safetensors_header(path).items():
            a, b = info["data_offsets"]
            table[name] = (info["dtype"], tuple(info["shape"]), b - a)
    return table


def is_vision_expert(name: str) -> bool:
    return "vision_expert" in name or "vision_mlp" in name


def logical_matrix(name: str, dtype: str, shape: tuple, table: dict) -> list | None:
    """[out, in] of the linear a stored tensor holds (quantized forms: manifest `quant`), else None."""
    if name.endswith((".scale", ".smooth")) or len(shape) != 2:
        return None
    if not name.endswith(".qweight"):
        return list(shape)
    if dtype == "U8":                                        # 4-bit codes, two per byte
        return [shape[0], 2 * shape[1]]
    base = name[:-len(".qweight")]
    return [shape[1], shape[0]] if base + ".smooth" in table else list(shape)   # w8a8 stores [in, out]


def model_costs(bundle) -> dict:
    """Bytes one decode step reads and FLOPs of each prefill chunk, for the rank-0 graphs."""
    m = bundle.manifest
    cfg, kv = m["model"], m["kv_cache"]
    table = tensor_table(bundle)
    b = bundle.batch
    weight_bytes, gemv_shapes, layer_params = 0, [], 0
    for name in bundle.weight_names("language"):
        dtype, shape, nbytes = table[name]
        if is_vision_expert(name):
            continue
        if name == "model.embed_tokens.weight":
            weight_bytes += b * nbytes // shape[0]          # one row per sequence
            continue
        weight_bytes += nbytes
        matrix = logical_matrix(name, dtype, shape, table)
        if matrix:
            gemv_shapes.append(matrix)
            if not name.startswith("lm_head."):
                layer_params += matrix[0] * matrix[1]
    itemsize = np.dtype({"float32": np.float32, "float16": np.float16}.get(kv["dtype"], np.float16)).itemsize
    kv_bytes = {str(t): 2 * kv["layers"] * b * kv["kv_heads"] * t * kv["head_dim"] * itemsize
                for t in bundle.buckets["decode"]}
    hidden, vocab, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    lm_head = (vocab // m["tp"], hidden)

    def prefill_flops(s):  # one row's chunk of s tokens (padding included), lm_head on its last token
        return 2 * s * layer_params + layers * 4 * s * s * hidden + 2 * lm_head[0] * lm_head[1]

    image = m["num_image_tokens"] + 1
    flops = {"extend": {str(c): prefill_flops(c) for c in bundle.buckets["chunk"]},
             "prefill_image": {str(c): prefill_flops(image + c) for c in bundle.buckets["chunk"]}}
    params = {fam: sum(math.prod(table[n][1]) for n in bundle.weight_names(fam)) for fam in ("vision", "language")}
    return {"decode_weight_bytes": weight_bytes, "kv_read_bytes": kv_bytes, "gemv_shapes": gemv_shapes,
            "prefill_flops": flops, "params": params,
            "note": "decode reads the language-expert path (qkv, dense, MLP, norms of every layer), lm_head, one "
                    "embedding row per sequence, and the whole K/V of its cache bucket (masked slots included)"}


# --- the measurements, inside one worker process per backend -----------------------------------------
def _mindspore_cell_call(backend, name, inputs):
    """A zero-argument call of the bare GraphCell with pre-wrapped inputs (MindSpore only), to split the
    backend adapter's cost (wrapping inputs, asnumpy) from the graph's. None where not applicable."""
    graphs, weights = getattr(backend, "_graphs", None), getattr(backend, "_weights", None)
    if getattr(backend, "name", "") != "mindspore" or not graphs or name not in graphs:
        return None
    import mindspore as ms
    cell, family = graphs[name]
    args = [ms.Tensor.from_numpy(x) for x in inputs] + list(weights[family])
    return lambda: cell(*args)


class _Recorder:
    """Wraps backend.run to keep the last call's graph name, inputs and outputs."""

    def __init__(self, backend):
        self.backend, self.run = backend, backend.run
        self.last = None

    def __enter__(self):
        def run(name, inputs):
            out = self.run(name, inputs)
            self.last = (name, list(inputs), out)
            return out
        self.backend.run = run
        return self

    def __exit__(self, *exc):
        del self.backend.run   # back to the class method


def _profile_mindspore(fn, steps: int) -> dict:
    """Per-op timing of `steps` calls of fn with MindSpore's profiler (CPU op timestamps)."""
    import csv

    import mindspore as ms
    with tempfile.TemporaryDirectory(prefix="ms-profile-") as d:
        prof = ms.Profiler(output_path=d, activities=[ms.profiler.ProfilerActivity.CPU])
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t) / steps
        prof.analyse()
        by_type, top, shapes = {}, [], {}
        for f in Path(d).rglob("cpu_framework_*.txt"):
            for line in f.read_text().splitlines():
                parts = line.split(";")
                if len(parts) > 3:
                    shapes[parts[1]] = [p.split(":", 1)[1] for p in parts[3:] if p.startswith("input_")]
        for f in Path(d).rglob("cpu_op_type_info_*.csv"):
            for row in csv.DictReader(f.open()):
                by_type[row["op_type"]] = {"ms_per_step": float(row["total_compute_time"]) / steps,
                                           "ops_per_step": int(row["type_occurrences"]) / steps}
        # every occurrence of every op: how much time ops spent above their own best occurrence (a kernel
        # that is fast once and slow another time waited: for a core, a thread-pool wake-up, memory)
        excess = {"gemm": 0.0, "other": 0.0}
        best = {"gemm": 0.0, "other": 0.0}
        for f in Path(d).rglob("cpu_op_execute_timestamp_*.txt"):
            for line in f.read_text().splitlines():
                head, _, body = line.partition(";HostCpuOps;")
                durs = [float(x.split(",")[1]) for x in body.split() if x.count(",") >= 1]
                if not durs:
                    continue
                kind = "gemm" if "MatMul" in head.rsplit("/", 1)[-1] else "other"
                excess[kind] += (sum(durs) - min(durs) * len(durs)) / steps
                best[kind] += min(durs) * len(durs) / steps
        matmul_bytes = matmul_ms = 0.0
        for f in Path(d).rglob("cpu_op_detail_info_*.csv"):
            for row in csv.DictReader(f.open()):
                name, ms_step = row["op_name"], float(row["op_total_time(ms)"]) / steps
                top.append({"op": name, "type": row["op_type"], "ms_per_step": ms_step, "inputs": shapes.get(name)})
                if row["op_type"] == "MatMul" and name in shapes and len(shapes[name]) > 1:
                    dims = json.loads(shapes[name][1]) if shapes[name][1].startswith("[") else []
                    if len(dims) == 2:
                        matmul_bytes += math.prod(dims)
                        matmul_ms += ms_step
    if not by_type:
        return {"error": "the profiler wrote no CPU op data"}
    top.sort(key=lambda r: -r["ms_per_step"])
    kernel_ms = sum(v["ms_per_step"] for v in by_type.values())
    return {"steps": steps, "wall_ms_per_step_profiled": wall * 1e3, "kernel_ms_per_step": kernel_ms,
            "ops_per_step": sum(v["ops_per_step"] for v in by_type.values()),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["ms_per_step"])),
            "top_ops": top[:8], "matmul_weight_elements": matmul_bytes, "matmul_weight_ms_per_step": matmul_ms,
            "best_case_ms_per_step": best, "excess_over_best_ms_per_step": excess}


def measure_backend(bundle_path: str, backend: str, o: dict) -> dict:
    """Everything measured with one backend (run in a fresh process: see `_worker`)."""
    t = time.perf_counter()
    from .engine import Engine, Request
    from .preprocess import SIZE, load_image, preprocess
    from .sampling import Sampler, SamplingParams
    from .tokenizer import position_ids
    import_s = time.perf_counter() - t
    warmup, reps = o["warmup"], o["reps"]
    res = {"backend": backend}

    t = time.perf_counter()
    engine = Engine(bundle_path, backend=backend, prefix_cache=False)  # every request starts from its first token
    res["load"] = {"import_s": import_s, "load_s": time.perf_counter() - t, "rss_after_load_bytes": rss_bytes()}
    rss = {"after_load": (rss_bytes(), peak_rss_bytes())}   # (current, peak) after each phase: who holds memory
    tok = engine.tokenizer
    n_image = engine.n_image
    greedy = SamplingParams(max_new_tokens=1)

    # the exported decode's logits for a fixed input, for the eager baseline to compare with
    engine.cache.lengths[:] = 0
    t = time.perf_counter()
    ref = engine.decode(np.full(engine.batch, 5, np.int32), np.zeros(engine.batch, np.int32))
    first_calls = {f"decode_{engine.cache.bucket}": time.perf_counter() - t}   # a graph's first call compiles/allocates
    res["load"]["first_call_s"] = first_calls
    res["reference_logits"] = {"bucket": engine.cache.bucket, "token": 5, "position": 0}
    if o.get("ref_out"):
        np.save(o["ref_out"], ref)

    # preprocessing
    photo = test_photo()
    size = engine.pre["image_size"]
    img = load_image(photo)
    pre = {"photo": {"width": img.width, "height": img.height, "jpeg_bytes": len(photo)}}
    times, _ = repeat(lambda: load_image(photo), warmup, reps)
    pre["jpeg_decode_s"] = stats(times)
    for label, s in (("bundle_size", size), ("size_1344", SIZE)):
        times, _ = repeat(lambda: preprocess(img, s), warmup, reps)
        pre[label] = {"size": s, "s": stats(times)}
    pre["size_1344_minor_faults_per_call"] = _minor_faults(lambda: preprocess(img, SIZE))
    buf = np.empty((3, SIZE, SIZE), np.float32)   # the same into a reused buffer: no fresh pages to fault in
    times, _ = repeat(lambda: preprocess(img, SIZE, out=buf), warmup, reps)
    pre["size_1344_reused_output_s"] = stats(times)
    times, _ = repeat(lambda: img.resize((SIZE, SIZE), 3), warmup, reps)   # 3 = BICUBIC
    pre["resize_1344_s"] = stats(times)
    big = img.resize((SIZE, SIZE), 3)
    times, _ = repeat(lambda: preprocess(big, SIZE), warmup, reps)
    pre["normalize_1344_s"] = stats(times)
    pre["torchvision_1344_s"] = _torchvision_1344(img, warmup, reps)
    res["preprocess"] = pre

    # vision graph
    pixels = engine.pixels([img])
    times, first = repeat(lambda: engine.image_embeddings(pixels), warmup, reps)
    res["vision"] = {"s": stats(times), "first_call_s": first}
    first_calls["vision"] = first
    rss["after_vision"] = (rss_bytes(), peak_rss_bytes())
    embeds = engine.image_embeddings(pixels)

    # TTFT, phase by phase with the raw calls, as generate() runs them
    phases = {k: [] for k in ("tokenize", "preprocess", "vision", "prefill", "first_sample")}
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        ids, types = tok.build_inputs(PROMPT, (), engine.template, n_image)
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
        if i >= warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(dt)
    total = [sum(p) for p in zip(*phases.values())]
    gen_ttft = []
    for _ in range(max(1, reps // 2)):
        r = engine.generate([Request(PROMPT, image=photo, params=greedy)])[0]
        gen_ttft.append(r.ttft_s)
    rss["after_ttft"] = (rss_bytes(), peak_rss_bytes())
    res["ttft"] = {"prompt_tokens": len(ids), "s": stats(total), "breakdown": {k: stats(v) for k, v in phases.items()},
                   "generate_ttft_s": stats(gen_ttft)}

    # prefill per chunk size C, filled, row 0: an image prompt's first chunk (bos + image + C text tokens)
    # and a text chunk against the empty cache
    rng = np.random.default_rng(0)
    ranks = engine.bundle.manifest["tokenizer"]["bpe_ranks"]
    prefill = []
    runs = []
    for c in engine.chunks:
        row = [tok.bos_id] + [tok.pad_id] * n_image + rng.integers(0, ranks, c).tolist()
        pos = position_ids([0] + [1] * n_image + [0] * c)
        runs.append(("prefill_image", c, n_image + 1 + c, lambda row=row, pos=pos: engine.prefill_image(0, embeds[0], row, pos)))
    for c in engine.chunks:
        row = rng.integers(0, ranks, c).tolist()
        runs.append(("extend", c, c, lambda row=row: engine.prefill([row])))
    for kind, c, tokens, fn in runs:
        times, first = repeat(fn, warmup, reps)
        prefill.append({"kind": kind, "bucket": c, "tokens": tokens, "s": stats(times), "first_call_s": first,
                        "tokens_per_s": tokens / stats(times)["median"]})
        rss[f"after_{kind}_{c}"] = (rss_bytes(), peak_rss_bytes())
    res["prefill"] = prefill
    res["ttft_by_prompt_length"] = _ttft_curve(engine, rng, ranks, photo, max(1, reps // 3))
    res["serving"] = _serving(engine, rng, ranks, o)

    # decode per cache bucket: the graph of bucket T reads all T slots, so T (not the fill) sets the cost
    cache = engine.cache
    decode, prev = [], 0
    tokens = np.full(engine.batch, 7, np.int32)
    for t_bucket in engine.bundle.buckets["decode"]:
        n = min(warmup + o["decode_reps"], t_bucket - prev)
        w = min(warmup, n - 1)
        if n - w < 1:
            continue
        length = max(prev, t_bucket - n)
        cache.lengths[:] = length
        step, graph = [], []
        first = None
        with _Recorder(engine.backend) as rec:
            for i in range(n):
                g0 = engine.timings.graph_s.get("decode", 0.0)
                t = time.perf_counter()
                engine.decode(tokens, cache.lengths.copy())
                dt = time.perf_counter() - t
                first = first if first is not None else dt
                if i >= w:
                    step.append(dt)
                    graph.append(engine.timings.graph_s["decode"] - g0)
        name, inputs, outputs = rec.last
        # the same graph call again, alternating the backend's run() and the bare graph (same inputs):
        # interleaved, so a busy machine slows both alike and their difference is the adapter's cost
        cell = _mindspore_cell_call(engine.backend, name, inputs)
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
    res["decode"] = decode

    # host-side pieces of a decode step, in isolation
    k_new, v_new = outputs[1], outputs[2]
    lengths = cache.lengths.copy()
    cache.lengths[:] = 0
    append_times, _ = repeat(lambda: cache.append(k_new, v_new), warmup, reps)
    cache.lengths[:] = lengths
    sampler = Sampler(SamplingParams(max_new_tokens=10 ** 6), [1, 2, 3])
    sample_times, _ = repeat(lambda: sampler(ref[0]), warmup, reps)
    d0 = decode[0] if decode else None
    host = {"sample_s": stats(sample_times)["median"], "cache_append_s": stats(append_times)["median"]}
    if d0:
        host["engine_decode_outside_graph_s"] = d0["outside_graph_s"]["median"]   # inputs, cache bucket, append
        if d0["adapter_s"] is not None:   # best-of differences: the adapter's intrinsic cost, not the noise
            host["backend_adapter_s"] = d0["adapter_s"]   # inside the timed graph call, for reference
            host["inputs_per_decode_call"] = len(inputs)

    # generation end to end: the decode loop as generate() runs it
    gen = []
    params = SamplingParams(max_new_tokens=o["gen_tokens"], ignore_eos=True)
    for i in range(warmup + o["gen_reps"]):
        tm = engine.timings
        g0, l0, s0 = tm.graph_s.get("decode", 0.0), tm.decode_loop_s, tm.decode_steps
        r = engine.generate([Request(PROMPT, image=photo, params=params)])[0]
        if i >= warmup:
            loop, graph, steps = tm.decode_loop_s - l0, tm.graph_s.get("decode", 0.0) - g0, tm.decode_steps - s0
            gen.append({"total_s": r.total_s, "ttft_s": r.ttft_s, "tokens": r.completion_tokens, "loop_s": loop,
                        "graph_s": graph, "steps": steps})
    loop = sum(g["loop_s"] for g in gen)
    graph = sum(g["graph_s"] for g in gen)
    steps = sum(g["steps"] for g in gen)
    host["loop_step_s"] = loop / max(steps, 1)
    host["graph_per_step_s"] = graph / max(steps, 1)
    res["generate"] = {
        "new_tokens": o["gen_tokens"], "reps": len(gen), "prompt_tokens": r.prompt_tokens,
        "e2e_tokens_per_s": stats(g["tokens"] / g["total_s"] for g in gen),
        "decode_tokens_per_s": stats((g["tokens"] - 1) / (g["total_s"] - g["ttft_s"]) for g in gen if g["tokens"] > 1),
        "tpot_s": stats(g["loop_s"] / g["steps"] for g in gen if g["steps"]),
        "host_overhead_share": (loop - graph) / loop if loop > 0 else 0.0,
        "host_breakdown": host,
        "note": "host overhead share = (decode loop time - time inside decode graph calls) / decode loop time, "
                "Engine.timings; graph time includes the backend adapter (input wrapping, output copies)"}

    if o.get("profile") and getattr(engine.backend, "name", "") == "mindspore":
        res["profile"] = {}
        cache.lengths[:] = 0
        try:
            with _Recorder(engine.backend) as rec:
                engine.decode(tokens, cache.lengths.copy())
            args = rec.last
            res["profile"]["decode"] = {"graph": args[0], **_profile_mindspore(lambda: rec.run(args[0], args[1]),
                                                                              o["profile_steps"])}
            if len(engine.bundle.buckets["decode"]) > 1:   # the largest bucket too: does the cache length matter?
                cache.lengths[:] = engine.bundle.buckets["decode"][-1] - 2
                with _Recorder(engine.backend) as rec:
                    engine.decode(tokens, cache.lengths.copy())
                big = rec.last
                rec.run(big[0], big[1])
                res["profile"]["decode_largest"] = {
                    "graph": big[0], **_profile_mindspore(lambda: rec.run(big[0], big[1]), o["profile_steps"])}
            c = engine.chunks[-1]
            row = [tok.bos_id] + rng.integers(0, ranks, c - 1).tolist()
            res["profile"]["prefill"] = {"graph": f"extend_{c}_{engine.cache.bucket}",
                                         **_profile_mindspore(lambda: engine.prefill([row]), 1)}
        except Exception as e:  # the profiler is a diagnostic: never lose the run for it
            res["profile"]["error"] = f"{type(e).__name__}: {e}"

    rss["end"] = (rss_bytes(), peak_rss_bytes())
    res["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "kv_cache_bytes": int(engine.cache.nbytes),
                     "weight_bytes": int(engine.bundle.weight_bytes(0)),
                     "rss_by_phase": {k: {"rss_bytes": a, "peak_rss_bytes": b} for k, (a, b) in rss.items()}}
    return res


def _ttft_curve(engine, rng, ranks, photo, reps) -> list:
    """TTFT of text-only and image prompts of growing length (greedy, one token): with chunked
    prefill it grows with the prompt, in steps no larger than the smallest chunk's padding."""
    from .engine import Request
    from .sampling import SamplingParams
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    top = min(engine.cache.max_len - 1, 4 * engine.chunks[-1])
    lengths = sorted({max(8, int(x)) for x in np.linspace(8, top, 12)})
    words = [engine.tokenizer.decode([int(i)]) for i in rng.integers(0, ranks, 4 * top)]
    rows = []
    for with_image in (False, True):
        for n in lengths:
            prompt = "".join(words[:n])
            req = Request(prompt, image=photo if with_image else None, template="base", params=one)
            try:
                times = [engine.generate([req])[0] for _ in range(reps + 1)][1:]  # the first warms up
            except UserError:  # longer than the cache once tokenized
                continue
            rows.append({"image": with_image, "prompt_tokens": times[0].prompt_tokens,
                         "ttft_s": stats(r.ttft_s for r in times)})
    return rows


def _serving(engine, rng, ranks, o) -> dict:
    """Output tokens/s of one stream of mixed requests (text-only prompts of 16..200 tokens, max_new_tokens
    spread 8..128, ignore_eos) kept at concurrency 1, B and 2B by a closed-loop client, with in-flight
    batching; and the same stream under lockstep batching (a batch admits only when all rows are free)."""
    from .engine import Request
    from .sampling import SamplingParams
    from .scheduler import Scheduler
    n = max(4 * engine.batch, 12) if not o.get("quick") else 2 * engine.batch + 2
    top = min(200, engine.cache.max_len - 130)
    words = [engine.tokenizer.decode([int(i)]) for i in rng.integers(0, ranks, 4 * top)]
    reqs = [Request("".join(words[:int(rng.integers(16, top))]), template="base",
                    params=SamplingParams(max_new_tokens=int(rng.integers(8, 129)), ignore_eos=True)) for _ in range(n)]
    out = []
    for lockstep in (False, True):
        for conc in sorted({1, engine.batch, 2 * engine.batch}):
            if lockstep and conc == 1:
                continue
            sched = Scheduler(engine, prefix_cache=False, lockstep=lockstep)
            todo = list(reqs)
            seqs = [sched.add(todo.pop(0)) for _ in range(min(conc, len(todo)))]
            t = time.perf_counter()
            while sched.busy:
                sched.step()
                while todo and sum(not s.done for s in seqs) < conc:
                    seqs.append(sched.add(todo.pop(0)))
            wall = time.perf_counter() - t
            tokens = sum(len(s.tokens) for s in seqs)
            out.append({"policy": "lockstep" if lockstep else "in-flight", "concurrency": conc, "requests": n,
                        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
                        "ttft_s": stats(s.result().ttft_s for s in seqs)})
    return {"batch": engine.batch, "runs": out}


def _minor_faults(fn, calls=3) -> float:
    """Page faults per call (first touches of memory the kernel has to map)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / calls


def _torchvision_1344(img, warmup, reps):
    """torchvision's own Compose on the same image, when torchvision is installed (not a dependency)."""
    from importlib.util import find_spec
    if find_spec("torchvision") is None:
        # torchvision resizes PIL input with the same Pillow call, then ToTensor (uint8 HWC -> float32 CHW / 255)
        # and Normalize ((x - mean) / std): that arithmetic in numpy, timed here and now, is the stand-in
        from .preprocess import MEAN, SIZE, STD
        big = img.resize((SIZE, SIZE), 3)
        mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(STD, np.float32).reshape(3, 1, 1)

        def torchvision_like():
            x = np.ascontiguousarray(np.asarray(big).transpose(2, 0, 1)).astype(np.float32)
            x /= np.float32(255)
            x -= mean
            x /= std
            return x
        times, _ = repeat(torchvision_like, warmup, reps)
        return {"measured": False, "findings_reference_s": TORCHVISION_1344_S,
                "normalize_numpy_standin_s": stats(times),
                "note": "torchvision not installed: goal = Pillow resize (the call torchvision makes) + torchvision's "
                        "ToTensor/Normalize arithmetic in numpy, timed in the same run; FINDINGS measured torchvision "
                        "itself at 27-32 ms on a quiet machine"}
    from torchvision import transforms
    from .preprocess import MEAN, SIZE, STD
    tf = transforms.Compose([transforms.Resize((SIZE, SIZE), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    times, _ = repeat(lambda: tf(img), warmup, reps)
    return {"measured": True, "s": stats(times)}


def _worker(spec_path: str, out_path: str):
    spec = json.loads(Path(spec_path).read_text())
    try:
        res = measure_backend(spec["bundle"], spec["backend"], spec["options"])
    except UserError as e:
        res = {"backend": spec["backend"], "error": str(e)}
    Path(out_path).write_text(json.dumps(res))


# --- orchestration --------------------------------------------------------------------------------------
def _subprocess_json(args, what: str, timeout: float, cwd=None) -> dict:
    """Run a helper process that writes one JSON object (to the last line of stdout or a file)."""
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"{what} took longer than {timeout:.0f} s and was stopped"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{what} failed (exit {p.returncode}): {tail}"}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"{what} printed no JSON result"}


def _backends_for(bundle, wanted):
    from . import backends as b
    if wanted:
        unknown = [n for n in wanted if n not in b.BACKENDS]
        if unknown:
            raise UserError(f"backend {unknown[0]!r} is not available: choose from {', '.join(b.BACKENDS)}.")
        return list(wanted), []
    usable = b.usable_backends(bundle) if hasattr(b, "usable_backends") else list(b.BACKENDS)
    return usable, [n for n in b.BACKENDS if n not in usable]


def run_bench(bundle_path, *, backends=(), reps=10, warmup=2, decode_reps=16, gen_tokens=32, gen_reps=3,
              eager_steps=3, profile=True, quick=False, log=print) -> dict:
    """The whole benchmark of one bundle -> the report dict (see the module docstring)."""
    from .bundle import Bundle
    bundle = Bundle(bundle_path)
    if bundle.tp > 1:
        raise UserError(f"{bundle_path} is split over {bundle.tp} ranks: bench runs tp 1 bundles (export one with "
                        "--tp 1 for a single-machine benchmark).")
    m = bundle.manifest
    names, skipped = _backends_for(bundle, backends)
    costs = model_costs(bundle)
    options = {"reps": reps, "warmup": warmup, "decode_reps": decode_reps, "gen_tokens": gen_tokens,
               "gen_reps": gen_reps, "eager_steps": eager_steps, "profile": profile, "quick": quick,
               "profile_steps": 2 if quick else 5}
    cfg = m["model"]
    report = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(Path(bundle_path).resolve()), "dtype": m["dtype"], "tp": m["tp"], "batch": m["batch"],
                   "buckets": m["buckets"], "formats": m.get("formats", ["mindir"]), "tools": m.get("tools", {}),
                   "model": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_multi_query_heads", "vocab_size",
                                                 "max_position_embeddings")},
                   "vision": {k: cfg["vision_config"][k] for k in ("hidden_size", "num_hidden_layers", "image_size")},
                   "num_image_tokens": m["num_image_tokens"], "params": costs["params"],
                   "weight_bytes": bundle.weight_bytes(0)},
        "settings": options,
    }
    from .machine import cpu_counters, others_cpu_share
    counters = cpu_counters()
    with tempfile.TemporaryDirectory(prefix="cogvlm2-bench-") as tmp:
        tmp = Path(tmp)
        log("machine probes (bandwidth with all cores, GEMM, decode-shaped GEMV chain)...")
        spec = {"bandwidth_bytes": (64 << 20) if quick else None, "reps": 3 if quick else 7,
                "matmul_shapes": [[256, 256, 256]] if quick else
                [[2048, 2048, 2048], [max(bundle.buckets["chunk"]), cfg["hidden_size"],
                                      cfg["intermediate_size"]]],
                "gemv_shapes": costs["gemv_shapes"]}
        (tmp / "probe.json").write_text(json.dumps(spec))
        probes = _subprocess_json([sys.executable, "-m", "cogvlm2_lite.runtime.machine", str(tmp / "probe.json")],
                                  "the machine probe", 900)
        if "error" in probes:
            raise UserError(probes["error"])
        report["machine"] = probes.pop("machine")
        report["reference"] = {**probes, "decode_weight_bytes": costs["decode_weight_bytes"],
                               "kv_read_bytes": costs["kv_read_bytes"], "prefill_flops": costs["prefill_flops"],
                               "note": costs["note"]}

        report["backends"] = {}
        for name in names:
            log(f"backend {name}...")
            opts = {**options, "ref_out": str(tmp / f"ref-{name}.npy")}
            (tmp / f"spec-{name}.json").write_text(json.dumps({"bundle": str(Path(bundle_path).resolve()),
                                                               "backend": name, "options": opts}))
            out = tmp / f"out-{name}.json"
            p = subprocess.run([sys.executable, "-m", "cogvlm2_lite.runtime.bench", str(tmp / f"spec-{name}.json"),
                                str(out)], capture_output=True, text=True, cwd=tmp)
            if out.is_file():
                report["backends"][name] = json.loads(out.read_text())
            else:
                tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                report["backends"][name] = {"backend": name, "error": f"worker failed (exit {p.returncode}): {tail}"}
        for name in skipped:
            report["backends"][name] = {"backend": name, "skipped": f"this bundle has no graphs for {name} "
                                        "or its package is not installed"}

        log("machine probe again (bandwidth after the backends: the machine may be shared)...")
        (tmp / "probe2.json").write_text(json.dumps({**spec, "bandwidth_only": True}))
        again = _subprocess_json([sys.executable, "-m", "cogvlm2_lite.runtime.machine", str(tmp / "probe2.json")],
                                 "the machine probe", 900)
        mb = report["reference"]["memory_bandwidth"]
        if "memory_bandwidth" in again:
            mb["before_backends_bytes_per_s"] = mb["bytes_per_s"]
            mb["after_backends_bytes_per_s"] = again["memory_bandwidth"]["bytes_per_s"]
            if mb["after_backends_bytes_per_s"] > mb["bytes_per_s"]:
                mb.update({k: again["memory_bandwidth"][k] for k in ("bytes_per_s", "threads", "by_threads",
                                                                      "single_thread_bytes_per_s")})
            mb["note"] = "the better of two probes, before and after the backends ran (others' load only lowers it)"

        if eager_steps > 0:
            log("eager (PyNative) baseline...")
            ref = next((tmp / f"ref-{n}.npy" for n in ("mindspore", *names) if (tmp / f"ref-{n}.npy").is_file()), None)
            args = [sys.executable, "-m", "cogvlm2_lite.export.eager", str(Path(bundle_path).resolve()),
                    "--steps", str(eager_steps), "--warmup", "1"] + (["--ref", str(ref)] if ref else [])
            report["eager"] = _subprocess_json(args, "the eager baseline", 1800, cwd=tmp)
        else:
            report["eager"] = {"skipped": "--eager-steps 0"}
    report["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["machine"]["others_cpu_share"] = others_cpu_share(counters, cpu_counters())
    derive(report)
    return report


# --- derived figures, targets and what limits them ------------------------------------------------
def derive(report: dict):
    ref = report["reference"]
    bw = ref["memory_bandwidth"]["bytes_per_s"]
    peak = ref["matmul"]["flop_per_s"]
    summary = {}
    for name, r in report["backends"].items():
        if "error" in r or "skipped" in r:
            continue
        for d in r["decode"]:
            need = ref["decode_weight_bytes"] + ref["kv_read_bytes"][str(d["bucket"])]
            d["bytes_read"] = need
            d["roofline_s"] = need / bw
            d["roofline_fraction"] = d["roofline_s"] / d["step_s"]["median"]
            d["graph_roofline_fraction"] = d["roofline_s"] / d["graph_s"]["median"]
            d["effective_bytes_per_s"] = need / d["step_s"]["median"]
            d["roofline_fraction_best"] = d["roofline_s"] / d["step_s"]["min"]   # fastest step: what contention hides
        for p in r["prefill"]:
            p["flops"] = ref["prefill_flops"][p["kind"]][str(p["bucket"])]
            p["flop_per_s"] = p["flops"] / p["s"]["median"]
            p["peak_fraction"] = p["flop_per_s"] / peak
        d0 = r["decode"][0] if r["decode"] else None
        s = {"load_s": r["load"]["load_s"], "peak_rss_bytes": r["memory"]["peak_rss_bytes"],
             "kv_cache_bytes": r["memory"]["kv_cache_bytes"],
             "preprocess_bundle_size_s": r["preprocess"]["bundle_size"]["s"]["median"],
             "preprocess_1344_s": r["preprocess"]["size_1344"]["s"]["median"],
             "vision_s": r["vision"]["s"]["median"], "ttft_s": r["ttft"]["s"]["median"],
             "ttft_breakdown_s": {k: v["median"] for k, v in r["ttft"]["breakdown"].items()},
             "prefill_tokens_per_s": {f"{p['kind']}_{p['bucket']}": p["tokens_per_s"] for p in r["prefill"]},
             "prefill_peak_fraction": max((p["peak_fraction"] for p in r["prefill"]), default=None),
             "tpot_s": {str(d["bucket"]): d["step_s"]["median"] for d in r["decode"]},
             "decode_roofline_fraction": d0["roofline_fraction"] if d0 else None,
             "decode_roofline_fraction_by_bucket": {str(d["bucket"]): d["roofline_fraction"] for d in r["decode"]},
             "decode_roofline_fraction_best_step": d0["roofline_fraction_best"] if d0 else None,
             "serving_output_tokens_per_s": {f"{x['policy']}_x{x['concurrency']}": x["output_tokens_per_s"]
                                             for x in r.get("serving", {}).get("runs", [])},
             "e2e_tokens_per_s": r["generate"]["e2e_tokens_per_s"].get("median"),
             "decode_tokens_per_s": r["generate"]["decode_tokens_per_s"].get("median"),
             "host_overhead_share": r["generate"]["host_overhead_share"]}
        e = report.get("eager", {})
        if d0 and "decode_step_s" in e and e.get("bucket") == d0["bucket"]:
            s["eager_decode_step_s"] = e["decode_step_s"]["median"]
            s["eager_over_exported"] = e["decode_step_s"]["median"] / d0["backend_run_s"]["median"]
        summary[name] = s
    report["summary"] = summary
    report["targets"] = targets(report)


def _pct(x):
    return f"{100 * x:.0f}%"


def _profile_sentence(pf: dict, dtype: str) -> str:
    """One line on where a profiled graph call's time goes."""
    mm = pf["by_type"].get("MatMul", {}).get("ms_per_step", 0.0)
    others = sorted(((k, v["ms_per_step"]) for k, v in pf["by_type"].items() if k != "MatMul"), key=lambda kv: -kv[1])[:4]
    itemsize = 2 if dtype in ("fp16", "bf16") else 4
    mm_bw = (pf["matmul_weight_elements"] * itemsize / (pf["matmul_weight_ms_per_step"] / 1e3)
             if pf.get("matmul_weight_ms_per_step") else 0)
    gap = pf["wall_ms_per_step_profiled"] - pf["kernel_ms_per_step"]
    line = (f"MindSpore profile of {pf['graph']}: {pf['ops_per_step']:.0f} kernels/call, kernel sum "
            f"{pf['kernel_ms_per_step']:.1f} ms of {pf['wall_ms_per_step_profiled']:.1f} ms profiled wall "
            f"({max(gap, 0):.1f} ms outside kernels: launch and scheduling); MatMul "
            f"{mm:.1f} ms" + (f" (weights streamed at {mm_bw / 1e9:.1f} GB/s)" if mm_bw else "")
            + "; the rest " + ", ".join(f"{k} {v:.1f} ms" for k, v in others))
    ex, best = pf.get("excess_over_best_ms_per_step"), pf.get("best_case_ms_per_step")
    if ex and best:
        line += (f"; time above each op's own best occurrence: GEMMs {ex['gemm']:.1f} ms, other ops {ex['other']:.1f} ms "
                 f"(their best-case sum {best['other']:.1f} ms)")
        if ex["gemm"] + ex["other"] > 0.1 * pf["kernel_ms_per_step"]:
            line += ": the same kernels ran faster at other times, so that time is waiting (cores, wake-ups), not work"
    return line


def targets(report) -> list:
    """Each target against each backend, with what the measurements say limits it when missed."""
    ref = report["reference"]
    bw = ref["memory_bandwidth"]["bytes_per_s"]
    out = []
    for name, s in report["summary"].items():
        r = report["backends"][name]
        d0 = r["decode"][0] if r["decode"] else None
        prof = r.get("profile", {}).get("decode", {})
        host = r["generate"]["host_breakdown"]

        if d0:
            frac = d0["roofline_fraction"]
            why = []
            g = ref.get("gemv_chain")
            if g:
                why.append(f"plain numpy GEMV over the same {g['bytes'] / 1e6:.0f} MB of weight matrices streams at "
                           f"{g['bytes_per_s'] / 1e9:.1f} GB/s = {_pct(g['bytes_per_s'] / bw)} of the measured "
                           f"{bw / 1e9:.1f} GB/s ({g['s_per_pass'] * 1e3:.1f} ms/pass vs the graph's "
                           f"{d0['graph_s']['median'] * 1e3:.1f} ms)")
            for key in ("decode", "decode_largest"):
                pf = r.get("profile", {}).get(key, {})
                if pf.get("by_type"):
                    why.append(_profile_sentence(pf, report["bundle"]["dtype"]))
            worst = min(r["decode"], key=lambda d: d["roofline_fraction"])
            why.append("by cache bucket: " + ", ".join(
                f"decode_{d['bucket']} {_pct(d['roofline_fraction'])} (fastest step {_pct(d['roofline_fraction_best'])})"
                for d in r["decode"]) + (f"; worst decode_{worst['bucket']}" if len(r["decode"]) > 1 else ""))
            if "backend_adapter_s" in host:
                why.append(f"backend adapter (wrap {host.get('inputs_per_decode_call', '?')} inputs, copy outputs) "
                           f"{host['backend_adapter_s'] * 1e3:.2f} ms/step; engine.decode outside the graph call "
                           f"{host.get('engine_decode_outside_graph_s', 0) * 1e3:.2f} ms/step")
            out.append({"backend": name, "target": "decode >= 60% of the memory roofline",
                        "value": frac, "goal": TARGETS["decode_roofline_fraction"],
                        "met": frac >= TARGETS["decode_roofline_fraction"],
                        "detail": f"decode_{d0['bucket']}: {d0['bytes_read'] / 1e6:.0f} MB/step at {bw / 1e9:.1f} GB/s "
                                  f"-> roofline {d0['roofline_s'] * 1e3:.1f} ms; measured {d0['step_s']['median'] * 1e3:.1f} ms",
                        "limits": why})

        share = s["host_overhead_share"]
        why = [f"outside the graph call, per step: sampling {host['sample_s'] * 1e3:.3f} ms, engine.decode's own work "
               f"{host.get('engine_decode_outside_graph_s', float('nan')) * 1e3:.3f} ms (of which the cache append "
               f"{host['cache_append_s'] * 1e3:.3f} ms)"]
        if "backend_adapter_s" in host:
            why.append(f"inside the timed graph call (not counted as host): the backend adapter wrapping "
                       f"{host['inputs_per_decode_call']} inputs and copying outputs, {host['backend_adapter_s'] * 1e3:.2f} ms")
        out.append({"backend": name, "target": "host overhead <= 3% of a decode step", "value": share,
                    "goal": TARGETS["host_overhead_share"], "met": share <= TARGETS["host_overhead_share"],
                    "detail": f"loop step {host['loop_step_s'] * 1e3:.2f} ms, in graph calls "
                              f"{host['graph_per_step_s'] * 1e3:.2f} ms", "limits": why})

        if "eager_over_exported" in s:
            e = report["eager"]
            ratio = s["eager_over_exported"]
            n_ops = prof.get("ops_per_step")
            why = [f"eager step {e['decode_step_s']['median'] * 1e3:.0f} ms vs exported graph call "
                   f"{d0['backend_run_s']['median'] * 1e3:.1f} ms"]
            if n_ops:
                why.append(f"PyNative dispatches each of the ~{n_ops:.0f} ops of a step from Python: "
                           f"{e['decode_step_s']['median'] * 1e3 / n_ops:.2f} ms per op on average")
            out.append({"backend": name, "target": "exported >= 10x faster than eager", "value": ratio,
                        "goal": TARGETS["eager_over_exported"], "met": ratio >= TARGETS["eager_over_exported"],
                        "detail": f"decode_{e['bucket']}", "limits": why if ratio < TARGETS["eager_over_exported"] else []})

        p = r["preprocess"]
        v = p["size_1344"]["s"]["median"]
        tv = p["torchvision_1344_s"]
        if tv.get("measured"):
            goal, source = tv["s"]["median"], "torchvision measured"
        elif "normalize_numpy_standin_s" in tv:
            goal = p["resize_1344_s"]["median"] + tv["normalize_numpy_standin_s"]["median"]
            source = (f"torchvision stand-in: the same resize + its arithmetic in numpy "
                      f"{tv['normalize_numpy_standin_s']['median'] * 1e3:.1f} ms; FINDINGS: torchvision 27-32 ms")
        else:
            goal, source = TORCHVISION_1344_S, "torchvision reference from FINDINGS"
        out.append({"backend": name, "target": "image preprocessing at 1344 no slower than torchvision",
                    "value": v, "goal": goal, "met": v <= goal,
                    "detail": f"resize {p['resize_1344_s']['median'] * 1e3:.1f} ms + normalize "
                              f"{p['normalize_1344_s']['median'] * 1e3:.1f} ms (JPEG decode "
                              f"{p['jpeg_decode_s']['median'] * 1e3:.1f} ms not included) from a "
                              f"{p['photo']['width']}x{p['photo']['height']} photo; {source}",
                    "limits": [f"Pillow's bicubic resize is {_pct(p['resize_1344_s']['median'] / v)} of it (the same "
                               "call torchvision makes on PIL input); the normalization is one table gather per channel "
                               f"({p['normalize_1344_s']['median'] * 1e3:.1f} ms)",
                               f"into a reused output buffer the same preprocessing takes "
                               f"{p['size_1344_reused_output_s']['median'] * 1e3:.1f} ms: the rest is the first touch of a "
                               f"fresh {3 * 1344 * 1344 * 4 / 2**20:.0f} MiB float32 output array "
                               f"({p.get('size_1344_minor_faults_per_call', 0):.0f} page faults per call)"]
                    if v > goal else []})
    return out


# --- text report, comparison, plot ------------------------------------------------------------------
def _ms(x):
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def _st(st):
    return "-" if not st or not st.get("n") else (
        f"{st['median'] * 1e3:.2f} ms (p90 {st['p90'] * 1e3:.2f}, p99 {st['p99'] * 1e3:.2f}, n={st['n']})")


def format_report(report: dict) -> str:
    mach, ref, b = report["machine"], report["reference"], report["bundle"]
    L = []
    L.append(f"bundle {b['path']}: {b['model']['num_hidden_layers']} layers x {b['model']['hidden_size']}, vocab "
             f"{b['model']['vocab_size']}, {b['dtype']}, batch {b['batch']}; params language "
             f"{b['params']['language'] / 1e6:.1f}M vision {b['params']['vision'] / 1e6:.1f}M; "
             f"{b['weight_bytes'] / 2**20:.0f} MiB weights")
    L.append(f"machine: {mach['cpu_model']}, {mach['usable_cores']} cores, {mach['ram_bytes'] / 2**30:.1f} GiB RAM, "
             f"load average {mach['load_average'][0]:.2f} -> {mach['load_average_after'][0]:.2f}; other processes used "
             f"{100 * (mach.get('others_cpu_share') or 0):.0f}% of the CPU during the run"
             + ("  (BUSY MACHINE: timings are noisy and slow)" if (mach.get("others_cpu_share") or 0) > 0.2 else ""))
    mb = ref["memory_bandwidth"]
    L.append(f"reference: read bandwidth {mb['bytes_per_s'] / 1e9:.1f} GB/s ({mb['threads']} threads; 1 thread "
             f"{(mb['single_thread_bytes_per_s'] or 0) / 1e9:.1f}); GEMM {ref['matmul']['flop_per_s'] / 1e9:.0f} GFLOP/s "
             f"({ref['matmul']['best_shape']})"
             + (f"; numpy GEMV chain {ref['gemv_chain']['bytes_per_s'] / 1e9:.1f} GB/s" if "gemv_chain" in ref else ""))
    L.append(f"decode must read {ref['decode_weight_bytes'] / 1e6:.1f} MB of weights + K/V "
             + ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in ref["kv_read_bytes"].items()))
    for name, r in report["backends"].items():
        L.append("")
        if "error" in r or "skipped" in r:
            L.append(f"[{name}] {r.get('error') or r.get('skipped')}")
            continue
        L.append(f"[{name}]")
        ld = r["load"]
        L.append(f"  load {ld['load_s']:.2f} s (import {ld['import_s']:.2f} s); first calls: " + ", ".join(
            f"{k} {_ms(v)}" for k, v in ld.get("first_call_s", {}).items()))
        L.append(f"  memory: peak RSS {r['memory']['peak_rss_bytes'] / 2**20:.0f} MiB for "
                 f"{r['memory']['weight_bytes'] / 2**20:.0f} MiB of weights; KV cache "
                 f"{r['memory']['kv_cache_bytes'] / 2**20:.1f} MiB")
        p = r["preprocess"]
        L.append(f"  preprocess {p['bundle_size']['size']}px: {_st(p['bundle_size']['s'])}")
        L.append(f"  preprocess 1344px: {_st(p['size_1344']['s'])}; into a reused buffer "
                 f"{_ms(p['size_1344_reused_output_s']['median'])} = resize {_ms(p['resize_1344_s']['median'])} + "
                 f"normalize {_ms(p['normalize_1344_s']['median'])}; JPEG decode {_ms(p['jpeg_decode_s']['median'])}")
        L.append(f"  vision graph: {_st(r['vision']['s'])} (first call {_ms(r['vision']['first_call_s'])})")
        t = r["ttft"]
        L.append(f"  TTFT ({t['prompt_tokens']} prompt tokens): {_st(t['s'])}; generate() {_ms(t['generate_ttft_s'].get('median'))}")
        L.append("    " + ", ".join(f"{k} {_ms(v['median'])}" for k, v in t["breakdown"].items()))
        for pf in r["prefill"]:
            L.append(f"  {pf['kind']}_{pf['bucket']}: {_st(pf['s'])} -> {pf['tokens_per_s']:.0f} tokens/s, "
                     f"{pf['flop_per_s'] / 1e9:.0f} GFLOP/s = {_pct(pf['peak_fraction'])} of GEMM peak")
        for d in r["decode"]:
            L.append(f"  decode_{d['bucket']} (cache {d['cache_len_from']}..{d['cache_len_to']}): step {_st(d['step_s'])}; "
                     f"graph {_ms(d['graph_s']['median'])}, roofline {_ms(d['roofline_s'])} -> "
                     f"{_pct(d['roofline_fraction'])} ({d['effective_bytes_per_s'] / 1e9:.1f} GB/s effective)")
        curve = r.get("ttft_by_prompt_length", [])
        for image in (False, True):
            pts = [c for c in curve if c["image"] == image]
            if pts:
                L.append(f"  TTFT by prompt length ({'image' if image else 'text-only'}): " + ", ".join(
                    f"{c['prompt_tokens']}: {_ms(c['ttft_s']['median'])}" for c in pts))
        sv = r.get("serving")
        if sv:
            L.append(f"  serving (mixed stream, {sv['runs'][0]['requests']} requests, B = {sv['batch']}): " + ", ".join(
                f"{x['policy']} x{x['concurrency']} {x['output_tokens_per_s']:.1f} tok/s" for x in sv["runs"]))
        g = r["generate"]
        L.append(f"  generate {g['new_tokens']} tokens: e2e {g['e2e_tokens_per_s'].get('median', 0):.2f} tokens/s, decode "
                 f"{g['decode_tokens_per_s'].get('median', 0):.2f} tokens/s, TPOT {_ms(g['tpot_s'].get('median'))}; "
                 f"host overhead {100 * g['host_overhead_share']:.2f}% of a step")
        for kind in ("decode", "decode_largest", "prefill"):
            prof = r.get("profile", {}).get(kind, {})
            if prof.get("by_type"):
                L.append(f"  profile {prof['graph']} (ms per call / ops): " + ", ".join(
                    f"{k} {v['ms_per_step']:.1f}/{v['ops_per_step']:.0f}" for k, v in list(prof["by_type"].items())[:7])
                    + f"; kernels {prof['kernel_ms_per_step']:.1f} ms of {prof['wall_ms_per_step_profiled']:.1f} ms wall")
        mem = r["memory"].get("rss_by_phase")
        if mem:
            L.append("  RSS after each phase (MiB, current/peak): " + ", ".join(
                f"{k.replace('after_', '')} {v['rss_bytes'] / 2**20:.0f}/{v['peak_rss_bytes'] / 2**20:.0f}"
                for k, v in mem.items()))
            steps = list(mem.items())
            growth = sorted(((b[1]["rss_bytes"] - a[1]["rss_bytes"], b[0]) for a, b in zip(steps, steps[1:])), reverse=True)
            L.append("  largest RSS growth: " + ", ".join(f"{k.replace('after_', '')} +{g / 2**20:.0f} MiB"
                                                          for g, k in growth[:3] if g > 0))
    e = report.get("eager", {})
    L.append("")
    if "decode_step_s" in e:
        L.append(f"eager (PyNative) decode_{e['bucket']}: {_st(e['decode_step_s'])}; logits vs exported max |diff| "
                 f"{e.get('max_abs_diff_vs_exported', '-')}")
    else:
        L.append(f"eager: {e.get('error') or e.get('skipped')}")
    L.append("")
    L.append("targets:")
    for t in report["targets"]:
        L.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['backend']}: {t['target']}: {_fmt_value(t)} ({t['detail']})")
        for why in t["limits"]:
            L.append(f"      - {why}")
    return "\n".join(L)


def _fmt_value(t):
    if t["goal"] < 1 and "preprocess" not in t["target"]:
        return f"{100 * t['value']:.1f}% (goal {100 * t['goal']:.0f}%)"
    if "preprocess" in t["target"]:
        return f"{t['value'] * 1e3:.1f} ms (goal {t['goal'] * 1e3:.1f} ms)"
    return f"{t['value']:.1f}x (goal {t['goal']:.0f}x)"


KEY_FIGURES = ("load_s", "peak_rss_bytes", "preprocess_1344_s", "vision_s", "ttft_s", "prefill_tokens_per_s", "tpot_s",
               "decode_roofline_fraction", "e2e_tokens_per_s", "decode_tokens_per_s", "host_overhead_share",
               "eager_over_exported")


def _flat(summary: dict) -> dict:
    out = {}
    for backend, s in summary.items():
        for k in KEY_FIGURES:
            v = s.get(k)
            if isinstance(v, dict):
                out.update({f"{backend}.{k}[{kk}]": vv for kk, vv in v.items()})
            elif v is not None:
                out[f"{backend}.{k}"] = v
    return out


def compare(new: dict, old: dict) -> list:
    """(figure, old, new, new/old) for the key figures both reports have."""
    a, b = _flat(old.get("summary", {})), _flat(new.get("summary", {}))
    rows = [(k, a[k], b[k], b[k] / a[k] if a[k] else float("nan")) for k in b if k in a]
    for k in ("memory_bandwidth", "matmul"):
        try:
            o = old["reference"][k].get("bytes_per_s") or old["reference"][k]["flop_per_s"]
            n = new["reference"][k].get("bytes_per_s") or new["reference"][k]["flop_per_s"]
            rows.append((f"machine.{k}", o, n, n / o))
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    return rows


def format_compare(rows) -> str:
    lines = [f"{'figure':58s} {'old':>12s} {'new':>12s} {'new/old':>8s}"]
    for k, o, n, r in rows:
        lines.append(f"{k:58s} {o:12.4g} {n:12.4g} {r:8.3f}")
    return "\n".join(lines)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def plot(report: dict, path):
    """PNG with Pillow: TPOT vs cache length (with the roofline), and the TTFT / decode-step breakdown."""
    from PIL import Image, ImageDraw
    W, H = 1400, 640
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs, fb = _font(14), _font(12), _font(17)
    b = report["bundle"]
    d.text((20, 10), f"cogvlm2-lite bench: {Path(b['path']).name} ({b['model']['num_hidden_layers']}x"
                     f"{b['model']['hidden_size']}, {b['dtype']}) on {report['machine']['cpu_model']}, "
                     f"{report['machine']['usable_cores']} cores, {report['created']}", fill="black", font=fb)
    ok = {n: r for n, r in report["backends"].items() if "decode" in r}

    # left: TPOT vs cache length
    x0, y0, x1, y1 = 90, 70, 660, 530
    series = []
    for i, (n, r) in enumerate(ok.items()):
        series.append((n, COLORS[i % len(COLORS)], [(dd["bucket"], dd["step_s"]["median"] * 1e3) for dd in r["decode"]]))
    roof = []
    if ok:
        first = next(iter(ok.values()))
        roof = [(dd["bucket"], dd["roofline_s"] * 1e3) for dd in first["decode"]]
    e = report.get("eager", {})
    eager = [(e["bucket"], e["decode_step_s"]["median"] * 1e3)] if "decode_step_s" in e else []
    pts = [p for _, _, s in series for p in s] + roof
    xmax = max([p[0] for p in pts] + [1]) * 1.08
    ymax = max([p[1] for p in pts] + [1e-3]) * 1.15
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text((x0, y0 - 22), "decode step (ms) vs KV-cache bucket (slots); the step reads the whole bucket",
           fill="black", font=f)
    for k in range(6):
        yv = ymax * k / 5
        y = y1 - (y1 - y0) * k / 5
        d.line((x0 - 5, y, x0, y), fill="black")
        d.line((x0, y, x1, y), fill=(230, 230, 230))
        d.text((x0 - 60, y - 7), f"{yv:.3g}", fill="black", font=fs)
    for k in range(6):
        xv = xmax * k / 5
        x = x0 + (x1 - x0) * k / 5
        d.line((x, y1, x, y1 + 5), fill="black")
        d.text((x - 12, y1 + 8), f"{xv:.0f}", fill="black", font=fs)

    def xy(p):
        return x0 + (x1 - x0) * p[0] / xmax, y1 - (y1 - y0) * p[1] / ymax

    legend = [(n, c) for n, c, _ in series] + ([("memory roofline", (0, 0, 0))] if roof else [])
    for n, c, s in series + ([("memory roofline", (0, 0, 0), roof)] if roof else []):
        q = [xy(p) for p in s]
        if len(q) > 1:
            d.line(q, fill=c, width=3 if n != "memory roofline" else 2)
        for x, y in q:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=c)
    if eager:  # off the scale: marked at the top with its value
        x, y = x0 + (x1 - x0) * eager[0][0] / xmax, y0 + 8
        label = f"eager (PyNative) {eager[0][1]:.0f} ms"
        tx = x + 8 if x + 8 + d.textlength(label, font=fs) < x1 else x - 8 - d.textlength(label, font=fs)
        d.text((tx, y - 2), label, fill=(200, 0, 0), font=fs)
        d.polygon((x, y - 6, x - 5, y + 4, x + 5, y + 4), fill=(200, 0, 0))
    lx = x0
    for n, c in legend:  # below the axis, left to right
        d.rectangle((lx, y1 + 30, lx + 12, y1 + 42), fill=c)
        d.text((lx + 18, y1 + 28), n, fill="black", font=fs)
        lx += 30 + d.textlength(n, font=fs)

    # right: stacked bars: TTFT phases, decode step (graph / host)
    bx0, by0, bx1 = 760, 70, 1370
    d.text((bx0, by0 - 22), "time breakdown (ms)", fill="black", font=f)
    bars = []
    for n, r in ok.items():
        bars.append((f"{n} TTFT", [(k, v["median"] * 1e3) for k, v in r["ttft"]["breakdown"].items()]))
        h = r["generate"]["host_breakdown"]
        bars.append((f"{n} decode step", [("graph", h["graph_per_step_s"] * 1e3),
                                          ("host", max(0.0, h["loop_step_s"] - h["graph_per_step_s"]) * 1e3)]))
    names = []
    for _, segs in bars:
        for k, _ in segs:
            if k not in names:
                names.append(k)
    total = max([sum(v for _, v in segs) for _, segs in bars] + [1e-3])
    bh, gap = 40, 30
    for i, (label, segs) in enumerate(bars):
        y = by0 + 30 + i * (bh + gap)
        d.text((bx0, y - 18), f"{label}: {sum(v for _, v in segs):.1f} ms", fill="black", font=fs)
        x = bx0
        for k, v in segs:
            w = (bx1 - bx0) * v / total
            d.rectangle((x, y, x + w, y + bh), fill=COLORS[names.index(k) % len(COLORS)])
            x += w
    ly = by0 + 30 + len(bars) * (bh + gap)
    for i, k in enumerate(names):
        d.rectangle((bx0 + (i % 4) * 150, ly + (i // 4) * 20, bx0 + (i % 4) * 150 + 12, ly + (i // 4) * 20 + 12),
                    fill=COLORS[i % len(COLORS)])
        d.text((bx0 + (i % 4) * 150 + 18, ly + (i // 4) * 20 - 2), k, fill="black", font=fs)

    # headline figures
    y = 590
    for n, s in report["summary"].items():
        line = (f"{n}: decode {_pct(s['decode_roofline_fraction'] or 0)} of roofline, host {100 * s['host_overhead_share']:.1f}%, "
                f"TTFT {s['ttft_s'] * 1e3:.0f} ms, e2e {s['e2e_tokens_per_s'] or 0:.1f} tok/s"
                + (f", exported {s['eager_over_exported']:.1f}x faster than eager" if "eager_over_exported" in s else ""))
        d.text((20, y), line, fill="black", font=f)
        y += 20
    img.save(path)


# --- command line ------------------------------------------------------------------------------------
def _write_outputs(report, json_out, plot_out, compare_with):
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_out}")
    if plot_out:
        Path(plot_out).parent.mkdir(parents=True, exist_ok=True)
        plot(report, plot_out)
        click.echo(f"wrote {plot_out}")
    if compare_with:  # (label, old report)
        click.echo(f"\ncompared with {compare_with[0]} (new/old):")
        click.echo(format_compare(compare(report, compare_with[1])))


_options = stack(
    click.option("--backend", "backends", multiple=True, help="Backend(s) to measure (default: every usable one)."),
    click.option("--reps", type=int, default=10, show_default=True, help="Timed repetitions per figure."),
    click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls before each figure."),
    click.option("--decode-reps", type=int, default=16, show_default=True, help="Timed decode steps per cache bucket."),
    click.option("--gen-tokens", type=int, default=32, show_default=True, help="New tokens per end-to-end generation."),
    click.option("--gen-reps", type=int, default=3, show_default=True, help="Timed end-to-end generations."),
    click.option("--eager-steps", type=int, default=3, show_default=True, help="PyNative decode steps (0: skip)."),
    click.option("--profile/--no-profile", default=True, show_default=True, help="Per-op MindSpore profile."),
    click.option("--quick", is_flag=True, help="Small machine probes (smoke runs; reference figures are rough)."),
)


def _check_counts(o):
    for k in ("reps", "decode_reps", "gen_tokens", "gen_reps"):
        if o[k] < 1:
            raise UserError(f"--{k.replace('_', '-')} must be at least 1, not {o[k]}.")
    if o["warmup"] < 0 or o["eager_steps"] < 0:
        raise UserError("--warmup and --eager-steps must be >= 0.")


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the full report here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None, help="Write a PNG plot here.")
@click.option("--compare", "compare_with", type=click.Path(dir_okay=False, exists=True), default=None,
              help="An earlier --json report: print new/old ratios of the key figures.")
@_options
def bench(bundle, json_out, plot_out, compare_with, **o):
    """Benchmark a bundle: latency, throughput, memory, and how far from this machine's limits."""
    _check_counts(o)
    old = None
    if compare_with:  # read first: it may be the file --json is about to replace
        try:
            old = json.loads(Path(compare_with).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{compare_with} is not a JSON bench report.") from None
    report = run_bench(bundle, log=lambda s: click.echo(s, err=True), **o)
    click.echo(format_report(report))
    _write_outputs(report, json_out, plot_out, old and (compare_with, old))


SUITE_PRESETS = {
    "tiny": None,  # the export defaults
    "bench": "chunk=16,64,256;decode=256,1024,2048",
}


def source_hash() -> str:
    """Hash of the model and exporter code: a cached bundle is reused only while they are unchanged."""
    from importlib.util import find_spec
    h = hashlib.sha256()
    for pkg in ("cogvlm2_lite.graphs", "cogvlm2_lite.export"):
        spec = find_spec(pkg)
        for d in (spec.submodule_search_locations or []) if spec else []:
            for f in sorted(Path(d).glob("*.py")):
                if f.name != "eager.py":  # the benchmark's own baseline does not change what export writes
                    h.update(f.name.encode() + f.read_bytes())
    from .bundle import FORMAT_VERSION
    h.update(str(FORMAT_VERSION).encode())
    return h.hexdigest()[:16]


def cogvlm2_cli():
    return [sys.executable, "-c", "import sys; from cogvlm2_lite.runtime.cli import main; sys.exit(main())"]


def ensure_bundle(preset: str, folder: Path, tokenizer: Path, log) -> Path:
    """Export `preset` with random weights into folder/<preset> unless an up-to-date one is there."""
    from .bundle import Bundle
    out = folder / preset
    help_text = subprocess.run(cogvlm2_cli() + ["export", "--help"], capture_output=True, text=True).stdout
    formats = "mindir,onnx" if "--format" in help_text else None
    key = json.dumps({"preset": preset, "buckets": SUITE_PRESETS[preset], "formats": formats, "src": source_hash()})
    stamp = out / ".bench-key"
    if stamp.is_file() and stamp.read_text() == key:
        try:
            Bundle(out)
            return out
        except UserError:
            pass
    log(f"exporting the {preset} preset (random weights) into {out}...")
    cmd = cogvlm2_cli() + ["export", "--random-init", preset, "--tokenizer", str(tokenizer), str(out), "--force"]
    if SUITE_PRESETS[preset]:
        cmd += ["--buckets", SUITE_PRESETS[preset]]
    if formats:
        cmd += ["--format", formats]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 and formats:  # ONNX export refused for this preset: MindIR alone still benchmarks
        log(f"  export with {formats} failed ({(p.stderr.strip().splitlines() or ['?'])[-1]}); retrying MindIR only")
        cmd = cmd[:-2]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"exporting the {preset} preset failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    stamp.write_text(key)
    return out


@click.command("bench-suite")
@click.option("--presets", default="tiny,bench", show_default=True, help="Presets to export and benchmark.")
@click.option("--bundles", "bundles_dir", type=click.Path(file_okay=False), default="bundles", show_default=True,
              help="Where exported bundles are cached.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/bench", show_default=True,
              help="Where <preset>.json and <preset>.png go (the previous run is kept as <preset>.prev.json).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True), default=None,
              help="tiktoken file for the exports (default: the demo's small tokenizer).")
@_options
def bench_suite(presets, bundles_dir, out_dir, tokenizer, **o):
    """Export the tiny and bench presets once (cached) and benchmark both: JSON + PNG in out/bench."""
    _check_counts(o)
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if tokenizer is None:
        from importlib.util import find_spec
        spec = find_spec("cogvlm2_lite.demo")
        found = [Path(d) / "assets" / "tokenizer.model" for d in (spec.submodule_search_locations or [])] if spec else []
        tokenizer = next((f for f in found if f.is_file()), None)
        if tokenizer is None:
            raise UserError("no demo tokenizer here (cogvlm2_lite.demo is not installed): pass --tokenizer PATH.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        if preset not in SUITE_PRESETS:
            raise UserError(f"preset {preset!r} is not one of {', '.join(SUITE_PRESETS)}.")
        path = ensure_bundle(preset, Path(bundles_dir), Path(tokenizer), log)
        settings = dict(o)
        if preset == "tiny":  # the tiny model measures the runtime's fixed costs: fewer reps suffice
            settings["reps"] = min(o["reps"], 5)
        log(f"benchmarking {path}...")
        report = run_bench(path, log=log, **settings)
        click.echo(f"\n===== {preset} =====")
        click.echo(format_report(report))
        js, png = out / f"{preset}.json", out / f"{preset}.png"
        old = None
        if js.is_file():
            old = (str(out / f"{preset}.prev.json"), json.loads(js.read_text()))
            js.rename(old[0])
        _write_outputs(report, js, png, old)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
