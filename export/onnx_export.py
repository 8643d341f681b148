"""Write one graph cell as ONNX, for the onnxruntime backend (edge machines without MindSpore).

The graphs take their weights as inputs, so the ONNX files have no weight initializers (only a few
small constants: reshape shapes, RoPE frequencies, index ranges): the weights stay once in the rank's
safetensors files and the runtime binds them to every graph. Inputs and outputs carry the manifest's
names (data inputs, then the HF weight names in `graph.table` order), so the files are
self-describing and the runtime binds by name.
"""
from pathlib import Path

import mindspore as ms
import onnx

from cogvlm2_lite.runtime.errors import UserError

ONNX_DTYPES = ("fp32", "fp16")   # MindSpore 2.10's ONNX exporter cannot write bfloat16
MAX_CONSTANT_BYTES = 1 << 20     # a graph constant larger than this means a weight or a mask was folded in


def check_onnx_plan(tp: int, dtype: str):
    """Refuse what ONNX cannot carry, before any work is done."""
    if tp > 1:
        raise UserError(f"--format onnx cannot be combined with --tp {tp}: onnxruntime has no collectives "
                        "(AllReduce/AllGather); export tensor-parallel bundles as mindir only.")
    if dtype not in ONNX_DTYPES:
        raise UserError(f"--format onnx supports --dtype {' or '.join(ONNX_DTYPES)}, not {dtype} (MindSpore's ONNX "
                        "exporter cannot write bfloat16): choose another dtype or --format mindir.")


def name_cast_output(model: onnx.ModelProto, outputs: list) -> bool:
    """MindSpore 2.10's ONNX exporter leaves a graph output computed by a Cast under the Cast's own name, so the
    output is produced by no node (fp16 graphs: their fp32 logits end in a Cast). Give that Cast the output's
    name -> whether it had to; only where exactly one output is missing and exactly one Cast's result is unused."""
    g = model.graph
    produced = {o for n in g.node for o in n.output}
    read = {i for n in g.node for i in n.input} | set(outputs)
    missing = [o for o in outputs if o not in produced]
    unused = [n for n in g.node if n.op_type == "Cast" and n.output[0] not in read]
    if len(missing) != 1 or len(unused) != 1:
        return False
    unused[0].output[0] = missing[0]
    return True


def export_onnx(graph, inputs, path: Path):
    """Trace `graph` on the placeholder `inputs` (data, then weights) into `path` and validate it."""
    names = [n for n, _, _ in graph.inputs] + graph.table.names
    outputs = [n for n, _, _ in graph.outputs]
    ms.onnx.export(graph, *inputs, file_name=str(path), input_names=names, output_names=outputs)
    model = onnx.load(str(path))
    if name_cast_output(model, outputs):
        onnx.save(model, str(path))
    onnx.checker.check_model(model, full_check=True)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != names or got_out != outputs:
        raise RuntimeError(f"ONNX export of {graph.name} named its inputs/outputs {got_in}/{got_out}, "
                           f"expected {names}/{outputs}")
    big = [(t.name, tuple(t.dims)) for t in model.graph.initializer
           if t.ByteSize() > MAX_CONSTANT_BYTES]
    if big:
        raise RuntimeError(f"ONNX export of {graph.name} folded large constants into the graph: {big}")
