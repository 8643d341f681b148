"""The benchmark chart (matplotlib): decode step vs KV-cache bucket against the memory roofline, and
where TTFT and a decode step spend their time."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot(report: dict, path):
    """Write a PNG: left, decode ms per step by cache bucket per backend (with the roofline and the eager
    step); right, stacked bars of the TTFT phases and of a decode step (graph / host); below, the
    headline figures of each backend."""
    b, machine = report["bundle"], report["machine"]
    ok = {n: r for n, r in report["backends"].items() if "decode" in r}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.4), gridspec_kw={"width_ratios": [1, 1.1]})
    fig.suptitle(f"cogvlm2-lite bench: {Path(b['path']).name} ({b['model']['num_hidden_layers']}x"
                 f"{b['model']['hidden_size']}, {b['dtype']}) on {machine['cpu_model']}, "
                 f"{machine['usable_cores']} cores, {report['created']}", fontsize=11)

    for n, r in ok.items():
        left.plot([d["bucket"] for d in r["decode"]], [d["step_s"]["median"] * 1e3 for d in r["decode"]], "o-", label=n)
    if ok:
        first = next(iter(ok.values()))["decode"]
        left.plot([d["bucket"] for d in first], [d["roofline_s"] * 1e3 for d in first], "k^--", label="memory roofline")
    e = report.get("eager", {})
    if "decode_step_s" in e:   # usually far above the exported graphs: noted, not plotted to scale
        left.annotate(f"eager (PyNative) decode_{e['bucket']}: {e['decode_step_s']['median'] * 1e3:.0f} ms",
                      xy=(0.02, 0.96), xycoords="axes fraction", color="firebrick", fontsize=9, va="top")
    left.set(title="decode step vs KV-cache bucket (the step reads the whole bucket)", xlabel="cache bucket (slots)",
             ylabel="ms per step", ylim=(0, None), xlim=(0, None))
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    bars = []
    for n, r in ok.items():
        if "ttft" in r:
            bars.append((f"{n} TTFT", [(k, v["median"] * 1e3) for k, v in r["ttft"]["breakdown"].items()]))
        if "generate" in r:
            h = r["generate"]["host_breakdown"]
            bars.append((f"{n} decode step", [("graph", h["graph_per_step_s"] * 1e3),
                                              ("host", max(0.0, h["loop_step_s"] - h["graph_per_step_s"]) * 1e3)]))
    phases = list(dict.fromkeys(k for _, segs in bars for k, _ in segs))
    colors = dict(zip(phases, plt.get_cmap("tab10").colors))
    labelled = set()
    for i, (label, segs) in enumerate(bars):
        start = 0.0
        for k, v in segs:
            right.barh(i, v, left=start, color=colors[k], label=None if k in labelled else k)
            labelled.add(k)
            start += v
        right.annotate(f"{start:.1f} ms", (start, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    right.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    right.invert_yaxis()
    right.set(title="time breakdown", xlabel="ms")
    right.legend(fontsize=8, ncol=4, loc="lower right")

    lines = [f"{n}: decode {100 * (s.get('decode_roofline_fraction') or 0):.0f}% of roofline, host "
             f"{100 * (s.get('host_overhead_share') or 0):.1f}%, TTFT {(s.get('ttft_s') or 0) * 1e3:.0f} ms, e2e "
             f"{s.get('e2e_tokens_per_s') or 0:.1f} tok/s"
             + (f", exported {s['eager_over_exported']:.1f}x faster than eager" if "eager_over_exported" in s else "")
             for n, s in report["summary"].items()]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=9, va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(lines), 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
