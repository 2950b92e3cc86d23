"""`shardrt serve` from start to stop: check and bind the address, load the stages while
`/health` answers 503, print the URL, serve until SIGTERM or Ctrl-C, then stop accepting,
cancel what runs and close the Cluster, leaving no process, socket or segment behind.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import LaunchConfig
from ..errors import ConfigError
from ..memory import PREFILL_CHUNK as MAX_STEP_ROWS
from .batch import MAX_BATCH_TOKENS
from ..lifecycle import env_seconds
from .engine import Engine
from .http import REQUEST_DEADLINE_S, App, Server
from .metrics import ServerMetrics
from .step_log import StepLog

log = logging.getLogger(__name__)

MIN_QUEUE, QUEUE_PER_SLOT = 16, 4  # the default queue bound: 4 requests per sequence slot, at least 16
DEADLINE_ENV = "SHARDRT_REQUEST_DEADLINE"  # seconds a client has to send a request's headers, then its body

EXIT_INTERRUPTED = 130
MAIN_WAKE_S = 0.5  # the main thread wakes this often to see that the engine still runs


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int | None = None  # None: QUEUE_PER_SLOT x the sequence slots, at least MIN_QUEUE
    allow_remote: bool = False
    model_name: str | None = None  # the `model` clients name; default: the GGUF file's stem
    max_batch_tokens: int = MAX_BATCH_TOKENS
    step_log: str | None = None  # --step-log: a JSON line per batched step and per request (step_log.py)

    def __post_init__(self):
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"--port: {self.port!r} is not a TCP port in 1..65535")
        if self.max_queue is not None and (isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int)
                                           or self.max_queue < 1):
            raise ConfigError(f"--max-queue: {self.max_queue!r} is not a whole number >= 1")
        if isinstance(self.max_batch_tokens, bool) or not isinstance(self.max_batch_tokens, int) \
                or not 1 <= self.max_batch_tokens <= MAX_STEP_ROWS:
            raise ConfigError(f"--max-batch-tokens: {self.max_batch_tokens!r} is not a whole number in "
                              f"1..{MAX_STEP_ROWS} (the prefill chunk the memory plan holds room for)")
        if not self.host or not self.host.strip():
            raise ConfigError(f"--host: {self.host!r} is not an address")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError(f"--served-model-name: {self.model_name!r} is empty")

    def queue_for(self, slots: int) -> int:
        """The queue bound for a server of `slots` sequence slots."""
        return self.max_queue if self.max_queue is not None else max(MIN_QUEUE, QUEUE_PER_SLOT * slots)


@dataclass(frozen=True)
class Address:
    family: int
    sockaddr: tuple
    loopback: bool

    def url(self, host: str, port: int) -> str:
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def check_address(options: ServeOptions) -> Address:
    """Where to bind; a non-loopback address needs --allow-remote (the API has no authentication)."""
    try:
        infos = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {options.host!r}: {exc.strerror}") from None
    loopback = all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    if not loopback and not options.allow_remote:
        raise ConfigError(f"--host: {options.host!r} is not a loopback address; the API has no authentication, so "
                          "serving beyond this machine needs --allow-remote")
    family, _, _, _, sockaddr = infos[0]
    return Address(family, sockaddr[:2] if family == socket.AF_INET else sockaddr, loopback)


def _log_thread_error(args) -> None:
    """A thread that dies of a bug says so in one line, not a traceback on the terminal."""
    if args.exc_type is not SystemExit:
        log.error("thread %s: %s: %s", args.thread.name if args.thread else "?", args.exc_type.__name__, args.exc_value,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if log.isEnabledFor(logging.DEBUG) else None)


def serve(config: LaunchConfig, model_path: Path, options: ServeOptions) -> int:
    """Run the server until a signal; the exit code (0 after SIGTERM, 130 after Ctrl-C)."""
    address = check_address(options)
    deadline = env_seconds(DEADLINE_ENV, REQUEST_DEADLINE_S)
    url = address.url(options.host, options.port)
    metrics = ServerMetrics()
    step_log = StepLog(options.step_log) if options.step_log else None
    engine = Engine(config, model_path, metrics, options.queue_for(config.seqs), max_batch_tokens=options.max_batch_tokens,
                    step_log=step_log)
    name = options.model_name or Path(model_path).name.removesuffix(".gguf")
    app = App(engine, metrics, name, created=int(Path(model_path).stat().st_mtime))
    try:
        server = Server(address.sockaddr, address.family, app, deadline_s=deadline)
    except OSError as exc:
        if step_log is not None:
            step_log.close()
        raise ConfigError(f"--port: cannot listen on {options.host}:{options.port}: {exc.strerror}") from None
    if not address.loopback:
        print(f"shardrt: warning: serving on {url}, reachable from other machines; the API has no authentication",
              file=sys.stderr, flush=True)

    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.excepthook = _log_thread_error
    http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                   name="shardrt-http", daemon=True)
    code = 0
    try:
        http_thread.start()  # /health says 503 "starting" while the stages load
        engine.start()
        print(f"shardrt: serving {name} at {url}/v1", file=sys.stderr, flush=True)
        idle = threading.Event()
        while not idle.wait(MAIN_WAKE_S):
            if not engine.alive():
                log.error("the engine thread stopped; shutting down")
                code = 1
                break
    except KeyboardInterrupt:
        code = 0 if terminated else EXIT_INTERRUPTED
    finally:
        # a second signal must not cut the cleanup short; every step below is bounded
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if http_thread.is_alive():
            server.shutdown()  # stop accepting
        engine.stop()  # refuse what waits, cancel what runs, close the Cluster
        server.server_close()
        if step_log is not None:
            step_log.close()
    print("shardrt: stopped", file=sys.stderr, flush=True)
    return code
