"""Llama-3 tiktoken tokenizer, CogVLM2's prompt templates, token types, position ids, streaming text.

The tokenizer is built from the bundle's `tokenizer.model` (base64 token + rank per line) with
Llama-3's pre-tokenizer pattern and 256 special tokens numbered right after the BPE ranks, so a
small demo vocabulary (e.g. 2000 ranks, bos 2000) works the same way as the real one (bos 128000).
"""

import base64
import binascii
import codecs
import os
import re

import numpy as np
import tiktoken

from .errors import UserError

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
]
TEMPLATES = {"chat": "Answer:", "vqa": "Short answer:", "base": None}
TEXT, IMAGE = 0, 1  # token types
MAX_RUN = 25_000  # tiktoken's regex overflows its stack on ~600k consecutive spaces


def load_ranks(path):
    """Parse a tiktoken BPE file into {token bytes: rank}.

    Not `tiktoken.load.load_tiktoken_bpe`: it caches every local file in /tmp keyed by its path
    only, so a replaced tokenizer.model at the same path would silently load the old vocabulary.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path!r} does not exist; pass Llama-3's tokenizer.model.") from None
    except OSError as e:
        raise UserError(f"tokenizer file {path!r} cannot be read ({e.strerror}); check the path.") from None
    ranks = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(
                f"tokenizer file {path!r} line {n} is not 'base64-token rank'; pass a tiktoken BPE file "
                "such as Llama-3's tokenizer.model (not a SentencePiece or tokenizer.json file).") from None
    values = set(ranks.values())
    dense = ranks and len(values) == len(ranks) and min(values) == 0 and max(values) == len(ranks) - 1
    if not dense or any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"tokenizer file {path!r} is not a complete byte-level BPE vocabulary (ranks 0..N-1 once "
                        "each, all 256 single bytes); pass an intact tokenizer.model.")
    return ranks


def render_prompt(query, history=(), template="chat"):
    """CogVLM2's `_history_to_prompt`: `Question: {q} Answer:` with earlier turns before it.

    chat and vqa match the release exactly (vqa history also says `Short answer:`). For `base` the
    release silently drops the history; we render it in the chat form before the raw query instead,
    so that a multi-turn text conversation keeps its context.
    """
    if not isinstance(query, str):
        raise UserError(f"the prompt must be text, not {type(query).__name__}.")
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)}.")
    answer = TEMPLATES[template] or TEMPLATES["chat"]
    turns = []
    for turn in history:
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise UserError("each history turn must be a (question, answer) pair of strings.")
        turns.append(f"Question: {turn[0]} {answer} {turn[1]}\n")
    current = query if template == "base" else f"Question: {query} {answer}"
    return "".join(turns) + current


def position_ids(token_type_ids):
    """CogVLM2's position rule for one unpadded sequence: text counts one position per token; an
    image run's first and last slots (boi, eoi) are text positions and its inner patches share one.
    [bos, boi, p, p, p, eoi, t] -> [0, 1, 2, 2, 2, 3, 4]."""
    t = np.asarray(token_type_ids, dtype=np.int64)
    if t.size == 0:
        return []
    edge = np.zeros(t.size, dtype=bool)  # boi / eoi: image slots next to text or the sequence ends
    edge[0] |= t[0] == IMAGE
    edge[-1] |= t[-1] == IMAGE
    edge[1:] |= (t[1:] == IMAGE) & (t[:-1] == TEXT)
    edge[:-1] |= (t[:-1] == IMAGE) & (t[1:] == TEXT)
    t = np.where(edge, TEXT, t)
    step = np.zeros(t.size, dtype=np.int64)
    step[1:] = (t[1:] == TEXT) | ((t[1:] == IMAGE) & (t[:-1] == TEXT))
    return np.cumsum(step).tolist()


class Tokenizer:
    """Llama-3 BPE + CogVLM2 prompt layout. User text never produces special tokens."""

    def __init__(self, path):
        ranks = load_ranks(path)
        n = len(ranks)
        self.special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="llama3", pat_str=PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_ids)
        self.bos_id = self.special_ids["<|begin_of_text|>"]
        self.eos_ids = (self.special_ids["<|end_of_text|>"], self.special_ids["<|eot_id|>"])
        self.pad_id = self.special_ids["<|reserved_special_token_0|>"]
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.text_ids = n  # ids below this are text; the special tokens (and ids past the vocabulary) are not

    def encode(self, text):
        """Plain text -> ids; `<|eot_id|>` typed by a user stays text, so prompts cannot inject control tokens."""
        if len(text) <= MAX_RUN:
            return self.enc.encode_ordinary(text)
        ids = []
        for piece in _cut_long_runs(text):
            ids += self.enc.encode_ordinary(piece)
        return ids

    def decode(self, ids):
        """Visible text of generated ids: special tokens and ids without a token (a model vocabulary
        larger than the tokenizer's) decode to nothing; the ids themselves keep them."""
        return self.enc.decode([i for i in ids if 0 <= i < self.text_ids], errors="replace")

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(list(ids))

    def build_inputs(self, query, history=(), template="chat", n_image_tokens=0):
        """`[bos] + [pad] * n_image_tokens + encode(prompt)` and its token types (1 = image slot).

        The image slots hold pad_id only as a placeholder: the graph replaces them by the image
        embeddings (boi, patches, eoi), as the release does with its pad token.
        """
        text = self.encode(render_prompt(query, history, template))
        ids = [self.bos_id] + [self.pad_id] * n_image_tokens + text
        types = [TEXT] + [IMAGE] * n_image_tokens + [TEXT] * len(text)
        return ids, types


def _cut_long_runs(text):
    """Cut inside whitespace or non-whitespace runs longer than MAX_RUN, as Llama-3's reference
    tokenizer does; text without such runs is encoded exactly as one piece would be."""
    start = 0
    for m in re.finditer(r"\s+|\S+", text):
        for cut in range(m.start() + MAX_RUN, m.end(), MAX_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]


class StreamDecoder:
    """Turns generated ids, one at a time, into text pieces that never split a UTF-8 character.

    A token can end inside a multi-byte character (CJK, emoji); its bytes wait for the next token.
    Special tokens are not text: they produce no piece (see Tokenizer.decode).
    """

    def __init__(self, tokenizer):
        self._enc = tokenizer.enc
        self._text_ids = tokenizer.text_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        if not 0 <= token_id < self._text_ids:
            return ""
        return self._utf8.decode(self._enc.decode_single_token_bytes(token_id))

    def flush(self):
        """The rest at the end of the stream (a dangling partial character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
