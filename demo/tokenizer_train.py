"""Train the embedded default's small byte-level BPE and write it as a tiktoken ``tokenizer.model``.

    python -m cogvlm2_lite.demo.tokenizer_train OUT_PATH [--vocab-size 768] [--seed S] [--n-qa N]

Training text: questions and answers of the synthetic task (``demo.task``) in CogVLM2's prompt forms
("Question: {q} Answer: {a}", some "Short answer:"), plus a little generic English so arbitrary
user text still gets sensible merges; every one of the 256 bytes is a rank, so any text encodes.
The pre-tokenizer is Llama-3's pattern, as in the real model. The trainer is
``tiktoken._educational.bpe_train`` (plain BPE, ties broken by first occurrence), so the same seed
and arguments give a byte-identical file.

File format, as ``tiktoken.load.load_tiktoken_bpe`` reads it: one line per rank,
``base64(token bytes) + " " + rank``, ranks 0..n-1 contiguous. At run time the 256 Llama-3 special
tokens follow at ids n..n+255 (``SPECIAL_TOKEN_NAMES``): bos = n, eos = n+1, eot = n+9, pad = n+2,
so the model's vocabulary is n + 256 (1024 for the committed asset).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from typing import Sequence

import numpy as np

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 256
SPECIAL_TOKEN_NAMES = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)]
)
assert len(SPECIAL_TOKEN_NAMES) == NUM_SPECIAL

DEFAULT_VOCAB_SIZE = 768  # ranks; + 256 specials = 1024 ids
DEFAULT_SEED = 7
DEFAULT_N_QA = 1500
ASSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model")

# Generic English, written for this file: everyday words, the vocabulary of describing pictures,
# numbers and punctuation. It only shapes merges beyond the task's words; bytes cover the rest.
GENERIC_ENGLISH = """\
This is a small model that looks at a picture and answers a question about it. You can ask what
is in the image, how many things you can see, where something is, or what colour it has. The
answers are short: one or two words, or a short sentence when you ask for a description.

A picture is made of pixels. Each pixel has a red, a green and a blue value between 0 and 255.
The model cuts the picture into small square patches, turns every patch into a vector, and reads
them together with the words of the question. Then it writes the answer one token at a time,
until it produces the end of the text.

What do you see in this photo? There is a dog on the grass next to a small house. The sky is
bright and there are two white clouds above the trees. A man in a dark coat is walking on the
road with a child, and a cat is sleeping in the window of the house. On the left side there is
an old car; on the right side there is a tall tree with green leaves. In the background you can
see the hills, and far away a river runs towards the sea.

Please describe the scene in detail. The room has a wooden table with four chairs, a lamp, a
plate of fruit and a cup of coffee. The walls are light grey and the floor is made of stone. A
large window lets in the morning light. Near the door there are three books, a pair of shoes and
an umbrella. The clock on the wall says it is ten past seven.

Can you tell me more about the colours? The apple is red, the banana is yellow, the grapes are
purple, the leaves are green and the bottle is blue. The background is mostly white with some
brown and black in the corners. Orange, pink and grey appear in smaller parts of the picture.

How many people are in the picture? I count five people: two are standing, two are sitting on a
bench, and one is riding a bicycle. Is there anything unusual here? Not really; it looks like a
normal day in a quiet town. Which object is the largest? The building in the middle is much
bigger than everything else. Which one is the smallest? The little bird on the fence.

Numbers and dates: the meeting is on 12 March 2024 at 10:30, in room 4B. The price was $19.99,
about 20% less than last year. Call 555-0123 or write to hello@example.com. The train leaves at
8:15 and arrives at 11:45, after 3 stops and 210 km.

Some questions people often ask: Why is the sky blue? How does a camera work? What time is it?
Where are my keys? Who painted this picture? When was this photo taken? Could you read the text
on the sign? Is it safe to swim here? What should I cook tonight? Thank you very much!

The quick brown fox jumps over the lazy dog. She said, "I don't think we'll make it before dark,
but let's try." They're going to the market, and we've already eaten. It's not what I'd expect.
I'm sure you'll like it. Yes, no, maybe, of course, thanks, sorry, hello, goodbye.

In short: look at the image, read the question, and give a clear, correct and short answer. If
the question cannot be answered from the image, say so. Keep the answer simple and exact.
"""


def training_text(seed: int = DEFAULT_SEED, n_qa: int = DEFAULT_N_QA) -> str:
    """The training corpus: task Q/A lines in CogVLM2's templates + the generic English."""
    from cogvlm2_lite.demo import task

    rng = np.random.default_rng(seed)
    lines = []
    for q, a, _ in task.qa_text(seed, n_qa):
        # mostly the chat template (the demo's default); some vqa template ("Short answer:")
        word = "Short answer:" if rng.random() < 0.2 else "Answer:"
        lines.append(f"Question: {q} {word} {a}\n")
    return "".join(lines) + GENERIC_ENGLISH


def train_ranks(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[bytes, int]:
    """Byte-level BPE with ``tiktoken._educational.bpe_train``; ranks made contiguous 0..n-1."""
    from tiktoken._educational import bpe_train

    if vocab_size < 256:
        raise ValueError("vocab_size must be at least 256 (one rank per byte)")
    ranks = bpe_train(data=text, vocab_size=vocab_size, pat_str=LLAMA3_PATTERN, visualise=None)
    # The educational trainer can re-create an existing token through a different pair, which
    # overwrites its rank and leaves a hole; keep the order, close the holes.
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    out = {tok: i for i, (tok, _) in enumerate(ordered)}
    assert all(bytes([b]) in out and out[bytes([b])] == b for b in range(256))
    return out


def dumps(ranks: dict[bytes, int]) -> bytes:
    """``tokenizer.model`` bytes: ``base64(token) rank`` per line, in rank order."""
    lines = [base64.b64encode(tok) + b" " + str(r).encode() for tok, r in
             sorted(ranks.items(), key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``tokenizer.model`` (same format as ``load_tiktoken_bpe``, without its cache).

    ``tiktoken.load.load_tiktoken_bpe`` caches files by PATH (sha1 of the path string, under
    $TIKTOKEN_CACHE_DIR or /tmp/data-gym-cache), so a changed file at a known path reads stale.
    """
    out: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line:
                tok, rank = line.split()
                out[base64.b64decode(tok)] = int(rank)
    return out


def load_encoding(path: str | os.PathLike | None = None, name: str = "cogvlm2-lite-demo"):
    """A ``tiktoken.Encoding`` for a tokenizer.model (default: the committed demo asset)."""
    import tiktoken

    ranks = read_ranks(path or ASSET_PATH)
    n = len(ranks)
    specials = {s: n + i for i, s in enumerate(SPECIAL_TOKEN_NAMES)}
    return tiktoken.Encoding(name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogvlm2_lite.demo.tokenizer_train",
                                description=__doc__.split("\n")[0])
    p.add_argument("out_path")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="number of ranks, the 256 bytes included (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--n-qa", type=int, default=DEFAULT_N_QA,
                   help="task question/answer lines in the corpus (default %(default)s)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    text = training_text(a.seed, a.n_qa)
    ranks = train_ranks(text, a.vocab_size)
    data = dumps(ranks)
    out_dir = os.path.dirname(os.path.abspath(a.out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = a.out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, a.out_path)
    print(f"wrote {a.out_path}: {len(ranks)} ranks, {len(data)} bytes, corpus {len(text)} chars, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
