"""How long an export has left: its weights, then its graph traces.

The two phases have nothing in common to count, so each is estimated from its own measurements:
- **Weights** are a stream of bytes: those left at the rate the phase has converted so far, counting a few
  tensors converted up front (`probe_weights`) as its first. Counted in bytes read from the checkpoint (or
  drawn by --random-init): the work per byte read is about even, while per byte written it is 4-10 times
  larger for a 4-bit matrix than for an fp32 embedding (measured at full size).
- **A graph trace** reports nothing until it ends, and takes minutes at full size. Its time grows with the
  graph's layers, not with its widths (weights are shape-only placeholders): at full size, w4a8 ONNX, Intel
  Xeon AVX-512, decode_4096 took 9.2 s with 4 layers and 74 s with its 32 (8x 9.2 = 74), vision 8.9 s with 4
  layers and 33.5 s with 16. So one graph of each family (`family`) is traced up front with PROBE_LAYERS
  layers (`probe_graphs`, some 30 s for the 19B), and a graph's estimate is its family's probe times its
  layers / PROBE_LAYERS, and for graphs as large as the 19B's vision tower more (`estimate`): MindSpore's
  compile grows faster than the graph there (24 s with 16 layers, 278 s with its 63), which no short probe
  shows. Once graphs are traced, a family already seen is its mean, and one not yet seen is its estimate
  scaled by how long the traced graphs took against theirs (the machine's load now), and by the graph
  being traced once it runs over its own (it then shows a tenth of its time so far as left, not 0:00).
Both count down while the tensor or graph at hand is worked on (a tensor of the 19B takes up to 25 s: its
lm_head). Run3 of issue 33 (graphs traced first, no graph probe) showed no ETA for 8 minutes and then
2-2.7x too much, from a weights probe read under load; hence the weights first and the graph probe.
"""
import time
from pathlib import Path

GRAPH = "graph"    # the unit of a graph trace phase
BYTES = "B"        # the unit of the weights phase
PROBE_SHARE = 128   # the weights probe converts about 1/128 of the weights' bytes (full 19B: 0.6 GB, some 7 s)
PROBE_LAYERS = 4    # the layers of a probe trace (a 19B graph has 32, its vision tower 63)
# where MindSpore's compile stops growing with the layers alone: the 19B's vision graph (16802 ONNX nodes) took
# 278 s against 98 s at its 4-layer probe's time per layer (1.56 s), 2.8x = 1 + (16802 / 12500)^2; its 16-layer
# graph (4347 nodes) 23.7 s, 1.0x (Intel Xeon, AVX-512, unloaded)
COMPILE_NODES = 12500
OVERRUN_LEFT = 0.1  # a graph past its estimate is taken to be a tenth of its time so far from its end


def probe_weights(source, specs, convert) -> tuple[int, float]:
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
    """The graphs that cost the same per layer to trace: the vision tower's, the image prefill's, and the
    text graphs' (a prompt chunk's or a decode step's)."""
    return "vision" if graph == "vision" else "prefill_image" if graph.startswith("prefill_image") else "extend"


def layers(graph: str, cfg) -> int:
    """The layers of a graph's model: the vision tower's, or the language model's."""
    return cfg.vision.num_hidden_layers if family(graph) == "vision" else cfg.num_hidden_layers


def probe_graphs(plan, trace, out_dir: Path) -> dict[str, tuple[float, float | None]]:
    """Trace the first graph of each family of `plan` (export/trace.py Plan) with at most PROBE_LAYERS layers
    into out_dir (`trace(graph, plan, forms, out_dir)`, export/trace.py's trace_graph) -> {family: (seconds per
    layer, ONNX nodes per layer, or None without an ONNX graph)}."""
    import dataclasses
    cfg = plan.cfg
    cut = cfg.replace(num_hidden_layers=min(cfg.num_hidden_layers, PROBE_LAYERS),
                      vision=dataclasses.replace(cfg.vision, num_hidden_layers=min(cfg.vision.num_hidden_layers,
                                                                                   PROBE_LAYERS)))
    small = dataclasses.replace(plan, config=cut.to_hf(), tp=1)
    forms, per_layer = small.forms(), {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for graph in small.graphs():
        if family(graph.name) not in per_layer:
            t = time.perf_counter()
            trace(graph, small, forms, out_dir)
            n = layers(graph.name, cut)
            per_layer[family(graph.name)] = ((time.perf_counter() - t) / n, onnx_nodes(out_dir / f"{graph.name}.onnx") / n
                                             if (out_dir / f"{graph.name}.onnx").is_file() else None)
    return per_layer


def onnx_nodes(path: Path) -> int:
    import onnx
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def estimate(graph: str, cfg, probed: dict) -> float:
    """Seconds to trace `graph` of the model `cfg` from probe_graphs' figures: its layers at the probe's time per
    layer, times 1 + (nodes / COMPILE_NODES)^2 where the graph's ONNX node count is known (module docstring)."""
    per_layer, nodes_per_layer = probed[family(graph)]
    n = layers(graph, cfg)
    return per_layer * n * (1 + (nodes_per_layer * n / COMPILE_NODES) ** 2 if nodes_per_layer else 1)


class ExportEta:
    """(Progress) -> seconds the export has left (module docstring). graphs: [(name, seconds estimated)] of the
    GRAPH phases in order (one per graph, or one for all the graphs msrun's ranks trace); weight_bytes: the
    weights phase's total; probed: probe_weights()'s."""

    def __init__(self, graphs: list[tuple[str, float]], weight_bytes: int, probed: tuple[int, float]):
        self.graphs, self.weight_bytes = graphs, weight_bytes
        self.probe_bytes, self.probe_s = probed

    def weights_rate(self, weights=None) -> float:
        """Bytes per second of the weights phase: the probe's and the phase's own up to its last update."""
        n, s = (weights.n, weights.updated) if weights is not None else (0, 0.0)
        return (self.probe_bytes + n) / max(self.probe_s + s, 1e-9)

    def weights_left(self, progress) -> float:
        weights = next((p for p in progress.done + [progress.current] if p is not None and p.unit == BYTES), None)
        if weights is None:
            return self.weight_bytes / self.weights_rate()
        if weights is not progress.current:
            return 0.0
        at_update = (weights.total - weights.n) / self.weights_rate(weights)
        return max(0.0, at_update - (weights.elapsed - weights.updated))

    def graphs_left(self, progress) -> float:
        traced = [p.elapsed for p in progress.done if p.unit == GRAPH]
        current = progress.current.elapsed if progress.current is not None and progress.current.unit == GRAPH else None
        seen = {}
        for (name, _), s in zip(self.graphs, traced):
            seen.setdefault(family(name), []).append(s)
        took, estimated = sum(traced), sum(e for _, e in self.graphs[:len(traced)])
        load = took / estimated if traced else 1.0
        if current is not None and current > load * self.graphs[len(traced)][1]:   # running over: it says so too
            took, estimated = took + current, estimated + self.graphs[len(traced)][1]
            load = took / estimated
        left = [sum(seen[family(name)]) / len(seen[family(name)]) if family(name) in seen else load * estimate
                for name, estimate in self.graphs[len(traced):]]
        if left and current is not None:   # the graph being traced: what is left of it, never nothing while it runs
            left[0] = max(left[0] - current, OVERRUN_LEFT * current)
        return sum(left)

    def __call__(self, progress) -> float:
        return self.weights_left(progress) + self.graphs_left(progress)
