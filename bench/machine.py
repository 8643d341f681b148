"""What this machine can do, measured: the reference points a benchmark is judged against.

- `machine_info()`: CPU model, cores, RAM, load average, library versions.
- `memory_bandwidth()`: read bandwidth with ALL cores. One numpy thread reads well below what the
  memory system delivers (FINDINGS: ~23 GB/s single-threaded while onnxruntime's decode read at
  >= 28 GB/s), so several threads each sum their own array (numpy releases the GIL in reductions)
  and the best aggregate over thread counts is the machine's figure.
- `matmul_throughput()`: fp32 GEMM GFLOP/s through numpy's BLAS (multi-threaded).
- `gemv_chain()`: the matrix-vector products of one decode step (same shapes, same bytes) in plain
  numpy: what a BLAS implementation of decode reaches on this machine, the bar the graphs are
  compared with when they miss the roofline.

Runs in its own process (`python -m cogvlm2_lite.bench.machine SPEC.json`) so that its large
probe arrays neither count in the benchmark's peak RSS nor compete with the model's threads.
Needs numpy and psutil only: this module must not import MindSpore. psutil gives the process and
memory facts; the CPU model, its SIMD flags and cache sizes (which psutil does not) come from
/proc/cpuinfo and /sys.
"""
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import numpy as np
import psutil


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info() -> dict:
    """CPU model, SIMD flags, cores (all, usable by this process), RAM, caches, load, library versions."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    process = psutil.Process()
    usable = len(process.cpu_affinity()) if hasattr(process, "cpu_affinity") else psutil.cpu_count()
    caches = {}
    for idx in sorted(os.listdir("/sys/devices/system/cpu/cpu0/cache")) if os.path.isdir(
            "/sys/devices/system/cpu/cpu0/cache") else []:
        d = f"/sys/devices/system/cpu/cpu0/cache/{idx}"
        level, kind, size = _read(f"{d}/level").strip(), _read(f"{d}/type").strip(), _read(f"{d}/size").strip()
        if level and size:
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = size
    versions = {"python": platform.python_version()}
    for pkg in ("cogvlm2-lite", "mindspore", "numpy", "pillow", "onnxruntime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu_model": model,
        "logical_cores": psutil.cpu_count(),
        "usable_cores": usable,
        "ram_bytes": psutil.virtual_memory().total,
        "cpu_caches": caches,
        "simd": [f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16",
                             "amx_tile", "amx_int8", "neon", "asimd") if f in flags],
        "os": platform.platform(),
        "load_average": list(psutil.getloadavg()),
        "versions": versions,
    }


def cpu_counters() -> dict:
    """Machine-wide busy and total CPU seconds and this process tree's own CPU seconds: two readings
    give the share of the machine that OTHER processes used in between (a busy-machine warning)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t[:8])   # Linux: user .. steal (guest time is already inside user)
    own = sum(psutil.Process().cpu_times()[:4])   # user, system, children's user and system
    return {"busy_s": total - idle, "total_s": total, "own_s": own, "wall_s": time.time()}


def others_cpu_share(before: dict, after: dict) -> float | None:
    """Fraction of the machine's CPU time used by other processes between two `cpu_counters()`."""
    total = after["total_s"] - before["total_s"]
    if total <= 0:
        return None
    return max(0.0, min(1.0, (after["busy_s"] - before["busy_s"] - (after["own_s"] - before["own_s"])) / total))


def _timed(f, reps):
    f()  # warm-up: page faults, thread start-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def memory_bandwidth(total_bytes: int = 1 << 30, reps: int = 5, threads=None) -> dict:
    """Aggregate read bandwidth in bytes/s: `n` threads each reduce their own slice of `total_bytes`
    (well above the caches); the best n is the machine's figure. Several reductions are tried
    (np.sum, np.max): whichever streams fastest is the one limited by memory, not by arithmetic."""
    cores = os.cpu_count() or 1
    counts = sorted(set(threads or [1, cores, 2 * cores]))
    by_threads = {}
    for n in counts:
        per = max(total_bytes // n // 4, 1 << 16)
        arrays = [np.ones(per, np.float32) for _ in range(n)]  # written: pages really exist
        nbytes = per * 4 * n
        with ThreadPoolExecutor(n) as pool:
            best = 0.0
            for kernel in (np.sum, np.max):
                times = _timed(lambda: list(pool.map(kernel, arrays)), reps)
                best = max(best, nbytes / float(np.median(times)))
        by_threads[str(n)] = best
        arrays = None   # freed before the next thread count allocates
    best_n = max(by_threads, key=by_threads.get)
    return {"bytes_per_s": by_threads[best_n], "threads": int(best_n), "by_threads": by_threads,
            "single_thread_bytes_per_s": by_threads.get("1"), "bytes_per_thread_pass": total_bytes,
            "method": "numpy sum/max over disjoint float32 arrays, one per thread; median of reps, best of kernels"}


def matmul_throughput(shapes=((2048, 2048, 2048),), reps: int = 5) -> dict:
    """fp32 GEMM FLOP/s through numpy's BLAS with its default (all-core) threading; best over shapes."""
    rng = np.random.default_rng(0)
    by_shape = {}
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        times = _timed(lambda: a @ b, reps)
        by_shape[f"{m}x{k}x{n}"] = 2.0 * m * k * n / float(np.median(times))
    best = max(by_shape, key=by_shape.get)
    return {"flop_per_s": by_shape[best], "best_shape": best, "by_shape": by_shape,
            "method": "numpy float32 a @ b (BLAS, default threads); median of reps"}


def gemv_chain(shapes, reps: int = 5) -> dict:
    """One decode step's matrix-vector products in numpy: a vector through every [out, in] matrix of
    `shapes` (each x @ W.T, as the graphs do), with fresh fp32 matrices of the same shapes, as many as
    fit in a quarter of the free memory and 4 GiB (the 19B's would take 30 GB). -> s per pass."""
    rng = np.random.default_rng(0)
    budget = min(4 << 30, psutil.virtual_memory().available // 4)
    mats, used = [], 0
    for s in shapes:
        used += 4 * math.prod(s)
        if mats and used > budget:
            break
        mats.append(rng.standard_normal(tuple(s), np.float32))
    xs = {s[1]: rng.standard_normal((1, s[1]), np.float32) for s in shapes}
    nbytes = sum(m.nbytes for m in mats)

    def step():
        for m in mats:
            xs[m.shape[1]] @ m.T

    times = _timed(step, reps)
    med = float(np.median(times))
    return {"s_per_pass": med, "bytes": nbytes, "bytes_per_s": nbytes / med, "matrices": len(mats),
            "of_matrices": len(shapes),
            "method": "numpy float32 x[1,in] @ W[out,in].T for every decode weight matrix (BLAS gemv)"}


def probe_bytes(caches: dict) -> int:
    """Bytes read per bandwidth pass: at least 1 GiB and twice the last-level cache (max 4 GiB)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    llc = 0
    for size in caches.values():
        size = size.strip().upper()
        llc = max(llc, int(size[:-1]) * units[size[-1]] if size and size[-1] in units else int(size or 0))
    return min(max(1 << 30, 2 * llc), 4 << 30)


def probe(spec: dict) -> dict:
    """Everything a benchmark needs from the machine, sized by `spec` (see bench.py)."""
    out = {"machine": machine_info()}
    nbytes = spec.get("bandwidth_bytes") or probe_bytes(out["machine"]["cpu_caches"])
    out["memory_bandwidth"] = memory_bandwidth(nbytes, spec.get("reps", 5))
    if spec.get("bandwidth_only"):
        return out
    out["matmul"] = matmul_throughput([tuple(s) for s in spec.get("matmul_shapes", [(2048, 2048, 2048)])],
                                      spec.get("reps", 5))
    if spec.get("gemv_shapes"):
        out["gemv_chain"] = gemv_chain(spec["gemv_shapes"], spec.get("reps", 5))
    return out


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read()) if len(sys.argv) > 1 else {}
    json.dump(probe(spec), sys.stdout)
