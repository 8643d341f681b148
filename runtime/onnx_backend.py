"""The `onnxruntime` backend: a bundle's ONNX graphs, for machines without MindSpore (CPU, CUDA).

One InferenceSession per graph, created once. The graphs take their weights as inputs, so the
rank's weights are read once from the safetensors files and wrapped as OrtValues (zero-copy on CPU,
one upload on CUDA), then bound into each graph's IOBinding once. Per call only the data inputs
are bound, straight from the numpy buffers (the KV-cache views included: no copies), and the
outputs are written by onnxruntime into freshly allocated numpy arrays that are returned as they are.

Nothing here imports MindSpore: `pip install onnxruntime` (or onnxruntime-gpu) is enough to run an
onnx bundle.
"""
import os
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import UserError

NP_DTYPES = {"int32": np.int32, "float32": np.float32, "float16": np.float16}


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's load/store units, so
    more intra-op threads than cores only adds contention for memory-bound decode)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


class OnnxRuntimeBackend:
    """ONNX graphs through onnxruntime. Options: device ('auto' = CUDA when onnxruntime offers it,
    'cpu', 'cuda'), threads (intra-op threads on CPU; default the physical cores), spinning
    (idle worker threads spin between ops instead of sleeping). Spinning is off by default: on a
    2-core machine shared with one other busy process, the bench decode step took 92 ms with it
    and 52 ms without (MindSpore: 66 ms); worker threads that spin through the many small serial
    ops steal the core the parallel GEMVs then wait for."""
    name = "onnxruntime"
    format = "onnx"

    def __init__(self, bundle: Bundle, rank: int = 0, device: str = "auto", threads: int | None = None,
                 spinning: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
                            "(or onnxruntime-gpu for CUDA).") from None
        if "onnx" not in bundle.formats:
            raise UserError(f"{bundle.path} has no ONNX graphs (formats: {', '.join(bundle.formats)}): export it "
                            "with --format onnx (or mindir,onnx), or run it with --backend mindspore.")
        if bundle.tp > 1:
            raise UserError(f"{bundle.path} is split over {bundle.tp} tensor-parallel ranks, which onnxruntime "
                            "cannot run (no collectives): use --backend mindspore under msrun.")
        self._ort = ort
        available = ort.get_available_providers()
        device = device.lower()
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"onnxruntime device {device!r} is not one of auto, cpu, cuda.")
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UserError("onnxruntime here has no CUDA provider (providers: "
                            f"{', '.join(available)}): install onnxruntime-gpu or use device cpu.")
        self.device = "cuda" if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available) \
            else "cpu"
        self.threads = threads or physical_cores()
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda"
                     else ["CPUExecutionProvider"])

        from .backends import load_rank_weights
        self._arrays = load_rank_weights(bundle, rank)  # the one resident copy (CPU OrtValues alias it)
        weights = {n: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for n, a in self._arrays.items()}
        if self.device == "cuda":
            self._arrays = None  # uploaded: the host copy is no longer needed

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self._graphs = {}
        for name in bundle.graph_names:
            info = bundle.graph(name)
            path = bundle.rank_dir(rank) / info.files["onnx"]
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for damaged models
                raise UserError(f"graph file {path} cannot be loaded by onnxruntime {ort.__version__} "
                                f"({str(e).splitlines()[0]}): export the bundle again.") from None
            binding = session.io_binding()
            data = [(d["name"], NP_DTYPES[d["dtype"]], tuple(d["shape"])) for d in info.inputs]
            declared = {i.name for i in session.get_inputs()}
            expected = {n for n, _, _ in data} | set(bundle.weight_names(info.weights))
            if declared != expected:
                raise UserError(f"graph file {path} does not take the inputs the manifest lists: export the bundle "
                                "again.")
            for n in bundle.weight_names(info.weights):
                binding.bind_ortvalue_input(n, weights[n])
            outputs = [(d["name"], NP_DTYPES[d["dtype"]], tuple(d["shape"])) for d in info.outputs]
            self._graphs[name] = (session, binding, data, outputs)

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session, binding, data, outputs = self._graphs[name]
        if len(inputs) != len(data):
            raise ValueError(f"{name} takes {len(data)} inputs, got {len(inputs)}")
        keep = []
        for (n, dtype, shape), x in zip(data, inputs):
            if x.dtype != dtype or x.shape != shape:
                raise ValueError(f"{name} input {n}: expected {np.dtype(dtype).name}{list(shape)}, "
                                 f"got {x.dtype}{list(x.shape)}")
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
                keep.append(x)
            binding.bind_input(n, "cpu", 0, dtype, shape, x.ctypes.data)  # onnxruntime reads the numpy memory
        results = [np.empty(shape, dtype) for _, dtype, shape in outputs]
        for (n, dtype, shape), y in zip(outputs, results):
            binding.bind_output(n, "cpu", 0, dtype, shape, y.ctypes.data)  # and writes into these
        session.run_with_iobinding(binding)
        del keep
        return results
