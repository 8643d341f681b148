"""The embedded default model: where it lives, and its bundle, exported once into a cache folder.

The committed model (`assets/model/`: config.json, generation_config.json, model.safetensors,
tokenizer.model) is an ordinary HF checkpoint; the demo exports it with the regular exporter into
`$COGVLM2_LITE_CACHE/demo-bundle-<hash>` (default cache: `~/.cache/cogvlm2-lite`). The hash covers
the model files, the bucket plan, the bundle format version and the MindSpore version, so a new
model or a new format gets a new bundle, and an existing one is reused as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
SAMPLE_IMAGE = ASSETS / "sample.png"
SAMPLE_INDEX = 22  # held-out sample 22: "a green triangle, a purple square and a red circle"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model")
CACHE_ENV = "COGVLM2_LITE_CACHE"
# prompts of the task are <= 31 tokens with the image; 128 = the model's context
BUCKETS = {"chunk": [16, 64], "decode": [64, 128]}


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cogvlm2-lite"


def bundle_key(model_dir: Path = MODEL_DIR) -> str:
    from importlib.metadata import version
    from cogvlm2_lite.runtime.bundle import FORMAT_VERSION
    from cogvlm2_lite.runtime.errors import UserError
    h = hashlib.sha256()
    for name in MODEL_FILES:
        f = Path(model_dir) / name
        if not f.is_file():
            raise UserError(f"the embedded model is incomplete: {f} is missing; reinstall cogvlm2-lite.")
        h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    h.update(json.dumps({"buckets": BUCKETS, "format": FORMAT_VERSION, "mindspore": version("mindspore")},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def bundle_path(model_dir: Path = MODEL_DIR) -> Path:
    return cache_root() / f"demo-bundle-{bundle_key(model_dir)}"


def ensure_bundle(model_dir: Path = MODEL_DIR, log=None) -> Path:
    """The embedded model's bundle: exported on first use, reused after (re-exported if damaged). With `log`,
    the export says so and shows its phases on stderr."""
    from cogvlm2_lite.runtime.bundle import Bundle
    from cogvlm2_lite.runtime.errors import UserError
    out = bundle_path(model_dir)
    if out.is_dir():
        try:
            Bundle(out)
            return out
        except UserError:
            pass  # damaged or half-deleted: export it again below
    from cogvlm2_lite.export.bundle import export_bundle
    if log:
        log(f"exporting the embedded model into {out} (first run only) ...")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {out.parent} ({e.strerror}); set {CACHE_ENV} "
                        "to a writable folder.") from None
    try:
        export_bundle(out, hf_dir=Path(model_dir), buckets=BUCKETS, force=out.exists(), progress=log is not None)
    except UserError:
        if out.is_dir():  # another process finished the same export first
            Bundle(out)
            return out
        raise
    return out


def write_sample_image(path: Path = SAMPLE_IMAGE) -> Path:
    """(Re)create the embedded sample: held-out sample SAMPLE_INDEX at the model's 56 px, as PNG."""
    from . import task
    task.generate(task.HELDOUT_SEED, SAMPLE_INDEX + 1, 56)[SAMPLE_INDEX].image.save(path, format="PNG")
    return path
