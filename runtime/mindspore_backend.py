"""The MindSpore backend: the bundle's MindIR graphs under MindSpore (CPU here; Ascend; tensor parallel)."""
import numpy as np

from .bundle import Bundle
from .errors import UserError
from .weights import load_rank_weights


def use_device(device: str = "CPU", mode: str | None = "GRAPH_MODE"):
    """Set MindSpore's device (kept where this process already fixed it: an msrun rank after init, or
    a second backend) and, unless None, its execution mode ("GRAPH_MODE" or "PYNATIVE_MODE")."""
    import mindspore as ms
    try:
        ms.set_device(device)
    except RuntimeError:
        pass
    if mode:
        ms.set_context(mode=getattr(ms, mode))


class MindSporeBackend:
    """MindIR through `mindspore.load` + `nn.GraphCell` (CPU here; Ascend with device='Ascend')."""
    name = "mindspore"
    format = "mindir"

    def __init__(self, bundle: Bundle, rank: int = 0, device: str = "CPU"):
        bundle.require("mindir", "MindIR", self.name, single_rank=False)
        try:
            import mindspore as ms
        except ImportError:
            raise UserError("the mindspore backend needs MindSpore (pip install mindspore); for an onnx bundle "
                            "use --backend onnxruntime.") from None
        from mindspore import nn
        self._ms = ms
        if bundle.manifest["dtype"] == "bf16" and device.upper() == "CPU":
            raise UserError(f"{bundle.path} is a bf16 bundle, and MindSpore's CPU kernels have no bfloat16: run it "
                            "on Ascend (device='Ascend'), or export with --dtype fp32 or fp16 for CPU.")
        use_device(device)
        weights = load_rank_weights(bundle, rank)
        tensors = {name: ms.Tensor.from_numpy(a) for name, a in weights.items()}  # zero-copy
        self._weights = {family: tuple(tensors[n] for n in bundle.weight_names(family))
                         for family in ("vision", "language")}
        self._graphs = {}
        for name in bundle.graph_names:
            info = bundle.graph(name)
            path = bundle.rank_dir(rank) / info.files["mindir"]
            try:
                self._graphs[name] = (nn.GraphCell(ms.load(str(path))), info)
            except (RuntimeError, ValueError) as e:
                raise UserError(f"graph file {path} cannot be loaded by MindSpore {ms.__version__} "
                                f"({str(e).splitlines()[0]}): export the bundle again.") from None

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        cell, info = self._graphs[name]
        info.check_inputs(inputs)
        args = [self._ms.Tensor.from_numpy(x) for x in inputs]
        outputs = cell(*args, *self._weights[info.weights])
        return [o.asnumpy() for o in outputs] if isinstance(outputs, tuple) else [outputs.asnumpy()]
