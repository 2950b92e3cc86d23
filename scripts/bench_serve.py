"""Load on `shardrt serve`: a bounded number of streamed chat requests from a few concurrent
clients over loopback. Prints one JSON line: requests/s, time to first token p50/p99 (queue
wait included, as a client sees it), decode tokens/s per request, total tokens/s, errors.

Starts its own server (demo model, `--target-gpus cpu:0,cpu:1` unless other serve flags follow
`--`) and stops it with SIGTERM at the end, or measures a running one with `--url`.

    python scripts/bench_serve.py [--requests 24] [--concurrency 4] [--max-tokens 32] [--url URL]
    python scripts/bench_serve.py -- --target-gpus cpu:0 --draft ngram
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

READY_S = 180
REQUEST_S = 300
DEFAULT_SERVE = ["--target-gpus", "cpu:0,cpu:1", "--max-ctx", "1024"]
QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Who wrote Romeo and Juliet?", "What is two plus two?",
    "Why is the sky blue?", "Name a large animal that lives in the sea.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(host: str, port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(host: str, port: int, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"bench_serve: the server exited with {proc.returncode}")
        try:
            if get(host, port, "/health")[0] == 200:
                return
        except OSError:
            pass
        threading.Event().wait(0.2)
    sys.exit(f"bench_serve: the server was not ready within {READY_S}s")


def one_request(host: str, port: int, model: str, question: str, max_tokens: int) -> dict:
    """A streamed chat request: time to the first content chunk, then tokens and time to the end."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    first = None
    tokens = 0
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_S)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    end = time.perf_counter()
    if first is None:
        return {"error": "no content"}
    return {"ttft": first - t0, "tokens": tokens, "decode_rate": (tokens - 1) / (end - first) if end > first else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `shardrt serve`")
    args = parser.parse_args()
    if not 1 <= args.concurrency <= args.requests <= 10_000:
        parser.error("need 1 <= --concurrency <= --requests <= 10000")

    proc = None
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        flags = args.serve_args or DEFAULT_SERVE
        proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", "serve", "--port", str(port),
                                 "--max-queue", str(args.concurrency), *flags], stdin=subprocess.DEVNULL)
    try:
        wait_ready(host, port, proc)
        model = json.loads(get(host, port, "/v1/models")[1])["data"][0]["id"]
        one_request(host, port, model, "Hello", 2)  # warm-up, not counted
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: one_request(host, port, model, QUESTIONS[i % len(QUESTIONS)],
                                                          args.max_tokens), range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    print(json.dumps({
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "decode_tokens_per_s": round(percentile([r["decode_rate"] for r in ok], 0.5), 2),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "server": args.url or " ".join(args.serve_args or DEFAULT_SERVE),
    }))


if __name__ == "__main__":
    main()
