"""Issue 9: the same graphs converted to MindSpore Lite (`--format lite`) and run by the `lite` backend
answer like the MindIR bundle. Lite here is PyPI's mindspore-lite 2.0.0 in CPython 3.7 (.venv-lite,
created by build.sh), run as a worker process; without it these tests skip, saying so."""
import json
import sys

import numpy as np
import pytest

from cogvlm2_lite.export.lite_export import LINEAR_GEMV, lite_form
from cogvlm2_lite.runtime.backends import BACKENDS, open_backend, usable_backends
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.lite_backend import lite_available
from cogvlm2_lite.runtime.sampling import SamplingParams

from conftest import BUCKETS, prompt

TOL = 1e-4

pytestmark = pytest.mark.skipif(not lite_available(), reason="MindSpore Lite is not installed here: `./build.sh setup` "
                                "creates .venv-lite (CPython 3.7 + mindspore-lite 2.0.0 from PyPI), or set "
                                "COGVLM2_LITE_PYTHON")


@pytest.fixture(scope="session")
def lite_bundle(tmp_path_factory, tiny_hf):
    from cogvlm2_lite.export.bundle import export_bundle
    return export_bundle(tmp_path_factory.mktemp("bundles") / "lite", hf_dir=tiny_hf, buckets=BUCKETS,
                         progress=False, formats="lite")


@pytest.fixture(scope="session")
def engines(tiny_bundle, lite_bundle):
    return Engine(tiny_bundle, backend="mindspore"), Engine(lite_bundle, backend="lite")


def test_manifest_lists_lite_graphs(lite_bundle, tiny_bundle):
    m = json.loads((lite_bundle / "manifest.json").read_text())
    mindir = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["formats"] == ["lite"] and set(m["graphs"]) == set(mindir["graphs"])
    for name, g in m["graphs"].items():
        assert g["files"] == {"lite": f"{name}.lite.mindir"}
        assert f"rank0/{name}.lite.mindir" in m["files"]
        assert not (lite_bundle / "rank0" / f"{name}.onnx").exists()  # the ONNX step left nothing behind
        assert g["inputs"] == mindir["graphs"][name]["inputs"]
        assert g["lite"] == lite_form(name, m["batch"])  # decode: W @ x^T, the rest Gemm; weights as inputs
    assert {n for n, g in m["graphs"].items() if g["lite"]["linear"] == LINEAR_GEMV} == {
        n for n in m["graphs"] if n.startswith("decode")}


def _parity(engines, photo):
    ms_engine, lite_engine = engines
    pixels = ms_engine.pixels([photo])
    emb = [e.image_embeddings(pixels) for e in engines]
    diffs = {"vision": float(np.abs(emb[0] - emb[1]).max())}
    for image in (photo, None):
        ids, pos = prompt(ms_engine, "what is in the picture?", image)
        logits = [e.prefill([ids], emb[0] if image is not None else None, [pos]) for e in engines]
        diffs[f"prefill_{'image' if image else 'text'}"] = float(np.abs(logits[0] - logits[1]).max())
        n = len(ids)
        kv = [e.cache.views() for e in engines]
        diffs["kv"] = max(diffs.get("kv", 0), float(np.abs(kv[0][0][:, :, :, :n] - kv[1][0][:, :, :, :n]).max()),
                          float(np.abs(kv[0][1][:, :, :, :n] - kv[1][1][:, :, :, :n]).max()))
        token = int(np.argmax(logits[0][0]))
        for step in range(3):
            out = [e.decode([token], [pos[-1] + 1 + step]) for e in engines]
            diffs["decode"] = max(diffs.get("decode", 0), float(np.abs(out[0] - out[1]).max()))
            token = int(np.argmax(out[0][0]))
    return diffs


def test_vision_prefill_and_decode_match_mindir(engines, photo):
    d = _parity(engines, photo)
    assert max(d.values()) <= TOL, d


@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
def test_greedy_generation_is_token_identical(engines, photo, image):
    """24 new tokens: decode crosses the 32 -> 64 cache bucket."""
    req = Request("describe this in detail" if image else "tell me a long story about it",
                  image=photo if image else None, params=SamplingParams(max_new_tokens=24))
    for e in engines:
        e.clear_prefix_cache()
    ms_r, lite_r = (e.generate([req])[0] for e in engines)
    assert ms_r.token_ids == lite_r.token_ids and lite_r.text == ms_r.text
    assert lite_r.prompt_tokens + len(lite_r.token_ids) > 32


def test_backend_choice_and_refusals(tiny_bundle, lite_bundle):
    assert "lite" in BACKENDS
    assert open_backend(Bundle(lite_bundle)).name == "lite"  # auto: the only format it has
    assert "lite" in usable_backends(Bundle(lite_bundle))
    with pytest.raises(UserError, match="no MindSpore Lite graphs.*--format lite"):
        open_backend(Bundle(tiny_bundle), "lite")
    for other in ("mindspore", "onnxruntime"):   # the advice names the backend of what the bundle has
        with pytest.raises(UserError, match=r"\(formats: lite\): run it with --backend lite, or export"):
            open_backend(Bundle(lite_bundle), other)


def test_a_lite_python_that_cannot_run_the_worker_is_one_sentence(lite_bundle, monkeypatch):
    monkeypatch.setenv("COGVLM2_LITE_PYTHON", sys.executable)   # this venv's Python: no mindspore_lite
    with pytest.raises(UserError, match=r"worker \(.*\) cannot start \(.*mindspore_lite.*\): set COGVLM2_LITE_PYTHON"):
        open_backend(Bundle(lite_bundle), "lite", in_process=False)


def test_auto_says_what_is_missing_when_nothing_here_runs_the_bundle(lite_bundle, monkeypatch):
    monkeypatch.setenv("COGVLM2_LITE_PYTHON", "/nonexistent/python")
    with pytest.raises(UserError, match=r"nothing here can run .* \(formats: lite\): it needs MindSpore Lite"):
        open_backend(Bundle(lite_bundle))


def test_inputs_are_checked(engines):
    be = engines[1].backend
    with pytest.raises(ValueError, match="expected float32"):
        be.run("vision", [np.zeros((1, 3, 4, 4), np.float64)])
