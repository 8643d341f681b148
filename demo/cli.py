"""`cogvlm2-lite demo`: the embedded default model, end to end.

On first run the committed checkpoint (`assets/model/`) is exported into a cached bundle (see
`embedded.py`); later runs reuse it. Then the runtime answers a question about the embedded sample
image (or --image), streaming the answer, and reports time to first token and decode speed.
The model knows one synthetic world: 2 x 2 grids of circles, squares, triangles and crosses in
red, green, blue, yellow or purple. Ask it e.g. "Describe the image.", "How many shapes are there?",
"What colour is the circle?", "Where is the red square?", "What shape is in the top left?".
"""
from __future__ import annotations

import click

DEFAULT_PROMPT = "Describe the image."


@click.command()
@click.option("--image", default=None, help="An image file (default: the embedded sample image).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
def demo(image, prompt, max_new_tokens):
    """Run the embedded demo model on a sample image (exports it into a cache on first use)."""
    from cogvlm2_lite.runtime.engine import Engine, Request
    from cogvlm2_lite.runtime.preprocess import load_image
    from cogvlm2_lite.runtime.sampling import SamplingParams
    from .embedded import SAMPLE_IMAGE, ensure_bundle

    path = image if image is not None else SAMPLE_IMAGE
    picture = load_image(path)  # bad input fails here, before any export work
    params = SamplingParams(max_new_tokens=max_new_tokens)  # checks the value: UserError if < 1
    err = lambda m: click.echo(m, err=True)  # noqa: E731
    bundle = ensure_bundle(log=err)
    engine = Engine(bundle)
    click.echo(f"image:  {path}{'  (embedded sample)' if image is None else ''}")
    click.echo(f"prompt: {prompt}")
    click.echo("answer:", nl=False)
    r = engine.generate([Request(prompt, image=picture, params=params)],
                        on_text=lambda row, piece: click.echo(piece, nl=False))[0]
    click.echo("")
    click.echo(f"[{r.completion_tokens} tokens, {r.finish_reason}; TTFT {r.ttft_s * 1000:.1f} ms; "
               f"{r.tokens_per_s:.1f} tokens/s; bundle {bundle}]")
