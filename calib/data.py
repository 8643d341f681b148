"""Calibration / evaluation sets: JSONL of {"image", "prompt"} lines (the batch format), or the demo
task's deterministic splits (training split for calibration, held-out split for the report)."""
import json
from pathlib import Path

from PIL import Image


def demo_samples(seed: int, n: int, image_size: int) -> list[tuple]:
    """-> [(PIL image, prompt)] of demo/task.py generate(seed, n, image_size)."""
    from cogvlm2_lite.demo.task import generate
    return [(s.image, s.question) for s in generate(seed, n, image_size)]


def train_samples(n: int, image_size: int):
    from cogvlm2_lite.demo.task import TRAIN_SEED
    return demo_samples(TRAIN_SEED, n, image_size)


def heldout_samples(n: int, image_size: int):
    from cogvlm2_lite.demo.task import HELDOUT_SEED
    return demo_samples(HELDOUT_SEED, n, image_size)


def jsonl_samples(path, n: int | None = None) -> list[tuple]:
    """Lines {"image": path (relative to the JSONL's folder) or null, "prompt": text}."""
    path = Path(path)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        img = rec.get("image")
        image = None
        if img:
            p = Path(img)
            image = Image.open(p if p.is_absolute() else path.parent / p).convert("RGB")
        out.append((image, rec.get("prompt", rec.get("query", ""))))
        if n is not None and len(out) >= n:
            break
    return out
