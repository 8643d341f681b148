"""Export: HF checkpoint (or random init) -> a self-describing bundle.

    BUNDLE/manifest.json      everything the runtime needs to know (written last: no manifest,
                              no bundle)
    BUNDLE/tokenizer.model
    BUNDLE/rank{K}/<graph>.mindir + weights-*.safetensors   (this rank's slice of every weight)
    BUNDLE/rank0/<graph>.onnx                                (--format onnx: the same graphs, tp 1 only)

Graph files hold no weights (weights are graph inputs), so each rank's weights are stored once
and shared by every graph at run time. The bundle is built in a sibling staging folder and moved
into place only when complete, so a failed export never leaves something that looks valid.
"""
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cogvlm2_lite.calib.stats import STATS_FILE
from cogvlm2_lite.graphs.config import CogVLM2Config
from cogvlm2_lite.graphs.entry import NUMPY_NAMES
from cogvlm2_lite.graphs.model import weight_specs
from cogvlm2_lite.graphs.quant import SCHEMES as QUANT_SCHEMES, Quantizer
from cogvlm2_lite.runtime.bundle import FORMAT_VERSION, sha256
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.preprocess import MEAN, STD
from cogvlm2_lite.runtime.progress import Progress, duration, size
from cogvlm2_lite.runtime.tokenizer import TEMPLATES

from .hf_checkpoint import Checkpoint, random_tensor
from .tp import check_tp, shard_index
from . import trace as trace_module
from .eta import BYTES, GRAPH, ExportEta, estimate, probe_graphs, probe_weights
from .trace import KERNELS_SUFFIX, Plan, prepare_tracing, trace_graph, trace_rank

SHARD_BYTES = 256 << 20  # weight files are cut at 256 MiB: bounds the memory of export and of loading
FORMATS = ("mindir", "onnx", "lite")
GRAPH_SUFFIX = {"mindir": ".mindir", "onnx": ".onnx", "lite": ".lite.mindir"}


def default_buckets(cfg: CogVLM2Config) -> dict:
    """Buckets sensible for the model: prefill chunks of 16/64/256 tokens (a prompt of n tokens costs
    about n tokens of compute, padding only in its last chunk); decode over caches of 512/2048/3072/
    4096/8192 slots for the 19B (3072: an image prompt and ~640 new tokens). Small configs get the
    same lists clipped to their context."""
    m, n = cfg.max_position_embeddings, cfg.num_image_tokens

    def clip(sizes):
        return sorted({min(s, m) for s in sizes})
    first_image = -(-(n + 126) // 128) * 128
    decode = clip((512, 2048, first_image + 640, 4096, 8192))
    return {"chunk": sorted({c for c in (16, 64, 256) if c < max(decode)}), "decode": decode}


class Source:
    """Where tensors come from: an HF checkpoint, or deterministic random init of a config."""

    def __init__(self, checkpoint: Checkpoint | None, cfg: CogVLM2Config, seed: int = 0):
        self.checkpoint, self.cfg, self.seed = checkpoint, cfg, seed

    def read(self, spec, index=()):
        if self.checkpoint is not None:
            return self.checkpoint.read(spec.name, index)
        full = random_tensor(spec.name, spec.shape, self.seed)
        return full[index] if index else full

    def nbytes(self, spec) -> int:
        """Bytes read for the tensor: as the checkpoint stores it, or as random init draws it (fp32)."""
        if self.checkpoint is not None:
            return self.checkpoint.nbytes(spec.name)
        return int(np.prod(spec.shape, dtype=np.int64)) * 4


def rank_tensors(spec, full: np.ndarray, tp: int, dtype: str, quantizer=None):
    """One checkpoint tensor -> (rank, stored name, array) of every stored form (quantized with a quantizer),
    cut for every rank and cast."""
    for stored, tensor in (quantizer.tensors(spec, full) if quantizer else [(spec, full)]):
        for r in range(tp):
            parts = [tensor[index] for index in shard_index(stored, r, tp)]
            a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=stored.split.dim)
            yield r, stored.name, np.ascontiguousarray(a.astype(stored.dtype or NUMPY_NAMES[dtype]))


def write_weights(source: Source, tp: int, dtype: str, staging: Path, phase, quantizer=None) -> tuple[list, dict]:
    """One pass over the checkpoint: each tensor is read once, cut for every rank, cast, and
    streamed into rank{K}/weights-NNNNN.safetensors files, each hashed as soon as written (while its
    pages are fresh). Peak memory is one full tensor plus the pending shard of each rank. `phase`
    counts the bytes read -> ([the weight files of each rank], {path in the bundle: {bytes, sha256}})."""
    files = [[] for _ in range(tp)]
    pending = [{} for _ in range(tp)]
    sizes = [0] * tp
    digests = {}
    for r in range(tp):
        (staging / f"rank{r}").mkdir(exist_ok=True)

    def flush(r):
        name = f"weights-{len(files[r]):05d}.safetensors"
        path = staging / f"rank{r}" / name
        save_file(pending[r], str(path))
        digests[f"rank{r}/{name}"] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        files[r].append(name)
        pending[r], sizes[r] = {}, 0
    for spec in weight_specs(source.cfg):
        full = source.read(spec, ())
        for r, name, a in rank_tensors(spec, full, tp, dtype, quantizer):
            pending[r][name] = a
            sizes[r] += a.nbytes
            if sizes[r] >= SHARD_BYTES:
                flush(r)
        del full
        phase.update(source.nbytes(spec))
    for r in range(tp):
        if pending[r]:
            flush(r)
    return files, digests


def read_tokenizer_ranks(path: Path) -> int:
    """The number of BPE ranks of a tiktoken file (its special tokens follow). Raises UserError for another file."""
    try:
        lines = [ln for ln in path.read_bytes().splitlines() if ln.strip()]
        ranks = [int(ln.split()[1]) for ln in lines]
    except (OSError, ValueError, IndexError):
        raise UserError(f"{path} is not a tiktoken BPE file (lines of 'base64-token rank').") from None
    if ranks != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1} in order; not a tiktoken BPE file.")
    return len(ranks)


def check_tokenizer(path: Path, cfg: CogVLM2Config) -> int:
    """The tokenizer's BPE ranks, checked against the model's bos id and vocabulary (UserError otherwise)."""
    n = read_tokenizer_ranks(path)
    if n != cfg.bos_token_id or n + 256 > cfg.vocab_size:
        raise UserError(f"tokenizer {path} has {n} BPE ranks, so its special tokens are {n}..{n + 255}, but the "
                        f"model's bos id is {cfg.bos_token_id} and its vocabulary {cfg.vocab_size}: "
                        "pass the tokenizer this checkpoint was trained with (--tokenizer).")
    return n


def generation_defaults(folder: Path | None) -> dict:
    """The sampling defaults of the checkpoint's generation_config.json that the manifest carries."""
    f = folder / "generation_config.json" if folder else None
    g = json.loads(f.read_text()) if f and f.is_file() else {}
    return {k: g[k] for k in ("do_sample", "temperature", "top_p", "top_k", "max_length", "eos_token_id") if k in g}


def tool_versions(formats=("mindir",)) -> dict:
    """Versions of the tools that wrote the bundle (the manifest's `tools`)."""
    v = {"python": platform.python_version()}
    for pkg in ("cogvlm2-lite", "mindspore", "numpy", "safetensors") + (("onnx",) if "onnx" in formats or "lite" in formats else ()):
        v[pkg] = metadata.version(pkg)
    return v


def trace_all_ranks(plan: Plan, staging: Path, progress: Progress):
    """tp 1: trace here, a phase per graph. tp > 1: every rank traces its graphs (with collectives) under
    msrun, one phase."""
    if plan.tp == 1:
        trace_rank(plan, staging / "rank0", progress)
        return
    n_graphs = sum(1 for _ in plan.graphs())
    with progress.phase(f"graphs: {n_graphs} on each of {plan.tp} ranks under msrun", unit=GRAPH):
        trace_under_msrun(plan, staging, n_graphs)


def trace_under_msrun(plan: Plan, staging: Path, n_graphs: int):
    """Every rank's graphs (n_graphs each) traced by msrun's workers (export/trace.py)."""
    (staging / "plan.json").write_text(json.dumps(plan.__dict__))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msrun = Path(sys.executable).parent / "msrun"
    cmd = [str(msrun), f"--worker_num={plan.tp}", f"--local_worker_num={plan.tp}", f"--master_port={port}",
           "--join=True", f"--log_dir={staging / 'msrun_logs'}",
           trace_module.__file__, str(staging / "plan.json")]
    env = {**os.environ, "PATH": f"{msrun.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # msrun runs `python`
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or any(len(list((staging / f"rank{r}").glob("*.mindir"))) != n_graphs
                                   for r in range(plan.tp)):
        logs = "\n".join(p.read_text()[-2000:] for p in sorted((staging / "msrun_logs").glob("*.log")))
        raise RuntimeError(f"tracing under msrun failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{logs}")
    (staging / "plan.json").unlink()
    shutil.rmtree(staging / "msrun_logs", ignore_errors=True)


def stats_metadata(path: Path) -> dict:
    """The metadata a calibration statistics file carries (samples, source), for the manifest."""
    with safe_open(str(path), "numpy") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def build_manifest(plan: Plan, staging: Path, tokenizer_ranks: int, generation: dict, weight_files: list,
                   quantizer=None, digests: dict | None = None) -> dict:
    """The manifest of the bundle staged in `staging`: everything a runtime needs to run it, and every file's size
    and sha256 (those in `digests`, {path: {bytes, sha256}}, as given: computed as they were written)."""
    cfg = plan.cfg
    graphs = {}
    for g in plan.graphs():
        family = "vision" if g.name == "vision" else "language"
        files = {f: f"{g.name}{GRAPH_SUFFIX[f]}" for f in plan.formats}
        if (staging / "rank0" / f"{g.name}{KERNELS_SUFFIX}").is_file():   # the ONNX graph with our own kernels
            files["onnx_kernels"] = f"{g.name}{KERNELS_SUFFIX}"
        graphs[g.name] = {
            "files": files, "weights": family,
            "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in g.inputs],
            "outputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in g.outputs]}
        if "lite" in plan.formats:  # how its Lite file takes and multiplies its weights (export/lite_export.py)
            from .lite_export import lite_form
            graphs[g.name]["lite"] = lite_form(g.name, plan.batch)
    vision_names = next(plan.graphs()).table.names
    language_names = [s.name for s in weight_specs(cfg, plan.quant, plan.tp)][len(vision_names):]
    stop_ids = list(dict.fromkeys(cfg.stop_ids() + list(np.atleast_1d(generation.get("eos_token_id", [])).tolist())))
    manifest = {
        "format": "cogvlm2-lite-bundle", "format_version": FORMAT_VERSION,
        "model": cfg.to_hf(), "dtype": plan.dtype, "compute_dtype": NUMPY_NAMES[plan.dtype],
        "tp": plan.tp, "batch": plan.batch, "formats": list(plan.formats),
        "buckets": {"chunk": plan.chunk_buckets, "decode": plan.decode_buckets},
        "graphs": graphs,
        "weights": {"vision": vision_names, "language": language_names},
        "kv_cache": {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_multi_query_heads // plan.tp,
                     "head_dim": cfg.head_dim, "max_len": max(plan.decode_buckets), "dtype": NUMPY_NAMES[plan.dtype]},
        "ranks": [{"dir": f"rank{r}", "weight_files": weight_files[r]} for r in range(plan.tp)],
        "num_image_tokens": cfg.num_image_tokens,
        "tokenizer": {"file": "tokenizer.model", "bpe_ranks": tokenizer_ranks, "bos_id": cfg.bos_token_id,
                      "pad_id": cfg.pad_token_id, "stop_ids": stop_ids},
        "template": cfg.template_version,
        "generation": generation,
        "preprocess": {"image_size": cfg.vision.image_size, "resample": "bicubic", "rescale": 1 / 255,
                       "mean": list(MEAN), "std": list(STD)},
        "tools": tool_versions(plan.formats),
    }
    if quantizer is not None:
        manifest["quant"] = quantizer.manifest(weight_specs(cfg))
        if quantizer.stats:
            manifest["calibration"] = {"file": STATS_FILE, **stats_metadata(staging / STATS_FILE)}
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    digests = digests or {}
    manifest["files"] = {str(p.relative_to(staging)): digests.get(str(p.relative_to(staging)))
                         or {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    return manifest


def export_bundle(out: Path, *, hf_dir: Path | None = None, random_init: CogVLM2Config | None = None,
                  tokenizer: Path | None = None, tp: int = 1, dtype: str = "fp32", batch: int = 1,
                  buckets: dict | None = None, force: bool = False, seed: int = 0, progress: bool = True,
                  formats=("mindir",), quant: str | None = None, calib_stats: Path | None = None,
                  smooth_alpha: float = 0.5) -> Path:
    """Export a CogVLM2 model into the bundle folder `out` -> out.

    The weights come from `hf_dir` (a HF checkpoint folder: config.json + safetensors, read tensor by
    tensor) or, with `random_init`, are drawn for that config from `seed`. `tokenizer`: the tiktoken file
    (default hf_dir/tokenizer.model). `tp`: tensor-parallel ranks (1, 2, 4, 8; the graphs are traced under
    msrun when > 1). `dtype`: fp32 | fp16 | bf16 of weights and compute. `batch`: rows B of the decode
    graphs. `buckets`: {"chunk": [C...], "decode": [T...]} (default: default_buckets(cfg)).
    `formats`: any of mindir, onnx, lite. `quant`: w8a16 | w8a8 | w4a16 | w4a8 (graphs/quant.py), with
    `calib_stats` (calibrate's file; needed by w8a8) and SmoothQuant's `smooth_alpha`. `force` replaces a
    non-empty `out`; `progress` shows the export's phases on stderr (runtime/progress.py): the plan, the
    weights in bytes, then each graph trace, with the time the export has left (export/eta.py).

    The bundle is built in a hidden sibling folder and moved into place when complete; memory stays
    bounded by one tensor plus the pending weight shard. Raises UserError, before any work where it can,
    for every argument this model or machine cannot take (docs/bundle.md)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} already exists and is not empty: choose another folder or pass --force to replace it.")
        if not (out / "manifest.json").is_file():   # --force replaces a bundle, never another folder
            raise UserError(f"{out} is not a bundle (no manifest.json): --force replaces only an earlier export; "
                            "choose another folder.")
        if hf_dir is not None and Path(hf_dir).resolve().is_relative_to(out.resolve()):
            raise UserError(f"{out} holds the checkpoint being exported: choose another folder for the bundle.")
    if dtype not in NUMPY_NAMES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(NUMPY_NAMES)}.")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}.")
    formats = check_formats(formats, tp, dtype)
    quantizer = make_quantizer(quant, tp, calib_stats, smooth_alpha)
    if quantizer is not None and "lite" in formats:
        raise UserError("--quant cannot be combined with --format lite: MindSpore Lite 2.0's CPU Cast cannot read int8 "
                        "(measured), so its graphs could not dequantize; quantized bundles run on mindspore and "
                        "onnxruntime. For Lite on Ascend, quantize with Lite's own converter (docs/quantization.md).")
    checkpoint = Checkpoint(hf_dir) if hf_dir is not None else None
    cfg = checkpoint.config if checkpoint else random_init
    if cfg.template_version not in TEMPLATES:
        raise UserError(f"config.json: template_version {cfg.template_version!r} is not a CogVLM2 prompt template "
                        f"({', '.join(TEMPLATES)}).")
    check_tp(cfg, tp)
    if quantizer is not None and quantizer.stats:
        check_stats(cfg, quantizer.stats, calib_stats)
    if checkpoint:
        checkpoint.validate()
    tokenizer = tokenizer or (hf_dir / "tokenizer.model" if hf_dir else None)
    if tokenizer is None or not Path(tokenizer).is_file():
        raise UserError(f"no tokenizer.model in {hf_dir}: pass the Llama-3 tiktoken file with --tokenizer PATH."
                        if hf_dir else "--random-init needs --tokenizer PATH (a tiktoken BPE file).")
    tokenizer_ranks = check_tokenizer(Path(tokenizer), cfg)
    b = {**default_buckets(cfg), **(buckets or {})}
    check_buckets(cfg, b)
    plan = Plan(cfg.to_hf(), dtype, tp, batch, b["chunk"], b["decode"], formats, quant)
    source = Source(checkpoint, cfg, seed)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write the bundle into {out.parent} ({e.strerror or e}): choose a folder you can "
                        "write.") from None
    try:
        shown = plan_progress(plan, source, quantizer, staging, progress)
        with shown.phase("weights", total=shown.eta.weight_bytes, unit=BYTES, unit_scale=True) as phase:
            weight_files, digests = write_weights(source, tp, dtype, staging, phase, quantizer)
        trace_all_ranks(plan, staging, shown)
        shutil.copyfile(tokenizer, staging / "tokenizer.model")
        if quantizer is not None and quantizer.stats:  # the quantized bundle carries what it was made from
            shutil.copyfile(calib_stats, staging / STATS_FILE)
        for p in [staging, *staging.rglob("*")]:  # mkdtemp and ms.export create owner-only modes
            p.chmod(0o755 if p.is_dir() else 0o644)
        manifest = build_manifest(plan, staging, tokenizer_ranks, generation_defaults(hf_dir), weight_files, quantizer,
                                  digests)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def plan_progress(plan: Plan, source: Source, quantizer, staging: Path, enabled: bool) -> Progress:
    """The export's Progress, its ETA measured (export/eta.py) when shown, after its first line: the plan
    (tensors, bytes read and written, graphs) with the time each phase should take, from a few tensors
    converted and a short graph of each family traced now."""
    specs = weight_specs(plan.cfg)
    graphs = [g.name for g in plan.graphs()]
    weight_bytes = sum(source.nbytes(s) for s in specs)
    if not enabled:
        return Progress(False, eta=ExportEta([(g, 0.0) for g in graphs], weight_bytes, (1, 1.0)))
    probed = probe_weights(source, specs, lambda spec, full: sum(1 for _ in rank_tensors(spec, full, plan.tp,
                                                                                       plan.dtype, quantizer)))
    prepare_tracing()
    probed_graphs = probe_graphs(plan, trace_graph, staging / "probe")
    shutil.rmtree(staging / "probe")
    estimates = [(g, estimate(g, plan.cfg, probed_graphs)) for g in graphs]
    if plan.tp > 1:   # one phase: the ranks trace side by side, each about as long as one process alone
        estimates = [("graphs under msrun", sum(e for _, e in estimates))]
    eta = ExportEta(estimates, weight_bytes, probed)
    written = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype or NUMPY_NAMES[plan.dtype]).itemsize
                  for s in weight_specs(plan.cfg, plan.quant, plan.tp))
    progress = Progress(enabled, eta=eta)
    weights_s, graphs_s = weight_bytes / eta.weights_rate(), sum(e for _, e in estimates)
    progress.note(f"export: {len(specs)} tensors, {size(weight_bytes)} read and {size(written)} written "
                  f"(~{duration(weights_s)}), then {len(graphs)} graphs to trace"
                  f"{f' on each of {plan.tp} ranks' if plan.tp > 1 else ''} (~{duration(graphs_s)})")
    return progress


def make_quantizer(quant: str | None, tp: int, calib_stats: Path | None, alpha: float):
    """The scheme's Quantizer (None: no quantization), refusing what cannot be made before any work."""
    if quant is None:
        if calib_stats is not None:
            raise UserError("--calib-stats is only used with --quant.")
        return None
    if quant not in QUANT_SCHEMES:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANT_SCHEMES)}.")
    if QUANT_SCHEMES[quant].calibrated and calib_stats is None:
        raise UserError(f"--quant {quant} needs activation statistics: run `cogvlm2-lite calibrate FP32_BUNDLE` and pass "
                        "--calib-stats FP32_BUNDLE/calib_stats.safetensors.")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--smooth-alpha must be within 0..1, not {alpha}.")
    stats = None
    if calib_stats is not None:
        try:
            stats = load_file(str(calib_stats))
        except Exception as e:  # OSError, or safetensors' own error for a bad header
            raise UserError(f"{calib_stats} is not a calibration statistics file ({e}).") from None
    return Quantizer(quant, tp, stats, alpha)


def check_stats(cfg: CogVLM2Config, stats: dict, path: Path):
    """Statistics must be this model's: per-input-channel vectors of its linear layers."""
    widths = {spec.name: int(np.prod(spec.shape[1:])) for spec in weight_specs(cfg)}
    known = [n for n in stats if n in widths]
    if not known:
        raise UserError(f"{path} names none of this model's linear layers: it holds the statistics of another model.")
    for n in known:
        if stats[n].shape != (widths[n],):
            raise UserError(f"{path}: the statistics of {n} have shape {list(stats[n].shape)}, but the layer takes "
                            f"{widths[n]} inputs: they belong to another model.")


def check_formats(formats, tp: int, dtype: str) -> list:
    """'mindir,onnx' or a sequence -> the formats in canonical order; refuses unknown ones and ONNX with tp > 1."""
    if isinstance(formats, str):
        formats = formats.split(",")
    wanted = {f.strip().lower() for f in formats if f.strip()}
    unknown = sorted(wanted - set(FORMATS))
    if unknown or not wanted:
        raise UserError(f"--format {','.join(formats) or '(empty)'}: choose one or more of {', '.join(FORMATS)}, "
                        "comma-separated (e.g. mindir,onnx).")
    if "onnx" in wanted or "lite" in wanted:  # lite graphs are converted from the ONNX graphs
        from .onnx_export import check_onnx_plan
        check_onnx_plan(tp, dtype)
    if "lite" in wanted:
        from .lite_export import check_lite_plan
        check_lite_plan(dtype)
    return [f for f in FORMATS if f in wanted]


def check_buckets(cfg: CogVLM2Config, b: dict):
    """Every size within the model's reach; the largest cache holds an image prompt and a token."""
    n, m = cfg.num_image_tokens, cfg.max_position_embeddings
    for kind in ("chunk", "decode"):
        if not b[kind]:
            raise UserError(f"at least one {kind} bucket is needed (--buckets '{kind}=...').")
        for s in b[kind]:
            if s < 1 or s > 4 * m:
                raise UserError(f"{kind} bucket {s} is outside 1..{4 * m}.")
    top = max(b["decode"])
    if top < n + 2:
        raise UserError(f"the largest decode bucket ({top}) cannot hold an image prompt (bos and {n} image tokens) and "
                        f"one new token: use at least {n + 2}.")
    if min(b["chunk"]) > min(b["decode"]):
        raise UserError(f"the smallest chunk bucket ({min(b['chunk'])}) must fit in the smallest decode bucket "
                        f"({min(b['decode'])}): every cache bucket needs a prefill chunk.")


def _replace(staging: Path, out: Path):
    """Move the finished bundle into place; an old one (with --force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
