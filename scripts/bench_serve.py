"""Load on `shardrt serve`: streamed chat requests from concurrent clients over loopback, at
one or more concurrency levels in one run. Prints one JSON line with, per level: aggregate
tokens/s, requests/s, time to first token p50/p99 (queue wait included, as a client sees it),
inter-token latency p50/p99, decode tokens/s per request, errors; and each level's aggregate
tokens/s over the first level's.

Starts its own server (demo model, `--target-gpus cpu:0,cpu:1` unless other serve flags follow
`--`) and stops it with SIGTERM at the end, or measures a running one with `--url`.

    python scripts/bench_serve.py [--concurrency 1,4,16] [--requests N] [--max-tokens 32] [--url URL]
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
    arrivals = []  # when each content chunk came
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
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
                first = first or arrivals[-1]
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    end = time.perf_counter()
    if first is None:
        return {"error": "no content"}
    return {"ttft": first - t0, "tokens": tokens, "decode_rate": (tokens - 1) / (end - first) if end > first else 0.0,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] if ordered else 0.0


def run_level(host: str, port: int, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(host, port, model, QUESTIONS[i % len(QUESTIONS)], max_tokens),
                                range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "concurrency": concurrency, "requests": requests, "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": round(wall, 2),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "itl_p50_ms": round(1e3 * percentile(gaps, 0.5), 1), "itl_p99_ms": round(1e3 * percentile(gaps, 0.99), 1),
        "decode_tokens_per_s": round(percentile([r["decode_rate"] for r in ok], 0.5), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated (default 1,4,16)")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x the level, at least 4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `shardrt serve`")
    args = parser.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: {args.concurrency!r} is not a comma-separated list of numbers")
    if not levels or not all(1 <= c <= 1000 for c in levels):
        parser.error("--concurrency: every level must be in 1..1000")
    if args.requests is not None and not 1 <= args.requests <= 10_000:
        parser.error("--requests: must be in 1..10000")

    proc = None
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        flags = args.serve_args or DEFAULT_SERVE
        proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", "serve", "--port", str(port),
                                 "--max-queue", str(max(levels)), *flags], stdin=subprocess.DEVNULL)
    try:
        wait_ready(host, port, proc)
        model = json.loads(get(host, port, "/v1/models")[1])["data"][0]["id"]
        one_request(host, port, model, "Hello", 2)  # warm-up, not counted
        report = [run_level(host, port, model, c, args.requests or max(4, 2 * c), args.max_tokens) for c in levels]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    base = report[0]["throughput_tokens_per_s"]
    print(json.dumps({
        "max_tokens": args.max_tokens, "levels": report,
        "throughput_vs_first": {str(r["concurrency"]): round(r["throughput_tokens_per_s"] / base, 2) if base else None
                                for r in report},
        "errors": sum(r["errors"] for r in report),
        "server": args.url or " ".join(args.serve_args or DEFAULT_SERVE),
    }))


if __name__ == "__main__":
    main()
