"""`cogvlm2-lite serve`: an OpenAI-compatible HTTP server on the in-flight scheduler.

    HTTP (FastAPI under uvicorn, asyncio)          engine thread (owns the Engine)
      POST /v1/chat/completions                      loop: take submissions and cancels,
        parse + check (openai_api.py), decode the          scheduler.step() while busy
        image in a worker thread  ── submit ──────►      each text piece / end ──► the request's
        stream or collect the events ◄─────────────       asyncio queue (call_soon_threadsafe)
      GET /v1/models, /health, /metrics

The graphs run only in the engine thread; the event loop never waits on them. A request is
refused with 429 (and Retry-After) when more than --max-queue requests wait for a row; a client
that disconnects cancels its request, which frees its row at the next step. On SIGTERM/SIGINT the
server stops listening and admitting (503 on open connections), lets running requests finish for up
to --shutdown-timeout seconds, then ends the rest with an error event, and exits as soon as none is
left. Tensor-parallel bundles are refused.
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
from pathlib import Path

from .errors import UserError
from .openai_api import ApiError, StopStrings, chunk, completion, completion_id, parse_chat, usage

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
        self._inbox = queue.Queue()       # ("add", request, sink) | ("cancel", sink) | ("stop", None)
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

    def submit(self, request, sink) -> None:
        """Queue a request; sink(kind, value) is called from the engine thread: ("text", piece),
        ("done", Result) or ("error", message). Raises ApiError 429/503 when it cannot be taken."""
        self.check_open()
        with self._lock:
            waiting = self._waiting + self._queued - self._rows_free   # < 0: a row is free for this one
            if waiting >= self.max_queue:
                raise ApiError(429, f"{waiting} requests are already waiting for a row (--max-queue {self.max_queue}); "
                               "retry later.", headers={"Retry-After": "1"})
            self._waiting += 1
        self._inbox.put(("add", request, sink))

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
        from .scheduler import Scheduler
        sched = Scheduler(self.engine)
        seqs = {}  # sink -> Sequence
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
                            self._waiting, self._queued = self._waiting - 1, self._queued + 1
                        try:
                            seqs[sink] = sched.add(value, on_text=lambda piece, sink=sink: sink("text", piece),
                                                   on_finish=lambda seq, sink=sink: self._finished(seqs, sink, seq))
                        except UserError as e:
                            sink("error", str(e))
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
                sched.step()
                self._count(sched)
            self.metrics.queue.set(len(sched.queue) + self._waiting)
            self.metrics.rows.set(sched.rows_in_use)

    def _count(self, sched):
        """Publish the scheduler's queue and free rows for `submit`'s admission (--max-queue counts only the
        requests that must wait: with free rows even --max-queue 0 admits)."""
        with self._lock:
            self._queued, self._rows_free = len(sched.queue), len(sched.rows) - sched.rows_in_use

    def _finished(self, seqs, sink, seq):
        seqs.pop(sink, None)
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


def create_app(loop: EngineLoop, model: str, api_key: str | None = None, max_body_bytes: int = 20 << 20,
               allowed_image_dir: Path | None = None):
    """The ASGI app over a started EngineLoop."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="cogvlm2-lite", docs_url=None, redoc_url=None)
    metrics = loop.metrics

    def refuse(e: ApiError):
        if e.status >= 400:
            metrics.requests.labels("rejected" if e.status in (429, 503) else "invalid").inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request, exc):  # a bug: the client gets one sentence, the server goes on
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
        try:
            check_key(request)
            body = await _read_json(request, max_body_bytes)
            loop.check_open()
            engine = loop.engine
            call = await run_in_threadpool(parse_chat, body, model, lambda src: engine.pixels([src])[0],
                                           allowed_image_dir)
            r = call.request
            try:
                engine.prompt(r)
            except UserError as e:  # before the stream starts: a 400, not an error event
                raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
            events = asyncio.Queue()
            aloop = asyncio.get_running_loop()

            def sink(kind, value):
                aloop.call_soon_threadsafe(events.put_nowait, (kind, value))
            loop.submit(r, sink)
        except ApiError as e:
            return refuse(e)
        cid = completion_id()
        if call.stream:
            return StreamingResponse(_stream(request, events, sink, call, cid), media_type="text/event-stream")
        stops = StopStrings(call.stop)
        text = []
        try:
            while True:
                kind, value = await events.get()
                if kind == "text":
                    piece, hit = stops.push(value)
                    text.append(piece)
                    if hit:
                        loop.cancel(sink)
                elif kind == "error":
                    return JSONResponse(ApiError(503 if loop.draining else 400, value).body(),
                                        status_code=503 if loop.draining else 400)
                else:
                    text.append(stops.flush())
                    finish = "stop" if value.finish_reason == "cancel" else value.finish_reason
                    return completion(cid, model, "".join(text), finish, value.prompt_tokens, value.completion_tokens,
                                      value.reused_tokens)
        except asyncio.CancelledError:  # the client went away
            loop.cancel(sink)
            raise

    async def _stream(request, events, sink, call, cid):
        stops = StopStrings(call.stop)
        done = False
        try:
            yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    if stops.hit:
                        continue
                    piece, hit = stops.push(value)
                    if piece or not hit:  # one chunk per token, "" for a token without text: clients see its time
                        yield _sse(chunk(cid, model, {"content": piece}))
                    if hit:
                        loop.cancel(sink)
                elif kind == "error":
                    done = True
                    yield _sse(ApiError(503 if loop.draining else 400, value).body())
                    break
                else:
                    done = True
                    tail = stops.flush()
                    if tail:
                        yield _sse(chunk(cid, model, {"content": tail}))
                    finish = "stop" if value.finish_reason == "cancel" else value.finish_reason
                    yield _sse(chunk(cid, model, {}, finish))
                    if call.include_usage:
                        yield _sse(chunk(cid, model, {}, usage_=usage(value.prompt_tokens, value.completion_tokens,
                                                                      value.reused_tokens)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client disconnected mid-stream: free its row
                loop.cancel(sink)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request, limit: int):
    """The body as JSON: 413 past `limit` bytes (checked while reading, not only from Content-Length)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes, more than the {limit} allowed (--max-body-mb).")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is more than the {limit} bytes allowed (--max-body-mb).")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({getattr(e, 'msg', 'not UTF-8')}).") from None


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
          allowed_image_dir: str | None, shutdown_timeout: float, on_ready=print, **cache_mb):
    """Bind, load the bundle in the engine thread (503 until loaded), serve until SIGTERM/SIGINT.
    cache_mb: the Engine's encoder_cache_mb and prefix_cache_mb. Raises UserError for a bad bundle, folder or
    address, or a bundle that fails to load."""
    import uvicorn

    from .bundle import Bundle
    from .engine import Engine
    b = Bundle(bundle)
    if b.tp > 1:
        raise UserError(f"{bundle} is split over {b.tp} ranks: serve runs tp 1 bundles; export one with --tp 1 "
                        "(or run this one with `cogvlm2-lite run`/`batch`, which launch msrun).")
    image_dir = None
    if allowed_image_dir is not None:
        image_dir = Path(allowed_image_dir).resolve()
        if not image_dir.is_dir():
            raise UserError(f"--allowed-image-dir {allowed_image_dir} is not a folder.")
    sock = listen(host, port)
    port = sock.getsockname()[1]
    metrics = Metrics()
    loop = EngineLoop(lambda: Engine(b, backend=backend, **cache_mb), max_queue, metrics)
    app = create_app(loop, Path(bundle).resolve().name, api_key, int(max_body_mb * (1 << 20)), image_dir)

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
            on_ready(f"serving {Path(bundle).resolve().name} on http://{host}:{port}/v1 (OpenAI chat completions)")
    threading.Thread(target=announce, daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it handled once it has stopped:
        signal.signal(sig, lambda *_: None)      # a graceful stop then exits 0, not as killed
    server.run(sockets=[sock])
    loop.stop()
    if loop.error:
        raise UserError(loop.error)
