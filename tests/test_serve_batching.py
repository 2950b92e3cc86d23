"""`shardrt serve` decoding many requests at once (`--max-seqs`), through the official `openai`
client against a real server over `cpu:0,cpu:1`: concurrent greedy requests each get what they
get alone, a cancelled stream leaves the others running, and a daemon killed under load fails
every request in flight, then the server serves again."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.test_server import daemon_pid, serving, wait_for, wait_recovered

SEQS = 16
TOKENS = 12


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    with serving(demo_model, tmp_path_factory.mktemp("serve-batch") / "stderr.txt", "--max-seqs", str(SEQS),
                 "--max-queue", str(SEQS)) as served:
        yield served


def complete(server, prompt: str, max_tokens: int = TOKENS, **kw) -> str:
    out = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True}, **kw)
    assert out.usage.completion_tokens == max_tokens
    return out.choices[0].text


def test_concurrent_greedy_requests_equal_their_solo_output(server):
    prompts = [f"Question {i}: what comes after {i * 7}? Answer:" for i in range(SEQS)]
    alone = [complete(server, p) for p in prompts]
    assert len(set(alone)) > SEQS // 2  # different prompts, mostly different answers
    with ThreadPoolExecutor(SEQS) as pool:
        together = list(pool.map(lambda p: complete(server, p), prompts))
    assert together == alone
    # the prefix cache serves a slot from what another slot left: the same again, reusing prompts
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda p: complete(server, p), prompts[:4])) == alone[:4]
    assert server.metric("shardrt_prefix_cache_hits_total") >= 4


def test_a_cancelled_stream_leaves_the_others_running(server):
    before = server.metric("shardrt_generations_total", finish_reason="cancelled")
    streams = [server.client.completions.create(model=server.model, prompt=f"Story {i}: once upon a time",
                                                max_tokens=40, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}) for i in range(3)]
    chunks = [iter(s) for s in streams]
    for c in chunks:
        next(c)  # every stream has started
    wait_for(lambda: server.health()[1]["running"] == 3, 10, "three running sequences")
    streams[1].close()
    texts = {}

    def drain(i):
        texts[i] = "".join(chunk.choices[0].text for chunk in chunks[i] if chunk.choices)

    readers = [threading.Thread(target=drain, args=(i,)) for i in (0, 2)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(120)
    assert all(texts.get(i) for i in (0, 2))
    wait_for(lambda: server.metric("shardrt_generations_total", finish_reason="cancelled") == before + 1
             and server.metric("shardrt_running") == 0, 10, "one cancelled generation")


def test_killed_daemon_fails_every_request_in_flight_then_serves_again(server):
    pid = daemon_pid(server)
    outcomes = []

    def ask(i):
        try:
            complete(server, f"Long story {i}:", max_tokens=200)
            outcomes.append("finished")
        except openai.APIStatusError as exc:
            outcomes.append(exc)

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for a in askers:
        a.start()
    wait_for(lambda: server.health()[1]["running"] == 4, 30, "four running sequences")
    os.kill(pid, signal.SIGKILL)
    for a in askers:
        a.join(60)
    assert len(outcomes) == 4 and all(isinstance(o, openai.APIStatusError) for o in outcomes), outcomes
    for failed in outcomes:
        assert failed.status_code == 503 and failed.body["code"] == "stage_died"
        assert "daemon 1 (cpu:1)" in failed.body["message"]
    wait_recovered(server, pid)
    prompts = [f"After the restart {i}:" for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda p: complete(server, p, max_tokens=6), prompts))
    assert again == [complete(server, p, max_tokens=6) for p in prompts]


def test_a_drafting_server_speculates_alone_and_hands_over_to_the_batch(server, demo_model, tmp_path):
    """With --draft and several slots: a request alone decodes speculatively; when others arrive
    while it runs it goes on in the batch; every greedy text equals the plain server's."""
    repetitive = "Count: one, two, three, four, five, six, seven, eight, nine, ten. Again: one, two, three,"
    others = [f"Question {i}: what comes after {i * 7}? Answer:" for i in range(3)]
    want = [complete(server, p, max_tokens=48) for p in [repetitive] + others]
    with serving(demo_model, tmp_path / "stderr.txt", "--draft", "ngram", "--max-seqs", "4") as drafting:
        assert complete(drafting, repetitive, max_tokens=48) == want[0]
        accepted = drafting.metric("shardrt_spec_accepted_tokens_total")
        assert accepted > 0 and drafting.metric("shardrt_spec_handovers_total") == 0

        stream = drafting.client.completions.create(model=drafting.model, prompt=repetitive, max_tokens=48,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)  # it runs, alone and drafting
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: complete(drafting, p, max_tokens=48), others))
        streamed = "".join(c.choices[0].text for c in [first, *chunks] if c.choices)
        assert [streamed, *together] == want
        assert drafting.metric("shardrt_spec_handovers_total") == 1
        assert "Traceback" not in drafting.stderr()


WIDE = 64


@pytest.fixture(scope="module")
def wide(demo_model, tmp_path_factory):
    """64 slots and the default queue; no prefix cache, so a shared prompt can only be copied from
    a running request."""
    folder = tmp_path_factory.mktemp("serve-wide")
    with serving(demo_model, folder / "stderr.txt", "--max-seqs", str(WIDE), "--prefix-cache-slots", "0",
                 "--step-log", str(folder / "steps.jsonl")) as served:
        served.step_log = folder / "steps.jsonl"
        yield served


def test_as_many_clients_as_slots_are_all_served_each_as_alone(wide):
    prompts = [f"Item {i}: the number after {i * 3} is" for i in range(WIDE)]
    alone = [complete(wide, p, max_tokens=4) for p in prompts[:8]]
    with ThreadPoolExecutor(WIDE) as pool:  # all at once: every request must find a slot, none a 503
        together = list(pool.map(lambda p: complete(wide, p, max_tokens=4), prompts))
    assert together[:8] == alone
    assert wide.metric("shardrt_queue_rejected_total") == 0
    assert wide.metric("shardrt_generations_total", finish_reason="length") >= WIDE + 8


def test_a_burst_sharing_a_system_prompt_prefills_it_once(wide):
    system = "You are the assistant of a small library. Answer each question in one short sentence. " * 3
    questions = [f"Question {i}: is book {i} on the shelf?" for i in range(16)]

    def ask(q):
        out = wide.client.chat.completions.create(
            model=wide.model, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        return out.choices[0].message.content

    alone = [ask(q) for q in questions[:3]]
    before = wide.metric("shardrt_prefix_shared_requests_total"), wide.metric("shardrt_prefix_shared_tokens_total")
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together[:3] == alone
    shared = wide.metric("shardrt_prefix_shared_requests_total") - before[0]
    tokens = wide.metric("shardrt_prefix_shared_tokens_total") - before[1]
    assert shared >= len(questions) // 2 and tokens >= 50 * shared  # the system prompt: ~60 tokens each


def test_the_step_log_accounts_for_every_request_and_prompt_row(wide):
    """After the tests above (every request ended): each request has its line, in order of time;
    the prompt rows the steps sent are exactly the prompt tokens the requests did not reuse."""
    lines = [json.loads(line) for line in wide.step_log.read_text().splitlines()]
    steps, requests = [x for x in lines if "step" in x], [x for x in lines if "request" in x]
    assert len(requests) >= WIDE + 8 + 16 + 3 and sorted(r["request"] for r in requests) == \
        list(range(1, len(requests) + 1))
    for r in requests:
        assert 0 <= r["admitted_ms"] <= r["first_token_ms"] <= r["total_ms"] and r["tokens"] == 4, r
        assert r["tokenize_ms"] > 0, r  # the chat template and the encoding before the queue
        assert 0 < r["http_cpu_ms"] < r["total_ms"], r  # its HTTP thread's CPU on the way to the queue
        assert 0 <= r["reused"] < r["prompt_tokens"] and r["finish"] == "length", r
    assert sum(s["prefill"] for s in steps) == sum(r["prompt_tokens"] - r["reused"] for r in requests)
    assert sum(s["joined"] for s in steps) == len(requests)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(s["ms"] >= s["settle_ms"] >= s["drain_ms"] >= 0 and s["settle_cpu_ms"] >= 0 and s["forward_ms"] >= 0
               and s["decode"] >= 0 for s in steps)
    assert sum(s["forward_ms"] for s in steps) > 0
