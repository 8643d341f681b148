"""The flags and helpers that run, chat, batch and serve share (a leaf module: click and the runtime only)."""
import atexit
import os
import signal
import sys

import click

from .encoder_cache import ENCODER_SHARE, PREFIX_SHARE


def stack(*options):
    """One decorator applying several click options, listed in --help order."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


cache_options = stack(  # the image caches' bounds (runtime/encoder_cache.py), for run, chat, batch and serve
    click.option("--encoder-cache-mb", type=click.FloatRange(min=0), default=None,
                 help=f"MiB of vision-graph outputs kept for images seen again (0: off; default: {ENCODER_SHARE:.0%} of "
                      "the memory free after loading and the KV cache)."),
    click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=None,
                 help=f"MiB of image-prefix K/V (bos + image) kept for new questions about images seen before (0: off; "
                      f"default: {PREFIX_SHARE:.0%} of the memory free after loading and the KV cache)."),
)


sampling_options = stack(  # the sampling flags shared by run, chat and batch (and the engine's)
    click.option("--max-new-tokens", type=int, default=256, show_default=True),
    click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off."),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off."),
    click.option("--seed", type=int, default=None, help="Reproducible sampling."),
    click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens (benchmarks)."),
    click.option("--stop", multiple=True, help="A stop string: the answer ends before it (repeat for several)."),
    click.option("--template", type=click.Choice(["chat", "vqa", "base"]), default=None,
                 help="Prompt template (default: the bundle's)."),
    click.option("--backend", default="auto", show_default=True,
                 help="auto (onnxruntime if the bundle has ONNX graphs, else mindspore, else lite), "
                      "mindspore, onnxruntime, lite."),
    click.option("--verify", is_flag=True, help="Hash every bundle file (weights too) before loading."),
    cache_options,
)


def sampling_params(o: dict):
    from .sampling import SamplingParams
    return SamplingParams(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                          repetition_penalty=o["repetition_penalty"], seed=o["seed"],
                          max_new_tokens=o["max_new_tokens"], ignore_eos=o["ignore_eos"], stop=o["stop"])


def open_engine(bundle_path: str, o: dict):
    """The command's Engine, and how the command then stops on Ctrl-C.

    While it loads, Ctrl-C ends the process at once (exit 130): a KeyboardInterrupt raised inside
    MindSpore's imports (or SciPy's, which it imports) leaves them half-initialised, and the interpreter
    then aborts at exit with a page of traceback. Once loaded, SIGINT and SIGTERM both raise
    KeyboardInterrupt (batch saves its place; the CLI says 'interrupted.', exit 130): MindSpore
    installs a SIGINT handler of its own at each graph run that sends the process SIGTERM, which would
    otherwise kill it without a word."""
    from .engine import Engine

    def exit_now(*_):
        sys.stdout.flush()
        os.write(2, b"\ninterrupted.\n")
        os._exit(130)
    previous = signal.signal(signal.SIGINT, exit_now)
    try:
        engine = Engine(bundle_path, backend=o["backend"], verify=o["verify"], encoder_cache_mb=o["encoder_cache_mb"],
                        prefix_cache_mb=o["prefix_cache_mb"])
    finally:
        signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    follow_if_not_rank0(engine)
    return engine


def follow_if_not_rank0(engine):
    """Under msrun: a rank other than 0 only executes rank 0's plans, then exits; rank 0 tells them to stop when
    its process ends, however it ends."""
    if engine.channel is None:
        return
    if engine.rank != 0:
        engine.follow()
        sys.exit(0)
    atexit.register(engine.close)


def rank0_printer(rank: int):
    """Only rank 0 speaks (the other ranks only follow its plans)."""
    def say(text, nl=True, err=False):
        if rank == 0:
            click.echo(text, nl=nl, err=err)
            sys.stdout.flush()
    return say
