"""Trace the fixed-shape graphs of one rank into MindIR files.

Weights are graph inputs, so tracing needs only their shapes: placeholders are lazily initialised
tensors that are never materialised, and tracing the 19B model costs no weight memory. With tp > 1
the graphs contain collectives, so each rank traces inside an msrun launch (`python -m
export/trace.py PLAN.json` is the worker msrun runs).
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
from mindspore.common.initializer import Zero

from cogvlm2_lite.export.eta import GRAPH
from cogvlm2_lite.graphs.config import CogVLM2Config
from cogvlm2_lite.graphs.entry import NUMPY_NAMES, ExtendGraph, VisionGraph, image_prefix_graph
from cogvlm2_lite.runtime.mindspore_backend import use_device
from cogvlm2_lite.runtime.progress import Progress

# MindSpore's default limit of 1000 nested calls is below the 19B vision tower's (63 layers, each
# attending in 10 query blocks): the graphs are finite, so the limit only needs to be above them.
CALL_DEPTH = 10000


@dataclass
class Plan:
    """Everything that decides the graphs of a bundle (and nothing about the weights)."""
    config: dict
    dtype: str = "fp32"
    tp: int = 1
    batch: int = 1
    chunk_buckets: list = field(default_factory=list)   # prefill chunk sizes C (extend_<C>_<T>)
    decode_buckets: list = field(default_factory=list)  # cache lengths T
    formats: list = field(default_factory=lambda: ["mindir"])   # graph file formats: mindir, onnx
    quant: str | None = None    # weight quantization scheme (graphs/quant.py SCHEMES) or None

    @property
    def cfg(self) -> CogVLM2Config:
        return CogVLM2Config.from_hf(self.config)

    def forms(self) -> dict:
        """{weight name: graphs/quant.py Form} of the quantized weights (empty without quant)."""
        if self.quant is None:
            return {}
        from cogvlm2_lite.graphs.model import weight_specs
        from cogvlm2_lite.graphs.quant import form_of
        forms = {s.name: form_of(s, self.quant, self.tp) for s in weight_specs(self.cfg)}
        return {n: f for n, f in forms.items() if f is not None}

    def graphs(self):
        """The graph cells of one rank, in bundle order."""
        cfg = self.cfg
        q = self.quant
        yield VisionGraph(cfg, 1, self.dtype, self.tp, quant=q)  # images arrive one request at a time
        for c in self.chunk_buckets:
            yield image_prefix_graph(cfg, c, self.dtype, self.tp, quant=q)
        for t in self.decode_buckets:
            for c in self.chunk_buckets:
                if c <= t:
                    yield ExtendGraph(cfg, c, t, 1, self.dtype, self.tp, quant=q)  # one row's prompt chunk
            yield ExtendGraph(cfg, 1, t, self.batch, self.dtype, self.tp, quant=q)  # every row's next token


KERNELS_SUFFIX = ".kernels.onnx"   # a graph's form with our own quantized kernels (kernels/), beside its .onnx


def example_inputs(graph, dtype: str, tp: int) -> list:
    """Shape-only placeholders: lazily initialised tensors are never allocated by tracing."""
    data = [(shape, getattr(ms, dt)) for _, shape, dt in graph.inputs]   # numpy dtype names are MindSpore's too
    weights = [(shape, getattr(ms, s.dtype or NUMPY_NAMES[dtype]))
               for shape, s in zip(graph.table.local_shapes(tp), graph.table.specs)]
    return [ms.Tensor(shape=shape, dtype=dt, init=Zero()) for shape, dt in data + weights]


def prepare_tracing():
    """MindSpore set up to trace this process's graphs: the CPU device, graph mode, CALL_DEPTH."""
    use_device()
    ms.set_recursion_limit(CALL_DEPTH)


def trace_rank(plan: Plan, out_dir: Path, progress: Progress | None = None):
    """Write `<name>.mindir` and/or `<name>.onnx` (plan.formats) for every graph of the plan into out_dir,
    each graph a phase of `progress` ("graph 2/6: prefill_image_256")."""
    prepare_tracing()
    out_dir.mkdir(parents=True, exist_ok=True)
    forms = plan.forms()
    progress = progress or Progress(enabled=False)
    n = sum(1 for _ in plan.graphs())
    for i, graph in enumerate(plan.graphs(), 1):
        with progress.phase(f"graph {i}/{n}: {graph.name}", unit=GRAPH):
            trace_graph(graph, plan, forms, out_dir)


def trace_graph(graph, plan: Plan, forms: dict, out_dir: Path):
    """One graph's files (plan.formats) in out_dir."""
    inputs = example_inputs(graph, plan.dtype, plan.tp)
    if "mindir" in plan.formats:
        ms.export(graph, *inputs, file_name=str(out_dir / graph.name), file_format="MINDIR")
    if "onnx" in plan.formats or "lite" in plan.formats:
        from .onnx_export import export_onnx  # imports onnx only when asked for
        export_onnx(graph, inputs, out_dir / f"{graph.name}.onnx")
    if "lite" in plan.formats:  # MindSpore Lite's MindIR, converted from the ONNX graph
        from .lite_export import SUFFIX, convert_to_lite, lite_form
        convert_to_lite(out_dir / f"{graph.name}.onnx", out_dir / f"{graph.name}{SUFFIX}",
                        lite_form(graph.name, plan.batch))
        if "onnx" not in plan.formats:
            (out_dir / f"{graph.name}.onnx").unlink()
    if "onnx" in plan.formats:  # after Lite: it has none of onnxruntime's contrib ops
        from .onnx_graph import rewrite_file
        path = out_dir / f"{graph.name}.onnx"
        if plan.quant:   # the form with our own kernels first, from the graph as exported
            rewrite_file(path, for_onnxruntime, graph, plan, forms, True, out=out_dir / f"{graph.name}{KERNELS_SUFFIX}")
        rewrite_file(path, for_onnxruntime, graph, plan, forms)


def for_onnxruntime(model, graph, plan: Plan, forms: dict, kernels: bool = False) -> bool:
    """The rewrites for onnxruntime of one exported graph, in order, on one loaded copy -> whether any
    changed it: a decode graph's fused kernels (export/onnx_fuse.py), the quantized matmuls
    (export/onnx_quant.py), then w8a8's one-row activation quantization around them and the decode
    matmuls' row reshapes (onnx_fuse.py). kernels: the quantized matmuls, the decode graphs' attention over
    the cache (export/onnx_decode_attention.py) and the other graphs' attention (export/onnx_attention.py;
    fp32), as our own kernels (kernels/), and their GELUs as onnxruntime's (export/onnx_gelu.py) -> whether
    any matmul became one (the graph's second form, KERNELS_SUFFIX, is worth writing)."""
    from .onnx_attention import fuse_attention
    from .onnx_decode_attention import use_decode_attention
    from .onnx_fuse import drop_row_reshapes, fuse_decode, fuse_int8_activations
    from .onnx_gelu import fuse_gelu
    from .onnx_graph import OnnxGraph
    from .onnx_quant import rewrite_quantized_matmuls
    decode = graph.name.startswith("decode_")
    changed = False
    if decode:
        shapes = OnnxGraph(model, shapes=True).shapes   # before the contrib ops hide them from onnx
        cfg = plan.cfg
        changed |= any(fuse_decode(model, (cfg.num_hidden_layers, cfg.num_attention_heads // plan.tp,
                                           cfg.num_multi_query_heads // plan.tp, cfg.head_dim,
                                           graph.cache_len)).values())
    if kernels and not decode and plan.dtype == "fp32":   # before the custom ops hide shapes from onnx
        fuse_attention(model)
        fuse_gelu(model)
    if kernels and decode:
        use_decode_attention(model)
    if plan.quant:
        counts = rewrite_quantized_matmuls(model, forms, fp32=plan.dtype == "fp32", kernels=kernels)
        changed |= bool(counts)
        if decode:
            changed |= bool(fuse_int8_activations(model))
    if decode and plan.dtype == "fp32":
        changed |= bool(drop_row_reshapes(model, shapes))
    if kernels:
        return any(f.kernel in counts for f in set(forms.values())) if plan.quant else False
    return changed


def _worker(plan_path: str):
    """msrun entry: join the communication group, trace this rank's graphs."""
    from mindspore.communication import get_rank, init
    use_device()
    init()
    staging = Path(plan_path).parent
    plan = Plan(**json.loads(Path(plan_path).read_text()))
    trace_rank(plan, staging / f"rank{get_rank()}")


if __name__ == "__main__":
    _worker(sys.argv[1])
