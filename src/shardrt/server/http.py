"""The HTTP side: routing, request bodies, JSON and server-sent-event responses, and noticing
clients that go away (a failed write while streaming; EOF on the socket while waiting).

Every failure a client can cause is an OpenAI-shaped error body; no traceback reaches a
client or the terminal.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from .. import __version__
from .engine import Engine, Job
from .metrics import ServerMetrics
from .schema import ApiError, Reply, parse_request, usage

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
IDLE_TIMEOUT_S = 120  # a socket read waits at most this long (the request deadline below comes first)
# a request's line and headers, and then its body, must each arrive within this long, however
# slowly they trickle in (a slowloris client holds a thread otherwise); idle keep-alive included
REQUEST_DEADLINE_S = 60.0
REAP_S = 0.5  # how often the deadlines are looked at
CLOSE_JOIN_S = 10.0  # how long closing the server waits for its connections' threads
WATCH_S = 0.1  # how often a waiting request checks that its client is still there
CLIENT_GONE = 499  # the status recorded for a request whose client went away (as nginx logs it)

ROUTES = {
    "/health": ("GET",),
    "/metrics": ("GET",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
}


class ClientGone(Exception):
    """The client closed its connection before the response was complete."""


class App:
    """What the handlers share: the engine, the metrics and the served model's name."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, model_name: str, created: int):
        self.engine, self.metrics, self.model_name, self.created = engine, metrics, model_name, created

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardrt",
                "shardrt_version": __version__}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S

    def version_string(self) -> str:
        return f"shardrt/{__version__}"

    @property
    def app(self) -> App:
        return self.server.app

    # -- routing ------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def handle_one_request(self) -> None:
        self._cpu_start = time.thread_time()  # this thread's CPU from here to the queue: the step log's http_cpu_ms
        self.server.watch(self.connection)  # until its headers are in
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)

    def _dispatch(self) -> None:
        self.server.unwatch(self.connection)
        self._status, self._recorded, self._peer_talks = None, False, False
        path = urlsplit(self.path).path
        endpoint = _endpoint(path)
        try:
            methods = ROUTES.get(endpoint, ("GET",) if endpoint != "other" else ())
            if endpoint == "other":
                raise ApiError(f"path: {self.command} {path} is not served here; the API is under /v1 "
                               f"({', '.join(ROUTES)})", None, status=404, code="not_found")
            if self.command not in methods:
                raise ApiError(f"method: {self.command} is not allowed on {path}; use {', '.join(methods)}", None,
                               status=405, code="method_not_allowed")
            getattr(self, "_" + endpoint.strip("/").replace("/", "_").replace("{id}", "id"))(path)
        except ApiError as exc:
            self._send_error(exc)
        except ClientGone:
            self._status = CLIENT_GONE
            self.close_connection = True
        except OSError as exc:  # the connection broke under a write
            log.info("%s %s: connection lost (%s)", self.command, path, exc)
            self._status = CLIENT_GONE
            self.close_connection = True
        except Exception as exc:  # a bug: one line in the log, a 500 to the client
            log.error("%s %s: %s: %s", self.command, path, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if self._status is None:
                self._send_error(ApiError("server: internal error", status=500, code="internal_error"))
            self.close_connection = True
        finally:
            self._record(self._status or CLIENT_GONE)

    def _record(self, status: int) -> None:
        """Count the request once: before a whole response is written (so a client that reads
        /metrics next sees it), or when a stream ends."""
        if not self._recorded:
            self._recorded = True
            self.app.metrics.requests.inc(endpoint=_endpoint(urlsplit(self.path).path), status=str(status))

    # -- endpoints ------------------------------------------------------------------------

    def _health(self, path: str) -> None:
        status, body = self.app.engine.health()
        self._send_json(status, body, retry_after=2 if status != 200 else None)

    def _metrics(self, path: str) -> None:
        self._send(200, self.app.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _v1_models(self, path: str) -> None:
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _v1_models_id(self, path: str) -> None:
        name = unquote(path.removeprefix("/v1/models/"))
        if name != self.app.model_name:
            raise ApiError(f"model: {name!r} is not served here; this server serves {self.app.model_name!r}", "model",
                           status=404, code="model_not_found")
        self._send_json(200, self.app.model_card())

    def _v1_completions(self, path: str) -> None:
        self._generate("text")

    def _v1_chat_completions(self, path: str) -> None:
        self._generate("chat")

    def _generate(self, kind: str) -> None:
        request = parse_request(kind, self._json_body(), self.app.model_name)
        engine = self.app.engine
        job = engine.prepare(request)
        job.http_cpu = time.thread_time() - self._cpu_start
        engine.submit(job)
        try:
            if request.stream:
                self._stream(job, Reply(request))
            else:
                self._complete(job, Reply(request))
        except (ClientGone, OSError):
            engine.withdraw(job)
            raise

    def _complete(self, job: Job, reply: Reply) -> None:
        for kind, value in self._events(job, watch_every=WATCH_S):
            if kind == "error":
                raise value
            if kind == "done":
                counts = usage(len(value.prompt_tokens), len(value.tokens))
                body = reply.full(value.text, value.finish_reason, counts)
                if value.pflash is not None:  # the request asked for PFlash: what it kept
                    body["pflash"] = value.pflash
                self._send_json(200, body)

    def _stream(self, job: Job, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        self._status = 200
        if reply.chat:
            self._event(reply.chunk(text="", first=True))
        for kind, value in self._events(job, watch_every=0.25):
            if kind == "text":
                self._event(reply.chunk(text=value))
            elif kind == "error":
                self._status = value.status
                self._event(value.body())
                break
            else:
                last = reply.chunk(finish_reason=value.finish_reason)
                if value.pflash is not None:
                    last["pflash"] = value.pflash
                self._event(last)
                if reply.request.include_usage:
                    self._event(reply.usage_chunk(usage(len(value.prompt_tokens), len(value.tokens))))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _events(self, job: Job, watch_every: float):
        """The job's events until it ends; ClientGone as soon as the client's socket says EOF."""
        last_watch = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=WATCH_S)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if event is None or now - last_watch >= watch_every:
                last_watch = now
                if self._client_gone():
                    raise ClientGone()
                if event is None and not self.app.engine.alive():
                    raise ApiError("server: the engine stopped", status=503, code="shutting_down")
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return

    def _client_gone(self) -> bool:
        """EOF (or a reset) on the client's socket. Bytes that are not EOF (a pipelined request)
        stay unread for the next request, and stop the watching for this one."""
        if self._peer_talks:
            return False
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(0):
                return False
            if self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return True
            self._peer_talks = True
            return False
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # -- bodies and responses -----------------------------------------------------------

    def _json_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError("Transfer-Encoding: chunked request bodies are not supported; send Content-Length", None,
                           status=411, code="length_required")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            raise ApiError("Content-Length: missing; send the JSON body with its length", None, status=411,
                           code="length_required")
        if not raw_length.strip().isdigit():
            self.close_connection = True
            raise ApiError(f"Content-Length: {raw_length!r} is not a byte count", None, code="invalid_body")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # its bytes stay unread
            raise ApiError(f"body: {length} bytes is more than the {MAX_BODY_BYTES} bytes (1 MiB) accepted", None,
                           code="body_too_large")
        self.server.watch(self.connection)  # the body has its own deadline
        try:
            raw = self.rfile.read(length)
        finally:
            self.server.unwatch(self.connection)
        if len(raw) < length:
            raise ClientGone()
        content_type = self.headers.get("Content-Type")
        media = (content_type or "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(f"Content-Type: {content_type!r} is not accepted; send application/json", None,
                           code="invalid_content_type")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ApiError(f"body: not valid JSON ({exc})", None, code="invalid_json") from None

    def _send_error(self, error: ApiError) -> None:
        if self._status is not None:  # a response has begun: nothing more can be said
            self.close_connection = True
            return
        headers = {"Allow": ", ".join(ROUTES.get(urlsplit(self.path).path, ("GET",)))} if error.status == 405 else {}
        self._send_json(error.status if error.status != CLIENT_GONE else 400, error.body(),
                        retry_after=error.retry_after, headers=headers)

    def _send_json(self, status: int, body: dict, retry_after: int | None = None, headers: dict | None = None) -> None:
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        self._send(status, json.dumps(body).encode(), "application/json", extra)

    def _send(self, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
        self._status = status
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    # -- what http.server says on its own ---------------------------------------------------

    def send_error(self, code, message=None, explain=None):
        """Malformed request lines, oversized headers, unknown methods: JSON like the rest."""
        self._status, self._recorded = code, True  # not counted: it never reached an endpoint
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        try:
            self._send_json(code, ApiError(f"request: {text}", None, status=code, code=None).body())
        except OSError:
            pass

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def _endpoint(path: str) -> str:
    """The route a path falls under: the `endpoint` label in /metrics."""
    return path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class Server(ThreadingHTTPServer):
    """One thread per connection; a reaper closes connections that take longer than
    REQUEST_DEADLINE_S to send a request's headers or its body. Closing the server shuts every
    client connection down and waits (bounded) for their threads, so none is still writing a log
    line while the interpreter exits (a daemon thread holding stderr's lock then aborts Python)."""

    daemon_threads = True  # a thread still writing to a stalled client does not hold up shutdown
    request_queue_size = 1024  # a burst of connects waits in the backlog, not refused

    def __init__(self, address: tuple, family: int, app: App, deadline_s: float = REQUEST_DEADLINE_S):
        self.address_family = family
        self.app = app
        self.deadline_s = deadline_s
        self._deadlines: dict[socket.socket, float] = {}
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(address, Handler)
        self._reaper = threading.Thread(target=self._reap, name="shardrt-http-reaper", daemon=True)
        self._reaper.start()

    def watch(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines[conn] = time.monotonic() + self.deadline_s

    def unwatch(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True,
                                  name="shardrt-http-client")
        with self._lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # a thread blocked reading or writing it returns now
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_JOIN_S
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _reap(self) -> None:
        while not self._closed.wait(REAP_S):
            now = time.monotonic()
            with self._lock:  # under the lock: a handler that unwatches meanwhile keeps its connection
                late = [conn for conn, until in self._deadlines.items() if until < now]
                for conn in late:
                    del self._deadlines[conn]
                    try:
                        conn.shutdown(socket.SHUT_RDWR)  # its handler's read returns and the thread ends
                    except OSError:
                        pass
            for _ in late:
                log.info("closed a connection that sent its request too slowly (over %.0fs)", self.deadline_s)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        # a client that resets or stalls its connection is routine; anything else is worth a line
        level = logging.INFO if isinstance(exc, (ConnectionError, TimeoutError)) else logging.WARNING
        log.log(level, "connection from %s: %s: %s", client_address[0], type(exc).__name__, exc)
