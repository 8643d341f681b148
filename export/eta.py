"""How long an export has left: its graph traces, then its weights.

The two phases have nothing in common to count: a graph trace takes minutes and reports nothing until
it ends, the weights are a stream of bytes. So each is estimated from its own measurements: each graph
left at the mean time of the graphs of its family traced so far (the vision tower's graph takes twice a
language graph's time at full size; all graphs traced stand in for a family not yet seen; unknown until
the first ends), the weights' bytes left at the rate measured converting them, which before the weights
phase comes from converting a few tensors up front (`probe`), and within it counts those as its first. Both count down while the
graph or tensor at hand is worked on (a tensor of the 19B takes up to 25 s: its lm_head). Weights are counted in the
bytes read from the checkpoint (or drawn by --random-init): the work per byte read is about even, while
per byte written it is 4-10 times larger for a 4-bit matrix than for an fp32 embedding (measured at full size).
"""
import time

import numpy as np

GRAPH = "graph"    # the unit of a graph trace phase
BYTES = "B"        # the unit of the weights phase
PROBE_SHARE = 128   # the probe converts about 1/128 of the weights' bytes (full 19B: 0.6 GB, some 7 s)


def probe(source, specs, convert) -> tuple[int, float]:
    """Convert typical tensors (`convert(spec, array)`), discarding the results -> (bytes read, seconds): the
    largest tensors of at most 2/PROBE_SHARE of the bytes each (the matrices), until 1/PROBE_SHARE is read."""
    total = sum(source.nbytes(s) for s in specs)
    typical = sorted((s for s in specs if source.nbytes(s) <= 2 * total / PROBE_SHARE), key=source.nbytes,
                     reverse=True) or specs[:1]
    read, t = 0, time.perf_counter()
    for spec in typical:
        convert(spec, source.read(spec, ()))
        read += source.nbytes(spec)
        if read >= total / PROBE_SHARE:
            break
    return read, time.perf_counter() - t


def family(graph: str) -> str:
    """The graphs that take about the same time to trace: the vision tower's, and the language model's."""
    return "vision" if graph == "vision" else "language"


class ExportEta:
    """(Progress) -> seconds the export has left, or None while no graph has been traced (module docstring).
    graphs: the names of the graphs traced as GRAPH phases, in order; weight_bytes: the weights phase's total;
    probed: probe()'s."""

    def __init__(self, graphs: list[str], weight_bytes: int, probed: tuple[int, float]):
        self.graphs, self.weight_bytes = graphs, weight_bytes
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
        times = {}
        for name, s in zip(self.graphs, traced):
            times.setdefault(family(name), []).append(s)
        guess = [float(np.mean(times.get(family(name), traced))) for name in self.graphs[len(traced):]]
        current = progress.current
        if guess and current is not None and current.unit == GRAPH:   # the graph being traced: what is left of it
            guess[0] -= min(current.elapsed, guess[0])
        return sum(guess) + self.weight_bytes / self.weights_rate()
