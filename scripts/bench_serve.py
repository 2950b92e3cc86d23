"""Load on `shardrt serve`: streamed chat requests from concurrent clients over loopback, at
one or more concurrency levels in one run. Prints one JSON line with, per level: aggregate
tokens/s, requests/s, time to first token p50/p99 (queue wait included, as a client sees it),
inter-token latency p50/p99, decode tokens/s per request, errors; and each level's aggregate
tokens/s over the first level's.

Starts its own server (demo model, `--target-gpus cpu:0,cpu:1` unless other serve flags follow
`--`) and stops it with SIGTERM at the end, or measures a running one with `--url` (any
OpenAI-compatible server). With `--llama-server PATH`, llama.cpp's server then runs on the same
GGUF file (every layer on the GPU, flash attention, `--llama-slots` parallel slots) under the same
load, and the line carries both reports and shardrt's throughput over llama.cpp's per level.

    python scripts/bench_serve.py [--concurrency 1,4,16] [--requests N] [--max-tokens 32] [--url URL]
    python scripts/bench_serve.py --burst --concurrency 64 --shared-prefix 1000 -- --max-seqs 64   # all at once, one system prompt
    python scripts/bench_serve.py -- --target-gpus cpu:0 --draft ngram
    python scripts/bench_serve.py --concurrency 1,16 --llama-server PATH/llama-server -- model.gguf --target-gpus cuda:0 --max-seqs 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

READY_S = 600  # a 70B file takes minutes to load
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


SYSTEM_SENTENCE = "You answer questions about a library's catalogue briefly and only from what you are told. "


def system_prompt(tokens: int) -> str:
    """A system prompt of roughly `tokens` tokens (the sentence is ~16), the same for every request."""
    return SYSTEM_SENTENCE * max(1, tokens // 16)


def one_request(host: str, port: int, model: str, question: str, max_tokens: int, system: str = "") -> dict:
    """A streamed chat request: time to the first content chunk, then tokens and time to the end."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens,
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


def run_level(host: str, port: int, model: str, concurrency: int, requests: int, max_tokens: int,
              system: str = "") -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(host, port, model, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})",
                                                      max_tokens, system), range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    refused = sum(e.startswith("HTTP 503") for e in errors)
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "concurrency": concurrency, "requests": requests, "errors": len(errors), "refused_503": refused,
        "first_error": errors[0] if errors else None, "wall_s": round(wall, 2),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "itl_p50_ms": round(1e3 * percentile(gaps, 0.5), 1), "itl_p99_ms": round(1e3 * percentile(gaps, 0.99), 1),
        "decode_tokens_per_s": round(percentile([r["decode_rate"] for r in ok], 0.5), 2),
    }


def measure(host: str, port: int, proc: subprocess.Popen | None, levels: list[int], requests: int | None,
            max_tokens: int, burst: bool = False, system: str = "") -> list[dict]:
    """Every level against the server at host:port (started as `proc`, which is stopped after);
    `burst`: each level's requests all at once. A shardrt server's prefix-sharing counters are
    reported per level."""
    try:
        wait_ready(host, port, proc)
        model = json.loads(get(host, port, "/v1/models")[1])["data"][0]["id"]
        one_request(host, port, model, "Hello", 2)  # warm-up, not counted
        report = []
        for c in levels:
            before = shared_counters(host, port)
            n = c if burst else requests or max(4, 2 * c)
            level = run_level(host, port, model, n if burst else c, n, max_tokens, system)
            after = shared_counters(host, port)
            if before and after:
                level.update({k: after[k] - before[k] for k in after})
            report.append(level)
        return report
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


SHARED_METRICS = ("shardrt_prefix_shared_requests_total", "shardrt_prefix_shared_tokens_total",
                  "shardrt_prefix_cache_reused_tokens_total")


def shared_counters(host: str, port: int) -> dict:
    """shardrt's prefix-reuse counters from /metrics ({} for a server without them)."""
    try:
        status, text = get(host, port, "/metrics")
    except OSError:
        return {}
    found = {}
    for line in text.decode(errors="replace").splitlines() if status == 200 else ():
        name, _, value = line.partition(" ")
        if name in SHARED_METRICS:
            found[name.removeprefix("shardrt_").removesuffix("_total")] = float(value)
    return found


def model_of(serve_args: list[str]) -> str:
    """The GGUF that `shardrt serve` runs with these flags (positional, --model or the YAML's
    `model`; the demo model when none), read by shardrt's own parser."""
    from shardrt.cli import _resolve, build_parser

    return str(_resolve(build_parser().parse_args(["serve", *serve_args]))[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated (default 1,4,16)")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x the level, at least 4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("--burst", action="store_true", help="each level: that many requests, all at once")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="every request carries the same system prompt of about this many tokens")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server: also measure it on the same GGUF")
    parser.add_argument("--llama-slots", type=int, help="its parallel slots, -np (default: the largest level)")
    parser.add_argument("--llama-ctx", type=int, default=2048, help="context per slot (default 2048)")
    parser.add_argument("--llama-model", help="the GGUF for llama-server (default: the one the serve flags name)")
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `shardrt serve`")
    args = parser.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: {args.concurrency!r} is not a comma-separated list of numbers")
    if not levels or not all(1 <= c <= 1000 for c in levels):
        parser.error("--concurrency: every level must be in 1..1000")
    if not 0 <= args.shared_prefix <= 100_000:
        parser.error(f"--shared-prefix: {args.shared_prefix} is outside 0..100000 tokens")
    if args.requests is not None and not 1 <= args.requests <= 10_000:
        parser.error("--requests: must be in 1..10000")

    peer_model = None
    if args.llama_server:
        if args.url:
            parser.error("--llama-server: measures a server it starts beside its own shardrt serve, not --url")
        peer_model = args.llama_model or model_of(args.serve_args)
    proc = None
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        flags = args.serve_args or DEFAULT_SERVE
        proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", "serve", "--port", str(port), *flags],
                                stdin=subprocess.DEVNULL)
    system = system_prompt(args.shared_prefix) if args.shared_prefix else ""
    report = measure(host, port, proc, levels, args.requests, args.max_tokens, args.burst, system)

    base = report[0]["throughput_tokens_per_s"]
    out = {
        "max_tokens": args.max_tokens, "burst": args.burst, "shared_prefix_tokens": args.shared_prefix, "levels": report,
        "throughput_vs_first": {str(r["concurrency"]): round(r["throughput_tokens_per_s"] / base, 2) if base else None
                                for r in report},
        "errors": sum(r["errors"] for r in report),
        "server": args.url or " ".join(args.serve_args or DEFAULT_SERVE),
    }
    if args.llama_server:
        slots = args.llama_slots or max(levels)
        peer_port = free_port()
        command = [args.llama_server, "-m", peer_model, "-ngl", "99", "-fa", "on", "-np", str(slots),
                   "-c", str(slots * args.llama_ctx), "--host", "127.0.0.1", "--port", str(peer_port)]
        log = Path(tempfile.gettempdir()) / f"llama-server-{peer_port}.log"
        with open(log, "w") as sink:
            peer = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        out["llama_server"] = {"command": " ".join(command[:1] + command[3:-4]), "log": str(log)}
        try:
            peer_report = measure("127.0.0.1", peer_port, peer, levels, args.requests, args.max_tokens, args.burst, system)
        except SystemExit as exc:  # it did not come up: keep shardrt's numbers, say why
            out["llama_server"]["error"] = str(exc)
        else:
            out["llama_server"]["levels"] = peer_report
            out["over_llama_server"] = {
                str(a["concurrency"]): round(a["throughput_tokens_per_s"] / b["throughput_tokens_per_s"], 2)
                if b["throughput_tokens_per_s"] else None for a, b in zip(report, peer_report)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
