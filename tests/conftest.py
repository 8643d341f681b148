"""Session fixtures: one tiny HF checkpoint in the real layout, and bundles exported from it once."""
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "demo" / "assets" / "tokenizer.model"
BUCKETS = {"chunk": [8, 16], "decode": [32, 64]}


@pytest.fixture(scope="session")
def tiny_cfg():
    from cogvlm2_lite.graphs.config import preset
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_cfg):
    """Random tiny CogVLM2 (vision and language experts differ), sharded like the release."""
    from cogvlm2_lite.export.hf_checkpoint import write_checkpoint
    folder = write_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", tiny_cfg, seed=1, shards=2)
    shutil.copyfile(DEMO_TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tiny_hf):
    from cogvlm2_lite.export.hf_checkpoint import Checkpoint
    ckpt = Checkpoint(tiny_hf)
    return {name: np.asarray(ckpt.read(name), np.float32) for name in ckpt.weight_map}


def prompt(engine, text, image):
    """Token ids and position ids of a chat prompt, with the image placeholders when `image`."""
    from cogvlm2_lite.runtime.tokenizer import position_ids
    ids, types = engine.tokenizer.build_inputs(text, (), "chat", engine.n_image if image else 0)
    return ids, position_ids(types)


def _export(tmp_path_factory, hf, name, **kw):
    from cogvlm2_lite.export.bundle import export_bundle
    return export_bundle(tmp_path_factory.mktemp("bundles") / name, hf_dir=hf, buckets=BUCKETS, progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_hf):
    return _export(tmp_path_factory, tiny_hf, "tp1")


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory, tiny_hf):
    """The tiny checkpoint of `tiny_bundle` (MindIR), exported as ONNX only."""
    return _export(tmp_path_factory, tiny_hf, "onnx", formats="onnx")


@pytest.fixture(scope="session")
def tiny_bundle_tp2(tmp_path_factory, tiny_hf):
    return _export(tmp_path_factory, tiny_hf, "tp2", tp=2)


@pytest.fixture(scope="session")
def tiny_bundle_b4(tmp_path_factory, tiny_hf):
    return _export(tmp_path_factory, tiny_hf, "b4", batch=4)


@pytest.fixture(scope="session")
def engine4(tiny_bundle_b4):
    from cogvlm2_lite.runtime.engine import Engine
    return Engine(tiny_bundle_b4)


@pytest.fixture(scope="session")
def engine(tiny_bundle):
    from cogvlm2_lite.runtime.engine import Engine
    return Engine(tiny_bundle)


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    """A small RGB image with structure (not noise), saved as PNG."""
    from PIL import Image
    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([(x * 2.6) % 256, (y * 3.1) % 256, ((x + y) * 1.3) % 256], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A private cache folder holding the embedded model's bundle, exported once per session."""
    from cogvlm2_lite.demo.embedded import CACHE_ENV, ensure_bundle
    folder = tmp_path_factory.mktemp("cogvlm2-lite-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(folder))
    try:
        ensure_bundle()
        yield folder
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def demo_bundle(demo_cache):
    """The embedded model's bundle (in demo_cache)."""
    [bundle] = demo_cache.glob("demo-bundle-*")
    return bundle
