"""Image loading and preprocessing: bit-identical to torchvision on real photos, sane on odd files."""

import hashlib
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.preprocess import MEAN, STD, batch_pixels, load_image, preprocess

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "preprocess_torchvision.json")


def _skimage_data():
    spec = importlib.util.find_spec("skimage")  # located, never imported: the wheel is data only here
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data")
    return path if os.path.isfile(os.path.join(path, "astronaut.png")) else None


DATA = _skimage_data()
needs_photos = pytest.mark.skipif(
    DATA is None,
    reason="scikit-image 0.25.2 photos absent (build.sh installs them: pip install --no-deps scikit-image==0.25.2)")
with open(FIXTURE) as f:
    CASES = json.load(f)["cases"]


@needs_photos
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['file']}-{c['size']}")
def test_matches_torchvision_bits(case):
    path = os.path.join(DATA, case["file"])
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == case["file_sha256"], "not the photo the fixture was made from"
    a = preprocess(load_image(path), case["size"], MEAN, STD)
    assert a.dtype == np.float32 and list(a.shape) == case["shape"] and a.flags.c_contiguous
    flat = a.reshape(-1)
    for i, v in case["samples"].items():
        assert flat[int(i)] == np.float32(v)
    assert hashlib.sha256(a.tobytes()).hexdigest() == case["sha256"]


@needs_photos
def test_batch_pixels_stacks_the_same_bits():
    files = [os.path.join(DATA, n) for n in ("chelsea.png", "rocket.jpg")]
    b = batch_pixels(files, size=56)
    assert b.shape == (2, 3, 56, 56)
    for i, p in enumerate(files):
        assert np.array_equal(b[i], preprocess(load_image(p), 56))


def test_odd_size_and_custom_constants():
    img = Image.new("RGB", (10, 7), (255, 0, 51))
    a = preprocess(img, 5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert a.shape == (3, 5, 5)
    f32 = np.float32
    want = [(f32(v) / f32(255) - f32(0.5)) / f32(s) for v, s in ((255, 0.5), (0, 0.25), (51, 1.0))]
    for c in range(3):
        assert np.all(a[c] == np.float32(want[c]))


def _px(img, xy=(0, 0)):
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel(xy)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                  "HSV", "I", "I;16", "I;16B", "F"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (6, 4))
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (6, 4)
    assert preprocess(out, 8).shape == (3, 8, 8)


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert _px(rgba, (0, 0)) == (255, 255, 255)
    assert _px(rgba, (1, 0)) == (10, 20, 30)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert all(abs(v - 127) <= 1 for v in _px(half))  # 255 * (1 - 128/255)
    la = Image.new("LA", (1, 1), (100, 0))
    assert _px(la) == (255, 255, 255)
    assert _px(Image.new("LA", (1, 1), (100, 255))) == (100, 100, 100)


def test_palette_with_transparency_index():
    p = Image.new("P", (2, 1))
    p.putpalette([200, 100, 50, 1, 2, 3] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    assert _px(p, (0, 0)) == (200, 100, 50)
    assert _px(p, (1, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    p.save(buf, "PNG")  # the same through a real file: tRNS chunk
    assert load_image(buf.getvalue()).getpixel((1, 0)) == (255, 255, 255)
    p.info.pop("transparency")
    assert _px(p, (1, 0)) == (1, 2, 3)


def test_wide_modes_are_scaled_to_8_bits():
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert [load_image(i16).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]
    buf = io.BytesIO()
    i16.save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((1, 0)) == (100, 100, 100)
    f01 = Image.fromarray(np.array([[0.0, 0.2, 1.0]], dtype=np.float32))
    assert [load_image(f01).getpixel((x, 0))[0] for x in range(3)] == [0, 51, 255]
    i8 = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    assert [load_image(i8).getpixel((x, 0))[0] for x in range(3)] == [0, 7, 255]


def test_other_colour_spaces():
    assert _px(Image.new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    assert _px(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    rgb = Image.new("RGB", (1, 1), (200, 100, 50))
    for mode in ("YCbCr", "HSV"):
        assert all(abs(a - b) <= 2 for a, b in zip(_px(rgb.convert(mode)), (200, 100, 50)))
    from PIL import ImageCms
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    assert lab.mode == "LAB" and all(abs(a - b) <= 2 for a, b in zip(_px(lab), (200, 100, 50)))


def _oriented_jpeg(orientation):
    """40x20 JPEG, left half red, right half blue, with an EXIF Orientation tag."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _near(px, want):
    return all(abs(a - b) <= 40 for a, b in zip(px, want))


def test_exif_orientation_is_applied(tmp_path):
    data = _oriented_jpeg(6)  # 6: stored rotated, display needs 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    opened = Image.open(io.BytesIO(data))
    for src in (data, str(path), path, opened):
        img = load_image(src)
        assert img.size == (20, 40)
        assert _near(img.getpixel((10, 5)), (255, 0, 0)) and _near(img.getpixel((10, 35)), (0, 0, 255))
    assert opened.size == (40, 20)  # the caller's image is not modified
    upright = load_image(_oriented_jpeg(1))
    assert upright.size == (40, 20) and _near(upright.getpixel((5, 10)), (255, 0, 0))


def test_truncated_file_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG")
    for name, data in (("cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2]), ("cut.png", _png_prefix())):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError, match=name):
            load_image(str(path))


def _png_prefix():
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 64).save(buf, "PNG")
    return buf.getvalue()[:400]


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a picture\n")
    with pytest.raises(UserError, match="notes.txt") as e:
        load_image(path)
    assert "not an image" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(UserError, match="image bytes"):
        load_image(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="int"):
        load_image(3)
