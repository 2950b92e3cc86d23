"""qwen35 (Qwen3.5 / Qwen3.6: gated DeltaNet layers between gated full-attention ones) against
transformers: a tiny random Qwen3.5 made with transformers (from_config, seeded, float32), written
to GGUF with llama.cpp's names and keys (tests/hf_gguf.py), run by shardrt in one process and split
over three; the recurrent state through speculative rollback, snapshots, the prefix cache and
batches; and qwen35moe (Qwen3.5-MoE) on the same layers. transformers' own GGUF reader has neither
(its ggml integration lists no Qwen3.5), so it is not asked to read the files back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.errors import ConfigError, ModelFormatError
from shardrt.generate import generate
from shardrt.kernels._triton import triton
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.model import Step
from shardrt.recurrent_state import KEEP_ROWS, SCRATCH_ROW
from shardrt.runner import BUCKETS, GraphRunner, batch_buckets, graph_buckets
from shardrt.sampling import SamplingParams
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

from .hf_gguf import PROMPT, TOKENS, greedy_of, rewrite, tiny_qwen35, write_qwen35, written
from .triton_interpreter import interpret

LAYERS = 6  # DeltaNet, DeltaNet, attention, DeltaNet, DeltaNet, attention
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    return written(tiny_qwen35(seed=0), write_qwen35, tmp_path_factory.mktemp("qwen35") / "tiny-qwen35.gguf")


def state_of(stage: Stage, seq: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return stage.state.conv[:, seq].clone(), stage.state.ssm[:, seq].clone()


def same_state(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# float32 sums taken in another order (a batch against one sequence, chunks of other lengths) part
# by up to ~2e-5 (logits near 1 through six layers of the decode step against the chunked form)
TOLERANCE = dict(rtol=1e-5, atol=5e-5)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, **TOLERANCE)


def close_state(a, b) -> bool:
    return all(close(x, y) for x, y in zip(a, b))


def test_the_layers_are_what_qwen35_makes_them(qwen35):
    path, model, _, _ = qwen35
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=64)
    cfg = stage.cfg
    assert [cfg.recurrent(i) for i in range(LAYERS)] == [t == "linear_attention" for t in model.config.layer_types]
    assert cfg.attention_gate and cfg.qk_norm and cfg.rope_dim == 4 and cfg.full_attention_every == 3
    assert (cfg.ssm_conv_kernel, cfg.ssm_k_dim, cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_v_dim) == (4, 16, 2, 4, 8)
    # KV only for the two attention layers, a state for the four DeltaNet layers
    assert stage.k_cache.shape[0] == 2 and stage.state.ssm.shape[:2] == (4, 1)


def test_logits_and_greedy_tokens_equal_transformers(qwen35):
    path, _, ref, greedy = qwen35
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=128)
    ours = stage.forward(PROMPT, 0, all_logits=True)
    assert ref.abs().max() > 1 and (ours - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([stage])) == greedy and len(set(greedy)) > 4


def test_a_long_prompt_through_the_chunked_rule_equals_transformers(qwen35):
    # 150 tokens: more than a chunk (64) of the chunked form, and prefilled in pieces, the
    # pieces carrying the conv and recurrent states from one to the next
    path, model, _, _ = qwen35
    ids = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=256)
    assert (stage.forward(ids, 0, all_logits=True) - ref).abs().max() < 1e-3
    stage.reset()
    pieces = [stage.forward(ids[a:b], a, all_logits=True) for a, b in ((0, 100), (100, 140), (140, 141), (141, 150))]
    assert (torch.cat(pieces) - ref).abs().max() < 1e-3


def test_three_processes_give_the_same_tokens(qwen35):
    path, _, _, greedy = qwen35
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128).with_defaults()
    with Cluster(config, path) as cluster:
        # the first daemon's layers are all DeltaNet ones: a stage with no KV cache at all
        assert [s.span.stop - s.span.start for s in cluster.pipeline.stages] == [2, 2, 2]
        assert cluster.generate(Tokenizer(path), PROMPT.tolist(), GREEDY).tokens == greedy


@pytest.mark.parametrize("kind, options", [
    ("ngram", {}),
    ("capture", {"capture_layers": (3,)}),  # early exits through two DeltaNet layers and an attention one
    ("model", {"tokens": 3}),  # the model drafts for itself, in its own daemon: rolled back to what was accepted
])
def test_speculative_decoding_gives_the_plain_tokens(qwen35, kind, options):
    path, _, _, greedy = qwen35
    draft = DraftConfig(kind, model=path if kind == "model" else None, **options)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1"), max_ctx=128, draft=draft).with_defaults()
    with Cluster(config, path) as cluster:
        result = cluster.generate(Tokenizer(path), PROMPT.tolist(), GREEDY)
    assert result.tokens == greedy
    spec = result.spec
    assert spec["drafted"] > 0 and spec["target_forwards"] < TOKENS
    if kind == "model":
        assert spec["accept_rate"] == 1.0
    else:
        assert spec["drafted"] > spec["accepted"]  # rejected drafts: the states were rolled back


def test_a_rejected_verify_restores_the_state_bit_for_bit(qwen35):
    path, *_ = qwen35
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=128)
    stage.forward(PROMPT, 0)
    pos = len(PROMPT)
    before = state_of(stage)
    verify = torch.tensor([5, 6, 7, 8, 9])  # the last token and four drafts
    stage.forward(verify, pos, all_logits=True)
    assert not same_state(state_of(stage), before)
    stage.truncate(pos)  # every draft rejected, and the token before them too
    assert same_state(state_of(stage), before) and stage.length == pos
    # two accepted: the state the verify computed after them (a forward of those three rows alone
    # gets its inputs from products over fewer rows, so it agrees to rounding, not to the bit)
    stage.forward(verify, pos)
    stage.truncate(pos + 3)
    rolled = state_of(stage)
    stage.truncate(pos)
    stage.forward(verify[:3], pos)
    assert close_state(state_of(stage), rolled)
    # an early exit (the capture drafter) runs on a scratch state: the live one is untouched
    kept = state_of(stage)
    stage.run(torch.tensor([11]), pos + 3, stop_after=3)
    stage.run(torch.tensor([12]), pos + 4, stop_after=3)
    assert same_state(state_of(stage), kept)


def test_a_position_the_state_does_not_hold_is_refused(qwen35):
    path, *_ = qwen35
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=256)
    long = KEEP_ROWS + 10
    stage.forward(torch.arange(long), 0)  # a long forward: no way back into it
    stage.forward(torch.tensor([1, 2, 3]), long)  # kept, from a mark where the long one ended
    with pytest.raises(ConfigError, match=f"recurrent state of sequence 0 is held only at positions {long}..{long + 3}"):
        stage.truncate(KEEP_ROWS)
    stage.truncate(long + 1)
    stage.truncate(0)  # the empty state is always there, and rows are kept from it again
    assert stage.length == 0 and not stage.state.ssm.any() and not stage.state.conv.any()
    stage.forward(torch.arange(5), 0)
    stage.truncate(2)
    two = state_of(stage)
    stage.truncate(0)
    stage.forward(torch.arange(2), 0)
    assert close_state(state_of(stage), two)


def test_snapshot_restore_carries_the_state(qwen35):
    path, *_ = qwen35
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=128)
    stage.forward(PROMPT, 0)
    before = state_of(stage)
    assert stage.kv_snapshot(2) == len(PROMPT)
    first = stage.forward(torch.tensor([50]), len(PROMPT))
    stage.forward(torch.arange(40), 0)  # another sequence in its place
    assert stage.kv_restore(2) == len(PROMPT) and same_state(state_of(stage), before)
    assert torch.equal(stage.forward(torch.tensor([50]), len(PROMPT)), first)


def test_prefix_cache_reuse_gives_the_same_tokens(qwen35):
    path, *_ = qwen35
    tokenizer = Tokenizer(path)
    first = PROMPT.tolist()
    second = first + [40, 41, 42, 43, 44, 45]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128)
    with Cluster(config.with_defaults(), path) as cluster:
        assert cluster.prefix_cache.whole_only
        run = lambda ids: generate(cluster.pipeline, tokenizer, ids, params, prefix_cache=cluster.prefix_cache)  # noqa: E731
        cold = run(first)
        warm = run(second)  # restarts from the snapshot of the first prompt but its last token
        again = run(second)
    assert (cold.reused_tokens, warm.reused_tokens, again.reused_tokens) == (0, len(first) - 1, len(second) - 1)
    with Cluster(LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=128, prefix_cache_slots=0).with_defaults(),
                 path) as cluster:
        fresh = [generate(cluster.pipeline, tokenizer, ids, params).tokens for ids in (first, second)]
    assert [cold.tokens, warm.tokens] == fresh and again.tokens == warm.tokens


def test_batched_sequences_equal_each_alone(qwen35):
    # three prompts in one step (chunks of different lengths), then decode rows of all three
    path, *_ = qwen35
    prompts = [PROMPT.tolist(), PROMPT.tolist()[:9], [3] + PROMPT.tolist()[4:]]
    alone = Stage(path, 0, LAYERS, "cpu", max_ctx=128)
    want = []
    for p in prompts:
        alone.reset()
        tokens = [alone.run_argmax(torch.tensor(p), 0)[0][-1]]
        while len(tokens) < 8:
            tokens.append(alone.run_argmax(torch.tensor(tokens[-1:]), len(p) + len(tokens) - 1)[0][-1])
        want.append(tokens)
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=128, max_seqs=3)
    ids = [t for p in prompts for t in p]
    seqs = [s for s, p in enumerate(prompts) for _ in p]
    positions = [i for p in prompts for i in range(len(p))]
    ends = [sum(len(p) for p in prompts[: s + 1]) - 1 for s in range(3)]
    got = [[t] for t in stage.run_batch(torch.tensor(ids), seqs, positions, tokens=True, outputs=ends)]
    while len(got[0]) < 8:
        step = stage.run_batch(torch.tensor([g[-1] for g in got]), [0, 1, 2],
                               [len(p) + len(g) - 1 for p, g in zip(prompts, got)], tokens=True)
        for g, t in zip(got, step):
            g.append(t)
    assert got == want


def test_the_serve_scheduler_keeps_prompt_snapshots_and_reuses_them(qwen35):
    """Three requests sharing a system prompt decode together (no prefix copied between running
    requests: a state is held only at its sequence's end); each prompt stops a token short for a
    snapshot, so the same prompts again, and one that extends the first, restart from there."""
    from shardrt.server.batch import BatchScheduler
    from shardrt.server.engine import Job
    from shardrt.spec.prefix_cache import PrefixCache

    from .test_batching import run_scheduler

    path, *_ = qwen35
    tokenizer = Tokenizer(path)
    system = PROMPT.tolist() * 2
    prompts = [system + [60 + i, 70 + i] for i in range(3)] + [system + [60, 70, 80, 81]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = Pipeline([Stage(path, 0, LAYERS, "cpu", max_ctx=128)])
    want = [generate(alone, tokenizer, ids, params).tokens for ids in prompts]
    pipeline = Pipeline([Stage(path, 0, LAYERS, "cpu", max_ctx=128, max_seqs=4)])
    scheduler = BatchScheduler(pipeline, tokenizer, PrefixCache(pipeline, 8), max_batch_tokens=20)
    first = [Job(None, ids, params) for ids in prompts[:3]]
    done = run_scheduler(scheduler, first)
    assert [done[id(j)].tokens for j in first] == want[:3] and scheduler.shared.requests == 0
    scheduler.step()  # their slots are given back (and their answers snapshotted)
    again = [Job(None, ids, params) for ids in prompts]
    done = run_scheduler(scheduler, again)
    assert [done[id(j)].tokens for j in again] == want
    assert [done[id(j)].reused_tokens for j in again] == [len(p) - 1 for p in prompts[:3]] + [len(prompts[0]) - 1]


# -- graph mode: the steps a GPU stage's graphs capture, run eagerly on the CPU ----------------------


class EagerGraphs(GraphRunner):
    """GraphRunner without CUDA: each replay stages its ids, positions, slots and kept row as the
    runner does, into the tensors its Steps read, and runs Stage.step_outputs over the bucket's
    Step eagerly. That is the graph-mode path (base_pos None, rows and sequences in tensors,
    padding rows at -1 in slot 0), through Stage.run and run_batch, on a CPU."""

    def __init__(self, stage: Stage):
        self.stage, self.device, self.profile = stage, stage.device, None
        self.buckets, self.batch_buckets = graph_buckets(stage, BUCKETS, batch_buckets(stage.max_seqs))
        top = max(self.buckets + self.batch_buckets)
        self.staged = torch.zeros(4, top, dtype=torch.long)
        self.ids_positions = torch.zeros(4, top, dtype=torch.long)
        self.activation = None  # (stages that embed)
        self.graphs = {n: self._step(n) for n in self.buckets}
        self.batch_graphs = {b: self._step(b, batch=True) for b in self.batch_buckets}

    def _launch(self, step, inputs, stage_positions):
        stage_positions(self.staged)
        self.staged[0, : inputs.shape[0]] = inputs
        self.ids_positions.copy_(self.staged)
        return self.stage.step_outputs(self._inputs(step.positions.shape[0]), step, every_layer=not step.batch)


def graphed_stage(path, max_seqs: int, max_ctx: int = 128) -> Stage:
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=max_ctx, max_seqs=max_seqs)
    stage.runner = EagerGraphs(stage)
    return stage


def test_graph_steps_of_a_batch_equal_the_eager_batch_and_padding_touches_no_state(qwen35):
    path, *_ = qwen35
    prompts = [PROMPT.tolist(), PROMPT.tolist()[:9], [3] + PROMPT.tolist()[4:], PROMPT.tolist()[5:]]
    eager, graphed = Stage(path, 0, LAYERS, "cpu", max_ctx=128, max_seqs=4), graphed_stage(path, 4)
    # a recurrent state: graphs for one token of one sequence and for batches of one token each
    assert (graphed.runner.buckets, graphed.runner.batch_buckets) == ((1,), (1, 2, 4))
    last = {}
    for stage in (eager, graphed):
        for seq, p in enumerate(prompts):
            last[seq] = stage.run_argmax(torch.tensor(p), 0, seq=seq)[0][-1]  # more than one token: eager
    assert graphed.graph_forwards == 0
    # in bucket 4 with a padding row in slot 0 beside sequence 0's own row, sequences out of order;
    # then without sequence 0 (its state and sequence 3's are left alone); two sequences; one
    for seqs in ([2, 0, 1], [3, 1, 0, 2], [1, 3, 2], [2, 1], [0], [3, 0, 1]):
        ids, positions = torch.tensor([last[s] for s in seqs]), [eager.lengths[s] for s in seqs]
        out_of_batch = {s: state_of(graphed, s) for s in range(4) if s not in seqs}
        want = eager.run_batch(ids, seqs, positions)
        got = graphed.run_batch(ids, seqs, positions)
        assert close(got, want)
        assert all(close_state(state_of(graphed, s), state_of(eager, s)) for s in seqs)
        assert all(same_state(state_of(graphed, s), held) for s, held in out_of_batch.items())
        last.update(zip(seqs, want.argmax(-1).tolist()))
    assert graphed.graph_forwards == 6 and graphed.lengths == eager.lengths
    # a step of padding rows only: no sequence's state (nor KV) moves; the padding slot's does
    held = [state_of(graphed, s) for s in range(4)]
    kv = graphed.k_cache.clone(), graphed.v_cache.clone()
    scratch = graphed.state.padded_ssm[:, graphed.state.padding_slot].clone()
    padding = Step(torch.full((4,), -1), slots=torch.zeros(4, dtype=torch.long), batch=True)
    with torch.inference_mode():
        graphed.step_outputs(torch.tensor([5, 6, 7, 8]), padding, every_layer=False)
    assert all(same_state(state_of(graphed, s), h) for s, h in enumerate(held))
    assert torch.equal(graphed.k_cache, kv[0]) and torch.equal(graphed.v_cache, kv[1])
    assert not torch.equal(graphed.state.padded_ssm[:, graphed.state.padding_slot], scratch)


def test_graph_decodes_of_sequence_0_keep_their_rows_and_roll_back_bit_for_bit(qwen35):
    path, *_ = qwen35
    eager, graphed = Stage(path, 0, LAYERS, "cpu", max_ctx=128, max_seqs=2), graphed_stage(path, 2)
    for stage in (eager, graphed):
        stage.forward(PROMPT, 0)
        stage.forward(PROMPT[:5], 0, seq=1)
    pos = len(PROMPT)
    before = state_of(graphed)
    states, token = {}, 7
    for p in range(pos, pos + 3):  # one token a step: graph replays, each keeping its rows
        want, got = (s.forward(torch.tensor([token]), p) for s in (eager, graphed))
        assert close(got, want) and close_state(state_of(graphed), state_of(eager))
        states[p + 1], token = state_of(graphed), int(want.argmax())
    assert graphed.graph_forwards == 3 and (graphed.state.mark, graphed.state.kept) == (0, pos + 3)
    # sequence 1's one-token step keeps nothing: what it fed goes to the scratch row, not to
    # sequence 0's kept rows
    kept = [rows[:, : graphed.state.kept].clone() for rows in graphed.state.rows]
    assert not graphed.state.rows.mixed[:, SCRATCH_ROW].any()
    want, got = (s.forward(torch.tensor([9]), 5, seq=1) for s in (eager, graphed))
    assert close(got, want) and graphed.graph_forwards == 4
    assert graphed.state.rows.mixed[:, SCRATCH_ROW].any()
    assert all(torch.equal(rows[:, : graphed.state.kept], k) for rows, k in zip(graphed.state.rows, kept))
    # a verify of four tokens runs eagerly (one token bucket for a recurrent state), kept after them
    graphed.forward(torch.tensor([5, 6, 7, 8]), pos + 3, all_logits=True)
    assert graphed.graph_forwards == 4 and graphed.state.kept == pos + 7
    graphed.truncate(pos + 2)  # the mark's state, replayed through rows a graph step kept
    assert same_state(state_of(graphed), states[pos + 2])
    graphed.truncate(pos)
    assert same_state(state_of(graphed), before)
    # decodes up to KEEP_ROWS kept rows, then one more: a graph step moves the mark where it starts
    for p in range(pos, KEEP_ROWS + 2):
        graphed.forward(torch.tensor([p % 50]), p)
        states[p + 1] = state_of(graphed)
    assert (graphed.state.mark, graphed.state.kept) == (KEEP_ROWS, 2)
    graphed.truncate(KEEP_ROWS + 1)
    assert same_state(state_of(graphed), states[KEEP_ROWS + 1])
    graphed.truncate(KEEP_ROWS)
    assert same_state(state_of(graphed), states[KEEP_ROWS])
    with pytest.raises(ConfigError, match="held only at positions"):
        graphed.truncate(KEEP_ROWS - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_graphs_decode_as_the_eager_stage(qwen35):
    """On cuda:0, float32: a stage with graphs (token bucket 1, batch buckets) against one without:
    16 greedy tokens, a rollback into rows that graph replays kept, and batched decode steps with
    a padding row."""
    from shardrt.kernels._triton import use_triton

    path, *_ = qwen35
    graphed = Stage(path, 0, LAYERS, "cuda:0", max_ctx=128, dtype=torch.float32, max_seqs=4)
    eager = Stage(path, 0, LAYERS, "cuda:0", max_ctx=128, dtype=torch.float32, max_seqs=4, graphs=False)
    assert graphed.runner is not None and eager.runner is None and graphed.runner.buckets == (1,)
    assert graphed.runner.batch_buckets == ((1, 2, 4) if use_triton(graphed.k_cache) else ())
    pos, tokens, states = len(PROMPT), {}, {}
    for stage in (eager, graphed):
        tokens[stage] = [stage.run_argmax(PROMPT, 0)[0][-1]]  # the prompt: eager
        while len(tokens[stage]) < 16:
            p = pos + len(tokens[stage]) - 1
            tokens[stage].append(stage.run_argmax(torch.tensor(tokens[stage][-1:]), p)[0][-1])
            if stage is graphed:
                states[p + 1] = state_of(graphed)
    assert tokens[graphed] == tokens[eager] and len(set(tokens[eager])) > 2
    assert graphed.stats()["graph_forwards"] == 15 and eager.stats()["graph_forwards"] == 0
    # back into rows that graph replays kept: the state they computed (to rounding: a replay runs
    # the kernel over many tokens at once), and the same bits from every replay
    graphed.truncate(pos + 8)
    replayed = state_of(graphed)
    assert close_state(replayed, states[pos + 8])
    graphed.forward(torch.tensor(tokens[graphed][8:9]), pos + 8)
    graphed.truncate(pos + 8)
    assert same_state(state_of(graphed), replayed)
    for stage in (eager, graphed):
        stage.truncate(pos)
    want, got = (s.forward(torch.tensor(tokens[eager][:1]), pos) for s in (eager, graphed))
    assert (got - want).abs().max().item() < 1e-4 and graphed.graph_forwards == 17
    if not graphed.runner.batch_buckets:
        return
    prompts = [PROMPT.tolist(), PROMPT.tolist()[:9], [3] + PROMPT.tolist()[4:]]
    last = {}
    for stage in (eager, graphed):
        stage.reset()
        for seq, p in enumerate(prompts):
            last[seq] = stage.run_argmax(torch.tensor(p), 0, seq=seq)[0][-1]
    replays = graphed.graph_forwards
    # bucket 4 with a padding row (slot 0) beside sequence 0's row; buckets 2 and 1 without
    for seqs in ([0, 1, 2], [2, 0], [1], [2, 1, 0], [1, 2], [0, 2, 1]):
        ids, positions = torch.tensor([last[s] for s in seqs]), [eager.lengths[s] for s in seqs]
        out_of_batch = {s: state_of(graphed, s) for s in range(4) if s not in seqs}
        want = eager.run_batch(ids, seqs, positions)
        got = graphed.run_batch(ids, seqs, positions)
        assert (got - want).abs().max().item() < 1e-4
        assert all(same_state(state_of(graphed, s), held) for s, held in out_of_batch.items())
        last.update(zip(seqs, want.argmax(-1).tolist()))
    assert graphed.graph_forwards == replays + 6
    assert all(torch.allclose(a, b, rtol=0, atol=1e-4) for s in range(3)
               for a, b in zip(state_of(graphed, s), state_of(eager, s)))
    assert not any(t.any() for t in state_of(graphed, 3))  # the empty sequence stayed empty


def test_the_plan_counts_the_state_the_stages_hold(qwen35):
    path, *_ = qwen35
    env = dict(os.environ, SHARDRT_CACHE=str(path.parent / "cache"))
    proc = subprocess.run([sys.executable, "-m", "shardrt.cli", "plan", str(path), "--target-gpus", "cpu:0,cpu:1,cpu:2",
                           "--max-ctx", "64", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shards = json.loads(proc.stdout)["shards"]
    for shard, (start, stop) in zip(shards, ((0, 2), (2, 4), (4, 6))):
        stage = Stage(path, start, stop, "cpu", max_ctx=64)
        assert shard["state_bytes"] == stage.state.nbytes
        assert shard["kv_bytes"] == 2 * stage.k_cache.numel() * stage.k_cache.element_size()
        assert shard["cover"] == str(stage.cover)
    assert shards[0]["kv_bytes"] == 0  # DeltaNet layers only


def test_the_chat_template_comes_from_the_gguf(qwen35):
    path, *_ = qwen35
    env = dict(os.environ, SHARDRT_CACHE=str(path.parent / "cache"))
    proc = subprocess.run([sys.executable, "-m", "shardrt.cli", "launch", str(path), "--target-gpus", "cpu:0",
                           "--chat", "-p", "hi", "-n", "4", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rendered = Tokenizer(path).encode_chat([{"role": "user", "content": "hi"}])
    assert json.loads(proc.stdout)["prompt_tokens"] == rendered and len(rendered) > len("hi")


@pytest.mark.parametrize("damage, needle", [
    (dict(drop_tensors=["blk.1.ssm_a"]), "lacks tensor 'blk.1.ssm_a'"),
    (dict(edit={"blk.3.ssm_conv1d.weight": lambda a: a[:, :3]}),
     r"'blk.3.ssm_conv1d.weight' has shape \[96, 3\], but the qwen35"),
    (dict(extra_keys={"qwen35.ssm.group_count": 3}), "time_step_rank 4 is not a multiple of ssm.group_count 3"),
])
def test_a_damaged_qwen35_file_is_refused_by_name(qwen35, tmp_path, damage, needle):
    path, *_ = qwen35
    broken = rewrite(path, tmp_path / "broken.gguf", "qwen35", **damage)
    with pytest.raises(ModelFormatError, match=needle):
        Stage(broken, 0, LAYERS, "cpu", max_ctx=16)


def test_the_cli_names_a_missing_ssm_tensor_in_one_line(qwen35, tmp_path):
    path, *_ = qwen35
    broken = rewrite(path, tmp_path / "broken.gguf", "qwen35", drop_tensors=["blk.4.ssm_dt.bias"])
    env = dict(os.environ, SHARDRT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "shardrt.cli", "launch", "--model", str(broken), "--target-gpus",
                           "cpu:0", "-p", "hi", "-n", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["shardrt: error: model: 'broken.gguf' lacks tensor 'blk.4.ssm_dt.bias'"]


def test_a_stage_maps_only_its_layers(qwen35):
    path, *_ = qwen35
    first, last = Stage(path, 0, 2, "cpu", max_ctx=16), Stage(path, 4, 6, "cpu", max_ctx=16)
    whole = Stage(path, 0, LAYERS, "cpu", max_ctx=16)
    assert first.cover.covered_bytes < whole.cover.covered_bytes and last.cover.covered_bytes < whole.cover.covered_bytes
    assert first.state.ssm.shape[0] == 2 and first.k_cache.shape[0] == 0


def check_the_kernels(path: str, device: str) -> dict:
    """The family through the kernels of `device` (Triton's, the delta rule's among them), float32:
    its logits against transformers' in the file beside the model, greedy tokens, and a rolled-back
    verify (replayed by the same kernel) bit for bit."""
    from pathlib import Path

    path = Path(path)
    ref, greedy = torch.load(path.with_suffix(".ref"))
    stage = Stage(path, 0, LAYERS, device, max_ctx=64, dtype=torch.float32)
    error = (stage.forward(PROMPT.to(device), 0, all_logits=True).cpu() - ref).abs().max().item()
    tokens = greedy_of(Pipeline([stage]))
    stage.truncate(len(PROMPT) + 3)
    before = state_of(stage)
    stage.forward(torch.tensor([5, 6, 7, 8], device=device), len(PROMPT) + 3)
    stage.truncate(len(PROMPT) + 3)
    return {"error": error, "greedy": tokens == greedy, "rolled_back": same_state(state_of(stage), before)}


@pytest.fixture(scope="module")
def with_reference(qwen35):
    path, _, ref, greedy = qwen35
    torch.save((ref, greedy), path.with_suffix(".ref"))
    return path


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
def test_the_triton_kernels_under_the_interpreter_follow_transformers(with_reference):
    result = interpret("import json; from tests.test_qwen35 import check_the_kernels; "
                       f"print(json.dumps(check_the_kernels({str(with_reference)!r}, 'cpu')))")
    assert result["error"] < 1e-3 and result["greedy"] and result["rolled_back"], result


def check_graph_steps(path: str) -> dict:
    """The graph-mode path (EagerGraphs) against the eager stage, through the kernels of the CPU
    (Triton's under its interpreter): batch steps with a padding row, one-token steps of sequence
    0 and a rollback into their kept rows; and the shapes Triton's decode step got in each graph
    step (one shape per bucket, as a captured graph holds it)."""
    from shardrt.kernels import deltanet as rule

    kernel, shapes = rule._decode_step_triton, []

    def recording(mixed, *args):
        shapes.append(tuple(mixed.shape))
        return kernel(mixed, *args)

    rule._decode_step_triton = recording
    eager, graphed = Stage(path, 0, LAYERS, "cpu", max_ctx=64, max_seqs=4), graphed_stage(path, 4, max_ctx=64)
    prompts = [PROMPT.tolist(), PROMPT.tolist()[:9], [3] + PROMPT.tolist()[4:]]
    last = {}
    for stage in (eager, graphed):
        for seq, p in enumerate(prompts):
            last[seq] = stage.run_argmax(torch.tensor(p), 0, seq=seq)[0][-1]
    error, held, fixed = 0.0, True, True
    for seqs, bucket in (([2, 0, 1], 4), ([1, 2], 2), ([0], 1), ([1, 0, 2], 4)):
        ids, positions = torch.tensor([last[s] for s in seqs]), [eager.lengths[s] for s in seqs]
        out_of_batch = {s: state_of(graphed, s) for s in range(4) if s not in seqs}
        want = eager.run_batch(ids, seqs, positions)
        shapes.clear()
        got = graphed.run_batch(ids, seqs, positions)
        fixed &= set(shapes) == {(bucket, graphed.cfg.conv_dim)}
        error = max(error, ((got - want).abs() / (1 + want.abs())).max().item())  # relative past 1
        held &= all(same_state(state_of(graphed, s), h) for s, h in out_of_batch.items())
        last.update(zip(seqs, want.argmax(-1).tolist()))
    pos = graphed.lengths[0]
    graphed.forward(torch.tensor([4, 5]), pos)  # kept rows from a mark here (after the batches: none)
    eager.forward(torch.tensor([4, 5]), pos)
    states = {}
    for p in range(pos + 2, pos + 5):
        shapes.clear()
        want, got = (s.forward(torch.tensor([p % 50]), p) for s in (eager, graphed))
        fixed &= set(shapes) == {(1, graphed.cfg.conv_dim)}
        error = max(error, ((got - want).abs() / (1 + want.abs())).max().item())  # relative past 1
        states[p + 1] = state_of(graphed)
    graphed.truncate(pos + 3)
    rolled_back = same_state(state_of(graphed), states[pos + 3])
    return {"error": error, "held": held, "shapes_fixed": fixed, "rolled_back": rolled_back,
            "graph_forwards": graphed.graph_forwards}


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
def test_graph_steps_through_the_triton_kernels_under_the_interpreter(qwen35):
    path, *_ = qwen35
    result = interpret("import json; from tests.test_qwen35 import check_graph_steps; "
                       f"print(json.dumps(check_graph_steps({str(path)!r})))")
    assert result == {**result, "held": True, "shapes_fixed": True, "rolled_back": True, "graph_forwards": 7}, result
    # the decode step's kernels compute the norms, the decay and the convolution's sum themselves,
    # rounded in another order than the eager step's torch ops: float32 apart by ~1e-5 after 6 layers
    assert result["error"] <= 2e-5, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_kernels_follow_transformers(with_reference):
    result = check_the_kernels(str(with_reference), "cuda:0")
    assert result["error"] < 1e-3 and result["greedy"] and result["rolled_back"], result


# -- qwen35moe: the same layers with qwen3moe's experts and a shared expert behind a sigmoid gate ------


@pytest.fixture(scope="module")
def qwen35moe(tmp_path_factory):
    return written(tiny_qwen35(seed=1, moe=True), write_qwen35, tmp_path_factory.mktemp("qwen35moe") / "tiny.gguf")


def test_qwen35moe_logits_and_greedy_tokens_equal_transformers(qwen35moe):
    path, _, ref, greedy = qwen35moe
    stage = Stage(path, 0, LAYERS, "cpu", max_ctx=128)
    assert (stage.cfg.arch, stage.cfg.n_experts, stage.cfg.n_experts_used, stage.cfg.shared_expert_ffn_dim) == \
        ("qwen35moe", 8, 2, 48)
    ours = stage.forward(PROMPT, 0, all_logits=True)
    assert ref.abs().max() > 1 and (ours - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([stage])) == greedy and len(set(greedy)) > 4


def test_qwen35moe_in_three_processes_and_speculative(qwen35moe):
    path, _, _, greedy = qwen35moe
    tokenizer = Tokenizer(path)
    with Cluster(LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128).with_defaults(), path) as cluster:
        assert cluster.generate(tokenizer, PROMPT.tolist(), GREEDY).tokens == greedy
    spec = LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=128, draft=DraftConfig(kind="ngram")).with_defaults()
    with Cluster(spec, path) as cluster:
        result = cluster.generate(tokenizer, PROMPT.tolist(), GREEDY)
    assert result.tokens == greedy and result.spec["drafted"] > 0


def test_a_qwen35moe_file_without_its_shared_expert_gate_is_refused(qwen35moe, tmp_path):
    path, *_ = qwen35moe
    broken = rewrite(path, tmp_path / "broken.gguf", "qwen35moe", drop_tensors=["blk.2.ffn_gate_inp_shexp.weight"])
    with pytest.raises(ModelFormatError, match="lacks tensor 'blk.2.ffn_gate_inp_shexp.weight'"):
        Stage(broken, 0, LAYERS, "cpu", max_ctx=16)
