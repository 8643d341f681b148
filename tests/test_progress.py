"""Progress of long commands: phases in their own units, one line per phase off a terminal, and the export's ETA."""
import io
import re
from types import SimpleNamespace

import numpy as np
import pytest
from tqdm import tqdm

from cogvlm2_lite.export.eta import BYTES, GRAPH, ExportEta
from cogvlm2_lite.runtime.progress import Progress

from conftest import DEMO_TOKENIZER


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_phases(file):
    p = Progress(file=file, eta=lambda progress: 90.0)
    p.note("plan: two phases")
    with p.phase("graph 1/1: vision"):
        pass
    with p.phase("weights", total=2000, unit="B", unit_scale=True) as phase:
        phase.update(1500)
        phase.update(500)
    return p


def test_off_a_terminal_each_phase_is_one_line_without_carriage_returns():
    out = io.StringIO()
    p = run_phases(out)
    assert "\r" not in out.getvalue()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == "plan: two phases"
    assert re.fullmatch(r"graph 1/1: vision \[00:00, ~01:30 left\]", lines[1]), lines[1]
    assert re.fullmatch(r"weights: 2\.00k/2\.00k \[00:00, .*B/s, ~01:30 left\]", lines[2]), lines[2]
    assert [(q.desc, q.n, q.unit) for q in p.done] == [("graph 1/1: vision", 0, "it"), ("weights", 2000, "B")]


def test_on_a_terminal_phases_are_bars_left_on_screen():
    out = Terminal()
    run_phases(out)
    text = out.getvalue()
    assert "\r" in text and "100%|" in text and "2.00k/2.00k" in text and "~01:30 left" in text
    finals = [s for s in re.split(r"[\r\n]", text) if s.strip()]
    assert finals[-1].startswith("weights: 100%")


def test_without_a_command_eta_a_counted_phase_shows_its_own():
    out = io.StringIO()
    p = Progress(file=out)
    with p.phase("statistics", total=4, unit="prompt") as phase:
        phase.update(1)
        phase.start -= 3.0   # one prompt in 3 s: three more take 9 s
        assert phase.left() == pytest.approx(9.0, rel=0.01)
        phase.update(3)
    assert re.fullmatch(r"statistics: 4/4 \[00:03, +1\.33prompt/s, ~00:00 left\]\n", out.getvalue()), out.getvalue()


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    p = Progress(enabled=False, file=out)
    list(p.track([1, 2, 3], "samples"))
    p.note("plan")
    assert out.getvalue() == "" and p.done[0].n == 3


def phase(unit, elapsed, n=0, total=None, updated=0.0):
    return SimpleNamespace(unit=unit, elapsed=elapsed, n=n, total=total, updated=updated)


def test_export_eta_from_the_weight_rate_measured_then_the_graph_probes():
    """1000 bytes of weights, a probe of 100 bytes in 1 s (100 B/s); then 4 graphs estimated from the probe
    traces at 40, 20, 10 and 10 s (80 s)."""
    eta = ExportEta([("vision", 40.0), ("prefill_image_8", 20.0), ("extend_8_32", 10.0), ("decode_32", 10.0)],
                    1000, (100, 1.0))
    assert eta(SimpleNamespace(done=[], current=None)) == pytest.approx(1000 / 100 + 80)   # the plan line's
    # weights: 300 of 1000 bytes in 5 s; with the probe, 400 B in 6 s: 700 B left at 66.7 B/s, 2 s of which
    # have gone into the tensor at hand since; the graphs still at their estimates
    progress = SimpleNamespace(done=[], current=phase(BYTES, 7.0, n=300, total=1000, updated=5.0))
    assert eta(progress) == pytest.approx(700 / (400 / 6) - 2 + 80)
    progress.current.elapsed = 30.0   # the tensor took longer than its share: only the graphs are left
    assert eta(progress) == pytest.approx(80)
    weights = phase(BYTES, 12.0, n=1000, total=1000)
    # vision is 30 s into its 40
    assert eta(SimpleNamespace(done=[weights], current=phase(GRAPH, 30.0))) == pytest.approx(10 + 20 + 10 + 10)
    # vision is 120 s into its 40: the machine (or the graph's size) is 3x slower than the probe said, for the
    # graphs to come too; of vision itself a tenth of its 120 s is taken to be left
    assert eta(SimpleNamespace(done=[weights], current=phase(GRAPH, 120.0))) == pytest.approx(12 + 3 * (20 + 10 + 10))
    # vision took 80 s, twice its estimate: the machine is slower than at the probe, so are the graphs to come;
    # the image prefill is 5 s into its 2 x 20
    progress = SimpleNamespace(done=[weights, phase(GRAPH, 80.0)], current=phase(GRAPH, 5.0))
    assert eta(progress) == pytest.approx(35 + 20 + 20)
    # the prefill took 30 s: 110 s for 60 estimated, so each text graph 10 x 110 / 60; extend is 15 s in
    progress = SimpleNamespace(done=[weights, phase(GRAPH, 80.0), phase(GRAPH, 30.0)], current=phase(GRAPH, 15.0))
    assert eta(progress) == pytest.approx(2 * 110 / 60 * 10 - 15)
    # extend took 12 s: its family is seen, so the decode graph takes as long; it is 2 s in
    progress = SimpleNamespace(done=[weights, *[phase(GRAPH, 80.0), phase(GRAPH, 30.0), phase(GRAPH, 12.0)]],
                               current=phase(GRAPH, 2.0))
    assert eta(progress) == pytest.approx(12 - 2)


def test_probe_graphs_traces_one_short_graph_per_family(tmp_path):
    """The probe traces the first graph of each family with at most PROBE_LAYERS layers and says per layer."""
    from cogvlm2_lite.export.eta import PROBE_LAYERS, probe_graphs
    from cogvlm2_lite.export.trace import Plan
    from cogvlm2_lite.graphs.config import preset
    cfg = preset("bench")
    traced = []
    per_layer = probe_graphs(Plan(cfg.to_hf(), chunk_buckets=[8, 16], decode_buckets=[32, 64]),
                             lambda graph, plan, forms, out: traced.append((graph.name, plan.cfg)), tmp_path)
    assert [name for name, _ in traced] == ["vision", "prefill_image_8", "extend_8_32"]
    assert set(per_layer) == {"vision", "prefill_image", "extend"}
    assert all(s >= 0 and nodes is None for s, nodes in per_layer.values())   # the fake trace wrote no ONNX graph
    for _, c in traced:
        assert c.num_hidden_layers == min(PROBE_LAYERS, cfg.num_hidden_layers) == 4 and c.vision.num_hidden_layers == 4


def test_export_phases_off_a_terminal_through_bench_suite(tmp_path):
    """The tiny preset exported as bench-suite does (its stderr a pipe): the plan, the weights in bytes read
    (random init draws fp32), then a line per graph in the bundle's order, each once, no carriage return."""
    from cogvlm2_lite.bench.suite import cached_export
    from cogvlm2_lite.graphs.config import preset
    from cogvlm2_lite.graphs.model import weight_specs
    from cogvlm2_lite.runtime.bundle import Bundle
    lines = []
    out = cached_export(tmp_path / "b", {}, ["--random-init", "tiny", "--tokenizer", str(DEMO_TOKENIZER),
                                              "--buckets", "chunk=8;decode=32", "--format", "onnx"], lines.append)
    graphs = list(Bundle(out).manifest["graphs"])
    assert not any("\r" in line for line in lines)
    assert lines[0] == f"exporting {out} ..."
    specs = weight_specs(preset("tiny"))
    read = tqdm.format_sizeof(sum(int(np.prod(s.shape)) * 4 for s in specs))
    assert re.fullmatch(rf"  export: {len(specs)} tensors, {read}B read and .*B written \(~\d\d:\d\d\), then "
                        rf"{len(graphs)} graphs to trace \(~\d\d:\d\d\)", lines[1]), lines[1]
    assert re.fullmatch(rf"  weights: {read}/{read} \[\d\d:\d\d, .*B/s, ~\d\d:\d\d left\]", lines[2]), lines[2]
    for i, (line, name) in enumerate(zip(lines[3:], graphs), 1):
        assert re.fullmatch(rf"  graph {i}/{len(graphs)}: {name} \[\d\d:\d\d, ~\d\d:\d\d left\]", line), line
    assert lines[-1].endswith("~00:00 left]")
    assert len(lines) == 3 + len(graphs)


def test_a_failed_export_in_bench_suite_is_its_one_sentence(tmp_path):
    from cogvlm2_lite.bench.suite import cached_export
    from cogvlm2_lite.runtime.errors import UserError
    lines = []
    with pytest.raises(UserError, match=r"exporting .* failed: --random-init needs --tokenizer PATH") as e:
        cached_export(tmp_path / "b", {}, ["--random-init", "tiny"], lines.append)
    assert "error:" not in str(e.value) and not any("error" in line for line in lines)


def test_a_graph_estimate_grows_with_its_layers_and_beyond_for_the_largest():
    """Linear in the layers at the probe's time per layer; MindSpore's compile adds (nodes / COMPILE_NODES)^2 of
    that where the ONNX node count is known (the 19B's vision graph: 2.8x)."""
    from cogvlm2_lite.export.eta import COMPILE_NODES, estimate
    from cogvlm2_lite.graphs.config import preset
    cfg = preset("full")
    probed = {"vision": (1.5, 266.0), "prefill_image": (2.0, 146.0), "extend": (2.5, None)}
    assert estimate("decode_4096", cfg, probed) == pytest.approx(2.5 * 32)
    assert estimate("prefill_image_64", cfg, probed) == pytest.approx(2.0 * 32 * (1 + (146 * 32 / COMPILE_NODES) ** 2))
    assert estimate("vision", cfg, probed) / (1.5 * 63) == pytest.approx(1 + (266 * 63 / COMPILE_NODES) ** 2)
    assert 2.5 < estimate("vision", cfg, probed) / (1.5 * 63) < 3.2
