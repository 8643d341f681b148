"""The eager side of parity tests: the graphs/ cells run directly (not exported), with the
checkpoint's weights, and greedy decoding by full-sequence recomputation (no KV cache at all),
so it shares nothing with the runtime's cache, buckets or decode graphs."""
import mindspore as ms
import numpy as np

from cogvlm2_lite.runtime.mindspore_backend import use_device
from cogvlm2_lite.graphs.entry import PrefillGraph, VisionGraph


_cells = {}


def cell(cls, cfg, *args, **kw):
    """Build each graph cell once: MindSpore compiles per cell object."""
    key = (cls.__name__, id(cfg), args, tuple(sorted(kw.items())))
    if key not in _cells:
        _cells[key] = cls(cfg, *args, **kw)
    return _cells[key]


def weight_args(table, weights):
    return tuple(ms.Tensor(weights[n]) for n in table.names)


def image_embeds(cfg, weights, pixels):
    use_device()
    g = cell(VisionGraph, cfg, 1)
    return g(ms.Tensor(pixels[None]), *weight_args(g.table, weights)).asnumpy()


def full_logits(cfg, weights, ids, positions, embeds=None, length=None):
    """Logits [S, V] of every position of one sequence (padded to `length`: causal, so harmless)."""
    use_device()
    s = length or len(ids)
    g = cell(PrefillGraph, cfg, s, 1, image=embeds is not None, all_logits=True)
    x = np.zeros((1, s), np.int32)
    x[0, :len(ids)] = ids
    p = np.zeros((1, s), np.int32)
    p[0, :len(ids)] = positions
    data = [ms.Tensor(x)] + ([ms.Tensor(embeds)] if embeds is not None else []) + [
        ms.Tensor(p), ms.Tensor(np.array([len(ids)], np.int32))]
    return g(*data, *weight_args(g.table, weights))[0].asnumpy()[0, :len(ids)]


def greedy(cfg, weights, ids, positions, embeds, steps, stop_ids=()):
    """Greedy continuation by recomputing the whole sequence each step -> (tokens, last-token logits per step)."""
    ids, positions = list(ids), list(positions)
    length = len(ids) + steps
    tokens, logits = [], []
    for _ in range(steps):
        row = full_logits(cfg, weights, ids, positions, embeds, length)[-1]
        tok = int(np.argmax(row))
        logits.append(row)
        if tok in stop_ids:
            break
        tokens.append(tok)
        ids.append(tok)
        positions.append(positions[-1] + 1)
    return tokens, logits
