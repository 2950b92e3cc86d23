"""`RemoteStage`: the coordinator's handle on stages that live in a daemon.

It has the methods of `Stage` and forwards each to the daemon: the message through the shared-memory
doorbell (ZeroMQ when it does not fit, or as the fallback while a side sleeps), activations
through the daemon's shared memory (or as zero-copy frames when they do not fit). Every wait is
bounded: a daemon that exits fails the request at once, one whose heartbeat stalls fails it
within the heartbeat timeout, and each names the stage.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import zmq

from . import __version__
from .errors import ConfigError, IpcError, StageDied
from .gguf_loader import LayerSpan
from .ipc.codec import decode, encode, ref_tensor, tensor_ref
from .ipc.doorbell import COORDINATOR_ID, deliver, fence, spin
from .ipc.protocol import PROTOCOL_VERSION
from .ipc.shm import SharedSegment
from .lifecycle import DaemonProcess, Timeouts
from .stage import Captured

POLL_MS = 20
RECENT = 4096  # forward timings kept for percentiles (the daemon keeps as many)


class RemoteStage:
    def __init__(self, daemon: DaemonProcess, context: zmq.Context, timeouts: Timeouts, identity: dict,
                 span: LayerSpan | None, cfg=None, max_ctx: int = 0, description: str = "", max_seqs: int = 1):
        if daemon.transport == "tcp":  # the ZeroMQ I/O thread does the crypto: a spinning waiter would slow it
            timeouts = replace(timeouts, spin=0.0)
        self.daemon, self.timeouts, self.identity = daemon, timeouts, identity
        self.span, self.cfg, self.max_ctx, self.max_seqs = span, cfg, max_ctx, max_seqs
        self.description = description or daemon.label
        self.lengths = [0] * max_seqs  # as this side has asked for them
        # forwards as this side sees them: from sending the request (its input written) to the reply
        self.forwards, self.forward_seconds = 0, 0.0
        self.recent_forwards = collections.deque(maxlen=RECENT)  # seconds, the latest last
        self._ids = itertools.count(1)
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, COORDINATOR_ID)
        try:
            daemon.ready(timeouts.ready)
            daemon.secure(self.socket)
        except BaseException:
            self.close()
            raise
        self.socket.connect(daemon.endpoint)
        if not self.timeouts.spin:  # never spins: flagged asleep for good (see _wait)
            daemon.segment.set_waiting("coordinator", True)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            daemon.segment.pin()  # this process drives a GPU: activations go device <-> segment by DMA
        try:
            self.hello = self._handshake()
        except BaseException:
            self.close()
            raise

    # -- the Stage interface ----------------------------------------------------------

    def run(self, x: torch.Tensor, base_pos: int, *, all_logits: bool = False, capture: tuple[int, ...] = (),
            stop_after: int | None = None, seq: int = 0) -> tuple[torch.Tensor, list[Captured]]:
        want = "logits" if self.has_head and stop_after is None else "activation"
        reply, frames = self._start_forward(x, base_pos, want, all_logits, capture, stop_after, seq)()
        return self._tensor(reply.get("output"), reply, frames, "forward.output"), self._captures(reply, frames)

    def forward(self, x: torch.Tensor, base_pos: int, all_logits: bool = False) -> torch.Tensor:
        return self.run(x, base_pos, all_logits=all_logits)[0]

    def run_argmax(self, x: torch.Tensor, base_pos: int, *, all_logits: bool = False,
                   capture: tuple[int, ...] = (), seq: int = 0) -> tuple[list[int], list[Captured]]:
        """Greedy tokens from the head (the last, or every position) instead of the logits."""
        reply, frames = self._start_forward(x, base_pos, "argmax", all_logits, capture, None, seq)()
        return self._tokens(reply), self._captures(reply, frames)

    def run_batch(self, x: torch.Tensor, seqs: list[int], positions: list[int], *,
                  tokens: bool = False, outputs: list[int] | None = None) -> torch.Tensor | list[int]:
        return self.start_batch(x, seqs, positions, tokens=tokens, outputs=outputs)()

    # -- started now, finished later: the daemon computes while this process does other work --

    def start_batch(self, x: torch.Tensor, seqs: list[int], positions: list[int], *,
                    tokens: bool = False, outputs: list[int] | None = None) -> Callable[[], torch.Tensor | list[int]]:
        """Send a `run_batch`; the returned function waits for its result. One request at a time:
        finish it before anything else is asked of this stage."""
        message = {"op": "forward_batch", "seqs": list(seqs), "positions": list(positions), "want": self._want(tokens)}
        if outputs is not None:
            message["outputs"] = list(outputs)
        sent = self._submit_tensor(message, x)
        rows = len(seqs) if outputs is None else len(outputs)

        def finish():
            reply, frames = self.collect(sent)
            for seq, pos in zip(seqs, positions):
                self.lengths[seq] = pos + 1
            if not tokens:
                return self._tensor(reply.get("output"), reply, frames, "forward_batch.output")
            found = self._tokens(reply)
            if len(found) != rows:
                raise IpcError(f"{self.description}: forward_batch replied {len(found)} tokens for {rows} rows")
            return found
        return finish

    def _want(self, tokens: bool) -> str:
        return "argmax" if tokens else "logits" if self.has_head else "activation"

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        reply, frames = self._send_tensor({"op": "project", "want": "logits"}, hidden)
        return self._tensor(reply.get("output"), reply, frames, "project.output")

    def project_argmax(self, hidden: torch.Tensor) -> list[int]:
        return self._tokens(self._send_tensor({"op": "project", "want": "argmax"}, hidden)[0])

    def score_prompt(self, ids: torch.Tensor, *, window: int, skip: int, chunk: int, layers: list[int]) -> torch.Tensor:
        """PFlash: prefill token ids [n] in the daemon (in sequence 0) and score each token by the
        attention the last `window` queries pay it (attention_scores.py): float32 [n]."""
        message = {"op": "score_prompt", "window": window, "skip": skip, "chunk": chunk, "layers": list(layers)}
        reply, frames = self._send_tensor(message, ids.to(torch.long))
        scores = self._tensor(reply.get("output"), reply, frames, "score_prompt.output")
        if scores.dtype != torch.float32 or tuple(scores.shape) != (ids.shape[0],):
            raise IpcError(f"{self.description}: score_prompt replied {scores.dtype} {list(scores.shape)} for "
                           f"{ids.shape[0]} tokens")
        self.lengths[0] = 0  # the daemon's drafter exited early: keys and values only up to its top scored layer
        return scores

    @property
    def length(self) -> int:
        return self.lengths[0]

    def kv_copy(self, src: int, seq: int, n: int) -> int:
        self.lengths[seq] = self.request(_in_seq({"op": "kv_copy", "src_seq": src, "n": n}, seq))[0]["length"]
        return self.lengths[seq]

    def kv_snapshot(self, slot: int, seq: int = 0) -> int:
        return self.request(_in_seq({"op": "kv_snapshot", "slot": slot}, seq))[0]["length"]

    def kv_restore(self, slot: int, seq: int = 0) -> int:
        self.lengths[seq] = self.request(_in_seq({"op": "kv_restore", "slot": slot}, seq))[0]["length"]
        return self.lengths[seq]

    def kv_free(self, slot: int) -> None:
        self.request({"op": "kv_free", "slot": slot})

    def truncate(self, n: int, seq: int = 0) -> None:
        self.request(_in_seq({"op": "kv_truncate", "n": n}, seq))
        self.lengths[seq] = n

    def reset(self, seq: int | None = None) -> None:
        self.request({"op": "reset"} if seq is None else {"op": "reset", "seq": seq})
        if seq is None:
            self.lengths = [0] * self.max_seqs
        else:
            self.lengths[seq] = 0

    def stats(self) -> dict:
        return self.request({"op": "stats"})[0]

    def ping(self) -> dict:
        return self.request({"op": "ping"})[0]

    @property
    def has_head(self) -> bool:
        return bool(self.span and self.span.head)

    def describe(self) -> str:
        hello = getattr(self, "hello", {})
        cover = "; ".join(hello.get("cover", []))
        kernels = "; ".join(hello.get("kernels", []))
        return f"{self.description}, pid {hello.get('pid')}" + (f", {cover}" if cover else "") + \
            (f", {kernels}" if kernels else "")

    # -- requests ---------------------------------------------------------------------

    def _start_forward(self, x, base_pos, want, all_logits, capture, stop_after, seq) -> Callable[[], tuple]:
        """Send a forward; the returned function waits for the reply (and then counts the new tokens)."""
        message = _in_seq({"op": "forward", "base_pos": base_pos, "want": want}, seq)
        if all_logits:
            message["all_logits"] = True
        if capture:
            message["capture"] = list(capture)
        if stop_after is not None:
            message["stop_after"] = stop_after
        sent = self._submit_tensor(message, x)

        def replied() -> tuple[dict, list]:
            reply = self.collect(sent)
            if stop_after is None:
                self.lengths[seq] = base_pos + int(x.shape[0])
            return reply
        return replied

    def _send_tensor(self, message: dict, x: torch.Tensor) -> tuple[dict, list]:
        return self.collect(self._submit_tensor(message, x))

    def _submit_tensor(self, message: dict, x: torch.Tensor) -> "Sent":
        """A request whose input tensor goes through the IN slot, or as a frame when it does not fit."""
        x = x.detach()
        rid = next(self._ids)
        message = {**message, "n": int(x.shape[0])}
        if self.daemon.segment.fits(x):
            self.daemon.segment.write(SharedSegment.IN, rid, x)
            message["input"] = tensor_ref(x, shm=rid)
            return self.submit(message, rid=rid)
        message["input"] = tensor_ref(x, frame=1)
        return self.submit(message, [x.cpu()], rid=rid)

    def _tensor(self, ref, reply: dict, frames: list, field: str) -> torch.Tensor:
        if not isinstance(ref, dict):
            raise IpcError(f"{self.description}: {field} is missing from the reply")
        if "shm" in ref and ref["shm"] != reply["id"]:
            raise IpcError(f"{self.description}: {field} sequence {ref['shm']!r} does not match request {reply['id']}")
        return ref_tensor(ref, frames, f"{self.description}: {field}", self.daemon.segment, SharedSegment.OUT)

    def _captures(self, reply: dict, frames: list) -> list[Captured]:
        slices = reply.get("captures", [])
        if not isinstance(slices, list):
            raise IpcError(f"{self.description}: forward.captures is not a list")
        out = []
        for i, ref in enumerate(slices):
            if not isinstance(ref, dict) or not all(isinstance(ref.get(k), int) for k in ("layer", "start")):
                raise IpcError(f"{self.description}: forward.captures[{i}] is malformed")
            out.append(Captured(ref["layer"], ref["start"], self._tensor(ref, reply, frames, f"forward.captures[{i}]")))
        return out

    def _tokens(self, reply: dict) -> list[int]:
        tokens = reply.get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise IpcError(f"{self.description}: reply carries no token ids")
        return tokens

    def request(self, message: dict, payloads: list = (), rid: int | None = None,
                timeout: float | None = None, heartbeat: bool = True) -> tuple[dict, list]:
        return self.collect(self.submit(message, payloads, rid), timeout, heartbeat)

    def submit(self, message: dict, payloads: list = (), rid: int | None = None) -> "Sent":
        """Send a request without waiting for its reply (see `collect`)."""
        rid = next(self._ids) if rid is None else rid
        message = {**message, "id": rid}
        if not self.daemon.alive():
            raise StageDied(f"{self.description}: daemon exited ({self.daemon.exit_reason()})")
        t0 = time.perf_counter()
        frames = encode(message, list(payloads))
        send = lambda f: self.socket.send_multipart(f, copy=False)  # noqa: E731
        if message["op"] == "hello":  # over the socket: the daemon can route replies to us once it has seen us
            send(frames)
        else:
            deliver(self.daemon.segment, SharedSegment.REQUEST, "daemon", rid, frames, send)
        return Sent(rid, message["op"], t0)

    def collect(self, sent: "Sent", timeout: float | None = None, heartbeat: bool = True) -> tuple[dict, list]:
        """The reply to a submitted request: an error reply raises, naming this stage."""
        reply, frames = self._wait(sent.rid, self.timeouts.request if timeout is None else timeout, heartbeat)
        if sent.op in ("forward", "forward_batch"):
            self.forwards += 1
            self.forward_seconds += time.perf_counter() - sent.at
            self.recent_forwards.append(time.perf_counter() - sent.at)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code, text = error.get("code", "?"), error.get("message", "no message")
            if code in ("backend_mismatch", "load_failed", "model_differs"):
                refused = ConfigError(f"{self.description}: {text}")
                refused.reply = reply  # what the daemon saw: its pinned environment and devices
                raise refused
            refused = IpcError(f"{self.description}: {sent.op} refused ({code}): {text}")
            refused.reply = reply
            raise refused
        return reply, frames

    def _mailbox_reply(self) -> tuple[dict, list]:
        frames = [self.daemon.segment.message(self.daemon.segment.REPLY)]
        return decode(frames), frames

    def _wait(self, rid: int, timeout: float, heartbeat: bool) -> tuple[dict, list]:
        """Spin on the reply counter for `Timeouts.spin`, then sleep on the socket (flagged, so the
        daemon nudges us), checking liveness, the heartbeat and the deadline every POLL_MS."""
        segment = self.daemon.segment
        replied = lambda: segment.counter("reply") == rid  # noqa: E731
        if self.timeouts.spin and spin(replied, self.socket, self.timeouts.spin):
            return self._mailbox_reply()
        segment.set_waiting("coordinator", True)  # with no spin it stays set: every reply comes over ZeroMQ
        fence()  # then look at the counter: a reply from now on comes over ZeroMQ or with a nudge
        try:
            return self._sleep(rid, replied, timeout, heartbeat)
        finally:
            if self.timeouts.spin:
                segment.set_waiting("coordinator", False)

    def _sleep(self, rid: int, replied, timeout: float, heartbeat: bool) -> tuple[dict, list]:
        start = time.monotonic()
        deadline = start + timeout
        segment = self.daemon.segment
        last_beat, last_change = segment.heartbeat(), start
        while True:
            if replied():
                return self._mailbox_reply()
            if self.socket.poll(POLL_MS):
                frames = [f.buffer for f in self.socket.recv_multipart(copy=False)]
                reply = decode(frames)
                if reply.get("id") == rid and not reply.get("op"):
                    return reply, frames
                continue  # a nudge (the reply is in the mailbox), or a late reply to a request that already failed
            now = time.monotonic()
            if not self.daemon.alive():
                raise StageDied(f"{self.description}: daemon exited ({self.daemon.exit_reason()})")
            beat = segment.heartbeat()
            if beat != last_beat:
                last_beat, last_change = beat, now
            elif heartbeat and now - last_change > self.timeouts.heartbeat:
                raise StageDied(f"{self.description}: daemon stopped answering "
                                f"(no heartbeat for {self.timeouts.heartbeat:g}s, pid {self.daemon.pid})")
            if now > deadline:
                raise StageDied(f"{self.description}: no reply within {timeout:g}s (pid {self.daemon.pid})")

    def _handshake(self) -> dict:
        try:
            reply, _ = self.request({"op": "hello", "version": PROTOCOL_VERSION, "model": self.identity},
                                    timeout=self.timeouts.ready, heartbeat=False)
        except (ConfigError, IpcError) as exc:
            self._check_version(getattr(exc, "reply", None) or {})  # a version mismatch explains the rest
            raise
        self._check_version(reply)
        if reply.get("version") != PROTOCOL_VERSION:
            raise IpcError(f"{self.description}: daemon speaks protocol {reply.get('version')!r}, not {PROTOCOL_VERSION}")
        if self.span is not None and reply.get("layers") != [self.span.start, self.span.stop]:
            raise IpcError(f"{self.description}: daemon holds layers {reply.get('layers')}, expected {self.span}")
        return reply

    def _check_version(self, reply: dict) -> None:
        theirs = reply.get("shardrt", "an unknown version (older than 0.1.0, or not shardrt)")
        if theirs != __version__:
            ran = reply.get("python")
            where = self.daemon.python + (f" ({ran})" if ran and ran != self.daemon.python else "")
            raise ConfigError(f"{self.description}: its interpreter {where} runs shardrt {theirs}, this coordinator "
                              f"shardrt {__version__}; install shardrt {__version__} there")

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass(frozen=True)
class Sent:
    """A request on its way: its id, its op, and when it left."""

    rid: int
    op: str
    at: float


def _in_seq(message: dict, seq: int) -> dict:
    """A request about sequence `seq`: sequence 0 goes without the field (as before slots)."""
    return {**message, "seq": seq} if seq else message
