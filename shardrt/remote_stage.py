"""`RemoteStage`: the coordinator's handle on stages that live in a daemon.

It has the methods of `Stage` and forwards each over a ZeroMQ DEALER socket, with
activations through the daemon's shared memory (or as zero-copy frames when they do not fit).
Every wait is bounded: a daemon that exits fails the request at once, one whose heartbeat
stalls fails it within the heartbeat timeout, and each names the stage.
"""

from __future__ import annotations

import itertools
import time

import torch
import zmq

from .errors import ConfigError, IpcError, StageDied
from .gguf_loader import LayerSpan
from .ipc.codec import decode, encode, frame_tensor, tensor_ref
from .ipc.protocol import PROTOCOL_VERSION
from .ipc.shm import SharedSegment
from .lifecycle import DaemonProcess, Timeouts

POLL_MS = 20


class RemoteStage:
    def __init__(self, daemon: DaemonProcess, context: zmq.Context, timeouts: Timeouts, identity: dict,
                 span: LayerSpan | None, cfg=None, max_ctx: int = 0, description: str = ""):
        self.daemon, self.timeouts, self.identity = daemon, timeouts, identity
        self.span, self.cfg, self.max_ctx = span, cfg, max_ctx
        self.description = description or daemon.label
        self.length = 0
        self._ids = itertools.count(1)
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(daemon.endpoint)
        try:
            self.hello = self._handshake()
        except BaseException:
            self.close()
            raise

    # -- the Stage interface ----------------------------------------------------------

    def forward(self, x: torch.Tensor, base_pos: int, all_logits: bool = False) -> torch.Tensor:
        reply, frames = self._forward(x, base_pos, "logits" if self.has_head else "activation", all_logits)
        ref = reply.get("output")
        if not isinstance(ref, dict):
            raise IpcError(f"{self.description}: forward reply carries no output")
        if "shm" in ref:
            if ref["shm"] != reply["id"]:
                raise IpcError(f"{self.description}: output sequence {ref['shm']!r} does not match request {reply['id']}")
            return self.daemon.segment.read(SharedSegment.OUT, reply["id"])
        return frame_tensor(ref, frames, "forward.output")

    def argmax(self, x: torch.Tensor, base_pos: int) -> int:
        reply, _ = self._forward(x, base_pos, "argmax", False)
        tokens = reply.get("tokens")
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[-1], int):
            raise IpcError(f"{self.description}: argmax reply carries no tokens")
        return tokens[-1]

    def truncate(self, n: int) -> None:
        self.request({"op": "kv_truncate", "n": n})
        self.length = n

    def reset(self) -> None:
        self.request({"op": "reset"})
        self.length = 0

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
        return f"{self.description}, pid {hello.get('pid')}" + (f", {cover}" if cover else "")

    # -- requests ---------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, base_pos: int, want: str, all_logits: bool):
        x = x.detach().cpu()
        message = {"op": "forward", "base_pos": base_pos, "n": int(x.shape[0]), "want": want}
        if all_logits:
            message["all_logits"] = True
        rid = next(self._ids)
        payloads = []
        if self.daemon.segment.fits(x):
            self.daemon.segment.write(SharedSegment.IN, rid, x)
            message["input"] = tensor_ref(x, shm=rid)
        else:
            message["input"] = tensor_ref(x, frame=1)
            payloads = [x]
        reply = self.request(message, payloads, rid=rid)
        self.length = base_pos + int(x.shape[0])
        return reply

    def request(self, message: dict, payloads: list = (), rid: int | None = None,
                timeout: float | None = None, heartbeat: bool = True) -> tuple[dict, list]:
        rid = next(self._ids) if rid is None else rid
        message = {**message, "id": rid}
        if not self.daemon.alive():
            raise StageDied(f"{self.description}: daemon exited ({self.daemon.exit_reason()})")
        self.socket.send_multipart(encode(message, list(payloads)), copy=False)
        reply, frames = self._wait(rid, self.timeouts.request if timeout is None else timeout, heartbeat)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code, text = error.get("code", "?"), error.get("message", "no message")
            if code in ("backend_mismatch", "load_failed"):
                refused = ConfigError(f"{self.description}: {text}")
                refused.reply = reply  # what the daemon saw: its pinned environment and devices
                raise refused
            raise IpcError(f"{self.description}: {message['op']} refused ({code}): {text}")
        return reply, frames

    def _wait(self, rid: int, timeout: float, heartbeat: bool) -> tuple[dict, list]:
        start = time.monotonic()
        deadline = start + timeout
        segment = self.daemon.segment
        last_beat, last_change = segment.heartbeat(), start
        while True:
            if self.socket.poll(POLL_MS):
                frames = [f.buffer for f in self.socket.recv_multipart(copy=False)]
                reply = decode(frames)
                if reply.get("id") == rid:
                    return reply, frames
                continue  # a late reply to a request that already failed
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
        reply, _ = self.request({"op": "hello", "version": PROTOCOL_VERSION, "model": self.identity},
                                timeout=self.timeouts.ready, heartbeat=False)
        if reply.get("version") != PROTOCOL_VERSION:
            raise IpcError(f"{self.description}: daemon speaks protocol {reply.get('version')!r}, not {PROTOCOL_VERSION}")
        if self.span is not None and reply.get("layers") != [self.span.start, self.span.stop]:
            raise IpcError(f"{self.description}: daemon holds layers {reply.get('layers')}, expected {self.span}")
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)
