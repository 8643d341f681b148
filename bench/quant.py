"""`cogvlm2-lite quant-bench FP32_BUNDLE QUANT_BUNDLE...`: decode speed and weight bytes of quantized
bundles against their fp32 bundle, measured in one process, the bundles taking turns step by step
(so machine noise falls on all of them alike). Decode is the memory-bound loop quantization is for.

`quant-bench --suite` (what `./build.sh bench` runs after the bench suite): calibrate the bench
preset's fp32 bundle, export its w8a8, w4a16 and w4a8 bundles (cached while the code is unchanged), and
compare the three.
"""
import json
import subprocess
import time
from pathlib import Path

import click
import numpy as np

from cogvlm2_lite.calib.stats import STATS_FILE
from cogvlm2_lite.runtime.backends import BACKENDS
from cogvlm2_lite.runtime.bundle import Bundle, sha256
from cogvlm2_lite.runtime.errors import UserError

from .run import save_output
from .suite import SUITE_PRESETS, cached_export, cogvlm2_cli, demo_tokenizer, ensure_bundle
from .timing import rss_bytes


def decode_inputs(bundle, name: str, rng) -> list:
    """A decode step's inputs with the cache half full (what a generation sees on average)."""
    info = bundle.graph(name)
    t = int(name.split("_")[1])
    out = []
    for d in info.inputs:
        shape, dt = tuple(d["shape"]), np.dtype(d["dtype"])
        if d["name"] == "token":
            out.append(rng.integers(0, 700, shape).astype(dt))
        elif d["name"] in ("position", "write_index"):
            out.append(np.full(shape, t // 2, dt))
        else:
            out.append((rng.standard_normal(shape) * 0.5).astype(dt))
    return out


def measure(paths, backend: str, steps: int, warmup: int, log) -> dict:
    """Decode ms/token of each bundle per shared decode bucket (the bundles taking turns step by step) and
    the resident memory each adds when loaded. Raises UserError when the bundles share no decode bucket."""
    bundles = [Bundle(p) for p in paths]
    decode = sorted(set.intersection(*[{g for g in b.graph_names if g.startswith("decode_")} for b in bundles]),
                    key=lambda g: int(g.split("_")[1]))
    if not decode:
        raise UserError("the bundles share no decode bucket: export them with the same --buckets decode=...")
    loaded, resident = [], []
    for b in bundles:
        t, before = time.perf_counter(), rss_bytes()
        loaded.append(BACKENDS[backend](b, 0))
        resident.append(rss_bytes() - before)  # weights + packed copies + sessions
        log(f"loaded {b.path} ({backend}) in {time.perf_counter() - t:.1f} s, +{resident[-1] / 2**20:.0f} MiB resident")
    rng = np.random.default_rng(0)
    rows = []
    for g in decode:
        inputs = [decode_inputs(b, g, rng) for b in bundles]
        times = [[] for _ in bundles]
        for i in range(warmup + steps):
            for k, be in enumerate(loaded):
                t = time.perf_counter()
                be.run(g, inputs[k])
                if i >= warmup:
                    times[k].append(time.perf_counter() - t)
        med = [float(np.median(ts)) for ts in times]
        for k, b in enumerate(bundles):
            rows.append({"bundle": str(b.path), "quant": (b.manifest.get("quant") or {}).get("scheme", b.manifest["dtype"]),
                         "graph": g, "decode_ms": med[k] * 1e3, "decode_ms_min": min(times[k]) * 1e3,
                         "speedup_vs_first": med[0] / med[k]})
    sizes = [{"bundle": str(b.path), "weight_bytes": b.weight_bytes(0),
              "bytes_vs_first": b.weight_bytes(0) / bundles[0].weight_bytes(0), "load_rss_bytes": resident[k]}
             for k, b in enumerate(bundles)]
    return {"backend": backend, "steps": steps, "decode": rows, "weights": sizes}


def format_report(r: dict) -> str:
    lines = [f"decode on {r['backend']}, median of {r['steps']} steps (bundles taking turns):"]
    for row in r["decode"]:
        lines.append(f"  {row['graph']:12s} {row['quant']:8s} {row['decode_ms']:8.2f} ms/token   "
                     f"{row['speedup_vs_first']:5.2f}x   {row['bundle']}")
    lines.append("weight files, and resident memory added by loading the bundle (packed copies included):")
    for s in r["weights"]:
        lines.append(f"  {s['weight_bytes'] / 1e6:10.1f} MB  {s['bytes_vs_first']:.3f}x   "
                     f"loaded +{s['load_rss_bytes'] / 1e6:7.1f} MB   {s['bundle']}")
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def quant_bench(bundles, suite, bundles_dir, backend, steps, warmup, json_out):
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
    r = measure(bundles, backend, steps, warmup, log)
    click.echo(format_report(r))
    save_output(json_out, lambda p: Path(p).write_text(json.dumps(r, indent=1)))
