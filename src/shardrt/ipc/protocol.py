"""The coordinator <-> daemon protocol: one table of operations and the checks on each.

Requests are msgpack maps `{op, id, ...}`; replies `{id, ok: true, ...}` or
`{id, ok: false, error: {code, message}}`. docs/PROTOCOL.md is the written reference.
"""

from __future__ import annotations

from typing import Any

from ..errors import IpcError

PROTOCOL_VERSION = 6
MAX_TOKENS_PER_FORWARD = 1 << 16
MAX_CAPTURE_LAYERS = 64
MAX_KV_SLOTS = 1 << 12
MAX_SEQS = 1 << 12  # sequence slots of a stage's KV cache (`seq`)
MAX_BATCH = 1 << 13  # rows in one forward_batch (decode tokens and prompt chunks of several sequences)
MAX_BATCH_SEQS = 1 << 10  # sequences decoding together (--max-seqs): each may put a row in every step
MAX_SCORED_LAYERS = 1 << 10  # layers one score_prompt may name
MAX_PREFILL_CHUNK = 1 << 13  # tokens score_prompt prefills at a time

# op -> {field: (type, required)}
OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {"version": (int, True), "model": (dict, True)},
    "forward": {"base_pos": (int, True), "n": (int, True), "input": (dict, True), "want": (str, True),
                "all_logits": (bool, False), "capture": (list, False), "stop_after": (int, False), "seq": (int, False)},
    "forward_batch": {"n": (int, True), "seqs": (list, True), "positions": (list, True), "input": (dict, True),
                      "want": (str, True), "outputs": (list, False)},
    "project": {"n": (int, True), "input": (dict, True), "want": (str, True)},
    "score_prompt": {"n": (int, True), "input": (dict, True), "window": (int, True), "skip": (int, True),
                     "chunk": (int, True), "layers": (list, True)},
    "kv_truncate": {"n": (int, True), "seq": (int, False)},
    "kv_copy": {"src_seq": (int, True), "n": (int, True), "seq": (int, False)},
    "kv_snapshot": {"slot": (int, True), "seq": (int, False)},
    "kv_restore": {"slot": (int, True), "seq": (int, False)},
    "kv_free": {"slot": (int, True)},
    "reset": {"seq": (int, False)},
    "stats": {},
    "ping": {},
    "shutdown": {},
    "nudge": {},  # no reply: the request mailbox was rung while the daemon slept on ZeroMQ
}
WANTS = ("activation", "argmax", "logits")


class ProtocolError(IpcError):
    """A request the daemon refuses; `code` goes into the error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# per op: the fields a request may carry (besides op and id); checked as a set, once
ALLOWED = {op: frozenset(fields) | {"op", "id"} for op, fields in OPS.items()}


def check_request(message: dict) -> str:
    """The op of a well-formed request; ProtocolError naming the field otherwise. On the hop's
    hot path: `type(x) is int` is the integer check (it refuses bools, which isinstance admits)."""
    op = message.get("op")
    fields = OPS.get(op) if type(op) is str else None
    if fields is None:
        raise ProtocolError("unknown_op", f"op: {op!r} is not one of {', '.join(OPS)}")
    request_id = message.get("id")
    if type(request_id) is not int:
        raise ProtocolError("bad_request", f"id: {request_id!r} is not an integer")
    if not 0 <= request_id < 1 << 63:  # it doubles as the u64 sequence number of the reply's OUT slot
        raise ProtocolError("bad_request", f"id: {request_id} is outside 0..2^63-1")
    for name, (kind, required) in fields.items():
        value = message.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise ProtocolError("bad_request", f"{op}.{name}: missing")
            continue
        if kind is int:
            if type(value) is not int:
                raise ProtocolError("bad_request", f"{op}.{name}: {value!r} is not int")
            if not 0 <= value < 1 << 40:
                raise ProtocolError("bad_request", f"{op}.{name}: {value} is out of range")
        elif not isinstance(value, kind):
            raise ProtocolError("bad_request", f"{op}.{name}: {value!r} is not {kind.__name__}")
    if not message.keys() <= ALLOWED[op]:
        unknown = sorted(str(k) for k in message.keys() - ALLOWED[op])
        raise ProtocolError("bad_request", f"{op}: unknown field {unknown[0]!r}")
    if op == "forward" or op == "project" or op == "forward_batch":
        wants = WANTS[1:] if op == "project" else WANTS
        if message["want"] not in wants:
            raise ProtocolError("bad_request", f"{op}.want: {message['want']!r} is not one of {', '.join(wants)}")
        if not 1 <= message["n"] <= MAX_TOKENS_PER_FORWARD:
            raise ProtocolError("bad_request", f"{op}.n: {message['n']} is outside 1..{MAX_TOKENS_PER_FORWARD}")
    capture = message.get("capture")
    if capture is not None and (len(capture) > MAX_CAPTURE_LAYERS or not all(
            type(c) is int and 0 <= c < 1 << 20 for c in capture)):
        raise ProtocolError("bad_request", f"forward.capture: {capture!r} is not a list of at most "
                                           f"{MAX_CAPTURE_LAYERS} layer ids")
    if "slot" in message and not message["slot"] < MAX_KV_SLOTS:
        raise ProtocolError("bad_request", f"{op}.slot: {message['slot']} is outside 0..{MAX_KV_SLOTS - 1}")
    for name in ("seq", "src_seq"):
        if name in message and not message[name] < MAX_SEQS:
            raise ProtocolError("bad_request", f"{op}.{name}: {message[name]} is outside 0..{MAX_SEQS - 1}")
    if op == "forward_batch":
        _check_batch(message)
    if op == "score_prompt":
        _check_score(message)
    return op


def _check_score(message: dict) -> None:
    n, window, skip, chunk, layers = (message[k] for k in ("n", "window", "skip", "chunk", "layers"))
    if not 1 <= n <= MAX_TOKENS_PER_FORWARD:
        raise ProtocolError("bad_request", f"score_prompt.n: {n} is outside 1..{MAX_TOKENS_PER_FORWARD}")
    if not (window >= 1 and skip + window < n):
        raise ProtocolError("bad_request", f"score_prompt.window: {window} with skip {skip} leaves no token of the "
                                           f"{n} to score; give 1 <= window and skip + window < n")
    if not 1 <= chunk <= MAX_PREFILL_CHUNK:
        raise ProtocolError("bad_request", f"score_prompt.chunk: {chunk} is outside 1..{MAX_PREFILL_CHUNK}")
    if not layers or len(layers) > MAX_SCORED_LAYERS or not all(type(x) is int and 0 <= x < 1 << 20 for x in layers) \
            or len(set(layers)) != len(layers):
        raise ProtocolError("bad_request", f"score_prompt.layers: {layers[:8]!r} is not a list of 1 to "
                                           f"{MAX_SCORED_LAYERS} distinct layer ids")


def _check_batch(message: dict) -> None:
    n = message["n"]
    if n > MAX_BATCH:
        raise ProtocolError("bad_request", f"forward_batch.n: {n} is outside 1..{MAX_BATCH}")
    for name, bound in (("seqs", MAX_SEQS), ("positions", 1 << 40)):
        values = message[name]
        if len(values) != n or not all(type(v) is int and 0 <= v < bound for v in values):
            raise ProtocolError("bad_request", f"forward_batch.{name}: {values[:8]!r} is not a list of "
                                               f"forward_batch.n={n} integers in 0..{bound - 1}")
    follows: dict[int, int] = {}  # the rows of one sequence sit at consecutive positions, in order
    for seq, pos in zip(message["seqs"], message["positions"]):
        if seq in follows and pos != follows[seq] + 1:
            raise ProtocolError("bad_request", f"forward_batch.positions: {pos} for sequence {seq} does not follow "
                                               f"its row before, at {follows[seq]}")
        follows[seq] = pos
    outputs = message.get("outputs")
    if outputs is not None and (not outputs or not all(type(o) is int for o in outputs)
                                or sorted(set(outputs)) != outputs or not 0 <= outputs[0] or outputs[-1] >= n):
        raise ProtocolError("bad_request", f"forward_batch.outputs: {outputs[:8]!r} is not a list of increasing "
                                           f"rows in 0..{n - 1}")


_MISSING = object()


def error_reply(request_id: Any, code: str, message: str) -> dict:
    # a bool is an int to Python, and True == 1 would match the client's request 1
    valid = isinstance(request_id, int) and not isinstance(request_id, bool)
    return {"id": request_id if valid else -1, "ok": False,
            "error": {"code": code, "message": message}}
