"""`cogvlm2-lite quant-bench FP32_BUNDLE QUANT_BUNDLE...`: decode speed, prefill speed and weight bytes of
quantized bundles against their fp32 bundle, measured in one process, the bundles taking turns step by
step (so machine noise falls on all of them alike). Decode is the memory-bound loop quantization is for;
prefill (a text prompt of --prompt-tokens, 128 by default) is compute-bound. --compare-kernels also runs
each quantized bundle with onnxruntime's own kernels instead of ours (kernels/).

`quant-bench --suite` (what `./build.sh bench` runs after the bench suite): calibrate the bench
preset's fp32 bundle, export its w8a8, w4a16 and w4a8 bundles (cached while the code is unchanged), and
compare the three.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import click
import numpy as np

from cogvlm2_lite.calib.stats import STATS_FILE
from cogvlm2_lite.runtime.bundle import Bundle, sha256
from cogvlm2_lite.runtime.errors import UserError

from .machine import machine_info
from .run import save_output
from .suite import SUITE_PRESETS, cached_export, cogvlm2_cli, demo_tokenizer, ensure_bundle
from .timing import rss_bytes


def decode_inputs(bundle, name: str, rng, depth: int | None = None) -> list:
    """A decode step's inputs at cache depth `depth` (default: the cache half full, what a generation sees on
    average)."""
    info = bundle.graph(name)
    t = int(name.split("_")[1])
    depth = t // 2 if depth is None else depth
    out = []
    for d in info.inputs:
        shape, dt = tuple(d["shape"]), np.dtype(d["dtype"])
        if d["name"] == "token":
            out.append(rng.integers(0, 700, shape).astype(dt))
        elif d["name"] in ("position", "write_index"):
            out.append(np.full(shape, depth, dt))
        else:
            out.append((rng.standard_normal(shape) * 0.5).astype(dt))
    return out


def decode_points(bundles, depths) -> list[tuple[str, int | None]]:
    """(decode graph, cache depth) to time: every shared decode bucket half full, or for each of `depths`
    the smallest shared bucket that holds it. Raises UserError when the bundles share no decode bucket or none
    holds a depth."""
    shared = sorted(set.intersection(*[{g for g in b.graph_names if g.startswith("decode_")} for b in bundles]),
                    key=lambda g: int(g.split("_")[1]))
    if not shared:
        raise UserError("the bundles share no decode bucket: export them with the same --buckets decode=...")
    if not depths:
        return [(g, None) for g in shared]
    points = []
    for d in depths:
        g = next((g for g in shared if int(g.split("_")[1]) > d), None)
        if g is None:
            raise UserError(f"no decode bucket of these bundles holds a cache depth of {d} (buckets: {', '.join(shared)}).")
        points.append((g, d))
    return points


def load(paths, backend: str, compare_kernels: bool, log, threads: int | None = None) -> list[tuple]:
    """(bundle, its engine, label, resident bytes its loading added) for each bundle; with `compare_kernels`
    each quantized bundle a second time with onnxruntime's own kernels instead of ours (runtime/kernels.py)."""
    from cogvlm2_lite.runtime import kernels
    from cogvlm2_lite.runtime.engine import Engine
    out = []
    for p in paths:
        b = Bundle(p)
        scheme = (b.manifest.get("quant") or {}).get("scheme")
        for own in (True, False) if compare_kernels and scheme else (True,):
            saved = os.environ.get(kernels.LIBRARY_ENV)
            if not own:
                os.environ[kernels.LIBRARY_ENV] = os.devnull   # no library there: onnxruntime's kernels
            try:
                t, before = time.perf_counter(), rss_bytes()
                engine = Engine(b, backend, **({"threads": threads} if threads else {}))
                resident = rss_bytes() - before  # weights + packed copies + sessions + KV cache
            finally:
                if saved is None:
                    os.environ.pop(kernels.LIBRARY_ENV, None)
                else:
                    os.environ[kernels.LIBRARY_ENV] = saved
            ours = getattr(engine.backend, "kernels", None)
            label = (scheme or b.manifest["dtype"]) + ("" if not scheme else " (ours)" if ours else " (onnxruntime)")
            log(f"loaded {b.path} ({backend}, {label}) in {time.perf_counter() - t:.1f} s, +{resident / 2**20:.0f} MiB resident")
            out.append((b, engine, label, resident))
    return out


def measure(paths, backend: str, steps: int, warmup: int, log, depths=None, prompt_tokens: int = 128,
            compare_kernels: bool = False, threads: int | None = None) -> dict:
    """Decode ms/token of each bundle at each point of `decode_points`, and the tokens/s of a text prompt of
    `prompt_tokens` (prefill, chunk by chunk as the engine feeds it; 0: not measured), the bundles taking
    turns step by step, each also as this process's CPU time (on a machine shared with other work, the
    wall clock also counts the time the scheduler gave others); and the resident memory each adds when
    loaded. Raises UserError when the bundles share no decode bucket."""
    from cogvlm2_lite.runtime import kernels
    loaded = load(paths, backend, compare_kernels, log, threads)
    points = decode_points([b for b, *_ in loaded], depths)
    rng = np.random.default_rng(0)
    rows = []
    for g, depth in points:
        inputs = [decode_inputs(b, g, rng, depth) for b, *_ in loaded]
        times, cpu = [[] for _ in loaded], [[] for _ in loaded]
        for i in range(warmup + steps):
            for k, (_, engine, _, _) in enumerate(loaded):
                t, c = time.perf_counter(), time.process_time()
                engine.backend.run(g, inputs[k])
                if i >= warmup:
                    times[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
        med = [float(np.median(ts)) for ts in times]
        for k, (b, _, label, _) in enumerate(loaded):
            rows.append({"bundle": str(b.path), "quant": label, "graph": g,
                         "depth": int(g.split("_")[1]) // 2 if depth is None else depth, "decode_ms": med[k] * 1e3,
                         "decode_ms_min": min(times[k]) * 1e3, "decode_cpu_ms": float(np.median(cpu[k])) * 1e3,
                         "speedup_vs_first": med[0] / med[k]})
    prefill = []
    if prompt_tokens:
        ids = [int(i) for i in rng.integers(0, 700, prompt_tokens)]
        times, cpu = [[] for _ in loaded], [[] for _ in loaded]
        for i in range(1 + max(1, steps // 4)):
            for k, (_, engine, _, _) in enumerate(loaded):
                t, c = time.perf_counter(), time.process_time()
                engine.prefill([ids])
                if i >= 1:
                    times[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
        for k, (b, _, label, _) in enumerate(loaded):
            s = float(np.median(times[k]))
            prefill.append({"bundle": str(b.path), "quant": label, "prompt_tokens": prompt_tokens, "prefill_s": s,
                            "prefill_cpu_s": float(np.median(cpu[k])), "tokens_per_s": prompt_tokens / s,
                            "speedup_vs_first": float(np.median(times[0])) / s})
    sizes = [{"bundle": str(b.path), "quant": label, "weight_bytes": b.weight_bytes(0),
              "bytes_vs_first": b.weight_bytes(0) / loaded[0][0].weight_bytes(0), "load_rss_bytes": resident}
             for b, _, label, resident in loaded]
    name, why = kernels.isa()
    return {"backend": backend, "steps": steps, "threads": threads, "kernels_isa": name or None, "kernels_note": why or None,
            "machine": machine_info(), "decode": rows, "prefill": prefill, "weights": sizes}


def format_report(r: dict) -> str:
    lines = [f"decode on {r['backend']}, median of {r['steps']} steps (bundles taking turns; our kernels: "
             f"{r.get('kernels_isa') or r.get('kernels_note')}):"]
    for row in r["decode"]:
        lines.append(f"  {row['graph']:12s} depth {row.get('depth', '?'):>5} {row['quant']:24s} {row['decode_ms']:8.2f} ms/token"
                     f" (CPU {row.get('decode_cpu_ms', float('nan')):6.2f} ms)   {row['speedup_vs_first']:5.2f}x   {row['bundle']}")
    for row in r.get("prefill", []):
        lines.append(f"  prefill {row['prompt_tokens']} tokens   {row['quant']:24s} {row['tokens_per_s']:8.1f} tokens/s"
                     f" (CPU {row['prefill_cpu_s']:.3f} s)   {row['speedup_vs_first']:5.2f}x   {row['bundle']}")
    lines.append("weight files, and resident memory added by loading the bundle (packed copies and KV cache included):")
    for s in r["weights"]:
        lines.append(f"  {s['weight_bytes'] / 1e6:10.1f} MB  {s['bytes_vs_first']:.3f}x   "
                     f"loaded +{s['load_rss_bytes'] / 1e6:7.1f} MB   {s.get('quant', ''):24s} {s['bundle']}")
    return "\n".join(lines)


SUITE_SCHEMES = ("w8a8", "w4a16", "w4a8")


def suite_bundles(folder: Path, log) -> list[Path]:
    """bundles/bench (fp32, the bench suite's) with its statistics, and bundles/bench-<scheme>."""
    tokenizer = demo_tokenizer()
    fp32 = ensure_bundle("bench", folder, tokenizer, log)
    stats = fp32 / STATS_FILE
    if not stats.is_file():
        log(f"calibrating {fp32} ...")
        subprocess.run(cogvlm2_cli() + ["calibrate", str(fp32), "-n", "8"], check=True)
    out = [fp32]
    for scheme in SUITE_SCHEMES:
        args = ["--random-init", "bench", "--tokenizer", str(tokenizer), "--format", "onnx", "--buckets",
                SUITE_PRESETS["bench"], "--quant", scheme, "--calib-stats", str(stats)]
        out.append(cached_export(folder / f"bench-{scheme}", {"scheme": scheme, "stats": sha256(stats)}, args, log))
    return out


@click.command("quant-bench")
@click.argument("bundles", nargs=-1, type=click.Path(file_okay=False, exists=True))
@click.option("--suite", is_flag=True, help="Export and compare the bench preset's fp32, w8a8, w4a16 and w4a8 bundles.")
@click.option("--bundles-dir", default="bundles", show_default=True, help="--suite: where bundles are cached.")
@click.option("--backend", type=click.Choice(["mindspore", "onnxruntime"]), default="onnxruntime", show_default=True)
@click.option("--steps", type=int, default=16, show_default=True, help="Timed decode steps per bucket and bundle.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--depths", default=None, help="Cache depths to decode at, e.g. 256,1000 (default: each decode bucket "
              "half full).")
@click.option("--prompt-tokens", type=int, default=128, show_default=True,
              help="Prefill tokens/s of a text prompt this long (0: not measured).")
@click.option("--compare-kernels", is_flag=True, help="Also run each quantized bundle with onnxruntime's own kernels "
              "instead of ours (kernels/).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime's intra-op threads (default: the physical cores).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def quant_bench(bundles, suite, bundles_dir, backend, steps, warmup, depths, prompt_tokens, compare_kernels, threads,
                json_out):
    """Decode ms/token and weight bytes of each bundle, relative to the first (the fp32 one)."""
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if suite:
        if bundles:
            raise UserError("give bundles or --suite, not both.")
        bundles = suite_bundles(Path(bundles_dir), log)
        json_out = json_out or "out/bench/quant.json"
    if len(bundles) < 2:
        raise UserError("give the fp32 bundle first, then one or more quantized bundles of the same model.")
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0.")
    first = (Bundle(bundles[0]).manifest.get("quant") or {}).get("scheme")
    if first:
        raise UserError(f"{bundles[0]} is quantized ({first}): give the fp32 bundle first, the one the others are "
                        "compared with.")
    try:
        depths = [int(d) for d in depths.split(",")] if depths else None
    except ValueError:
        raise UserError(f"--depths takes cache depths separated by commas, e.g. 256,1000, not {depths!r}.") from None
    if prompt_tokens < 0 or any(d < 0 for d in depths or ()):
        raise UserError("--prompt-tokens and --depths must not be negative.")
    if threads and backend != "onnxruntime":
        raise UserError("--threads sets onnxruntime's threads: use it with --backend onnxruntime.")
    r = measure(bundles, backend, steps, warmup, log, depths, prompt_tokens, compare_kernels, threads)
    click.echo(format_report(r))
    save_output(json_out, lambda p: Path(p).write_text(json.dumps(r, indent=1)))
