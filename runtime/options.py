"""The flags and helpers that run, chat, batch and serve share (a leaf module: click and the runtime only)."""
import sys

import click


def stack(*options):
    """One decorator applying several click options, listed in --help order."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


sampling_options = stack(  # the sampling flags shared by run, chat and batch
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
)


def sampling_params(o: dict):
    from .sampling import SamplingParams
    return SamplingParams(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                          repetition_penalty=o["repetition_penalty"], seed=o["seed"],
                          max_new_tokens=o["max_new_tokens"], ignore_eos=o["ignore_eos"])


def open_engine(bundle_path: str, o: dict):
    from .engine import Engine
    return Engine(bundle_path, backend=o["backend"], verify=o["verify"])


def rank0_printer(rank: int):
    """Only rank 0 speaks: every rank computes the same tokens."""
    def say(text, nl=True, err=False):
        if rank == 0:
            click.echo(text, nl=nl, err=err)
            sys.stdout.flush()
    return say
