"""Median round trip of one forward hop through a daemon with no model work (echo mode),
beside a bare ZeroMQ round trip of the same bytes to another process, in one run.

Prints one JSON line. The shardrt hop is the real path: activation into the daemon's shared
memory, a msgpack `forward` over ZeroMQ ipc, the daemon reading, validating and writing it
back, the reply, and the coordinator reading the result.

    python scripts/bench_ipc.py [--iters 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import zmq

from shardrt.lifecycle import DaemonProcess, Timeouts, make_runtime_dir, remove_runtime_dir
from shardrt.remote_stage import RemoteStage

SIZES = {"8KiB": 8 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
ECHO_SERVER = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    frames = sock.recv_multipart(copy=False)
    if frames[1].bytes == b"stop":
        sock.send_multipart(frames, copy=False)
        break
    sock.send_multipart(frames, copy=False)
"""


def median_us(fn, iters: int) -> float:
    for _ in range(min(100, iters)):  # warm-up
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return round(statistics.median(samples) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    runtime = make_runtime_dir()
    context = zmq.Context()
    daemon = stage = bare = None
    results = {}
    try:
        daemon = DaemonProcess(label="echo daemon", backend="cpu", python=None, child_env={}, runtime_dir=runtime,
                               index=1, shared_bytes=2 * (max(SIZES.values()) + 4096), model=None,
                               identity={"file": "echo"}, shards=(), max_ctx=0)
        stage = RemoteStage(daemon, context, Timeouts(), {"file": "echo"}, span=None)
        endpoint = f"ipc://{runtime / 'bare.sock'}"
        bare = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint])
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(endpoint)

        for name, size in SIZES.items():
            activation = torch.randn(size // 4).view(-1, 256)  # exactly `size` bytes of float32
            assert torch.equal(stage.forward(activation, 0), activation)
            payload = bytes(size)

            def bare_round_trip():
                sock.send(payload, copy=False)
                sock.recv(copy=False)

            results[name] = {"shardrt_hop_us": median_us(lambda: stage.forward(activation, 0), args.iters),
                             "bare_zmq_us": median_us(bare_round_trip, args.iters)}
        sock.send(b"stop")
        sock.recv()
        sock.close()
    finally:
        if stage is not None:
            stage.request({"op": "shutdown"}, timeout=5)
            stage.close()
        if daemon is not None:
            daemon.stop(Timeouts())
        if bare is not None:
            bare.kill()
            bare.wait(timeout=5)
        context.destroy(linger=0)
        remove_runtime_dir(runtime)
    print(json.dumps({"bench": "ipc", "transport": "ipc:// + shm", "iters": args.iters, "median_round_trip": results}))


if __name__ == "__main__":
    main()
