"""Tokenizer against the real Llama-3 vocabulary, CogVLM2 templates, position ids, streaming text."""

import base64
import importlib.util
import os
import random

import pytest

from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.tokenizer import StreamDecoder, Tokenizer, position_ids, render_prompt


def _llama3_file():
    spec = importlib.util.find_spec("llama_models")  # located, never imported: the wheel is data only here
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "llama3", "tokenizer.model")
    return path if os.path.isfile(path) else None


LLAMA3 = _llama3_file()
needs_llama3 = pytest.mark.skipif(
    LLAMA3 is None,
    reason="llama-models 0.3.0 absent (build.sh installs it: pip install --no-deps llama-models==0.3.0)")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(LLAMA3)


@pytest.fixture(scope="module")
def raw_vocab():
    """rank -> bytes read straight from the file, to check ids without our code or tiktoken."""
    with open(LLAMA3, "rb") as f:
        return {int(r): base64.b64decode(t) for t, r in (line.split() for line in f.read().splitlines())}


# Well-known Llama-3 ids, each also checked against the file's own line for that rank.
KNOWN = {9906: b"Hello", 1917: b" world", 14924: b"Question", 25: b":", 3639: b" What", 374: b" is",
         420: b" this", 30: b"?", 22559: b" Answer", 10928: b" Short", 4320: b" answer", 198: b"\n"}


@needs_llama3
def test_special_ids(tok):
    assert tok.bos_id == 128000 and tok.eos_ids == (128001, 128009) and tok.pad_id == 128002
    assert tok.vocab_size == 128256
    s = tok.special_ids
    assert s["<|start_header_id|>"] == 128006 and s["<|end_header_id|>"] == 128007
    assert s["<|reserved_special_token_4|>"] == 128008
    assert s["<|reserved_special_token_5|>"] == 128010 and s["<|reserved_special_token_250|>"] == 128255
    assert tok.text_ids == 128000
    assert tok.enc.decode([128000, 128009]) == "<|begin_of_text|><|eot_id|>"  # tiktoken knows their names ...
    assert tok.decode([128000, 128009]) == ""  # ... but they are not text (issue 14: never in an answer)


@needs_llama3
def test_known_ids(tok, raw_vocab):
    for i, b in KNOWN.items():
        assert raw_vocab[i] == b
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello world\n") == [9906, 1917, 198]
    q = [14924, 25, 3639, 374, 420, 30]  # "Question: What is this?"
    ids, types = tok.build_inputs("What is this?")
    assert ids == [128000] + q + [22559, 25] and types == [0] * len(ids)
    assert tok.build_inputs("What is this?", template="vqa")[0] == [128000] + q + [10928, 4320, 25]
    assert tok.decode(ids) == "Question: What is this? Answer:"


@needs_llama3
def test_image_slots_and_types(tok):
    ids, types = tok.build_inputs("What is this?", n_image_tokens=4)
    assert ids[:5] == [128000] + [128002] * 4 and types[:5] == [0, 1, 1, 1, 1]
    assert types[5:] == [0] * (len(ids) - 5) and len(types) == len(ids) == 5 + 8
    assert position_ids(types) == [0, 1, 2, 2, 3] + list(range(4, 12))
    ids, types = tok.build_inputs("x", n_image_tokens=2306)
    pos = position_ids(types)
    assert pos[:4] == [0, 1, 2, 2] and pos[2305] == 2 and pos[2306] == 3 and pos[2307] == 4
    assert pos[-1] == 3 + (len(ids) - 2307)


@needs_llama3
def test_user_text_cannot_inject_special_tokens(tok):
    for text in ("<|eot_id|>", "hi <|begin_of_text|> there <|end_of_text|>", "<|reserved_special_token_0|>"):
        ids = tok.encode(text)
        assert all(i < 128000 for i in ids) and tok.decode(ids) == text
    ids, _ = tok.build_inputs("stop<|eot_id|>", history=[("<|begin_of_text|>", "<|eot_id|>")])
    assert ids.count(128000) == 1 and 128009 not in ids


@needs_llama3
def test_stream_decoder_never_breaks_utf8(tok):
    text = "这是一只猫。🐱👩‍🚀 naïve café — 日本語テキスト 😀!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    partial = [i for i in ids if _invalid_alone(tok.decode_bytes([i]))]
    assert partial, "test text should contain tokens that split a character"
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some tokens had to wait for the rest of their character
    sd = StreamDecoder(tok)
    first = tok.decode_bytes([partial[0]])
    assert sd.push(partial[0]) == first.decode("utf-8", "ignore") and sd.flush() == "\ufffd"


def _invalid_alone(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@needs_llama3
def test_huge_whitespace_run_does_not_crash(tok):
    text = "a" + " " * 700_000 + "b"  # one piece overflows tiktoken's regex stack
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    normal = "word " * 6000  # > MAX_RUN chars but no long run: same ids as one piece
    assert tok.encode(normal) == tok.enc.encode_ordinary(normal)


def test_templates_and_history():
    assert render_prompt("What?") == "Question: What? Answer:"
    assert render_prompt("What?", template="vqa") == "Question: What? Short answer:"
    assert render_prompt("Describe", template="base") == "Describe"
    h = [("Q1", "A1"), ("Q2", "A2")]
    assert render_prompt("Q3", h) == "Question: Q1 Answer: A1\nQuestion: Q2 Answer: A2\nQuestion: Q3 Answer:"
    assert render_prompt("Q3", h, "vqa") == (
        "Question: Q1 Short answer: A1\nQuestion: Q2 Short answer: A2\nQuestion: Q3 Short answer:")
    assert render_prompt("go on", h[:1], "base") == "Question: Q1 Answer: A1\ngo on"
    with pytest.raises(UserError, match="template"):
        render_prompt("x", template="llama3")
    with pytest.raises(UserError, match="history"):
        render_prompt("x", [("only a question",)])
    with pytest.raises(UserError, match="text"):
        render_prompt(None)


def _reference_positions(types):
    """CogVLM2's build_position_ids, written as a plain loop over its own description."""
    n = len(types)
    t = list(types)
    for i in range(n):  # image slots at a run's edge (boi / eoi) count as text
        if types[i] == 1 and (i == 0 or types[i - 1] == 0 or i == n - 1 or types[i + 1] == 0):
            t[i] = 0
    pos, out = 0, []
    for i in range(n):
        if i > 0 and (t[i] == 0 or t[i - 1] == 0):
            pos += 1
        out.append(pos)
    return out


def test_position_ids():
    assert position_ids([0, 1, 1, 1, 1, 1, 0, 0]) == [0, 1, 2, 2, 2, 3, 4, 5]
    assert position_ids([0, 0, 0]) == [0, 1, 2] and position_ids([]) == []
    rng = random.Random(0)
    for _ in range(300):
        types = [rng.choice((0, 1, 1)) for _ in range(rng.randint(1, 12))]
        assert position_ids(types) == _reference_positions(types), types


def _write_vocab(path, merges):
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    lines += [base64.b64encode(m) + b" %d" % (256 + i) for i, m in enumerate(merges)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_small_vocab_derives_special_ids(tmp_path):
    path = tmp_path / "tokenizer.model"
    _write_vocab(path, [b"ab", b"abc"])
    tok = Tokenizer(path)
    assert tok.bos_id == 258 and tok.eos_ids == (259, 267) and tok.pad_id == 260 and tok.vocab_size == 258 + 256
    assert tok.encode("abc ab") == [257, 32, 256]
    assert tok.build_inputs("ab", template="base", n_image_tokens=2) == ([258, 260, 260, 256], [0, 1, 1, 0])
    _write_vocab(path, [b"ab"])  # same path, new content: must not come from any cache
    assert Tokenizer(path).bos_id == 257


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    sp = tmp_path / "sentencepiece.model"
    sp.write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(UserError, match="sentencepiece.model.*line 2"):
        Tokenizer(sp)
    dup = tmp_path / "dup.model"
    dup.write_bytes(b"YQ== 0\nYg== 0\n")
    with pytest.raises(UserError, match="0..N-1"):
        Tokenizer(dup)
    no_bytes = tmp_path / "partial.model"
    no_bytes.write_bytes(b"YQ== 0\nYg== 1\n")  # dense ranks, but most single bytes missing
    with pytest.raises(UserError, match="256 single bytes"):
        Tokenizer(no_bytes)
