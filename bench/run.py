"""`cogvlm2-lite bench BUNDLE`: how fast a bundle runs here, and how far from what this machine allows.

One run measures (bench/measure.py, one worker process per backend, side by side):
  - bundle load time, first call of each graph, peak RSS, KV-cache and weight bytes;
  - image preprocessing (JPEG decode, resize, normalize) at the bundle's size and at 1344;
  - the vision graph; TTFT with its breakdown (tokenize, preprocess, vision, prefill, first sample);
  - prefill tokens/s per chunk size; decode time per token per cache bucket; serving throughput;
  - an image asked about again (image X + question 1, image Y, image X + question 2, B = 1): the third
    TTFT against the first with the encoder and image-prefix caches, and their hits, misses and bytes;
  - generation end to end (tokens/s) and the host share of a decode step;
and the reference points that give those numbers a meaning (bench/machine.py, bench/costs.py):
  - the machine's read bandwidth with all cores and the bytes one decode step must read -> decode's
    fraction of the memory roofline; numpy's GEMV over the same matrices (what plain BLAS reaches);
  - BLAS fp32 GEMM FLOP/s -> prefill's fraction of peak;
  - the same decode step run eagerly (MindSpore PyNative, graphs/ cells, same weights): the no-AOT
    baseline (bench/eager.py);
  - a per-op profile of a decode step, by the backend's own profiler (bench/profile.py).
The machine probes and the eager baseline run in their own processes too. bench/report.py derives
the figures and targets and writes the text; bench/plot.py draws the chart.
"""
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import click
import psutil

from cogvlm2_lite.runtime.backends import BACKENDS, usable_backends
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.options import stack

from .costs import model_costs
from .machine import cpu_counters, others_cpu_share
from .measure import SECTIONS
from .plot import plot
from .report import SCHEMA, compare, derive, format_compare, format_report


def subprocess_json(args, what: str, timeout: float, cwd=None) -> dict:
    """Run a helper process that prints one JSON object on its last line of stdout -> that object, or
    {"error": one sentence} when it fails, times out or prints none."""
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


def _backends_for(bundle: Bundle, wanted) -> tuple[list, list]:
    """-> (backends to measure, backends skipped): `wanted`, or every usable one."""
    if wanted:
        unknown = [n for n in wanted if n not in BACKENDS]
        if unknown:
            raise UserError(f"backend {unknown[0]!r} is not available: choose from {', '.join(BACKENDS)}.")
        return list(wanted), []
    usable = usable_backends(bundle)
    return usable, [n for n in BACKENDS if n not in usable]


def _probe(spec: dict, tmp: Path, name: str) -> dict:
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    return subprocess_json([sys.executable, "-m", "cogvlm2_lite.bench.machine", str(tmp / f"{name}.json")],
                           "the machine probe", 900)


def _measure(bundle_path, name: str, options: dict, tmp: Path) -> dict:
    """One backend's measurements, in a worker process of its own (bench/measure.py)."""
    spec = tmp / f"spec-{name}.json"
    spec.write_text(json.dumps({"bundle": str(Path(bundle_path).resolve()), "backend": name,
                                "options": {**options, "ref_out": str(tmp / f"ref-{name}.npy")}}))
    out = tmp / f"out-{name}.json"
    p = subprocess.run([sys.executable, "-m", "cogvlm2_lite.bench.measure", str(spec), str(out)],
                       capture_output=True, text=True, cwd=tmp)
    if out.is_file():
        return json.loads(out.read_text())
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"backend": name, "error": f"worker failed (exit {p.returncode}): {tail}"}


def run_bench(bundle_path, *, backends=(), reps=10, warmup=2, decode_reps=16, gen_tokens=32, gen_reps=3,
              eager_steps=3, profile=True, quick=False, sections=(), log=print) -> dict:
    """The whole benchmark of one tp-1 bundle -> the report dict (module docstring; bench/report.py).
    Raises UserError for a tensor-parallel bundle or a failed machine probe."""
    bundle = Bundle(bundle_path)
    if bundle.tp > 1:
        raise UserError(f"{bundle_path} is split over {bundle.tp} ranks: bench runs tp 1 bundles (export one with "
                        "--tp 1 for a single-machine benchmark).")
    m = bundle.manifest
    names, skipped = _backends_for(bundle, backends)
    costs = model_costs(bundle)
    options = {"reps": reps, "warmup": warmup, "decode_reps": decode_reps, "gen_tokens": gen_tokens,
               "gen_reps": gen_reps, "eager_steps": eager_steps, "profile": profile, "quick": quick,
               "profile_steps": 2 if quick else 5, "sections": list(sections)}
    cfg = m["model"]
    report = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(Path(bundle_path).resolve()), "dtype": m["dtype"], "tp": m["tp"], "batch": m["batch"],
                   "buckets": m["buckets"], "formats": m["formats"], "tools": m.get("tools", {}),
                   "model": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_multi_query_heads", "vocab_size",
                                                 "max_position_embeddings")},
                   "vision": {k: cfg["vision_config"][k] for k in ("hidden_size", "num_hidden_layers", "image_size")},
                   "num_image_tokens": m["num_image_tokens"], "params": costs["params"],
                   "weight_bytes": bundle.weight_bytes(0)},
        "settings": options,
    }
    counters = cpu_counters()
    with tempfile.TemporaryDirectory(prefix="cogvlm2-bench-") as tmp:
        tmp = Path(tmp)
        log("machine probes (bandwidth with all cores, GEMM, decode-shaped GEMV chain)...")
        spec = {"bandwidth_bytes": (64 << 20) if quick else None, "reps": 3 if quick else 7,
                "matmul_shapes": [[256, 256, 256]] if quick else
                [[2048, 2048, 2048], [max(bundle.buckets["chunk"]), cfg["hidden_size"],
                                      cfg["intermediate_size"]]],
                "gemv_shapes": costs["gemv_shapes"]}
        probes = _probe(spec, tmp, "probe")
        if "error" in probes:
            raise UserError(probes["error"])
        report["machine"] = probes.pop("machine")
        report["reference"] = {**probes, "decode_weight_bytes": costs["decode_weight_bytes"],
                               "kv_read_bytes": costs["kv_read_bytes"], "prefill_flops": costs["prefill_flops"],
                               "note": costs["note"]}

        report["backends"] = {}
        for name in names:
            log(f"backend {name}...")
            report["backends"][name] = _measure(bundle_path, name, options, tmp)
        for name in skipped:
            report["backends"][name] = {"backend": name, "skipped": f"this bundle has no graphs for {name} "
                                        "or its package is not installed"}

        log("machine probe again (bandwidth after the backends: the machine may be shared)...")
        again = _probe({**spec, "bandwidth_only": True}, tmp, "probe2")
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
            args = [sys.executable, "-m", "cogvlm2_lite.bench.eager", str(Path(bundle_path).resolve()),
                    "--steps", str(eager_steps), "--warmup", "1"] + (["--ref", str(ref)] if ref else [])
            report["eager"] = subprocess_json(args, "the eager baseline", 1800, cwd=tmp)
        else:
            report["eager"] = {"skipped": "--eager-steps 0"}
    report["machine"]["load_average_after"] = list(psutil.getloadavg())
    report["machine"]["others_cpu_share"] = others_cpu_share(counters, cpu_counters())
    derive(report)
    return report


def check_plot_path(plot_out):
    """Raises UserError, before any measuring, for a --plot file whose suffix matplotlib cannot write."""
    if plot_out:
        from matplotlib.figure import Figure
        kinds = Figure().canvas.get_supported_filetypes()
        if Path(plot_out).suffix.lstrip(".").lower() not in kinds:
            raise UserError(f"--plot {plot_out}: name a file ending in one of .{', .'.join(sorted(kinds))} (PNG: .png).")


def save_output(path, write) -> None:
    """write(path) for a --json or --plot file (None: not asked for), its folder made first, then say so.
    Raises UserError for a path that cannot be written. The benchmark commands all write through here."""
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(path)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror or e}).") from None
        click.echo(f"wrote {path}")


def write_outputs(report, json_out, plot_out, compare_with):
    """Write the JSON report and the chart where asked; print new/old ratios against (label, old report).
    Raises UserError for a path that cannot be written (the report is still printed)."""
    save_output(json_out, lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    save_output(plot_out, lambda p: plot(report, p))
    if compare_with:  # (label, old report)
        click.echo(f"\ncompared with {compare_with[0]} (new/old):")
        click.echo(format_compare(compare(report, compare_with[1])))


options = stack(
    click.option("--backend", "backends", multiple=True, help="Backend(s) to measure (default: every usable one)."),
    click.option("--reps", type=int, default=10, show_default=True, help="Timed repetitions per figure."),
    click.option("--warmup", type=int, default=2, show_default=True, help="Untimed calls before each figure."),
    click.option("--decode-reps", type=int, default=16, show_default=True, help="Timed decode steps per cache bucket."),
    click.option("--gen-tokens", type=int, default=32, show_default=True, help="New tokens per end-to-end generation."),
    click.option("--gen-reps", type=int, default=3, show_default=True, help="Timed end-to-end generations."),
    click.option("--eager-steps", type=int, default=3, show_default=True, help="PyNative decode steps (0: skip)."),
    click.option("--profile/--no-profile", default=True, show_default=True, help="Per-op profile of decode (MindSpore, onnxruntime) and prefill (MindSpore)."),
    click.option("--quick", is_flag=True, help="Small machine probes (smoke runs; reference figures are rough)."),
    click.option("--sections", default=None, callback=lambda ctx, param, v: parse_sections(v),
                 help=f"Comma-separated sections to measure (default all: {','.join(SECTIONS)}); load and memory are "
                      "always measured. At full size: preprocess,ttft_text,decode (and `run --image --json` for an image)."),
)


def parse_sections(text) -> tuple:
    """'ttft,decode' -> ('ttft', 'decode'); None -> () (all). Raises UserError for an unknown section."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise UserError(f"--sections {text}: choose from {', '.join(SECTIONS)}.")
    if "generate" in names and "decode" not in names:
        raise UserError("--sections: generate needs decode (its host figures come from the decode section).")
    return names


def check_counts(o):
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
@options
def bench(bundle, json_out, plot_out, compare_with, **o):
    """Benchmark a bundle: latency, throughput, memory, and how far from this machine's limits."""
    check_counts(o)
    check_plot_path(plot_out)
    old = None
    if compare_with:  # read first: it may be the file --json is about to replace
        try:
            old = json.loads(Path(compare_with).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("summary"), dict):   # what `compare` reads
            raise UserError(f"{compare_with} is not a report of `cogvlm2-lite bench --json` (it has no summary).")
    report = run_bench(bundle, log=lambda s: click.echo(s, err=True), **o)
    click.echo(format_report(report))
    write_outputs(report, json_out, plot_out, old and (compare_with, old))
    failed = [f"{name}: {r['error']}" for name, r in report.get("backends", {}).items() if "error" in r]
    if failed:
        raise UserError(f"the benchmark of {len(failed)} backend(s) failed ({'; '.join(failed)}); the report has the rest.")
