"""The embedded default's synthetic visual question-answering task.

Every image is a 2 x 2 grid of cells over a mildly noisy, low-saturation background; one to four
cells hold one shape each (never overlapping, never crossing a cell border, so the location words
"top left" ... "bottom right" are never ambiguous). A shape has a kind (circle, square, triangle,
cross), a colour (red, green, blue, yellow, purple) and a size (small or large); within one image
every (colour, kind) pair is unique, so "Where is the red square?" always names one shape.

Question types (``QTYPES``), with short, canonical answers so exact match is fair:

- shape:    "What shape is in the image?" (one shape) / "What shape is in the top left?" /
            "What shape is the biggest object?" (exactly one large shape) /
            "What shape is the red object?" (colour unique)                     -> "circle"
- colour:   "What colour is the circle?" (kind unique) /
            "What colour is the shape in the bottom right?"                       -> "red"
- count:    "How many shapes are there?"                                          -> "three"
- position: "Where is the red circle?"                                           -> "top left"
- describe: "Describe the image." -> "a red circle, a blue square and a green cross"
            (shapes in reading order: top left, top right, bottom left, bottom right)

Everything is a pure function of ``(seed, index)``: sample ``i`` of ``generate(seed, n, size)`` does
not depend on ``n``, and ``qa_text(seed, n)`` yields the same questions/answers without drawing.
Images are drawn 4x supersampled and box-filtered down, so edges are anti-aliased at any size.
At 56 px a cell is 28 px, a small shape ~16-17.5 px and a large one ~23-24.5 px across.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

TRAIN_SEED = 20240601
HELDOUT_SEED = 917_000_013

QTYPES = ("shape", "colour", "count", "position", "describe")
KINDS = ("circle", "square", "triangle", "cross")
# well separated hues, all clearly saturated against the near-grey backgrounds
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
}
SIZES = ("small", "large")
# cell (row, col) -> location words
POSITIONS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_SHAPES = 4

# shape diameter as a fraction of the cell side
_SIZE_FRAC = {"small": (0.57, 0.63), "large": (0.82, 0.88)}
_MARGIN_FRAC = 0.04  # minimum gap between a shape and its cell border, fraction of the cell side
_SUPERSAMPLE = 4
_COLOUR_JITTER = 12  # per channel, uniform +-
_NOISE_SIGMA = 5.0


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str  # "small" | "large"
    cell: tuple[int, int]  # (row, col) in the 2 x 2 grid
    cx: float  # centre, as a fraction of the image side (0..1)
    cy: float
    diameter: float  # fraction of the image side

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """The generator's own description of one image (shapes in reading order)."""

    shapes: tuple[Shape, ...]
    bg_level: float  # mean grey of the background, 0..255
    bg_tint: tuple[float, float, float]  # small per-channel offset
    bg_gradient: tuple[float, float]  # (angle in radians, amplitude in grey levels)
    fill_jitter: tuple[tuple[int, int, int], ...] = field(default=())  # one per shape

    def describe(self) -> str:
        """Canonical description: "a red circle, a blue square and a green cross"."""
        names = [f"a {s.name}" for s in self.shapes]
        if len(names) == 1:
            return names[0]
        return ", ".join(names[:-1]) + " and " + names[-1]


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: Scene | None = None  # what the image shows, for checks; not part of the model's input


# ---------------------------------------------------------------- scene sampling

def _sample_rngs(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for (scene, question, pixels) of sample ``index``."""
    ss = np.random.SeedSequence([int(seed), int(index)])
    return tuple(np.random.default_rng(s) for s in ss.spawn(3))


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(POSITIONS)
    chosen = sorted(cells[i] for i in rng.choice(len(cells), size=n, replace=False))
    pairs = [(k, c) for k in KINDS for c in COLOURS]
    picked = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    cell_side = 0.5
    shapes = []
    for (kind, colour), cell in zip(picked, chosen):
        size = SIZES[int(rng.integers(0, 2))]
        lo, hi = _SIZE_FRAC[size]
        d = float(rng.uniform(lo, hi)) * cell_side
        slack = max(0.0, (cell_side - d) / 2 - _MARGIN_FRAC * cell_side)
        cx = (cell[1] + 0.5) * cell_side + float(rng.uniform(-slack, slack))
        cy = (cell[0] + 0.5) * cell_side + float(rng.uniform(-slack, slack))
        shapes.append(Shape(kind, colour, size, cell, cx, cy, d))
    bg_level = float(rng.uniform(120.0, 210.0))
    bg_tint = tuple(float(x) for x in rng.uniform(-10.0, 10.0, size=3))
    bg_gradient = (float(rng.uniform(0.0, 2 * np.pi)), float(rng.uniform(0.0, 25.0)))
    jitter = tuple(
        tuple(int(v) for v in rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3))
        for _ in shapes
    )
    return Scene(tuple(shapes), bg_level, bg_tint, bg_gradient, jitter)  # type: ignore[arg-type]


# ---------------------------------------------------------------- questions

def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) of type ``qtype`` about ``scene``."""
    shapes = scene.shapes
    if qtype == "shape":
        if len(shapes) == 1:
            return "What shape is in the image?", shapes[0].kind
        options: list[tuple[str, str]] = []
        large = [s for s in shapes if s.size == "large"]
        if len(large) == 1:
            options.append(("What shape is the biggest object?", large[0].kind))
        colours = [s.colour for s in shapes]
        for s in shapes:
            if colours.count(s.colour) == 1:
                options.append((f"What shape is the {s.colour} object?", s.kind))
            options.append((f"What shape is in the {s.position}?", s.kind))
        return options[int(rng.integers(0, len(options)))]
    if qtype == "colour":
        s = shapes[int(rng.integers(0, len(shapes)))]
        kinds = [t.kind for t in shapes]
        if kinds.count(s.kind) == 1 and rng.random() < 0.6:
            return f"What colour is the {s.kind}?", s.colour
        if len(shapes) == 1:
            return "What colour is the shape?", s.colour
        return f"What colour is the shape in the {s.position}?", s.colour
    if qtype == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    if qtype == "position":
        s = shapes[int(rng.integers(0, len(shapes)))]
        return f"Where is the {s.name}?", s.position
    if qtype == "describe":
        return "Describe the image.", scene.describe()
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


# ---------------------------------------------------------------- drawing

def _polygon(kind: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    r = d / 2
    if kind == "triangle":  # equilateral, pointing up, inside the d x d box
        h = d * np.sqrt(3) / 2
        top = cy - h / 2
        return [(cx, top), (cx + r, top + h), (cx - r, top + h)]
    if kind == "cross":  # plus sign, arm thickness 0.36 d
        t = 0.18 * d
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    return None


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` x ``image_size``."""
    if image_size < 28:
        raise ValueError("image_size must be at least 28 px")
    size = int(image_size)
    # background: grey level + slight tint + linear gradient, at final resolution
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    angle, amp = scene.bg_gradient
    grad = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * amp
    bg = scene.bg_level + grad[..., None] + np.asarray(scene.bg_tint, np.float32)
    # shapes: drawn on a supersampled RGBA layer, box-filtered down (anti-aliased edges)
    big = size * _SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for i, s in enumerate(scene.shapes):
        jit = scene.fill_jitter[i] if i < len(scene.fill_jitter) else (0, 0, 0)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[s.colour], jit)) + (255,)
        cx, cy, d = s.cx * big, s.cy * big, s.diameter * big
        poly = _polygon(s.kind, cx, cy, d)
        if s.kind == "circle":
            draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
        elif s.kind == "square":  # side 0.86 d: about the visual weight of the circle
            h = 0.43 * d
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    small = np.asarray(layer.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    alpha = small[..., 3:4] / 255.0
    # Pillow resizes RGBA premultiplied and returns straight alpha: plain "over" compositing
    out = bg * (1.0 - alpha) + small[..., :3] * alpha
    out = out + rng.normal(0.0, _NOISE_SIGMA, size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- datasets

def _qtype_for(index: int, qtypes: Sequence[str]) -> str:
    return qtypes[index % len(qtypes)]


def _scene_and_qa(seed: int, index: int, qtypes: Sequence[str]):
    scene_rng, qa_rng, pix_rng = _sample_rngs(seed, index)
    scene = sample_scene(scene_rng)
    qtype = _qtype_for(index, qtypes)
    q, a = ask(scene, qtype, qa_rng)
    return scene, qtype, q, a, pix_rng


def iter_samples(seed: int, image_size: int, qtypes: Sequence[str] = QTYPES,
                 start: int = 0) -> Iterator[Sample]:
    """Endless stream of samples ``start, start+1, ...`` (question types cycle through ``qtypes``)."""
    for q in qtypes:
        if q not in QTYPES:
            raise ValueError(f"unknown question type {q!r}; expected one of {QTYPES}")
    i = start
    while True:
        scene, qtype, q, a, pix_rng = _scene_and_qa(seed, i, qtypes)
        yield Sample(render(scene, image_size, pix_rng), q, a, qtype, scene)
        i += 1


def generate(seed: int, n: int, image_size: int, qtypes: Sequence[str] = QTYPES) -> list[Sample]:
    """``n`` samples, one image each; sample i has question type ``qtypes[i % len(qtypes)]``."""
    it = iter_samples(seed, image_size, qtypes)
    return [next(it) for _ in range(n)]


def qa_text(seed: int, n: int, qtypes: Sequence[str] = QTYPES) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) of the first ``n`` samples of ``generate(seed, ...)``, no drawing."""
    out = []
    for i in range(n):
        _, qtype, q, a, _ = _scene_and_qa(seed, i, qtypes)
        out.append((q, a, qtype))
    return out


def to_jsonl(samples: Sequence[Sample], folder: str | os.PathLike,
             name: str = "samples.jsonl") -> str:
    """Write ``folder/images/<id>.png`` and ``folder/<name>``; returns the JSONL path.

    One line per sample: ``{"id", "image", "prompt", "answer", "qtype"}``; ``image`` is relative to
    the JSONL's folder and ``prompt`` is the raw question (the runtime applies the chat template).
    """
    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            sid = f"{i:06d}"
            rel = f"images/{sid}.png"
            s.image.save(os.path.join(folder, rel), format="PNG")
            rec = {"id": sid, "image": rel, "prompt": s.question, "answer": s.answer,
                   "qtype": s.qtype}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL written by ``to_jsonl``, with ``image`` made absolute."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec["image"] = os.path.join(base, rec["image"])
                out.append(rec)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cogvlm2_lite.demo.task",
                                description="write a synthetic shapes QA set as PNGs + JSONL")
    p.add_argument("folder")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--split", choices=("train", "heldout"), default="heldout")
    p.add_argument("--seed", type=int, default=None, help="overrides --split")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else (TRAIN_SEED if a.split == "train" else HELDOUT_SEED)
    print(to_jsonl(generate(seed, a.n, a.size), a.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
