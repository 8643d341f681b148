"""A bundle on disk, validated from its manifest before anything is loaded.

Cheap checks always run (format version, every file present with its recorded size, sha256 of the
small files: manifest-listed graphs and the tokenizer, so a corrupted graph is caught at start).
Weight files are hashed only when asked (`verify=True`): re-hashing 40 GB on every start would
cost minutes.
"""
import hashlib
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name, a manifest's dtype for bf16 bundles)
import numpy as np

from .errors import UserError

BACKEND_OF = {"mindir": "mindspore", "onnx": "onnxruntime", "lite": "lite"}   # graph format -> the backend running it
FORMAT_VERSION = 3  # 2: chunked prefill graphs; 3: each quantized form lists its weights and onnxruntime kernel
ALWAYS_HASH_BELOW = 64 << 20  # files smaller than this are hashed on every load
# what every manifest holds (export/bundle.py), checked at load so a damaged one is a sentence, not a KeyError
MANIFEST_KEYS = {"model": dict, "dtype": str, "compute_dtype": str, "tp": int, "batch": int, "formats": list,
                 "buckets": dict, "graphs": dict, "weights": dict, "kv_cache": dict, "ranks": list,
                 "num_image_tokens": int, "tokenizer": dict, "template": str, "generation": dict, "preprocess": dict,
                 "files": dict}


@dataclass(frozen=True)
class GraphInfo:
    """One graph of a bundle, as its manifest describes it (shapes are per rank)."""
    name: str
    weights: str              # "vision" or "language": which weight list follows the data inputs
    inputs: list              # [{"name", "shape", "dtype"}]
    outputs: list
    files: dict               # format -> file in the rank folder, e.g. {"mindir": ..., "onnx": ...}

    @staticmethod
    def _specs(tensors) -> list[tuple[str, np.dtype, tuple]]:
        return [(d["name"], np.dtype(d["dtype"]), tuple(d["shape"])) for d in tensors]

    @cached_property   # read on every graph call: computed once per GraphInfo
    def input_specs(self) -> list[tuple[str, np.dtype, tuple]]:
        """(name, dtype, shape) of each data input, in call order."""
        return self._specs(self.inputs)

    @cached_property
    def output_specs(self) -> list[tuple[str, np.dtype, tuple]]:
        """(name, dtype, shape) of each output, in order."""
        return self._specs(self.outputs)

    def check_inputs(self, inputs) -> None:
        """The one input check of every backend's run(): raises ValueError unless `inputs` are this graph's
        data inputs, in number, dtype and shape."""
        specs = self.input_specs
        if len(inputs) != len(specs):
            raise ValueError(f"{self.name} takes {len(specs)} inputs, got {len(inputs)}")
        for (n, dtype, shape), x in zip(specs, inputs):
            if x.dtype != dtype or x.shape != shape:
                raise ValueError(f"{self.name} input {n}: expected {dtype.name}{list(shape)}, got {x.dtype}{list(x.shape)}")


class Bundle:
    """A bundle folder (export/bundle.py writes it): manifest.json, the tokenizer, and per rank its graph
    files and safetensors weights. Construction checks the format version and every file's size (and
    checksum: always for files under 64 MiB, for all with `verify`); raises UserError, in one sentence,
    for anything missing, damaged or of another format version."""

    def __init__(self, path, verify: bool = False):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise UserError(f"{self.path} is not a bundle (no manifest.json): create one with `cogvlm2-lite export`.")
        try:
            m = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{mf} is not valid JSON: the bundle is damaged; export it again.") from None
        if not isinstance(m, dict) or m.get("format") != "cogvlm2-lite-bundle":
            raise UserError(f"{self.path} is not a cogvlm2-lite bundle.")
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.path} has bundle format version {m.get('format_version')}, this runtime reads "
                            f"version {FORMAT_VERSION}: export the model again with this version.")
        bad = [k for k, kind in MANIFEST_KEYS.items() if not isinstance(m.get(k), kind)]
        if bad:
            raise UserError(f"{mf} lacks {', '.join(bad)} (or holds the wrong kind of value): the bundle is damaged; "
                            "export it again.")
        self.manifest = m
        self._check_files(verify)

    def _check_files(self, verify: bool):
        for rel, info in self.manifest["files"].items():
            f = self.path / rel
            if not f.is_file():
                raise UserError(f"bundle file {f} is missing: the bundle is incomplete; export it again.")
            if f.stat().st_size != info["bytes"]:
                raise UserError(f"bundle file {f} has {f.stat().st_size} bytes, the manifest says {info['bytes']}: "
                                "it is damaged; export it again.")
            if (verify or info["bytes"] < ALWAYS_HASH_BELOW) and sha256(f) != info["sha256"]:
                raise UserError(f"bundle file {f} does not match its checksum: it is damaged; export it again.")

    # --- what the runtime reads ------------------------------------------------------
    @property
    def tp(self) -> int:
        """Tensor-parallel ranks."""
        return self.manifest["tp"]

    @property
    def batch(self) -> int:
        """Rows B of the decode graphs (requests decoded together)."""
        return self.manifest["batch"]

    @property
    def buckets(self) -> dict:
        """{"chunk": prefill chunk sizes C, "decode": cache lengths T}."""
        return self.manifest["buckets"]

    def graph(self, name: str) -> GraphInfo:
        """The manifest entry of graph `name` (KeyError for another name)."""
        g = self.manifest["graphs"][name]
        return GraphInfo(name, g["weights"], g["inputs"], g["outputs"], g["files"])

    @property
    def formats(self) -> list[str]:
        """Graph file formats present (mindir, onnx): which backends can run this bundle."""
        return self.manifest["formats"]

    @property
    def graph_names(self) -> list[str]:
        """Every graph, in trace order."""
        return list(self.manifest["graphs"])

    def require(self, fmt: str, label: str, backend: str, single_rank: bool = True):
        """What a backend checks before loading: raises UserError unless this bundle has graphs of `fmt`
        (`label`: its name for people; the error names the backends of the formats it has) and, with
        `single_rank`, only one tensor-parallel rank."""
        if fmt not in self.formats:
            others = " or ".join(f"--backend {BACKEND_OF[f]}" for f in self.formats)
            raise UserError(f"{self.path} has no {label} graphs (formats: {', '.join(self.formats)}): run it with "
                            f"{others}, or export it again with --format {fmt}.")
        if single_rank and self.tp > 1:
            raise UserError(f"{self.path} is split over {self.tp} tensor-parallel ranks, which the {backend} backend "
                            "cannot run (no collectives): use --backend mindspore under msrun.")

    def rank_dir(self, rank: int) -> Path:
        """The folder of one rank's graphs and weights."""
        return self.path / self.manifest["ranks"][rank]["dir"]

    def weight_files(self, rank: int) -> list[Path]:
        """The safetensors files of one rank, in order."""
        return [self.rank_dir(rank) / f for f in self.manifest["ranks"][rank]["weight_files"]]

    def weight_names(self, family: str) -> list[str]:
        """The weights a "vision" or "language" graph takes after its data inputs, in order."""
        return self.manifest["weights"][family]

    @property
    def tokenizer_path(self) -> Path:
        """The tiktoken BPE file."""
        return self.path / self.manifest["tokenizer"]["file"]

    def weight_bytes(self, rank: int = 0) -> int:
        """Bytes of one rank's weight files."""
        files = self.manifest["files"]
        return sum(files[str(p.relative_to(self.path))]["bytes"] for p in self.weight_files(rank))


def safetensors_header(path: Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, the offsets made
    absolute in the file (8-byte header length, JSON header, then the data: the format's
    specification). Reads the header only."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: {**v, "data_offsets": [8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]]}
            for k, v in header.items() if k != "__metadata__"}


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
