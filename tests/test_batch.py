"""`cogvlm2-lite batch`: per-line errors, batched == unbatched, --ordered, kill -9 and resume."""
import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cogvlm2_lite.runtime.batch import run_batch

CLI = Path(sys.executable).parent / "cogvlm2-lite"
TIMINGS = ("ttft_s", "total_s", "tokens_per_s")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A folder with a few different images (and a broken one) for input files to point at."""
    folder = tmp_path_factory.mktemp("batch-data")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60 - 5 * i, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    whole = (folder / "img4.png").read_bytes()
    (folder / "broken.png").write_bytes(whole[:len(whole) // 2])  # a download cut short
    (folder / "notes.png").write_text("not an image at all")
    return folder


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_out(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def good_rows(n, prefix="r", max_new=(3, 9, 5, 14, 7, 11)):
    """Lines alternating in runs (image, image, text, image, text, text, ...), varied lengths and stops."""
    rows = []
    for i in range(n):
        row = {"id": f"{prefix}{i}", "prompt": f"question number {i}" + " more" * (i % 4),
               "max_new_tokens": max_new[i % len(max_new)]}
        if i % 3 != 2 and i % 7 != 5:
            row["image"] = f"img{i % 5}.png"
        if i % 5 == 4:
            row.update(temperature=0.8, top_k=50, top_p=0.9, seed=i)  # seeded sampling: reproducible per row
        if i % 6 == 1:
            row["history"] = [["what is it", "a picture"]]
        if i % 8 == 3:
            row["template"] = "vqa"
        rows.append(row)
    return rows


def strip(obj):
    return {k: v for k, v in obj.items() if k not in TIMINGS}


# --- bad lines -------------------------------------------------------------------------------------------
def test_bad_lines_become_error_lines_and_the_run_goes_on(engine4, images, tmp_path):
    good = good_rows(6)
    bad = {  # id -> (line, words the error must contain)
        "no-file": ({"id": "no-file", "image": "missing.png", "prompt": "x"}, "does not exist"),
        "broken": ({"id": "broken", "image": "broken.png", "prompt": "x"}, "truncated or corrupt"),
        "notimg": ({"id": "notimg", "image": "notes.png", "prompt": "x"}, "not an image Pillow can read"),
        "long": ({"id": "long", "prompt": "word " * 60}, "cache holds (64"),
        "long-img": ({"id": "long-img", "image": "img0.png", "prompt": "word " * 60}, "cache holds (64"),
        "temp": ({"id": "temp", "prompt": "x", "temperature": -0.5}, "temperature=-0.5 is invalid"),
        "topp": ({"id": "topp", "prompt": "x", "top_p": 0}, "top_p=0 is invalid"),
        "maxnew": ({"id": "maxnew", "prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens=2.5 is invalid"),
        "noprompt": ({"id": "noprompt", "image": "img1.png"}, "no \"prompt\""),
        "imgtype": ({"id": "imgtype", "image": 3, "prompt": "x"}, "\"image\" must be"),
        "history": ({"id": "history", "prompt": "x", "history": [["only a question"]]}, "history turn"),
        "template": ({"id": "template", "prompt": "x", "template": "poem"}, "unknown prompt template"),
    }
    by_line = {  # malformed lines: keyed by line number
        "{\"id\": \"torn\", \"prompt\": ": "not valid JSON",
        "[1, 2]": "not a JSON object",
        json.dumps({"prompt": "no id here"}): "has no \"id\"",
        json.dumps({"id": True, "prompt": "bool id"}): "must be a string or an integer",
        json.dumps({"id": "r1", "prompt": "again"}): f"repeats the id of line {len(bad) + 2}",
    }
    rows = [good[0], *[b[0] for b in bad.values()], good[1], *by_line, "", "   ", *good[2:],
            {"id": 99, "prompt": "integer id", "answer": "kept for evaluation"}]
    inp = write_jsonl(images / "mixed.jsonl", rows)
    out = tmp_path / "sub" / "out.jsonl"
    s = run_batch(engine4, inp, out, defaults={"max_new_tokens": 4})
    lines = read_out(out)
    assert len(lines) == len(rows) - 2  # blank lines are not lines
    assert (s.ok, s.errors, s.skipped) == (7, len(bad) + len(by_line), 0)
    assert s.unknown_fields == {"answer": 1}
    keyed = {json.dumps(x["id"]) if "line" not in x else x["line"]: x for x in lines}
    assert len(keyed) == len(lines)  # every input line exactly once
    for id_, (_, words) in bad.items():
        err = keyed[json.dumps(id_)]
        assert set(err) == {"id", "error"} and words in err["error"], err
        assert "\n" not in err["error"] and err["error"].endswith(".")
    for n, words in enumerate(by_line.values(), start=len(bad) + 3):
        assert words in keyed[n]["error"] and keyed[n]["line"] == n, (n, keyed[n])
    for row in good + [{"id": 99, "prompt": "integer id"}]:
        r = keyed[json.dumps(row["id"])]
        assert list(r) == ["id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s",
                           "total_s", "tokens_per_s"]
        assert len(r["token_ids"]) == r["completion_tokens"]
        limit = row.get("max_new_tokens", 4)  # the run's default applies where the line sets none
        assert 1 <= r["completion_tokens"] <= limit and r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "length") == (r["completion_tokens"] == limit)
        assert r["prompt_tokens"] > (6 if row.get("image") else 0) and 0 < r["ttft_s"] <= r["total_s"]


# --- batching changes nothing --------------------------------------------------------------------------------
def occupancy(monkeypatch):
    """Record, at every scheduler step, which rows hold a request and whether it has an image."""
    from cogvlm2_lite.runtime.scheduler import Scheduler
    seen = []
    schedule = Scheduler.schedule

    def spy(self):
        plan = schedule(self)
        seen.append(tuple(None if s is None else s.pixels is not None for s in self.rows))
        return plan
    monkeypatch.setattr(Scheduler, "schedule", spy)
    return seen


def test_batched_results_equal_unbatched_token_for_token(engine, engine4, images, tmp_path, monkeypatch):
    assert (engine.batch, engine4.batch) == (1, 4)
    inp = write_jsonl(images / "same.jsonl", good_rows(14))
    run_batch(engine, inp, tmp_path / "b1.jsonl")
    seen = occupancy(monkeypatch)
    run_batch(engine4, inp, tmp_path / "b4.jsonl")
    assert max(sum(r is not None for r in rows) for rows in seen) == 4  # really in flight together
    assert any(True in rows and False in rows for rows in seen)  # image and text-only lines side by side
    one = {x["id"]: strip(x) for x in read_out(tmp_path / "b1.jsonl")}
    four = {x["id"]: strip(x) for x in read_out(tmp_path / "b4.jsonl")}
    assert one == four and len(one) == 14
    assert any(x["completion_tokens"] >= 9 for x in one.values())  # rows stop at different steps


# --- --ordered ---------------------------------------------------------------------------------------------------
def test_ordered_output_follows_the_input_also_when_resumed(engine4, images, tmp_path):
    rows = good_rows(13) + [{"id": "bad", "image": "missing.png", "prompt": "x"}] + good_rows(5, prefix="s")
    inp = write_jsonl(images / "order.jsonl", rows)
    ids = [r["id"] for r in rows]
    run_batch(engine4, inp, tmp_path / "free.jsonl")
    free = [x["id"] for x in read_out(tmp_path / "free.jsonl")]
    assert sorted(free) == sorted(ids) and free != ids  # grouping by kind reorders completions
    full = tmp_path / "ordered.jsonl"
    run_batch(engine4, inp, full, ordered=True)
    assert [x["id"] for x in read_out(full)] == ids
    # resume an ordered run that stopped after 6 lines: the rest is appended in input order
    head = b"".join(full.read_bytes().splitlines(keepends=True)[:6])
    part = tmp_path / "part.jsonl"
    part.write_bytes(head)
    s = run_batch(engine4, inp, part, ordered=True)
    assert s.skipped == 6 and part.read_bytes().startswith(head)
    assert [strip(x) for x in read_out(part)] == [strip(x) for x in read_out(full)]


def test_a_freed_row_takes_the_next_line_at_once(engine4, images, tmp_path, monkeypatch):
    """One long line and many short ones: the short ones keep flowing through the other rows while the
    long one runs (lockstep batching would hold every row until the long line ends)."""
    rows = [{"id": "long", "prompt": "a long answer", "max_new_tokens": 40}]
    rows += [{"id": f"s{i}", "image": f"img{i % 5}.png", "prompt": "q", "max_new_tokens": 2} for i in range(12)]
    inp = write_jsonl(images / "mixed.jsonl", rows)
    seen = occupancy(monkeypatch)
    run_batch(engine4, inp, tmp_path / "out.jsonl", ordered=True)
    out = read_out(tmp_path / "out.jsonl")
    assert [x["id"] for x in out] == [r["id"] for r in rows]
    long_steps = out[0]["completion_tokens"]
    assert long_steps > 20  # the long line really ran for many steps
    assert len(seen) < long_steps + 5  # all twelve short lines fit inside the long one's steps


# --- kill -9 or Ctrl-C, torn line, resume ----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill9_then_resume_keeps_every_line_exactly_once(engine4, tiny_bundle_b4, images, tmp_path, sig):
    """SIGKILL mid-run, or Ctrl-C (on MindSpore, whose own SIGINT handler would turn it into a silent SIGTERM):
    a resume finishes the rest, each line exactly once."""
    rows = good_rows(24, max_new=(40, 25, 33, 12))
    rows[17] = {"id": "r17", "image": "broken.png", "prompt": "x"}  # an error line survives a resume too
    inp = write_jsonl(images / "long.jsonl", rows)
    run_batch(engine4, inp, tmp_path / "reference.jsonl")
    reference = {x["id"]: strip(x) for x in read_out(tmp_path / "reference.jsonl")}

    out = tmp_path / "out.jsonl"
    cmd = [str(CLI), "batch", str(tiny_bundle_b4), str(inp), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the batch run wrote nothing for 60 s"
        time.sleep(0.002)
    proc.send_signal(sig)
    code, said = proc.wait(), proc.stderr.read()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, "the run finished before it could be killed: give it more work"
    else:
        assert code == 130, said
        assert said.strip().endswith(f"interrupted: run the same command again to finish {out}.") and "Traceback" not in said
    before = out.read_bytes()
    done = before[:before.rfind(b"\n") + 1]  # the kill may itself have torn the last line
    n_done = done.count(b"\n")
    assert 2 <= n_done < len(rows)
    with open(out, "ab") as f:
        f.write(b'{"id": "r59", "text": "half a li')  # and a torn last line on top

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    after = out.read_bytes()
    assert after.startswith(done)  # finished lines untouched, byte for byte
    lines = read_out(out)
    assert sorted(x["id"] for x in lines) == sorted(r["id"] for r in rows)  # every id exactly once
    assert {x["id"]: strip(x) for x in lines} == reference  # resumed lines as if never interrupted
    err = resumed.stderr
    assert f"resuming: {n_done} lines already in" in err and "cut a torn last line" in err
    assert "\r" not in err and "line/s" not in err  # no progress bar in a pipe
    r17_done = b'"id": "r17"' in done
    assert f"batch: {len(rows) - n_done - (not r17_done)} ok, {int(not r17_done)} errors, {n_done} skipped" in err

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # nothing left: nothing changes
    assert again.returncode == 0 and out.read_bytes() == after and f"{len(rows)} skipped" in again.stderr


def test_retry_errors_runs_the_error_lines_again_once_fixed(engine, images, tmp_path):
    """A missing image is an error line; once the image is there, --retry-errors answers that line (appended at the
    end), keeps the answered lines byte for byte, and every id stays in OUT exactly once."""
    rows = good_rows(5)
    rows[2] = {"id": "late", "image": "arrives_later.png", "prompt": "what is it?", "max_new_tokens": 3}
    inp = write_jsonl(images / "retry.jsonl", rows)
    out = tmp_path / "out.jsonl"
    first = run_batch(engine, inp, out)
    assert (first.ok, first.errors) == (4, 1)
    answered = [line for line in out.read_bytes().splitlines(keepends=True) if b'"error"' not in line]
    again = run_batch(engine, inp, out)   # without the flag an error line is finished
    assert (again.ok, again.errors, again.skipped, again.retried) == (0, 0, 5, 0)
    Image.open(images / "img1.png").save(images / "arrives_later.png")
    retried = run_batch(engine, inp, out, retry_errors=True)
    assert (retried.ok, retried.errors, retried.skipped, retried.retried) == (1, 0, 4, 1)
    assert "ran 1 earlier error lines again" in retried.line()
    lines = out.read_bytes().splitlines(keepends=True)
    assert lines[:4] == answered and json.loads(lines[4])["id"] == "late" and "text" in json.loads(lines[4])
    assert sorted(x["id"] for x in read_out(out)) == sorted(r["id"] for r in rows)
    assert not (tmp_path / "out.jsonl.retry").exists()


# --- the command line ---------------------------------------------------------------------------------------------
def test_cli_defaults_summary_and_refusals(tiny_bundle, images, tmp_path):
    from cogvlm2_lite.runtime.cli import main
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hello"},
                                              {"id": "b", "prompt": "hi there", "max_new_tokens": 5},
                                              {"id": "c", "image": str(images / "img2.png"), "prompt": "what?"}])
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(main, ["batch", str(tiny_bundle), str(inp), str(out), "--max-new-tokens", "2",
                                  "--fsync-interval", "0"])
    assert r.exit_code == 0, r.output
    got = {x["id"]: x for x in read_out(out)}
    for id_, limit in (("a", 2), ("b", 5), ("c", 2)):  # the flag is the default, a line's own value wins
        assert got[id_]["completion_tokens"] <= limit
        assert (got[id_]["finish_reason"] == "length") == (got[id_]["completion_tokens"] == limit)
    assert "batch: 3 ok, 0 errors, 0 skipped" in r.stderr and "tokens/s" in r.stderr

    def refused(args, words):
        r = CliRunner().invoke(main, ["batch", str(tiny_bundle), *map(str, args)])
        assert r.exit_code == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output

    refused([inp, inp], "are the same file")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("these are my notes\n")
    refused([inp, garbage], "line 1 is not a batch result line")
    with open(out, "a") as f:  # another run holds OUT
        fcntl.flock(f, fcntl.LOCK_EX)
        refused([inp, out], "another batch run is writing")
    assert len(read_out(out)) == 3
