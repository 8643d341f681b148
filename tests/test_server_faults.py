"""Issue 27: the server faults found by replaying real users' reports, each tested by its kind: every way a client
abandons a request, every nullable field, every malformed body, every error reaching every HTTP client."""
import asyncio
import base64
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_server import KEY, Server, alone, image_message

from cogvlm2_lite.runtime.engine import Request
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.sampling import SamplingParams

HI = [{"role": "user", "content": "tell me something"}]


@pytest.fixture(scope="module")
def keyed(tiny_bundle_b4, tmp_path_factory):
    """A server with an API key, a 1 MB body limit and an allowed image folder."""
    allowed = tmp_path_factory.mktemp("allowed-faults")
    s = Server(tiny_bundle_b4, "--api-key", KEY, "--max-body-mb", "1", "--allowed-image-dir", allowed)
    s.model, s.auth = Path(tiny_bundle_b4).name, {"authorization": f"Bearer {KEY}"}
    yield s
    assert s.stop() == 0


def outcome(server, label):
    return server.metric("cogvlm2_requests_total", f'{{outcome="{label}"}}')


def wait_for(predicate, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()


# --- every way a client abandons a request ------------------------------------------------------------
class FakeLoop:
    """An EngineLoop whose requests never end by themselves: only a cancel ends them."""

    def __init__(self, decode_s=0.0):
        from cogvlm2_lite.runtime.server import Metrics
        self.metrics, self.draining, self.decode_s = Metrics(), False, decode_s
        self.submitted, self.cancelled = [], []
        self.engine = self

    def check_open(self):
        pass

    def prepare(self, request):
        return request

    def pixels(self, images):
        time.sleep(self.decode_s)       # a large image being decoded
        return [None for _ in images]

    def submit(self, requests, sinks):
        for sink in sinks:
            self.submitted.append(sink)
            sink("text", ("a", []))

    def cancel(self, sink):
        self.cancelled.append(sink)


def drive(body: dict, disconnect_after: float, decode_s=0.0):
    """One request through the ASGI app: the body, then the client disconnects after `disconnect_after` s.
    -> (the fake loop, the response's status or None)."""
    from cogvlm2_lite.runtime.server import create_app
    loop = FakeLoop(decode_s)
    app = create_app(loop, "m")
    raw = json.dumps(body).encode()
    sent = []

    async def run():
        messages = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        await asyncio.wait_for(app(scope, receive, send), 10)
    asyncio.run(run())
    return loop, next((m["status"] for m in sent if m["type"] == "http.response.start"), None)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_generating_cancels_its_request(stream):
    loop, _ = drive({"messages": HI, "stream": stream}, disconnect_after=0.2)
    assert len(loop.submitted) == 1 and loop.cancelled == loop.submitted


def test_a_client_that_leaves_while_its_image_is_decoded_is_never_run():
    url = "data:image/png;base64," + base64.b64encode(b"png").decode()
    loop, _ = drive({"messages": [image_message("what is it", url)]}, disconnect_after=0.05, decode_s=0.5)
    assert loop.submitted == [] and outcome_of(loop, "cancel") == 1


def outcome_of(loop, label):
    return loop.metrics.requests.labels(label)._value.get()


def test_abandoned_requests_free_their_rows_on_the_real_server(keyed):
    """A non-streaming client that times out, one that closes its socket after sending, and the openai client
    with retries: each attempt ends as 'cancel', and no row stays held."""
    body = json.dumps({"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 100000,
                       "temperature": 0.9, "seed": 3}).encode()
    before = outcome(keyed, "cancel")
    with socket.create_connection(("127.0.0.1", keyed.port)) as s:  # send, then hang up at once
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_for(lambda: outcome(keyed, "cancel") == before + 1)
    import openai
    impatient = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, timeout=0.02, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=keyed.model, messages=[{"role": "user", "content": "a long story"}],
                                          max_tokens=100000, temperature=0.9, seed=3)
    # each attempt ends as cancel, or (the tiny model is fast) reaches the cache's end just before: never runs on
    assert wait_for(lambda: keyed.metric("cogvlm2_rows_in_use") == 0 and outcome(keyed, "cancel") >= before + 2)
    assert keyed.post({"messages": HI, "max_tokens": 2}, keyed.auth).status_code == 200


# --- every nullable field ----------------------------------------------------------------------------
# OpenAI's chat-completions fields documented as nullable (null = the default), and this server's own
NULLABLE = ["frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata", "n",
            "parallel_tool_calls", "presence_penalty", "response_format", "seed", "service_tier", "stop", "store",
            "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
            "function_call", "functions", "model", "top_k", "repetition_penalty", "template"]


def test_null_means_the_default_for_every_nullable_field(keyed):
    base = {"messages": HI, "max_tokens": 6, "temperature": 0}
    want = keyed.post(base, keyed.auth).json()["choices"][0]["message"]["content"]
    for name in NULLABLE:
        body = {**base, name: None}
        if name in ("max_tokens", "temperature"):  # null: the server's default, so compare with that
            body = {"messages": HI, "max_tokens": 6, "temperature": 0, **{name: None}}
        r = keyed.post(body, keyed.auth)
        assert r.status_code == 200, (name, r.text)
        if name not in ("max_tokens", "temperature"):
            assert r.json()["choices"][0]["message"]["content"] == want, name


# --- stop strings ------------------------------------------------------------------------------------
def test_an_empty_stop_string_is_refused_in_every_form(keyed):
    for stop in ("", [""], ["ok", ""]):
        r = keyed.post({"messages": HI, "stop": stop}, keyed.auth)
        assert r.status_code == 400 and "empty" in r.json()["error"]["message"] and r.json()["error"]["param"] == "stop"
    with pytest.raises(UserError, match="non-empty strings"):
        SamplingParams(stop=("",))


def test_a_stop_string_ends_the_request_at_its_token_with_the_same_usage_every_time(keyed, engine4):
    plain = alone(engine4, "tell me something", 16)
    tok = engine4.tokenizer
    texts = [tok.decode(plain.token_ids[:k]) for k in range(1, len(plain.token_ids) + 1)]
    stop = plain.text[len(texts[3]) - 1:len(texts[5])]  # spans tokens 4..6: completed by the 6th token or earlier
    want_tokens = next(k for k, t in enumerate(texts, 1) if stop in t)
    want_text = plain.text[:plain.text.find(stop)]
    stops_before, cancels_before = outcome(keyed, "stop"), outcome(keyed, "cancel")
    body = {"messages": HI, "max_tokens": 16, "temperature": 0, "stop": stop}
    for _ in range(3):
        r = keyed.post(body, keyed.auth).json()
        assert r["choices"][0]["message"]["content"] == want_text and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == want_tokens
        client = keyed.client(KEY)
        chunks = list(client.chat.completions.create(model=keyed.model, stream=True, stream_options={"include_usage": True},
                                                     **{k: v for k, v in body.items() if k != "messages"}, messages=HI))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
        assert chunks[-1].usage.completion_tokens == want_tokens
    # a stop string is a stop, not a cancel, in the metrics
    assert outcome(keyed, "stop") == stops_before + 6 and outcome(keyed, "cancel") == cancels_before
    # the Python API stops the same way
    engine4.clear_prefix_cache()
    [r] = engine4.generate([Request("tell me something", params=SamplingParams(max_new_tokens=16, stop=(stop,)))])
    assert (r.text, r.completion_tokens, r.finish_reason) == (want_text, want_tokens, "stop")


# --- every malformed body ----------------------------------------------------------------------------
OK = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
MALFORMED = {
    "broken": b"{broken", "empty": b"", "not UTF-8": b'{"messages": "\xff\xfe"}',
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "deep field": OK + b', "metadata": ' + b"[" * 50000 + b"]" * 50000 + b"}",
    "5000-digit integer": OK + b', "seed": ' + b"9" * 5000 + b"}",
    "NaN": OK + b', "temperature": NaN}', "Infinity": OK + b', "top_p": -Infinity}',
    "1e999": OK + b', "temperature": 1e999}', "a bare string": b'"hello"', "trailing garbage": OK + b"} x",
}


def test_every_malformed_body_is_a_counted_400(keyed):
    before = outcome(keyed, "invalid")
    for name, raw in MALFORMED.items():
        r = keyed.post(None, keyed.auth, raw=raw)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"].endswith("."), (name, err)
        assert len(r.content) < 600, name
    assert outcome(keyed, "invalid") == before + len(MALFORMED)
    assert outcome(keyed, "error") == 0


# --- every error reaches every HTTP client -------------------------------------------------------------
def urllib_post(url, data: bytes, headers):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_errors_answered_before_the_body_is_read_reach_clients_that_send_it_all_first(keyed):
    big = json.dumps({"messages": [{"role": "user", "content": "a" * (3 << 20)}]}).encode()
    chat = f"{keyed.url}/v1/chat/completions"
    cases = [(chat, keyed.auth, 413, "--max-body-mb"), (chat, {"authorization": "Bearer wrong"}, 401, "API key"),
             (f"{keyed.url}/v1/nowhere", keyed.auth, 404, "")]
    for url, headers, status, words in cases:
        code, body = urllib_post(url, big, headers)
        assert code == status and words in body.decode(), (url, code, body[:200])
    # chunked, no Content-Length: the limit is found while reading; http.client sends it all first
    conn = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"content-type": "application/json", **keyed.auth}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and b"--max-body-mb" in r.read()
    conn.close()


# --- image URLs ----------------------------------------------------------------------------------------
def test_raw_base64_or_a_huge_name_is_one_short_sentence_that_echoes_nothing(keyed, photo):
    raw = base64.b64encode(Path(photo).read_bytes()).decode()
    for url in (raw, "x" * 5000 + ".png", "A" * 300_000):
        r = keyed.post({"messages": [image_message("what is it", url)], "max_tokens": 2}, keyed.auth)
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and len(msg) < 300 and raw[:40] not in msg and "x" * 200 not in msg, msg
    assert "data:image/png;base64," in keyed.post({"messages": [image_message("what is it", raw)]},
                                                  keyed.auth).json()["error"]["message"]


def test_line_wrapped_base64_is_the_same_image(keyed, photo):
    raw = base64.b64encode(Path(photo).read_bytes()).decode()
    wrapped = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))
    answers = [keyed.post({"messages": [image_message("what is it", f"data:image/png;base64,{b64}")], "max_tokens": 6,
                           "temperature": 0}, keyed.auth).json()["choices"][0]["message"]["content"]
               for b64 in (raw, wrapped, wrapped.replace("\n", "\r\n"))]
    assert answers[0] == answers[1] == answers[2]


# --- bench-serve and batch ----------------------------------------------------------------------------
def test_bench_serve_counts_a_complete_empty_answer_as_answered(keyed, engine4):
    import httpx

    from cogvlm2_lite.bench.serve import one
    first = alone(engine4, "tell me something", 1).text
    assert first, "the tiny model's first token has text"
    body = {"messages": HI, "max_tokens": 8, "temperature": 0, "stop": first, "stream": True,
            "stream_options": {"include_usage": True}}

    async def go():
        async with httpx.AsyncClient(timeout=60, headers=keyed.auth) as c:
            return await one(c, keyed.url, body)
    r = asyncio.run(go())
    assert r["status"] == 200 and r["finish"] == "stop" and r["chars"] == 0 and r["tokens"] == 1


def test_batch_names_an_empty_image_field(engine, tmp_path):
    from cogvlm2_lite.runtime.batch import run_batch
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "hi", "image": ""}\n{"id": 2, "prompt": "hi", "image": "  "}\n'
                   '{"id": 3, "prompt": "hi", "max_new_tokens": 2}\n')
    run_batch(engine, inp, tmp_path / "out.jsonl")
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o.get("error", "")[:18] for o in out] == ['"image" is empty: ', '"image" is empty: ', ""]
    with pytest.raises(UserError, match="image path is empty"):
        engine.pixels([""])
