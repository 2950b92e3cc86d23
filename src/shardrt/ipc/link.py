"""The link to a daemon on another host: what the shared-memory segment does on one box, over TCP.

A daemon on another host shares no memory with the coordinator, so `TcpLink` stands where the
`SharedSegment` stands in the request loops of both sides, with the same methods: nothing fits
in it (every tensor goes as a payload frame over the CurveZMQ socket), no reader ever spins on a
mailbox (every message goes over the socket), and a shared-memory reference read through it is
refused. The heartbeat, a counter in the segment on one box, becomes a counter the daemon
publishes every beat on a second Curve socket; the coordinator keeps the latest one.
"""

from __future__ import annotations

import struct

import torch
import zmq

from ..errors import IpcError, ShardrtError, StageDied
from .curve import ClientKeys, CurveServer, KeyPair, public_key, secure_client

BEAT = struct.Struct("<Q")


class TcpLink:
    """A SharedSegment's interface with no shared memory. Build it with `daemon_side` or
    `coordinator_side`."""

    IN, OUT = 0, 1
    REQUEST, REPLY = 0, 1
    name = ""  # no segment in /dev/shm

    def __init__(self, beat_socket: zmq.Socket, context: zmq.Context | None = None):
        self._beat_socket, self._context = beat_socket, context
        self._beats, self._last_beat = 0, 0

    @classmethod
    def daemon_side(cls, context: zmq.Context, curve: CurveServer, bind_host: str) -> tuple["TcpLink", str]:
        """The daemon's link (its heartbeat publisher, bound next to its request socket) and the
        heartbeat endpoint the coordinator subscribes to."""
        publisher = curve.secure(context.socket(zmq.PUB))
        publisher.setsockopt(zmq.LINGER, 0)
        publisher.bind(f"tcp://{bind_host}:0")
        return cls(publisher), publisher.getsockopt_string(zmq.LAST_ENDPOINT)

    @classmethod
    def coordinator_side(cls, beat_endpoint: str, keys: ClientKeys) -> "TcpLink":
        """The coordinator's link: a subscriber to the daemon's heartbeat (its own context)."""
        context = zmq.Context()
        subscriber = context.socket(zmq.SUB)
        try:
            secure_client(subscriber, keys)
            subscriber.setsockopt(zmq.LINGER, 0)
            subscriber.setsockopt(zmq.CONFLATE, 1)  # only the latest beat matters
            subscriber.setsockopt(zmq.SUBSCRIBE, b"")
            subscriber.connect(beat_endpoint)
        except zmq.ZMQError:
            subscriber.close(linger=0)
            context.term()
            raise
        return cls(subscriber, context)

    # -- the heartbeat ----------------------------------------------------------------------------

    def beat(self) -> None:
        """The daemon's heartbeat thread, every beat (the only user of the publisher)."""
        self._beats += 1
        self._beat_socket.send(BEAT.pack(self._beats))

    def heartbeat(self) -> int:
        """The latest beat the coordinator has heard of (0 before the first)."""
        while self._beat_socket.poll(0):
            data = self._beat_socket.recv()
            if len(data) == BEAT.size:
                self._last_beat = BEAT.unpack(data)[0]
        return self._last_beat

    # -- what a shared segment would hold: nothing, so every message and tensor takes the socket --

    def fits(self, *tensors: torch.Tensor) -> bool:
        return False

    def waiting(self, side: str) -> bool:
        return True  # every reader sleeps on its socket: `deliver` always sends

    def set_waiting(self, side: str, flag: bool) -> None:
        pass

    def post(self, box: int, seq: int, message: bytes) -> bool:
        return False

    def counter(self, name: str) -> int:
        return 0  # no mailbox is ever rung

    def set_counter(self, name: str, value: int) -> None:
        pass

    def read(self, slot: int, seq: int, offset: int = 0, copy: bool = True) -> torch.Tensor:
        raise IpcError("a shared-memory reference came over a TCP link, where there is no shared memory")

    def write(self, slot: int, seq: int, tensor: torch.Tensor, offset: int = 0) -> int:
        raise IpcError("a TCP link has no shared memory to write to")

    def message(self, box: int) -> bytes:
        raise IpcError("a TCP link has no mailbox")

    def pin(self) -> bool:
        return False

    def close(self) -> None:
        self._beat_socket.close(linger=0)
        if self._context is not None:
            self._context.term()
            self._context = None

    def unlink(self) -> None:
        pass


def reported_link(report: object, client: KeyPair, label: str) -> tuple[str, ClientKeys, TcpLink]:
    """What a tcp daemon's ready report (`{"endpoint", "beat_endpoint", "server_key"}`) gives the
    coordinator, checked: the request endpoint, the keys to reach it, and the heartbeat link.
    A malformed report, or a heartbeat that cannot be reached, is a StageDied naming `label`."""
    try:
        endpoints = [report["endpoint"], report["beat_endpoint"]]
        if not all(isinstance(e, str) and e.startswith("tcp://") for e in endpoints):
            raise ValueError(f"endpoints {endpoints!r} are not tcp://")
        keys = ClientKeys(client, public_key(report["server_key"], "ready.server_key"))
    except (ValueError, KeyError, TypeError, ShardrtError) as exc:
        raise StageDied(f"{label}: malformed ready report ({exc})") from None
    try:
        return endpoints[0], keys, TcpLink.coordinator_side(endpoints[1], keys)
    except zmq.ZMQError as exc:
        raise StageDied(f"{label}: cannot reach its heartbeat at {endpoints[1]} ({exc})") from None
