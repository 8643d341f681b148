"""`cogvlm2-lite bench-serve BUNDLE`: the serving benchmark, against a real `serve` process over HTTP.

What vLLM's benchmark_serving reports, at several client concurrencies (closed loop: each client
sends its next request when its previous one ends): requests/s, output tokens/s, TTFT, TPOT (per
request: (end - first token) / (tokens - 1)) and ITL (every gap between streamed pieces), as p50 /
p90 / p99. At concurrency 1 it also reads the server's own engine-side TTFT (its /metrics
histogram) to give the HTTP overhead. `--soak N` then sends N requests with ~10% malformed and ~10%
cut off mid-stream and checks that every well-formed one was answered, the server still answers,
and its RSS after the soak against after warm-up (psutil).
"""
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import numpy as np

from .timing import stats


def workload(n: int, seed: int, words: int = 120) -> list[dict]:
    """n chat bodies: text prompts of 4..words words, max_tokens spread 8..128, greedy, ignore nothing."""
    rng = random.Random(seed)
    vocab = "image shape colour red green blue circle square triangle left right count describe the a of".split()
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(vocab) for _ in range(rng.randint(4, words)))}],
             "max_tokens": rng.randint(8, 128), "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}} for _ in range(n)]


async def one(client: httpx.AsyncClient, url: str, body: dict, cut_after: int | None = None) -> dict:
    """Stream one request -> its timings and `finish` (the finish_reason: the answer came whole) and `chars`
    (of text: 0 for an answer whose first token ended it), or its error."""
    start = time.perf_counter()
    stamps, tokens, status, finish, chars = [], 0, None, None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "error": r.text[:200]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                elif obj.get("choices") and obj["choices"][0].get("finish_reason"):
                    finish = obj["choices"][0]["finish_reason"]
                elif obj.get("choices") and "content" in obj["choices"][0]["delta"] and \
                        "role" not in obj["choices"][0]["delta"]:  # one chunk per token ("" for no text)
                    stamps.append(time.perf_counter())
                    chars += len(obj["choices"][0]["delta"]["content"])
                    if cut_after is not None and len(stamps) >= cut_after:
                        return {"status": status, "cut": True}
    except httpx.HTTPError as e:
        return {"status": status, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    out = {"status": status, "tokens": tokens, "finish": finish, "chars": chars, "e2e_s": end - start}
    if stamps:
        out["ttft_s"] = stamps[0] - start
        out["itl_s"] = list(np.diff(stamps))
        if tokens > 1:
            out["tpot_s"] = (end - stamps[0]) / (tokens - 1)
    return out


async def closed_loop(url: str, bodies: list, concurrency: int) -> dict:
    todo = list(bodies)
    results = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while todo:
                results.append(await one(client, url, todo.pop(0)))
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    ok = [r for r in results if r.get("status") == 200 and "e2e_s" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(bodies), "ok": len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_s": stats(r["ttft_s"] for r in ok if "ttft_s" in r),
            "tpot_s": stats(r["tpot_s"] for r in ok if "tpot_s" in r),
            "itl_s": stats(x for r in ok for x in r.get("itl_s", [])),
            "e2e_s": stats(r["e2e_s"] for r in ok),
            "errors": [r for r in results if r not in ok][:5]}


def engine_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's engine-side TTFT histogram."""
    text = httpx.get(f"{url}/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith("cogvlm2_time_to_first_token_seconds_")}
    return value.get("cogvlm2_time_to_first_token_seconds_sum", 0.0), value.get(
        "cogvlm2_time_to_first_token_seconds_count", 0.0)


async def soak(url: str, n: int, seed: int) -> dict:
    """n requests, ~10% malformed and ~10% cut mid-stream, 8 at a time."""
    rng = random.Random(seed)
    bodies = workload(n, seed + 1, words=40)
    kinds = [rng.choices(["ok", "bad", "cut"], [8, 1, 1])[0] for _ in range(n)]
    bad = [b"{broken", json.dumps({"messages": "nope"}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode()]
    outcome = {"ok": 0, "answered": 0, "empty": 0, "malformed_refused": 0, "cut": 0, "failed": []}
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=600) as client:
        async def go(i):
            async with sem:
                if kinds[i] == "bad":
                    r = await client.post(f"{url}/v1/chat/completions", content=rng.choice(bad),
                                          headers={"content-type": "application/json"})
                    outcome["malformed_refused"] += r.status_code == 400
                elif kinds[i] == "cut":
                    await one(client, url, bodies[i], cut_after=2)
                    outcome["cut"] += 1
                else:
                    outcome["ok"] += 1
                    r = await one(client, url, bodies[i])
                    if r.get("status") == 200 and r.get("finish"):  # complete, empty or not
                        outcome["answered"] += 1
                        outcome["empty"] += r["chars"] == 0
                    else:
                        outcome["failed"].append(r)
        await asyncio.gather(*(go(i) for i in range(n)))
    outcome["malformed"] = kinds.count("bad")
    return outcome


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    c = [r["concurrency"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [r["output_tokens_per_s"] for r in runs], "o-")
    a.set(xlabel="concurrent clients", ylabel="output tokens/s", title="throughput", xscale="log", xticks=c)
    a.set_xticklabels(c)
    for key, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
        b.plot(c, [r["ttft_s"].get(key, np.nan) * 1e3 for r in runs], style, label=f"TTFT {key}")
        b.plot(c, [r["tpot_s"].get(key, np.nan) * 1e3 for r in runs], style, label=f"TPOT {key}", alpha=0.6)
    b.set(xlabel="concurrent clients", ylabel="ms", title="latency", xscale="log", xticks=c)
    b.set_xticklabels(c)
    b.legend(fontsize=7)
    fig.suptitle(f"bench-serve {report['bundle']} (B = {report['batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def client_counts(text: str | None) -> list[int] | None:
    """--concurrency "1,4,8" -> [1, 4, 8] (sorted, distinct); click.BadParameter for anything but counts >= 1."""
    if text is None:
        return None
    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of client counts, e.g. 1,4,8.") from None
    if counts[0] < 1:
        raise click.BadParameter("client counts must be at least 1.")
    return counts


@click.command("bench-serve")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--requests", "n", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests per concurrency level.")
@click.option("--concurrency", default=None, callback=lambda ctx, param, value: client_counts(value),
              help="Comma-separated client counts [default: 1,B,2B,4B].")
@click.option("--soak", "soak_n", type=click.IntRange(min=0), default=0, show_default=True,
              help="Then this many requests with ~10% malformed and ~10% cut mid-stream.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None)
def bench_serve(bundle, n, concurrency, soak_n, backend, seed, json_out, plot_out):
    """Start `serve` on BUNDLE and measure it as clients see it (see the module docstring)."""
    import psutil

    from cogvlm2_lite.runtime.bundle import Bundle
    from cogvlm2_lite.runtime.errors import UserError

    from .run import check_plot_path, save_output
    check_plot_path(plot_out)
    batch = Bundle(bundle).batch
    levels = concurrency or sorted({1, batch, 2 * batch, 4 * batch})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-c", "import sys; from cogvlm2_lite.runtime.cli import main; sys.exit(main())"]
    proc = subprocess.Popen(cli + ["serve", bundle, "--port", str(port), "--backend", backend,
                                   "--max-queue", str(4 * max(levels) + 16)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise UserError(f"the server did not start: {(proc.stderr.read().strip().splitlines() or ['?'])[-1]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise UserError("the server did not become healthy within 300 s.")
            time.sleep(0.2)
        server = psutil.Process(proc.pid)
        bodies = workload(n, seed)
        asyncio.run(closed_loop(url, bodies[:max(2, batch)], batch))  # warm-up: every graph's first call
        rss_warm = server.memory_info().rss
        report = {"bundle": str(Path(bundle).resolve()), "batch": batch, "backend": backend, "runs": []}
        for c in levels:
            before = engine_ttft(url)
            run = asyncio.run(closed_loop(url, bodies, c))
            if c == 1:
                after = engine_ttft(url)
                eng = (after[0] - before[0]) / max(after[1] - before[1], 1)
                run["engine_ttft_mean_s"] = eng
                run["http_overhead_ttft_ratio"] = run["ttft_s"]["mean"] / eng if eng > 0 else None
            report["runs"].append(run)
            click.echo(f"concurrency {c:3d}: {run['requests_per_s']:.2f} req/s, {run['output_tokens_per_s']:.1f} "
                       f"tok/s; TTFT p50 {run['ttft_s'].get('median', 0) * 1e3:.0f} ms p99 "
                       f"{run['ttft_s'].get('p99', 0) * 1e3:.0f} ms; TPOT p50 {run['tpot_s'].get('median', 0) * 1e3:.1f} "
                       f"ms; ITL p99 {run['itl_s'].get('p99', 0) * 1e3:.1f} ms"
                       + (f"; HTTP overhead x{run['http_overhead_ttft_ratio']:.3f}" if c == 1 and
                          run.get("http_overhead_ttft_ratio") else ""), err=True)
        if soak_n:
            s = asyncio.run(soak(url, soak_n, seed))
            s["still_answers"] = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}).status_code == 200
            s["rss_after_warmup_bytes"] = rss_warm
            s["rss_after_soak_bytes"] = server.memory_info().rss
            report["soak"] = s
            click.echo(f"soak {soak_n}: {s['answered']}/{s['ok']} well-formed answered ({s['empty']} of them empty), "
                       f"{s['malformed_refused']}/"
                       f"{s['malformed']} malformed refused with 400, {s['cut']} cut; still answers: "
                       f"{s['still_answers']}; RSS {rss_warm / 2**20:.0f} -> {s['rss_after_soak_bytes'] / 2**20:.0f} MiB",
                       err=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    save_output(json_out, lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    save_output(plot_out, lambda p: plot(report, Path(p)))
