"""Backends: run a bundle's graphs with numpy in, numpy out.

The interface is two things (`Backend`): the class, called as `Backend(bundle, rank)`, loads that
rank's graphs and weights, and `run(graph_name, inputs)` runs one graph on its data inputs (the
weights, loaded once, are added by the backend) after `GraphInfo.check_inputs`. Inputs should be
C-contiguous; the backend then wraps them without copying.
"""
from typing import Protocol

import numpy as np

from .bundle import Bundle
from .errors import UserError
from .lite_backend import LiteBackend, lite_available   # starts MindSpore Lite only when opened
from .mindspore_backend import MindSporeBackend         # imports mindspore only when opened
from .onnx_backend import OnnxRuntimeBackend            # imports onnxruntime only when opened

class Backend(Protocol):
    """What every backend is: constructed as Backend(bundle, rank, **options), it loads that rank's graphs and weights."""
    name: str     # as --backend spells it
    format: str   # the bundle graph format it runs (manifest `formats`)

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Graph `name` on its data inputs -> its outputs. Raises ValueError for inputs of the wrong
        number, dtype or shape."""


BACKENDS: dict[str, type] = {"mindspore": MindSporeBackend, "onnxruntime": OnnxRuntimeBackend, "lite": LiteBackend}


def installed(name: str) -> bool:
    """Whether the package a backend needs can be imported here."""
    from importlib.util import find_spec
    if name == "lite":
        return lite_available()
    try:
        return find_spec({"mindspore": "mindspore", "onnxruntime": "onnxruntime"}[name]) is not None
    except (ImportError, ValueError):  # blocked or half-imported module
        return False


def usable_backends(bundle: Bundle) -> list[str]:
    """The backends that can run this bundle here: its graph format is present, the package installed."""
    return [n for n, b in BACKENDS.items() if b.format in bundle.formats and installed(n)
            and (n == "mindspore" or bundle.tp == 1)]


def open_backend(bundle: Bundle, name: str = "auto", rank: int = 0, **kw):
    """name 'auto': onnxruntime when the bundle has ONNX graphs and onnxruntime is installed (the faster
    CPU path), else mindspore, else lite (a lite-only bundle with MindSpore Lite available)."""
    if name == "auto":
        usable = usable_backends(bundle)
        if not usable:
            need = {"mindspore": "MindSpore", "onnxruntime": "onnxruntime",
                    "lite": "MindSpore Lite (./build.sh setup, or COGVLM2_LITE_PYTHON)"}
            wanted = [need[n] for n, b in BACKENDS.items() if b.format in bundle.formats]
            raise UserError(f"nothing here can run {bundle.path} (formats: {', '.join(bundle.formats)}): it needs "
                            f"{' or '.join(wanted)}" + (", and tp > 1 bundles need MindSpore" if bundle.tp > 1 else "")
                            + ".")
        name = next(n for n in ("onnxruntime", "mindspore", "lite") if n in usable)
    if name not in BACKENDS:
        raise UserError(f"backend {name!r} is not available: choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[name](bundle, rank, **kw)
