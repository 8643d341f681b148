"""`bench-tp`: TTFT and decode time per token as `generate` serves a bundle, tp 1 or tensor-parallel, and where
a step's time goes.

A tp > 1 bundle runs under msrun (this command relaunches itself, `--cluster` across hosts, as `run` and
`serve` do), so tp 1 and tp 2 are measured on the same terms: the scheduler's plans, the runner's graph calls.
A step's time splits into
- the graph calls (Engine.timings.graph_s): the compute, and for tp > 1 the collectives inside the graphs
  (the all-reduce after each attention and MLP). They cannot be timed apart from inside a graph: compare
  the graph time with a tp-1 run's on the same machine, whose excess bounds what the split costs;
- rank 0's plan broadcast (runtime/tp_channel.py; Engine.timings.plan_broadcast_s);
- the host: scheduling, sampling, the KV-cache bookkeeping (the rest).
Each figure is the median over --reps, after --warmup untimed runs (a graph's first call compiles it).
"""
import json
import statistics
import time
from pathlib import Path

import click

from cogvlm2_lite.runtime.msrun import cluster_option

PROMPT = "Describe the image in detail."


def _runs(engine, request, reps: int, warmup: int) -> list[dict]:
    """`request` run alone warmup + reps times -> per timed run: TTFT, decode seconds per token, and the seconds
    per step inside graphs (by kind), in the plan broadcast, and in the host."""
    tm = engine.timings
    out = []
    for i in range(warmup + reps):
        graph0, bcast0, plans0 = dict(tm.graph_s), tm.plan_broadcast_s, tm.plans_sent
        t = time.perf_counter()
        r = engine.generate([request])[0]
        wall = time.perf_counter() - t
        if i < warmup:
            continue
        graph = {k: v - graph0.get(k, 0.0) for k, v in tm.graph_s.items() if v - graph0.get(k, 0.0) > 0}
        steps = max(tm.plans_sent - plans0, 1) if engine.channel is not None else None
        out.append({"ttft_s": r.ttft_s, "tokens": r.completion_tokens,
                    "decode_s_per_token": (r.total_s - r.ttft_s) / (r.completion_tokens - 1)
                    if r.completion_tokens > 1 else None,
                    "graph_s": graph, "plan_broadcast_s": tm.plan_broadcast_s - bcast0, "plans": steps,
                    "host_s": wall - sum(graph.values()) - (tm.plan_broadcast_s - bcast0)})
    return out


def _median(runs: list[dict], key):
    values = [key(r) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(engine, reps: int, warmup: int, gen_tokens: int) -> dict:
    """The figures of one engine (rank 0's): text TTFT, image TTFT, decode per token (module docstring)."""
    from cogvlm2_lite.runtime.engine import Request
    from cogvlm2_lite.runtime.sampling import SamplingParams
    from .photo import test_photo
    photo = test_photo()
    first = SamplingParams(max_new_tokens=1)
    cases = {"ttft_text": Request(PROMPT, params=first),
             "ttft_image": Request(PROMPT, image=photo, params=first),
             "decode": Request(PROMPT, params=SamplingParams(max_new_tokens=gen_tokens, ignore_eos=True))}
    report = {}
    for name, request in cases.items():
        runs = _runs(engine, request, reps, warmup)
        kinds = sorted({k for r in runs for k in r["graph_s"]})
        figures = {"graph_s": {k: _median(runs, lambda r: r["graph_s"].get(k, 0.0)) for k in kinds},
                   "plan_broadcast_s": _median(runs, lambda r: r["plan_broadcast_s"]),
                   "host_s": _median(runs, lambda r: r["host_s"]), "plans": _median(runs, lambda r: r["plans"])}
        if name == "decode":
            steps = gen_tokens - 1   # the decode steps after the first token
            report[name] = {"s_per_token": _median(runs, lambda r: r["decode_s_per_token"]), "tokens": gen_tokens,
                            "plans": figures["plans"],
                            "per_step": {"graph_s": figures["graph_s"].get("decode", 0.0) / steps,
                                         "plan_broadcast_s": figures["plan_broadcast_s"] / steps,
                                         "host_s": figures["host_s"] / gen_tokens}}
        else:
            report[name] = {"s": _median(runs, lambda r: r["ttft_s"]), **figures}
    return report


@click.command("bench-tp")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per figure.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed runs first.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="New tokens of the decode figure.")
@click.option("--backend", default="auto", show_default=True)
@cluster_option
def bench_tp(bundle, json_out, reps, warmup, gen_tokens, backend, cluster):
    """TTFT and decode ms/token of BUNDLE (tp 1, or tensor-parallel under msrun) and where a step's time goes."""
    from cogvlm2_lite.runtime.msrun import relaunch_under_msrun
    from cogvlm2_lite.runtime.options import follow_if_not_rank0
    if relaunch_under_msrun(bundle, cluster):
        return
    from cogvlm2_lite.runtime.engine import Engine
    engine = Engine(bundle, backend=backend, prefix_cache=False)
    follow_if_not_rank0(engine)
    report = {"bundle": str(Path(bundle).resolve()), "tp": engine.bundle.tp, "cluster": cluster,
              "backend": engine.backend.name, "reps": reps, "warmup": warmup,
              **measure(engine, reps, warmup, gen_tokens)}
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    ms = lambda s: f"{s * 1e3:.1f} ms"   # noqa: E731
    d = report["decode"]["per_step"]
    click.echo(f"tp {report['tp']}: TTFT text {ms(report['ttft_text']['s'])}, image {ms(report['ttft_image']['s'])}; "
               f"decode {ms(report['decode']['s_per_token'])}/token = graph {ms(d['graph_s'])} + plan broadcast "
               f"{ms(d['plan_broadcast_s'])} + host {ms(d['host_s'])}")
