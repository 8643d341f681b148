"""The HF checkpoint layout: read it lazily (one tensor, or one slice, at a time) and write it.

Reading goes through `safetensors.safe_open`, so a 39 GB sharded checkpoint is never resident:
tensor-parallel export reads just the rows or columns a rank needs. bf16 tensors come back as
`ml_dtypes.bfloat16` numpy arrays.
"""
import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cogvlm2_lite.graphs.config import CogVLM2Config, ConfigError
from cogvlm2_lite.graphs.model import weight_specs
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.weights import DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers of the release, recomputed in the graphs


class Checkpoint:
    """An HF checkpoint folder: config.json + model.safetensors or sharded with an index."""

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.config = CogVLM2Config.from_dir(self.folder)
        except ConfigError as e:
            raise UserError(str(e)) from None
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise UserError(f"{self.folder} has neither {SINGLE} nor {INDEX}: not a safetensors HF checkpoint.")
        self._files = {}
        if weight_map is None:
            weight_map = {k: SINGLE for k in self._open(SINGLE).keys()}
        self.weight_map = weight_map

    def _open(self, file):
        if file not in self._files:
            path = self.folder / file
            if not path.is_file():
                raise UserError(f"{path} is listed in {INDEX} but does not exist.")
            try:
                self._files[file] = safe_open(str(path), framework="np")
            except Exception as e:
                raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
        return self._files[file]

    def _slice(self, name):
        return self._open(self.weight_map[name]).get_slice(name)

    def shape(self, name) -> tuple:
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name) -> int:
        """Bytes of the tensor as stored in the checkpoint."""
        s = self._slice(name)
        return int(np.prod(s.get_shape(), dtype=np.int64)) * np.dtype(DTYPES[s.get_dtype()]).itemsize

    def read(self, name, index=()) -> np.ndarray:
        """The tensor, or `index` (a tuple of slices) of it, reading only those bytes."""
        s = self._slice(name)
        return s[index] if index else s[:]

    def validate(self, cfg: CogVLM2Config | None = None):
        """Missing, unexpected and mis-shaped tensors, all named in one error."""
        expected = {s.name: s.shape for s in weight_specs(cfg or self.config)}
        present = {k for k in self.weight_map if not k.endswith(IGNORED_SUFFIXES)}
        problems = []
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        if missing:
            problems.append(f"missing {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected {_names(unexpected)}")
        for name in sorted(present & set(expected)):
            if self.shape(name) != expected[name]:
                problems.append(f"{name} has shape {list(self.shape(name))}, expected {list(expected[name])}")
        if problems:
            raise UserError(f"checkpoint {self.folder} does not match its config.json: " + "; ".join(problems[:8])
                            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "") + ".")


def _names(names, most=6):
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def random_tensor(name: str, shape: tuple, seed: int) -> np.ndarray:
    """Deterministic per (seed, name), so any subset (one rank, one shard) is generated alone.

    Weights N(0, 1/fan_in) keep activations O(1) at any size (well-separated logits: greedy
    decoding is stable across backends); norm weights near 1; biases and embeddings small.
    """
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
    a = rng.standard_normal(shape, dtype=np.float32)   # drawn in fp32: the 19B's 19.5B draws take minutes, not 18
    if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight")):
        a *= np.float32(0.1)
        a += np.float32(1.0)
    elif len(shape) == 1 or name.endswith(("bias", "boi", "eoi", "cls_embedding", "position_embedding.weight",
                                             "embed_tokens.weight")):
        a *= np.float32(0.5)
    else:
        a *= np.float32(1 / np.sqrt(int(np.prod(shape[1:]))))   # N(0, 1/fan_in)
    return a


def write_checkpoint(folder, cfg: CogVLM2Config, seed: int = 0, weights: dict | None = None,
                     dtype: str = "float32", shards: int = 1):
    """Write config.json, generation_config.json and safetensors in the real HF layout.

    `weights` (name -> array) overrides the random ones (e.g. trained weights); `shards` > 1 writes
    `model-0000k-of-0000n.safetensors` with a `model.safetensors.index.json`, like the release.
    The release's `rotary_emb.inv_freq` buffers are included, as in the real checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["CogVLMForCausalLM"], **cfg.to_hf(),
                                                    "torch_dtype": "bfloat16" if dtype == "bfloat16" else dtype},
                                                   indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": cfg.max_position_embeddings // 2,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.stop_ids(), "pad_token_id": cfg.pad_token_id}, indent=2))
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {}
    for spec in weight_specs(cfg):
        a = weights[spec.name] if weights is not None else random_tensor(spec.name, spec.shape, seed)
        tensors[spec.name] = np.ascontiguousarray(a.astype(np_dtype))
    d = cfg.head_dim
    inv_freq = (1.0 / 500000.0 ** (np.arange(0, d, 2) / d)).astype(np_dtype)
    for i in range(cfg.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(a.nbytes for a in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
