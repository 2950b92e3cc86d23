"""The HTTP layer under load: 512 concurrent streaming requests on loopback against a real
`shardrt serve` (demo model, one CPU stage, 32 slots), with slowloris clients that trickle their
headers or their body and oversized bodies mixed in. Every stream ends with [DONE] and its
tokens, the slow clients are cut off at the request deadline, the oversized get 400, and the
server serves on."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.test_server import serving

STREAMS = 512
SLOW = 16
DEADLINE_S = 3.0


def stream(port: int, model: str, i: int) -> tuple[int, str | None, bool]:
    """(status, the finish reason its stream gave, whether [DONE] came) of one streamed completion."""
    body = json.dumps({"model": model, "prompt": f"Line {i}:", "max_tokens": 2, "temperature": 0, "stream": True,
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, None, False
        finish, done = None, False
        for line in resp:
            if line.strip() == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                for choice in json.loads(line[6:]).get("choices", []):
                    finish = choice.get("finish_reason") or finish
        return 200, finish, done
    finally:
        conn.close()


def slowloris(port: int, body: bool, closed: list, stop: threading.Event) -> None:
    """Trickle a request one byte at a time (headers, or after them the body), as a slowloris
    client does; note how long the server took to close the connection."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    payload = head + b"Content-Length: 100\r\n\r\n" + b"{" * 100 if body else head + b"X-Slow: " + b"a" * 1000
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sent = payload.index(b"\r\n\r\n") + 4 if body else 0
        sock.sendall(payload[:sent])
        try:
            for byte in payload[sent:]:
                if stop.wait(0.2):  # the trickle: one byte every 0.2 s
                    return
                sock.sendall(bytes([byte]))
        except OSError:  # reset by the server
            pass
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
    closed.append(time.monotonic() - start)


def test_512_streams_with_slow_and_oversized_clients_mixed_in(demo_model, tmp_path):
    with serving(demo_model, tmp_path / "stderr.txt", "--target-gpus", "cpu:0", "--max-seqs", "32",
                 "--max-queue", str(STREAMS), env={"SHARDRT_REQUEST_DEADLINE": str(DEADLINE_S)}) as server:
        closed, stop = [], threading.Event()
        slow = [threading.Thread(target=slowloris, args=(server.port, i % 2 == 1, closed, stop)) for i in range(SLOW)]
        for thread in slow:
            thread.start()
        big = [server.request("POST", "/v1/completions", b"{" * 64, {"Content-Length": str(2 << 20)})
               for _ in range(8)]
        with ThreadPoolExecutor(STREAMS) as pool:
            results = list(pool.map(lambda i: stream(server.port, server.model, i), range(STREAMS)))
        stop.set()
        for thread in slow:
            thread.join(30)
        assert results == [(200, "length", True)] * STREAMS
        assert all(status == 400 and body["error"]["code"] == "body_too_large" for status, _, body in big)
        assert len(closed) == SLOW and max(closed) < DEADLINE_S + 5, closed  # cut off at the deadline
        assert server.health()[0] == 200
        assert server.metric("shardrt_queue_rejected_total") == 0
        assert "Traceback" not in server.stderr()
