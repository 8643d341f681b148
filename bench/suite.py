"""`cogvlm2-lite bench-suite`: export the tiny and bench presets once (cached under bundles/, re-exported
when the model or exporter code changes) and benchmark both into out/bench/ (JSON + PNG), comparing
with the previous run when there is one."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import click

from cogvlm2_lite.runtime.bundle import FORMAT_VERSION, Bundle
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.progress import Progress

from .report import format_report
from .run import check_counts, options, run_bench, write_outputs

SUITE_PRESETS = {
    "tiny": None,  # the export defaults
    "bench": "chunk=16,64,256;decode=256,1024,2048",
}


def source_hash() -> str:
    """Hash of the model and exporter code: a cached bundle is reused only while they are unchanged."""
    from importlib.util import find_spec
    h = hashlib.sha256()
    for pkg in ("cogvlm2_lite.graphs", "cogvlm2_lite.export"):
        spec = find_spec(pkg)
        for d in (spec.submodule_search_locations or []) if spec else []:
            for f in sorted(Path(d).glob("*.py")):
                h.update(f.name.encode() + f.read_bytes())
    h.update(str(FORMAT_VERSION).encode())
    return h.hexdigest()[:16]


def cogvlm2_cli() -> list[str]:
    """The command line that runs `cogvlm2-lite` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-c", "import sys; from cogvlm2_lite.runtime.cli import main; sys.exit(main())"]


def demo_tokenizer() -> Path:
    """The demo's small tiktoken file, the random-weight presets' tokenizer. Raises UserError when the
    demo package is not installed."""
    from importlib.util import find_spec
    spec = find_spec("cogvlm2_lite.demo")
    found = [Path(d) / "assets" / "tokenizer.model" for d in (spec.submodule_search_locations or [])] if spec else []
    tokenizer = next((f for f in found if f.is_file()), None)
    if tokenizer is None:
        raise UserError("no demo tokenizer here (cogvlm2_lite.demo is not installed): pass --tokenizer PATH.")
    return tokenizer


def cached_export(out: Path, key: dict, export_args: list[str], log) -> Path:
    """`cogvlm2-lite export ... out --force` unless `out` holds a valid bundle made under the same `key`
    (any JSON: what the bundle depends on). The export's progress lines (one per phase: its stderr is a pipe)
    go to `log` as they come. Raises UserError when the export fails, with its error."""
    stamp = out / ".bench-key"
    key = json.dumps({**key, "src": source_hash()}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == key:
        try:
            Bundle(out)
            return out
        except UserError:
            pass
    log(f"exporting {out} ...")
    last = "?"
    with subprocess.Popen(cogvlm2_cli() + ["export", *export_args, str(out), "--force"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as p:
        for line in p.stderr:
            if line.strip():
                last = line.strip()
                if not last.startswith("error: "):   # the error is said once, below
                    log(f"  {last}")
    if p.returncode != 0:
        raise UserError(f"exporting {out} failed: {last.removeprefix('error: ')}")
    stamp.write_text(key)
    return out


def ensure_bundle(preset: str, folder: Path, tokenizer: Path, log) -> Path:
    """The `preset` with random weights (MindIR and ONNX) in folder/<preset>, exported unless up to date."""
    args = ["--random-init", preset, "--tokenizer", str(tokenizer), "--format", "mindir,onnx"]
    if SUITE_PRESETS[preset]:
        args += ["--buckets", SUITE_PRESETS[preset]]
    return cached_export(folder / preset, {"preset": preset, "args": args[2:]}, args, log)


@click.command("bench-suite")
@click.option("--presets", default="tiny,bench", show_default=True, help="Presets to export and benchmark.")
@click.option("--bundles", "bundles_dir", type=click.Path(file_okay=False), default="bundles", show_default=True,
              help="Where exported bundles are cached.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/bench", show_default=True,
              help="Where <preset>.json and <preset>.png go (the previous run is kept as <preset>.prev.json).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True), default=None,
              help="tiktoken file for the exports (default: the demo's small tokenizer).")
@options
def bench_suite(presets, bundles_dir, out_dir, tokenizer, **o):
    """Export the tiny and bench presets once (cached) and benchmark both: JSON + PNG in out/bench."""
    check_counts(o)
    progress = Progress()   # each preset's export and benchmark is a phase on stderr (runtime/progress.py)
    log = progress.note
    tokenizer = tokenizer or demo_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        if preset not in SUITE_PRESETS:
            raise UserError(f"preset {preset!r} is not one of {', '.join(SUITE_PRESETS)}.")
        with progress.phase(f"{preset}: export"):
            path = ensure_bundle(preset, Path(bundles_dir), Path(tokenizer), log)
        settings = dict(o)
        if preset == "tiny":  # the tiny model measures the runtime's fixed costs: fewer reps suffice
            settings["reps"] = min(o["reps"], 5)
        log(f"benchmarking {path}...")
        with progress.phase(f"{preset}: benchmark"):
            report = run_bench(path, log=log, **settings)
        click.echo(f"\n===== {preset} =====")
        click.echo(format_report(report))
        js, png = out / f"{preset}.json", out / f"{preset}.png"
        old = None
        if js.is_file():
            old = (str(out / f"{preset}.prev.json"), json.loads(js.read_text()))
            js.rename(old[0])
        write_outputs(report, js, png, old)
