"""Calibration / evaluation sets: JSONL of {"image", "prompt"} lines (the batch format), or the demo
task's deterministic splits (training split for calibration, held-out split for the report)."""
import json
import sys
from pathlib import Path


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


def jsonl_samples(path, n: int | None = None, log=None) -> list[tuple]:
    """Lines {"image": path (relative to the JSONL's folder) or null, "prompt": text} -> [(PIL image or
    None, prompt)]. A line that cannot be used (not UTF-8, not JSON, no prompt, an unreadable image) is
    skipped with one sentence to `log` (default: stderr); UserError when no line is usable."""
    from cogvlm2_lite.runtime.errors import UserError
    from cogvlm2_lite.runtime.preprocess import load_image
    path = Path(path)
    log = log or (lambda text: print(text, file=sys.stderr))
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"calibration file {path} cannot be read ({e.strerror}); check the path.") from None
    out = []
    for lineno, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            prompt = rec.get("prompt", rec.get("query")) if isinstance(rec, dict) else None
            if not isinstance(prompt, str):
                raise UserError("it has no \"prompt\" string")
            img = rec.get("image")
            image = None
            if img:
                p = Path(img)
                image = load_image(p if p.is_absolute() else path.parent / p)
        except UnicodeDecodeError:
            log(f"{path} line {lineno} is not UTF-8 text: skipped (save the file as UTF-8).")
            continue
        except json.JSONDecodeError as e:
            log(f"{path} line {lineno} is not valid JSON ({e.msg}): skipped.")
            continue
        except UserError as e:
            log(f"{path} line {lineno} cannot be used ({str(e).rstrip('.')}): skipped.")
            continue
        out.append((image, prompt))
        if n is not None and len(out) >= n:
            break
    if not out:
        raise UserError(f"{path} has no usable {{\"image\", \"prompt\"}} line.")
    return out
