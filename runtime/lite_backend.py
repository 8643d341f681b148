"""The `lite` backend: a bundle's Lite graphs (`<graph>.lite.mindir`, converted from the ONNX graphs at
export time by `--format lite`) run by MindSpore Lite.

Where `mindspore_lite` imports in this process (a current Lite release for Ascend, Python 3.9-3.11),
the graphs run in-process (`InProcess`, the mindspore_lite API: Context, Model.build_from_file,
weights bound once as zero-copy inputs; `ModelGroup(SHARE_WEIGHT)` is not needed because the
weights are graph inputs, shared by construction). Otherwise (PyPI's only Lite, 2.0.0, is built
for CPython 3.7) the graphs run in a child process in the interpreter that has Lite
(`lite_worker.py`, found through $COGVLM2_LITE_PYTHON or the `.venv-lite` that build.sh creates),
talking over a pipe: per call the data inputs go down and the outputs come back as raw bytes.
"""
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import UserError

WORKER = Path(__file__).with_name("lite_worker.py")
REPO = Path(__file__).resolve().parents[1]


def lite_python() -> str | None:
    """The interpreter that has mindspore_lite: $COGVLM2_LITE_PYTHON, else the repository's .venv-lite."""
    env = os.environ.get("COGVLM2_LITE_PYTHON")
    if env:
        return env if Path(env).is_file() else None
    p = REPO / ".venv-lite" / "bin" / "python"
    return str(p) if p.is_file() else None


def lite_in_process() -> bool:
    from importlib.util import find_spec
    try:
        return find_spec("mindspore_lite") is not None
    except (ImportError, ValueError):
        return False


def lite_available() -> bool:
    return lite_in_process() or lite_python() is not None


class LiteBackend:
    """Options: threads (Lite CPU threads; default the physical cores), in_process (None: when
    mindspore_lite imports here)."""
    name = "lite"
    format = "lite"

    def __init__(self, bundle: Bundle, rank: int = 0, threads: int | None = None, in_process: bool | None = None):
        bundle.require("lite", "MindSpore Lite", self.name)
        from .onnx_backend import physical_cores
        self.threads = threads or physical_cores()
        if in_process is None:
            in_process = lite_in_process()
        self._graphs = {name: bundle.graph(name) for name in bundle.graph_names}
        self._outs = {name: g.output_specs for name, g in self._graphs.items()}
        self._proc = None
        if in_process:
            sys.path.insert(0, str(WORKER.parent))
            try:
                import lite_worker
            finally:
                sys.path.pop(0)
            self._worker = lite_worker.Worker(str(bundle.path), rank, self.threads)
            self.version = self._worker.version
            return
        python = lite_python()
        if python is None:
            raise UserError("the lite backend needs MindSpore Lite: `./build.sh setup` creates .venv-lite (CPython 3.7 "
                            "with mindspore-lite 2.0.0), or set COGVLM2_LITE_PYTHON to a Python that has "
                            "mindspore_lite.")
        self._proc = subprocess.Popen([python, str(WORKER), str(bundle.path), str(rank), str(self.threads)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr = []
        drain = threading.Thread(target=self._drain, daemon=True)  # Lite logs must not fill the pipe
        drain.start()
        try:
            hello = self._reply()
        except RuntimeError:   # the worker died before it answered
            self._proc.wait(timeout=30)
            drain.join(timeout=5)
            hello = {"ok": False, "error": next((x.strip() for x in reversed(self._stderr) if x.strip()), "no output")}
        if not hello.get("ok"):
            self.close()
            error = hello.get("error") or "no reason given"
            if error.startswith(("ModuleNotFoundError", "ImportError")):   # its Python lacks what it imports
                raise UserError(f"the MindSpore Lite worker ({python}) cannot start ({error}): set COGVLM2_LITE_PYTHON "
                                "to a Python with mindspore_lite and numpy, or run ./build.sh setup (.venv-lite).")
            raise UserError(f"MindSpore Lite cannot load {bundle.path}: {error}: export the bundle "
                            "again with --format lite.")
        self.version = hello["version"]
        self.load_s = hello["load_s"]

    def _drain(self):
        for line in self._proc.stderr:
            self._stderr = (self._stderr + [line.decode(errors="replace")])[-50:]

    def _read(self, n: int) -> bytes:
        b = self._proc.stdout.read(n)
        if len(b) != n:
            raise RuntimeError("the MindSpore Lite worker died (exit "
                               f"{self._proc.poll()}): {''.join(self._stderr)[-2000:]}")
        return b

    def _reply(self) -> dict:
        n = struct.unpack("<I", self._read(4))[0]
        return json.loads(self._read(n))

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self._graphs[name].check_inputs(inputs)
        if self._proc is None:
            model, tensors, buffers, _ = self._worker.graphs[name]
            for b, x in zip(buffers, inputs):
                np.copyto(b, x)
            return self._worker.run_bound(name)
        h = json.dumps({"graph": name}).encode()
        w = self._proc.stdin
        w.write(struct.pack("<I", len(h)) + h)
        for x in inputs:
            w.write(memoryview(np.ascontiguousarray(x)).cast("B"))
        w.flush()
        reply = self._reply()
        if not reply.get("ok"):
            raise RuntimeError(f"MindSpore Lite failed to run {name}: {reply.get('error')}")
        results = []
        for _, dtype, shape in self._outs[name]:
            a = np.empty(shape, dtype)
            view = memoryview(a).cast("B")
            got = self._proc.stdout.readinto(view)
            while got < a.nbytes:
                more = self._proc.stdout.readinto(view[got:])
                if not more:
                    raise RuntimeError(f"the MindSpore Lite worker died: {''.join(self._stderr)[-2000:]}")
                got += more
            results.append(a)
        return results

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
