"""The `onnxruntime` backend: a bundle's ONNX graphs, for machines without MindSpore (CPU, CUDA).

One InferenceSession per graph, created once. The graphs take their weights as inputs, so the
rank's weights are read once from the safetensors files and wrapped as OrtValues (zero-copy on CPU,
one upload on CUDA), then bound into each graph's IOBinding once. Per call only the data inputs
are bound, straight from the numpy buffers (the KV-cache views included: no copies), and the
outputs are written by onnxruntime into freshly allocated numpy arrays that are returned as they are.

Quantized bundles: a weight is bound as the graph declares it (MatMulNBits wants the 4-bit codes as
[N, blocks, bytes]: a reshape, no copy). onnxruntime's integer and n-bit matmuls are only fast on
weights it has pre-packed at load, which it does for initializers, not for inputs: so in the decode
graphs (the memory-bound loop) the quantized matmul weights are turned into initializers that
point into the rank's safetensors file, and handed over with `add_initializer` (onnxruntime uses our
array, then packs its own copy: one packed copy per decode graph, since onnxruntime's Python API
cannot share packed weights across sessions; `packed_bytes` counts them, and a copy that would not
fit in the free memory is refused with the export that avoids it). Prefill and vision keep them as
inputs: with many rows per call, packing on the fly costs little. Which ops and operands pack, and
whether a form needs packing in every graph (MatMulNBits quantizes the activations of w4a8 only on
packed weights), the manifest says per stored form (`quant.forms.*.onnxruntime`, graphs/quant.py).

Our own kernels (kernels/, runtime/kernels.py): a quantized bundle's graphs also come as
`<graph>.kernels.onnx`, whose matmuls are our custom operators (MatMulW4A8, MatMulW8A8). On CPU, when
the library is built and runs here, those graphs are the ones loaded: their weights are plain inputs,
bound once and read in place from the mapped files by every graph, so nothing is packed (the packing
below then finds no kernel of onnxruntime's to pack for, except the fp32 ones). Otherwise the plain
graphs run, as described above.

Nothing here imports MindSpore: `pip install onnxruntime` (or onnxruntime-gpu) is enough to run an
onnx bundle.
"""
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import psutil

from .bundle import Bundle, safetensors_header
from . import kernels
from .errors import UserError
from .progress import Progress, size
from .weights import load_rank_weights

log = logging.getLogger(__name__)
PACK_SHARE = 0.9  # a packed copy may take this share of the free memory (packing needs a little scratch)
PACK_SHOWN = 1 << 30  # a load packing more shows each graph that packs as a phase on stderr (full 19B: 4.4 GiB, ~10 s)
PRESENT = "present."  # a graph output present.<input> is written into that input's buffer (export/onnx_fuse.py)
# How long an idle worker spins before it sleeps. A decode step's ops are microseconds apart, so 10 us
# bridges them (w4a8 decode 5.24 ms, as with onnxruntime's longer default); longer, the workers of one
# session keep spinning while another runs (prefill then decode; bundles taking turns: fp32 22 -> 66 ms)
# and, beside a busy process, take its core (fp32 28.5 ms with no spinning, 32 at 10 us, 40 at 100 us).
SPIN_US = 10
# the fp32 matmul weights onnxruntime pre-packs in decode graphs when the copies fit: op -> operands
FLOAT_PACKED_OPS = {"Gemm": (1,), "FusedMatMul": (1,)}
FLOAT32 = 1  # onnx.TensorProto.FLOAT (onnx is imported only where a graph is read)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel -> whether
    it could (False off glibc). onnxruntime's MatMulNBits on weights it has not pre-packed (prefill and
    vision) dequantizes each weight into a fresh heap buffer per call; glibc serves blocks that large
    with mmap and unmaps them on free, so every call faulted its buffers in again: at full size an
    extend_64 call touched 30 GB of new pages and took 52 s, and 19-21 s once freed memory is kept
    (load: 23 s -> 10.5 s). Process-wide (mallopt: no mmap'd blocks, trim only above 2 GiB free)."""
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's load/store units, so
    more intra-op threads than cores only adds contention for memory-bound decode): the usable
    logical CPUs scaled by the machine's cores-per-thread ratio."""
    logical = psutil.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    process = psutil.Process()
    usable = len(process.cpu_affinity()) if hasattr(process, "cpu_affinity") else logical
    return max(1, usable * physical // logical)


def cores_free_for(threads: int, interval: float = 0.1) -> bool:
    """Whether `threads` cores are idle now: the machine's CPU use over `interval` seconds, while this
    process waits, leaves that many logical CPUs unused (half a CPU of slack for noise)."""
    cpus = psutil.cpu_count() or 1
    return cpus - psutil.cpu_percent(interval=interval) / 100 * cpus >= threads - 0.5


def _operands(g, ops: dict) -> set:
    """Names of the tensors the nodes of graph `g` read at the operands `ops` lists ({op type: input indices})."""
    return {n.input[i] for n in g.node if n.op_type in ops for i in ops[n.op_type]}


class OnnxRuntimeBackend:
    """ONNX graphs through onnxruntime. Options: device ('auto' = CUDA when onnxruntime offers it,
    'cpu', 'cuda'), threads (intra-op threads on CPU; default the physical cores), spinning
    (idle worker threads spin between ops, SPIN_US at most, instead of sleeping; None: when the
    cores the threads need are idle at load, `cores_free_for`). On idle cores a decode step makes
    some 60 parallel GEMVs, and waking sleeping workers for each costs more than spinning: bench
    preset decode w4a8 7.2 -> 5.3 ms, w8a8 9.9 -> 8.4 ms. Beside a busy process, spinning workers
    take the core the GEMVs then wait for (SPIN_US), hence the check at load (docs/speed.md).

    pack_prefill (forms that pack in every graph, w4a8): pack the prefill and vision graphs too (their
    activations quantized, as the scheme says), or only the decode graphs (prefill and vision then
    compute with fp32 activations: more accurate, slower, and one packed copy instead of one per
    graph). None: every graph when all the copies fit in the free memory, else decode only, saying
    so (the full 19B: 32.6 GiB of copies for six graphs; docs/scale.md)."""
    name = "onnxruntime"
    format = "onnx"

    def __init__(self, bundle: Bundle, rank: int = 0, device: str = "auto", threads: int | None = None,
                 spinning: bool | None = None, pack_prefill: bool | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
                            "(or onnxruntime-gpu for CUDA).") from None
        bundle.require("onnx", "ONNX", self.name)
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

        if self.device == "cpu":
            keep_freed_memory()
        self._arrays = load_rank_weights(bundle, rank)  # the one resident copy (CPU OrtValues alias it)
        self._values = {}
        forms = (bundle.manifest.get("quant") or {}).get("forms", {})
        self._offsets = {}  # where each weight lies in its file: the initializers of pre-packed graphs point there
        if self.device == "cpu":
            for f in bundle.weight_files(rank):
                self._offsets.update({n: (f.name, h["data_offsets"]) for n, h in safetensors_header(f).items()})
        packing = [f["onnxruntime"] for f in forms.values() if "onnxruntime" in f]
        self._packed_ops = {op: tuple(i) for k in packing for op, i in k["ops"].items()}  # op -> operands it pre-packs
        every_graph = any(k["every_graph"] for k in packing)

        self.spinning = spinning if spinning is not None else (self.device == "cpu" and cores_free_for(self.threads))
        self._graphs = {}
        self.kernels = None   # our quantized kernels' library (runtime/kernels.py), when the graphs use them
        if self.device == "cpu" and any("onnx_kernels" in bundle.graph(n).files for n in bundle.graph_names):
            self.kernels = kernels.library()
        form = "onnx_kernels" if self.kernels else "onnx"
        paths = {name: bundle.rank_dir(rank) / bundle.graph(name).files.get(form, bundle.graph(name).files["onnx"])
                 for name in bundle.graph_names}
        self._models = {}   # graph -> its loaded ONNX, for the graphs that pack (read once)
        decode = [n for n in bundle.graph_names if self._offsets and n.startswith("decode")]
        self._pack_floats(decode, paths)
        self._packing = [n for n in bundle.graph_names if self._offsets and (n in decode or every_graph)]
        if every_graph and pack_prefill is not True and self._packing != decode:
            need = sum(self._pack_bytes(self._packed_inputs(n, paths[n])) for n in self._packing)
            if pack_prefill is False or need > PACK_SHARE * psutil.virtual_memory().available:
                if pack_prefill is None:
                    log.warning(f"onnxruntime would keep {need / 2**30:.1f} GiB of packed 4-bit weights for "
                                f"{len(self._packing)} graphs, more than the memory free: it packs them for decode only, "
                                "and prefill and vision compute with fp32 activations (more accurate, slower).")
                self._packing = decode
        self._every_graph = every_graph and self._packing != decode
        self.packed_bytes = {}  # graph -> bytes of the weights onnxruntime packs a copy of for it
        self._bundle, self._paths, self._providers = bundle, paths, providers
        packs = {n: self._pack_bytes(self._packed_inputs(n, paths[n])) for n in self._packing}
        progress = Progress(enabled=sum(packs.values()) >= PACK_SHOWN)
        for name in bundle.graph_names:
            with progress.phase(f"load {name}: pack {size(packs[name])} of weights") if name in packs else nullcontext():
                self._graphs[name] = self._open(name)
        self._models.clear()   # what the packing decision read of graphs that then did not pack

        if self.device == "cuda":
            self._arrays = self._values = None  # uploaded: the host copies are no longer needed

    def _pack_floats(self, decode: list, paths: dict):
        """Set `floats_packed`: pre-pack the decode graphs' fp32 matmul weights (FLOAT_PACKED_OPS) too when every
        decode graph's copy fits, with the quantized ones, in PACK_SHARE of the free memory (module docstring);
        else leave them unpacked, saying so."""
        self.floats_packed = False
        floats = sum(self._pack_bytes(self._float_inputs(n, paths[n])) for n in decode)
        need = floats + sum(self._pack_bytes(self._packed_inputs(n, paths[n])) for n in decode)
        self.floats_packed = floats > 0 and need <= PACK_SHARE * psutil.virtual_memory().available
        if floats and not self.floats_packed:
            log.warning(f"onnxruntime would keep {need / 2**30:.1f} GiB of packed weights for {len(decode)} decode graphs, "
                        "more than the memory free: their fp32 matmul weights stay unpacked (decode some 10% slower).")

    def _open(self, name: str, profile: str | None = None) -> tuple:
        """Graph `name`'s session with its weights bound -> (session, binding, info, output specs, aliases);
        `profile`: a file prefix for onnxruntime's profiler. Raises UserError for a graph it cannot load."""
        info, path = self._bundle.graph(name), self._paths[name]
        try:
            session = self._session(name, path, self._providers, profile)
        except UserError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for damaged models
            raise UserError(f"graph file {path} cannot be loaded by onnxruntime {self._ort.__version__} "
                            f"({str(e).splitlines()[0]}): export the bundle again.") from None
        binding = session.io_binding()
        data = info.input_specs
        declared = {i.name: tuple(i.shape) for i in session.get_inputs()}
        weights = set(self._bundle.weight_names(info.weights))
        if not ({n for n, _, _ in data} <= set(declared) <= {n for n, _, _ in data} | weights):
            raise UserError(f"graph file {path} does not take the inputs the manifest lists: export the bundle again.")
        for n in weights & set(declared):
            binding.bind_ortvalue_input(n, self._value(n, declared[n]))
        aliases = [(o.name, o.name[len(PRESENT):]) for o in session.get_outputs()
                   if o.name.startswith(PRESENT) and o.name[len(PRESENT):] in declared]
        return session, binding, info, info.output_specs, aliases

    def profile(self, name: str, inputs: list[np.ndarray], steps: int, prefix: str) -> tuple[float, str]:
        """`steps` calls of graph `name` (after one untimed) in a second session of it with onnxruntime's
        profiler on (and its own packed copy) -> (wall seconds per call, the profile's JSON file, which
        records the untimed call too; bench/profile.py reads it)."""
        mine = self._graphs[name]
        self._graphs[name] = self._open(name, prefix)
        try:
            self.run(name, inputs)
            t = time.perf_counter()
            for _ in range(steps):
                self.run(name, inputs)
            wall = (time.perf_counter() - t) / steps
            return wall, self._graphs[name][0].end_profiling()
        finally:
            self._graphs[name] = mine

    def _value(self, name: str, shape: tuple):
        """The weight as an OrtValue of the shape a graph declares (a view of the one array)."""
        if (name, shape) not in self._values:
            a = self._arrays[name]
            self._values[name, shape] = self._ort.OrtValue.ortvalue_from_numpy(
                a.reshape(shape) if a.shape != shape else a, self.device, 0)
        return self._values[name, shape]

    def _options(self, profile: str | None = None):
        ort = self._ort
        options = ort.SessionOptions()
        if profile:
            options.enable_profiling, options.profile_file_prefix = True, profile
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
        if self.kernels:
            options.register_custom_ops_library(self.kernels)
        return options

    def _session(self, name: str, path: Path, providers, profile: str | None = None):
        """The InferenceSession of graph `name` (file `path`); in the graphs that pre-pack, the matmul weights
        it packs become shared initializers that onnxruntime packs a copy of (module docstring).
        Raises UserError, before packing, when that copy would not fit in the memory free now."""
        options = self._options(profile)
        if name not in self._packing:
            return self._ort.InferenceSession(str(path), options, providers=providers)
        import onnx
        inputs = self._packed_inputs(name, path)
        model = self._models.pop(name)
        g = model.graph
        if not inputs:
            return self._ort.InferenceSession(str(path), options, providers=providers)
        self._check_room(name, self._pack_bytes(inputs))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        for i in inputs:
            t = i.type.tensor_type
            shape = tuple(d.dim_value for d in t.shape.dim)
            file, (start, end) = self._offsets[i.name]
            init = onnx.TensorProto(name=i.name, data_type=t.elem_type, dims=shape,
                                    data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", file), ("offset", str(start)), ("length", str(end - start))):
                init.external_data.add(key=k, value=v)
            g.initializer.append(init)
            g.input.remove(i)
            options.add_initializer(i.name, self._value(i.name, shape))
        return self._ort.InferenceSession(model.SerializeToString(), options, providers=providers)

    def _model(self, name: str, path: Path):
        """Graph `name`'s ONNX (file `path`), read once while the packing is decided."""
        if name not in self._models:
            import onnx
            self._models[name] = onnx.load(str(path))
        return self._models[name]

    def _packed_inputs(self, name: str, path: Path) -> list:
        """The graph inputs of `name` that onnxruntime pre-packs: the operands of the quantized kernels (the
        manifest's ops) and, once `floats_packed`, the fp32 weights of `_float_inputs`."""
        g = self._model(name, path).graph
        quantized = _operands(g, self._packed_ops)
        inputs = [i for i in g.input if i.name in quantized and i.name in self._offsets]
        return inputs + (self._float_inputs(name, path) if self.floats_packed else [])

    def _float_inputs(self, name: str, path: Path) -> list:
        """The fp32 weights that FLOAT_PACKED_OPS read in decode graph `name` (none in other graphs)."""
        if not name.startswith("decode"):
            return []
        g = self._model(name, path).graph
        floats = _operands(g, FLOAT_PACKED_OPS)
        return [i for i in g.input
                if i.name in floats and i.name in self._offsets and i.type.tensor_type.elem_type == FLOAT32]

    def _pack_bytes(self, inputs) -> int:
        """Bytes of the weights behind these graph inputs: what onnxruntime packs a copy of."""
        return sum(self._arrays[i.name].nbytes for i in inputs)

    def _check_room(self, name: str, nbytes: int):
        """Refuse a packed copy of `nbytes` that the free memory cannot take (PACK_SHARE of it), naming the
        fix: the copies are one per graph that packs, so fewer graphs (decode buckets; for w4a8, decode-only
        packing) bound them."""
        free = psutil.virtual_memory().available
        if nbytes > PACK_SHARE * free:
            fix = "export with one decode bucket (--buckets 'decode=T')"
            if self._every_graph:
                fix = ("pack the decode graphs only (pack_prefill=False, what the default does when the copies do not fit), "
                       "or export with one chunk and one decode bucket")
            raise UserError(f"onnxruntime keeps a packed copy of the matmul weights for each of the {len(self._packing)} "
                            f"graphs that pre-pack them ({', '.join(self._packing)}), and {name}'s copy "
                            f"({nbytes / 2**20:,.0f} MiB) does not fit in the {free / 2**20:,.0f} MiB free: {fix}.")
        self.packed_bytes[name] = nbytes

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session, binding, info, outputs, aliases = self._graphs[name]
        info.check_inputs(inputs)
        keep, bound = [], {}
        for (n, dtype, shape), x in zip(info.input_specs, inputs):
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
                keep.append(x)
            binding.bind_input(n, "cpu", 0, dtype, shape, x.ctypes.data)  # onnxruntime reads the numpy memory
            bound[n] = x
        results = [np.empty(shape, dtype) for _, dtype, shape in outputs]
        for (n, dtype, shape), y in zip(outputs, results):
            binding.bind_output(n, "cpu", 0, dtype, shape, y.ctypes.data)  # and writes into these
        for out, inp in aliases:  # a fused decode graph's KV-cache update, in place (export/onnx_fuse.py)
            x = bound[inp]
            binding.bind_output(out, "cpu", 0, x.dtype, x.shape, x.ctypes.data)
        session.run_with_iobinding(binding)
        del keep
        return results

