"""`cogvlm2-lite calibrate BUNDLE_FP32 [--calib IN.jsonl] [--quant SCHEME --report]`."""
import json
import time

import click

from cogvlm2_lite.graphs.quant import SCHEMES
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.progress import Progress


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False, exists=True))
@click.option("--calib", "calib_jsonl", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Calibration set: JSONL of {\"image\", \"prompt\"} lines (default: the demo task's training split).")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration samples.")
@click.option("--quant", type=click.Choice(list(SCHEMES)), default="w8a16", show_default=True,
              help="The scheme --report measures.")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True, help="w8a8 migration strength (0..1).")
@click.option("--report", is_flag=True, help="Accuracy of --quant against the fp32 bundle on held-out prompts.")
@click.option("--eval", "eval_jsonl", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Held-out set for --report (default: the demo task's held-out split).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=int, default=8, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--no-stats", is_flag=True, help="Skip statistics (report only).")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def calibrate(bundle, calib_jsonl, samples, quant, smooth_alpha, report, eval_jsonl, eval_samples, steps, no_stats,
              as_json):
    """Activation statistics of every linear into BUNDLE/calib_stats.safetensors; --report: accuracy of --quant."""
    from .data import heldout_samples, jsonl_samples, train_samples
    from .eager import EagerModel, load_fp32_bundle
    from cogvlm2_lite.graphs.quant import Quantizer
    from .report import accuracy_report, format_report
    from .stats import STATS_FILE, collect, load_stats, save_stats
    if samples < 1:
        raise UserError("-n must be at least 1.")
    if not 0.0 <= smooth_alpha <= 1.0:
        raise UserError(f"--smooth-alpha must be within 0..1, not {smooth_alpha}.")
    progress = Progress()   # each pass over the prompts is a phase on stderr (runtime/progress.py)
    b, cfg, weights = load_fp32_bundle(bundle)
    model = EagerModel(cfg, b.tokenizer_path, b.manifest["preprocess"])
    size = cfg.vision.image_size
    if not no_stats:
        t = time.perf_counter()
        data = jsonl_samples(calib_jsonl, samples) if calib_jsonl else train_samples(samples, size)
        stats = collect(model, weights, progress.track(data, "statistics", unit="prompt"))
        source = ({"jsonl": str(calib_jsonl)} if calib_jsonl else {"demo_task": "train"})
        f = save_stats(bundle, stats, {"samples": len(data), "source": source, "statistic": "absmax_per_input_channel"})
        click.echo(f"wrote {f} ({len(stats)} linears, {len(data)} samples, {time.perf_counter() - t:.1f} s)")
    if report:
        calibrated = SCHEMES[quant].calibrated
        if calibrated and not (b.path / STATS_FILE).is_file():
            raise UserError(f"--quant {quant} smooths with activation statistics: {bundle} has none; run without "
                            "--no-stats.")
        qz = Quantizer(quant, stats=load_stats(bundle) if calibrated else None, alpha=smooth_alpha)
        data = jsonl_samples(eval_jsonl, eval_samples) if eval_jsonl else heldout_samples(eval_samples, size)
        qmodel = EagerModel(cfg, b.tokenizer_path, b.manifest["preprocess"], quant)
        r = accuracy_report(model, qmodel, weights, data, qz, steps, tuple(b.manifest["tokenizer"]["stop_ids"]),
                            progress)
        click.echo(format_report(r))
        if as_json:
            with open(as_json, "w") as fh:
                json.dump(r, fh, indent=1)
