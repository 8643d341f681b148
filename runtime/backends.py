"""Backends: run a bundle's graphs with numpy in, numpy out.

The interface is two things: `Backend(bundle, rank)` loads that rank's graphs and weights, and
`run(graph_name, inputs)` runs one graph on its data inputs (the weights, loaded once, are added
by the backend). Inputs must be C-contiguous; the backend wraps them without copying.
"""
import numpy as np
from safetensors import safe_open

from .bundle import Bundle
from .errors import UserError


def load_rank_weights(bundle: Bundle, rank: int) -> dict[str, np.ndarray]:
    """All of a rank's weights as numpy arrays, read tensor by tensor (peak = weights + one tensor)."""
    weights = {}
    for path in bundle.weight_files(rank):
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"weight file {path} cannot be read ({e}): the bundle is damaged; export it again.") from None
    return weights


class MindSporeBackend:
    """MindIR through `mindspore.load` + `nn.GraphCell` (CPU here; Ascend with device='Ascend')."""
    name = "mindspore"
    format = "mindir"

    def __init__(self, bundle: Bundle, rank: int = 0, device: str = "CPU"):
        if "mindir" not in bundle.formats:
            raise UserError(f"{bundle.path} has no MindIR graphs (formats: {', '.join(bundle.formats)}): run it with "
                            "--backend onnxruntime, or export it with --format mindir.")
        try:
            import mindspore as ms
        except ImportError:
            raise UserError("the mindspore backend needs MindSpore (pip install mindspore); for an onnx bundle "
                            "use --backend onnxruntime.") from None
        from mindspore import nn
        self._ms = ms
        try:
            ms.set_device(device)
        except RuntimeError:  # already fixed in this process (msrun rank, or a second backend)
            pass
        ms.set_context(mode=ms.GRAPH_MODE)
        weights = load_rank_weights(bundle, rank)
        tensors = {name: ms.Tensor.from_numpy(a) for name, a in weights.items()}  # zero-copy
        self._weights = {family: tuple(tensors[n] for n in bundle.weight_names(family))
                         for family in ("vision", "language")}
        self._graphs = {}
        for name in bundle.graph_names:
            info = bundle.graph(name)
            path = bundle.rank_dir(rank) / info.file
            try:
                self._graphs[name] = (nn.GraphCell(ms.load(str(path))), info.weights)
            except (RuntimeError, ValueError) as e:
                raise UserError(f"graph file {path} cannot be loaded by MindSpore {ms.__version__} "
                                f"({str(e).splitlines()[0]}): export the bundle again.") from None

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        cell, family = self._graphs[name]
        args = [self._ms.Tensor.from_numpy(x) for x in inputs]
        outputs = cell(*args, *self._weights[family])
        return [o.asnumpy() for o in outputs] if isinstance(outputs, tuple) else [outputs.asnumpy()]


from .onnx_backend import OnnxRuntimeBackend  # noqa: E402  (imports onnxruntime only when opened)
from .lite_backend import LiteBackend, lite_available  # noqa: E402  (starts MindSpore Lite only when opened)

BACKENDS = {"mindspore": MindSporeBackend, "onnxruntime": OnnxRuntimeBackend, "lite": LiteBackend}


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
        name = next((n for n in ("onnxruntime", "mindspore", "lite") if n in usable), "mindspore")
    if name not in BACKENDS:
        raise UserError(f"backend {name!r} is not available: choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[name](bundle, rank, **kw)
