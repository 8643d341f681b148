"""Issue 14: the kinds of fault users reported (shared/cases/user-reports): an interactive session that
outlives a bad turn, undecodable text in every reader of user text, special tokens kept out of text.
(The wrong-image prefix reuse is tested in test_scheduler.py.)"""
import json

import numpy as np
from click.testing import CliRunner

from cogvlm2_lite.runtime.cli import main
from cogvlm2_lite.runtime.engine import Request
from cogvlm2_lite.runtime.sampling import SamplingParams
from cogvlm2_lite.runtime.tokenizer import SPECIAL_TOKENS, StreamDecoder

GBK = "描述".encode("gbk")  # not UTF-8


def chat(bundle, stdin: bytes, *flags):
    return CliRunner().invoke(main, ["chat", str(bundle), *map(str, flags)], input=stdin)


def answers(monkeypatch) -> list:
    """The Results of every turn the chat answers (its stdout is the random model's text, which may hold
    newlines or only spaces, so lines cannot be counted)."""
    from cogvlm2_lite.runtime.engine import Engine
    results, generate = [], Engine.generate

    def recording(self, requests, on_text=None):
        out = generate(self, requests, on_text)
        results.extend(out)
        return out
    monkeypatch.setattr(Engine, "generate", recording)
    return results


def errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_a_chat_turn_error_is_reported_and_the_session_goes_on(tiny_bundle, photo):
    r = chat(tiny_bundle, b"word " * 100 + b"\nwhat is it?\n", "--image", photo, "--max-new-tokens", "5")
    assert r.exit_code == 0 and "Traceback" not in r.output
    [err] = errors(r)
    assert "cache holds (64" in err and "shorten it" in err
    answer = r.stdout.splitlines()[1:]
    assert answer and answer[0].strip()  # the second question was answered


def test_a_conversation_that_outgrows_the_cache_drops_its_oldest_turns(tiny_bundle, monkeypatch):
    answered = answers(monkeypatch)
    r = chat(tiny_bundle, b"".join(b"tell me more about number %d\n" % i for i in range(6)),
             "--max-new-tokens", "20", "--ignore-eos")
    assert r.exit_code == 0 and not errors(r)
    assert "dropped its oldest turn" in r.stderr
    assert len(answered) == 6   # every question answered: 20 tokens, or fewer where the answer filled the cache
    assert all(a.completion_tokens == 20 or (a.finish_reason == "context" and a.completion_tokens) for a in answered)


def test_a_question_too_long_even_alone_leaves_the_conversation_whole(tiny_bundle, monkeypatch):
    """Refused in one line without dropping any turn: the next question still carries the whole history."""
    from cogvlm2_lite.runtime.engine import Engine
    asked, generate = [], Engine.generate

    def recording(self, requests, on_text=None):
        asked.extend(requests)
        return generate(self, requests, on_text)
    monkeypatch.setattr(Engine, "generate", recording)
    r = chat(tiny_bundle, b"a\nb\n" + b"word " * 100 + b"\nc\n", "--max-new-tokens", "2")
    assert r.exit_code == 0 and "dropped its oldest turn" not in r.stderr
    [err] = errors(r)
    assert "shorten it" in err
    assert [(a.prompt, len(a.history)) for a in asked] == [("a", 0), ("b", 1), (("word " * 100).strip(), 0), ("c", 2)]


def test_chat_checks_image_and_flags_before_the_first_question(tiny_bundle, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for flags, says in ((["--image", bad], "bad.png"), (["--top-p", "2"], "top_p")):
        r = chat(tiny_bundle, b"hello\n", *flags)
        assert r.exit_code == 1 and len(errors(r)) == 1 and says in errors(r)[0]
        assert r.stdout == ""  # nothing asked, nothing answered


def test_chat_undecodable_line_is_one_sentence_then_the_next_is_answered(tiny_bundle, photo, monkeypatch):
    answered = answers(monkeypatch)
    r = chat(tiny_bundle, b"Describe the image.\n" + GBK + b"\nHow many?\n", "--image", photo,
             "--max-new-tokens", "4")
    assert r.exit_code == 0 and "Traceback" not in r.output
    [err] = errors(r)
    assert "input line 2 is not UTF-8" in err
    assert len(answered) == 2 and all(a.completion_tokens for a in answered)   # lines 1 and 3


def test_batch_and_calibration_files_skip_undecodable_lines(engine, tmp_path):
    from cogvlm2_lite.calib.data import jsonl_samples
    from cogvlm2_lite.runtime.batch import run_batch
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1, "prompt": "hi", "max_new_tokens": 2}\n{"id": 2, "prompt": "' + GBK + b'"}\n'
                    b'{"id": 3, "prompt": "there", "max_new_tokens": 2}\n')
    summary = run_batch(engine, inp, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.ok == 2 and summary.errors == 1
    assert [o for o in out if "error" in o] == [{"id": None, "line": 2, "error": "line 2 is not UTF-8 text; save the "
                                                 "file as UTF-8."}]
    said = []
    samples = jsonl_samples(inp, log=said.append)
    assert [p for _, p in samples] == ["hi", "there"] and len(said) == 1 and "line 2 is not UTF-8" in said[0]


def test_special_tokens_never_reach_the_text(engine):
    tok = engine.tokenizer
    eot = tok.special_ids["<|eot_id|>"]
    reserved = tok.special_ids["<|reserved_special_token_88|>"]
    hello = tok.encode("hello")
    assert tok.decode(hello + [reserved, eot] + hello) == "hellohello"
    stream = StreamDecoder(tok)
    assert stream.push(reserved) == "" and stream.push(eot) == ""
    assert "".join(stream.push(i) for i in hello) == "hello"
    # hot sampling over a vocabulary that is a quarter special tokens: they are generated, never shown
    pieces = []
    for seed in range(6):
        params = SamplingParams(temperature=3.0, seed=seed, max_new_tokens=30, ignore_eos=True)
        r = engine.generate([Request("Describe the image.", params=params)], on_text=lambda i, p: pieces.append(p))[0]
        special = [i for i in r.token_ids if i >= tok.text_ids]
        if special:
            break
    assert special, "no special token sampled: the test would prove nothing"
    assert not any(n in r.text for n in SPECIAL_TOKENS) and "<|" not in "".join(pieces)
    assert r.text == tok.decode(r.token_ids)


def test_run_json_gives_the_generated_ids(tiny_bundle):
    r = CliRunner().invoke(main, ["run", str(tiny_bundle), "--prompt", "Describe the image.", "--temperature", "3",
                                  "--seed", "1", "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == out["completion_tokens"] and all(isinstance(i, int) for i in out["token_ids"])
    assert "<|" not in out["text"]
    assert np.all(np.array(out["token_ids"]) < 1024)
