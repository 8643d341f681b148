"""Where a graph call's time goes: MindSpore's or onnxruntime's own profiler over repeated calls, read back per op.

Also the bare GraphCell call, to split the backend adapter's cost (wrapping inputs, asnumpy) from
the graph's, and a recorder of the last graph call a runtime method made (to replay it alone).
"""
import csv
import json
import math
import tempfile
import time
from pathlib import Path


def mindspore_cell_call(backend, name, inputs):
    """A zero-argument call of the bare GraphCell with pre-wrapped inputs (MindSpore only), to split the
    backend adapter's cost (wrapping inputs, asnumpy) from the graph's. None where not applicable."""
    graphs, weights = getattr(backend, "_graphs", None), getattr(backend, "_weights", None)
    if getattr(backend, "name", "") != "mindspore" or not graphs or name not in graphs:
        return None
    import mindspore as ms
    cell, info = graphs[name]
    args = [ms.Tensor.from_numpy(x) for x in inputs] + list(weights[info.weights])
    return lambda: cell(*args)


class Recorder:
    """Wraps backend.run to keep the last call's graph name, inputs and outputs."""

    def __init__(self, backend):
        self.backend, self.run = backend, backend.run
        self.last = None

    def __enter__(self):
        def run(name, inputs):
            out = self.run(name, inputs)
            self.last = (name, list(inputs), out)
            return out
        self.backend.run = run
        return self

    def __exit__(self, *exc):
        del self.backend.run   # back to the class method


def profile_mindspore(fn, steps: int) -> dict:
    """Per-op timing of `steps` calls of fn with MindSpore's profiler (CPU op timestamps): ms per call by
    op type, the top ops, and how much of the kernels' time was above each op's own best occurrence."""
    import mindspore as ms
    with tempfile.TemporaryDirectory(prefix="ms-profile-") as d:
        prof = ms.Profiler(output_path=d, activities=[ms.profiler.ProfilerActivity.CPU])
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t) / steps
        prof.analyse()
        by_type, top, shapes = {}, [], {}
        for f in Path(d).rglob("cpu_framework_*.txt"):
            for line in f.read_text().splitlines():
                parts = line.split(";")
                if len(parts) > 3:
                    shapes[parts[1]] = [p.split(":", 1)[1] for p in parts[3:] if p.startswith("input_")]
        for f in Path(d).rglob("cpu_op_type_info_*.csv"):
            for row in csv.DictReader(f.open()):
                by_type[row["op_type"]] = {"ms_per_step": float(row["total_compute_time"]) / steps,
                                           "ops_per_step": int(row["type_occurrences"]) / steps}
        # every occurrence of every op: how much time ops spent above their own best occurrence (a kernel
        # that is fast once and slow another time waited: for a core, a thread-pool wake-up, memory)
        excess = {"gemm": 0.0, "other": 0.0}
        best = {"gemm": 0.0, "other": 0.0}
        for f in Path(d).rglob("cpu_op_execute_timestamp_*.txt"):
            for line in f.read_text().splitlines():
                head, _, body = line.partition(";HostCpuOps;")
                durs = [float(x.split(",")[1]) for x in body.split() if x.count(",") >= 1]
                if not durs:
                    continue
                kind = "gemm" if "MatMul" in head.rsplit("/", 1)[-1] else "other"
                excess[kind] += (sum(durs) - min(durs) * len(durs)) / steps
                best[kind] += min(durs) * len(durs) / steps
        matmul_bytes = matmul_ms = 0.0
        for f in Path(d).rglob("cpu_op_detail_info_*.csv"):
            for row in csv.DictReader(f.open()):
                name, ms_step = row["op_name"], float(row["op_total_time(ms)"]) / steps
                top.append({"op": name, "type": row["op_type"], "ms_per_step": ms_step, "inputs": shapes.get(name)})
                if row["op_type"] == "MatMul" and name in shapes and len(shapes[name]) > 1:
                    dims = json.loads(shapes[name][1]) if shapes[name][1].startswith("[") else []
                    if len(dims) == 2:
                        matmul_bytes += math.prod(dims)
                        matmul_ms += ms_step
    if not by_type:
        return {"error": "the profiler wrote no CPU op data"}
    top.sort(key=lambda r: -r["ms_per_step"])
    kernel_ms = sum(v["ms_per_step"] for v in by_type.values())
    return {"profiler": "MindSpore", "steps": steps, "wall_ms_per_step_profiled": wall * 1e3, "kernel_ms_per_step": kernel_ms,
            "ops_per_step": sum(v["ops_per_step"] for v in by_type.values()),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["ms_per_step"])),
            "top_ops": top[:8], "matmul_ops": ["MatMul"], "matmul_weight_elements": matmul_bytes, "matmul_weight_ms_per_step": matmul_ms,
            "best_case_ms_per_step": best, "excess_over_best_ms_per_step": excess}


def profile_onnxruntime(backend, name: str, inputs, steps: int) -> dict:
    """Per-op timing of `steps` calls of graph `name` with onnxruntime's profiler (a second session of the
    graph, runtime/onnx_backend.py `profile`): ms per call by op type and the top nodes, as profile_mindspore."""
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as d:
        wall, trace = backend.profile(name, inputs, steps, str(Path(d) / "ort"))
        events = json.loads(Path(trace).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") or 1
    ms, count, nodes = {}, {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        ms[op] = ms.get(op, 0.0) + e["dur"] / 1e3 / runs
        count[op] = count.get(op, 0) + 1
        node = nodes.setdefault(e["name"][:-len("_kernel_time")], {"type": op, "ms_per_step": 0.0})
        node["ms_per_step"] += e["dur"] / 1e3 / runs
    by_type = {op: {"ms_per_step": ms[op], "ops_per_step": count[op] / runs} for op in ms}
    if not by_type:
        return {"error": "the profiler wrote no node data"}
    top = sorted(({"op": k, **v} for k, v in nodes.items()), key=lambda r: -r["ms_per_step"])
    return {"profiler": "onnxruntime", "steps": steps, "wall_ms_per_step_profiled": wall * 1e3,
            "kernel_ms_per_step": sum(v["ms_per_step"] for v in by_type.values()),
            "ops_per_step": sum(v["ops_per_step"] for v in by_type.values()),
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["ms_per_step"])), "top_ops": top[:8],
            "matmul_ops": sorted(t for t in by_type if "MatMul" in t or t == "Gemm")}
