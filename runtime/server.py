"""`cogvlm2-lite serve`: an OpenAI-compatible HTTP server on the in-flight scheduler.

    HTTP (FastAPI under uvicorn, asyncio)          engine thread (owns the Engine)
      POST /v1/chat/completions                      loop: take submissions and cancels,
        parse + check (openai_api.py), decode the          scheduler.step() while busy
        image in a worker thread  ── submit ──────►      each text piece / end ──► the request's
        stream or collect the events ◄─────────────       asyncio queue (call_soon_threadsafe)
      GET /v1/models, /health, /metrics; GET / the chat page (chat_page.py; off with --no-ui)

The graphs run only in the engine thread; the event loop never waits on them. A request is
refused with 429 (and Retry-After) when more than --max-queue requests wait for a row; a client
that disconnects cancels its request, which frees its row at the next step. On SIGTERM/SIGINT the
server stops listening and admitting (503 on open connections), lets running requests finish for up
to --shutdown-timeout seconds, then ends the rest with an error event, and exits as soon as none is
left. Tensor-parallel bundles are refused.

A client that goes away cancels its request, however it goes: mid-stream, while queued, while its image is
decoded, or a non-streaming client that times out (the openai client then retries: each attempt is cancelled
when it is abandoned, so retries never pile up generations). Every error reaches the client as JSON, also from
clients that send the whole body before reading (urllib, requests): an unread body is drained first, within a bound.
"""
import asyncio
import errno
import hmac
import json
import queue
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from .errors import UserError
from .openai_api import ApiError, chunk, completion, completion_id, logprobs, parse_chat, usage

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cogvlm2_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.queue = Gauge("cogvlm2_queue_depth", "Requests waiting for a row", registry=r)
        self.rows = Gauge("cogvlm2_rows_in_use", "KV-cache rows holding a request", registry=r)
        self.ttft = Histogram("cogvlm2_time_to_first_token_seconds", "Arrival to first token", buckets=BUCKETS_S,
                              registry=r)
        self.tpot = Histogram("cogvlm2_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("cogvlm2_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("cogvlm2_completion_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("cogvlm2_cached_prompt_tokens", "Prompt tokens whose K/V were reused", registry=r)

    def count_caches(self, engine_of):
        """Publish the engine's image caches at each scrape (`ImageCacheMetrics`); engine_of() -> the engine, or None
        while loading."""
        self.registry.register(ImageCacheMetrics(engine_of))


class ImageCacheMetrics:
    """A Prometheus collector of the image caches (encoder_cache.py), read when scraped: hits, misses, evictions,
    bytes, entries and capacity, labelled by cache (encoder, image_prefix)."""
    FIGURES = (("hits", "Lookups that found the image", True), ("misses", "Lookups that did not", True),
               ("evictions", "Entries dropped for room", True), ("bytes", "Bytes held", False),
               ("entries", "Images held", False), ("capacity_bytes", "The bound (--encoder-cache-mb, --prefix-cache-mb)",
                                                   False))

    def __init__(self, engine_of):
        self.engine_of = engine_of

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        engine = self.engine_of()
        stats = {name: c.stats() for name, c in engine.image_caches.items()} if engine else {}
        for key, text, counter in self.FIGURES:
            metric = (CounterMetricFamily if counter else GaugeMetricFamily)(
                f"cogvlm2_cache_{key}", f"Image caches: {text}", labels=["cache"])
            for name, st in stats.items():
                metric.add_metric([name], st[key])
            yield metric


class EngineLoop:
    """The one thread that runs the engine: submissions in, per-request events out."""

    def __init__(self, open_engine, max_queue: int, metrics: Metrics):
        self.open_engine, self.max_queue, self.metrics = open_engine, max_queue, metrics
        self.engine = None
        self.error = None                 # why loading failed
        self.ready = threading.Event()
        self.draining = False
        self._inbox = queue.Queue()       # ("add", [(request, sink), ...]) | ("cancel", sink) | ("stop", None)
        self._waiting = 0                 # submitted, not yet taken by the scheduler
        self._queued = 0                  # taken by the scheduler, waiting for a row (engine thread's count)
        self._rows_free = 0               # rows without a sequence (engine thread's count)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        metrics.count_caches(lambda: self.engine)

    def start(self):
        self._thread.start()

    def check_open(self):
        """Raises ApiError 503 while loading or shutting down."""
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another instance.")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry shortly.", headers={"Retry-After": "5"})

    def submit(self, requests: list, sinks: list) -> None:
        """Queue the choices of one prompt (the first one's prefill is shared by the others); sinks[i](kind, value)
        is called from the engine thread: ("text", (piece, logprob entries of its new tokens)), ("done", Result) or
        ("error", message). Raises ApiError 429/503 when they cannot be taken (all or none)."""
        self.check_open()
        with self._lock:
            waiting = self._waiting + self._queued - self._rows_free   # < 0: a row is free for this one
            if waiting + len(requests) > self.max_queue:
                raise ApiError(429, f"{waiting} requests are already waiting for a row (--max-queue {self.max_queue}); "
                               "retry later.", headers={"Retry-After": "1"})
            self._waiting += len(requests)
        self._inbox.put(("add", list(zip(requests, sinks)), None))

    def cancel(self, sink):
        self._inbox.put(("cancel", None, sink))

    def stop(self):
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout=30)

    def fail_all(self, message: str):
        self._inbox.put(("fail", message, None))

    def _run(self):
        try:
            self.engine = self.open_engine()
        except (UserError, Exception) as e:  # noqa: BLE001 - reported by /health and at start-up
            self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.ready.set()
            return
        engine = self.engine
        sched = engine.scheduler   # read for counts only; requests go in through the engine
        seqs = {}  # sink -> Sequence
        sent = {}  # sink -> logprob entries already sent
        self._count(sched)
        self.ready.set()
        while True:
            block = not sched.busy
            try:
                while True:
                    kind, value, sink = self._inbox.get(block=block, timeout=None) if block else self._inbox.get_nowait()
                    block = False
                    if kind == "stop":
                        return
                    if kind == "add":
                        with self._lock:
                            self._waiting, self._queued = self._waiting - len(value), self._queued + len(value)
                        parent = None
                        for request, s in value:
                            try:
                                seqs[s] = engine.add(request, parent=parent,
                                                     on_text=lambda piece, s=s: self._text(seqs, sent, s, piece),
                                                     on_finish=lambda seq, s=s: self._finished(seqs, sent, s, seq))
                                parent = parent or seqs[s]
                            except UserError as e:
                                s("error", str(e))
                    elif kind == "cancel" and sink in seqs:
                        seqs[sink].cancel()
                    elif kind == "fail":
                        for s, seq in list(seqs.items()):
                            seq.cancel()
                            s("error", value)
            except queue.Empty:
                pass
            self._count(sched)
            if sched.busy:
                engine.step()
                self._count(sched)
            self.metrics.queue.set(len(sched.queue) + self._waiting)
            self.metrics.rows.set(sched.rows_in_use)

    def _count(self, sched):
        """Publish the scheduler's queue and free rows for `submit`'s admission (--max-queue counts only the
        requests that must wait: with free rows even --max-queue 0 admits)."""
        with self._lock:
            self._queued, self._rows_free = len(sched.queue), len(sched.rows) - sched.rows_in_use

    @staticmethod
    def _text(seqs, sent, sink, piece):
        """A text piece, with the logprob entries of the tokens generated since the last one."""
        entries = seqs[sink].logprobs
        sink("text", (piece, entries[sent.get(sink, 0):]))
        sent[sink] = len(entries)

    def _finished(self, seqs, sent, sink, seq):
        seqs.pop(sink, None)
        sent.pop(sink, None)
        r = seq.result()
        m = self.metrics
        m.requests.labels(r.finish_reason).inc()
        m.prompt_tokens.inc(r.prompt_tokens)
        m.completion_tokens.inc(r.completion_tokens)
        m.cached_tokens.inc(r.reused_tokens)
        if r.completion_tokens:
            m.ttft.observe(r.ttft_s)
        if r.completion_tokens > 1:
            m.tpot.observe((r.total_s - r.ttft_s) / (r.completion_tokens - 1))
        sink("done", r)


class DrainUnreadBody:
    """ASGI middleware: before an answer starts, read and drop what is left of the request body (up to `limit`
    bytes, for at most `seconds`). Without it a 413, 401 or 404 answered before the body was read reaches only
    clients that read while they send: urllib, requests and curl send the whole body first, and meet a closed
    connection ("Broken pipe") instead of the JSON error. A client that sent `Expect: 100-continue` has not sent
    its body and is not asked for it."""

    def __init__(self, app, limit: int, seconds: float = 10.0):
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        unread = not any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope["headers"])

        async def receive_tracked():
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def send_after_drain(message):
            nonlocal unread
            if message["type"] == "http.response.start" and unread:
                unread = False
                await self._drain(receive)
            await send(message)

        await self.app(scope, receive_tracked, send_after_drain)

    async def _drain(self, receive):
        dropped = 0
        try:
            async with asyncio.timeout(self.seconds):
                while dropped <= self.limit:
                    message = await receive()
                    dropped += len(message.get("body", b""))
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
        except TimeoutError:
            pass


def create_app(loop: EngineLoop, model: str, api_key: str | None = None, max_body_bytes: int = 20 << 20,
               allowed_image_dir: Path | None = None, ui: bool = True):
    """The ASGI app over a started EngineLoop; with `ui`, the chat page at GET /."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="cogvlm2-lite", docs_url=None, redoc_url=None)
    app.add_middleware(DrainUnreadBody, limit=max(4 * max_body_bytes, 64 << 20))
    metrics = loop.metrics
    if ui:
        from .chat_page import add_chat_page
        add_chat_page(app)

    def refuse(e: ApiError):
        if e.status >= 400:
            metrics.requests.labels("rejected" if e.status in (429, 503) else "invalid").inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request, exc):  # a bug: the client gets one sentence, the server goes on
        metrics.requests.labels("error").inc()
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__}); the server goes on.").body(),
                            status_code=500)

    def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if loop.error:
            return JSONResponse({"status": "error", "error": loop.error}, status_code=503)
        if loop.engine is None or loop.draining:
            return JSONResponse({"status": "loading" if loop.engine is None else "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return refuse(e)
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "cogvlm2-lite"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        gone = None
        try:
            check_key(request)
            body = await _read_json(request, max_body_bytes)
            gone = asyncio.ensure_future(_disconnected(request))   # from here on, a client that leaves cancels
            loop.check_open()
            engine = loop.engine
            call = await run_in_threadpool(parse_chat, body, model, lambda src: engine.pixels([src])[0],
                                           allowed_image_dir)
            try:  # tokenized and its image hashed here, once, off the event loop
                prepared = await run_in_threadpool(engine.prepare, call.request)
            except UserError as e:  # before the stream starts: a 400, not an error event
                raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
            if gone.done():  # left while the image was decoded: nothing to run
                metrics.requests.labels("cancel").inc()
                return Response(status_code=499)
            events = asyncio.Queue()
            aloop = asyncio.get_running_loop()

            def sink_of(index):
                return lambda kind, value: aloop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
            sinks = [sink_of(i) for i in range(call.n)]
            loop.submit([prepared] + [choice(prepared, i) for i in range(1, call.n)], sinks)
        except ApiError as e:
            if gone is not None:
                gone.cancel()
            return refuse(e)
        except BaseException:
            if gone is not None:
                gone.cancel()
            raise

        def cancel():
            for s in sinks:
                loop.cancel(s)
        cid = completion_id()
        if call.stream:  # Starlette cancels the stream when the client leaves: its `finally` cancels the request
            gone.cancel()
            return StreamingResponse(_stream(events, cancel, call, cid), media_type="text/event-stream")
        answer = asyncio.ensure_future(_answer(events, call.n, cid))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client left (or the server is stopping): the request ends and frees its rows
            if not answer.done():
                answer.cancel()
                cancel()
            gone.cancel()
        return answer.result() if answer.done() and not answer.cancelled() else Response(status_code=499)

    def token_bytes(token: int) -> bytes:
        tok = loop.engine.tokenizer
        return tok.decode_bytes([token]) if 0 <= token < tok.vocab_size else b""

    async def _answer(events, n, cid):
        """The whole answer of a non-streaming request (its n choices), from its events."""
        results = [None] * n
        while None in results:
            index, kind, value = await events.get()
            if kind == "error":
                status = 503 if loop.draining else 400
                return JSONResponse(ApiError(status, value).body(), status_code=status)
            if kind == "done":
                results[index] = value
        return completion(cid, model, results, token_bytes)

    async def _stream(events, cancel, call, cid):
        left, failed = call.n, False
        completion_tokens = prompt_tokens = cached_tokens = 0
        try:
            for i in range(call.n):
                yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}, index=i))
            while left:
                index, kind, value = await events.get()
                if kind == "text":  # one chunk per token, "" for a token without text: clients see its time
                    piece, entries = value
                    yield _sse(chunk(cid, model, {"content": piece}, index=index,
                                     logprobs_=logprobs(entries, token_bytes) if entries else None))
                elif kind == "error":  # the other choices end too
                    left, failed = 0, True
                    cancel()
                    yield _sse(ApiError(503 if loop.draining else 400, value).body())
                    break
                else:
                    left -= 1
                    if index == 0:  # the prompt is counted once, with what of it was reused
                        prompt_tokens, cached_tokens = value.prompt_tokens, value.reused_tokens
                    completion_tokens += value.completion_tokens
                    yield _sse(chunk(cid, model, {}, value.finish_reason, index=index))
            if call.include_usage and not failed:
                yield _sse(chunk(cid, model, {}, usage_=usage(prompt_tokens, completion_tokens, cached_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client disconnected mid-stream: free its rows
                cancel()

    return app


def choice(prepared, index: int):
    """Choice `index` of a prepared request: the same prompt, seeded seed + index when a seed is given."""
    params = prepared.request.params
    seed = None if params.seed is None else params.seed + index
    return replace(prepared, request=replace(prepared.request, params=replace(params, seed=seed)))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request):
    """Returns once the client has gone. Call it after the body is read: the next ASGI message is then the
    disconnect (uvicorn also sends it once the response is complete, when nobody waits for it any more)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON value")


async def _read_json(request, limit: int):
    """The body as JSON: 413 past `limit` bytes (checked while reading, not only from Content-Length); 400 for
    anything Python's json refuses, too deep nesting and integers of over 4300 digits included, and for NaN and
    Infinity, which JSON does not have. Raises ApiError."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes, more than the {limit} allowed (--max-body-mb).")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is more than the {limit} bytes allowed (--max-body-mb).")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON (not UTF-8).") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e.msg}).") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON here (nested too deeply).") from None
    except ValueError as e:  # an integer of more digits than Python converts, NaN, Infinity
        raise ApiError(400, f"the request body is not valid JSON here ({str(e).split(';')[0]}).") from None


def check_address(host: str, port: int):
    """Raises UserError now if `listen` would (the port is then free again for the process that serves)."""
    listen(host, port).close()


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket (port 0: any free one), bound before anything loads, so that a taken
    port or a bad address is one sentence, with no half-loaded engine to tear down. Raises UserError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address this machine can listen on ({e.strerror}).") from None
    except OSError as e:
        why = "another process is listening there: choose another --port" if e.errno == errno.EADDRINUSE else e.strerror
        raise UserError(f"cannot listen on {host}:{port} ({why}).") from None


def serve(bundle: str, host: str, port: int, backend: str, api_key: str | None, max_queue: int, max_body_mb: float,
          allowed_image_dir: str | None, shutdown_timeout: float, ui: bool = True, on_ready=print, **cache_mb):
    """Bind, load the bundle in the engine thread (503 until loaded), serve until SIGTERM/SIGINT.
    cache_mb: the Engine's encoder_cache_mb and prefix_cache_mb. Raises UserError for a bad bundle, folder or
    address, or a bundle that fails to load."""
    import uvicorn

    from .bundle import Bundle
    from .engine import Engine
    b = Bundle(bundle)
    if b.tp > 1:
        from .engine import join_ranks
        if join_ranks(b.tp) != 0:   # under msrun: the other ranks execute rank 0's plans, and serve nothing
            from .options import follow_if_not_rank0
            follow_if_not_rank0(Engine(b, backend=backend, **cache_mb))
    image_dir = None
    if allowed_image_dir is not None:
        image_dir = Path(allowed_image_dir).resolve()
        if not image_dir.is_dir():
            raise UserError(f"--allowed-image-dir {allowed_image_dir} is not a folder.")
    sock = listen(host, port)
    port = sock.getsockname()[1]
    metrics = Metrics()
    loop = EngineLoop(lambda: Engine(b, backend=backend, **cache_mb), max_queue, metrics)
    app = create_app(loop, Path(bundle).resolve().name, api_key, int(max_body_mb * (1 << 20)), image_dir, ui)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Stop admitting; give running requests `shutdown_timeout` seconds, then end them."""
            if not loop.draining:
                loop.draining = True
                deadline.start()
            super().handle_exit(sig, frame)

    deadline = threading.Timer(shutdown_timeout, loop.fail_all, ("the server shut down before this request finished.",))
    deadline.daemon = True   # once every request has ended, the process exits without waiting for it
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout + 2)
    server = Server(config)
    loop.start()

    def announce():
        loop.ready.wait()
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if loop.error:
            server.should_exit = True   # reported once, by the UserError below
        elif server.started:
            page = f"; chat page: http://{host}:{port}/" if ui else ""
            on_ready(f"serving {Path(bundle).resolve().name} on http://{host}:{port}/v1 (OpenAI chat completions){page}")
    threading.Thread(target=announce, daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it handled once it has stopped:
        signal.signal(sig, lambda *_: None)      # a graceful stop then exits 0, not as killed
    server.run(sockets=[sock])
    loop.stop()
    if loop.engine is not None:
        loop.engine.close()   # tensor parallel: the other ranks stop following
    if loop.error:
        raise UserError(loop.error)
