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

    def __init__(self, bundle: Bundle, rank: int = 0, device: str = "CPU"):
        import mindspore as ms
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


BACKENDS = {"mindspore": MindSporeBackend}


def open_backend(bundle: Bundle, name: str = "auto", rank: int = 0, **kw):
    if name == "auto":
        name = "mindspore"
    if name not in BACKENDS:
        raise UserError(f"backend {name!r} is not available: choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[name](bundle, rank, **kw)
