"""Convert one ONNX graph to MindSpore Lite's MindIR (`<name>.lite.mindir`), for the `lite` backend.

Conversion runs `mindspore_lite.Converter` (FmkType.ONNX) in the Python that has MindSpore Lite (PyPI's
only Lite, 2.0.0, is CPython 3.7; build.sh puts it in .venv-lite): `runtime/lite_worker.py --convert`.
Graph inputs that the graph never reads (a text-only graph does not read the vision expert's weights)
are pruned first: Lite 2.0 converts such a graph but then fails to build it ("input ... not found in
graph"). The Lite worker binds inputs by name, so the pruned graph still takes the manifest's inputs.

Weights stay graph inputs (one resident copy for every graph), and Lite 2.0's CPU MatMul packs a weight
that is not a constant on every call: `x @ W^T` (Gemm transB=1, x one row) packs all of W per token, which
made decode ~3x slower than with weights baked in as constants. Its one no-pack path is a matrix-vector
product whose *vector is the second operand* (B with one column): there A is read as it lies, row by row.
So in graphs whose linear layers see one row (decode at batch 1: `LINEAR_GEMV`), each `Gemm(x, W, transB=1)`
becomes `reshape(W @ reshape(x, [in, 1]), [1, out])` — the same weight input, the same bytes, no pack —
which runs as fast as baked constants without a second copy of the weights (docs/lite.md, measured). With
several rows (prefill chunks, vision, decode at batch > 1) Lite packs either way; they keep the Gemm.
The manifest records per graph which form its Lite file has (`graphs.<name>.lite`, `lite_form`).
"""
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.lite_backend import WORKER, lite_python

from .onnx_graph import OnnxGraph

SUFFIX = ".lite.mindir"
LINEAR_GEMM = "gemm"  # x @ W^T as exported (Lite packs W per call; fine when many rows share the pack)
LINEAR_GEMV = "weight-first-matvec"  # W @ x^T: Lite's no-pack matrix-vector path, for one-row graphs


def lite_form(graph_name: str, batch: int) -> dict:
    """How the Lite file of a graph gets and uses its weights (written to the manifest)."""
    gemv = graph_name.startswith("decode") and batch == 1
    return {"weights": "inputs", "linear": LINEAR_GEMV if gemv else LINEAR_GEMM}


def check_lite_plan(dtype: str):
    """Refuse, before any work, what the Lite path cannot build. Raises UserError."""
    if dtype != "fp32":
        raise UserError(f"--format lite is fp32 only, not --dtype {dtype}: Lite 2.0's converter makes fp16 graph "
                        "inputs fp32, so the bundle's fp16 weights would not bind (measured). Use --dtype fp32, or "
                        "--format onnx for fp16.")
    if lite_python() is None:
        raise UserError("--format lite needs MindSpore Lite's converter: run `./build.sh setup` (creates .venv-lite "
                        "with mindspore-lite 2.0.0 on CPython 3.7) or set COGVLM2_LITE_PYTHON to a Python that has "
                        "mindspore_lite.")


def prune_unused_inputs(model: onnx.ModelProto) -> list[str]:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.input if i.name in used]
    dropped = [i.name for i in model.graph.input if i.name not in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return dropped


def weight_first_matvec(model: onnx.ModelProto) -> int:
    """Rewrite each one-row `Gemm(x, W, transB=1)` whose W is a graph input as `W @ x^T` (module docstring).
    Returns how many were rewritten."""
    G = OnnxGraph(model, shapes=True)
    g, shapes, inputs = G.g, G.shapes, G.inputs
    nodes, done = [], 0
    for n in g.node:
        attrs = OnnxGraph.attrs(n)
        x_shape = shapes.get(n.input[0]) if n.op_type == "Gemm" else None
        if (n.op_type != "Gemm" or len(n.input) != 2 or n.input[1] not in inputs or attrs.get("transA", 0)
                or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 or x_shape is None
                or len(x_shape) != 2 or x_shape[0] != 1):
            nodes.append(n)
            continue
        out_dim, in_dim = shapes[n.input[1]]
        col, to_col, to_row, y_col = (f"{n.name}/{s}" for s in ("x_col", "shape_col", "shape_row", "y_col"))
        G.add_const(to_col, np.array([in_dim, 1], np.int64))
        G.add_const(to_row, np.array([1, out_dim], np.int64))
        nodes += [helper.make_node("Reshape", [n.input[0], to_col], [col], name=f"{n.name}/reshape_x"),
                  helper.make_node("MatMul", [n.input[1], col], [y_col], name=n.name),
                  helper.make_node("Reshape", [y_col, to_row], [n.output[0]], name=f"{n.name}/reshape_y")]
        done += 1
    del g.node[:]
    g.node.extend(nodes)
    return done


def rewrite_for_lite(src: Path, dst: Path, form: dict):
    model = onnx.load(str(src))
    prune_unused_inputs(model)
    if form["linear"] == LINEAR_GEMV and not weight_first_matvec(model):
        raise RuntimeError(f"{src.name}: no one-row Gemm on a weight input to rewrite as W @ x^T")
    onnx.save(model, str(dst))


def convert_to_lite(onnx_path: Path, out: Path, form: dict):
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        rewritten = Path(tmp) / onnx_path.name
        rewrite_for_lite(onnx_path, rewritten, form)
        stem = Path(tmp) / "lite"
        p = subprocess.run([lite_python(), str(WORKER), "--convert", str(rewritten), str(stem)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            errors = [ln for ln in (p.stdout + p.stderr).splitlines() if "ERROR" in ln or "Error" in ln]
            raise RuntimeError(f"MindSpore Lite could not convert {onnx_path.name}:\n" + "\n".join(errors[-15:]))
        Path(f"{stem}.mindir").replace(out)
