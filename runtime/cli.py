"""`cogvlm2-lite`: the command line. Runtime commands live here; commands of other parts
(export, demo) are found through the `cogvlm2_lite.commands` entry-point group, so the runtime
never imports the exporter. Every UserError becomes one line on stderr and exit code 1.
"""
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import click

from .errors import UserError

OUTPUT_ENV = "COGVLM2_LITE_RANK0_OUTPUT"  # file rank 0 writes user output to under msrun


class Main(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | {ep.name for ep in entry_points(group="cogvlm2_lite.commands")})

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None:
            ep = next((e for e in entry_points(group="cogvlm2_lite.commands") if e.name == name), None)
            try:
                cmd = ep.load() if ep else None
            except ImportError:  # that part is not installed here (e.g. a runtime-only deployment)
                cmd = None
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=Main)
@click.version_option(package_name="cogvlm2-lite")
def main():
    """CogVLM2-Image, ahead-of-time compiled: export a checkpoint into a bundle, then run it."""


def sampling_options(f):
    """The sampling flags shared by run, chat and batch."""
    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off."),
        click.option("--seed", type=int, default=None, help="Reproducible sampling."),
        click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens (benchmarks)."),
        click.option("--template", type=click.Choice(["chat", "vqa", "base"]), default=None,
                     help="Prompt template (default: the bundle's)."),
        click.option("--backend", default="auto", show_default=True,
                     help="auto (onnxruntime if the bundle has ONNX graphs, else mindspore, else lite), "
                          "mindspore, onnxruntime, lite."),
        click.option("--verify", is_flag=True, help="Hash every bundle file (weights too) before loading."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_params(o: dict):
    from .sampling import SamplingParams
    return SamplingParams(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                          repetition_penalty=o["repetition_penalty"], seed=o["seed"],
                          max_new_tokens=o["max_new_tokens"], ignore_eos=o["ignore_eos"])


def open_engine(bundle_path: str, o: dict):
    from .engine import Engine
    return Engine(bundle_path, backend=o["backend"], verify=o["verify"])


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Image file (omit for text only).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, token counts and timings.")
@sampling_options
def run(bundle, image, prompt, stream, as_json, **o):
    """Answer one prompt about one image."""
    params = sampling_params(o)
    if relaunch_under_msrun(bundle):
        return
    from .engine import Request
    engine = open_engine(bundle, o)
    say = rank0_printer(engine.rank)
    request = Request(prompt, image=image, template=o["template"], params=params)
    on_text = (lambda row, piece: say(piece, nl=False)) if stream and not as_json else None
    r = engine.generate([request], on_text=on_text)[0]
    if as_json:
        say(json.dumps(r.to_json(), ensure_ascii=False))
    else:
        say("" if stream else r.text)
        say(f"[{r.finish_reason}; {r.prompt_tokens} prompt + {r.completion_tokens} new tokens; "
            f"TTFT {r.ttft_s * 1000:.0f} ms; {r.tokens_per_s:.1f} tokens/s]", err=True)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="The image the conversation is about.")
@sampling_options
def chat(bundle, image, **o):
    """Multi-turn conversation on stdin: one question per line; /reset starts over, /quit ends.

    The bundle, the image and the flags are checked before the first question (exit 1 on a bad one).
    After that a turn that cannot run (an undecodable line, a question longer than the cache) is
    reported in one line and the session goes on; when the conversation outgrows the cache, its
    oldest turns are dropped, saying so.
    """
    from .bundle import Bundle
    params = sampling_params(o)
    if Bundle(bundle).tp > 1:
        raise UserError("chat reads the terminal, which msrun's ranks cannot share: use `run` (or the Python "
                        "API under msrun) with tensor-parallel bundles.")
    from .engine import Request
    engine = open_engine(bundle, o)
    pixels = engine.pixels([image])[0] if image is not None else None
    say = rank0_printer(engine.rank)
    history = []
    say("Ask about the image (/reset to start over, /quit to end)." if image else "Chat (/reset, /quit).")
    for lineno, raw in enumerate(sys.stdin.buffer, 1):
        try:
            q = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            say(f"error: input line {lineno} is not UTF-8 text (byte {e.start + 1} is {raw[e.start]:#04x}); "
                "type it again, or convert the input to UTF-8.", err=True)
            continue
        if q in ("/quit", "/exit"):
            break
        if q == "/reset":
            history.clear()
            continue
        if not q:
            continue
        while history and len(engine.tokenizer.build_inputs(q, tuple(history), o["template"] or engine.template,
                                                            engine.n_image if image else 0)[0]) >= engine.cache.max_len:
            history.pop(0)
            say("[the conversation no longer fits the cache: dropped its oldest turn]", err=True)
        request = Request(q, image=pixels, history=tuple(history), template=o["template"], params=params)
        try:
            r = engine.generate([request], on_text=lambda row, piece: say(piece, nl=False))[0]
        except UserError as e:
            say(f"error: {e}", err=True)
            continue
        say("")
        if r.finish_reason == "context":
            say("[the answer filled the cache: older turns will be dropped to make room]", err=True)
        history.append((q, r.text.strip()))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--backend", default="auto", show_default=True, help="auto, mindspore, onnxruntime, lite.")
@click.option("--api-key", default=None, envvar="COGVLM2_LITE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (or set COGVLM2_LITE_API_KEY).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a row; more get 429.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Largest request body (a base64 image included); more gets 413.")
@click.option("--allowed-image-dir", type=click.Path(file_okay=False), default=None,
              help="Allow image_url to name local files inside this folder (default: data URLs only).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds running requests get to finish after SIGTERM/SIGINT.")
def serve(bundle, host, port, backend, api_key, max_queue, max_body_mb, allowed_image_dir, shutdown_timeout):
    """OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming too), GET /v1/models, /health, /metrics."""
    from .server import serve as run_server
    run_server(bundle, host, port, backend, api_key, max_queue, max_body_mb, allowed_image_dir, shutdown_timeout,
               on_ready=lambda line: click.echo(line, err=line.startswith("error")))


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Hash every file, weights included.")
def inspect(bundle, verify):
    """Validate a bundle and summarise its manifest."""
    from .bundle import Bundle
    b = Bundle(bundle, verify=verify)
    m = b.manifest
    cfg = m["model"]
    click.echo(f"{bundle}: format {m['format_version']}, dtype {m['dtype']}, tp {m['tp']}, batch {m['batch']}, "
               f"formats {','.join(m['formats'])}")
    click.echo(f"model: {cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, vocab {cfg['vocab_size']}, "
               f"vision {cfg['vision_config']['num_hidden_layers']} x {cfg['vision_config']['hidden_size']} "
               f"@ {cfg['vision_config']['image_size']} px")
    click.echo(f"buckets: {json.dumps(m['buckets'])}")
    click.echo(f"weights per rank: {b.weight_bytes(0) / 2**20:.1f} MiB; files ok{' (all hashed)' if verify else ''}")
    q = m.get("quant")
    if q:
        forms = ", ".join(f"{k} x{v['weights']}" for k, v in q["forms"].items())
        extra = "".join(f", {k} {q[k]}" for k in ("group_size", "smooth_alpha") if k in q)
        click.echo(f"quantized: {q['scheme']} ({forms}{extra})")
    if "calibration" in m:
        c = m["calibration"]
        click.echo(f"calibration statistics: {c['file']} ({c.get('samples', '?')} samples)")


def rank0_printer(rank: int):
    """Only rank 0 speaks: every rank computes the same tokens."""
    def say(text, nl=True, err=False):
        if rank == 0:
            click.echo(text, nl=nl, err=err)
            sys.stdout.flush()
    return say


# --- tensor-parallel bundles: launch ourselves under msrun ---------------------------------------
def relaunch_under_msrun(bundle_path) -> bool:
    """A tp > 1 bundle outside msrun: run this same command as tp processes under msrun, relay
    rank 0's output, exit with its status. Returns False when there is nothing to do."""
    from .bundle import Bundle
    tp = Bundle(bundle_path).tp
    if tp == 1:
        return False
    if "MS_WORKER_NUM" in os.environ:  # we are a rank: send user output where the launcher reads it
        out = os.environ.get(OUTPUT_ENV)
        if out:
            rank0 = os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("RANK_ID") == "0"  # not the scheduler
            f = open(out if rank0 else os.devnull, "w", buffering=1)
            sys.stdout = f
            sys.stderr = f
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = Path(tempfile.mkdtemp(prefix="cogvlm2-lite-msrun-"))
    output = logs / "rank0.out"
    output.touch()
    msrun = Path(sys.executable).parent / "msrun"
    cmd = [str(msrun), f"--worker_num={tp}", f"--local_worker_num={tp}", f"--master_port={port}", "--join=True",
           f"--log_dir={logs}", str(Path(__file__).with_name("msrun_main.py")), *sys.argv[1:]]
    from .scheduler import SEED_ENV
    env = {**os.environ, OUTPUT_ENV: str(output), "GLOG_v": "3", SEED_ENV: str(secrets.randbelow(2**31)),
           "PATH": f"{msrun.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    click.echo(f"[tensor parallel: {' '.join(cmd)}]", err=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(output, done))
    relay.start()
    code = proc.wait()
    done.set()
    relay.join()
    if code != 0:
        raise UserError(f"the {tp}-rank run failed (exit {code}); worker logs are in {logs}.")
    return True


def _relay(path: Path, done: threading.Event):
    with open(path) as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            elif done.is_set():
                return
            else:
                time.sleep(0.05)


from .batch import command as _batch_command  # noqa: E402  (after sampling_options, which it uses)

main.add_command(_batch_command(sampling_options))


from .bench import bench as _bench, bench_suite as _bench_suite  # noqa: E402  (benchmarks: runtime/bench.py)

main.add_command(_bench)
main.add_command(_bench_suite)
