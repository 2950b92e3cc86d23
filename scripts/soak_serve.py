"""A bounded soak of `shardrt serve`: several clients for M minutes on a split placement, streamed
and plain requests, cancellations and bad requests mixed in, one daemon killed (SIGKILL) midway.
Prints one JSON line: requests and errors by kind, restarts, latency p50/p99, the RSS of every
process at start (after warm-up), middle (before the kill), after the restart and at the end,
and what SIGTERM left behind (processes, /dev/shm segments, sockets and runtime directories).

    python scripts/soak_serve.py --minutes 20 [--clients 4] [-- serve flags]

Errors the kill explains (the requests in flight when it landed, and 503s while the stages
restart, which clients retry after Retry-After) are counted apart from every other error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import QUESTIONS, free_port, get, percentile, wait_ready  # noqa: E402

DEFAULT_SERVE = ["--target-gpus", "cpu:0,cpu:1", "--max-ctx", "512"]
KINDS = ("stream", "plain", "cancel", "bad")
REQUEST_S = 120
KILL_GRACE_S = 2.0  # failures from the kill until this long after the stages serve again are the kill's
BAD_BODIES = [b"{not json", json.dumps({"model": "m", "prompt": "x", "max_tokens": -3}).encode(),
              json.dumps({"model": "m", "messages": "hello"}).encode(), json.dumps({"prompt": ["a", 7]}).encode()]


class Soak:
    def __init__(self, host: str, port: int, model: str, deadline: float):
        self.host, self.port, self.model, self.deadline = host, port, model, deadline
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {k: [] for k in KINDS}
        self.ok = {k: 0 for k in KINDS}
        self.errors: dict[str, int] = {}
        self.kill_errors = 0
        self.retried_503 = 0
        self.killed_at: float | None = None
        self.restarted_at: float | None = None

    def count_error(self, kind: str, what: str, started: float) -> None:
        now = time.monotonic()
        with self.lock:
            near_kill = self.killed_at is not None and self.killed_at <= now and (
                self.restarted_at is None or now <= self.restarted_at + KILL_GRACE_S)
            if near_kill:
                self.kill_errors += 1
            else:
                key = f"{kind}: {what}"
                self.errors[key] = self.errors.get(key, 0) + 1

    def request(self, kind: str, i: int) -> None:
        question = QUESTIONS[i % len(QUESTIONS)]
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_S)
        try:
            if kind == "bad":
                conn.request("POST", "/v1/completions", BAD_BODIES[i % len(BAD_BODIES)], {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 400 or b'"param"' not in body and b"invalid_request" not in body:
                    return self.count_error(kind, f"HTTP {resp.status}", started)
            else:
                body = {"model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
                        "temperature": 0}
                if kind != "plain":
                    body["stream"] = True
                conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status == 503:  # restarting: come back when told
                    resp.read()
                    with self.lock:
                        self.retried_503 += 1
                    time.sleep(min(5.0, float(resp.getheader("Retry-After", "1"))))
                    return
                if resp.status != 200:
                    return self.count_error(kind, f"HTTP {resp.status}", started)
                if kind == "plain":
                    reply = json.loads(resp.read())
                    if not reply["choices"][0]["message"]["content"]:
                        return self.count_error(kind, "empty", started)
                else:
                    for line in resp:
                        if line.startswith(b"data: {") and b'"error"' in line:
                            return self.count_error(kind, "stream error", started)
                        if kind == "cancel" and line.startswith(b"data: {"):
                            break  # go away mid-stream: the server must cancel and carry on
                        if line.strip() == b"data: [DONE]":
                            break
        except (OSError, ValueError, KeyError) as exc:
            return self.count_error(kind, type(exc).__name__, started)
        finally:
            conn.close()
        with self.lock:
            self.ok[kind] += 1
            self.latency[kind].append(time.monotonic() - started)

    def client(self, index: int) -> None:
        i = index
        while time.monotonic() < self.deadline:
            self.request(KINDS[i % len(KINDS)], i)
            i += 1


def processes(proc: subprocess.Popen) -> dict[int, str]:
    """pid -> role of the server and every process under it."""
    out = {proc.pid: "coordinator"}
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            out[child.pid] = "daemon"
    except psutil.NoSuchProcess:
        pass
    return out


def rss_mib(pids: dict[int, str]) -> dict[str, float]:
    out = {}
    for pid, role in pids.items():
        try:
            out[f"{role} {pid}"] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def health(host: str, port: int) -> tuple[int, dict]:
    try:
        status, body = get(host, port, "/health")
        return status, json.loads(body)
    except (OSError, ValueError):
        return 0, {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `shardrt serve`")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.clients <= 64:
        parser.error("need 0 < --minutes <= 1440 and 1 <= --clients <= 64")
    runtime = Path(tempfile.mkdtemp(prefix="soak-"))  # the server's TMPDIR: its sockets and logs land here
    host, port = "127.0.0.1", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", "serve", "--port", str(port),
                             "--max-queue", str(2 * args.clients), *(args.serve_args or DEFAULT_SERVE)],
                            stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(runtime), "XDG_RUNTIME_DIR": ""})
    report: dict = {"bench": "soak", "minutes": args.minutes, "clients": args.clients,
                    "server": " ".join(args.serve_args or DEFAULT_SERVE)}
    seen_pids: set[int] = set()
    try:
        wait_ready(host, port, proc)
        model = json.loads(get(host, port, "/v1/models")[1])["data"][0]["id"]
        warm = Soak(host, port, model, 0)
        for i in range(2 * len(KINDS)):  # warm-up: every kind twice, not counted
            warm.request(KINDS[i % len(KINDS)], i)
        pids = processes(proc)
        seen_pids |= set(pids)
        rss = {"start": rss_mib(pids)}
        t0 = time.monotonic()
        soak = Soak(host, port, model, t0 + args.minutes * 60)
        clients = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(args.clients)]
        for c in clients:
            c.start()
        time.sleep(args.minutes * 30)  # halfway
        rss["middle"] = rss_mib(processes(proc))
        victim = next(pid for pid, role in processes(proc).items() if role == "daemon")
        soak.killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while time.monotonic() < soak.deadline:  # until the stages serve again
            status, body = health(host, port)
            if status == 200 and body.get("restarts", 0) >= 1:
                soak.restarted_at = time.monotonic()
                break
            time.sleep(0.2)
        report["restart_s"] = round(soak.restarted_at - soak.killed_at, 2) if soak.restarted_at else None
        time.sleep(min(10.0, max(0.0, (soak.deadline - time.monotonic()) / 4)))
        pids = processes(proc)
        seen_pids |= set(pids)
        rss["after_restart"] = rss_mib(pids)
        for c in clients:
            c.join(timeout=args.minutes * 60 + 2 * REQUEST_S)
        rss["end"] = rss_mib(processes(proc))
        report["restarts"] = health(host, port)[1].get("restarts")
        report["wall_s"] = round(time.monotonic() - t0, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            report["exit_status"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            report["exit_status"] = "killed after 60 s"
    time.sleep(0.5)  # daemons go when the coordinator's death pipe closes; give them their moment
    left = {
        "processes": sorted(pid for pid in seen_pids if psutil.pid_exists(pid)
                            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE),
        "segments": sorted(p.name for p in Path("/dev/shm").glob(f"shardrt-{proc.pid}-*")),
        # shardrt's runtime directories (sockets, logs); torch keeps its own caches here too
        "runtime": sorted(str(p.relative_to(runtime)) for p in runtime.rglob("shardrt-*")),
    }
    shutil.rmtree(runtime, ignore_errors=True)
    everything = [v for kind in KINDS for v in soak.latency[kind]]
    report.update({
        "requests": sum(soak.ok.values()) + sum(soak.errors.values()) + soak.kill_errors,
        "ok": soak.ok, "errors": soak.errors, "errors_at_kill": soak.kill_errors, "retried_503": soak.retried_503,
        "latency_s": {"p50": round(percentile(everything, 0.5), 3), "p99": round(percentile(everything, 0.99), 3),
                      **{k: round(percentile(v, 0.5), 3) for k, v in soak.latency.items()}},
        "rss_mib": rss, "rss_growth": growth(rss), "left_behind": left,
    })
    print(json.dumps(report))
    return 0


def growth(rss: dict) -> dict:
    """RSS growth per process: `steady`, end over after_restart (the same processes serving on);
    `whole`, end over start for those that lived through the restart (the coordinator reloads its
    own stage then)."""
    end, start, after = rss.get("end", {}), rss.get("start", {}), rss.get("after_restart", {})
    return {"steady": {n: round(v / after[n] - 1, 4) for n, v in end.items() if after.get(n)},
            "whole": {n: round(v / start[n] - 1, 4) for n, v in end.items() if start.get(n)}}


if __name__ == "__main__":
    sys.exit(main())
