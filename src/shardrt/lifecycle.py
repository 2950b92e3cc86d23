"""Daemon processes from the coordinator's side: exec with a pinned environment, the death
pipe, liveness, and shutdown (ask -> close the pipe -> SIGTERM -> SIGKILL).

Nothing is left behind: the runtime directory (0700, holding the `ipc://` sockets and the
daemons' logs) and every shared-memory segment go when the daemons go.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, StageDied
from .ipc.curve import KeyPair, secure_client
from .ipc.link import reported_link
from .ipc.shm import SharedSegment, new_segment_name
from .worker import DaemonSpec

DAEMON_MODULE = "shardrt.daemons.target_shard"
LOG_TAIL_BYTES = 4096


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise ConfigError(f"{name}: {raw!r} is not a positive number of seconds")
    return value


@dataclass(frozen=True)
class Timeouts:
    ready: float = 120.0  # daemon start: exec, torch import, weight loading
    request: float = 600.0  # one request, however long the prefill
    heartbeat: float = 5.0  # a daemon whose heartbeat stalls this long has stopped answering
    stop: float = 3.0  # each step of the shutdown sequence
    spin: float = 0.0  # spin on the shared-memory doorbell this long before sleeping on ZeroMQ

    @classmethod
    def from_env(cls) -> "Timeouts":
        from .ipc.doorbell import spin_seconds

        return cls(
            ready=env_seconds("SHARDRT_READY_TIMEOUT", cls.ready),
            request=env_seconds("SHARDRT_REQUEST_TIMEOUT", cls.request),
            heartbeat=env_seconds("SHARDRT_HEARTBEAT_TIMEOUT", cls.heartbeat),
            stop=cls.stop,
            spin=spin_seconds(),  # daemons read the same variable from the environment they inherit
        )


def exit_reason(status: int | None, log_tail: str) -> str:
    """Why a daemon ended (or `still running`), from its exit status (negative: the signal) and
    the tail of its log, in one line: `exit status 3: <last error line of the log>`, or
    `killed by SIGKILL: ...`."""
    if status is None:
        described = "still running"
    elif status >= 0:
        described = f"exit status {status}"
    else:
        try:
            described = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            described = f"killed by signal {-status}"
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    detail = (errors or lines or [""])[-1]
    return f"{described}: {detail}" if detail else described


def make_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
        base = None
    return Path(tempfile.mkdtemp(prefix="shardrt-", dir=base))  # mkdtemp makes it 0700


class DaemonProcess:
    """One exec'd daemon and the resources the coordinator holds for it.

    transport "ipc" (one box): a shared segment and an ipc:// socket in the runtime directory.
    transport "tcp": the daemon binds TCP with CurveZMQ on `bind_host` and reports its endpoints
    and public key on a ready pipe; `ready()` reads them and `secure()` sets a socket's keys."""

    def __init__(self, *, label: str, backend: str, python: str | None, child_env: dict[str, str],
                 runtime_dir: Path, index: int, shared_bytes: int, model: str | None, identity: dict,
                 shards: tuple, max_ctx: int, dtype: str = "auto", graphs: bool = True, weights: str = "auto",
                 max_seqs: int = 1, threads: int | None = None, transport: str = "ipc", bind_host: str = "127.0.0.1",
                 max_prefill: int = 1024):
        self.label, self.max_seqs, self.transport = label, max_seqs, transport
        self.child_env = dict(child_env)
        self.log_path = runtime_dir / f"d{index}.log"
        child_fds = []
        if transport == "tcp":
            self.endpoint, self.segment, self._client = None, None, KeyPair.generate()
            self._ready_fd, ready_write = os.pipe()
            child_fds.append(ready_write)
            link = dict(transport="tcp", bind_host=bind_host, client_key=self._client.public.decode(),
                        ready_fd=ready_write, endpoint="", shm_name="")
        else:
            self.endpoint = f"ipc://{runtime_dir / f'd{index}.sock'}"
            self.segment = SharedSegment(new_segment_name(f"d{index}"), shared_bytes)
            link = dict(endpoint=self.endpoint, shm_name=self.segment.name)
        read_fd, self._death_fd = os.pipe()  # after the segment: a failure above leaves no pipe open
        child_fds.append(read_fd)
        spec = DaemonSpec(label=label, backend=backend, model=model, identity=identity, shards=shards, max_ctx=max_ctx,
                          death_fd=read_fd, dtype=dtype, graphs=graphs, weights=weights, max_seqs=max_seqs,
                          max_prefill=max_prefill, threads=threads, **link)
        python = self.python = python or sys.executable
        try:
            with open(self.log_path, "wb") as log:
                # exec, never a bare fork: the coordinator may hold a GPU context
                self.process = subprocess.Popen(
                    [python, "-m", DAEMON_MODULE, spec.to_json()],
                    env={**os.environ, **self.child_env}, pass_fds=child_fds, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True,  # Ctrl-C reaches the coordinator only
                )
        except OSError as exc:
            self._release()
            os.close(self._death_fd)
            raise ConfigError(f"backends.{backend}.python: cannot run {python!r}: {exc.strerror}") from None
        finally:
            for fd in child_fds:
                os.close(fd)

    def ready(self, timeout: float) -> None:
        """For a tcp daemon: wait for where it listens (it binds before loading anything)."""
        if self.segment is not None:
            return
        line = b""
        deadline = time.monotonic() + timeout
        readable = select.poll()  # not select(): a busy server's descriptors pass 1024
        readable.register(self._ready_fd, select.POLLIN)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageDied(f"{self.label}: did not report its TCP endpoint within {timeout:g}s (pid {self.pid})")
            if readable.poll(min(left, 0.1) * 1000):
                chunk = os.read(self._ready_fd, 4096)
                if not chunk:  # it exited: reap it, so the reason has its status
                    try:
                        self.process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    raise StageDied(f"{self.label}: daemon exited ({self.exit_reason()})")
                line += chunk
        try:
            report = json.loads(line)
        except ValueError:
            raise StageDied(f"{self.label}: malformed ready report {line[:200]!r}") from None
        self.endpoint, self._keys, self.segment = reported_link(report, self._client, self.label)

    def secure(self, socket) -> None:
        """Give a socket that talks to this daemon the keys its transport needs (tcp: CurveZMQ)."""
        if self.transport == "tcp":
            secure_client(socket, self._keys)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_reason(self) -> str:
        """Why it exited, in one line: its last error line, else its exit status."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - LOG_TAIL_BYTES))
                tail = f.read().decode(errors="replace")
        except OSError:
            tail = ""
        return exit_reason(self.process.poll(), tail)

    def stop(self, timeouts: Timeouts) -> None:
        """Close the death pipe, then SIGTERM, then SIGKILL; always release the segment."""
        try:
            if self._death_fd >= 0:
                os.close(self._death_fd)
                self._death_fd = -1
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.alive():
                    self.process.send_signal(sig)
                try:
                    self.process.wait(timeout=timeouts.stop)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            self._release()

    def _release(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
        if self.transport == "tcp" and self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1


def remove_runtime_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
