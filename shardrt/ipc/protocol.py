"""The coordinator <-> daemon protocol: one table of operations and the checks on each.

Requests are msgpack maps `{op, id, ...}`; replies `{id, ok: true, ...}` or
`{id, ok: false, error: {code, message}}`. docs/PROTOCOL.md is the written reference.
"""

from __future__ import annotations

from typing import Any

from ..errors import IpcError

PROTOCOL_VERSION = 2
MAX_TOKENS_PER_FORWARD = 1 << 16
MAX_CAPTURE_LAYERS = 64
MAX_KV_SLOTS = 1 << 12

# op -> {field: (type, required)}
OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {"version": (int, True), "model": (dict, True)},
    "forward": {"base_pos": (int, True), "n": (int, True), "input": (dict, True), "want": (str, True),
                "all_logits": (bool, False), "capture": (list, False), "stop_after": (int, False)},
    "project": {"n": (int, True), "input": (dict, True), "want": (str, True)},
    "kv_truncate": {"n": (int, True)},
    "kv_snapshot": {"slot": (int, True)},
    "kv_restore": {"slot": (int, True)},
    "kv_free": {"slot": (int, True)},
    "reset": {},
    "stats": {},
    "ping": {},
    "shutdown": {},
}
WANTS = ("activation", "argmax", "logits")


class ProtocolError(IpcError):
    """A request the daemon refuses; `code` goes into the error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_request(message: dict) -> str:
    """The op of a well-formed request; ProtocolError naming the field otherwise."""
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError("unknown_op", f"op: {op!r} is not one of {', '.join(OPS)}")
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError("bad_request", f"id: {request_id!r} is not an integer")
    if not 0 <= request_id < 1 << 63:  # it doubles as the u64 sequence number of the reply's OUT slot
        raise ProtocolError("bad_request", f"id: {request_id} is outside 0..2^63-1")
    for name, (kind, required) in OPS[op].items():
        if name not in message:
            if required:
                raise ProtocolError("bad_request", f"{op}.{name}: missing")
            continue
        value = message[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("bad_request", f"{op}.{name}: {value!r} is not {kind.__name__}")
        if kind is int and not 0 <= value < 1 << 40:
            raise ProtocolError("bad_request", f"{op}.{name}: {value} is out of range")
    unknown = sorted(set(message) - set(OPS[op]) - {"op", "id"})
    if unknown:
        raise ProtocolError("bad_request", f"{op}: unknown field {unknown[0]!r}")
    if op in ("forward", "project"):
        wants = WANTS if op == "forward" else WANTS[1:]
        if message["want"] not in wants:
            raise ProtocolError("bad_request", f"{op}.want: {message['want']!r} is not one of {', '.join(wants)}")
        if not 1 <= message["n"] <= MAX_TOKENS_PER_FORWARD:
            raise ProtocolError("bad_request", f"{op}.n: {message['n']} is outside 1..{MAX_TOKENS_PER_FORWARD}")
    capture = message.get("capture", [])
    if len(capture) > MAX_CAPTURE_LAYERS or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 20 for c in capture):
        raise ProtocolError("bad_request", f"forward.capture: {capture!r} is not a list of at most "
                                           f"{MAX_CAPTURE_LAYERS} layer ids")
    if "slot" in message and not message["slot"] < MAX_KV_SLOTS:
        raise ProtocolError("bad_request", f"{op}.slot: {message['slot']} is outside 0..{MAX_KV_SLOTS - 1}")
    return op


def error_reply(request_id: Any, code: str, message: str) -> dict:
    # a bool is an int to Python, and True == 1 would match the client's request 1
    valid = isinstance(request_id, int) and not isinstance(request_id, bool)
    return {"id": request_id if valid else -1, "ok": False,
            "error": {"code": code, "message": message}}
