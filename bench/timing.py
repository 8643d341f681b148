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


def rss_bytes() -> int:
    """This process's resident memory now, bytes."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, bytes (getrusage: Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if psutil.MACOS else r * 1024)


def minor_faults(fn, calls: int = 3) -> float:
    """Page faults per call of fn (first touches of memory the kernel has to map)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / calls
