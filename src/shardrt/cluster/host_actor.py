"""One daemon on a Ray node: the `DaemonHost` actor that execs it and holds its death pipe, and the
coordinator's helpers that pin that actor to a node and start the daemon through it.

The actor is stdlib only and is pickled by value, so the Ray worker on the node needs neither
shardrt nor torch; only the daemon's own interpreter does.

How the child learns its pipes (both numbers are in its environment, never in argv):
- `SHARDRT_READY_FD`: the write end of the ready pipe. The child writes one JSON line there
  once it serves (e.g. its endpoint and public key), then closes it.
- `SHARDRT_DEATH_FD`: the read end of the death pipe. The actor holds the write end; EOF means
  the actor is gone or `stop()` began, and the child should exit.

Nothing is written on the node's disk: the child's stdout and stderr go through a pipe into a
ring buffer of the last 4 KiB (and are echoed to the actor's stderr, which Ray keeps in its
worker-*.err log). This matters because Ray SIGKILLs an actor's children when the actor dies,
so no handler of the child's would get to clean up.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from ..errors import StageDied

READY_FD_ENV = "SHARDRT_READY_FD"
DEATH_FD_ENV = "SHARDRT_DEATH_FD"
LOG_TAIL_BYTES = 4096
MAX_READY_LINE_BYTES = 1 << 16
FAILED_START_STOP_SECONDS = 2.0  # each shutdown step for a child that never became ready
ACTOR_START_SECONDS = 60.0  # placing the actor and starting its Ray worker, beyond the daemon's own ready time

# Ray sets these in every actor (OMP_NUM_THREADS=1 would run CPU stages on one thread) and a
# daemon must not inherit them: the coordinator sends the threads and pinning it wants in env_add.
RAY_INJECTED_NAMES = ("OMP_NUM_THREADS", "PYTHONBREAKPOINT", "SPT_NOENV",
                      # GPU visibility as Ray set it for an actor that asked for no GPU: the daemon gets
                      # the pinning the coordinator planned (env_add), never Ray's
                      "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
RAY_INJECTED_PREFIXES = ("RAY_",)


def child_env(base: dict[str, str], env_add: dict[str, str], drop_prefixes=()) -> dict[str, str]:
    """`base` less what Ray injects and less names starting with `drop_prefixes`, plus `env_add`."""
    drop = RAY_INJECTED_PREFIXES + tuple(drop_prefixes)
    env = {k: v for k, v in base.items() if k not in RAY_INJECTED_NAMES and not k.startswith(drop)}
    env.update(env_add)
    return env


def _read_ready_line(fd: int, timeout: float) -> tuple[bytes, str | None]:
    """(the line, None), or (b"", why there is none): EOF, too long, or no newline within `timeout`."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        if len(data) > MAX_READY_LINE_BYTES:
            return b"", f"its ready line is longer than {MAX_READY_LINE_BYTES} bytes"
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b"", f"not ready within {timeout:g}s"
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"", "exited before it was ready"
        data += chunk
    return data.split(b"\n", 1)[0], None


class DaemonHost:
    """Runs one child process on this node and owns it: its pipes, its log tail, its shutdown.

    Made by `start_host_actor` with max_concurrency=4, so `wait()` may block while `stop()` and
    `log_tail()` answer."""

    def __init__(self):
        self._child: subprocess.Popen | None = None
        self._death_write = -1
        self._lock = threading.Lock()
        self._tail = bytearray()
        self._log_reader: threading.Thread | None = None

    def start(self, argv: list[str], env_add: dict[str, str], env_drop_prefixes=(),
              ready_timeout: float = 120.0) -> dict:
        """Exec `argv` and wait for its ready line. Returns {ready, pid, host, ip, node_id}; when the
        child exits, says nothing within `ready_timeout` or writes no JSON, it is stopped and the
        answer is {error, status, log_tail, pid, host, ip, node_id} instead."""
        import ray  # present in every Ray worker; only for where this node is

        if self._child is not None:
            raise RuntimeError(f"start: this DaemonHost already runs pid {self._child.pid}")
        where = {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                 "node_id": ray.get_runtime_context().get_node_id()}
        death_read, death_write = os.pipe()
        ready_read, ready_write = os.pipe()
        env = child_env(dict(os.environ), env_add, env_drop_prefixes)
        env[DEATH_FD_ENV], env[READY_FD_ENV] = str(death_read), str(ready_write)
        try:
            self._child = subprocess.Popen(
                list(argv), env=env, pass_fds=(death_read, ready_write), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0, start_new_session=True)
        except OSError as exc:
            for fd in (death_write, ready_read):
                os.close(fd)
            return {**where, "error": f"cannot run {argv[0]!r}: {exc.strerror}", "status": None,
                    "log_tail": "", "pid": None}
        finally:
            os.close(death_read)
            os.close(ready_write)
        self._death_write = death_write
        self._log_reader = threading.Thread(target=self._keep_log, args=(self._child.stdout,), daemon=True)
        self._log_reader.start()
        try:
            line, problem = _read_ready_line(ready_read, ready_timeout)
        finally:
            os.close(ready_read)
        if problem is None:
            try:
                return {**where, "ready": json.loads(line), "pid": self._child.pid}
            except ValueError:
                problem = f"its ready line is not JSON: {line[:120]!r}"
        status = self._child_status_after(problem)
        self._log_reader.join(timeout=FAILED_START_STOP_SECONDS)  # the last words are often the reason
        return {**where, "error": problem, "status": status, "log_tail": self.log_tail(), "pid": self._child.pid}

    def _child_status_after(self, problem: str) -> int | None:
        """Its exit status, stopping it unless it is already on its way out (EOF on the ready pipe)."""
        if problem == "exited before it was ready":
            try:
                return self._child.wait(timeout=FAILED_START_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                pass  # it closed the pipe but lives on
        return self.stop(FAILED_START_STOP_SECONDS)

    def _keep_log(self, stream) -> None:
        while chunk := stream.read(LOG_TAIL_BYTES):
            try:
                os.write(sys.stderr.fileno(), chunk)  # Ray's worker-*.err on the node
            except (OSError, ValueError):
                pass
            with self._lock:
                self._tail += chunk
                del self._tail[:-LOG_TAIL_BYTES]
        stream.close()

    def wait(self) -> int:
        """Block until the child exits; its status (negative: killed by that signal)."""
        if self._child is None:
            raise RuntimeError("wait: this DaemonHost has not started a child")
        return self._child.wait()

    def log_tail(self) -> str:
        """The last 4 KiB the child wrote to stdout and stderr."""
        with self._lock:
            return self._tail.decode(errors="replace")

    def stop(self, timeout: float) -> int | None:
        """Close the death pipe, then SIGTERM, then SIGKILL, waiting `timeout` after each step.
        The child's status, or None if none was started or it outlived SIGKILL."""
        if self._child is None:
            return None
        with self._lock:
            death_write, self._death_write = self._death_write, -1
        if death_write >= 0:
            os.close(death_write)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self._child.send_signal(sig)  # a no-op once the child has been reaped
            try:
                return self._child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return self._child.poll()


# --- coordinator side -------------------------------------------------------------------------

_remote_class = []  # the ray.remote wrapper of DaemonHost, made once per process


def actor_name(launch_id: str, index: int) -> str:
    """`shardrt-<launch>-d<index>`: lets operators and tests find the actor of daemon `index`."""
    return f"shardrt-{launch_id}-d{index}"


def start_host_actor(node_id: str, name: str):
    """A DaemonHost actor pinned to the Ray node `node_id` (see ray_cluster.resolve_host), named
    `name` in the shardrt namespace. It takes no CPU or GPU from Ray's accounting: shardrt pins
    devices itself. Non-detached, so it shares fate with this driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not _remote_class:
        # by value: the Ray worker on the node rebuilds the class without importing shardrt
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        _remote_class.append(ray.remote(DaemonHost))
    return _remote_class[0].options(
        name=name, num_cpus=0, num_gpus=0, max_concurrency=4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote()


def start_child(actor, argv: list[str], env_add: dict[str, str], *, label: str, ready_timeout: float,
                env_drop_prefixes=(), actor_timeout: float = ACTOR_START_SECONDS) -> dict:
    """`actor.start(...)`, waited for; the ready answer, or StageDied in one line naming `label`,
    the host, and the child's exit status and last log line. After StageDied the caller kills the
    actor (`ray.kill`), which also takes down a child that is still starting."""
    ref = actor.start.remote(list(argv), dict(env_add), tuple(env_drop_prefixes), ready_timeout)
    return wait_started(ref, label=label, timeout=ready_timeout + actor_timeout)


def wait_started(ref, *, label: str, timeout: float) -> dict:
    """The answer of a `DaemonHost.start` call `ref`: its ready answer, or StageDied in one line."""
    import ray

    from ..lifecycle import exit_reason

    try:
        answer = ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise StageDied(f"{label}: its Ray actor did not answer within {timeout:g}s") from None
    except ray.exceptions.RayActorError as exc:
        raise StageDied(f"{label}: its Ray actor died before the daemon was ready ({type(exc).__name__})") from None
    if "error" in answer:
        raise StageDied(f"{label} on host {answer['host']}: {answer['error']} "
                        f"({exit_reason(answer['status'], answer['log_tail'])})")
    return answer
