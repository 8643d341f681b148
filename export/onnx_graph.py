"""A view of an exported ONNX graph for the rewrite passes (export/onnx_quant.py, export/onnx_fuse.py):
who produces and who reads each tensor, constant values, static shapes, and the clean-up after a rewrite."""
import numpy as np
import onnx
from onnx import helper, numpy_helper

MANY = object()   # sole_sources' value for a tensor computed from several of the inputs asked about


class OnnxGraph:
    """`model`'s graph, indexed. With `shapes`, the static shapes onnx's shape inference finds (it cannot
    see through onnxruntime's contrib ops: infer before adding them)."""

    def __init__(self, model: onnx.ModelProto, shapes: bool = False):
        self.model, self.g = model, model.graph
        self.inputs = {i.name: i for i in self.g.input}
        self.shapes = {}
        if shapes:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
                t = v.type.tensor_type
                if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                    self.shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        for n in self.g.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.refresh()

    def refresh(self):
        """Re-index producers and readers after the node list changed."""
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    @staticmethod
    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    @staticmethod
    def attr(node, name: str, default=None):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

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

    def sole_sources(self, inputs: set) -> dict:
        """{tensor: the one graph input of `inputs` it is computed from, or MANY when several} for every tensor
        computed from any of them: one pass over the nodes in their (topological) order, where walking back
        from each tensor (`sources`) would cost the graph's size per tensor: minutes for the 19B's 63 layers."""
        found = {name: name for name in inputs}
        for node in self.g.node:
            upstream = {found[i] for i in node.input if i in found}
            if upstream:
                one = upstream.pop() if len(upstream) == 1 else MANY
                for o in node.output:
                    found[o] = one
        return found

    def shape(self, name: str) -> list:
        """The declared shape of graph input `name`."""
        return [d.dim_value for d in self.inputs[name].type.tensor_type.shape.dim]

    def declare(self, name: str, dtype: str, shape: list):
        """Re-declare graph input `name` (same bytes, the shape a kernel wants)."""
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.inputs[name].type.CopyFrom(helper.make_tensor_type_proto(elem, shape))

    def const(self, name: str):
        """The value of a constant tensor (through a Cast of a constant), else None."""
        if name in self.consts:
            return self.consts[name]
        p = self.producer.get(name)
        if p is not None and p.op_type == "Cast" and p.input[0] in self.consts:
            return self.consts[p.input[0]]
        return None

    def scalar(self, name: str):
        c = self.const(name)
        return None if c is None or c.size != 1 else float(c.reshape(()))

    def only_reader(self, name: str, op: str):
        """The one node that reads `name`, if it is an `op`, else None."""
        r = self.readers.get(name, [])
        return r[0] if len(r) == 1 and r[0].op_type == op else None

    def add_const(self, name: str, array: np.ndarray) -> str:
        """An initializer `name` holding `array` (added once) -> its name."""
        if name not in self.consts:
            self.g.initializer.append(numpy_helper.from_array(array, name))
            self.consts[name] = array
        return name

    def prune(self):
        """Drop the nodes no graph output depends on, and the initializers no node reads."""
        g = self.g
        producer = {o: n for n in g.node for o in n.output}
        need, todo = set(), [o.name for o in g.output]
        while todo:
            n = producer.get(todo.pop())
            if n is not None and id(n) not in need:
                need.add(id(n))
                todo.extend(i for i in n.input if i)
        nodes = [n for n in g.node if id(n) in need]
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        self.refresh()

    def replace_producers(self, nodes: dict, domain: str) -> int:
        """Each node of `nodes` ({tensor: node}) takes the place of that tensor's producer; the nodes no graph
        output needs any more are dropped, and `domain` (the new nodes' operator domain) imported -> how many."""
        if not nodes:
            return 0
        kept = [nodes.get(n.output[0], n) for n in self.g.node]   # by first output: multi-output ones too
        del self.g.node[:]
        self.g.node.extend(kept)
        self.prune()
        self.use_domain(domain)
        return len(nodes)

    def use_domain(self, domain: str):
        """Import an operator domain (com.microsoft for onnxruntime's contrib ops) once."""
        if not any(o.domain == domain for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(domain, 1))


def toposort(nodes, g) -> list:
    """Nodes in an order where every input is produced before it is read (ONNX requires it)."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producer = {o: n for n in nodes for o in n.output}
    out, done = [], set()
    for n in nodes:
        stack = [(n, False)]
        while stack:
            m, expanded = stack.pop()
            if id(m) in done:
                continue
            if expanded:
                done.add(id(m))
                out.append(m)
                continue
            stack.append((m, True))
            for i in reversed(m.input):
                p = producer.get(i)
                if i not in ready and p is not None and id(p) not in done:
                    stack.append((p, False))
    return out


def rewrite_file(path, rewrite, *args, out=None):
    """rewrite(model, *args) on the ONNX file at `path`, checked and saved back (or to `out`) when it changed
    anything (a truthy result) -> its result."""
    model = onnx.load(str(path))
    result = rewrite(model, *args)
    if result:
        onnx.checker.check_model(model)
        onnx.save(model, str(out or path))
    return result
