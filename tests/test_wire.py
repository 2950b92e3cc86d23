"""The wire between coordinator and daemon, with real components only: the shared-memory
segment, the msgpack codec, a real exec'd echo daemon answering good and malformed requests, and
real daemons holding layers of the demo model (captures, early exit, project, KV snapshots)."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import msgpack
import pytest
import torch
import zmq

from shardrt import launch
from shardrt.errors import IpcError
from shardrt.gguf_file import GGUFFile
from shardrt.gguf_loader import LayerSpan
from shardrt.ipc.codec import MAX_FRAMES, decode, encode, frame_tensor, tensor_ref
from shardrt.ipc.protocol import (MAX_BATCH, MAX_CAPTURE_LAYERS, MAX_KV_SLOTS, MAX_SEQS, MAX_TOKENS_PER_FORWARD,
                                  PROTOCOL_VERSION)
from shardrt.ipc.shm import (ALIGN, HEADER, HEADER_SIZE, MAILBOX_BYTES, SHM_DIR, SLOTS_BASE, SharedSegment,
                             new_segment_name, packed_size)
from shardrt.lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from shardrt.model import ModelConfig
from shardrt.remote_stage import RemoteStage
from shardrt.stage import Stage
from shardrt.worker import ShardSpec

TIMEOUTS = Timeouts(ready=60.0, request=15.0, heartbeat=5.0, stop=5.0)
REPLY_MS = 15_000
IDENTITY = {"file": "echo"}


# -- shared memory -----------------------------------------------------------------------

@pytest.fixture
def segment():
    owner = SharedSegment(new_segment_name("test"), 1 << 16)
    peer = SharedSegment(owner.name)  # what the daemon does: attach by name
    try:
        yield owner, peer
    finally:
        owner.unlink()  # first: a failed test's traceback can pin the map and make close() raise
        peer.close()
        owner.close()


@pytest.mark.parametrize("tensor", [
    torch.randn(4, 8),
    torch.randn(3, 5, dtype=torch.float32).to(torch.bfloat16),
    torch.tensor([[0, -1, 2**62, -(2**63)]], dtype=torch.int64),
    torch.randn(2, 3, 4, 5).half(),
    torch.arange(7, dtype=torch.int32),
    torch.tensor(2.5),  # rank 0
    torch.zeros(0, 8),  # empty
])
def test_segment_round_trip(segment, tensor):
    owner, peer = segment
    owner.write(SharedSegment.IN, 41, tensor)
    got = peer.read(SharedSegment.IN, 41)
    assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    peer.write(SharedSegment.OUT, 42, got * 2)
    assert torch.equal(owner.read(SharedSegment.OUT, 42), tensor * 2)
    owner.write(SharedSegment.IN, 43, torch.ones(1))  # the slots do not overlap
    assert torch.equal(owner.read(SharedSegment.OUT, 42), tensor * 2)


def test_segment_file_is_private_and_unlinked():
    seg = SharedSegment(new_segment_name("mode"), 1 << 16)
    try:
        assert seg.name.startswith(f"shardrt-{os.getpid()}-mode-")
        info = os.stat(seg.path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 1 << 16
        assert seg.slot_size % ALIGN == 0 and seg.capacity == seg.slot_size - HEADER_SIZE
        assert SLOTS_BASE + 2 * seg.slot_size <= seg.size < SLOTS_BASE + 2 * (seg.slot_size + ALIGN)
    finally:
        seg.close()
        seg.unlink()
    assert not seg.path.exists()
    seg.unlink()  # twice is harmless


def test_segment_refuses_bad_names_sizes_and_tensors(segment):
    owner, _ = segment
    for name in ("other-name", "shardrt-../../etc/passwd"):
        with pytest.raises(IpcError, match="not a shardrt segment name"):
            SharedSegment(name, 1 << 16)
    with pytest.raises(IpcError, match="cannot create"):
        SharedSegment(owner.name, 1 << 16)  # exists already
    with pytest.raises(IpcError, match="cannot open"):
        SharedSegment(new_segment_name("absent"))
    tiny = new_segment_name("tiny")
    with pytest.raises(IpcError, match="too small"):
        SharedSegment(tiny, 100)
    assert not (owner.path.parent / tiny).exists()
    with pytest.raises(IpcError, match="do not fit"):
        owner.write(SharedSegment.IN, 1, torch.zeros(owner.capacity // 4 + 1))
    with pytest.raises(IpcError, match="cannot carry"):
        owner.write(SharedSegment.IN, 1, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(IpcError, match="cannot carry"):
        owner.write(SharedSegment.IN, 1, torch.zeros(1, 1, 1, 1, 1))


def test_segment_too_large_for_memory_is_an_ipc_error():
    name = new_segment_name("huge")
    with pytest.raises(IpcError, match=name):
        SharedSegment(name, 1 << 60)
    assert not (SHM_DIR / name).exists()


@pytest.mark.parametrize("header,needle", [
    ((9, 128, 1, 2, 4, 8, 0, 0), "sequence 9, expected 7"),
    ((7, 128, 99, 2, 4, 8, 0, 0), "dtype code 99"),
    ((7, 128, 1, 5, 4, 8, 0, 0), "rank 5"),
    ((7, 1 << 40, 1, 1, 1 << 38, 0, 0, 0), "header says"),  # more than the slot holds
    ((7, 128, 1, 2, 4, 9, 0, 0), "header says"),  # shape and byte count disagree
    ((7, 0, 1, 2, 1 << 62, 4, 0, 0), "header says"),  # the element count overflows 64 bits to 0
    ((7, 0, 1, 2, 1 << 63, 1, 0, 0), "header says"),
    ((7, 2**64 - 1, 1, 1, 2**62 - 1, 0, 0, 0), "header says"),
])
def test_corrupted_header_is_refused(segment, header, needle):
    owner, peer = segment
    owner.write(SharedSegment.IN, 7, torch.randn(4, 8))
    # another writer scribbles over the header, as a broken or hostile peer could
    fd = os.open(peer.path, os.O_RDWR)
    try:
        os.pwrite(fd, HEADER.pack(*header), SLOTS_BASE + SharedSegment.IN * peer.slot_size)
    finally:
        os.close(fd)
    with pytest.raises(IpcError, match=needle):
        owner.read(SharedSegment.IN, 7)


def test_segment_packs_several_tensors_in_one_slot(segment):
    owner, peer = segment
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(1).half(), torch.zeros(0, 4),
               torch.randn(2, 2).to(torch.bfloat16)]
    assert owner.fits(*tensors)
    offsets, offset = [], 0
    for t in tensors:
        offsets.append(offset)
        offset = owner.write(SharedSegment.OUT, 77, t, offset)
    assert all(o % ALIGN == 0 for o in offsets)
    assert offsets[1:] + [offset] == [o + packed_size(t) for o, t in zip(offsets, tensors)]  # back to back
    assert packed_size(tensors[0]) == HEADER_SIZE + 64 and packed_size(tensors[3]) == HEADER_SIZE
    for o, t in zip(offsets, tensors):
        got = peer.read(SharedSegment.OUT, 77, o)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    # the last aligned place with room for a header and 64 bytes; a tensor too large for what is left does not fit
    last = (owner.slot_size - HEADER_SIZE - ALIGN) // ALIGN * ALIGN
    assert owner.write(SharedSegment.OUT, 78, torch.ones(8), last) <= owner.slot_size
    assert torch.equal(peer.read(SharedSegment.OUT, 78, last), torch.ones(8))
    far = torch.zeros((owner.slot_size - last - HEADER_SIZE) // 4 + 1)
    assert not owner.fits(torch.zeros(owner.capacity // 8), torch.zeros(owner.capacity // 8 + 16))
    for offset in (last + ALIGN, 32, -ALIGN, owner.slot_size):
        with pytest.raises(IpcError, match="do not fit"):
            owner.write(SharedSegment.OUT, 78, torch.ones(1) if offset != last + ALIGN else far, offset)
    with pytest.raises(IpcError, match="do not fit"):
        owner.write(SharedSegment.OUT, 78, far, last)


@pytest.mark.parametrize("offset", [1, 63, ALIGN + 8, -ALIGN, True, 64.0, "64", None, 1 << 40, "end", "past"])
def test_segment_read_refuses_a_misaligned_or_outside_offset(segment, offset):
    owner, peer = segment
    owner.write(SharedSegment.IN, 5, torch.randn(4, 8))
    # "end": aligned, but no room for a header before the slot ends; "past": the other slot
    offset = {"end": peer.slot_size // ALIGN * ALIGN, "past": peer.slot_size + ALIGN}.get(offset, offset)
    with pytest.raises(IpcError, match="offset"):
        peer.read(SharedSegment.IN, 5, offset)


def test_segment_read_bounds_the_payload_by_what_follows_the_offset(segment):
    owner, peer = segment
    last = (owner.slot_size - HEADER_SIZE - ALIGN) // ALIGN * ALIGN  # room for 64 bytes or more after the header
    owner.write(SharedSegment.IN, 9, torch.ones(8), last)
    room = owner.slot_size - last - HEADER_SIZE
    fd = os.open(peer.path, os.O_RDWR)
    try:  # a header there that claims more bytes than lie between it and the slot's end
        os.pwrite(fd, HEADER.pack(9, 4 * (room // 4 + 1), 1, 1, room // 4 + 1, 0, 0, 0),
                  SLOTS_BASE + SharedSegment.IN * peer.slot_size + last)
    finally:
        os.close(fd)
    with pytest.raises(IpcError, match=f"slot holds {room}"):
        peer.read(SharedSegment.IN, 9, last)


def test_mailboxes_carry_one_message_each_and_refuse_what_does_not_fit(segment):
    owner, peer = segment
    request, reply = msgpack.packb({"op": "ping", "id": 7}), msgpack.packb({"id": 7, "ok": True})
    assert owner.post(SharedSegment.REQUEST, 7, request)
    assert peer.counter("request") == 7 and peer.message(SharedSegment.REQUEST) == request
    assert peer.post(SharedSegment.REPLY, 7, reply)
    assert owner.counter("reply") == 7 and owner.message(SharedSegment.REPLY) == reply
    assert owner.message(SharedSegment.REQUEST) == request  # the boxes do not overlap
    # a message too large for the box is not posted: the counter stays, the sender uses ZeroMQ
    assert not owner.post(SharedSegment.REQUEST, 8, b"x" * (MAILBOX_BYTES + 1))
    assert peer.counter("request") == 7 and peer.message(SharedSegment.REQUEST) == request
    assert owner.post(SharedSegment.REQUEST, 9, b"y" * MAILBOX_BYTES) and peer.message(SharedSegment.REQUEST) == b"y" * MAILBOX_BYTES
    for side in ("daemon", "coordinator"):
        assert not peer.waiting(side)
        owner.set_waiting(side, True)
        assert peer.waiting(side)
    fd = os.open(peer.path, os.O_RDWR)
    try:  # a length larger than the box, as a broken or hostile peer could write
        os.pwrite(fd, (MAILBOX_BYTES + 1).to_bytes(4, "little"), 64)
    finally:
        os.close(fd)
    with pytest.raises(IpcError, match=f"mailbox message of {MAILBOX_BYTES + 1} bytes"):
        owner.message(SharedSegment.REQUEST)


# -- codec -------------------------------------------------------------------------------

def test_codec_round_trip_with_a_tensor_frame():
    x = torch.randn(3, 16).to(torch.bfloat16)
    frames = encode({"op": "forward", "id": 5, "input": tensor_ref(x, frame=1), "note": "é"}, [x])
    assert len(frames) == 2
    wire = [bytes(f) for f in frames]  # what arrives on the other side
    message = decode(wire)
    assert message == {"op": "forward", "id": 5, "input": {"dtype": "bfloat16", "shape": [3, 16], "frame": 1},
                       "note": "é"}
    assert torch.equal(frame_tensor(message["input"], wire, "forward.input"), x)
    empty = torch.zeros(0, 4, dtype=torch.int64)
    wire = [bytes(f) for f in encode({"t": tensor_ref(empty, frame=1)}, [empty])]
    assert frame_tensor(decode(wire)["t"], wire, "t").shape == (0, 4)


@pytest.mark.parametrize("frames,needle", [
    ([b"\xc1\xc1\xc1"], "not valid msgpack"),
    ([b"\x92\x01"], "not valid msgpack"),  # truncated
    ([b""], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])], "is a list, not a map"),
    ([msgpack.packb(7)], "is a int, not a map"),
    ([msgpack.packb({1: "x"})], "not valid msgpack"),  # integer keys
    ([msgpack.packb({"op": "ping"})] * (MAX_FRAMES + 1), f"{MAX_FRAMES + 1} frames"),
    ([], "0 frames"),
    ([b"\xc6" + (2 << 20).to_bytes(4, "big") + bytes(2 << 20)], "exceeds"),
])
def test_codec_refuses_malformed_messages(frames, needle):
    with pytest.raises(IpcError, match=needle):
        decode(frames)


@pytest.mark.parametrize("ref,frames,needle", [
    ({"dtype": "float32", "shape": [4, 8], "frame": 1}, [b"", bytes(100)], "frame has 100 bytes"),
    ({"dtype": "float32", "shape": [4, 8], "frame": 2}, [b"", bytes(128)], "frame: 2"),
    ({"dtype": "float32", "shape": [4, 8], "frame": 0}, [b"", bytes(128)], "frame: 0"),
    ({"dtype": "float32", "shape": [4, 8]}, [b"", bytes(128)], "frame: None"),
    ({"dtype": "float32", "shape": [4, 8], "frame": True}, [b"", bytes(128)], "frame: True"),
    ({"dtype": "float128", "shape": [4], "frame": 1}, [b"", bytes(64)], "dtype: 'float128'"),
    ({"dtype": "float32", "shape": [1, 2, 3, 4, 5], "frame": 1}, [b"", bytes(480)], "shape"),
    ({"dtype": "float32", "shape": [-4], "frame": 1}, [b"", bytes(16)], "shape"),
    ({"dtype": "float32", "shape": "4", "frame": 1}, [b"", bytes(16)], "shape"),
    ({"dtype": "float32", "shape": [65536] * 4, "frame": 1}, [b"", b""], "frame has 0 bytes"),  # 2**64 elements
    ([1, 2], [b""], "not a tensor reference"),
])
def test_codec_refuses_bad_tensor_refs(ref, frames, needle):
    with pytest.raises(IpcError, match=needle) as err:
        frame_tensor(ref, frames, "forward.input")
    assert "forward.input" in str(err.value)


# -- a real echo daemon ------------------------------------------------------------------

def start_echo(runtime_dir, index=1, shared_bytes=1 << 20):
    return DaemonProcess(label="echo", backend="cpu", python=None, child_env={}, runtime_dir=runtime_dir,
                         index=index, shared_bytes=shared_bytes, model=None, identity=IDENTITY, shards=(), max_ctx=0)


class RawClient:
    """A DEALER socket of its own, to send what RemoteStage never would."""

    def __init__(self, context, endpoint):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, frames: list) -> dict:
        self.socket.send_multipart(frames)
        assert self.socket.poll(REPLY_MS), "the daemon did not reply"
        return decode(self.socket.recv_multipart())

    def request(self, message: dict, payloads: list = ()) -> dict:
        return self.send(encode(message, list(payloads)))

    def close(self):
        self.socket.close(linger=0)


def ref(shape, dtype="float32", **where):
    return {"dtype": dtype, "shape": list(shape), **where}


def forward(rid, n=4, **fields):
    """A forward of the [n, 8] input that the test left in the IN slot under sequence GOOD_SEQ."""
    return {"op": "forward", "id": rid, "base_pos": 0, "n": n, "want": "activation",
            "input": ref((n, 8), shm=GOOD_SEQ), **fields}


def batch(rid, **fields):
    """A forward_batch of the same input: one row for each of four sequences."""
    return {"op": "forward_batch", "id": rid, "n": 4, "seqs": [0, 1, 2, 3], "positions": [0, 0, 0, 0],
            "want": "activation", "input": ref((4, 8), shm=GOOD_SEQ), **fields}


GOOD_SEQ = 1001


X48 = torch.arange(32, dtype=torch.float32).reshape(4, 8)

# (frames or a message, the reply's error code, words its message must hold)
def request_op(request) -> object:
    return request.get("op") if isinstance(request, dict) else None


MALFORMED = [
    ([b"not msgpack \xc1"], "stage_error", ["not valid msgpack"]),
    ([msgpack.packb([1, 2])], "stage_error", ["list, not a map"]),
    ([msgpack.packb({"op": "ping", "id": 1})] * (MAX_FRAMES + 1), "stage_error", ["frames"]),
    ({"op": "launch", "id": 2}, "unknown_op", ["op:", "'launch'"]),
    ({"id": 3}, "unknown_op", ["op:", "None"]),
    ({"op": "ping"}, "bad_request", ["id:", "None"]),
    ({"op": "ping", "id": "4"}, "bad_request", ["id:", "'4'"]),
    ({"op": "ping", "id": True}, "bad_request", ["id:", "True"]),
    ({"op": "ping", "id": 5, "extra": 1}, "bad_request", ["ping: unknown field 'extra'"]),
    (forward(-5), "bad_request", ["id:", "-5"]),  # the id doubles as the OUT slot's u64 sequence
    (forward(6, n=0), "bad_request", ["forward.n:", "0"]),
    (forward(7, n=MAX_TOKENS_PER_FORWARD + 1), "bad_request", ["forward.n:", str(MAX_TOKENS_PER_FORWARD + 1)]),
    (forward(8, n=-1), "bad_request", ["forward.n:", "-1", "out of range"]),
    (forward(9, n=1 << 50), "bad_request", ["forward.n:", "out of range"]),
    (forward(10, n=2), "stage_error", ["forward.input:", "[4, 8]", "[2, 8]"]),  # the slot holds 4 rows
    ({**forward(31), "input": ref((4, 8), shm=31)}, "stage_error", ["sequence 1001, expected 31"]),
    ({**forward(32), "input": ref((4, 8), "int64", shm=GOOD_SEQ)}, "stage_error", ["forward.input:", "int64"]),
    ({**forward(11), "base_pos": "0"}, "bad_request", ["forward.base_pos:", "'0'"]),
    ({**forward(12), "n": 4.0}, "bad_request", ["forward.n:", "4.0"]),
    ({**forward(13), "input": [1, 2]}, "bad_request", ["forward.input:", "[1, 2]"]),
    ({**forward(14), "want": "everything"}, "bad_request", ["forward.want:", "'everything'"]),
    ({**forward(15), "want": "argmax"}, "bad_request", ["forward.want:", "argmax"]),  # echo has no head
    ({**forward(16), "all_logits": 1}, "bad_request", ["forward.all_logits:", "1"]),
    ({**forward(17), "temperature": 0.5}, "bad_request", ["forward: unknown field 'temperature'"]),
    ({k: v for k, v in forward(18).items() if k != "input"}, "bad_request", ["forward.input: missing"]),
    ({**forward(19), "input": ref((4, 8), "float128", frame=1)}, "stage_error", ["forward.input.dtype:", "'float128'"]),
    ({**forward(20), "input": ref((4, 8), "float128", shm=20)}, "stage_error", ["forward.input.dtype:", "'float128'"]),
    ({**forward(21), "input": ref((4, 8), frame=3)}, "stage_error", ["forward.input.frame:", "3"]),
    ({**forward(22), "input": ref((4, 8), frame=1)}, "stage_error", ["forward.input.frame:", "1"]),  # no payload
    ({**forward(23), "input": ref((4, 8, 1, 1, 1), frame=1)}, "stage_error", ["forward.input.shape:"]),
    ({**forward(24), "input": ref((65536,) * 4, frame=1)}, "stage_error", ["forward.input:"]),
    ({**forward(25, n=1), "input": ref((), frame=1)}, "bad_request", ["forward.input:"]),  # rank 0: no rows
    ({"op": "kv_truncate", "id": 26}, "bad_request", ["kv_truncate.n: missing"]),
    ({"op": "kv_truncate", "id": 27, "n": -3}, "bad_request", ["kv_truncate.n:", "-3"]),
    ({"op": "hello", "id": 28, "version": PROTOCOL_VERSION + 1, "model": IDENTITY}, "version_mismatch",
     ["hello.version:", str(PROTOCOL_VERSION + 1)]),
    ({"op": "hello", "id": 29, "version": PROTOCOL_VERSION, "model": {"file": "other"}}, "model_mismatch",
     ["hello.model:", "other"]),
    ({"op": "hello", "id": 30, "version": PROTOCOL_VERSION}, "bad_request", ["hello.model: missing"]),
    # version 2: capture, stop_after, project, KV slots, offsets in shared-memory references
    (forward(40, capture=22), "bad_request", ["forward.capture:", "22", "not list"]),
    (forward(41, capture={"22": 1}), "bad_request", ["forward.capture:", "not list"]),
    (forward(42, capture=list(range(MAX_CAPTURE_LAYERS + 1))), "bad_request",
     ["forward.capture:", f"at most {MAX_CAPTURE_LAYERS}"]),
    (forward(43, capture=[22, -1]), "bad_request", ["forward.capture:", "-1"]),
    (forward(44, capture=[True]), "bad_request", ["forward.capture:", "True"]),
    (forward(45, capture=["22"]), "bad_request", ["forward.capture:", "'22'"]),
    (forward(46, capture=[1 << 20]), "bad_request", ["forward.capture:", str(1 << 20)]),
    (forward(47, capture=[2.0]), "bad_request", ["forward.capture:", "2.0"]),
    (forward(48, stop_after=0), "bad_request", ["forward.stop_after:", "layer 0", "not held"]),  # echo holds none
    (forward(49, stop_after=-1), "bad_request", ["forward.stop_after:", "-1"]),
    (forward(50, stop_after=True), "bad_request", ["forward.stop_after:", "True"]),
    (forward(51, stop_after="3"), "bad_request", ["forward.stop_after:", "'3'"]),
    ({"op": "ping", "id": 52, "capture": []}, "bad_request", ["ping: unknown field 'capture'"]),
    ({"op": "project", "id": 53, "n": 4, "want": "logits", "input": ref((4, 8), shm=GOOD_SEQ)}, "bad_request",
     ["project:", "head"]),
    ({"op": "project", "id": 54, "n": 4, "want": "activation", "input": ref((4, 8), shm=GOOD_SEQ)}, "bad_request",
     ["project.want:", "'activation'"]),
    ({"op": "project", "id": 55, "n": 0, "want": "logits", "input": ref((4, 8), shm=GOOD_SEQ)}, "bad_request",
     ["project.n:", "0"]),
    ({"op": "project", "id": 56, "want": "logits", "input": ref((4, 8), shm=GOOD_SEQ)}, "bad_request",
     ["project.n: missing"]),
    ({"op": "kv_restore", "id": 57, "slot": 7}, "stage_error", ["kv_restore: slot 7"]),
    ({"op": "kv_free", "id": 58, "slot": 8}, "stage_error", ["kv_free: slot 8"]),
    ({"op": "kv_snapshot", "id": 59, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_snapshot.slot:", str(MAX_KV_SLOTS)]),
    ({"op": "kv_restore", "id": 60, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_restore.slot:", str(MAX_KV_SLOTS)]),
    ({"op": "kv_free", "id": 61, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_free.slot:", str(MAX_KV_SLOTS)]),
    ({"op": "kv_snapshot", "id": 62, "slot": -1}, "bad_request", ["kv_snapshot.slot:", "-1"]),
    ({"op": "kv_snapshot", "id": 63, "slot": False}, "bad_request", ["kv_snapshot.slot:", "False"]),
    # version 4: sequence slots and batched decode
    (forward(70, seq=MAX_SEQS), "bad_request", ["forward.seq:", str(MAX_SEQS)]),
    (forward(71, seq=-1), "bad_request", ["forward.seq:", "-1"]),
    (forward(72, seq="1"), "bad_request", ["forward.seq:", "'1'"]),
    ({"op": "reset", "id": 73, "seq": True}, "bad_request", ["reset.seq:", "True"]),
    ({"op": "kv_truncate", "id": 74, "n": 0, "seq": MAX_SEQS}, "bad_request", ["kv_truncate.seq:", str(MAX_SEQS)]),
    (batch(75, seqs=[0, 1, 2]), "bad_request", ["forward_batch.seqs:", "forward_batch.n=4"]),
    (batch(76, seqs=[0, 1, 1, 2]), "bad_request", ["forward_batch.positions: 0 for sequence 1", "at 0"]),
    (batch(86, outputs=[2, 1]), "bad_request", ["forward_batch.outputs:", "[2, 1]", "increasing"]),
    (batch(87, outputs=[4]), "bad_request", ["forward_batch.outputs:", "0..3"]),
    (batch(88, outputs=[]), "bad_request", ["forward_batch.outputs:"]),
    ({"op": "kv_copy", "id": 89, "n": 3}, "bad_request", ["kv_copy.src_seq: missing"]),
    ({"op": "kv_copy", "id": 90, "src_seq": MAX_SEQS, "n": 3}, "bad_request", ["kv_copy.src_seq:", str(MAX_SEQS - 1)]),
    (batch(77, seqs=[0, 1, 2, MAX_SEQS]), "bad_request", ["forward_batch.seqs:", str(MAX_SEQS - 1)]),
    (batch(78, seqs=[0, 1, 2, "3"]), "bad_request", ["forward_batch.seqs:", "'3'"]),
    (batch(79, positions=[0, 0, -1, 0]), "bad_request", ["forward_batch.positions:", "-1"]),
    (batch(80, positions=5), "bad_request", ["forward_batch.positions:", "5", "not list"]),
    (batch(81, n=MAX_BATCH + 1, seqs=list(range(MAX_BATCH + 1)), positions=[0] * (MAX_BATCH + 1)), "bad_request",
     ["forward_batch.n:", str(MAX_BATCH + 1)]),
    (batch(82, want="argmax"), "bad_request", ["forward_batch.want:", "argmax"]),  # echo has no head
    ({k: v for k, v in batch(83).items() if k != "seqs"}, "bad_request", ["forward_batch.seqs: missing"]),
    (batch(84, base_pos=0), "bad_request", ["forward_batch: unknown field 'base_pos'"]),
    ({"op": "kv_snapshot", "id": 64}, "bad_request", ["kv_snapshot.slot: missing"]),
    ({"op": "kv_snapshot", "id": 65, "slot": 1, "n": 2}, "bad_request", ["kv_snapshot: unknown field 'n'"]),
    ({**forward(66), "input": ref((4, 8), shm=GOOD_SEQ, offset=32)}, "stage_error", ["offset 32"]),
    ({**forward(67), "input": ref((4, 8), shm=GOOD_SEQ, offset=1 << 40)}, "stage_error", [f"offset {1 << 40}"]),
    ({**forward(68), "input": ref((4, 8), shm=GOOD_SEQ, offset=-64)}, "stage_error", ["offset -64"]),
    # aligned, but inside the payload of the tensor at 0: its bytes are no header of sequence 1001
    ({**forward(69), "input": ref((4, 8), shm=GOOD_SEQ, offset=ALIGN)}, "stage_error", ["expected 1001"]),
]
PAYLOADS = {22: [], 24: [torch.zeros(0)], 25: [torch.tensor(1.0)], 21: [X48], 19: [X48]}


@pytest.fixture
def echo():
    runtime_dir = make_runtime_dir()
    context = zmq.Context()
    daemon = stage = None
    try:
        daemon = start_echo(runtime_dir)
        stage = RemoteStage(daemon, context, TIMEOUTS, IDENTITY, span=None)
        yield daemon, stage, context
    finally:
        if stage is not None:
            stage.close()
        if daemon is not None:
            daemon.stop(TIMEOUTS)
        context.destroy(linger=0)
        remove_runtime_dir(runtime_dir)
        if daemon is not None:
            assert daemon.process.poll() is not None, "the daemon outlived stop()"
            assert not daemon.segment.path.exists(), "the shared-memory segment outlived the daemon"
        assert not runtime_dir.exists()


def test_echo_daemon_round_trips_and_survives_malformed_requests(echo):
    daemon, stage, context = echo
    hello = stage.hello
    assert hello["ok"] and hello["version"] == PROTOCOL_VERSION and hello["model"] == IDENTITY
    assert hello["backend"] == "cpu" and hello["layers"] == [0, 0] and hello["pid"] == daemon.pid
    socket_path = daemon.endpoint.removeprefix("ipc://")
    assert daemon.endpoint.startswith("ipc://") and os.path.exists(socket_path)
    assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700

    x = torch.randn(4, 8)
    assert daemon.segment.fits(x)
    assert torch.equal(stage.forward(x, 0), x)  # both ways through shared memory
    big = torch.randn(256, 1024)  # 1 MiB: more than a 512 KiB slot, so both ways as frames
    assert not daemon.segment.fits(big)
    assert torch.equal(stage.forward(big, 4), big)
    assert stage.length == 260
    stage.truncate(100)
    stage.reset()
    assert stage.stats()["forwards"] == 2

    raw = RawClient(context, daemon.endpoint)
    try:
        # the input the malformed forwards name; a good forward of it first, so what the malformed
        # ones get refused for is the request, not the socket or the input
        daemon.segment.write(SharedSegment.IN, GOOD_SEQ, X48)
        reply = raw.request(forward(1000))
        assert reply == {"id": 1000, "ok": True, "output": ref((4, 8), shm=1000, offset=0)}, reply
        assert torch.equal(daemon.segment.read(SharedSegment.OUT, 1000), X48)

        for request, code, needles in MALFORMED:
            if isinstance(request, dict):
                reply = raw.request(request, PAYLOADS.get(request.get("id"), []))
            else:
                reply = raw.send(request)
            assert reply["ok"] is False, (request, reply)
            # a refused hello also says what the daemon runs (its python, shardrt, backend), so the
            # coordinator can say why they disagree; every other refusal is just the error
            extra = set(reply) - {"id", "ok", "error"}
            assert not extra if request_op(request) != "hello" else "version" not in extra and "shardrt" in extra, reply
            assert set(reply["error"]) == {"code", "message"}, reply
            expected_id = request.get("id") if isinstance(request, dict) else -1
            assert reply["id"] == (expected_id if type(expected_id) is int else -1), (request, reply)
            assert reply["error"]["code"] == code, (request, reply)
            assert all(n in reply["error"]["message"] for n in needles), (request, reply)
            assert daemon.alive()
        # an input reference's offset is honoured: a second tensor packed after the first, same sequence
        daemon.segment.write(SharedSegment.IN, 1002, X48 * 3, daemon.segment.write(SharedSegment.IN, 1002, X48))
        reply = raw.request({**forward(1001), "input": ref((4, 8), shm=1002, offset=packed_size(X48))})
        assert torch.equal(daemon.segment.read(SharedSegment.OUT, 1001, reply["output"]["offset"]), X48 * 3)
        # a batched forward of the echo round-trips too, one row per sequence
        daemon.segment.write(SharedSegment.IN, GOOD_SEQ, X48)
        reply = raw.request(batch(1010))
        assert reply == {"id": 1010, "ok": True, "output": ref((4, 8), shm=1010, offset=0)}, reply
        assert torch.equal(daemon.segment.read(SharedSegment.OUT, 1010), X48)
        # echo mode keeps KV snapshot slots of an empty cache, as a stage would
        assert raw.request({"op": "kv_snapshot", "id": 1003, "slot": MAX_KV_SLOTS - 1}) == \
            {"id": 1003, "ok": True, "length": 0}
        assert raw.request({"op": "kv_restore", "id": 1004, "slot": MAX_KV_SLOTS - 1})["length"] == 0
        assert raw.request({"op": "kv_free", "id": 1005, "slot": MAX_KV_SLOTS - 1}) == \
            {"id": 1005, "ok": True, "length": None}
        assert raw.request({"op": "kv_free", "id": 1006, "slot": MAX_KV_SLOTS - 1})["error"]["code"] == "stage_error"
    finally:
        raw.close()

    # the daemon kept its state and still answers the coordinator
    assert torch.equal(stage.forward(x + 1, 260), x + 1)
    assert stage.stats()["forwards"] == 6  # 2 + the two good raw forwards + the batch + this one
    assert stage.ping()["pid"] == daemon.pid

    # its heartbeat moves
    first = daemon.segment.heartbeat()
    for _ in range(100_000):
        if daemon.segment.heartbeat() != first:
            break
        stage.ping()
    assert daemon.segment.heartbeat() > first

    # an orderly shutdown: ok reply, then exit status 0
    reply, _ = stage.request({"op": "shutdown"}, timeout=TIMEOUTS.stop, heartbeat=False)
    assert reply["ok"]
    assert daemon.process.wait(timeout=TIMEOUTS.stop) == 0


@pytest.mark.parametrize("spin_us", [0, 200_000])
def test_requests_and_replies_ring_the_doorbell(spin_us):
    """With both sides spinning, single-frame messages go through the mailboxes both ways, and
    payload frames still go over ZeroMQ in between; with no spin, everything goes over ZeroMQ."""
    runtime_dir = make_runtime_dir()
    context = zmq.Context()
    daemon = DaemonProcess(label="echo", backend="cpu", python=None, child_env={"SHARDRT_SPIN_US": str(spin_us)},
                           runtime_dir=runtime_dir, index=4, shared_bytes=1 << 16, model=None, identity=IDENTITY,
                           shards=(), max_ctx=0)
    stage = None
    try:
        stage = RemoteStage(daemon, context, Timeouts(ready=60, request=15, heartbeat=5, stop=5, spin=spin_us / 1e6),
                            IDENTITY, span=None)
        segment = daemon.segment
        for pos in range(20):
            x = torch.randn(4, 8)
            assert torch.equal(stage.forward(x, pos * 4), x)
            rid = segment.counter("request")
            # both ways through the mailboxes when spinning (the hello, request 1, always goes over the socket)
            assert segment.counter("taken") == rid == segment.counter("reply") == (pos + 2 if spin_us else 0)
        big = torch.randn(64, 1024)  # too large for a slot: payload frames, so ZeroMQ both ways
        assert torch.equal(stage.forward(big, 80), big)
        assert segment.counter("taken") == rid
        assert stage.ping()["pid"] == daemon.pid
        assert segment.counter("reply") == segment.counter("request") == (rid + 2 if spin_us else 0)
        assert segment.waiting("coordinator") == (spin_us == 0)  # with no spin it is flagged asleep for good
    finally:
        if stage is not None:
            stage.close()
        daemon.stop(TIMEOUTS)
        context.destroy(linger=0)
        remove_runtime_dir(runtime_dir)
    assert daemon.process.poll() is not None and not daemon.segment.path.exists()


def test_daemon_exits_and_cleans_up_when_its_coordinator_goes():
    runtime_dir = make_runtime_dir()
    daemon = start_echo(runtime_dir, index=2, shared_bytes=1 << 16)
    try:
        with zmq.Context() as context:
            stage = RemoteStage(daemon, context, TIMEOUTS, IDENTITY, span=None)
            stage.close()
        socket_path = daemon.endpoint.removeprefix("ipc://")
        assert os.path.exists(socket_path) and daemon.segment.path.exists()
        # EOF on the death pipe is what a daemon sees when its coordinator dies
        os.close(daemon._death_fd)
        daemon._death_fd = -1
        assert daemon.process.wait(timeout=TIMEOUTS.stop) == 0
        assert not daemon.segment.path.exists() and not os.path.exists(socket_path)
    finally:
        daemon.stop(TIMEOUTS)
        remove_runtime_dir(runtime_dir)
    assert not runtime_dir.exists()


def test_wrong_identity_fails_the_handshake():
    runtime_dir = make_runtime_dir()
    context = zmq.Context()
    daemon = start_echo(runtime_dir, index=3, shared_bytes=1 << 16)
    try:
        with pytest.raises(IpcError, match=r"echo: hello refused \(model_mismatch\)"):
            RemoteStage(daemon, context, TIMEOUTS, {"file": "other.gguf"}, span=None)
    finally:
        daemon.stop(TIMEOUTS)
        context.destroy(linger=0)
        remove_runtime_dir(runtime_dir)
    assert daemon.process.poll() is not None and not daemon.segment.path.exists()


# -- real daemons holding layers of the demo model ---------------------------------------

MODEL_CTX = 64


@pytest.fixture(scope="module")
def model(demo_model):
    """Daemons for layers [20,30) (with the head) and [10,20) of the demo model, and an in-process
    Stage of [20,30) to compare with. Tests share them, so each starts with a reset."""
    with GGUFFile(demo_model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
    identity = launch.model_identity(demo_model, cfg)
    spans = {1: (20, 30), 2: (10, 20)}
    runtime_dir = make_runtime_dir()
    context = zmq.Context()
    daemons, stages = [], []
    try:
        for index, (start, stop) in spans.items():  # all exec'd first, so they load side by side
            daemons.append(DaemonProcess(
                label=f"model [{start},{stop})", backend="cpu", python=None, child_env={}, runtime_dir=runtime_dir,
                index=index, shared_bytes=launch.auto_shared_bytes(cfg), model=str(demo_model), identity=identity,
                shards=(ShardSpec("cpu:1", 1, start, stop),), max_ctx=MODEL_CTX))
        for daemon, (start, stop) in zip(daemons, spans.values()):
            stages.append(RemoteStage(daemon, context, TIMEOUTS, identity, LayerSpan.of(start, stop, cfg.n_layers),
                                      cfg, MODEL_CTX))
        local = Stage(demo_model, 20, 30, max_ctx=MODEL_CTX)
        yield SimpleNamespace(cfg=cfg, head=stages[0], nohead=stages[1], local=local, context=context)
        for daemon in daemons:
            assert daemon.alive(), daemon.exit_reason()
    finally:
        stop_all(stages, daemons, context, runtime_dir)
    assert all(d.process.poll() is not None and not d.segment.path.exists() for d in daemons)


def stop_all(stages: list, daemons: list, context, runtime_dir, timeouts: Timeouts = TIMEOUTS) -> None:
    """Close the stages' sockets, stop the daemons, and remove the context and runtime directory."""
    for stage in stages:
        stage.close()
    for daemon in daemons:
        daemon.stop(timeouts)
    context.destroy(linger=0)
    remove_runtime_dir(runtime_dir)


def fresh(model, seed: int):
    """Both the daemon with the head and the in-process stage emptied, and a seeded generator."""
    model.head.reset()
    model.local.reset()
    return torch.Generator().manual_seed(seed)


def same_captures(got, want, layers, start, count):
    assert [c.layer for c in got] == layers and [c.layer for c in want] == layers
    for g, w in zip(got, want):
        assert g.start == start and g.count == count and g.data.shape == w.data.shape == (count, w.data.shape[1])
        assert torch.allclose(g.data, w.data, atol=1e-5, rtol=0), (g.layer, (g.data - w.data).abs().max())


def test_model_daemon_captures_match_the_in_process_stage(model):
    head, local, dim = model.head, model.local, model.cfg.dim
    gen = fresh(model, 1)
    x = torch.randn(5, dim, generator=gen)
    logits, caps = head.run(x, 0, capture=(22, 27))
    want_logits, want = local.run(x, 0, capture=(22, 27))
    same_captures(caps, want, [22, 27], 0, 5)
    assert logits.shape == (1, model.cfg.vocab_size) and torch.allclose(logits, want_logits, atol=1e-4, rtol=0)
    # the next forward's slices start at its base_pos; order, repeats and layers held elsewhere do not matter
    y = torch.randn(3, dim, generator=gen)
    _, caps = head.run(y, 5, capture=(27, 3, 22, 27))
    _, want = local.run(y, 5, capture=(22, 27))
    same_captures(caps, want, [22, 27], 5, 3)
    assert head.stats()["length"] == 8

    # on the wire: the output, then each slice, back to back in the OUT slot at 64-byte aligned offsets
    daemon, raw = head.daemon, RawClient(model.context, head.daemon.endpoint)
    try:
        z = torch.randn(2, dim, generator=gen)
        daemon.segment.write(SharedSegment.IN, 500, z)
        reply = raw.request({"op": "forward", "id": 500, "base_pos": 8, "n": 2, "want": "logits",
                             "input": ref((2, dim), shm=500), "capture": [27, 22]})
        _, want = local.run(z, 8, capture=(22, 27))
    finally:
        raw.close()
    assert reply["output"] == ref((1, model.cfg.vocab_size), shm=500, offset=0), reply
    layout, offset = [], packed_size(torch.zeros(1, model.cfg.vocab_size))
    for layer in (22, 27):
        layout.append({"layer": layer, "start": 8, **ref((2, dim), shm=500, offset=offset)})
        offset += packed_size(z)
    assert reply["captures"] == layout and all(c["offset"] % ALIGN == 0 for c in layout)
    for entry, w in zip(layout, want):
        assert torch.allclose(daemon.segment.read(SharedSegment.OUT, 500, entry["offset"]), w.data, atol=1e-5, rtol=0)


def test_model_daemon_sends_many_large_captures_as_frames(model):
    """All logits and every layer's slice: more than the OUT slot holds, and more than 7 payload frames."""
    head, local, dim = model.head, model.local, model.cfg.dim
    gen = fresh(model, 2)
    x = torch.randn(8, dim, generator=gen)
    everything = tuple(range(20, 30))
    logits = torch.zeros(8, model.cfg.vocab_size)
    assert not head.daemon.segment.fits(logits, *[x] * len(everything))
    got, caps = head.run(x, 0, all_logits=True, capture=everything)
    want_logits, want = local.run(x, 0, all_logits=True, capture=everything)
    same_captures(caps, want, list(everything), 0, 8)
    assert got.shape == logits.shape and torch.allclose(got, want_logits, atol=1e-4, rtol=0)
    # argmax replies carry the captures too, but no output
    y = torch.randn(2, dim, generator=gen)
    tokens, caps = head.run_argmax(y, 8, all_logits=True, capture=(25,))
    want_logits, want = local.run(y, 8, all_logits=True, capture=(25,))
    assert tokens == want_logits.argmax(-1).tolist() and len(tokens) == 2
    same_captures(caps, want, [25], 8, 2)
    raw = RawClient(model.context, head.daemon.endpoint)
    try:
        head.daemon.segment.write(SharedSegment.IN, 600, y)
        reply = raw.request({"op": "forward", "id": 600, "base_pos": 10, "n": 2, "want": "argmax",
                             "input": ref((2, dim), shm=600), "capture": [29]})
    finally:
        raw.close()
    assert set(reply) == {"id", "ok", "tokens", "captures"} and reply["captures"][0]["offset"] == 0, reply


def test_model_daemon_early_exit_leaves_the_cache_length(model):
    head, local, dim = model.head, model.local, model.cfg.dim
    gen = fresh(model, 3)
    x, y = torch.randn(5, dim, generator=gen), torch.randn(3, dim, generator=gen)
    head.run(x, 0)
    local.run(x, 0)
    hidden, caps = head.run(y, 5, stop_after=24, capture=(22, 27))  # 27 is past the exit: not run, not captured
    want_hidden, want = local.run(y, 5, stop_after=24, capture=(22, 27))
    assert hidden.shape == (3, dim) and torch.allclose(hidden, want_hidden, atol=1e-5, rtol=0)
    same_captures(caps, want, [22], 5, 3)
    assert head.length == 5 and head.stats()["length"] == 5
    # a full forward at the same positions overwrites the partial KV
    logits, _ = head.run(y, 5)
    assert torch.allclose(logits, local.run(y, 5)[0], atol=1e-4, rtol=0) and head.stats()["length"] == 8


@pytest.mark.parametrize("n", [2, 8])  # 8 rows of logits do not fit the OUT slot: a frame
def test_model_daemon_projects_like_the_in_process_stage(model, n):
    head, local = model.head, model.local
    gen = fresh(model, 4)
    hidden = torch.randn(n, model.cfg.dim, generator=gen)
    logits, want = head.project(hidden), local.project(hidden)
    assert logits.shape == (n, model.cfg.vocab_size) and torch.allclose(logits, want, atol=1e-5, rtol=0)
    assert head.project_argmax(hidden) == want.argmax(-1).tolist()
    assert head.stats()["length"] == 0  # project leaves the KV cache alone


def test_model_daemon_kv_snapshot_restore_round_trip(model):
    head, dim = model.head, model.cfg.dim
    gen = fresh(model, 5)
    prompt, step, other = (torch.randn(k, dim, generator=gen) for k in (6, 2, 4))
    head.run(prompt, 0)
    assert head.kv_snapshot(3) == 6 and head.kv_snapshot(MAX_KV_SLOTS - 1) == 6
    before, _ = head.run(step, 6, all_logits=True)
    head.run(other, 6)  # the cache moves on past the snapshot
    assert head.length == 10
    assert head.kv_restore(3) == 6 and head.length == 6 and head.stats()["length"] == 6
    after, _ = head.run(step, 6, all_logits=True)
    assert torch.equal(after, before)
    head.kv_free(3)
    with pytest.raises(IpcError, match=r"kv_restore refused \(stage_error\): kv_restore: slot 3 holds no snapshot"):
        head.kv_restore(3)
    with pytest.raises(IpcError, match=r"kv_snapshot refused \(bad_request\): kv_snapshot.slot: 4096"):
        head.kv_snapshot(MAX_KV_SLOTS)
    assert head.length == 8 and head.stats()["length"] == 8  # the refused restore left the cache as it was
    head.kv_free(MAX_KV_SLOTS - 1)


def refusals(raw, table, payloads):
    for request, code, needles in table:
        reply = raw.request(request, payloads.get(request["id"], []))
        assert reply["ok"] is False and reply["id"] == request["id"], (request, reply)
        assert reply["error"]["code"] == code, (request, reply)
        assert all(n in reply["error"]["message"] for n in needles), (request, reply)


def test_model_daemons_refuse_bad_v2_requests_and_keep_serving(model):
    head, nohead, local, dim = model.head, model.nohead, model.local, model.cfg.dim
    gen = fresh(model, 6)
    nohead.reset()
    x, y = torch.randn(4, dim, generator=gen), torch.randn(2, dim, generator=gen)
    head.run(x, 0)
    local.run(x, 0)
    nohead.run(x, 0)
    act = ref((4, dim), shm=GOOD_SEQ)

    def fwd(rid, **fields):
        return {"op": "forward", "id": rid, "base_pos": 4, "n": 4, "want": "logits", "input": act, **fields}

    def project(rid, **fields):
        return {"op": "project", "id": rid, "n": 4, "want": "logits", "input": act, **fields}

    head_table = [
        (fwd(1, stop_after=5), "bad_request", ["forward.stop_after:", "layer 5", "not held"]),
        (fwd(2, stop_after=19), "bad_request", ["forward.stop_after:", "layer 19", "not held"]),
        (fwd(3, stop_after=30), "bad_request", ["forward.stop_after:", "layer 30", "not held"]),
        (fwd(4, stop_after=25, want="argmax"), "bad_request", ["forward.want:", "argmax", "stop_after"]),
        (fwd(5, capture=23), "bad_request", ["forward.capture:", "23"]),
        (fwd(6, capture=[23] * (MAX_CAPTURE_LAYERS + 1)), "bad_request", ["forward.capture:", "at most"]),
        (fwd(7, capture=[23, -23]), "bad_request", ["forward.capture:", "-23"]),
        (fwd(8, capture=[False, 23]), "bad_request", ["forward.capture:", "False"]),
        (project(9, input=ref((4, dim - 1), frame=1)), "bad_request", ["project.input:", f"[4, {dim}]", f"[4, {dim - 1}]"]),
        (project(10, n=3), "bad_request", ["project.input:", f"expected [3, {dim}]", f"got [4, {dim}]"]),
        (project(11, n=1, input=ref((dim,), frame=1)), "bad_request", ["project.input:", f"[{dim}]"]),
        (project(12, want="activation"), "bad_request", ["project.want:", "'activation'"]),
        (project(13, all_logits=True), "bad_request", ["project: unknown field 'all_logits'"]),
        ({"op": "kv_restore", "id": 14, "slot": 9}, "stage_error", ["kv_restore: slot 9", "no snapshot"]),
        ({"op": "kv_free", "id": 15, "slot": 9}, "stage_error", ["kv_free: slot 9", "no snapshot"]),
        ({"op": "kv_free", "id": 16, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_free.slot:", "4096", "0..4095"]),
        ({"op": "kv_restore", "id": 17, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_restore.slot:", "4096"]),
        ({"op": "kv_snapshot", "id": 18, "slot": MAX_KV_SLOTS}, "bad_request", ["kv_snapshot.slot:", "4096"]),
        (fwd(19, input=ref((4, dim), shm=GOOD_SEQ, offset=100)), "stage_error", ["offset 100"]),
    ]
    nohead_table = [
        (project(21), "bad_request", ["project:", "does not hold the head"]),
        (fwd(22, want="argmax"), "bad_request", ["forward.want:", "argmax needs the stage with the head"]),
        (fwd(23, stop_after=25), "bad_request", ["forward.stop_after:", "layer 25", "not held"]),
        (fwd(24, stop_after=20), "bad_request", ["forward.stop_after:", "layer 20", "not held"]),
    ]
    payloads = {9: [torch.zeros(4, dim - 1)], 11: [torch.zeros(dim)]}
    for stage, table in ((head, head_table), (nohead, nohead_table)):
        raw = RawClient(model.context, stage.daemon.endpoint)
        try:
            stage.daemon.segment.write(SharedSegment.IN, GOOD_SEQ, torch.randn(4, dim, generator=gen))
            refusals(raw, table, payloads)
        finally:
            raw.close()
        assert stage.daemon.alive() and stage.stats()["length"] == 4  # nothing ran, nothing was cached
    with pytest.raises(IpcError, match=r"project refused \(bad_request\): project: this daemon does not hold the head"):
        nohead.project(y)

    # both still serve, from where they were
    logits, caps = head.run(y, 4, capture=(22,))
    want_logits, want = local.run(y, 4, capture=(22,))
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=0)
    same_captures(caps, want, [22], 4, 2)
    hidden, _ = nohead.run(y, 4)
    assert hidden.shape == (2, dim) and nohead.stats()["length"] == 6
