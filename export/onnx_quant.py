"""Give onnxruntime the quantized matmuls it runs fast (a rewrite of the exported ONNX graph).

MindSpore can only write standard ONNX ops, so a quantized graph arrives with its integer arithmetic
spelled in float (graphs/quant.py). This pass finds each MatMul/Gemm whose weight is computed from a
quantized weight's tensors and asks that weight's form (graphs/quant.py `Form.onnx_nodes`) for the
onnxruntime kernel that replaces it: MatMulInteger for int8x8, MatMulNBits for int4 and int4x8. The
int8 weight-only form and the activation scaling around the matmul stay as exported; nodes left
without consumers are removed. Lite converts the graph before this pass.

With `kernels`, the forms that have our own kernel (kernels/, `Form.kernel_nodes`) get it instead: one
custom node for the whole quantized linear, the activation quantization and rescaling included (the
nodes around the matmul whose outputs it produces are dropped); the export writes this second form of
each graph beside the first (export/trace.py), and the runtime takes it when the kernels are built.
"""
import onnx

from cogvlm2_lite.graphs.quant import KERNELS_DOMAIN, Form

from .onnx_graph import OnnxGraph


class QuantGraph(OnnxGraph):
    """The graph being rewritten, as a form's `onnx_nodes` sees it (graphs/quant.py)."""

    def __init__(self, model: onnx.ModelProto, fp32: bool):
        super().__init__(model)
        self.fp32 = fp32      # MatMulNBits takes fp32 activations: 4-bit kernels only in fp32 graphs

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


def rewrite_quantized_matmuls(model: onnx.ModelProto, forms: dict[str, Form], fp32: bool = True,
                              kernels: bool = False) -> dict:
    """Rewrite `model` in place. forms: {weight name: Form} of the quantized weights (graphs/quant.py);
    fp32: the graph computes in fp32; kernels: our own kernels where a form has one (module docstring).
    -> {op: how many matmuls now use it}."""
    g = model.graph
    graph = QuantGraph(model, fp32)
    qweights = {n + ".qweight": f for n, f in forms.items() if n + ".qweight" in graph.inputs}
    sole = graph.sole_sources(set(qweights))
    out, counts, new = [], {}, []
    for node in g.node:
        q = sole.get(node.input[1]) if _is_plain_matmul(node) else None
        form = qweights.get(q) if isinstance(q, str) else None
        nodes = None
        if form is not None:
            nodes = (kernels and form.kernel_nodes(node, q, graph)) or form.onnx_nodes(node, q, graph)
        if nodes is None:
            out.append(node)
            continue
        out += nodes
        new += nodes
        for n in nodes:
            if n.op_type in form.onnxruntime["ops"] or n.op_type == form.kernel:
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
    # the nodes a kernel took over (w8a8's rescaling): their outputs now come from it
    taken, fresh = {o for n in new for o in n.output}, {id(n) for n in new}
    out = [n for n in out if id(n) in fresh or not set(n.output) & taken]
    del g.node[:]
    g.node.extend(out)
    graph.prune()
    for domain in ("com.microsoft", KERNELS_DOMAIN):
        if any(n.domain == domain for n in g.node):
            graph.use_domain(domain)
    return counts
