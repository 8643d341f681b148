"""`cogvlm2-lite`: the command line. Runtime commands live here; commands of other parts
(export, demo) are found through the `cogvlm2_lite.commands` entry-point group, so the runtime
never imports the exporter. Every UserError becomes one line on stderr and exit code 1.
"""
import json
import os
import sys
import time
from importlib.metadata import entry_points

import click

from .batch import batch
from .errors import UserError
from .msrun import cluster_option, relaunch_under_msrun
from .options import cache_options, open_engine, rank0_printer, sampling_options, sampling_params

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
        except KeyboardInterrupt:   # Ctrl-C: what was printed stands; the shell's convention for SIGINT
            sys.stdout.flush()
            click.echo("\ninterrupted.", err=True)
            sys.exit(130)


@click.group(cls=Main)
@click.version_option(package_name="cogvlm2-lite")
def main():
    """CogVLM2-Image, ahead-of-time compiled: export a checkpoint into a bundle, then run it."""


def read_schema(path: str) -> dict:
    """A JSON schema file, checked. Raises UserError."""
    from .structured import grammar
    try:
        schema = json.loads(open(path, "rb").read())
    except OSError as e:
        raise UserError(f"--json-schema {path} cannot be read ({e.strerror}).") from None
    except ValueError as e:
        raise UserError(f"--json-schema {path} is not JSON ({e}).") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema {path} must hold a JSON schema object.")
    grammar(schema)
    return schema


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Image file (omit for text only).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, token counts and timings.")
@click.option("--json-schema", "schema_file", type=click.Path(dir_okay=False), default=None,
              help="Answer JSON matching this JSON schema file (structured output).")
@sampling_options
@cluster_option
def run(bundle, image, prompt, stream, as_json, schema_file, cluster, **o):
    """Answer one prompt about one image."""
    from dataclasses import replace
    params = sampling_params(o)
    if schema_file is not None:
        params = replace(params, json_schema=read_schema(schema_file))
    if relaunch_under_msrun(bundle, cluster):
        return
    from .engine import Request
    t = time.perf_counter()
    engine = open_engine(bundle, o)
    load_s = time.perf_counter() - t
    say = rank0_printer(engine.rank)
    request = Request(prompt, image=image, template=o["template"], params=params)
    on_text = (lambda row, piece: say(piece, nl=False)) if stream and not as_json else None
    r = engine.generate([request], on_text=on_text)[0]
    graph_s = {k: round(v, 4) for k, v in engine.timings.graph_s.items()}   # time inside vision / prefill / decode graphs
    if as_json:
        say(json.dumps({**r.to_json(), "load_s": round(load_s, 3), "graph_s": graph_s}, ensure_ascii=False))
    else:
        say("" if stream else r.text)
        say(f"[{r.finish_reason}; {r.prompt_tokens} prompt + {r.completion_tokens} new tokens; load {load_s:.1f} s; "
            f"TTFT {r.ttft_s * 1000:.0f} ms ({', '.join(f'{k} {v * 1000:.0f} ms' for k, v in graph_s.items() if k != 'decode')}"
            f" in graphs); {r.tokens_per_s:.1f} tokens/s]", err=True)


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
        def fits(turns):
            return len(engine.tokenizer.build_inputs(q, tuple(turns), o["template"] or engine.template,
                                                     engine.n_image if image else 0)[0]) < engine.cache.max_len
        alone = fits(())   # a question that cannot fit even alone is refused below, the conversation kept whole
        while alone and not fits(history):
            history.pop(0)
            say("[the conversation no longer fits the cache: dropped its oldest turn]", err=True)
        request = Request(q, image=pixels, history=tuple(history) if alone else (), template=o["template"],
                          params=params)
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
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free one, printed at start).")
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
@click.option("--no-ui", is_flag=True, help="No chat page at GET / (API-only deployments).")
@cache_options
@cluster_option
def serve(bundle, host, port, backend, api_key, max_queue, max_body_mb, allowed_image_dir, shutdown_timeout, no_ui,
          cluster, **cache_mb):
    """OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming too), GET /v1/models, /health, /metrics,
    and a chat page at GET /. A tensor-parallel bundle is served by rank 0 under msrun, launched here."""
    from .server import check_address, serve as run_server
    if "MS_WORKER_NUM" not in os.environ and (cluster is None or cluster.split(",")[1:2] == ["0"]):
        check_address(host, port)   # before msrun starts: a taken port is one sentence at once
    if relaunch_under_msrun(bundle, cluster):
        return
    run_server(bundle, host, port, backend, api_key, max_queue, max_body_mb, allowed_image_dir, shutdown_timeout,
               ui=not no_ui, on_ready=click.echo, **cache_mb)


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
        forms = ", ".join(f"{k} x{len(v['names'])}" for k, v in q["forms"].items())
        extra = "".join(f", {k} {q[k]}" for k in ("group_size", "smooth_alpha") if k in q)
        click.echo(f"quantized: {q['scheme']} ({forms}{extra})")
    if "calibration" in m:
        c = m["calibration"]
        click.echo(f"calibration statistics: {c['file']} ({c.get('samples', '?')} samples)")


main.add_command(batch)
