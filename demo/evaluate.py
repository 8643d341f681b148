"""Held-out accuracy of a bundle on the demo task, through the runtime (greedy decoding).

    cogvlm2-lite demo-eval [BUNDLE] [-n 500] [--json]

Without BUNDLE the embedded model's cached bundle is used (exported on first use). Samples are the
first n of the held-out stream (`task.HELDOUT_SEED`, never seen in training); a sample is right when
the generated text, stripped, equals the answer exactly.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .task import HELDOUT_SEED, QTYPES

MAX_NEW_TOKENS = 32  # the longest answer (a four-shape description) is 15 tokens


def evaluate(bundle, n: int = 500, seed: int = HELDOUT_SEED, engine=None, on_sample=None) -> dict:
    """Run the first n held-out samples through the bundle; -> accuracy per question type and overall."""
    from cogvlm2_lite.runtime.engine import Engine, Request
    from cogvlm2_lite.runtime.errors import UserError
    from cogvlm2_lite.runtime.sampling import SamplingParams
    from . import task

    if n < 1:
        raise UserError(f"-n must be at least 1, not {n}.")
    engine = engine or Engine(bundle)
    size = engine.pre["image_size"]
    # all images stay alive until the end: the engine's prefix reuse tells PIL images apart by identity
    samples = task.generate(seed, n, size)
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    per = {q: [0, 0] for q in QTYPES}
    mistakes = []
    start = time.perf_counter()
    for i, s in enumerate(samples):
        text = engine.generate([Request(s.question, image=s.image, params=params)])[0].text.strip()
        ok = text == s.answer
        per[s.qtype][0] += ok
        per[s.qtype][1] += 1
        if not ok:
            mistakes.append({"index": i, "question": s.question, "answer": s.answer, "output": text})
        if on_sample:
            on_sample(i, ok)
    right = sum(c for c, _ in per.values())
    return {
        "bundle": str(bundle), "seed": seed, "n": n,
        "per_type": {q: {"correct": c, "total": t, "accuracy": c / t if t else None} for q, (c, t) in per.items()},
        "overall": {"correct": right, "total": n, "accuracy": right / n},
        "seconds": round(time.perf_counter() - start, 2),
        "mistakes": mistakes,
    }


def format_table(r: dict) -> str:
    lines = [f"{'question type':<14}{'correct':>9}{'total':>7}{'accuracy':>10}"]
    rows = [(q, v) for q, v in r["per_type"].items() if v["total"]] + [("overall", r["overall"])]
    for name, v in rows:
        if name == "overall":
            lines.append("-" * 40)
        lines.append(f"{name:<14}{v['correct']:>9}{v['total']:>7}{100 * v['accuracy']:>9.1f}%")
    return "\n".join(lines)


def format_comparison(results: list) -> str:
    """Accuracy per question type, one column per bundle (e.g. fp32 against its quantized bundles)."""
    names = [Path(r["bundle"]).name[:12] for r in results]
    lines = [f"{'question type':<14}" + "".join(f"{n:>13}" for n in names)]
    for q in [q for q, v in results[0]["per_type"].items() if v["total"]] + ["overall"]:
        accs = [(r["overall"] if q == "overall" else r["per_type"][q])["accuracy"] for r in results]
        lines.append(f"{q:<14}" + "".join(f"{100 * a:>12.1f}%" for a in accs))
    base = results[0]["overall"]["correct"]
    lines.append(f"{'vs first':<14}" + "".join(f"{r['overall']['correct'] - base:>+13d}" for r in results))
    return "\n".join(lines)


@click.command("demo-eval")
@click.argument("bundles", nargs=-1, type=click.Path(file_okay=False))
@click.option("-n", "n", type=click.IntRange(min=1), default=500, show_default=True, help="Number of held-out samples.")
@click.option("--seed", type=int, default=HELDOUT_SEED, show_default=True, help="Sample stream (default: held-out).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with the mistakes) instead of a table.")
@click.option("--show-mistakes", type=click.IntRange(min=0), default=0, help="List up to this many wrong answers after the table.")
@click.option("--backend", default="auto", show_default=True, help="mindspore, onnxruntime, lite or auto.")
def demo_eval(bundles, n, seed, as_json, show_mistakes, backend):
    """Exact-match accuracy on the demo task's held-out split, greedy, through the runtime; several
    BUNDLES (e.g. fp32 and its quantized exports) are compared on the same samples."""
    if not bundles:
        from .embedded import ensure_bundle
        bundles = [ensure_bundle(log=lambda m: click.echo(m, err=True))]
    from tqdm import tqdm

    from cogvlm2_lite.runtime.engine import Engine
    results = []
    for bundle in bundles:
        engine = Engine(bundle, backend)
        with tqdm(total=n, desc="demo-eval", unit="sample", disable=as_json, file=sys.stderr,
                  leave=False) as bar:
            r = evaluate(bundle, n, seed, engine, on_sample=lambda i, ok: bar.update(1))
        results.append(r)
        if not as_json:
            click.echo(f"bundle {r['bundle']} ({engine.backend.name}): {n} samples of seed {seed}, greedy, "
                       f"{r['seconds']:.1f}s")
            if len(bundles) == 1:
                click.echo(format_table(r))
            for m in r["mistakes"][:show_mistakes]:
                click.echo(f"  #{m['index']} {m['question']!r}: expected {m['answer']!r}, got {m['output']!r}")
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    elif len(results) > 1:
        click.echo(format_comparison(results))
