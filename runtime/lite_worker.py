"""MindSpore Lite worker: runs a bundle's Lite graphs in the Python that has `mindspore_lite`.

PyPI's only MindSpore Lite (2.0.0) is built for CPython 3.7, and Lite cannot share a process with
MindSpore 2.x (clashing libmindspore_core.so), so the `lite` backend runs this file as a child
process in that interpreter (`.venv-lite/bin/python lite_worker.py BUNDLE RANK`). This file uses only
the standard library, numpy and mindspore_lite, and Python 3.7 syntax; it never imports cogvlm2_lite.
It also converts ONNX to Lite MindIR for the exporter (`lite_worker.py --convert SRC.onnx DST_STEM`).

The weights of the rank are read once (safetensors read by hand: an 8-byte header length, a JSON
header, raw little-endian data) into one buffer, and every graph's weight inputs point into it
(MSTensor::SetData without ownership): weights are resident once, however many graphs. Each graph
also gets preallocated data-input buffers bound the same way, so a call reads the request straight
from the pipe into the tensors Lite reads.

Protocol on stdin/stdout, all little-endian:
  request   u32 len + JSON {"graph": name}, then each data input's raw bytes (shapes/dtypes fixed by
            the manifest, so nothing else is sent)
  reply     u32 len + JSON {"ok": true} then each output's raw bytes in manifest order, or
            u32 len + JSON {"ok": false, "error": text}
The first reply (after loading) is {"ok": true, "version": ..., "ms": load seconds}.
"""
import ctypes
import json
import os
import struct
import sys
import time

import numpy as np

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}
SUFFIX = ".lite.mindir"

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def bind(tensor, array):
    """Point a Lite input tensor at a numpy buffer (no copy, Lite does not own or free it)."""
    if tensor.data_size != array.nbytes:
        raise RuntimeError("input %s: Lite expects %d bytes, got %d (shape %s)"
                           % (tensor.name, tensor.data_size, array.nbytes, array.shape))
    tensor._tensor.set_data(_capsule_new(array.ctypes.data, None, None), False)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n).decode())
        data = np.fromfile(f, dtype=np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = data[a:b].view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def convert(src, dst_stem):
    import mindspore_lite as mslite
    mslite.Converter().convert(fmk_type=mslite.FmkType.ONNX, model_file=src, output_file=dst_stem)
    if not os.path.isfile(dst_stem + ".mindir"):
        raise RuntimeError("converter wrote no %s.mindir" % dst_stem)


def send(out, header, arrays=()):
    h = json.dumps(header).encode()
    out.write(struct.pack("<I", len(h)) + h)
    for a in arrays:
        out.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    out.flush()


def readexact(f, n):
    b = f.read(n)
    if len(b) != n:
        raise EOFError
    return b


class Worker:
    def __init__(self, bundle, rank, threads):
        import mindspore_lite as mslite
        self.version = getattr(mslite, "__version__", "?")
        m = json.load(open(os.path.join(bundle, "manifest.json")))
        rank_dir = os.path.join(bundle, m["ranks"][rank]["dir"])
        self.weights = {}
        for f in m["ranks"][rank]["weight_files"]:
            self.weights.update(read_safetensors(os.path.join(rank_dir, f)))
        context = mslite.Context()
        context.target = ["cpu"]
        context.cpu.thread_num = threads
        context.cpu.thread_affinity_mode = 0
        self.graphs = {}
        for name, g in m["graphs"].items():
            form = g["lite"]  # export/lite_export.py: how the file gets its weights
            if form["weights"] != "inputs":
                raise RuntimeError("%s: this worker binds weights as inputs, the bundle says %r"
                                   % (name, form["weights"]))
            model = mslite.Model()
            model.build_from_file(os.path.join(rank_dir, g["files"]["lite"]), mslite.ModelType.MINDIR, context)
            tensors = model.get_inputs()
            data = [np.empty(d["shape"], np.dtype(d["dtype"])) for d in g["inputs"]]
            by_name = dict(zip([d["name"] for d in g["inputs"]], data))
            by_name.update((n, self.weights[n]) for n in m["weights"][g["weights"]])
            for t in tensors:  # by name: inputs a graph never reads (e.g. the vision expert's weights in
                if t.name not in by_name:  # a text-only graph) were pruned before conversion
                    raise RuntimeError("%s: Lite graph input %s is not in the manifest" % (name, t.name))
                bind(t, by_name[t.name])
            outs = [(d["shape"], np.dtype(d["dtype"])) for d in g["outputs"]]
            self.graphs[name] = (model, tensors, data, outs)

    def run(self, name, inp):
        for a in self.graphs[name][2]:  # straight into the buffers the Lite tensors point at
            view = memoryview(a).cast("B")
            got = 0
            while got < a.nbytes:
                n = inp.readinto(view[got:])
                if not n:
                    raise EOFError
                got += n
        return self.run_bound(name)

    def run_bound(self, name):
        model, tensors, data, outs = self.graphs[name]
        results = model.predict(tensors)
        arrays = []
        for r, (shape, dtype) in zip(results, outs):
            a = np.array(r.get_data_to_numpy())  # a copy: the array Lite returns aliases a buffer it reuses
            if a.size != int(np.prod(shape)) or a.dtype != dtype:
                raise RuntimeError("%s output %s: got %s%s, expected %s%s" % (
                    name, r.name, a.dtype, list(a.shape), np.dtype(dtype).name, shape))
            arrays.append(a.reshape(shape))
        return arrays


def main():
    if sys.argv[1] == "--convert":
        convert(sys.argv[2], sys.argv[3])
        return
    bundle, rank, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the protocol pipe; Lite's own prints (fd 1) go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t = time.time()
    try:
        worker = Worker(bundle, rank, threads)
    except Exception as e:
        send(out, {"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
        return
    send(out, {"ok": True, "version": worker.version, "load_s": time.time() - t})
    while True:
        try:
            n = struct.unpack("<I", readexact(inp, 4))[0]
        except EOFError:
            return
        req = json.loads(readexact(inp, n).decode())
        try:
            arrays = worker.run(req["graph"], inp)
        except Exception as e:
            send(out, {"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
            continue
        send(out, {"ok": True}, arrays)


if __name__ == "__main__":
    main()
