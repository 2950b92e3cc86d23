"""Round trip of one forward hop through a daemon with no model work (echo mode), through the
shared-memory doorbell (both sides spinning) and through ZeroMQ alone (both sides asleep, as on
a box with few cores), beside a bare ZeroMQ round trip of the same bytes to another process.

Prints one JSON line: p50 and p99 per size. The shardrt hop is the real path: activation into
the daemon's shared memory, a msgpack `forward` in the mailbox (or over ZeroMQ ipc), the daemon
reading, validating and writing it back, the reply, and the coordinator reading the result.

`--transport tcp` adds the same hop through an echo daemon on TCP with CurveZMQ (the transport of
a daemon on another host: every tensor as a frame, encryption, the ZAP check), and a bare round
trip over TCP + Curve beside the bare ipc:// one, with the ratios.

    python scripts/bench_ipc.py [--iters 2000] [--spin-us 20000] [--transport ipc|tcp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import zmq

from shardrt.ipc.curve import ClientKeys, KeyPair, public_key, secure_client
from shardrt.lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from shardrt.remote_stage import RemoteStage

SIZES = {"8KiB": 8 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
ECHO_SERVER = """
import sys, zmq
context = zmq.Context()
sock = context.socket(zmq.ROUTER)
if sys.argv[1] == "tcp+curve":  # the client's public key on stdin; prints its port and public key
    from shardrt.ipc.curve import CurveServer, public_key
    curve = CurveServer(context, public_key(sys.stdin.readline().strip(), "client_public"))
    curve.secure(sock)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), curve.public.decode(), flush=True)
else:
    sock.bind(sys.argv[1])
while True:
    frames = sock.recv_multipart(copy=False)
    if frames[1].bytes == b"stop":
        sock.send_multipart(frames, copy=False)
        break
    sock.send_multipart(frames, copy=False)
"""


def percentiles_us(fn, iters: int) -> dict:
    for _ in range(min(100, iters)):  # warm-up
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"p50": round(samples[len(samples) // 2] * 1e6, 1), "p99": round(samples[int(len(samples) * 0.99)] * 1e6, 1)}


def echo_hops(sizes: dict[str, int], iters: int, spin_us: int, transport: str = "ipc") -> dict:
    """p50/p99 µs of a forward hop through an echo daemon, per size, both sides spinning `spin_us`
    (transport "tcp": the daemon on TCP with CurveZMQ, every tensor as a frame, no spinning)."""
    runtime = make_runtime_dir()
    context = zmq.Context()
    daemon = stage = None
    results = {}
    try:
        daemon = DaemonProcess(label="echo daemon", backend="cpu", python=None,
                               child_env={"SHARDRT_SPIN_US": str(spin_us)}, runtime_dir=runtime, index=1,
                               shared_bytes=2 * (max(sizes.values()) + 4096) + (1 << 16), model=None,
                               identity={"file": "echo"}, shards=(), max_ctx=0, transport=transport)
        stage = RemoteStage(daemon, context, Timeouts(spin=spin_us / 1e6), {"file": "echo"}, span=None)
        for name, size in sizes.items():
            activation = torch.randn(size // 4).view(-1, 256)  # exactly `size` bytes of float32
            assert torch.equal(stage.forward(activation, 0), activation)
            results[name] = percentiles_us(lambda: stage.forward(activation, 0), iters)
    finally:
        if stage is not None:
            stage.request({"op": "shutdown"}, timeout=5)
            stage.close()
        if daemon is not None:
            daemon.stop(Timeouts())
        context.destroy(linger=0)
        remove_runtime_dir(runtime)
    return results


def bare_zmq(sizes: dict[str, int], iters: int, transport: str = "ipc") -> dict:
    """p50/p99 µs of a ZeroMQ round trip to an echo process: over ipc://, or TCP with CurveZMQ."""
    runtime = make_runtime_dir()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    if transport == "tcp":
        client = KeyPair.generate()
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, "tcp+curve"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        echo.stdin.write(client.public.decode() + "\n")
        echo.stdin.flush()
        port, server_public = echo.stdout.readline().split()
        secure_client(sock, ClientKeys(client, public_key(server_public, "server_public")))
        endpoint = f"tcp://127.0.0.1:{port}"
    else:
        endpoint = f"ipc://{runtime / 'bare.sock'}"
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint])
    results = {}
    try:
        sock.connect(endpoint)
        for name, size in sizes.items():
            payload = bytes(size)

            def round_trip():
                sock.send(payload, copy=False)
                sock.recv(copy=False)

            results[name] = percentiles_us(round_trip, iters)
        sock.send(b"stop")
        sock.recv()
    finally:
        sock.close()
        echo.kill()
        echo.wait(timeout=5)
        context.destroy(linger=0)
        remove_runtime_dir(runtime)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--spin-us", type=int, default=20_000, help="how long each side spins on the doorbell")
    parser.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                        help="tcp: add the bare round trip over TCP + CurveZMQ beside the ipc:// one")
    args = parser.parse_args()
    trips = {"doorbell": echo_hops(SIZES, args.iters, args.spin_us), "zmq_only": echo_hops(SIZES, args.iters, 0),
             "bare_zmq": bare_zmq(SIZES, args.iters)}
    out = {"bench": "ipc", "transport": "ipc:// + shm", "iters": args.iters, "spin_us": args.spin_us}
    if args.transport == "tcp":
        trips["tcp_curve"] = bare_zmq(SIZES, args.iters, "tcp")
        trips["tcp_curve_daemon"] = echo_hops(SIZES, args.iters, 0, "tcp")
        out["transport"] += ", tcp:// + CurveZMQ"
        ratio = lambda a, b: {name: round(trips[a][name]["p50"] / trips[b][name]["p50"], 2) for name in SIZES}  # noqa: E731
        out["tcp_curve_over_bare_ipc_p50"] = ratio("tcp_curve", "bare_zmq")
        out["tcp_daemon_over_ipc_daemon_p50"] = ratio("tcp_curve_daemon", "zmq_only")  # both asleep on ZeroMQ
        out["tcp_daemon_over_doorbell_p50"] = ratio("tcp_curve_daemon", "doorbell")
    print(json.dumps(out | {"round_trip_us": trips}))


if __name__ == "__main__":
    main()
