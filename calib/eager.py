"""The model run eagerly (MindSpore PyNative) with the graphs/ cells and a dict of weights, with an
optional observer on every linear layer: how calibration sees per-linear inputs although the
exported graphs take their weights as inputs.

The observer is installed by swapping the `linear` / `strided_conv` bindings of the graphs modules
for the duration of a `with observe(...)` block (eager mode only; the exported graphs are never
traced under it). Weights are identified by the identity of the tensor the cell reads from its
weight tuple, so the observer gets the HF name of the weight.
"""
import contextlib

import numpy as np

from cogvlm2_lite.graphs import language, layers, vision


@contextlib.contextmanager
def observe(tensors_by_id: dict, callback):
    """callback(name, x [N, in] numpy float32, w_name) for every linear whose weight is known."""
    orig_linear, orig_conv = layers.linear, vision.strided_conv

    def linear(x, w, b=None):
        name = tensors_by_id.get(id(w))
        if name is not None:
            callback(name, x.asnumpy().reshape(-1, x.shape[-1]).astype(np.float32))
        return orig_linear(x, w, b)

    def strided_conv(x, weight, bias, k):
        name = tensors_by_id.get(id(weight))
        p = vision.patchify(x, k)
        if name is not None:
            callback(name, p.asnumpy().reshape(-1, p.shape[-1]).astype(np.float32))
        return orig_linear(p, weight.reshape(weight.shape[0], -1), bias)

    mods = (layers, vision, language)
    saved = [(m, m.__dict__.get("linear")) for m in mods]
    try:
        for m in mods:
            m.linear = linear
        vision.strided_conv = strided_conv
        yield
    finally:
        for m, f in saved:
            m.linear = f
        vision.strided_conv = orig_conv


@contextlib.contextmanager
def pynative():
    """PyNative mode for the block, the previous mode restored after (export sets GRAPH_MODE)."""
    import mindspore as ms
    before = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=before)


class EagerModel:
    """Vision tower + full-sequence prefill with logits at every position, run op by op."""

    def __init__(self, cfg, tokenizer_path, preprocess_cfg: dict, quant: str | None = None):
        from cogvlm2_lite.runtime.mindspore_backend import use_device
        use_device("CPU", mode=None)
        from cogvlm2_lite.graphs.entry import VisionGraph
        from cogvlm2_lite.runtime.tokenizer import Tokenizer
        self.cfg = cfg
        self.tok = Tokenizer(tokenizer_path)
        self.pre = preprocess_cfg
        self.quant = quant  # a graphs/quant.py scheme: the cells then take the stored (quantized) tensors
        self.vision = VisionGraph(cfg, 1, quant=quant)
        self._prefill = {}

    def tensors(self, weights: dict) -> dict:
        """{name: ms.Tensor} (one object per weight: the observer keys on it)."""
        import mindspore as ms
        return {n: ms.Tensor(np.ascontiguousarray(a)) for n, a in weights.items()}

    def inputs(self, image, prompt: str):
        from cogvlm2_lite.runtime.preprocess import preprocess
        from cogvlm2_lite.runtime.tokenizer import position_ids
        n = self.cfg.num_image_tokens if image is not None else 0
        ids, types = self.tok.build_inputs(prompt, n_image_tokens=n)
        pixels = None
        if image is not None:
            pixels = preprocess(image, self.pre["image_size"], self.pre["mean"], self.pre["std"])[None]
        return ids, position_ids(types), pixels

    def embeds(self, pixels, t: dict):
        import mindspore as ms
        return self.vision(ms.Tensor(pixels), *[t[n] for n in self.vision.table.names])

    def logits(self, ids, positions, embeds, t: dict):
        """-> logits [S, V] float32 of every position."""
        import mindspore as ms
        from cogvlm2_lite.graphs.entry import PrefillGraph
        s = len(ids)
        key = (s, embeds is not None)
        if key not in self._prefill:
            self._prefill[key] = PrefillGraph(self.cfg, s, 1, image=embeds is not None, all_logits=True, quant=self.quant)
        g = self._prefill[key]
        data = [ms.Tensor(np.asarray([ids], np.int32))]
        if embeds is not None:
            data.append(embeds)
        data += [ms.Tensor(np.asarray([positions], np.int32)), ms.Tensor(np.asarray([s], np.int32))]
        return g(*data, *[t[n] for n in g.table.names])[0].asnumpy()[0]

    def run(self, image, prompt, t: dict):
        ids, pos, pixels = self.inputs(image, prompt)
        with pynative():
            e = self.embeds(pixels, t) if pixels is not None else None
            return self.logits(ids, pos, e, t), ids, pos, e

    def greedy(self, ids, positions, embeds, t: dict, steps: int, stop_ids=()):
        ids, positions, out = list(ids), list(positions), []
        for _ in range(steps):
            with pynative():
                tok = int(np.argmax(self.logits(ids, positions, embeds, t)[-1]))
            if tok in stop_ids:
                break
            out.append(tok)
            ids.append(tok)
            positions.append(positions[-1] + 1)
        return out


def load_fp32_bundle(path):
    """-> (Bundle, cfg, {name: float32 array}) of a tp 1 bundle."""
    from cogvlm2_lite.graphs.config import CogVLM2Config
    from cogvlm2_lite.runtime.weights import load_rank_weights
    from cogvlm2_lite.runtime.bundle import Bundle
    from cogvlm2_lite.runtime.errors import UserError
    b = Bundle(path)
    if b.tp != 1:
        raise UserError("calibration reads tp 1 bundles (export the fp32 model with --tp 1).")
    if any(n.endswith(".qweight") for n in b.weight_names("language") + b.weight_names("vision")):
        raise UserError(f"{path} is already quantized: calibrate the fp32 bundle.")
    cfg = CogVLM2Config.from_hf(b.manifest["model"])
    w = {n: np.asarray(a, np.float32) for n, a in load_rank_weights(b, 0).items()}
    return b, cfg, w
