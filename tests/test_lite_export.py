"""Issue 19: Lite's decode graphs compute `x @ W^T` as `W @ x^T` (export/lite_export.py), so Lite 2.0's CPU
MatMul reads the weight input without packing it per call. The rewrite is checked here with onnx's own
reference evaluator (no Lite needed); tests/test_lite.py checks the converted graphs against MindIR."""
import numpy as np
import onnx
from onnx import TensorProto as TP, helper
from onnx.reference import ReferenceEvaluator

from cogvlm2_lite.export.lite_export import LINEAR_GEMM, LINEAR_GEMV, lite_form, weight_first_matvec


def _linear_model(rows: int, out_dim=6, in_dim=4, weight_is_input=True):
    w_info = helper.make_tensor_value_info("w", TP.FLOAT, [out_dim, in_dim])
    inits = [] if weight_is_input else [onnx.numpy_helper.from_array(np.ones((out_dim, in_dim), np.float32), "w")]
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu"),
                           helper.make_node("Gemm", ["h", "w"], ["y"], name="proj", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [rows, in_dim])] + ([w_info] if weight_is_input else []),
                          [helper.make_tensor_value_info("y", TP.FLOAT, [rows, out_dim])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_one_row_gemm_becomes_weight_first_matvec_with_the_same_answer():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 4), np.float32), rng.standard_normal((6, 4), np.float32)
    model = _linear_model(1)
    want = ReferenceEvaluator(model).run(None, {"x": x, "w": w})[0]
    assert weight_first_matvec(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Reshape", "MatMul", "Reshape"]
    matmul = model.graph.node[2]
    assert matmul.input[0] == "w"  # the weight input as it is (same name, shape and bytes), first operand
    assert [i.name for i in model.graph.input] == ["x", "w"]
    got = ReferenceEvaluator(model).run(None, {"x": x, "w": w})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_many_rows_or_constant_weights_keep_the_gemm():
    for model in (_linear_model(3), _linear_model(1, weight_is_input=False)):
        assert weight_first_matvec(model) == 0
        assert [n.op_type for n in model.graph.node] == ["Relu", "Gemm"]


def test_only_one_row_decode_graphs_get_the_matvec_form():
    assert lite_form("decode_256", 1) == {"weights": "inputs", "linear": LINEAR_GEMV}
    assert lite_form("decode_256", 4)["linear"] == LINEAR_GEMM
    for name in ("vision", "prefill_image_16", "extend_64_256"):
        assert lite_form(name, 1) == {"weights": "inputs", "linear": LINEAR_GEMM}
