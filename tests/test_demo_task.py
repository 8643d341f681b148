"""The embedded default's synthetic task (demo.task) and its small tokenizer (demo/assets)."""

import base64
import hashlib
import os
import re

import numpy as np
import pytest
from PIL import Image

from cogvlm2_lite.demo import task
from cogvlm2_lite.demo import tokenizer_train as tt

SIZE = 56


@pytest.fixture(scope="module")
def train_set():
    return task.generate(task.TRAIN_SEED, 150, SIZE)


@pytest.fixture(scope="module")
def heldout_set():
    return task.generate(task.HELDOUT_SEED, 150, SIZE)


def _digest(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


# ---------------------------------------------------------------- determinism and splits

def test_same_seed_same_samples(train_set):
    again = task.generate(task.TRAIN_SEED, 20, SIZE)
    for a, b in zip(train_set[:20], again):
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.qtype, a.scene) == (b.question, b.answer, b.qtype, b.scene)


def test_sample_does_not_depend_on_n(train_set):
    # sample i is a function of (seed, i): a shorter run is a prefix of a longer one
    assert [_digest(s.image) for s in task.generate(task.TRAIN_SEED, 7, SIZE)] == \
        [_digest(s.image) for s in train_set[:7]]


def test_different_seeds_differ(train_set):
    other = task.generate(task.TRAIN_SEED + 1, 20, SIZE)
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(train_set, other)) == 20
    assert [s.answer for s in other] != [s.answer for s in train_set[:20]]


def test_train_and_heldout_share_no_image(train_set, heldout_set):
    assert task.TRAIN_SEED != task.HELDOUT_SEED
    tr = {_digest(s.image) for s in train_set}
    ho = {_digest(s.image) for s in heldout_set}
    assert len(tr) == len(train_set) and len(ho) == len(heldout_set)
    assert not tr & ho


def test_qa_text_matches_generate(train_set):
    assert task.qa_text(task.TRAIN_SEED, 30) == [(s.question, s.answer, s.qtype)
                                                  for s in train_set[:30]]


def test_image_size_is_a_parameter():
    s112 = task.generate(task.HELDOUT_SEED, 3, 112)
    s56 = task.generate(task.HELDOUT_SEED, 3, 56)
    for a, b in zip(s112, s56):
        assert a.image.size == (112, 112) and a.image.mode == "RGB"
        assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)


# ---------------------------------------------------------------- answers agree with the scene

def _find(scene, **kw):
    hits = [s for s in scene.shapes if all(getattr(s, k) == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, scene)
    return hits[0]


def _expected_answer(question: str, scene) -> str:
    """An independent reading of each question template against the scene."""
    pos = {v: k for k, v in task.POSITIONS.items()}
    if question == "How many shapes are there?":
        return ["zero", "one", "two", "three", "four"][len(scene.shapes)]
    if question == "Describe the image.":
        names = [f"a {s.colour} {s.kind}" for s in
                 sorted(scene.shapes, key=lambda s: s.cell)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if question == "What shape is in the image?":
        assert len(scene.shapes) == 1
        return scene.shapes[0].kind
    if question == "What shape is the biggest object?":
        return _find(scene, size="large").kind
    if question == "What colour is the shape?":
        assert len(scene.shapes) == 1
        return scene.shapes[0].colour
    if m := re.fullmatch(r"What shape is in the (.+)\?", question):
        return _find(scene, cell=pos[m[1]]).kind
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return _find(scene, colour=m[1]).kind
    if m := re.fullmatch(r"What colour is the shape in the (.+)\?", question):
        return _find(scene, cell=pos[m[1]]).colour
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return _find(scene, kind=m[1]).colour
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        return task.POSITIONS[_find(scene, colour=m[1], kind=m[2]).cell]
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_consistent_with_scene(train_set, heldout_set):
    for s in train_set + heldout_set:
        assert s.answer == _expected_answer(s.question, s.scene), s
        assert s.answer == s.answer.strip() and s.answer.islower()


def test_every_type_kind_colour_count_and_position_appears(train_set):
    assert {s.qtype for s in train_set} == set(task.QTYPES)
    shapes = [sh for s in train_set for sh in s.scene.shapes]
    assert {sh.kind for sh in shapes} == set(task.KINDS)
    assert {sh.colour for sh in shapes} == set(task.COLOURS)
    assert {sh.size for sh in shapes} == set(task.SIZES)
    assert {sh.cell for sh in shapes} == set(task.POSITIONS)
    assert {len(s.scene.shapes) for s in train_set} == {1, 2, 3, 4}
    counts = {q: sum(s.qtype == q for s in train_set) for q in task.QTYPES}
    assert min(counts.values()) == max(counts.values())  # types cycle evenly


def test_geometry_no_overlap_inside_cells_large_enough(train_set):
    for s in train_set:
        sc = s.scene
        assert len({(sh.colour, sh.kind) for sh in sc.shapes}) == len(sc.shapes)
        assert len({sh.cell for sh in sc.shapes}) == len(sc.shapes)
        assert [sh.cell for sh in sc.shapes] == sorted(sh.cell for sh in sc.shapes)
        for sh in sc.shapes:
            r, c = sh.cell
            half = sh.diameter / 2
            assert c * 0.5 < sh.cx - half and sh.cx + half < (c + 1) * 0.5
            assert r * 0.5 < sh.cy - half and sh.cy + half < (r + 1) * 0.5
            assert sh.diameter * 56 >= 15.9  # recognisable at 56 px
            assert sh.diameter * 56 >= (22.9 if sh.size == "large" else 0)


def test_pixels_show_the_named_colours(train_set):
    palette = np.array(list(task.COLOURS.values()), np.float32)
    names = list(task.COLOURS)
    for s in train_set[:60]:
        img = np.asarray(s.image, np.float32)
        occupied = set()
        for sh in s.scene.shapes:
            x, y = int(sh.cx * SIZE), int(sh.cy * SIZE)
            px = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert names[int(np.argmin(((palette - px) ** 2).sum(1)))] == sh.colour
            occupied.add(sh.cell)
        for cell in set(task.POSITIONS) - occupied:  # empty cells look grey, not like a shape
            x, y = int((cell[1] + 0.5) * SIZE / 2), int((cell[0] + 0.5) * SIZE / 2)
            px = img[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
            assert px.max() - px.min() < 45, (px, s.scene)


def test_to_jsonl_round_trip(tmp_path, heldout_set):
    samples = heldout_set[:6]
    path = task.to_jsonl(samples, tmp_path / "set")
    assert os.path.dirname(path) == str(tmp_path / "set")
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 6
    recs = task.read_jsonl(path)
    for rec, s, line in zip(recs, samples, lines):
        assert set(rec) == {"id", "image", "prompt", "answer", "qtype"}
        assert not os.path.isabs(__import__("json").loads(line)["image"])
        assert (rec["prompt"], rec["answer"], rec["qtype"]) == (s.question, s.answer, s.qtype)
        with Image.open(rec["image"]) as im:
            assert im.mode == "RGB" and im.tobytes() == s.image.tobytes()
    assert len({r["id"] for r in recs}) == 6


# ---------------------------------------------------------------- tokenizer asset

def test_tokenizer_asset_format():
    raw = open(tt.ASSET_PATH, "rb").read()
    assert len(raw) < 64 * 1024
    ranks = tt.read_ranks(tt.ASSET_PATH)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert 512 <= len(ranks) <= 1024
    for b in range(256):
        assert ranks[bytes([b])] == b
    # byte-for-byte the writer's own format
    assert tt.dumps(ranks) == raw
    line = raw.splitlines()[300].split()
    assert ranks[base64.b64decode(line[0])] == int(line[1]) == 300


def test_tokenizer_loads_with_tiktoken_and_round_trips(monkeypatch):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # its cache is keyed by path, not content
    ranks = load_tiktoken_bpe(tt.ASSET_PATH)
    assert ranks == tt.read_ranks(tt.ASSET_PATH)
    n = len(ranks)
    enc = tiktoken.Encoding("demo-test", pat_str=tt.LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(tt.SPECIAL_TOKEN_NAMES)})
    assert enc.n_vocab == n + 256
    for text in ["Question: What colour is the circle? Answer: red",
                 "Hello, world! 你好，世界 🌍🚀 naïve café Ünïcödé — ∑x² ≤ 10³",
                 "tabs\tand\nnew lines\r\n  spaces   ", "", "\x00\x7f\U0010ffff",
                 "'s 're 'LL I'M"]:
        assert enc.decode(enc.encode(text)) == text
    assert enc.encode("<|eot_id|>", allowed_special="all") == [n + 9]
    assert enc.encode("<|begin_of_text|>", allowed_special="all") == [n]
    assert tt.load_encoding().encode("Where is the red square?") == \
        enc.encode("Where is the red square?")


def test_task_text_encodes_compactly():
    enc = tt.load_encoding()
    qa = task.qa_text(task.HELDOUT_SEED, 200)
    lens = [len(enc.encode(f"Question: {q} Answer: {a}")) for q, a, _ in qa]
    assert np.mean(lens) < 16 and max(lens) <= 24
    # every task word is one token (with its leading space)
    for w in list(task.KINDS) + list(task.COLOURS) + ["top", "left", "bottom", "right",
                                                      "three", "four", "Answer", "Describe"]:
        assert len(enc.encode(" " + w)) == 1, w


def test_tokenizer_training_is_reproducible():
    text = tt.training_text(seed=1, n_qa=60)
    a, b = tt.train_ranks(text, 300), tt.train_ranks(text, 300)
    assert tt.dumps(a) == tt.dumps(b)
    assert sorted(a.values()) == list(range(300))
    assert tt.training_text(seed=2, n_qa=60) != text
