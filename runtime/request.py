"""What a caller asks (Request) and what it gets back (Result): the engine's and the scheduler's
common vocabulary, in a module of its own so neither imports the other for it."""
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class Request:
    """What one caller asks: a prompt, an optional image, earlier turns, sampling settings."""
    prompt: str
    image: object = None                 # path, bytes, PIL image or preprocessed float32 [3, S, S]; None: text-only
    history: tuple = ()                  # ((question, answer), ...) earlier turns
    template: str | None = None          # chat | vqa | base; None: the bundle's
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    """One finished request. Times in seconds from the request's arrival."""
    text: str                            # visible text: special tokens never appear in it
    token_ids: list                      # generated ids (stop token excluded; special tokens kept)
    finish_reason: str                   # stop | length | context (cache full) | cancel
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    reused_tokens: int = 0               # prompt tokens whose K/V were reused (the row's previous request, an image prefix)
    logprobs: list | None = None         # with SamplingParams.logprobs: per token (id, logprob, [(id, logprob), ...])

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (0 with fewer than two tokens)."""
        decode_s = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0

    def to_json(self) -> dict:
        """The one JSON rendering (run --json, batch output lines)."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": round(self.ttft_s, 4), "total_s": round(self.total_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class Prepared:
    """A request made ready in the caller's thread, once (Engine.prepare): its prompt's token ids and RoPE
    positions, its preprocessed pixels and their digest (None, None for text only)."""
    request: Request
    ids: list
    positions: list
    pixels: object = None                # float32 [3, S, S] or None
    digest: bytes | None = None          # encoder_cache.pixel_digest(pixels): the image caches' key
