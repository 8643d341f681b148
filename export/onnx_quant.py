"""Give onnxruntime the quantized matmuls it runs fast (a rewrite of the exported ONNX graph).

MindSpore can only write standard ONNX ops, so a quantized graph arrives with its integer arithmetic
spelled in float (graphs/quant.py). This pass finds each MatMul/Gemm whose weight is computed from a
quantized weight's tensors and asks that weight's form (graphs/quant.py `Form.onnx_nodes`) for the
onnxruntime kernel that replaces it: MatMulInteger for int8x8, MatMulNBits for int4 and int4x8. The
int8 weight-only form and the activation scaling around the matmul stay as exported; nodes left
without consumers are removed. Lite converts the graph before this pass.
"""
import numpy as np
import onnx
from onnx import helper, numpy_helper

from cogvlm2_lite.graphs.quant import Form


class OnnxGraph:
    """What a form's rewrite needs to know about, and add to, the graph being rewritten."""

    def __init__(self, model: onnx.ModelProto, fp32: bool):
        g = model.graph
        self.fp32 = fp32      # MatMulNBits takes fp32 activations: 4-bit kernels only in fp32 graphs
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers = {}
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inputs = {i.name: i for i in g.input}
        self.constants = {}

    @staticmethod
    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def sources(self, name: str) -> set:
        """The graph inputs the tensor `name` is computed from."""
        seen, todo, found = set(), [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.inputs:
                found.add(t)
            elif t in self.producer:
                todo.extend(i for i in self.producer[t].input if i)
        return found

    def shape(self, name: str) -> list:
        return [d.dim_value for d in self.inputs[name].type.tensor_type.shape.dim]

    def declare(self, name: str, dtype: str, shape: list):
        """Re-declare graph input `name` (same bytes, the shape a kernel wants)."""
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.inputs[name].type.CopyFrom(helper.make_tensor_type_proto(elem, shape))

    def constant(self, name: str, value: np.ndarray) -> str:
        self.constants.setdefault(name, numpy_helper.from_array(value, name))
        return name

    BLOCK_QUANT_OPS = {"Reshape", "Mul", "Clip", "Floor", "Add", "Div", "Max", "ReduceMax", "Abs", "Identity"}

    def before_block_quantization(self, a: str) -> str | None:
        """x if the tensor `a` is x quantized per block (graphs/quant.py Int4x8.graph_linear: the input
        of the Reshape an Abs reads), else None."""
        seen, todo = set(), [a]
        while todo:
            t = todo.pop()
            node = self.producer.get(t)
            if t in seen or node is None or node.op_type not in self.BLOCK_QUANT_OPS:
                continue
            seen.add(t)
            if node.op_type == "Reshape" and any(r.op_type == "Abs" for r in self.readers.get(t, ())):
                return node.input[0]
            todo.extend(i for i in node.input if i)
        return None


def _is_plain_matmul(node) -> bool:
    a = OnnxGraph.attrs(node)
    return (node.op_type == "MatMul" or (node.op_type == "Gemm" and len(node.input) == 2 and not a.get("transA", 0)
                                         and a.get("alpha", 1.0) == 1.0))


def rewrite_quantized_matmuls(model: onnx.ModelProto, forms: dict[str, Form], fp32: bool = True) -> dict:
    """Rewrite `model` in place. forms: {weight name: Form} of the quantized weights (graphs/quant.py);
    fp32: the graph computes in fp32. -> {onnxruntime op: how many matmuls now use it}."""
    g = model.graph
    graph = OnnxGraph(model, fp32)
    qweights = {n + ".qweight": f for n, f in forms.items() if n + ".qweight" in graph.inputs}
    out, counts = [], {}
    for node in g.node:
        q = [s for s in graph.sources(node.input[1]) if s in qweights] if _is_plain_matmul(node) else []
        nodes = qweights[q[0]].onnx_nodes(node, q[0], graph) if len(q) == 1 else None
        if nodes is None:
            out.append(node)
            continue
        out += nodes
        for n in nodes:
            if n.op_type in qweights[q[0]].onnxruntime["ops"]:
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
    g.initializer.extend(graph.constants.values())
    del g.node[:]
    g.node.extend(_live(out, {o.name for o in g.output}))
    if any(n.domain == "com.microsoft" for n in g.node) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return counts


def _live(nodes, outputs: set) -> list:
    """Nodes some graph output depends on, in their order."""
    producer = {o: n for n in nodes for o in n.output}
    need, todo = set(), list(outputs)
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is not None and id(n) not in need:
            need.add(id(n))
            todo.extend(i for i in n.input if i)
    return [n for n in nodes if id(n) in need]


def rewrite_file(path, forms: dict[str, Form], fp32: bool = True) -> dict:
    """`rewrite_quantized_matmuls` on the ONNX file at `path`, saved back when anything changed."""
    model = onnx.load(str(path))
    counts = rewrite_quantized_matmuls(model, forms, fp32)
    if counts:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return counts
