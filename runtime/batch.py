"""`cogvlm2-lite batch BUNDLE IN.jsonl OUT.jsonl`: batch file inference that never loses a line.

Every non-blank input line gets exactly one output line, a result or a one-sentence error:

    in:  {"id", "prompt", "image" (path relative to IN's folder; absent/null: text-only),
          max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop (optional; the CLI
          flags apply to the fields a line leaves out), "history": [[q, a], ...], "template",
          "response_format" (OpenAI's: json_object or json_schema)}
    out: {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s",
          "total_s", "tokens_per_s"}  (Result.to_json)
         {"id", "error"}                     a line that cannot run (bad image, bad values, ...)
         {"id": id|null, "line": N, "error"} a line without a usable id (malformed JSON, no id,
                                             a repeated id): keyed by its line number instead
Fields the runtime does not know (e.g. an "answer" kept for evaluation) are ignored.

Crash safety. OUT is opened for appending and locked; each line is one os.write of complete
JSON + newline (a killed process loses at most the requests in flight, never a written line; the
OS has it even on SIGKILL) and OUT is fsync'ed every `fsync_interval` seconds against power loss.
A later run with the same arguments reads OUT first: a torn last line (no newline) is cut off,
and every id already in OUT is skipped, so each input line ends up in OUT exactly once and
finished lines are never rewritten. Error lines count as finished; `--retry-errors` runs them again:
OUT without them is written beside it and renamed over it (a crash leaves the old OUT or the new
one), and their new lines are appended at the end. An fsync per line costs 2.5-10 ms on a virtual
disk, a sizeable part of a small model's request, hence periodic by default. With `ordered`,
completed lines wait in memory until all earlier ones are written, so OUT is in input order (also
across a resume: what is done is recomputed from OUT).

Throughput. A background thread parses, validates, loads and preprocesses the next lines into a
bounded queue while the graphs run, and lines go through the in-flight scheduler (scheduler.py):
a line takes the first free of the bundle's B rows, image and text-only lines side by side, and
a short answer frees its row at once for the next line. Results do not depend on what shares the
rows: rows never read each other's K/V, the prefix cache is off, and every line has its own random
stream.
"""
import fcntl
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from .errors import UserError
from .msrun import cluster_option, relaunch_under_msrun
from . import batch_openai
from .openai_api import ApiError
from .options import open_engine, sampling_options, sampling_params

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")
KNOWN_FIELDS = {"id", "prompt", "image", "history", "template", "response_format", *SAMPLING_FIELDS}
_END = object()


@dataclass
class Summary:
    ok: int = 0
    errors: int = 0
    skipped: int = 0                 # lines already in OUT from an earlier run
    tokens: int = 0                  # generated (completion) tokens
    seconds: float = 0.0             # from the first line to the last write
    repaired_bytes: int = 0          # torn tail cut off OUT
    retried: int = 0                 # error lines dropped from OUT to run again (--retry-errors)
    batches: int = 0
    unknown_fields: Counter = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        s = (f"batch: {self.ok} ok, {self.errors} errors, {self.skipped} skipped (already in OUT); "
             f"{self.tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_s:.1f} tokens/s, "
             f"{self.requests_per_s:.2f} requests/s")
        if self.repaired_bytes:
            s += f"; cut a torn last line ({self.repaired_bytes} bytes) off OUT"
        if self.retried:
            s += f"; ran {self.retried} earlier error lines again"
        if self.unknown_fields:
            s += "; ignored fields " + ", ".join(f"{k!r} ({n})" for k, n in self.unknown_fields.most_common(5))
        return s


@dataclass
class _Pending:
    seq: int                # position among this run's pending lines (the order of `ordered`)
    lineno: int
    id: object
    raw: bytes | None       # the line, parsed again on the preparation thread
    error: str | None       # known from the first pass already (no id, malformed, repeated id)
    by_line: bool           # keyed by line number in OUT (no usable id)


@dataclass
class _Item:
    seq: int
    id: object
    lineno: int
    by_line: bool
    request: object = None
    error: str | None = None
    status: int = 400                # an OpenAI line's answer status for `error`


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _out_key(obj) -> tuple:
    if "line" in obj:
        return ("line", obj["line"])
    return ("id", _id_key(obj[batch_openai.KEY] if batch_openai.KEY in obj else obj["id"]))


# --- OUT: recover what is done, then append ------------------------------------------------------
def resume(out_path: Path, fd: int | None, summary: Summary, retry_errors: bool = False) -> tuple[int | None, set]:
    """Make OUT ready to append to -> (its fd, a new one after --retry-errors dropped lines; the keys of the
    lines done). `fd` None: only read OUT (msrun's other ranks: they must see what rank 0 sees)."""
    if retry_errors and fd is not None:
        fd, summary.retried = drop_error_lines(out_path, fd)
    done, summary.repaired_bytes = recover(out_path, fd, retry_errors)
    return fd, done


def _is_error(obj) -> bool:
    """An OUT line that reports a line which could not run ({"id", "error"}, or an OpenAI line's 4xx)."""
    if isinstance(obj, dict) and batch_openai.KEY in obj:
        return batch_openai.is_error(obj)
    return isinstance(obj, dict) and "error" in obj


def _is_error_line(line: bytes) -> bool:
    try:
        return line.endswith(b"\n") and _is_error(json.loads(line))
    except ValueError:
        return False


def drop_error_lines(out_path: Path, fd: int) -> tuple[int, int]:
    """OUT without its error lines, so that they run again -> (the new OUT's fd, locked; lines dropped).
    The new OUT is written beside it and renamed over it: a crash leaves the old OUT or the new one,
    never a line less of what was answered. `fd` (the old OUT's) is closed."""
    with open(out_path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if not _is_error_line(line)]
    if len(kept) == len(lines):
        return fd, 0
    tmp = out_path.with_name(out_path.name + ".retry")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    new = _open_output(out_path)
    os.close(fd)
    return new, len(lines) - len(kept)


def recover(out_path: Path, fd: int | None = None, skip_errors: bool = False) -> tuple[set, int]:
    """Keys of the lines already in OUT (but its error lines with `skip_errors`), and the size of a torn
    last line (cut off when `fd`, OUT opened for writing, is given; only read otherwise)."""
    done = set()
    if not out_path.exists():
        return done, 0
    good = 0
    torn = 0
    with open(out_path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                torn = len(line)
                break
            good += len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not (skip_errors and _is_error(obj)):
                    done.add(_out_key(obj))
            except (ValueError, TypeError, KeyError):
                raise UserError(f"{out_path} line {n} is not a batch result line: pass a new OUT path, or the "
                                "OUT of an earlier run of this command to resume it.") from None
    if torn and fd is not None:
        os.ftruncate(fd, good)
    return done, torn


class _Writer:
    """One os.write per complete line; in `ordered` mode lines wait for every earlier seq."""

    def __init__(self, fd, ordered, fsync_interval):
        self.fd, self.ordered, self.fsync_interval = fd, ordered, fsync_interval
        self.waiting = {}
        self.next_seq = 0
        self.last_sync = time.monotonic()
        self.unsynced = False

    def put(self, seq, obj):
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        if not self.ordered:
            self._write(data)
            return
        self.waiting[seq] = data
        while self.next_seq in self.waiting:
            self._write(self.waiting.pop(self.next_seq))
            self.next_seq += 1

    def _write(self, data):
        if self.fd is None:  # a tensor-parallel rank other than 0
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.unsynced = True
        if self.fsync_interval <= 0 or time.monotonic() - self.last_sync >= self.fsync_interval:
            self.sync()

    def sync(self):
        if self.fd is not None and self.unsynced:
            os.fsync(self.fd)
            self.unsynced = False
        self.last_sync = time.monotonic()


# --- the run ---------------------------------------------------------------------------------------
def is_openai_file(in_path: Path) -> bool:
    """Whether IN is an OpenAI Batch API file (batch_openai.py), from its first non-blank line."""
    try:
        with open(in_path, "rb") as f:
            return batch_openai.is_openai_file(next((line for line in f if line.strip()), b""))
    except OSError as e:
        raise UserError(f"input file {in_path} cannot be read ({e.strerror}); check the path.") from None


def scan(in_path: Path, done: set, summary: Summary, key: str = "id") -> list[_Pending]:
    """First pass over IN: ids (the `key` field), repeated ids, malformed lines; the lines not yet in OUT."""
    pending = []
    first = {}
    try:
        f = open(in_path, "rb")
    except OSError as e:
        raise UserError(f"input file {in_path} cannot be read ({e.strerror}); check the path.") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            id_, error, by_line = None, None, True
            try:
                obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip())
            except UnicodeDecodeError:
                error = f"line {lineno} is not UTF-8 text; save the file as UTF-8."
            except json.JSONDecodeError as e:
                error = f"line {lineno} is not valid JSON ({e.msg} at column {e.colno}); fix the line."
            else:
                if not isinstance(obj, dict):
                    error = f"line {lineno} is not a JSON object; write one {{\"id\": ..., \"prompt\": ...}} per line."
                elif obj.get(key) is None:
                    error = f"line {lineno} has no \"{key}\"; give every line a unique string or integer {key}."
                elif isinstance(obj[key], bool) or not isinstance(obj[key], (str, int)):
                    error = (f"line {lineno} has {key} {json.dumps(obj[key])}; an id must be a string or an "
                             "integer.")
                else:
                    id_ = obj[key]
                    seen = _id_key(id_)
                    if seen in first:
                        error = (f"{key} {seen} on line {lineno} repeats the {key} of line {first[seen]}; "
                                 "give every line a unique id.")
                    else:
                        first[seen] = lineno
                        by_line = False
                    if key == "id":
                        summary.unknown_fields.update(k for k in obj if k not in KNOWN_FIELDS)
            if (("line", lineno) if by_line else ("id", _id_key(id_))) in done:
                summary.skipped += 1
                continue
            pending.append(_Pending(len(pending), lineno, id_, None if error else raw, error, by_line))
    return pending


class _Preparer:
    """Builds engine Requests from pending lines: validation, tokens, image pixels (background thread)."""

    def __init__(self, engine, in_dir: Path, defaults: dict, template: str | None, openai: bool = False):
        self.engine, self.in_dir, self.defaults, self.openai = engine, in_dir, defaults, openai
        self.template = template or engine.template
        self.pre = engine.pre

    def __call__(self, p: _Pending) -> _Item:
        item = _Item(p.seq, p.id, p.lineno, p.by_line, error=p.error)
        if item.error is None:
            try:
                obj = json.loads(p.raw.decode("utf-8-sig"))
                request = batch_openai.request(obj, self.in_dir, self.engine) if self.openai else self._request(obj)
                item.request = self.engine.prepare(request)   # tokenized here, on this thread, once
            except ApiError as e:
                item.error, item.status = e.message, e.status
            except UserError as e:
                item.error = str(e)
            except Exception as e:  # an input that breaks a library: that line's error, not the run's
                item.error = f"line {p.lineno} could not be prepared ({type(e).__name__}: {e})."
        return item

    def _request(self, obj):
        from .engine import Request
        from .preprocess import load_image, preprocess
        from .sampling import SamplingParams
        from .structured import grammar, schema_of
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise UserError("the line has no \"prompt\" string; give the question as text."
                            if prompt is None else f"\"prompt\" must be a string, not {type(prompt).__name__}.")
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            raise UserError(f"\"image\" must be a file path string or null, not {type(image).__name__}.")
        if image is not None and not image.strip():
            raise UserError("\"image\" is empty: give a file path relative to the input file's folder, or leave the "
                            "field out (or null) for a text-only line.")
        history = obj.get("history")
        if history is None:
            history = []
        if not isinstance(history, list):
            raise UserError("\"history\" must be a list of [question, answer] pairs.")
        history = tuple(tuple(t) if isinstance(t, list) else t for t in history)
        template = obj.get("template")
        if template is None:
            template = self.template
        elif not isinstance(template, str):
            raise UserError(f"\"template\" must be a string, not {type(template).__name__}.")
        schema = schema_of(obj.get("response_format"))
        if schema is not None:
            grammar(schema)  # an unusable schema is this line's error now, not the run's later
        params = SamplingParams(**{**self.defaults, "json_schema": schema,
                                   **{k: obj[k] for k in SAMPLING_FIELDS if obj.get(k) is not None}})
        pixels = None
        if image is not None:
            s = self.pre["image_size"]
            pixels = preprocess(load_image(self.in_dir / image), s, self.pre["mean"], self.pre["std"],
                                out=np.empty((3, s, s), np.float32))
        return Request(prompt, image=pixels, history=history, template=template, params=params)


def run_batch(engine, in_path, out_path, *, defaults: dict | None = None, template: str | None = None,
              ordered: bool = False, fsync_interval: float = 1.0, progress: bool | None = None,
              retry_errors: bool = False) -> Summary:
    """The Python API of the command: run every line of IN not yet in OUT through `engine`,
    appending to OUT. `defaults`: SamplingParams fields for lines that leave them out;
    `template`: for lines without one (None: the bundle's); `retry_errors`: run OUT's error lines again."""
    in_path, out_path = Path(in_path), Path(out_path)
    summary = Summary()
    fd = _open_output(out_path)
    try:
        fd, done = resume(out_path, fd, summary, retry_errors)
        openai = is_openai_file(in_path)
        pending = scan(in_path, done, summary, batch_openai.KEY if openai else "id")
        _run(engine, pending, _Preparer(engine, in_path.parent, defaults or {}, template, openai),
             _Writer(fd, ordered, fsync_interval), summary, progress)
    finally:
        if fd is not None:
            os.close(fd)
    return summary


def _open_output(out_path: Path) -> int:
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"output file {out_path} cannot be opened for writing ({e.strerror}); check the path.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another batch run is writing {out_path}; wait for it to finish or pick another "
                        "output file.") from None
    return fd


def _run(engine, pending, prepare, writer, summary, progress):
    from tqdm import tqdm
    b = engine.batch
    q = queue.Queue(maxsize=2 * b)
    stop = threading.Event()

    def put(x):
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for p in pending:
                if not put(prepare(p)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            put(_Failure(e))

    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=len(pending), unit="line", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    scheduler = engine.scheduler
    start = time.perf_counter()

    def emit(item, obj):
        writer.put(item.seq, obj)
        bar.update(1)
        summary.seconds = time.perf_counter() - start
        if summary.seconds > 0:
            bar.set_postfix_str(f"{summary.tokens_per_s:.1f} tok/s", refresh=False)

    model = engine.bundle.path.resolve().name

    def token_bytes(token):
        return engine.tokenizer.decode_bytes([token]) if 0 <= token < engine.tokenizer.vocab_size else b""

    def fail(item, message):
        summary.errors += 1
        if prepare.openai:
            emit(item, batch_openai.error_line(item.id, message, item.status, item.lineno if item.by_line else None))
        else:
            emit(item, {"id": item.id, "line": item.lineno, "error": message} if item.by_line
                 else {"id": item.id, "error": message})

    def finished(item, seq):
        r = seq.result()
        summary.ok += 1
        summary.tokens += r.completion_tokens
        emit(item, batch_openai.result_line(item.id, r, model, token_bytes) if prepare.openai
             else {"id": item.id, **r.to_json()})

    thread = threading.Thread(target=produce, name="batch-prepare", daemon=True)
    thread.start()
    ended = False
    with scheduler.policy(prefix_cache=False):  # each line's result independent of the previous one
        try:
            while not ended or scheduler.busy:
                while not ended and len(scheduler.queue) < b:  # B lines waiting: a freed row never waits for the reader
                    try:
                        item = q.get_nowait() if scheduler.busy else q.get()
                    except queue.Empty:
                        break
                    if item is _END:
                        ended = True
                    elif isinstance(item, _Failure):
                        raise item.exc
                    elif item.error is not None:
                        fail(item, item.error)
                    else:
                        try:
                            engine.add(item.request, on_finish=lambda seq, item=item: finished(item, seq))
                        except UserError as e:
                            fail(item, str(e))
                if scheduler.busy:
                    engine.step()
            if writer.waiting:
                raise RuntimeError(f"batch: {len(writer.waiting)} ordered lines were never written")  # a bug
        finally:
            stop.set()
            writer.sync()
            bar.close()
            thread.join(timeout=5)
            summary.seconds = time.perf_counter() - start
    return summary


# --- the command -------------------------------------------------------------------------------------
@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("in_file", metavar="IN.jsonl", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_file", metavar="OUT.jsonl", type=click.Path(dir_okay=False))
@click.option("--ordered", is_flag=True, help="Write OUT in input order (finished lines wait for earlier ones).")
@click.option("--fsync-interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between fsyncs of OUT (power-loss safety); 0 = after every line.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
@click.option("--retry-errors", is_flag=True,
              help="Run the lines OUT holds as errors again (after fixing what they name); appended at the end.")
@sampling_options
@cluster_option
def batch(bundle, in_file, out_file, ordered, fsync_interval, progress, retry_errors, cluster, **o):
    """Answer every line of IN.jsonl into OUT.jsonl; run it again to resume after a crash.

    \b
    IN line:  {"id", "prompt", "image": path relative to IN's folder or null,
               optional max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
               "history": [[q, a], ...], "template"}  (sampling flags: defaults for these)
    OUT line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
               "ttft_s", "total_s", "tokens_per_s"}, or {"id", "error"} for a line that cannot run.

    An OpenAI Batch API file ({"custom_id", "method", "url", "body"} lines) is answered in that format:
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
    """
    in_path, out_path = Path(in_file), Path(out_file)
    if out_path.exists() and os.path.samefile(in_path, out_path):
        raise UserError("IN.jsonl and OUT.jsonl are the same file; write the results to another file.")
    defaults = sampling_params(o)
    defaults = {k: getattr(defaults, k) for k in SAMPLING_FIELDS}
    if relaunch_under_msrun(bundle, cluster):
        return
    if os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun's scheduler runs this command too: it only
        open_engine(bundle, o)                   # serves the cluster and must not touch OUT
        return
    rank0 = os.environ.get("RANK_ID", "0") == "0"  # under msrun only rank 0 writes OUT and speaks
    summary = Summary()
    fd = _open_output(out_path) if rank0 else None
    try:
        # read OUT before the engine starts: under msrun every rank must see the same OUT
        fd, done = resume(out_path, fd, summary, retry_errors)
        openai = is_openai_file(in_path)
        pending = scan(in_path, done, summary, batch_openai.KEY if openai else "id")
        if rank0 and summary.skipped:
            click.echo(f"resuming: {summary.skipped} lines already in {out_path}, {len(pending)} to go", err=True)
        engine = open_engine(bundle, o) if pending else None
        try:
            if pending:
                _run(engine, pending, _Preparer(engine, in_path.parent, defaults, o["template"], openai),
                     _Writer(fd, ordered, fsync_interval), summary, progress and rank0)
        except KeyboardInterrupt:
            if rank0:
                click.echo(summary.line(), err=True)
                click.echo(f"interrupted: run the same command again to finish {out_path}.", err=True)
            sys.exit(130)
    finally:
        if fd is not None:
            os.close(fd)
    if rank0:
        click.echo(summary.line(), err=True)
