"""Image loading and CogVLM2 pixel preprocessing, bit-identical to the original torchvision pipeline.

The release preprocesses with torchvision's `Resize((S, S), BICUBIC) -> ToTensor -> Normalize`.
On PIL input torchvision resizes with Pillow itself, then computes `(float32(u8) / 255 - mean) / std`
in float32, one rounded op at a time. The result therefore depends only on the uint8 value and
the channel, so we evaluate those same three float32 ops once per (channel, value) and gather from
the table: one pass over the image, the same bits, faster than torchvision's arithmetic.
"""

import functools
import io
import os

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from .errors import UserError

SIZE = 1344
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_ALPHA_MODES = {"RGBA", "LA", "La", "PA", "RGBa"}
_PLAIN_MODES = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX", "HSV"}


def load_image(source):
    """Open a path, encoded bytes or a PIL image as an upright 8-bit RGB image.

    EXIF orientation is applied (phones store photos sideways plus a rotation tag). Transparent
    pixels are composited over white, since a transparent background is meant to be the page, not
    the black that a plain RGB conversion reveals. 16-bit, int32 and float images are scaled to
    0..255; CIELAB goes through a colour transform; every other mode through Pillow's convert.
    """
    if isinstance(source, Image.Image):
        name, fp = "the given PIL image", None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = "the image bytes", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not str(path).strip():
            raise UserError("the image path is empty; pass an image file.")
        name, fp = f"image file {_clip(path)}", source
    else:
        raise UserError(f"cannot read an image from a {type(source).__name__}; pass a file path, bytes or a PIL image.")
    try:
        if fp is None:
            source.load()
            return _to_rgb(_upright(source, copy=True))
        with Image.open(fp) as img:
            img.load()
            return _to_rgb(_upright(img, copy=False))
    except FileNotFoundError:
        raise UserError(f"{name} does not exist; check the path.") from None
    except IsADirectoryError:
        raise UserError(f"{name} is a directory; pass an image file.") from None
    except PermissionError:
        raise UserError(f"{name} cannot be read (permission denied); fix its permissions.") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{name} is not an image Pillow can read; pass a JPEG, PNG, WebP or BMP file.") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{name} is too large to decode safely ({e}); downscale it first.") from None
    except OSError as e:
        if e.errno is not None:  # the file system's refusal (a name too long, ...): its reason, not the name again
            raise UserError(f"{name} cannot be opened ({e.strerror}).") from None
        raise UserError(f"{name} is truncated or corrupt ({e}); re-export or re-download it.") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{name} is truncated or corrupt ({e}); re-export or re-download it.") from None


def _clip(path, limit: int = 120) -> str:
    """A path quoted for a message, its middle cut past `limit` characters (a message never echoes a payload)."""
    text = repr(str(path))
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def _upright(img, copy):
    """Apply the EXIF Orientation tag; a malformed EXIF block is ignored rather than fatal."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return img
    try:
        if copy:
            return ImageOps.exif_transpose(img)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # Pillow's EXIF parser raises many types on odd cameras' data
        pass
    return img


def _to_rgb(img):
    """Convert any PIL mode to 8-bit RGB (see `load_image` for the rules)."""
    mode = img.mode
    if mode == "La":
        img, mode = img.convert("LA"), "LA"  # Pillow converts premultiplied La only to LA
    palette_alpha = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or "transparency" in img.info or palette_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode in _PLAIN_MODES:
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_u8(np.asarray(img))).convert("RGB")
    if mode == "LAB":
        return ImageCms.applyTransform(img, _lab_to_srgb())
    raise UserError(f"images in PIL mode {mode!r} are not supported; convert the image to RGB first.")


@functools.cache
def _lab_to_srgb():
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def _to_u8(a):
    """Map a single-channel 16-bit/int32/float array to uint8 by its apparent range.

    8-bit data stored wide passes through, 16-bit data uses the full 0..65535 range, float data
    in [0, 1] is scaled by 255; anything else is stretched from its own min..max.
    """
    is_float = a.dtype.kind == "f"
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if is_float and 0 <= lo and hi <= 1:
        a = a * 255
    elif 0 <= lo and hi <= 255:
        pass
    elif 0 <= lo and hi <= 65535:
        a = a / 257
    else:
        a = (a - lo) * (255 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _tables(mean, std):
    """torchvision's ToTensor + Normalize of every uint8 value: [3, 256] float32, and the same for
    every PAIR of adjacent uint8 values as [3, 65536] 8-byte words (half as many gathers)."""
    v = np.arange(256, dtype=np.float32) / np.float32(255)
    single = (v[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    pair_bytes = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(65536, 2)  # memory order
    pairs = np.ascontiguousarray(single[:, pair_bytes]).view(np.uint64).reshape(3, 65536)
    return single, pairs


def preprocess(image, size=SIZE, mean=MEAN, std=STD, out=None):
    """RGB PIL image -> float32 [3, size, size], the exact bits of the release's torchvision transform.

    `out` lets a caller fill one row of a preallocated batch without another copy.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    elif out.shape != (3, size, size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape (3, {size}, {size})")
    single, pairs = _tables(tuple(map(float, mean)), tuple(map(float, std)))
    n = size * size
    even = n - n % 2
    flat = out.reshape(3, n)
    for c, band in enumerate(image.split()):
        idx = np.asarray(band).reshape(n)
        np.take(pairs[c], idx[:even].view(np.uint16), out=flat[c, :even].view(np.uint64), mode="clip")
        if n % 2:
            flat[c, -1] = single[c, idx[-1]]
    return out


def batch_pixels(images, size=SIZE, mean=MEAN, std=STD):
    """Several images (anything `load_image` takes, or float32 [3, size, size] already preprocessed)
    -> float32 [B, 3, size, size]. Raises UserError for an unreadable image or pixels of another shape."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.shape != (3, size, size):
                raise UserError(f"preprocessed pixels must have shape (3, {size}, {size}), not {img.shape}.")
            out[i] = img
        else:
            preprocess(load_image(img), size, mean, std, out=out[i])
    return out
