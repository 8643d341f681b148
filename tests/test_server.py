"""Issue 17: `cogvlm2-lite serve`, talked to over loopback with the real `openai` client and raw HTTP."""
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cogvlm2_lite.runtime.engine import Request
from cogvlm2_lite.runtime.sampling import SamplingParams

CLI = Path(sys.executable).parent / "cogvlm2-lite"
KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(CLI), "serve", str(bundle), "--port", str(self.port), *map(str, flags)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("the server did not become healthy")

    def client(self, key="unused"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, body, headers=None, raw=None):
        return httpx.post(f"{self.url}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                          headers={"content-type": "application/json", **(headers or {})}, timeout=60)

    def metric(self, name, labels="") -> float:
        text = httpx.get(f"{self.url}/metrics").text
        line = next((x for x in text.splitlines() if x.startswith(name + labels + " ") or
                     (not labels and x.startswith(name + " "))), None)
        return float(line.split()[-1]) if line else 0.0

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_bundle_b4, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    Image.fromarray(np.full((20, 20, 3), 120, np.uint8)).save(allowed / "grey.png")
    s = Server(tiny_bundle_b4, "--allowed-image-dir", allowed, "--max-body-mb", "1")
    s.allowed, s.model = allowed, Path(tiny_bundle_b4).name
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def png_url(photo):
    return "data:image/png;base64," + base64.b64encode(Path(photo).read_bytes()).decode()


def alone(engine4, prompt, n, image=None, history=()):
    engine4.clear_prefix_cache()
    return engine4.generate([Request(prompt, image=image, history=history,
                                     params=SamplingParams(max_new_tokens=n))])[0]


def image_message(text, url):
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def test_text_only_streamed_and_not_equal_the_engine(server, engine4):
    c = server.client()
    msgs = [{"role": "user", "content": "tell me something"}]
    assert [m.id for m in c.models.list().data] == [server.model]
    full = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=12,
                                     temperature=0)
    want = alone(engine4, "tell me something", 12)
    assert full.choices[0].message.content == want.text
    assert full.usage.completion_tokens == want.completion_tokens and full.usage.prompt_tokens == want.prompt_tokens
    assert full.choices[0].finish_reason == {"length": "length", "stop": "stop"}[want.finish_reason]
    pieces, usage = [], None
    for ch in c.chat.completions.create(model=full.model, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    assert "".join(pieces) == want.text and len(pieces) > 1
    assert usage.completion_tokens == want.completion_tokens


def test_image_data_url_and_multi_turn(server, engine4, photo, png_url):
    c = server.client()
    first = c.chat.completions.create(model=server.model,
                                      messages=[image_message("what is it?", png_url)], max_tokens=6, temperature=0)
    assert first.choices[0].message.content == alone(engine4, "what is it?", 6, image=photo).text
    msgs = [{"role": "system", "content": "Be brief."}, image_message("what is it?", png_url),
            {"role": "assistant", "content": "a picture"}, {"role": "user", "content": "and the colours?"}]
    second = c.chat.completions.create(model=first.model, messages=msgs, max_tokens=6, temperature=0)
    want = alone(engine4, "and the colours?", 6, image=photo, history=(("Be brief.\nwhat is it?", "a picture"),))
    assert second.choices[0].message.content == want.text


def test_local_image_only_inside_the_allowed_folder(server, tmp_path):
    ok = server.post({"messages": [image_message("hi", str(server.allowed / "grey.png"))], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    for url in (str(outside), f"file://{outside}", str(server.allowed / ".." / outside.name)):
        r = server.post({"messages": [image_message("hi", url)]})
        assert r.status_code == 400 and "outside the allowed image folder" in r.json()["error"]["message"]


def bad_requests(png_url):
    """(body or raw bytes, status, words in the message, param)."""
    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, "PNG")  # a decompression bomb: 400 Mpx of zeros
    two = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url}}] * 2}
    return [
        (b"{not json", 400, "not valid JSON", None),
        ({"messages": "hello"}, 400, "'messages' must be", "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature' must be",
         "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "'max_tokens' must be", "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, 400,
         "'max_completion_tokens' must be", "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n' must be", "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400, "'logprobs' must be", "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
         400, "'tools' is not supported", "tools"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "use 'repetition_penalty'",
         "presence_penalty"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "alternate user and assistant", "messages[0]"),
        ({"messages": [two]}, 400, "one image per conversation", None),
        ({"messages": [image_message("a", png_url), image_message("b", png_url)]}, 400, "one image per conversation",
         None),
        ({"messages": [image_message("hi", "https://example.com/cat.png")]}, 400, "remote image URLs are refused",
         None),
        ({"messages": [image_message("hi", "data:image/png;base64," + base64.b64encode(b"not a png").decode())]}, 400,
         "the image cannot be used", "messages"),
        ({"messages": [image_message("hi", "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode())]},
         400, "too large to decode safely", "messages"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "more than this bundle's cache holds (64", "messages"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist here", "model"),
        ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "more than the", None),
    ]


def test_every_bad_request_gets_its_status_and_one_sentence(server, png_url):
    for body, status, words, param in bad_requests(png_url):
        r = server.post(body) if not isinstance(body, bytes) else server.post(None, raw=body)
        assert r.status_code == status, (words, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err["message"] and set(err) == {"message", "type", "param", "code"}, err
        assert param is None or err["param"] == param, err
        assert "Traceback" not in r.text
    assert server.post({"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2}).status_code == 200
    off = {"logprobs": False, "tools": [], "frequency_penalty": 0, "presence_penalty": 0.0, "response_format": {"type": "text"}}
    assert server.post({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2, **off}).status_code == 200


def test_stop_strings_cut_the_text(server, engine4):
    want = alone(engine4, "tell me something", 12).text
    stop = want[3:5]
    r = server.post({"messages": [{"role": "user", "content": "tell me something"}], "max_tokens": 12,
                     "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == want[:want.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_a_disconnect_mid_stream_frees_its_row(server):
    cancelled = server.metric("cogvlm2_requests_total", '{outcome="cancel"}')
    body = {"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 200, "stream": True,
            "temperature": 0.8, "seed": 1}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines), next(lines)
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("cogvlm2_requests_total", '{outcome="cancel"}') <= cancelled:
        time.sleep(0.1)
    assert server.metric("cogvlm2_requests_total", '{outcome="cancel"}') == cancelled + 1
    assert server.metric("cogvlm2_rows_in_use") == 0


def test_sixteen_concurrent_clients_on_four_rows(server, engine4):
    prompts = [f"question {i}" + " please" * (i % 4) for i in range(16)]
    lengths = [4 + (5 * i) % 13 for i in range(16)]
    answers = [None] * 16

    def ask(i):
        r = server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=lengths[i], temperature=0,
                                                    extra_body={"top_k": 0, "repetition_penalty": 1.0})
        answers[i] = r.choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(16):
        assert answers[i] == alone(engine4, prompts[i], lengths[i]).text


def test_auth_body_limit_and_queue_limit(tiny_bundle_b4):
    """--max-queue 0: no request may wait, but one that finds a free row runs."""
    s = Server(tiny_bundle_b4, "--api-key", KEY, "--max-queue", "0")
    try:
        alone = s.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                       {"authorization": f"Bearer {KEY}"})
        assert alone.status_code == 200, alone.text
        assert s.post({"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        wrong = s.post({"messages": [{"role": "user", "content": "hi"}]}, {"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            s.client("nope").models.list()
        assert [m.id for m in s.client(KEY).models.list().data] == [Path(tiny_bundle_b4).name]
        statuses = []

        def flood():
            r = s.post({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 60},
                       {"authorization": f"Bearer {KEY}"})
            statuses.append((r.status_code, r.headers.get("retry-after")))
        threads = [threading.Thread(target=flood) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (429, "1") in statuses and any(code == 200 for code, _ in statuses)
        ok = s.client(KEY).chat.completions.create(model=Path(tiny_bundle_b4).name, max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message.content is not None
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("flags, says", [(("--host", "no.such.host.invalid"), "--host no.such.host.invalid is not an "
                                                                           "address this machine can listen on"),
                                         (("--host", "127.0.0.1", "--port", "{taken}"), "another process is listening"),
                                         (("--port", "0", "--backend", "nosuch"), "backend 'nosuch' is not available")])
def test_a_taken_port_or_an_unknown_host_is_one_sentence(tiny_bundle, flags, says):
    """The address is checked before the bundle loads (nothing of MindSpore left to crash at exit), and a
    bundle that fails to load is said once: one line and exit 1."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        flags = [f.format(taken=holder.getsockname()[1]) for f in flags]
        r = subprocess.run([str(CLI), "serve", str(tiny_bundle), *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_loading_and_shutting_down_answer_503():
    """In process, with an engine that loads only when told to."""
    from starlette.testclient import TestClient

    from cogvlm2_lite.runtime.server import EngineLoop, Metrics, create_app
    from cogvlm2_lite.runtime.errors import UserError
    gate = threading.Event()

    def opener():
        gate.wait()
        raise UserError("no model in this test")
    loop = EngineLoop(opener, 4, Metrics())
    loop.start()
    client = TestClient(create_app(loop, "m"))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503
    loop.draining = True
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    gate.set()
    loop.ready.wait(10)
    assert client.get("/health").json() == {"status": "error", "error": "no model in this test"}


def test_an_idle_server_exits_at_once_on_sigterm(tiny_bundle):
    """--shutdown-timeout bounds the running requests; with none running nothing waits for it."""
    s = Server(tiny_bundle, "--shutdown-timeout", "120")
    s.proc.terminate()
    assert s.proc.wait(timeout=30) == 0   # a hang guard: waiting out the 120 s fails here


def test_sigterm_finishes_or_ends_running_requests_within_the_bound(tiny_bundle):
    """SIGTERM mid-stream: the stream still ends cleanly (its finish, or an error event once
    --shutdown-timeout passed), and the server exits 0 within the bound."""
    s = Server(tiny_bundle, "--shutdown-timeout", "1")
    body = {"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 100000, "stream": True,
            "temperature": 0.9, "seed": 3}
    events = []
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        s.proc.terminate()
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert s.proc.wait(timeout=15) == 0   # the bound: --shutdown-timeout 1 plus start-up slack; a hang fails here
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert ("error" in last and "shut down before this request finished" in last["error"]["message"]) or \
        last["choices"][0]["finish_reason"] in ("stop", "length")


def test_usage_counts_cached_prompt_tokens_and_metrics_count_the_caches(server, engine4):
    """A second question about an image: usage.prompt_tokens_details.cached_tokens says how many prompt tokens were
    reused (issue 30); /metrics counts the image caches."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(30).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    misses = server.metric("cogvlm2_cache_misses_total", '{cache="encoder"}')
    cached = server.metric("cogvlm2_cached_prompt_tokens_total")
    c = server.client()
    first = c.chat.completions.create(model=server.model, messages=[image_message("what is it?", url)], max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert server.metric("cogvlm2_cache_misses_total", '{cache="encoder"}') == misses + 1
    second = c.chat.completions.create(model=server.model, messages=[image_message("which colours?", url)], max_tokens=2,
                                       stream=True, stream_options={"include_usage": True})
    usage = [ch.usage for ch in second if ch.usage][0]
    assert usage.prompt_tokens_details.cached_tokens >= engine4.n_image + 1   # bos and the image section at least
    assert server.metric("cogvlm2_cached_prompt_tokens_total") == cached + usage.prompt_tokens_details.cached_tokens
    assert server.metric("cogvlm2_cache_entries", '{cache="image_prefix"}') >= 1
    assert server.metric("cogvlm2_cache_bytes", '{cache="encoder"}') > 0
