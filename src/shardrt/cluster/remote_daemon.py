"""`RayDaemon`: a target-shard daemon on another host, from the coordinator's side.

A `DaemonHost` actor pinned to the host's Ray node execs the same daemon as on one box, with the
same pinned environment and that host's interpreter; the daemon talks to the coordinator over
TCP with CurveZMQ (`ipc.link`, `ipc.curve`). This class has the interface of
`lifecycle.DaemonProcess` that `RemoteStage` and the server's restart logic use: `ready`,
`secure`, `alive`, `exit_reason`, `stop`, `endpoint`, `segment`, `pid`, `label`.
"""

from __future__ import annotations

import logging
import sys

from ..errors import StageDied
from ..ipc.curve import KeyPair, secure_client
from ..ipc.link import reported_link
from ..lifecycle import DAEMON_MODULE, exit_reason
from ..worker import DaemonSpec
from .host_actor import start_host_actor, wait_started
from .ray_cluster import node_address

log = logging.getLogger(__name__)


class RayDaemon:
    transport = "tcp"

    def __init__(self, *, label: str, backend: str, python: str | None, child_env: dict[str, str], host: str,
                 node_id: str, name: str, model: str, identity: dict, shards: tuple, max_ctx: int,
                 dtype: str = "auto", graphs: bool = True, weights: str = "auto", max_seqs: int = 1):
        import ray

        self.label, self.host, self.max_seqs = label, host, max_seqs
        self.python = python or sys.executable  # a cluster's nodes usually share the install path
        self.child_env = dict(child_env)
        self.endpoint, self.segment, self.pid = None, None, -1
        self._client, self._gone, self._wait_ref = KeyPair.generate(), False, None
        spec = DaemonSpec(label=label, backend=backend, endpoint="", shm_name="", model=model, identity=identity,
                          shards=shards, max_ctx=max_ctx, death_fd=-1, dtype=dtype, graphs=graphs, weights=weights,
                          max_seqs=max_seqs, transport="tcp", bind_host=node_address(node_id),
                          client_key=self._client.public.decode(), ready_fd=-1, host=host)
        self._ray = ray
        self.actor = start_host_actor(node_id, name)
        self._started = self.actor.start.remote([self.python, "-m", DAEMON_MODULE, spec.to_json()],
                                                self.child_env, (), 3600.0)

    def ready(self, timeout: float) -> None:
        """Wait for the daemon to report where it listens (it binds before loading anything)."""
        if self.segment is not None:
            return
        try:
            answer = wait_started(self._started, label=f"{self.label} on host {self.host}", timeout=timeout)
        except StageDied:
            self._gone = True  # stop() then goes straight to killing the actor, and its child with it
            raise
        self.endpoint, self._keys, self.segment = reported_link(answer["ready"], self._client,
                                                                f"{self.label} on host {self.host}")
        self.pid = answer["pid"]
        self._wait_ref = self.actor.wait.remote()
        self._wait_ref.future().add_done_callback(lambda _: setattr(self, "_gone", True))

    def secure(self, socket) -> None:
        secure_client(socket, self._keys)

    def alive(self) -> bool:
        return not self._gone  # set by the actor's wait() returning, or failing as the actor dies

    def exit_reason(self) -> str:
        ray = self._ray
        if self._wait_ref is None:
            return "it never reported ready"
        try:
            status = ray.get(self._wait_ref, timeout=5)
        except ray.exceptions.RayActorError as exc:
            return f"its Ray actor on host {self.host} died ({type(exc).__name__})"
        except ray.exceptions.GetTimeoutError:
            return "still running"
        try:
            tail = ray.get(self.actor.log_tail.remote(), timeout=5)
        except ray.exceptions.RayError:
            tail = ""
        return exit_reason(status, tail)

    def stop(self, timeouts) -> None:
        """The actor stops the daemon (death pipe, SIGTERM, SIGKILL), then the actor goes."""
        ray = self._ray
        try:
            if self.segment is not None:
                self.segment.close()
            if not self._gone:
                ray.get(self.actor.stop.remote(timeouts.stop), timeout=3 * timeouts.stop + 5)
        except Exception:  # Ray errors, or a lost connection to the cluster: the kill below still runs
            pass
        finally:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception as exc:  # the cluster is unreachable: Ray ends the actor with this driver
                log.warning("%s: could not kill its Ray actor on host %s: %s", self.label, self.host, exc)
