"""OpenAI Batch API files for `batch` (the format `vllm run-batch` and hosted batch services take).

    in:  {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {chat completion request}}
    out: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}
         {"id", "custom_id", "response": {"status_code": 400, "request_id", "body": {"error": {...}}}, "error": null}
         {"id", "custom_id": null, "line": N, "response": null, "error": {"code", "message"}}   a line without a
                                                                                              usable custom_id

A body is read exactly as the server reads it (openai_api.parse_chat), and the answer is the object the server
returns for it; images are data URLs or paths inside IN's folder. The body's `model` is not checked (files name
hosted models) and the answer names the bundle. `batch` detects the format per file from its first line; the
exactly-once and resume rules are the native format's (batch.py), keyed by custom_id.
"""
import json
import uuid

from .errors import UserError
from .openai_api import ApiError, completion, completion_id, parse_chat

KEY = "custom_id"
URL = "/v1/chat/completions"


def is_openai_file(first_line: bytes) -> bool:
    """Whether IN's first non-blank line is an OpenAI Batch API line."""
    try:
        obj = json.loads(first_line.decode("utf-8-sig"))
    except ValueError:
        return False
    return isinstance(obj, dict) and KEY in obj and "id" not in obj


def request(obj: dict, in_dir, engine):
    """One input line -> the engine Request of its body. Raises ApiError (an answer with that status) or UserError."""
    if obj.get("method") != "POST":
        raise UserError(f"\"method\" is {json.dumps(obj.get('method'))}: only POST is supported.")
    if obj.get("url") != URL:
        raise UserError(f"\"url\" is {json.dumps(obj.get('url'))}: only {URL} is supported.")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise UserError("\"body\" must be a chat completion request object.")
    call = parse_chat({**body, "model": None}, "", lambda src: engine.pixels([src])[0], in_dir.resolve())
    if call.stream or call.n != 1:
        raise ApiError(400, "a batch line answers one choice without streaming: leave out 'stream' and 'n'.")
    return call.request


def result_line(custom_id, result, model: str, token_bytes) -> dict:
    return _line(custom_id, 200, completion(completion_id(), model, [result], token_bytes))


def error_line(custom_id, message: str, status: int = 400, lineno: int | None = None) -> dict:
    """A line that was read but cannot run: its 4xx answer; without a usable custom_id: an error by line number."""
    if lineno is not None:
        return {"id": _batch_id(), "custom_id": custom_id, "line": lineno, "response": None,
                "error": {"code": "invalid_line", "message": message}}
    return _line(custom_id, status, ApiError(status, message).body())


def is_error(obj: dict) -> bool:
    response = obj.get("response") or {}
    return obj.get("error") is not None or response.get("status_code") != 200


def _line(custom_id, status: int, body: dict) -> dict:
    return {"id": _batch_id(), KEY: custom_id, "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                                                            "body": body}, "error": None}


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
