"""Accuracy of a quantization scheme against the fp32 model, on held-out prompts.

The quantized model is the exported graphs' own cells (graphs/quant.py) run eagerly on the stored
tensors the export would write (graphs/quant.py Quantizer): what a quantized bundle computes.

Per position of the prompt's text (bos and every token after the image): top-1 agreement, cosine
similarity of the logit vectors, KL(p_fp32 || p_quant); per prompt: whether the greedy continuation
of `steps` tokens is identical (and the common prefix length); per linear: the relative output error
||y_quant - x W^T|| / ||x W^T|| on the fp32 model's held-out activations, y_quant the stored form's
arithmetic (graphs/quant.py `Form.reference`: activation quantization included for w8a8 and w4a8).
"""
import numpy as np

from cogvlm2_lite.graphs.quant import Quantizer, is_linear_weight
from cogvlm2_lite.graphs.weights import REPLICATED, WeightSpec
from cogvlm2_lite.runtime.progress import Progress

from .stats import collect


def quantized_bytes(weights: dict, qz: Quantizer, ref_dtype=np.float16) -> dict:
    """Bytes of the quantized matrices (codes + scales + smoothing) vs the same matrices in `ref_dtype`."""
    lin = {n: w for n, w in weights.items() if is_linear_weight(n, w.shape)}
    qb = sum(a.nbytes for a in qz.quantize(lin).values())
    rb = sum(w.size * np.dtype(ref_dtype).itemsize for w in lin.values())
    return {"quantized_bytes": int(qb), "reference_bytes": int(rb), "ratio": qb / rb if rb else float("nan")}


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, q: np.ndarray) -> dict:
    """ref, q [N, V] -> per-position arrays of top-1 agreement, cosine, KL(ref || q)."""
    a, b = ref.astype(np.float64), q.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    lp, lq = _log_softmax(a), _log_softmax(b)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1": (a.argmax(-1) == b.argmax(-1)), "cosine": cos, "kl": np.maximum(kl, 0.0)}


def accuracy_report(model, qmodel, weights: dict, samples, quantizer, steps: int = 8, stop_ids=(),
                    progress: Progress | None = None) -> dict:
    """model / qmodel: calib.eager.EagerModel without / with quantizer.scheme. `progress`: its two passes over
    the samples as phases."""
    progress = progress or Progress(enabled=False)
    qweights = quantizer.quantize(weights)
    t_ref, t_q = model.tensors(weights), qmodel.tensors(qweights)
    n_img = model.cfg.num_image_tokens
    per_pos = {"top1": [], "cosine": [], "kl": []}
    greedy_match, prefix = [], []
    for image, prompt in progress.track(samples, f"report: {quantizer.scheme} against fp32", unit="prompt"):
        ref, ids, pos, e_ref = model.run(image, prompt, t_ref)
        q, _, _, e_q = qmodel.run(image, prompt, t_q)
        keep = np.ones(len(ids), bool)
        if image is not None:
            keep[1:1 + n_img] = False
        m = compare_logits(ref[keep], q[keep])
        for k in per_pos:
            per_pos[k].append(m[k])
        if steps:
            g_ref = model.greedy(ids, pos, e_ref, t_ref, steps, stop_ids)
            g_q = qmodel.greedy(ids, pos, e_q, t_q, steps, stop_ids)
            greedy_match.append(g_ref == g_q)
            n = 0
            while n < min(len(g_ref), len(g_q)) and g_ref[n] == g_q[n]:
                n += 1
            prefix.append(n / max(len(g_ref), 1))
    cat = {k: np.concatenate(v) for k, v in per_pos.items()}
    out = {
        "scheme": quantizer.scheme, "prompts": len(samples), "positions": int(cat["top1"].size),
        "top1_agreement": float(cat["top1"].mean()),
        "cosine_mean": float(cat["cosine"].mean()), "cosine_min": float(cat["cosine"].min()),
        "kl_mean": float(cat["kl"].mean()), "kl_max": float(cat["kl"].max()),
    }
    if steps:
        out.update({"greedy_steps": steps, "greedy_sequence_match": float(np.mean(greedy_match)),
                    "greedy_common_prefix": float(np.mean(prefix))})
    out["layers"] = layer_errors(model, weights, qweights,
                                 progress.track(samples, "report: per-layer errors", unit="prompt"), quantizer)
    out["bytes"] = quantized_bytes(weights, quantizer)
    return out


def layer_errors(model, weights: dict, qweights: dict, samples, quantizer: Quantizer) -> list[dict]:
    """Per linear, over the fp32 model's own activations: relative output error of its quantized form
    alone and relative weight error; sorted worst first."""
    num, den = {}, {}
    w2 = {n: w.reshape(w.shape[0], -1).astype(np.float64) for n, w in weights.items() if is_linear_weight(n, w.shape)}
    forms = {n: quantizer.form(WeightSpec(n, weights[n].shape, REPLICATED)) for n in w2}

    def err(name, x):
        x = x.astype(np.float64)
        ref = x @ w2[name].T
        y = forms[name].reference(x, forms[name].arrays(qweights, name))
        num[name] = num.get(name, 0.0) + float(np.square(y - ref).sum())
        den[name] = den.get(name, 0.0) + float(np.square(ref).sum())
    collect(model, weights, samples, extra=err)
    rows = [{"layer": n, "form": forms[n].name, "output_rel_err": float(np.sqrt(num[n] / max(den[n], 1e-300))),
             "weight_rel_err": float(np.linalg.norm(w2[n] - forms[n].dequantize(forms[n].arrays(qweights, n))
                                                    .reshape(w2[n].shape)) / max(np.linalg.norm(w2[n]), 1e-300))}
            for n in num]
    return sorted(rows, key=lambda r: -r["output_rel_err"])


def format_report(r: dict, top: int = 10) -> str:
    lines = [f"scheme {r['scheme']}: {r['prompts']} held-out prompts, {r['positions']} positions",
             f"  top-1 agreement   {r['top1_agreement']:.4f}",
             f"  logit cosine      mean {r['cosine_mean']:.6f}  min {r['cosine_min']:.6f}",
             f"  KL(fp32 || quant) mean {r['kl_mean']:.3e}  max {r['kl_max']:.3e}"]
    if "greedy_steps" in r:
        lines.append(f"  greedy {r['greedy_steps']} tokens: sequence match {r['greedy_sequence_match']:.3f}, "
                     f"common prefix {r['greedy_common_prefix']:.3f}")
    b = r["bytes"]
    lines.append(f"  quantized matrices: {b['quantized_bytes']} bytes vs {b['reference_bytes']} in fp16 "
                 f"({b['ratio']:.3f}x)")
    lines.append(f"  per-layer relative output error (worst {min(top, len(r['layers']))} of {len(r['layers'])}):")
    for row in r["layers"][:top]:
        lines.append(f"    {row['output_rel_err']:.3e}  (weight {row['weight_rel_err']:.3e}, {row['form']})  {row['layer']}")
    return "\n".join(lines)
