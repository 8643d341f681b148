"""The "no AOT" baseline: a bundle's decode step run eagerly, op by op (MindSpore PyNative mode), with
the graphs/ cells the bundle was traced from and the bundle's own weights.

It needs the model code (graphs/) that the runtime never imports. `cogvlm2-lite bench` runs it in
its own process:

    python -m cogvlm2_lite.bench.eager BUNDLE [--steps 3 --warmup 1 --bucket T --ref LOGITS.npy]

and reads the one JSON line it prints: the eager decode step times, and (with --ref, the exported
graph's logits for the same input) the largest logit difference, proof that both run the same model.
PyNative pays a Python dispatch per op, so keep --steps small.
"""
import json
import time

import click
import numpy as np

from .timing import stats


def eager_decode(bundle_path, steps: int = 3, warmup: int = 1, bucket: int | None = None, ref=None) -> dict:
    """Decode step times (s) of a tp-1 bundle's decode_<bucket> run eagerly on its own weights; with `ref`
    (a .npy of the exported graph's logits for the same input) the largest logit difference.
    Raises UserError for a tensor-parallel bundle."""
    import mindspore as ms

    from cogvlm2_lite.graphs.config import CogVLM2Config
    from cogvlm2_lite.graphs.entry import ExtendGraph
    from cogvlm2_lite.runtime.weights import load_rank_weights
    from cogvlm2_lite.runtime.bundle import Bundle
    from cogvlm2_lite.runtime.mindspore_backend import use_device
    from cogvlm2_lite.runtime.errors import UserError

    b = Bundle(bundle_path)
    if b.tp > 1:
        raise UserError("the eager baseline runs tp 1 bundles only.")
    use_device("CPU", "PYNATIVE_MODE")
    m = b.manifest
    cfg = CogVLM2Config.from_hf(m["model"])
    t_bucket = bucket or min(b.buckets["decode"])
    t = time.perf_counter()
    cell = ExtendGraph(cfg, 1, t_bucket, b.batch, m["dtype"], tp=1)  # decode_<T>
    names = b.weight_names("language")
    if cell.table.names != names:
        raise UserError("the bundle's language weights are not in the order of this code's decode graph: "
                        "the bundle was exported by another version.")
    arrays = load_rank_weights(b, 0)
    weights = [ms.Tensor.from_numpy(arrays[n]) for n in names]
    build_s = time.perf_counter() - t

    kv = m["kv_cache"]
    dtype = np.dtype(arrays[names[0]].dtype)
    cache = np.zeros((b.batch, kv["kv_heads"], t_bucket, kv["head_dim"]), dtype)
    # the same input as the bench's exported reference: token 5 at position 0 into an empty cache
    data = [np.full((b.batch, 1), 5, np.int32), np.zeros(b.batch, np.int32), np.zeros(b.batch, np.int32)]
    data += [cache] * (2 * kv["layers"])

    def step():
        out = cell(*[ms.Tensor.from_numpy(x) for x in data], *weights)
        return out[0].asnumpy()

    times, logits = [], None
    for i in range(warmup + steps):
        t = time.perf_counter()
        logits = step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    out = {"mode": "PYNATIVE", "bucket": t_bucket, "steps": steps, "warmup": warmup, "build_s": build_s,
           "decode_step_s": stats(times)}
    if ref is not None:
        r = np.load(ref)
        out["max_abs_diff_vs_exported"] = float(np.max(np.abs(r.astype(np.float64) - logits.astype(np.float64))))
        out["same_argmax"] = bool((r.argmax(-1) == logits.argmax(-1)).all())
    return out


@click.command()
@click.argument("bundle")
@click.option("--steps", type=int, default=3, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--bucket", type=int, default=None, help="Decode bucket (default: the smallest).")
@click.option("--ref", default=None, help="Exported logits (.npy) for the same input.")
def main(bundle, steps, warmup, bucket, ref):
    """Time the eager decode step; print one JSON line."""
    from cogvlm2_lite.runtime.errors import UserError
    try:
        res = eager_decode(bundle, steps, warmup, bucket, ref)
    except UserError as e:
        res = {"error": str(e)}
    click.echo("\n" + json.dumps(res))


if __name__ == "__main__":
    main()
