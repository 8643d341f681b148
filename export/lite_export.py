"""Convert one ONNX graph to MindSpore Lite's MindIR (`<name>.lite.mindir`), for the `lite` backend.

Conversion runs `mindspore_lite.Converter` (FmkType.ONNX) in the Python that has MindSpore Lite (PyPI's
only Lite, 2.0.0, is CPython 3.7; build.sh puts it in .venv-lite): `runtime/lite_worker.py --convert`.
Graph inputs that the graph never reads (a text-only graph does not read the vision expert's weights)
are pruned first: Lite 2.0 converts such a graph but then fails to build it ("input ... not found in
graph"). The Lite worker binds inputs by name, so the pruned graph still takes the manifest's inputs.
"""
import subprocess
import tempfile
from pathlib import Path

import onnx

from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.lite_backend import WORKER, lite_python

SUFFIX = ".lite.mindir"


def check_lite_plan():
    if lite_python() is None:
        raise UserError("--format lite needs MindSpore Lite's converter: run `./build.sh setup` (creates .venv-lite "
                        "with mindspore-lite 2.0.0 on CPython 3.7) or set COGVLM2_LITE_PYTHON to a Python that has "
                        "mindspore_lite.")


def prune_unused_inputs(src: Path, dst: Path) -> list[str]:
    model = onnx.load(str(src))
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.input if i.name in used]
    dropped = [i.name for i in model.graph.input if i.name not in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(dst))
    return dropped


def convert_to_lite(onnx_path: Path, out: Path):
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pruned = Path(tmp) / onnx_path.name
        prune_unused_inputs(onnx_path, pruned)
        stem = Path(tmp) / "lite"
        p = subprocess.run([lite_python(), str(WORKER), "--convert", str(pruned), str(stem)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            errors = [ln for ln in (p.stdout + p.stderr).splitlines() if "ERROR" in ln or "Error" in ln]
            raise RuntimeError(f"MindSpore Lite could not convert {onnx_path.name}:\n" + "\n".join(errors[-15:]))
        Path(f"{stem}.mindir").replace(out)
