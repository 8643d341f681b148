"""Per-input-channel activation absmax of every linear layer over a calibration set.

    stats = collect(model, weights, samples)      # {weight name: float32 [in]}
    save_stats(bundle_path, stats, meta)           # BUNDLE/calib_stats.safetensors + manifest entry

Keys are the HF names of the linear weights (conv weights: their [C*k*k] patch inputs). Over a
fixed set the result is deterministic: bit-identical between fresh processes (what `calibrate` is); a
second collection inside one process can differ in the last bits (MindSpore's eager CPU kernels
round the first call of a shape differently from later ones), within 1e-5 relative.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .eager import observe
from cogvlm2_lite.graphs.quant import is_linear_weight

STATS_FILE = "calib_stats.safetensors"


def collect(model, weights: dict, samples, extra=None) -> dict:
    """model: calib.eager.EagerModel; weights {name: array}; samples [(image|None, prompt)].
    extra(name, x, w_tensor): an optional second observer (per-layer error measurement)."""
    t = model.tensors(weights)
    names = {id(v): n for n, v in t.items() if is_linear_weight(n, v.shape)}
    stats = {}

    def cb(name, x):
        m = np.abs(x).max(axis=0)
        stats[name] = m if name not in stats else np.maximum(stats[name], m)
        if extra is not None:
            extra(name, x)
    with observe(names, cb):
        for image, prompt in samples:
            model.run(image, prompt, t)
    return {n: stats[n].astype(np.float32) for n in sorted(stats)}


def save_stats(bundle_path, stats: dict, meta: dict) -> Path:
    """Write BUNDLE/calib_stats.safetensors and list it (bytes, sha256) in the manifest."""
    from cogvlm2_lite.runtime.bundle import sha256
    bundle_path = Path(bundle_path)
    f = bundle_path / STATS_FILE
    tmp = f.with_suffix(".tmp")
    save_file({n: np.ascontiguousarray(a) for n, a in stats.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.chmod(0o644)   # as every other bundle file (safetensors writes 0600)
    tmp.replace(f)
    mf = bundle_path / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"][STATS_FILE] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    m["calibration"] = {"file": STATS_FILE, **meta}
    tmp = mf.with_suffix(".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    tmp.replace(mf)
    return f


def load_stats(bundle_path) -> dict:
    return load_file(str(Path(bundle_path) / STATS_FILE))
