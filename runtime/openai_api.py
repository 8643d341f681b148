"""OpenAI chat-completions requests -> engine Requests, and results -> OpenAI's response shapes.

Only what CogVLM2 can do is accepted, and everything else is refused with the OpenAI error shape
(`ApiError`: status, message, param): messages map onto CogVLM2's prompt template (system text
goes before the first question, earlier user/assistant pairs become history, the last message is
the question), and one image per conversation, as a `data:image/...;base64,` URL or, with
--allowed-image-dir, a local path inside that folder. The server fetches nothing from the network.
"""
import base64
import binascii
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .engine import Request
from .errors import UserError
from .sampling import SamplingParams
from .structured import grammar, schema_of


class ApiError(Exception):
    """An error for the client: HTTP status, one sentence, the offending field (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(self.status,
                                                                                                   "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# OpenAI fields this server does not implement, accepted only at a value that asks for nothing (some clients
# send those by default); anything else is refused rather than silently ignored
NOT_IMPLEMENTED = {"tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
                   "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,)}


@dataclass
class ChatCall:
    """One parsed /v1/chat/completions body (stop strings, logprobs and the schema travel in request.params)."""
    request: Request
    stream: bool
    include_usage: bool
    n: int = 1                           # choices, each its own sequence (seeded seed + index)


def _bad(message, param=None):
    return ApiError(400, message, param)


def _clip(value, limit: int = 60) -> str:
    """A client's value quoted in a message, cut past `limit` characters: an error never echoes a payload."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _field(body: dict, name: str, default=None):
    """body[name], with null meaning the default, as everywhere in OpenAI's schema."""
    v = body.get(name)
    return default if v is None else v


def _number(body, name, lo, hi, integer=False, default=None):
    v = _field(body, name, default)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{name}' must be {kind} in [{lo}, {hi}], not {_clip(v)}.", name)
    return v


def parse_chat(body, model: str, image_size_check, allowed_image_dir: Path | None) -> ChatCall:
    """body (parsed JSON) -> ChatCall. image_size_check(bytes) -> pixels or raises UserError."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    if _field(body, "model", model) != model:
        raise ApiError(404, f"the model {_clip(body['model'])} does not exist here: this server serves {model!r}.",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects.", "messages")
    system, turns, image = [], [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where} must be an object with 'role' system, user or assistant.", where)
        text, found = _content(m.get("content"), f"{where}.content", allowed_image_dir)
        if found is not None:
            if m["role"] != "user":
                raise _bad(f"{where}: only user messages can carry an image.", where)
            if image is not None:
                raise _bad("CogVLM2 takes one image per conversation; this request has more than one.", where)
            image = found
        if m["role"] in ("system", "developer"):
            if turns:
                raise _bad(f"{where}: system messages must come before the conversation.", where)
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _bad(f"{where} is a {m['role']} message where a {expected} message was expected: the conversation "
                       "must alternate user and assistant and end with a user message.", where)
        turns.append(text)
    if len(turns) % 2 == 0:
        raise _bad("the last message must be a user message (the question).", "messages")
    if system:
        turns[0] = "\n".join(system + [turns[0]])
    history = tuple(zip(turns[:-1:2], turns[1::2]))
    n = _number(body, "n", 1, 128, integer=True, default=1)
    logprobs = _field(body, "logprobs", False)
    if not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be true or false.", "logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    try:
        schema = schema_of(_field(body, "response_format"))
        if schema is not None:
            grammar(schema)
    except UserError as e:
        raise _bad(str(e), "response_format") from None
    for name, nothing in NOT_IMPLEMENTED.items():
        if body.get(name) is not None and body[name] not in nothing:
            hint = " (use 'repetition_penalty')" if name.endswith("_penalty") else ""
            raise _bad(f"'{name}' is not supported by this server{hint}: leave it out.", name)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, field, 1, 1 << 20, integer=True, default=256)
    stop = _field(body, "stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of up to 4 non-empty strings (an empty one would end "
                   "every answer before it starts).", "stop")
    stream = _field(body, "stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream")
    options = _field(body, "stream_options", {})
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options")
    template = body.get("template")
    if template is not None and template not in ("chat", "vqa", "base"):
        raise _bad("'template' must be chat, vqa or base.", "template")
    try:
        params = SamplingParams(temperature=_number(body, "temperature", 0, 2, default=1.0),
                                top_p=_number(body, "top_p", 0, 1, default=1.0),
                                top_k=_number(body, "top_k", 0, 1 << 20, integer=True, default=0),
                                repetition_penalty=_number(body, "repetition_penalty", 0.01, 10, default=1.0),
                                seed=_number(body, "seed", 0, 2 ** 63 - 1, integer=True),
                                max_new_tokens=max_tokens, stop=tuple(stop),
                                logprobs=(top or 0) if logprobs else None, json_schema=schema)
    except UserError as e:
        raise _bad(str(e)) from None
    pixels = None
    if image is not None:
        try:
            pixels = image_size_check(image)
        except UserError as e:
            raise _bad(f"the image cannot be used: {e}", "messages") from None
    return ChatCall(Request(turns[-1], image=pixels, history=history, template=template, params=params), stream,
                    bool(options.get("include_usage")), n)


def _content(content, where, allowed_image_dir):
    """A message's content -> (text, image source or None)."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of parts.", where)
    texts, image = [], None
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _bad(f"{p}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}.", p)
            if image is not None:
                raise _bad("CogVLM2 takes one image per conversation; this request has more than one.", p)
            image = _image_source(url, p, allowed_image_dir)
        else:
            raise _bad(f"{p} must be a text part or an image_url part.", p)
    return "\n".join(texts), image


def _image_source(url: str, where: str, allowed_image_dir: Path | None):
    """A data: URL -> its bytes; a local path (or file:// URL) inside --allowed-image-dir -> that path."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise _bad(f"{where}: an image data URL must look like data:image/png;base64,....", where)
        try:  # line-wrapped base64 (MIME's 76 columns, `base64` without -w0) is still base64
            return base64.b64decode(re.sub(r"\s+", "", data), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the image data URL is not valid base64.", where) from None
    if len(url) >= 256 and _BASE64.fullmatch(url):
        raise _bad(f"{where}: the url is neither a data: URL nor a file name; it looks like base64 without its "
                   "prefix: send data:image/png;base64,<base64> (or image/jpeg, ...).", where)
    if url.startswith(("http://", "https://")):
        raise _bad(f"{where}: remote image URLs are refused (this server fetches nothing); send the image as a "
                   "data:image/...;base64 URL.", where)
    path = url.removeprefix("file://")
    if allowed_image_dir is None:
        raise _bad(f"{where}: local image paths are refused (start the server with --allowed-image-dir to allow a "
                   "folder); send the image as a data:image/...;base64 URL.", where)
    real = Path(os.path.realpath(path if os.path.isabs(path) else allowed_image_dir / path))
    if real != allowed_image_dir and allowed_image_dir not in real.parents:
        raise _bad(f"{where}: the image path is outside the allowed image folder.", where)
    return real


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")  # long runs of these are a payload, not a path


# --- responses ---------------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "context": "length", "cancel": "stop"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose K/V were reused, not computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(cid: str, model: str, results: list, token_bytes) -> dict:
    """A chat.completion of one choice per Result; token_bytes(id) -> bytes renders logprobs.
    The prompt is counted once, the completions of every choice."""
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs(r.logprobs, token_bytes), "finish_reason": FINISH.get(r.finish_reason, "stop")}
               for i, r in enumerate(results)]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results), results[0].reused_tokens)}


def logprobs(entries, token_bytes) -> dict | None:
    """(id, logprob, [(id, logprob), ...]) per token -> OpenAI's {"content": [{token, logprob, bytes,
    top_logprobs}]} (None when not asked)."""
    if entries is None:
        return None

    def one(token, lp):
        b = token_bytes(token)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
    return {"content": [{**one(t, lp), "top_logprobs": [one(i, x) for i, x in top]} for t, lp, top in entries]}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None, index: int = 0,
          logprobs_: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [] if usage_ is not None else [{"index": index, "delta": delta, "logprobs": logprobs_,
                                                        "finish_reason": FINISH.get(finish) if finish else None}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out
