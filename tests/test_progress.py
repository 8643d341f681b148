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


def test_export_eta_from_the_graphs_traced_and_the_weight_rate_measured():
    """4 graphs, 1000 bytes of weights, a probe of 100 bytes in 1 s (100 B/s)."""
    eta = ExportEta(["vision", "prefill_image_8", "extend_8_32", "decode_32"], 1000, (100, 1.0))
    assert eta(SimpleNamespace(done=[], current=phase(GRAPH, 30.0))) is None   # no graph traced: no estimate
    # vision took 40 s, no language graph is traced yet: each takes vision's time, the first 10 s in; then the
    # weights, 1000 B at 100 B/s
    progress = SimpleNamespace(done=[phase(GRAPH, 40.0)], current=phase(GRAPH, 10.0))
    assert eta(progress) == pytest.approx(30 + 40 + 40 + 10)
    # two language graphs took 10 and 20 s (mean 15); the last is 5 s in: 10 s of it left
    progress = SimpleNamespace(done=[phase(GRAPH, 40.0), phase(GRAPH, 10.0), phase(GRAPH, 20.0)],
                               current=phase(GRAPH, 5.0))
    assert eta(progress) == pytest.approx(10 + 10)
    progress.current = phase(GRAPH, 40.0)   # past its mean: nothing more of it is expected
    assert eta(progress) == pytest.approx(0 + 10)
    # weights: 300 of 1000 bytes in 5 s; with the probe, 400 B in 6 s: 700 B left at 66.7 B/s, 2 s of which
    # have gone into the tensor at hand since
    progress = SimpleNamespace(done=[phase(GRAPH, 10.0)] * 4, current=phase(BYTES, 7.0, n=300, total=1000, updated=5.0))
    assert eta(progress) == pytest.approx(700 / (400 / 6) - 2)
    progress.current.elapsed = 30.0   # the tensor took longer than its share: nothing is left to say
    assert eta(progress) == 0.0


def test_export_phases_off_a_terminal_through_bench_suite(tmp_path):
    """The tiny preset exported as bench-suite does (its stderr a pipe): the plan, a line per graph in the
    bundle's order, then the weights in bytes read (random init draws fp32), each once, no carriage return."""
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
    assert lines[1].startswith(f"  export: {len(graphs)} graphs to trace, then {len(specs)} tensors, {read}B read")
    for i, (line, name) in enumerate(zip(lines[2:], graphs), 1):
        assert re.fullmatch(rf"  graph {i}/{len(graphs)}: {name} \[\d\d:\d\d(, ~\d\d:\d\d left)?\]", line), line
    assert re.fullmatch(rf"  weights: {read}/{read} \[\d\d:\d\d, .*B/s, ~00:00 left\]", lines[2 + len(graphs)])
    assert len(lines) == 3 + len(graphs)


def test_a_failed_export_in_bench_suite_is_its_one_sentence(tmp_path):
    from cogvlm2_lite.bench.suite import cached_export
    from cogvlm2_lite.runtime.errors import UserError
    lines = []
    with pytest.raises(UserError, match=r"exporting .* failed: --random-init needs --tokenizer PATH") as e:
        cached_export(tmp_path / "b", {}, ["--random-init", "tiny"], lines.append)
    assert "error:" not in str(e.value) and not any("error" in line for line in lines)
