"""Smoke test of `cogvlm2-lite bench`: a tiny bundle, one or two repetitions. Benchmarks are not tests:
this checks that every section of the report is there and that its values are sane (positive, ordered,
fractions in [0, 1], byte counts exact), never how fast anything is."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cogvlm2_lite.bench.costs import model_costs
from cogvlm2_lite.bench.report import SCHEMA, compare
from cogvlm2_lite.bench.timing import stats
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--reps", "2", "--warmup", "1", "--decode-reps", "2", "--gen-tokens", "3", "--gen-reps", "1",
         "--eager-steps", "1", "--quick"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from cogvlm2_lite.export.bundle import export_bundle
    from cogvlm2_lite.graphs.config import preset
    out = tmp_path_factory.mktemp("bench") / "tiny"
    export_bundle(out, random_init=preset("tiny"), tokenizer=ROOT / "demo" / "assets" / "tokenizer.model",
                  progress=False)
    return out


@pytest.fixture(scope="module")
def smoke(tiny_bundle, tmp_path_factory):
    """One CLI run writing JSON + PNG and comparing with an (older, partial) report."""
    d = tmp_path_factory.mktemp("bench-out")
    old = d / "old.json"
    old.write_text(json.dumps({"summary": {"mindspore": {"load_s": 1.0, "tpot_s": {"256": 0.001}}},
                               "reference": {"memory_bandwidth": {"bytes_per_s": 1e10},
                                             "matmul": {"flop_per_s": 1e11}}}))
    r = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--json", str(d / "r.json"), "--plot", str(d / "r.png"),
                                  "--compare", str(old), *SMOKE])
    assert r.exit_code == 0, r.output
    return json.loads((d / "r.json").read_text()), d / "r.png", r.output


def expected_costs():
    # tiny preset: hidden 64, 2 layers, 8 heads / 2 kv heads (head_dim 8), intermediate 96, vocab 1024
    h, layers, kv_dim, inter, vocab = 64, 2, 2 * 8, 96, 1024
    per_layer = (h + 2 * kv_dim) * h + h * h + 3 * inter * h + 2 * h   # language qkv, dense, MLP, 2 norms
    weights = 4 * (layers * per_layer + h + vocab * h + h)             # + final norm, lm_head, one embedding row
    kv_256 = 4 * 2 * layers * 1 * 2 * 256 * 8                          # K and V, 2 kv heads, 256 slots, head_dim 8
    return weights, kv_256


def check_stats(st, what):
    assert st["n"] >= 1, what
    assert 0 < st["min"] <= st["median"] <= st["p90"] <= st["p99"] <= st["max"], (what, st)


def test_report_has_every_section_with_sane_values(smoke):
    rep, _, _ = smoke
    for key in ("schema", "created", "bundle", "settings", "machine", "reference", "backends", "eager", "summary",
                "targets"):
        assert key in rep, key
    assert rep["schema"] == SCHEMA
    m = rep["machine"]
    assert m["cpu_model"] and m["usable_cores"] >= 1 and m["ram_bytes"] > 0 and "mindspore" in m["versions"]

    ref = rep["reference"]
    weights, kv_256 = expected_costs()
    assert ref["decode_weight_bytes"] == weights
    assert ref["kv_read_bytes"] == {"256": kv_256}
    assert ref["memory_bandwidth"]["bytes_per_s"] > 0 and ref["memory_bandwidth"]["threads"] >= 1
    assert ref["matmul"]["flop_per_s"] > 0
    assert ref["gemv_chain"]["bytes_per_s"] > 0 and ref["gemv_chain"]["matrices"] == 2 * 5 + 1

    ms = rep["backends"]["mindspore"]
    for key in ("load", "preprocess", "vision", "ttft", "prefill", "decode", "generate", "memory", "profile"):
        assert key in ms, key
    assert ms["load"]["load_s"] > 0
    check_stats(ms["preprocess"]["bundle_size"]["s"], "preprocess")
    assert ms["preprocess"]["bundle_size"]["size"] == 56 and ms["preprocess"]["size_1344"]["size"] == 1344
    check_stats(ms["preprocess"]["size_1344"]["s"], "preprocess 1344")
    check_stats(ms["vision"]["s"], "vision")
    buckets = rep["bundle"]["buckets"]
    n_image = rep["bundle"]["num_image_tokens"]
    t = ms["ttft"]
    check_stats(t["s"], "ttft")
    assert set(t["breakdown"]) == {"tokenize", "preprocess", "vision", "prefill", "first_sample"}
    assert sum(v["mean"] for v in t["breakdown"].values()) == pytest.approx(t["s"]["mean"], rel=1e-6)
    tt = ms["ttft_text"]
    check_stats(tt["s"], "text ttft")
    assert set(tt["breakdown"]) == {"tokenize", "prefill", "first_sample"}
    assert tt["prompt_tokens"] == t["prompt_tokens"] - n_image   # the same question without the image slots

    assert [(p["kind"], p["bucket"]) for p in ms["prefill"]] == \
        [("prefill_image", c) for c in buckets["chunk"]] + [("extend", c) for c in buckets["chunk"]]
    for p in ms["prefill"]:
        check_stats(p["s"], p["kind"])
        assert p["tokens_per_s"] > 0 and p["flops"] > 0 and 0 < p["peak_fraction"] <= 1
    assert [d["bucket"] for d in ms["decode"]] == buckets["decode"]
    for d in ms["decode"]:
        check_stats(d["step_s"], "decode step")
        check_stats(d["graph_s"], "decode graph")
        assert d["bytes_read"] == weights + kv_256
        assert 0 < d["roofline_fraction"] <= 1 and 0 < d["graph_roofline_fraction"] <= 1

    curve = ms["ttft_by_prompt_length"]
    for image in (False, True):
        lengths = [c["prompt_tokens"] for c in curve if c["image"] == image]
        assert len(lengths) >= 5 and lengths == sorted(lengths)
        assert min(lengths) > (n_image if image else 0)
    for c in curve:
        check_stats(c["ttft_s"], "ttft by length")
    runs = {(r["policy"], r["concurrency"]): r for r in ms["serving"]["runs"]}
    assert set(runs) == {("in-flight", 1), ("in-flight", 2), ("lockstep", 2)}  # batch 1: concurrency 1, B, 2B
    for r in runs.values():
        assert r["output_tokens"] > r["requests"] * 7 and r["output_tokens_per_s"] > 0

    u = ms["image_reuse"]   # X + q1, Y, X + q2: only the third reuses (X's image prefix), one lookup each
    for st in u["ttft_s"]:
        check_stats(st, "image reuse ttft")
    assert u["reused_tokens"] == [0, 0, n_image + 1] and u["tokens_equal_fresh"]
    assert {k: (c["hits"], c["misses"]) for k, c in u["caches"].items()} == {"encoder": (0, 2), "image_prefix": (1, 2)}
    assert u["caches"]["image_prefix"]["entries"] == 2 and u["caches"]["image_prefix"]["bytes"] > 0

    g = ms["generate"]
    assert 0 <= g["host_overhead_share"] <= 1
    assert g["e2e_tokens_per_s"]["median"] > 0 and g["tpot_s"]["median"] > 0
    hb = g["host_breakdown"]
    assert 0 < hb["graph_per_step_s"] <= hb["loop_step_s"]
    assert ms["memory"]["kv_cache_bytes"] == kv_256
    assert ms["memory"]["peak_rss_bytes"] >= ms["load"]["rss_after_load_bytes"] > 0
    assert ms["memory"]["weight_bytes"] > 0

    prof = ms["profile"]["decode"]
    assert prof["ops_per_step"] > 0 and "MatMul" in prof["by_type"]

    e = rep["eager"]
    assert e["mode"] == "PYNATIVE" and e["decode_step_s"]["median"] > 0
    assert e["max_abs_diff_vs_exported"] < 1e-4 and e["same_argmax"]  # the same model, eager and exported

    s = rep["summary"]["mindspore"]
    assert s["eager_over_exported"] > 0
    assert 0 < s["decode_roofline_fraction"] <= 1 and 0 <= s["host_overhead_share"] <= 1
    names = {t["target"] for t in rep["targets"]}
    assert len(names) == 6
    assert 0 < hb["structured_mask_s"] < hb["structured_sample_s"] and hb["structured_mask_share_of_decode_step"] > 0
    for t in rep["targets"]:
        assert isinstance(t["met"], bool) and t["value"] > 0 and isinstance(t["limits"], list)


def test_plot_and_compare_and_text(smoke):
    rep, png, output = smoke
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 600
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 10   # something was drawn
    assert "targets:" in output and "[mindspore]" in output and "decode_256" in output
    assert "mindspore.load_s" in output and "mindspore.tpot_s[256]" in output and "machine.memory_bandwidth" in output
    rows = compare(rep, rep)
    assert rows and all(r[3] == pytest.approx(1.0) for r in rows)


def test_sections_measure_only_what_is_asked(tiny_bundle, tmp_path):
    """What a full-size run can afford (issue 20): preprocessing, a text-only TTFT and decode, one rep each."""
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--sections", "preprocess,ttft_text,decode", "--json",
                                  str(out), "--plot", str(tmp_path / "r.png"), "--reps", "1", "--warmup", "0",
                                  "--decode-reps", "2", "--eager-steps", "0", "--quick"])
    assert r.exit_code == 0, r.output
    ms = json.loads(out.read_text())["backends"]["mindspore"]
    assert {"preprocess", "ttft_text", "decode", "load", "memory"} <= set(ms)
    assert not {"vision", "ttft", "prefill", "ttft_by_prompt_length", "serving", "generate", "profile"} & set(ms)
    assert ms["ttft_text"]["s"]["n"] == 1
    assert "TTFT text-only" in r.output and "decode_256" in r.output
    bad = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--sections", "ttft,warp"])
    assert bad.exit_code == 1 and "--sections ttft,warp: choose from preprocess, vision" in bad.output


def test_decode_costs_from_headers(tiny_bundle):
    costs = model_costs(Bundle(tiny_bundle))
    weights, kv_256 = expected_costs()
    assert costs["decode_weight_bytes"] == weights and costs["kv_read_bytes"]["256"] == kv_256
    assert all(len(s) == 2 for s in costs["gemv_shapes"])


def test_stats_and_bad_counts(tmp_path):
    st = stats([3.0, 1.0, 2.0])
    assert st["median"] == 2.0 and st["min"] == 1.0 and st["max"] == 3.0 and st["n"] == 3
    assert stats([]) == {"n": 0}
    r = CliRunner().invoke(main, ["bench", "nowhere", "--reps", "0"])
    assert r.exit_code == 1 and "--reps must be at least 1" in r.output
    (tmp_path / "serve.json").write_text(json.dumps({"runs": [], "batch": 4}))   # another command's report
    for args, says in ((["--compare", tmp_path / "serve.json"], "is not a report of `cogvlm2-lite bench --json`"),
                       (["--plot", tmp_path / "chart.txt"], "--plot")):
        r = CliRunner().invoke(main, ["bench", "nowhere", *map(str, args)])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("args, says", [
    (["bench-serve", "{b}", "--concurrency", "1,x"], "is not a comma-separated list of client counts"),
    (["bench-serve", "{b}", "--concurrency", "0,4"], "client counts must be at least 1"),
    (["quant-bench", "{b}", "{b}", "--backend", "foo"], "'foo' is not one of 'mindspore', 'onnxruntime'"),
])
def test_bad_benchmark_flags_are_one_usage_error(tiny_bundle, args, says):
    r = CliRunner().invoke(main, [a.format(b=tiny_bundle) for a in args])
    assert r.exit_code == 2 and says in r.output and r.exception.__class__ is SystemExit, r.output


def test_quant_bench_bad_depths_are_one_sentence(tiny_bundle):
    for depths, says in (("256,x", "--depths takes cache depths separated by commas"), ("-1", "must not be negative")):
        r = CliRunner().invoke(main, ["quant-bench", str(tiny_bundle), str(tiny_bundle), "--depths", depths])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output


def test_the_runtime_imports_no_model_exporter_calibration_or_benchmark_code():
    """Every runtime module, imported: nothing of graphs/, export/, calib/, bench/ (nor MindSpore) comes with it."""
    code = ("import pkgutil, importlib, sys, cogvlm2_lite.runtime as r; "
            "mods = [m.name for m in pkgutil.iter_modules(r.__path__) if m.name not in ('msrun_main', 'lite_worker')]; "
            "[importlib.import_module('cogvlm2_lite.runtime.' + m) for m in mods]; "
            "bad = [m for m in sys.modules if m.startswith(('cogvlm2_lite.graphs', 'cogvlm2_lite.export', "
            "'cogvlm2_lite.calib', 'cogvlm2_lite.bench', 'mindspore'))]; "
            "assert len(mods) > 15 and not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnxruntime_decode_is_profiled_by_op_type(onnx_bundle, tmp_path):
    """Issue 18: onnxruntime's own profiler splits a decode step by kernel: the fused decode kernels, one
    FusedMatMul per linear of each layer and lm_head's Gemm, and the report says where the time went."""
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["bench", str(onnx_bundle), "--sections", "decode,profile", "--json", str(out),
                                  "--reps", "1", "--warmup", "0", "--decode-reps", "2", "--eager-steps", "0", "--quick"])
    assert r.exit_code == 0, r.output
    prof = json.loads(out.read_text())["backends"]["onnxruntime"]["profile"]
    assert [prof[k]["graph"] for k in ("decode", "decode_largest")] == ["decode_32", "decode_64"]
    d = prof["decode"]
    assert d["profiler"] == "onnxruntime" and d["steps"] == 2
    layers = 2   # the tiny preset
    assert d["by_type"]["FusedMatMul"]["ops_per_step"] == 5 * layers and d["by_type"]["Gemm"]["ops_per_step"] == 1
    assert d["by_type"]["GroupQueryAttention"]["ops_per_step"] == layers
    assert d["kernel_ms_per_step"] == pytest.approx(sum(v["ms_per_step"] for v in d["by_type"].values()))
    assert 0 < d["kernel_ms_per_step"] and d["ops_per_step"] == pytest.approx(sum(
        v["ops_per_step"] for v in d["by_type"].values()))
    assert "onnxruntime profile of decode_32" in r.output and "profile decode_64" in r.output
