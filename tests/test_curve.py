"""CurveZMQ over TCP (shardrt.ipc.curve), with real sockets and a real server process: the
coordinator's keys get through; a peer with no keys, or with keys of its own, is refused at the
handshake and the server goes on serving; only public keys pass between the processes, and each
is checked as it arrives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from shardrt.errors import IpcError
from shardrt.ipc.curve import ClientKeys, KeyPair, public_key, secure_client

# An echo server on a Curve socket that also counts refused handshakes ("stats" answers them).
# It reads the client's public key on stdin and prints its port and its own public key.
SERVER = """
import sys, zmq
from zmq.utils.monitor import recv_monitor_message
from shardrt.ipc.curve import CurveServer, public_key
context = zmq.Context()
curve = CurveServer(context, public_key(sys.stdin.readline().strip(), "client_public"))
sock = curve.secure(context.socket(zmq.ROUTER))
port = sock.bind_to_random_port("tcp://127.0.0.1")
failed = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
monitor = sock.get_monitor_socket(failed)
print(port, curve.public.decode(), flush=True)
refused = 0
poller = zmq.Poller()
poller.register(sock, zmq.POLLIN)
poller.register(monitor, zmq.POLLIN)
while True:
    ready = dict(poller.poll())
    if monitor in ready:
        recv_monitor_message(monitor)
        refused += 1
    if sock in ready:
        peer, body = sock.recv_multipart()
        if body == b"stop":
            sock.send_multipart([peer, body])
            break
        sock.send_multipart([peer, str(refused).encode() if body == b"stats" else body])
curve.close()
"""
WAIT_MS = 10_000  # an admitted request is answered well within this
REFUSED_MS = 1_500  # a refused peer's request is still unanswered after this


@pytest.fixture
def server():
    client = KeyPair.generate()
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(client.public.decode() + "\n")
    proc.stdin.flush()
    port, server_public = proc.stdout.readline().split()
    client_keys = ClientKeys(client, public_key(server_public, "server_public"))
    context = zmq.Context()
    try:
        yield f"tcp://127.0.0.1:{port}", client_keys, context
        ask(context, f"tcp://127.0.0.1:{port}", client_keys, b"stop")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        context.destroy(linger=0)


def ask(context: zmq.Context, endpoint: str, keys: ClientKeys | None, body: bytes, timeout_ms: int = WAIT_MS) -> bytes | None:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        secure_client(sock, keys)
    sock.connect(endpoint)
    try:
        sock.send(body)
        return sock.recv() if sock.poll(timeout_ms) else None
    finally:
        sock.close()


def test_the_coordinators_keys_get_through(server):
    endpoint, keys, context = server
    payload = bytes(range(256)) * 32  # 8 KiB
    assert ask(context, endpoint, keys, payload) == payload


def test_peers_without_the_keys_are_refused_and_the_server_goes_on(server):
    endpoint, keys, context = server
    assert ask(context, endpoint, None, b"plain", REFUSED_MS) is None  # no Curve at all
    stranger = ClientKeys(KeyPair.generate(), keys.server_public)  # knows the server, not admitted
    assert ask(context, endpoint, stranger, b"stranger", REFUSED_MS) is None
    wrong_server = ClientKeys(keys.own, KeyPair.generate().public)  # the right client keys, wrong server
    assert ask(context, endpoint, wrong_server, b"wrong server", REFUSED_MS) is None
    assert ask(context, endpoint, keys, b"still here") == b"still here"
    assert int(ask(context, endpoint, keys, b"stats")) >= 2  # the server saw the handshakes fail


def test_key_pairs_are_new_each_time_and_never_print_a_secret():
    a, b = KeyPair.generate(), KeyPair.generate()
    assert a.public != b.public and a.secret != b.secret
    assert a.secret.decode() not in repr(a) + repr(ClientKeys(a, b.public))


@pytest.mark.parametrize("value", ["short", 7, None, "x" * 39 + "~", "x" * 41, b"x" * 39 + b"\n", b"x" * 40 + b"\n"])
def test_public_keys_are_checked_as_they_arrive(value):
    with pytest.raises(IpcError, match="^server_public: is not a 40-character Z85 CurveZMQ key$"):
        public_key(value, "server_public")
    assert public_key("x" * 40, "server_public") == b"x" * 40
