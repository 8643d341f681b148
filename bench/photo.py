"""A deterministic photo-like JPEG for benchmarks: realistic decode and resize cost without shipping an image."""
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def test_photo(width: int = 1024, height: int = 768, seed: int = 0) -> bytes:
    """JPEG bytes (quality 90) of smooth gradients, 40 filled circles and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, 120))
        d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    buf = BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()
