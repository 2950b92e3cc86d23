"""How a request and its reply find their reader: a shared-memory doorbell first, ZeroMQ after.

A single-frame message for a reader that is spinning goes into the segment's mailbox and rings
its counter: a Python spin sees it within a microsecond, where a ZeroMQ round trip costs tens.
The reader spins for a while, checking its socket now and then; past the spin it flags that it
sleeps and blocks on ZeroMQ. A message for a sleeping reader goes over ZeroMQ whole, and one
that lands in the mailbox just as the reader falls asleep is followed by a one-frame `nudge`.
Messages with payload frames go over ZeroMQ always; with no spin (a box with few cores) every
message does, as before. Control, errors and liveness never depend on the doorbell.

Flag and counter live in different words, so "store my flag, then load the other's counter" and
"store my counter, then load the other's flag" each need a full memory barrier between the two
(`fence`), or both sides could miss each other.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import msgpack

from ..errors import ConfigError
from .shm import SharedSegment

SPIN_ENV = "SHARDRT_SPIN_US"
DEFAULT_SPIN_US = 20_000  # longer than a stage's decode step, so the next request finds the reader spinning
SPIN_MIN_CPUS = 8  # on fewer cores a spinning waiter takes a core from the compute it waits for
MAX_SPIN_US = 10_000_000
CHECK_SOCKET_EVERY = 64  # spins between non-blocking looks at the socket
COORDINATOR_ID = b"coordinator"  # the coordinator's ZeroMQ routing id, so a daemon can nudge it
NUDGE = msgpack.packb({"op": "nudge", "id": 0})

_fence_lock = threading.Lock()


def spin_seconds() -> float:
    """How long a waiter spins: SHARDRT_SPIN_US, else 20 ms on a box of 8 or more cores, else 0."""
    raw = os.environ.get(SPIN_ENV)
    if raw is None:
        return DEFAULT_SPIN_US / 1e6 if (os.cpu_count() or 1) >= SPIN_MIN_CPUS else 0.0
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_SPIN_US:
        raise ConfigError(f"{SPIN_ENV}: {raw!r} is not a whole number of microseconds in 0..{MAX_SPIN_US}")
    return int(raw) / 1e6


def fence() -> None:
    """A full memory barrier: a lock's atomic read-modify-write (a locked instruction on x86)."""
    _fence_lock.acquire()
    _fence_lock.release()


def deliver(segment: SharedSegment, box: int, reader: str, seq: int, frames: list,
            send: Callable[[list], None]) -> bool:
    """Send `frames` (sequence `seq`) to `reader` ("daemon" or "coordinator"): into mailbox `box`
    when it is one frame that fits and the reader spins, else with `send` over ZeroMQ. True when
    it went through the mailbox."""
    if len(frames) != 1 or segment.waiting(reader) or not segment.post(box, seq, frames[0]):
        send(frames)
        return False
    fence()
    if segment.waiting(reader):  # it fell asleep as we rang
        send([NUDGE])
    return True


def spin(ready: Callable[[], bool], socket, seconds: float) -> bool | None:
    """Spin until ready() (True), a message waits on `socket` (False), or `seconds` pass (None)."""
    deadline = time.perf_counter() + seconds
    while True:
        for _ in range(CHECK_SOCKET_EVERY):
            if ready():
                return True
        if socket.poll(0):
            return False
        if time.perf_counter() > deadline:
            return None


class DaemonDoorbell:
    """The daemon's side: the next request from the mailbox or the socket, and its reply."""

    SLEEP_POLL_MS = 50

    def __init__(self, segment: SharedSegment, socket, spin_s: float):
        self.segment, self.socket, self.spin_s = segment, socket, spin_s
        self.taken = segment.counter("taken")
        if not spin_s:  # never spins: flagged asleep for good, so every request comes over ZeroMQ
            segment.set_waiting("daemon", True)

    def _rung(self) -> bool:
        return self.segment.counter("request") != self.taken

    def _take(self) -> tuple[list, None]:
        self.taken = self.segment.counter("request")
        self.segment.set_counter("taken", self.taken)
        return [self.segment.message(SharedSegment.REQUEST)], None

    def _receive(self) -> tuple[list, bytes]:
        frames = self.socket.recv_multipart(copy=False)
        return [f.buffer for f in frames[1:]], frames[0].bytes

    def next(self) -> tuple[list, bytes | None]:
        """(message frames, ZeroMQ peer id) of the next request; peer None: from the mailbox.
        A frame list may be empty (a malformed ZeroMQ message)."""
        if self._rung():
            return self._take()
        if self.spin_s:
            got = spin(self._rung, self.socket, self.spin_s)
            if got:
                return self._take()
            if got is False:
                return self._receive()
        self.segment.set_waiting("daemon", True)
        fence()  # then look at the counter: a ring from now on comes with a nudge
        try:
            while True:
                if self._rung():
                    return self._take()
                if self.socket.poll(self.SLEEP_POLL_MS):
                    return self._receive()
        finally:
            if self.spin_s:
                self.segment.set_waiting("daemon", False)

    def reply(self, peer: bytes | None, request_id: int, frames: list) -> None:
        """Answer the coordinator through the doorbell when the request came that way (peer
        None), else over ZeroMQ to whoever asked."""
        valid_id = isinstance(request_id, int) and not isinstance(request_id, bool) and 0 <= request_id < 1 << 63
        send = lambda f: self.socket.send_multipart([peer or COORDINATOR_ID, *f], copy=False)  # noqa: E731
        if peer is None and valid_id:
            deliver(self.segment, SharedSegment.REPLY, "coordinator", request_id, frames, send)
        else:
            send(frames)
