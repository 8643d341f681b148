"""`cogvlm2-lite export`: HF checkpoint (or --random-init) -> bundle."""
from pathlib import Path

import click

from cogvlm2_lite.graphs.config import ConfigError, CogVLM2Config, preset
from cogvlm2_lite.graphs.quant import SCHEMES as QUANT_SCHEMES
from cogvlm2_lite.runtime.errors import UserError

from .bundle import export_bundle


def parse_buckets(text: str | None) -> dict:
    """'chunk=16,64;decode=512,4096' -> {'chunk': [16, 64], 'decode': [512, 4096]}"""
    if not text:
        return {}
    out = {}
    try:
        for part in text.split(";"):
            kind, sizes = part.split("=")
            kind = kind.strip()
            if kind in ("text", "image"):
                raise UserError(f"--buckets {kind}=...: whole-prompt buckets were replaced by prefill chunks; "
                                "give 'chunk=16,64,256;decode=512,4096'.")
            if kind not in ("chunk", "decode"):
                raise ValueError
            out[kind] = sorted({int(s) for s in sizes.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--buckets {text!r} is not of the form 'chunk=16,64,256;decode=512,4096'.") from None
    return out


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="[HF_DIR] BUNDLE")
@click.option("--random-init", default=None, metavar="PRESET|CONFIG_JSON",
              help="No checkpoint: random weights for a preset (full, bench, tiny) or a config.json.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True), default=None,
              help="tiktoken tokenizer.model (default: HF_DIR/tokenizer.model).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel ranks (1, 2, 4, 8).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size B the graphs are traced for.")
@click.option("--buckets", default=None, help="Prefill chunk sizes and decode cache lengths, e.g. 'chunk=16,64,256;decode=512,2048,4096'.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init weights.")
@click.option("--format", "formats", default="mindir", show_default=True,
              help="Graph formats, comma-separated: mindir (MindSpore, tensor parallel), onnx (onnxruntime, tp 1), "
                   "lite (MindSpore Lite, converted from ONNX; tp 1).")
@click.option("--quant", type=click.Choice(list(QUANT_SCHEMES)), default=None,
              help="w8a16: int8 weights per output channel; w8a8: SmoothQuant int8 weights and activations (needs "
                   "--calib-stats); w4a16: 4-bit weights in groups of 32; w4a8: those, with int8 activations per group.")
@click.option("--calib-stats", type=click.Path(dir_okay=False, exists=True), default=None,
              help="calib_stats.safetensors written by `cogvlm2-lite calibrate` on the fp32 bundle.")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True,
              help="w8a8: how much activation range migrates into the weights (0: none, 1: all).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty BUNDLE.")
def export(paths, random_init, tokenizer, tp, dtype, batch, buckets, seed, force, formats, quant, calib_stats,
           smooth_alpha):
    """Trace fixed-shape vision, prefill-chunk and decode graphs and write a bundle."""
    if random_init is None and len(paths) != 2:
        raise UserError("give HF_DIR and BUNDLE (or --random-init PRESET and BUNDLE).")
    if random_init is not None and len(paths) != 1:
        raise UserError("with --random-init give only BUNDLE.")
    cfg = None
    if random_init is not None:
        try:
            cfg = CogVLM2Config.from_file(random_init) if Path(random_init).is_file() else preset(random_init)
        except ConfigError as e:
            raise UserError(str(e)) from None
    hf_dir = Path(paths[0]) if random_init is None else None
    if hf_dir is not None and not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder: give the HF checkpoint folder.")
    out = export_bundle(Path(paths[-1]), hf_dir=hf_dir, random_init=cfg, tokenizer=tokenizer and Path(tokenizer),
                        tp=tp, dtype=dtype, batch=batch, buckets=parse_buckets(buckets), force=force, seed=seed,
                        formats=formats, quant=quant, calib_stats=calib_stats and Path(calib_stats),
                        smooth_alpha=smooth_alpha)
    click.echo(f"wrote {out}")
