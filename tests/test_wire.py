"""The wire between coordinator and daemon, with real components only: the shared-memory
segment, the msgpack codec, and a real exec'd echo daemon answering good and malformed requests."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
import torch
import zmq

from shardrt.errors import IpcError
from shardrt.ipc.codec import MAX_FRAMES, decode, encode, frame_tensor, tensor_ref
from shardrt.ipc.protocol import MAX_TOKENS_PER_FORWARD, PROTOCOL_VERSION
from shardrt.ipc.shm import CONTROL_SIZE, HEADER, HEADER_SIZE, SHM_DIR, SharedSegment, new_segment_name
from shardrt.lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from shardrt.remote_stage import RemoteStage

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
        assert seg.capacity == (seg.size - CONTROL_SIZE) // 2 - HEADER_SIZE
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
        os.pwrite(fd, HEADER.pack(*header), CONTROL_SIZE + SharedSegment.IN * peer.slot_size)
    finally:
        os.close(fd)
    with pytest.raises(IpcError, match=needle):
        owner.read(SharedSegment.IN, 7)


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


GOOD_SEQ = 1001


X48 = torch.arange(32, dtype=torch.float32).reshape(4, 8)

# (frames or a message, the reply's error code, words its message must hold)
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
        assert reply == {"id": 1000, "ok": True, "output": ref((4, 8), shm=1000)}, reply
        assert torch.equal(daemon.segment.read(SharedSegment.OUT, 1000), X48)

        for request, code, needles in MALFORMED:
            if isinstance(request, dict):
                reply = raw.request(request, PAYLOADS.get(request.get("id"), []))
            else:
                reply = raw.send(request)
            assert reply["ok"] is False, (request, reply)
            assert set(reply) == {"id", "ok", "error"} and set(reply["error"]) == {"code", "message"}, reply
            expected_id = request.get("id") if isinstance(request, dict) else -1
            assert reply["id"] == (expected_id if type(expected_id) is int else -1), (request, reply)
            assert reply["error"]["code"] == code, (request, reply)
            assert all(n in reply["error"]["message"] for n in needles), (request, reply)
            assert daemon.alive()
    finally:
        raw.close()

    # the daemon kept its state and still answers the coordinator
    assert torch.equal(stage.forward(x + 1, 260), x + 1)
    assert stage.stats()["forwards"] == 4
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
