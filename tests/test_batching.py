"""Sequence slots and batched decode on the real demo model (float32 on the CPU): several
sequences in one stage's KV cache, each decoded alone and all of them together in one forward,
in this process and through daemons over the real protocol; and what bad batches get."""

from __future__ import annotations

import os

import pytest
import torch

from shardrt.config import LaunchConfig
from shardrt.errors import ConfigError, IpcError
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.stage import Stage

MAX_CTX = 128
STEPS = 10
PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):\n   ", "Once upon a time"]


def solo_greedy(pipeline: Pipeline, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits, the sequence alone in sequence slot 0."""
    pipeline.reset()
    logits = pipeline.forward(torch.tensor(ids), 0)
    tokens, rows = [int(logits[-1].argmax())], [logits[-1]]
    for _ in range(steps):
        logits = pipeline.forward(torch.tensor(tokens[-1:]), len(ids) + len(tokens) - 1)
        tokens.append(int(logits[-1].argmax()))
        rows.append(logits[-1])
    return tokens, rows


def batched_greedy(pipeline: Pipeline, prompts: list[list[int]], steps: int, seqs: list[int]):
    """The same, every prompt prefilled into its own slot, then decoded together in one forward per step."""
    tokens, rows = [], []
    for ids, seq in zip(prompts, seqs):
        logits = pipeline.run(torch.tensor(ids), 0, seq=seq)[0]
        tokens.append([int(logits[-1].argmax())])
        rows.append([logits[-1]])
    for _ in range(steps):
        positions = [len(ids) + len(t) - 1 for ids, t in zip(prompts, tokens)]
        logits = pipeline.decode_batch([t[-1] for t in tokens], seqs, positions)
        for i, t in enumerate(tokens):
            t.append(int(logits[i].argmax()))
            rows[i].append(logits[i])
    return tokens, rows


@pytest.fixture(scope="module")
def solo(demo_model, demo_tokenizer):
    one = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)])
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    return prompts, [solo_greedy(one, ids, STEPS) for ids in prompts]


def assert_same(got, want):
    for (tokens, rows), (want_tokens, want_rows) in zip(zip(*got), want):
        assert tokens == want_tokens
        assert max((a - b).abs().max().item() for a, b in zip(rows, want_rows)) < 1e-4


def test_batched_decode_equals_each_sequence_alone(demo_model, solo):
    prompts, want = solo
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=6)
    pipeline = Pipeline([stage])
    seqs = [5, 0, 3, 1]  # any slots, in any order
    assert_same(batched_greedy(pipeline, prompts, STEPS, seqs), want)
    assert [stage.lengths[s] for s in seqs] == [len(p) + STEPS for p in prompts]
    assert stage.lengths[2] == stage.lengths[4] == 0

    # sequences leave and join between steps: slot 3 restarts with another prompt, the others go on
    stage.reset(3)
    assert stage.lengths[3] == 0 and stage.lengths[5] == len(prompts[0]) + STEPS
    tokens = pipeline.greedy_all(torch.tensor(prompts[1]), 0, seq=3)[0]
    assert tokens[-1] == want[1][0][0]


def test_slots_keep_their_own_snapshots_and_truncation(demo_model, solo):
    prompts, want = solo
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=2)
    stage.run(torch.tensor(prompts[0]), 0, seq=1)
    assert stage.kv_snapshot(7, seq=1) == len(prompts[0]) and stage.lengths == [0, len(prompts[0])]
    assert stage.kv_restore(7, seq=0) == len(prompts[0])  # a snapshot of slot 1 restored into slot 0
    logits = stage.run(torch.tensor(want[0][0][:1]), len(prompts[0]), seq=0)[0]
    assert int(logits[-1].argmax()) == want[0][0][1]
    stage.truncate(2, seq=1)
    assert stage.lengths == [len(prompts[0]) + 1, 2]


@pytest.mark.parametrize("seqs, positions, needle", [
    ([0, 0], [4, 4], "positions: 4 for sequence 0 does not follow the row before it, at 4,"),
    ([0, 0], [4, 6], "positions: 6 for sequence 0 does not follow the row before it, at 4,"),
    ([0, 3], [4, 4], "seqs: sequence 3 is outside 0..2"),
    ([0, 1], [4, 9], "positions: 9 for sequence 1 does not follow the 4 tokens cached"),
    ([0], [4, 4], "batch: 2 inputs for 1 sequences"),
])
def test_bad_batches_are_refused_and_change_nothing(demo_model, seqs, positions, needle):
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=3)
    for seq in (0, 1):
        stage.run(torch.tensor([1, 2, 3, 4]), 0, seq=seq)
    with pytest.raises(ConfigError, match=needle):
        stage.run_batch(torch.tensor([5, 6]), seqs, positions)
    assert stage.lengths == [4, 4, 0]
    with pytest.raises(ConfigError, match="seq: sequence 3 is outside"):
        stage.run(torch.tensor([1]), 0, seq=3)
    with pytest.raises(ConfigError, match="max_seqs: 0"):
        Stage(demo_model, 0, 2, "cpu", max_ctx=MAX_CTX, max_seqs=0)


def test_batched_decode_through_daemons_equals_each_alone(demo_model, solo):
    """Three stages (this process, two daemons) with four sequence slots each: the batch crosses
    both hops as one forward_batch; bad batches are refused by the daemon, which keeps serving."""
    prompts, want = solo
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=MAX_CTX, max_seqs=4,
                          prefix_cache_slots=0)
    threads = torch.get_num_threads()
    with Cluster(config, demo_model) as cluster:
        # three processes compute at once under a pipelined batch: they share the cores out
        if "OMP_NUM_THREADS" not in os.environ:
            assert cluster.threads == torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 3)
        pipeline = cluster.pipeline
        assert [s.max_seqs for s in pipeline.stages] == [4, 4, 4]
        assert_same(batched_greedy(pipeline, prompts, STEPS, [2, 0, 3, 1]), want)
        assert pipeline.stages[-1].stats()["stages"][0]["lengths"] == [len(p) + STEPS for p in
                                                                         (prompts[1], prompts[3], prompts[0], prompts[2])]
        # greedy token ids straight from the remote head
        tokens = pipeline.decode_batch([7, 8], [0, 1], [3, 3], argmax=True)
        assert isinstance(tokens, list) and len(tokens) == 2
        remote = pipeline.stages[1]
        with pytest.raises(IpcError, match="positions: 50 for sequence 2 does not follow"):
            remote.run_batch(torch.zeros(1, pipeline.cfg.dim), [2], [50])
        with pytest.raises(IpcError, match="sequence 4 is outside 0..3"):
            remote.run_batch(torch.zeros(1, pipeline.cfg.dim), [4], [0])
        assert remote.ping()["pid"] == remote.daemon.pid
        assert pipeline.length_of(2) == len(prompts[0]) + STEPS
    assert torch.get_num_threads() == threads  # this process's own setting is given back


def test_scheduler_lets_requests_join_leave_and_be_cancelled(demo_model, demo_tokenizer):
    """The serve scheduler on one in-process stage: what each request gets equals generate() alone
    (seeded sampling included), two cancelled at once both leave in the same step, and their
    slots take the next requests."""
    from shardrt.generate import generate
    from shardrt.sampling import SamplingParams
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job

    def params(**kw):
        return SamplingParams(max_tokens=8, ignore_eos=True, **kw)

    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    kinds = [params(), params(temperature=0.8, top_k=40, seed=3), params(), params(stop=("\n",))]
    alone = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)])
    want = [generate(alone, demo_tokenizer, ids, p).tokens for ids, p in zip(prompts, kinds)]

    scheduler = BatchScheduler(Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=3)]),
                               demo_tokenizer, max_batch_tokens=5)  # prompts in small chunks beside the decode rows
    jobs = [Job(None, ids, p) for ids, p in zip(prompts[:3], kinds[:3])]
    for job in jobs:
        scheduler.admit(job)
    assert scheduler.free_slots == 0
    done = {}

    def step():
        for run, result in scheduler.step():
            done[id(run.job)] = result

    for _ in range(200):
        step()
        if all(scheduler.running and len(r.out.tokens) >= 2 for r in scheduler.running):
            break
    assert len(scheduler.running) == 3 and not done
    jobs[0].cancel()
    jobs[2].cancel()
    step()
    assert {done[id(jobs[0])].finish_reason, done[id(jobs[2])].finish_reason} == {"cancelled"}
    assert scheduler.free_slots == 2  # given back within the same step (nothing was in flight)
    late = Job(None, prompts[3], kinds[3])
    scheduler.admit(late)  # a slot given back: the next step sets it up
    for _ in range(200):
        if not scheduler.running:
            break
        step()
    assert done[id(jobs[1])].tokens == want[1] and done[id(jobs[1])].finish_reason == "length"
    assert done[id(late)].tokens == want[3]
    step()
    assert scheduler.free_slots == 3


def test_prompt_chunks_and_decode_rows_in_one_forward_equal_each_alone(demo_model, solo):
    """A mixed step: the whole prompt of one sequence, the first part of another's and one decode
    token of a third, in one forward; then the rest of the second prompt beside two decode rows.
    The logits of each sequence's last row equal what it gets alone."""
    prompts, want = solo
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=3)
    pipeline = Pipeline([stage])
    a, b, c = prompts[0], prompts[1], prompts[2]
    first = pipeline.run(torch.tensor(c), 0, seq=2)[0][-1]  # c is decoding already
    assert int(first.argmax()) == want[2][0][0]
    half = len(b) // 2
    rows = [(0, p, t) for p, t in enumerate(a)] + [(1, p, t) for p, t in enumerate(b[:half])] + \
        [(2, len(c), want[2][0][0])]
    seqs, positions, tokens = map(list, zip(*rows))
    outputs = [len(a) - 1, len(rows) - 1]  # a's last prompt row and c's decode row; b is mid-prompt
    logits = pipeline.decode_batch(tokens, seqs, positions, outputs=outputs)
    assert logits.shape[0] == 2
    assert (logits[0] - want[0][1][0]).abs().max() < 1e-4 and (logits[1] - want[2][1][1]).abs().max() < 1e-4
    assert stage.lengths == [len(a), half, len(c) + 1]
    rows = [(0, len(a), want[0][0][0])] + [(1, half + p, t) for p, t in enumerate(b[half:])] + \
        [(2, len(c) + 1, want[2][0][1])]
    seqs, positions, tokens = map(list, zip(*rows))
    tokens_out = pipeline.decode_batch(tokens, seqs, positions, argmax=True, outputs=[0, len(rows) - 2, len(rows) - 1])
    assert tokens_out == [want[0][0][1], want[1][0][0], want[2][0][2]]
    assert stage.lengths == [len(a) + 1, len(b), len(c) + 2]


def test_a_sequence_takes_another_ones_prefix_by_copy(demo_model, solo):
    prompts, want = solo
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=3)
    pipeline = Pipeline([stage])
    ids = prompts[0]
    pipeline.run(torch.tensor(ids + [want[0][0][0]]), 0, seq=1)  # seq 1: the prompt and one token more
    assert pipeline.kv_copy(1, 2, len(ids) - 1) == len(ids) - 1
    logits = pipeline.run(torch.tensor(ids[-1:]), len(ids) - 1, seq=2)[0]  # only the prompt's last token runs
    assert (logits[-1] - want[0][1][0]).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="kv_copy: 40 is outside the 0 tokens cached for sequence 0"):
        pipeline.kv_copy(0, 2, 40)
    with pytest.raises(ConfigError, match="src_seq: sequence 5 is outside"):
        pipeline.kv_copy(5, 2, 1)
    assert stage.lengths == [0, len(ids) + 1, len(ids)]


def run_scheduler(scheduler, jobs, limit: int = 400) -> dict:
    done = {}
    for job in jobs:
        scheduler.admit(job)
    for _ in range(limit):
        for run, result in scheduler.step():
            done[id(run.job)] = result
        if not scheduler.running:
            break
    return done


def test_requests_that_arrive_together_prefill_in_one_forward(demo_model, demo_tokenizer):
    from shardrt.generate import generate
    from shardrt.sampling import SamplingParams
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job

    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)])
    want = [generate(alone, demo_tokenizer, ids, params).tokens for ids in prompts]
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=3)
    scheduler = BatchScheduler(Pipeline([stage]), demo_tokenizer)
    jobs = [Job(None, ids, params) for ids in prompts]
    for job in jobs:
        scheduler.admit(job)
    scheduler.step()
    assert stage.forwards == 1 and all(r.prefill_done is not None for r in scheduler.running)  # three prompts, one forward
    done = run_scheduler(scheduler, [])
    assert [done[id(j)].tokens for j in jobs] == want
    assert stage.forwards == params.max_tokens  # then one step for all three per token


def test_a_shared_system_prompt_is_prefilled_once(demo_model, demo_tokenizer):
    """Four requests with one long system prompt: the first prefills it, the other three wait for
    it, copy its KV and prefill only their own question; each gets what it gets alone."""
    from shardrt.generate import generate
    from shardrt.sampling import SamplingParams
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job
    from shardrt.spec.prefix_cache import common_prefix

    system = "You are a careful assistant. Answer in one short sentence, plainly, without lists. " * 2
    prompts = [demo_tokenizer.encode(system + q) for q in ("Where is Paris?", "Name a colour.", "What is 2+2?",
                                                           "Who wrote Hamlet?")]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    alone = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)])
    want = [generate(alone, demo_tokenizer, ids, params).tokens for ids in prompts]
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=4)
    scheduler = BatchScheduler(Pipeline([stage]), demo_tokenizer)
    jobs = [Job(None, ids, params) for ids in prompts]
    done = run_scheduler(scheduler, jobs)
    assert [done[id(j)].tokens for j in jobs] == want
    shared = [min(common_prefix(prompts[0], p), len(p) - 1) for p in prompts[1:]]
    assert min(shared) >= 30
    assert (scheduler.shared.requests, scheduler.shared.tokens) == (3, sum(shared))
    assert [done[id(j)].reused_tokens for j in jobs] == [0] + shared


def test_a_long_prompt_does_not_stall_a_running_stream(demo_model, demo_tokenizer):
    """While a long prompt is prefilled in budget-sized chunks, the request already decoding
    takes a token at every step."""
    from shardrt.sampling import SamplingParams
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job

    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=2)
    scheduler = BatchScheduler(Pipeline([stage]), demo_tokenizer, max_batch_tokens=16)
    running = Job(None, demo_tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=40, ignore_eos=True))
    scheduler.admit(running)
    while not any(r.next_token is not None for r in scheduler.running):
        scheduler.step()
    long_prompt = demo_tokenizer.encode(" ".join(reversed(PROMPTS)) * 8)[:100]  # shares no prefix with it
    scheduler.admit(Job(None, long_prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
    first = scheduler.running[0]
    counts = []
    while any(r.prefill_done is None for r in scheduler.running):
        scheduler.step()
        counts.append(len(first.out.tokens))
    assert len(long_prompt) == 100 and len(counts) >= 100 // 16  # the prompt took several steps
    assert counts == list(range(counts[0], counts[0] + len(counts)))  # one token each step meanwhile


def test_long_prompt_chunks_in_a_mixed_step_take_one_causal_product(demo_model, solo):
    """A chunk longer than 16 rows beside a decode row goes through the ragged path
    (attention.ragged_attention: one causal product for the chunk, the decode row through the
    cached-attention op); its logits equal the sequence alone."""
    prompts, want = solo
    stage = Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=2)
    pipeline = Pipeline([stage])
    long_ids = (prompts[0] * 8)[:40]
    alone = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX)]).forward(torch.tensor(long_ids), 0)[-1]
    c = prompts[2]
    pipeline.run(torch.tensor(c), 0, seq=1)
    step = __import__("shardrt.model", fromlist=["Step"]).Step.batched(list(range(40)) + [len(c)], [0] * 40 + [1], "cpu")
    assert step.runs is not None  # the long chunk sends the step down the ragged path
    logits = pipeline.decode_batch(long_ids + [want[2][0][0]], [0] * 40 + [1], list(range(40)) + [len(c)],
                                   outputs=[39, 40])
    assert (logits[0] - alone).abs().max() < 1e-4 and (logits[1] - want[2][1][1]).abs().max() < 1e-4


def test_requests_ending_together_store_only_what_the_prefix_cache_keeps(demo_model, demo_tokenizer):
    """Five requests that end in the same step, a prefix cache of two slots: only the last two
    are snapshotted (each store evicts the least recently used, so the first three would be gone
    within the same settle), and a request repeating the last prompt reuses its entry."""
    from shardrt.sampling import SamplingParams
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job
    from shardrt.spec.prefix_cache import PrefixCache

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = [demo_tokenizer.encode(f"Note {i}: the shelf holds {i * 11} books.") for i in range(5)]
    pipeline = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=MAX_CTX, max_seqs=5)])
    cache = PrefixCache(pipeline, slots=2)
    scheduler = BatchScheduler(pipeline, demo_tokenizer, cache)
    jobs = [Job(None, ids, params) for ids in prompts]
    done = run_scheduler(scheduler, jobs)
    assert len(done) == 5 and scheduler.unsettled
    scheduler.settle()  # the slots are given back (and the prefixes stored) while nothing is in flight
    assert scheduler.free_slots == 5 and cache.stats.stores == 2 and len(cache.entries) == 2
    kept = {tuple(prompts[i] + done[id(jobs[i])].tokens[:-1]) for i in (3, 4)}  # the last token never ran
    assert set(cache.entries.values()) == kept
    again = Job(None, prompts[4], params)
    result = run_scheduler(scheduler, [again])[id(again)]
    assert result.tokens == done[id(jobs[4])].tokens and result.reused_tokens == len(prompts[4]) - 1
