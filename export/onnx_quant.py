"""Give onnxruntime the quantized matmuls it runs fast (a rewrite of the exported ONNX graph).

MindSpore can only write standard ONNX ops, so a quantized graph arrives with its integer arithmetic
spelled in float (graphs/quant.py). This pass swaps each quantized matmul for onnxruntime's kernel:

  int8x8  Gemm(xq, Cast(W.qweight))              ->  MatMulInteger(uint8(xq + 128), W.qweight, 128)
          xq holds integers in [-127, 127], so the result is the same integer sum, computed in int32.
  int4    Gemm(x, dequantize(W.qweight, W.scale)^T)  ->  MatMulNBits(x, W.qweight, W.scale)
          (com.microsoft, bits 4, block GROUP, zero point 8, fp32 accuracy): W.qweight is declared
          [N, K/GROUP, GROUP/2] and W.scale [N * K/GROUP], the same bytes as the bundle stores.
  int4x8  Gemm(blockquant(x), dequantize(...)^T)   ->  MatMulNBits(x, ..., accuracy_level 4): the
          kernel quantizes x per block of GROUP itself (the block view of x is the Reshape whose
          output an Abs reads: the start of graphs/quant.int4x8_linear).

Everything else (the int8 weight-only form, the activation scaling around the matmul) stays as
exported; nodes left without consumers are removed. Lite converts the graph before this pass.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cogvlm2_lite.graphs.quant import GROUP, QWEIGHT, SCALE


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sources(name, producer, stop) -> set:
    """Graph inputs (names in `stop`) the tensor `name` is computed from."""
    seen, todo, found = set(), [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in stop:
            found.add(t)
        elif t in producer:
            todo.extend(i for i in producer[t].input if i)
    return found


def _is_plain_matmul(node) -> bool:
    a = _attrs(node)
    return (node.op_type == "MatMul" or (node.op_type == "Gemm" and len(node.input) == 2 and not a.get("transA", 0)
                                         and a.get("alpha", 1.0) == 1.0))


BLOCK_QUANT_OPS = {"Reshape", "Mul", "Clip", "Floor", "Add", "Div", "Max", "ReduceMax", "Abs", "Identity"}


def _block_quantized_source(a, producer, readers):
    """x if the tensor `a` is int4x8_linear's block-quantized x (the input of the Reshape an Abs
    reads), else None."""
    seen, todo = set(), [a]
    while todo:
        t = todo.pop()
        node = producer.get(t)
        if t in seen or node is None or node.op_type not in BLOCK_QUANT_OPS:
            continue
        seen.add(t)
        if node.op_type == "Reshape" and any(r.op_type == "Abs" for r in readers.get(t, ())):
            return node.input[0]
        todo.extend(i for i in node.input if i)
    return None


def rewrite_quantized_matmuls(model: onnx.ModelProto, int4: bool = True) -> dict:
    """Rewrite `model` in place; -> {"MatMulInteger": n, "MatMulNBits": n}. `int4`: also int4 (fp32 graphs)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inputs = {i.name: i for i in g.input}
    qweights = {n for n, i in inputs.items() if n.endswith(QWEIGHT)}
    out, counts, shapes = [], {"MatMulInteger": 0, "MatMulNBits": 0}, {}
    zp = "quant_zero_point_128"
    for node in g.node:
        if not _is_plain_matmul(node):
            out.append(node)
            continue
        a, b, y = node.input[0], node.input[1], node.output[0]
        trans_b = _attrs(node).get("transB", 0)
        cast = producer.get(b)
        if (cast is not None and cast.op_type == "Cast" and cast.input[0] in qweights and not trans_b
                and inputs[cast.input[0]].type.tensor_type.elem_type == TensorProto.INT8):
            n = f"{y}_int"
            out += [helper.make_node("Add", [a, "quant_128f"], [n + "_shift"]),
                    helper.make_node("Cast", [n + "_shift"], [n + "_u8"], to=TensorProto.UINT8),
                    helper.make_node("MatMulInteger", [n + "_u8", cast.input[0], zp], [n + "_i32"]),
                    helper.make_node("Cast", [n + "_i32"], [y], to=TensorProto.FLOAT)]
            counts["MatMulInteger"] += 1
            continue
        src = _sources(b, producer, inputs)
        q = [s for s in src if s in qweights]
        if (int4 and trans_b and len(q) == 1 and src == {q[0], q[0][:-len(QWEIGHT)] + SCALE}
                and inputs[q[0]].type.tensor_type.elem_type == TensorProto.UINT8):
            qw, sc = inputs[q[0]], inputs[q[0][:-len(QWEIGHT)] + SCALE]
            n_out, half = (d.dim_value for d in qw.type.tensor_type.shape.dim)
            k, blocks = 2 * half, 2 * half // GROUP
            qw.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.UINT8, [n_out, blocks, GROUP // 2]))
            sc.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, [n_out * blocks]))
            x = _block_quantized_source(a, producer, readers)
            if x:  # the exporter may have merged the reshapes of x: view it as [rows, K] again
                rows = f"quant_rows_{k}"
                if rows not in shapes:
                    shapes[rows] = numpy_helper.from_array(np.array([-1, k], np.int64), rows)
                out.append(helper.make_node("Reshape", [x, rows], [f"{y}_rows"]))
            out.append(helper.make_node("MatMulNBits", [f"{y}_rows" if x else a, qw.name, sc.name], [y],
                                        domain="com.microsoft", K=k, N=n_out, bits=4, block_size=GROUP,
                                        accuracy_level=4 if x else 0))
            counts["MatMulNBits"] += 1
            continue
        out.append(node)
    if counts["MatMulInteger"]:
        g.initializer.extend([numpy_helper.from_array(np.array(128, np.uint8), zp),
                              numpy_helper.from_array(np.array(128, np.float32), "quant_128f")])
    g.initializer.extend(shapes.values())
    del g.node[:]
    g.node.extend(_live(out, {o.name for o in g.output}))
    if counts["MatMulNBits"] and not any(o.domain == "com.microsoft" for o in model.opset_import):
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


def rewrite_file(path, int4: bool = True) -> dict:
    model = onnx.load(str(path))
    counts = rewrite_quantized_matmuls(model, int4)
    if any(counts.values()):
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return counts
