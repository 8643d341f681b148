"""Train the embedded default model: a small CogVLM2 of the exact architecture on the shapes VQA task.

    python -m cogvlm2_lite.demo.train OUT_DIR [--steps 3000] [--seed 0] [--batch 64] [--lr 2e-3]

The model is built from the same graph cells that export traces (`graphs.entry`): the vision tower
of `VisionGraph` and an image `PrefillGraph` with `all_logits=True`, both taking their weights as
inputs. A training cell holds those weights as `Parameter`s and feeds them in, so what is trained
is exactly what the bundle runs. Sequences are built with the runtime's own tokenizer, prompt
template, position-id rule and pixel preprocessing, so training and inference see the same inputs:

    [bos] [6 image slots] "Question: {q} Answer:" " {answer}" [<|end_of_text|>] [pad ...]

The loss is cross-entropy on the answer tokens and the final <|end_of_text|> (id 769, one of the
runtime's stop ids). Validation is teacher-forced greedy exact match on unseen samples of the
training stream: a sample counts only if the argmax at every answer position (and the stop
position) is right, which is exactly when greedy generation produces the answer and then stops.
Training ends when validation reaches --target (or after --steps).

OUT_DIR receives config.json, generation_config.json, model.safetensors (HF layout, float16 by
default) and tokenizer.model. Same seed and arguments -> the same weights on the same machine.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import task
from .task import QTYPES, TRAIN_SEED

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER = ASSETS / "tokenizer.model"
SEQ_LEN = 32            # longest training sequence is 31 tokens (a 4-shape description)
N_KIND, N_COLOUR = 1 + len(task.KINDS), 1 + len(task.COLOURS)
EOS_ID = 769            # <|end_of_text|>: a stop id of the runtime (cfg.eos_token_id = [769, 777])


def demo_config():
    """The embedded default: CogVLM2's architecture, shrunk. 56 px images -> a 4 x 4 patch grid ->
    2 x 2 after the adapter's conv: one image token per cell of the task's 2 x 2 grid, plus boi/eoi."""
    from cogvlm2_lite.graphs.config import CogVLM2Config, VisionConfig
    image, patch = 56, 14
    grid = image // patch
    vision = VisionConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_heads=4,
                          patch_size=patch, image_size=image, num_positions=grid * grid + 1)
    cfg = CogVLM2Config(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                        num_attention_heads=4, num_multi_query_heads=2, max_position_embeddings=128,
                        bos_token_id=768, eos_token_id=[769, 777], pad_token_id=770, template_version="chat",
                        vision=vision)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- data

class Encoded:
    """A slice of the task stream as fixed-shape arrays (images kept as uint8, normalised per batch)."""

    def __init__(self, images, ids, pos, labels, mask, cells, qtype, answers):
        self.images, self.ids, self.pos, self.labels, self.mask = images, ids, pos, labels, mask
        self.cells, self.qtype, self.answers = cells, qtype, answers

    def __len__(self):
        return len(self.ids)


def encode_samples(samples, tokenizer, n_image: int, seq_len: int = SEQ_LEN) -> Encoded:
    """Samples -> input ids, position ids, next-token labels and the loss mask (answer + eos)."""
    from cogvlm2_lite.runtime.tokenizer import position_ids
    n = len(samples)
    ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
    pos = np.zeros((n, seq_len), np.int32)
    labels = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    images = np.zeros((n,) + np.asarray(samples[0].image).shape, np.uint8)
    qtype = np.zeros(n, np.int32)
    cells = np.zeros((n, 4, 2), np.int32)  # per cell in reading order: (kind, colour), 0 = empty
    for i, s in enumerate(samples):
        prompt, types = tokenizer.build_inputs(s.question, (), "chat", n_image)
        answer = tokenizer.encode(" " + s.answer) + [EOS_ID]
        full = prompt + answer
        if len(full) > seq_len:
            raise ValueError(f"sample {i} needs {len(full)} tokens, more than {seq_len}")
        p = position_ids(types + [0] * len(answer))
        ids[i, :len(full)] = full
        pos[i, :len(full)] = p
        # logits at position t predict token t + 1: the answer tokens are predicted from len(prompt) - 1 on
        t0 = len(prompt) - 1
        labels[i, t0:t0 + len(answer)] = answer
        mask[i, t0:t0 + len(answer)] = 1.0
        images[i] = np.asarray(s.image)
        qtype[i] = QTYPES.index(s.qtype)
        for shape in s.scene.shapes:
            cells[i, 2 * shape.cell[0] + shape.cell[1]] = (1 + task.KINDS.index(shape.kind),
                                                           1 + list(task.COLOURS).index(shape.colour))
    return Encoded(images, ids, pos, labels, mask, cells, qtype, [s.answer for s in samples])


def pixels(images_u8, size: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, S, S] through the runtime's own preprocessing."""
    from PIL import Image
    from cogvlm2_lite.runtime.preprocess import MEAN, STD, preprocess
    out = np.empty((len(images_u8), 3, size, size), np.float32)
    for i, a in enumerate(images_u8):
        preprocess(Image.fromarray(a, "RGB"), size, MEAN, STD, out=out[i])
    return out


def make_split(seed: int, start: int, n: int, tokenizer, cfg, log=print) -> Encoded:
    t = time.perf_counter()
    it = task.iter_samples(seed, cfg.vision.image_size, start=start)
    samples = [next(it) for _ in range(n)]
    enc = encode_samples(samples, tokenizer, cfg.num_image_tokens)
    log(f"data: {n} samples from seed {seed} (index {start}..{start + n - 1}) in {time.perf_counter() - t:.1f}s")
    return enc


# ----------------------------------------------------------------------------- model

def init_weights(cfg, seed: int) -> dict:
    """Deterministic init per (seed, name): export's `random_tensor` scaled for training: norms at 1,
    biases at 0, embeddings small, residual-branch output projections scaled by 1/sqrt(2 * layers)."""
    from cogvlm2_lite.export.hf_checkpoint import random_tensor
    from cogvlm2_lite.graphs.model import weight_specs
    out = {}
    for spec in weight_specs(cfg):
        name, shape = spec.name, spec.shape
        a = random_tensor(name, shape, seed)
        if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight")):
            a = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            a = np.zeros(shape, np.float32)
        elif name.endswith(("embed_tokens.weight", "boi", "eoi")):
            a = a * 0.04  # random_tensor gives std 0.5: -> 0.02
        # the vision position table stays at std 0.5, comparable to the patch embeddings: the LM gives all
        # image tokens ONE position id (CogVLM2's rule), so where a token sits comes only from this table
        elif name.endswith(("dense.weight", "down_proj.weight", "fc2.weight", "dense_4h_to_h.weight")):
            layers = cfg.vision.num_hidden_layers if ".vision.transformer." in name else cfg.num_hidden_layers
            a = a / math.sqrt(2 * layers)
        out[name] = np.ascontiguousarray(a, np.float32)
    return out


def build_cells(cfg, batch: int, weights: dict, aux: float = 1.0):
    """The training network, an eval network and the optimizer over the shared parameters."""
    import mindspore as ms
    from mindspore import nn, ops
    from cogvlm2_lite.graphs.entry import PrefillGraph, VisionGraph

    class Forward(nn.Cell):
        """pixels, ids, positions -> logits [B, S, V] with the graphs of export, weights as Parameters."""

        def __init__(self):
            super().__init__()
            self.vision = VisionGraph(cfg, batch)
            self.prefill = PrefillGraph(cfg, SEQ_LEN, batch, image=True, all_logits=True)
            self.vision_params = ms.ParameterTuple(
                [ms.Parameter(ms.Tensor(weights[n]), name=n) for n in self.vision.table.names])
            self.lm_params = ms.ParameterTuple(
                [ms.Parameter(ms.Tensor(weights[n]), name=n) for n in self.prefill.table.names])
            self.valid = ms.Tensor(np.full(batch, SEQ_LEN, np.int32))

        def construct(self, pixel_values, ids, pos):
            embeds = self.vision.model(pixel_values, self.vision_params)
            return self.prefill(ids, embeds, pos, self.valid, *self.lm_params)[0], embeds

    class Loss(nn.Cell):
        """Masked next-token cross-entropy on the answer (+ stop token), plus `aux` times an auxiliary
        per-cell loss: linear heads (not part of the model, discarded after training) read each of the
        4 cell embeddings and classify the shape kind and colour in it (or empty), from the scene the
        generator drew, and which cell it is. It bootstraps the vision tower: from the language loss alone
        its shape features take very long to start forming (shape answers stayed at chance for 1300
        steps), and the LM gives all image tokens one position id, so where a cell is must be in its
        embedding."""

        def __init__(self, forward, aux):
            super().__init__()
            self.forward = forward
            self.aux = aux
            self.hidden = cfg.hidden_size
            rng = np.random.default_rng([0, 7])
            h = cfg.hidden_size
            self.kind_head = ms.Parameter(ms.Tensor((rng.standard_normal((h, N_KIND)) / np.sqrt(h)).astype(np.float32)),
                                          name="aux.kind_head")
            self.colour_head = ms.Parameter(
                ms.Tensor((rng.standard_normal((h, N_COLOUR)) / np.sqrt(h)).astype(np.float32)), name="aux.colour_head")
            self.cell_head = ms.Parameter(ms.Tensor((rng.standard_normal((h, 4)) / np.sqrt(h)).astype(np.float32)),
                                          name="aux.cell_head")
            self.cell_ids = ms.Tensor(np.tile(np.arange(4, dtype=np.int32), batch).reshape(-1, 1))

        def construct(self, pixel_values, ids, pos, labels, mask, cells):
            logits, embeds = self.forward(pixel_values, ids, pos)
            logp = ops.log_softmax(logits, -1)
            nll = -ops.gather_elements(logp, 2, labels.expand_dims(-1)).squeeze(-1)
            loss = (nll * mask).sum() / mask.sum()
            e = embeds[:, 1:-1].reshape(-1, self.hidden)  # the cell tokens, between boi and eoi
            kind = ops.log_softmax(ops.matmul(e, self.kind_head), -1)
            colour = ops.log_softmax(ops.matmul(e, self.colour_head), -1)
            where = ops.log_softmax(ops.matmul(e, self.cell_head), -1)
            c = cells.reshape(-1, 2)
            aux = -(ops.gather_elements(kind, 1, c[:, :1]).mean() + ops.gather_elements(colour, 1, c[:, 1:]).mean()
                    + ops.gather_elements(where, 1, self.cell_ids).mean())
            return loss + self.aux * aux

    forward = Forward()
    loss_net = Loss(forward, aux)
    return forward, loss_net


def train(out_dir, steps=3000, seed=0, batch=64, lr=2e-3, n_train=40000, n_val=500, target=0.99,
          eval_every=250, dtype="float16", threads=2, keep_latest=False, aux=1.0, log=print):
    import mindspore as ms
    from mindspore import nn, ops
    from cogvlm2_lite.runtime.mindspore_backend import use_device
    from cogvlm2_lite.runtime.tokenizer import Tokenizer

    use_device("CPU")
    ms.set_seed(seed)
    ms.set_deterministic(True)
    ms.device_context.cpu.op_tuning.threads_num(threads)  # default 30 threads: oversubscribes small machines
    cfg = demo_config()
    tok = Tokenizer(TOKENIZER)
    size = cfg.vision.image_size
    t_start = time.perf_counter()
    train_set = make_split(TRAIN_SEED, 0, n_train, tok, cfg, log)
    val_set = make_split(TRAIN_SEED, n_train, n_val, tok, cfg, log)  # unseen samples of the same stream

    weights = init_weights(cfg, seed)
    forward, loss_net = build_cells(cfg, batch, weights, aux)
    params = list(forward.vision_params) + list(forward.lm_params)
    names = forward.vision.table.names + forward.prefill.table.names
    n_params = sum(int(np.prod(p.shape)) for p in params)
    log(f"model: {n_params:,} parameters")
    warmup = min(200, steps // 10)
    schedule = [lr * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
                for i in range(steps)]
    trainable = params + [loss_net.kind_head, loss_net.colour_head, loss_net.cell_head]
    decay = [p for p in trainable if len(p.shape) > 1 and "norm" not in p.name]
    rest = [p for p in trainable if not (len(p.shape) > 1 and "norm" not in p.name)]
    opt = nn.AdamWeightDecay([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             learning_rate=schedule, beta1=0.9, beta2=0.98, eps=1e-8)
    grad_fn = ms.value_and_grad(loss_net, None, opt.parameters)

    @ms.jit
    def train_step(px, ids, pos, labels, mask, cells):
        loss, grads = grad_fn(px, ids, pos, labels, mask, cells)
        grads = ops.clip_by_global_norm(grads, 1.0)
        opt(grads)
        return loss

    @ms.jit
    def predict(px, ids, pos):
        return forward(px, ids, pos)[0].argmax(-1).astype(ms.int32)

    # compile the eval graph now too (MindSpore parses the graph source when it compiles)
    evaluate_teacher_forced(predict, Encoded(*(a[:batch] for a in (val_set.images, val_set.ids, val_set.pos,
                            val_set.labels, val_set.mask, val_set.cells, val_set.qtype)), val_set.answers[:batch]),
                            batch, size)
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(train_set))
    cursor = 0
    t_train = time.perf_counter()
    losses = []
    for step in range(1, steps + 1):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(train_set)), 0
        idx = np.sort(order[cursor:cursor + batch])
        cursor += batch
        loss = train_step(ms.Tensor(pixels(train_set.images[idx], size)), ms.Tensor(train_set.ids[idx]),
                          ms.Tensor(train_set.pos[idx]), ms.Tensor(train_set.labels[idx]),
                          ms.Tensor(train_set.mask[idx]), ms.Tensor(train_set.cells[idx]))
        losses.append(float(loss.asnumpy()))
        if step % 50 == 0 or step == 1:
            el = time.perf_counter() - t_train
            log(f"step {step}/{steps} loss {np.mean(losses[-50:]):.4f} lr {schedule[step - 1]:.2e} "
                f"{el:.0f}s ({el / step:.2f}s/step)")
        if step % eval_every == 0 or step == steps:
            acc = evaluate_teacher_forced(predict, val_set, batch, size)
            log(f"  val exact match {acc['overall']:.3f}  " + " ".join(f"{q} {acc[q]:.3f}" for q in QTYPES))
            if keep_latest:
                save(Path(out_dir) / "latest", cfg, {n: p.asnumpy() for n, p in zip(names, params)}, dtype)
            if acc["overall"] >= target:
                log(f"target {target} reached at step {step}")
                break
    log(f"training: {step} steps in {time.perf_counter() - t_train:.0f}s (total {time.perf_counter() - t_start:.0f}s)")
    trained = {n: p.asnumpy() for n, p in zip(names, params)}
    save(out_dir, cfg, trained, dtype)
    return cfg, trained


def evaluate_teacher_forced(predict, data: Encoded, batch: int, size: int) -> dict:
    """Greedy exact match without a decode loop: correct iff every answer/stop position's argmax is right."""
    import mindspore as ms
    n = len(data)
    ok = np.zeros(n, bool)
    for s in range(0, n, batch):
        idx = np.arange(s, s + batch) % n  # wrap the last batch (fixed graph shape)
        pred = predict(ms.Tensor(pixels(data.images[idx], size)), ms.Tensor(data.ids[idx]),
                       ms.Tensor(data.pos[idx])).asnumpy()
        lab, m = data.labels[idx], data.mask[idx] > 0
        stop = lab == EOS_ID
        right = (pred == lab) | (stop & ((pred == 769) | (pred == 777)))
        good = np.all(right | ~m, axis=1)
        ok[idx[:min(batch, n - s)]] = good[:min(batch, n - s)]
    out = {"overall": float(ok.mean())}
    for i, q in enumerate(QTYPES):
        sel = data.qtype == i
        out[q] = float(ok[sel].mean()) if sel.any() else float("nan")
    return out


def save(out_dir, cfg, weights: dict, dtype="float16"):
    from cogvlm2_lite.export.hf_checkpoint import write_checkpoint
    out = Path(out_dir)
    write_checkpoint(out, cfg, weights=weights, dtype=dtype)
    shutil.copyfile(TOKENIZER, out / "tokenizer.model")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cogvlm2_lite.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--target", type=float, default=0.99, help="stop when validation exact match reaches this")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--threads", type=int, default=2, help="CPU kernel threads")
    p.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary per-cell loss (0: off)")
    p.add_argument("--keep-latest", action="store_true", help="also save OUT_DIR/latest at every evaluation")
    a = p.parse_args(argv)
    train(a.out_dir, a.steps, a.seed, a.batch, a.lr, a.n_train, a.n_val, a.target, a.eval_every, a.dtype,
          a.threads, a.keep_latest, a.aux, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
