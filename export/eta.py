"""How long an export has left: its graph traces, then its weights.

The two phases have nothing in common to count: a graph trace takes minutes and reports nothing until
it ends, the weights are a stream of bytes. So each is estimated from its own measurements: the graphs
left at the mean time of the graphs traced so far (unknown until the first ends), the weights' bytes
left at the rate measured converting them, which before the weights phase comes from converting one
tensor up front (`probe`), and within it counts that tensor as its first. Both count down while the
graph or tensor at hand is worked on (a tensor of the 19B takes up to 25 s: its lm_head). Weights are counted in the
bytes read from the checkpoint (or drawn by --random-init): the work per byte read is about even, while
per byte written it is 4-10 times larger for a 4-bit matrix than for an fp32 embedding (measured at full size).
"""
import time

import numpy as np

GRAPH = "graph"    # the unit of a graph trace phase
BYTES = "B"        # the unit of the weights phase
PROBE_SHARE = 64   # the probe converts the largest tensor of at most 1/64 of the weights' bytes


def probe(source, specs, convert) -> tuple[int, float]:
    """Convert one typical tensor (`convert(spec, array)`), discarding the result -> (bytes read, seconds)."""
    total = sum(source.nbytes(s) for s in specs)
    spec = max((s for s in specs if source.nbytes(s) <= total / PROBE_SHARE), key=source.nbytes, default=specs[0])
    t = time.perf_counter()
    convert(spec, source.read(spec, ()))
    return source.nbytes(spec), time.perf_counter() - t


class ExportEta:
    """(Progress) -> seconds the export has left, or None while no graph has been traced (module docstring).
    n_graphs: graph traces counted in GRAPH phases; weight_bytes: the weights phase's total; probed: probe()'s."""

    def __init__(self, n_graphs: int, weight_bytes: int, probed: tuple[int, float]):
        self.n_graphs, self.weight_bytes = n_graphs, weight_bytes
        self.probe_bytes, self.probe_s = probed

    def weights_rate(self, weights=None) -> float:
        """Bytes per second of the weights phase: the probe's and the phase's own up to its last update."""
        n, s = (weights.n, weights.updated) if weights is not None else (0, 0.0)
        return (self.probe_bytes + n) / max(self.probe_s + s, 1e-9)

    def __call__(self, progress) -> float | None:
        phases = progress.done + ([progress.current] if progress.current else [])
        weights = next((p for p in phases if p.unit == BYTES), None)
        if weights is not None:
            at_update = (weights.total - weights.n) / self.weights_rate(weights)
            return max(0.0, at_update - (weights.elapsed - weights.updated))
        traced = [p.elapsed for p in progress.done if p.unit == GRAPH]
        if not traced:
            return None
        mean = float(np.mean(traced))
        left = (self.n_graphs - len(traced)) * mean
        current = progress.current
        if current is not None and current.unit == GRAPH:   # the graph being traced: what its mean leaves of it
            left -= min(current.elapsed, mean)
        return left + self.weight_bytes / self.weights_rate()
