"""`shardrt serve` as clients use it: the official `openai` client and raw HTTP against a real
server process (demo model, the coordinator's stage plus one daemon): chat and completions,
streamed and not, usage, concurrent clients, bad requests, the queue bound, disconnects, a
daemon killed mid-request, the loopback guard, and a clean SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

import shardrt

READY_S = 120
RECOVER_S = 90
MAX_QUEUE = 3
LONG = 400  # tokens of a generation meant to be cut short (~16 s at 25 tok/s on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, err: Path, model: str):
        self.proc, self.port, self.err, self.model = proc, port, err, model
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, headers, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            kind = resp.getheader("Content-Type", "")
            return resp.status, dict(resp.getheaders()), json.loads(raw) if "json" in kind else raw.decode()
        finally:
            conn.close()

    def health(self) -> tuple[int, dict]:
        status, _, body = self.request("GET", "/health", timeout=10)
        return status, body

    def metric(self, name: str, **labels) -> float:
        _, _, text = self.request("GET", "/metrics", timeout=10)
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def wait_for(check, deadline_s: float, what: str, step: float = 0.1):
    """Poll `check` until it returns something truthy, within a deadline."""
    end = time.monotonic() + deadline_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        threading.Event().wait(step)


def serve_args(model, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shardrt.cli", "serve", "-v", "--model", str(model), "--target-gpus", "cpu:0,cpu:1",
            "--max-ctx", "512", "--port", str(port), *extra]


@contextlib.contextmanager
def serving(model, err: Path, *flags: str, env: dict | None = None):
    """A `shardrt serve` of `model` on cpu:0,cpu:1 with `flags` (and `env` added to the
    environment), ready (/health 200); SIGTERM at the end."""
    port = free_port()
    with open(err, "wb") as sink:
        proc = subprocess.Popen(serve_args(model, port, *flags), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=sink, env={**os.environ, **(env or {})})
    served = Served(proc, port, err, model.name.removesuffix(".gguf"))

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"shardrt serve exited with {proc.returncode}: {served.stderr()}")
        try:
            return served.health()[0] == 200
        except OSError:
            return False

    try:
        wait_for(ready, READY_S, "/health 200", step=0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    # one request at a time: the queue tests need requests that wait (tests/test_serve_batching.py
    # serves several at once)
    with serving(demo_model, tmp_path_factory.mktemp("serve") / "stderr.txt", "--max-queue", str(MAX_QUEUE),
                 "--max-seqs", "1") as served:
        yield served


def chat(server, content: str, max_tokens: int = 16, **kw):
    return server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                                 max_tokens=max_tokens, temperature=0, **kw)


# -- the API ---------------------------------------------------------------------------------

def test_ready_line_models_and_health(server):
    assert f"shardrt: serving {server.model} at http://127.0.0.1:{server.port}/v1" in server.stderr()
    assert [m.id for m in server.client.models.list()] == [server.model]
    card = server.client.models.retrieve(server.model)
    assert card.id == server.model and card.model_extra["shardrt_version"] == shardrt.__version__
    status, body = server.health()
    assert status == 200 and body["status"] == "ok"
    assert [s["process"] for s in body["stages"]] == ["coordinator", "daemon 1 (cpu:1)"]
    assert all(s["alive"] for s in body["stages"]) and body["stages"][1]["pid"] != server.proc.pid


def test_chat_answers_with_usage_from_the_tokenizer(server, demo_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = chat(server, messages[0]["content"], max_tokens=24)
    assert out.object == "chat.completion" and out.model == server.model
    choice = out.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(demo_tokenizer.encode_chat(messages))
    assert 0 < out.usage.completion_tokens <= 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_second_chat_turn_reuses_the_cached_prefix(server, demo_tokenizer):
    turn = [{"role": "user", "content": "What is the capital of Italy?"}]
    first = server.client.chat.completions.create(model=server.model, messages=turn, max_tokens=16, temperature=0)
    hits, reused = server.metric("shardrt_prefix_cache_hits_total"), server.metric("shardrt_prefix_cache_reused_tokens_total")
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And of Spain?"}]
    second = server.client.chat.completions.create(model=server.model, messages=turn, max_tokens=16, temperature=0)
    assert second.usage.prompt_tokens == len(demo_tokenizer.encode_chat(turn))
    assert server.metric("shardrt_prefix_cache_hits_total") == hits + 1
    # at least the first turn's prompt was not prefilled again
    assert server.metric("shardrt_prefix_cache_reused_tokens_total") - reused >= first.usage.prompt_tokens


def test_completion_counts_every_token(server, demo_tokenizer):
    prompt = "The capital of France is"
    out = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert out.object == "text_completion"
    assert out.choices[0].text.startswith(" Paris") and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(demo_tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    # the text is exactly the decoding of what was counted
    assert len(demo_tokenizer.hf.encode(out.choices[0].text, add_special_tokens=False)) == 12


def test_stop_strings_and_harmless_fields(server):
    out = server.client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=20,
                                           temperature=0, stop=["."], n=1, presence_penalty=0, frequency_penalty=0,
                                           user="someone", best_of=1, echo=False)
    assert out.choices[0].text == " Paris" and out.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_the_non_streamed_text(server):
    question = "Name three colours of the rainbow."
    whole = chat(server, question, max_tokens=32)
    chunks = list(chat(server, question, max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 10
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_equals_the_non_streamed_text(server):
    kw = dict(model=server.model, prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert len(chunks) > 3 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage, no usage chunk


def test_raw_stream_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = [line for line in resp.read().decode().split("\n\n") if line]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_concurrent_clients_get_their_own_answers(server):
    prompts = ["The capital of France is", "One, two, three,", "The opposite of hot is", "Water is made of"]
    expected = {}
    for p in prompts:
        expected[p] = server.client.completions.create(model=server.model, prompt=p, max_tokens=8,
                                                       temperature=0).choices[0].text
    got, errors = {}, []

    def ask(p):
        try:
            got[p] = server.client.completions.create(model=server.model, prompt=p, max_tokens=8,
                                                      temperature=0).choices[0].text
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == expected


# -- bad requests ---------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body, field named in `param` or None, text the message must hold)
    (CHAT, b'{"model": ', None, "not valid JSON"),
    (CHAT, b"[1, 2]", None, "JSON list"),
    (CHAT, {"model": "gpt-4o", "messages": USER}, "model", "'gpt-4o'"),
    (CHAT, {"messages": USER}, "model", "model: missing"),
    (CHAT, {"model": "M"}, "messages", "messages: missing"),
    (CHAT, {"model": "M", "messages": []}, "messages", "messages: []"),
    (CHAT, {"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'robot'"),
    (CHAT, {"model": "M", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "5"),
    (CHAT, {"model": "M", "messages": USER, "max_tokens": -1}, "max_tokens", "-1"),
    (CHAT, {"model": "M", "messages": USER, "max_tokens": "10"}, "max_tokens", "'10'"),
    (CHAT, {"model": "M", "messages": USER, "max_tokens": True}, "max_tokens", "True"),
    (CHAT, {"model": "M", "messages": USER, "max_tokens": 100000}, "max_tokens", "100000"),
    (CHAT, {"model": "M", "messages": USER, "temperature": 3}, "temperature", "3"),
    (CHAT, {"model": "M", "messages": USER, "temperature": "hot"}, "temperature", "'hot'"),
    (CHAT, {"model": "M", "messages": USER, "top_p": 0}, "top_p", "0"),
    (CHAT, {"model": "M", "messages": USER, "seed": -1}, "seed", "-1"),
    (CHAT, {"model": "M", "messages": USER, "n": 2}, "n", "2"),
    (CHAT, {"model": "M", "messages": USER, "presence_penalty": 0.5}, "presence_penalty", "0.5"),
    (CHAT, {"model": "M", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    (CHAT, {"model": "M", "messages": USER, "stop": ["a", ""]}, "stop[1]", "''"),
    (CHAT, {"model": "M", "messages": USER, "stream": "yes"}, "stream", "'yes'"),
    (CHAT, {"model": "M", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (CHAT, {"model": "M", "messages": USER, "frobnicate": 1}, "frobnicate", "unknown field"),
    (CHAT, {"model": "M", "messages": USER, "tools": [{"type": "function"}]}, "tools", "tools are not supported"),
    (TEXT, {"model": "M", "prompt": ["a", "b"]}, "prompt", "['a', 'b']"),
    (TEXT, {"model": "M", "prompt": 42}, "prompt", "42"),
    (TEXT, {"model": "M", "prompt": ""}, "prompt", "empty"),
    (TEXT, {"model": "M", "prompt": "hello " * 600}, "prompt", "max_ctx of 512"),
    (TEXT, {"model": "M", "prompt": "hi", "echo": True}, "echo", "True"),
]


@pytest.mark.parametrize("path,body,param,needle", BAD, ids=[f"{i}-{b[2] or 'body'}" for i, b in enumerate(BAD)])
def test_bad_request_is_400_naming_the_field(server, path, body, param, needle):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model}
    status, _, reply = server.request("POST", path, body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"], error


@pytest.mark.parametrize("method,path,headers,body,status,needle", [
    ("POST", CHAT, {"Content-Type": "text/plain"}, b"{}", 400, "Content-Type: 'text/plain'"),
    ("POST", CHAT, {"Content-Length": str(2 << 20)}, None, 400, "more than the 1048576 bytes"),
    ("GET", "/v1/nothing", {}, None, 404, "/v1/nothing"),
    ("GET", CHAT, {}, None, 405, "use POST"),
    ("DELETE", "/health", {}, None, 405, "DELETE"),
    ("GET", "/v1/models/other", {}, None, 404, "'other'"),
])
def test_http_errors_are_openai_shaped(server, method, path, headers, body, status, needle):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        if body is None and "Content-Length" in headers:  # claim a body that is never sent
            conn.putrequest(method, path)
            conn.putheader("Content-Type", "application/json")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
        else:
            conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        reply = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == status and needle in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    if status == 405:
        assert resp.getheader("Allow")


def test_still_serving_after_bad_requests(server):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(server, "hi", max_tokens=0)
    assert "max_tokens: 0" in refused.value.message
    assert "Paris" in chat(server, "What is the capital of France?", max_tokens=24).choices[0].message.content
    assert server.metric("shardrt_requests_total", endpoint=CHAT, status="400") >= 20
    assert "Traceback" not in server.stderr()


# -- the queue and disconnects --------------------------------------------------------------

def open_stream(server, prompt: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", TEXT, json.dumps({"model": server.model, "prompt": prompt, "max_tokens": LONG,
                                           "temperature": 0, "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_queue_full_is_503_and_disconnects_cancel(server):
    cancelled_before = server.metric("shardrt_generations_total", finish_reason="cancelled")
    running, first = open_stream(server, "Once upon a time")
    assert first.readline().startswith(b"data: ")  # the first chunk: it runs
    waiting = [open_stream(server, f"Story number {i}:") for i in range(MAX_QUEUE)]  # headers come on queueing
    assert server.metric("shardrt_queue_depth") == MAX_QUEUE

    status, headers, reply = server.request("POST", TEXT, {"model": server.model, "prompt": "hi", "max_tokens": 2})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert reply["error"]["code"] == "queue_full" and "--max-queue" in reply["error"]["message"]
    assert server.metric("shardrt_queue_rejected_total") == 1

    for conn, resp in waiting:  # a client that goes away frees its place
        resp.close()
        conn.close()
    wait_for(lambda: server.metric("shardrt_queue_depth") == 0, 10, "the queue to empty")
    first.close()  # the running stream is cancelled by its next failed write, or EOF on its socket
    running.close()
    wait_for(lambda: server.metric("shardrt_generations_total", finish_reason="cancelled") == cancelled_before + 4
             and server.metric("shardrt_running") == 0, 10, "4 cancelled generations")
    wait_for(lambda: server.metric("shardrt_requests_total", endpoint=TEXT, status="499") >= 4, 10, "4 requests as 499")

    t0 = time.monotonic()
    out = server.client.completions.create(model=server.model, prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    # not behind the 400-token generation (~16 s alone on 2 cores); the bound leaves room for a busy machine
    assert out.choices[0].text.startswith(" Paris") and time.monotonic() - t0 < 15


def test_non_streaming_client_that_leaves_is_cancelled(server):
    before = server.metric("shardrt_generations_total", finish_reason="cancelled")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"model": server.model, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0,
                       "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: server.health()[1]["running"] == 1, 10, "the generation to start")
    sock.close()
    wait_for(lambda: server.metric("shardrt_generations_total", finish_reason="cancelled") == before + 1
             and server.metric("shardrt_running") == 0, 10, "the generation to be cancelled")
    assert chat(server, "What is the capital of France?", max_tokens=24).choices[0].message.content


# -- a stage that dies ------------------------------------------------------------------------

def daemon_pid(server) -> int:
    status, body = server.health()
    assert status == 200, body
    return body["stages"][1]["pid"]


def wait_recovered(server, old_pid: int) -> dict:
    def ok():
        status, body = server.health()
        return body if status == 200 else None

    body = wait_for(ok, RECOVER_S, "/health to recover", step=0.2)
    assert body["stages"][1]["pid"] != old_pid and all(s["alive"] for s in body["stages"])
    return body


def test_killed_daemon_fails_the_stream_then_the_cluster_restarts(server):
    pid = daemon_pid(server)
    stream = server.client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=LONG,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    assert "daemon 1 (cpu:1)" in failed.value.message and "SIGKILL" in failed.value.message

    status, body = server.health()  # the restart loads weights: it is still under way
    assert status == 503 and body["status"] in ("stage_died", "restarting")
    assert body["stage"].startswith("daemon 1 (cpu:1)") and not body["stages"][1]["alive"]

    body = wait_recovered(server, pid)
    assert body["restarts"] == 1 and 0 < body["last_restart_seconds"] < RECOVER_S
    assert body["last_failure"]["stage"].startswith("daemon 1 (cpu:1)")
    assert not psutil.pid_exists(pid)
    assert "Paris" in chat(server, "What is the capital of France?", max_tokens=24).choices[0].message.content
    assert server.metric("shardrt_restarts_total") == 1
    assert server.metric("shardrt_last_restart_seconds") == pytest.approx(body["last_restart_seconds"])
    assert re.search(r"restarted the cluster in \d+\.\d+s", server.stderr())


def test_killed_daemon_fails_a_waiting_request_with_503(server):
    pid = daemon_pid(server)
    outcome = []

    def ask():
        try:
            server.client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=LONG,
                                             temperature=0, extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_for(lambda: server.health()[1]["running"] == 1, 10, "the generation to start")
    os.kill(pid, signal.SIGKILL)
    asker.join(60)
    assert outcome and outcome[0].status_code == 503, outcome
    error = outcome[0].body
    assert error["code"] == "stage_died" and "daemon 1 (cpu:1)" in error["message"]
    assert outcome[0].response.headers.get("Retry-After")
    wait_recovered(server, pid)
    assert chat(server, "What is the capital of France?", max_tokens=24).choices[0].message.content


# -- other configurations -------------------------------------------------------------------

def test_speculative_decoding_and_all_daemons_behind_the_server(server, demo_model, tmp_path):
    """The same greedy text from a server whose only stage is a daemon and that drafts n-grams."""
    prompt = "Count: one, two, three, four, five, six, seven, eight, nine, ten. Again: one, two, three,"
    want = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=24,
                                            temperature=0).choices[0].text
    port, err = free_port(), tmp_path / "stderr.txt"
    with open(err, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "shardrt.cli", "serve", "--model", str(demo_model),
                                 "--target-gpus", "cpu:0", "--all-daemons", "--draft", "ngram", "--max-ctx", "512",
                                 "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink)
    other = Served(proc, port, err, server.model)
    try:
        def ready():
            assert proc.poll() is None, other.stderr()
            try:
                return other.health()[0] == 200
            except OSError:
                return False

        wait_for(ready, READY_S, "/health 200", step=0.2)
        assert [s["process"] for s in other.health()[1]["stages"]] == ["daemon 1 (cpu:0)"]
        got = other.client.completions.create(model=other.model, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want
        assert other.metric("shardrt_spec_accepted_tokens_total") > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "Traceback" not in other.stderr()


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (("--host", "0.0.0.0"), "--allow-remote"),
    (("--port", "0"), "--port: 0"),
    (("--max-queue", "0"), "--max-queue: 0"),
    (("--host", "no-such-host.invalid"), "--host: cannot resolve"),
    (("--max-seqs", "0"), "--max-seqs: 0"),
])
def test_bad_serve_flags_exit_2(demo_model, args, needle):
    run = subprocess.run([sys.executable, "-m", "shardrt.cli", "serve", "--model", str(demo_model), "--port",
                          str(free_port()), *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrt: error:") and needle in lines[0], run.stderr


def test_port_in_use_exits_2(server, demo_model):
    run = subprocess.run(serve_args(demo_model, server.port), capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "cannot listen" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_sigterm_stops_and_leaves_nothing(server):
    """Last: it stops the module's server."""
    status, body = server.health()
    daemons = [s["pid"] for s in body["stages"] if s["process"] != "coordinator"]
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert daemons and {c.pid for c in children} >= set(daemons)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    assert not list(Path("/dev/shm").glob(f"shardrt-{server.proc.pid}-*"))
    err = server.stderr()
    assert "Traceback" not in err and err.rstrip().endswith("shardrt: stopped")
