"""Timing and memory readings shared by every benchmark: repetitions, their statistics, RSS."""
import resource
import time

import numpy as np
import psutil


def stats(xs) -> dict:
    """Seconds (or any values) -> median, p90, p99, mean, min, max, n; {"n": 0} when empty."""
    a = np.asarray(list(xs), np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def repeat(fn, warmup: int, reps: int):
    """Call fn warmup times, then reps timed times -> (the timed reps' seconds, the very first call's seconds)."""
    first = None
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        first = first if first is not None else time.perf_counter() - t
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out, first if first is not None else out[0]


def _children() -> list:
    """Live child processes (the lite backend runs its graphs in one): their memory is the backend's too."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def rss_bytes() -> int:
    """Resident memory now of this process and its children (the lite backend's worker), bytes."""
    total = psutil.Process().memory_info().rss
    for c in _children():
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss_bytes() -> int:
    """Peak resident memory so far of this process (getrusage: Linux reports KiB, macOS bytes) and its live children."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(r if psutil.MACOS else r * 1024)
    for c in _children():  # live children: Linux's VmHWM (their peaks, summed: an upper bound of the joint peak)
        try:
            with open(f"/proc/{c.pid}/status") as f:
                peak += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            pass
    return peak


def minor_faults(fn, calls: int = 3) -> float:
    """Page faults per call of fn (first touches of memory the kernel has to map)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / calls
