"""On a CUDA GPU: the stage on the GPU (graph replays and the eager loop) against the CPU, the
speculative verify through graph buckets, and the mixed cpu:0,cuda:0 split with the CUDA stage
in a pinned daemon. Skipped where torch sees no GPU (CI); run through the device."""

from __future__ import annotations

import os

import pytest
import torch

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.generate import generate
from shardrt.sampling import SamplingParams
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.stage import Stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None,
                                reason="needs a CUDA GPU")

PROMPT = "The history of computing is a story of machines that grew smaller, faster and cheaper, and of"
N = 32


def greedy(pipeline: Pipeline, ids: list[int], n: int = N) -> list[int]:
    pipeline.reset()
    tokens = [pipeline.greedy(torch.tensor(ids), 0)]
    while len(tokens) < n:
        tokens.append(pipeline.greedy(torch.tensor([tokens[-1]]), len(ids) + len(tokens) - 1))
    return tokens


@pytest.fixture(scope="module")
def cpu_run(demo_model, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPT)
    cpu = Pipeline([Stage(demo_model, 0, 30, "cpu", max_ctx=256)])
    return ids, cpu.forward(torch.tensor(ids), 0, all_logits=True), greedy(cpu, ids)


def test_cuda_float32_matches_cpu(demo_model, cpu_run):
    ids, logits, tokens = cpu_run
    gpu = Pipeline([Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, dtype=torch.float32)])
    got = gpu.forward(torch.tensor(ids), 0, all_logits=True).cpu()
    assert (got - logits).abs().max().item() < 1e-2  # TF32-free fp32 on GPU vs CPU: summation order only
    assert greedy(gpu, ids) == tokens


@pytest.mark.parametrize("weights", ["auto", "dequantized"])
def test_cuda_bf16_agrees_with_cpu(demo_model, cpu_run, weights):
    ids, logits, tokens = cpu_run
    stage = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, weights=weights)
    assert stage.quantized == (weights == "auto")
    assert stage.dtype == torch.bfloat16
    got = stage.forward(torch.tensor(ids), 0, all_logits=True).cpu()
    cos = torch.nn.functional.cosine_similarity(got, logits, dim=-1)
    assert cos.min().item() > 0.99
    assert (got.argmax(-1) == logits.argmax(-1)).float().mean().item() > 0.9


def test_mixed_cpu_and_cuda_daemon(demo_model, cpu_run):
    ids, logits, tokens = cpu_run
    config = LaunchConfig(devices=parse_devices("cpu:0,cuda:0"), max_ctx=256, dtype="float32")
    ours = os.environ.get("CUDA_VISIBLE_DEVICES")
    with Cluster(config, demo_model) as cluster:
        (remote,) = cluster.remote
        assert remote.hello["visible_env"] == {"CUDA_VISIBLE_DEVICES": "0"}
        assert remote.hello["local_devices"] == [0] and remote.hello["backend"] == "cuda"
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == ours  # the pin is the daemon's, not ours
        got = cluster.pipeline.forward(torch.tensor(ids), 0, all_logits=True)
        assert (got - logits).abs().max().item() < 1e-2
        assert greedy(cluster.pipeline, ids) == tokens


def test_graph_replays_equal_the_eager_loop(demo_model, cpu_run):
    ids, _, tokens = cpu_run
    graphed = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, dtype=torch.float32)
    eager = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, dtype=torch.float32, graphs=False)
    assert graphed.runner is not None and eager.runner is None
    assert graphed.runner.buckets == (1, 2, 4, 8, 16, 32, 64)
    assert len(ids) <= 32
    assert greedy(Pipeline([graphed]), ids) == tokens == greedy(Pipeline([eager]), ids)
    assert graphed.graph_forwards == N and eager.graph_forwards == 0  # the prompt too, in bucket 32
    # verify-sized steps (3 and 9 tokens: buckets 4 and 16, padded) give the eager loop's logits
    for stage in (graphed, eager):
        stage.reset()
        stage.forward(torch.tensor(ids), 0)
    for n in (1, 3, 9):
        block = torch.tensor(tokens[:n])
        base = graphed.length
        got, want = (s.forward(block, base, all_logits=True) for s in (graphed, eager))
        assert got.shape == want.shape == (n, graphed.cfg.vocab_size)
        assert (got - want).abs().max().item() < 1e-4
    assert graphed.length == eager.length == len(ids) + 13


def test_cuda_bf16_graphs_follow_the_cpu_wherever_it_is_not_a_near_tie(demo_model, cpu_run):
    stage = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256)
    assert stage.dtype == torch.bfloat16 and stage.runner is not None
    assert_follows_the_cpu_where_clear(stage, demo_model, cpu_run)
    assert stage.graph_forwards == N  # the prompt and every step replayed a graph


def test_speculative_verify_through_graph_buckets(demo_model, demo_tokenizer):
    code = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
            "def mul(a, b):\n    return a * b\n\ndef div(a, b):\n")
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = demo_tokenizer.encode(code)
    plain_config = LaunchConfig(devices=parse_devices("cuda:0"), max_ctx=512, dtype="float32", prefix_cache_slots=0)
    with Cluster(plain_config, demo_model) as cluster:
        plain = generate(cluster.pipeline, demo_tokenizer, prompt, params).tokens
    with Cluster(LaunchConfig(devices=parse_devices("cuda:0"), max_ctx=512, dtype="float32", prefix_cache_slots=0,
                              draft=DraftConfig("ngram", tokens=6)), demo_model) as cluster:
        (stage,) = cluster.pipeline.stages
        result = generate(cluster.pipeline, demo_tokenizer, prompt, params, drafter=cluster.drafter,
                          draft_tokens=cluster.draft_tokens)
        assert result.tokens == plain
        assert len(prompt) <= 64  # the prompt replays bucket 64, then every verify a bucket of its own
        assert result.spec["accepted"] > 0 and stage.graph_forwards == 1 + result.spec["target_forwards"]


def test_quantized_blocks_stay_within_the_span_bytes(demo_model, cpu_run):
    ids, logits, tokens = cpu_run
    blocks = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, dtype=torch.float32)  # weights: auto
    dense = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256, dtype=torch.float32, weights="dequantized", graphs=False)
    assert blocks.quantized and not dense.quantized
    # Q4_1 blocks and a Q8_0 embedding as stored; the norms, F32 in the file, are smaller in any case
    assert blocks.weight_bytes <= 1.05 * blocks.cover.covered_bytes < dense.weight_bytes
    got = blocks.forward(torch.tensor(ids), 0, all_logits=True).cpu()
    want = dense.forward(torch.tensor(ids), 0, all_logits=True).cpu()
    assert (got - want).abs().max().item() < 1e-2 and (got - logits).abs().max().item() < 1e-2
    assert greedy(Pipeline([blocks]), ids) == tokens


def test_bf16_blocks_follow_the_cpu_wherever_it_is_not_a_near_tie(demo_model, cpu_run):
    blocks = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256)
    assert blocks.quantized and blocks.dtype == torch.bfloat16 and blocks.kernels.path == "triton"
    assert_follows_the_cpu_where_clear(blocks, demo_model, cpu_run)


def assert_follows_the_cpu_where_clear(stage: Stage, demo_model, cpu_run) -> None:
    # Greedy text in bf16 parts ways at the first near-tie (this prompt has one at token 7: the
    # CPU's top two logits lie 0.01 apart), so the check is teacher-forced: fed the CPU's tokens,
    # the bf16 stage picks the CPU's token at every step with a clear winner (a lead of more than
    # 0.3, beyond bf16's logit error on this model: 25 of the 32 steps).
    ids, _, tokens = cpu_run
    cpu = Stage(demo_model, 0, 30, "cpu", max_ctx=256)
    inputs, base, clear = torch.tensor(ids), 0, 0
    for token in tokens:
        want, got = cpu.forward(inputs, base).view(-1), stage.forward(inputs, base).view(-1).float().cpu()
        top = want.topk(2).values
        if top[0] - top[1] > 0.3:
            clear += 1
            assert got.argmax().item() == token
        base += inputs.numel()
        inputs = torch.tensor([token])
    assert clear >= 20


def test_batch_graphs_equal_each_sequence_alone(demo_model, demo_tokenizer):
    from .test_batching import PROMPTS, batched_greedy, solo_greedy

    stage = Stage(demo_model, 0, 30, "cuda:0", max_ctx=128, dtype=torch.float32, max_seqs=6)
    assert stage.runner.batch_buckets == (1, 2, 4, 6)
    pipeline = Pipeline([stage])
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS[:3]]
    want = [solo_greedy(pipeline, ids, 10) for ids in prompts]
    # a sequence outside the batch: the padding row of bucket 4 must not touch its cache
    stage.run(torch.tensor(prompts[0]), 0, seq=2)
    kept = stage.k_cache[:, 2].clone(), stage.v_cache[:, 2].clone()
    before = stage.graph_forwards
    got = batched_greedy(pipeline, prompts, 10, seqs=[5, 1, 3])
    # each prompt in a token graph, into its own slot; then three sequences a step, in bucket 4
    assert stage.graph_forwards - before == 3 + 10
    for (tokens, rows), (want_tokens, want_rows) in zip(zip(*got), want):
        assert tokens == want_tokens
        assert max((a - b).abs().max().item() for a, b in zip(rows, want_rows)) < 1e-3
    assert torch.equal(stage.k_cache[:, 2], kept[0]) and torch.equal(stage.v_cache[:, 2], kept[1])
    assert stage.lengths[2] == len(prompts[0])


def test_serve_batches_through_a_gpu_daemon_equal_each_request_alone(demo_model, tmp_path):
    """16 concurrent greedy requests over cpu:0 and a pinned cuda:0 daemon (batch graphs there, the
    two stages pipelined) each get what they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    from .test_serve_batching import complete
    from .test_server import serving

    with serving(demo_model, tmp_path / "stderr.txt", "--target-gpus", "cpu:0,cuda:0", "--dtype", "float32",
                 "--max-seqs", "16", "--max-queue", "16") as server:
        prompts = [f"Question {i}: what comes after {i * 7}? Answer:" for i in range(16)]
        alone = [complete(server, p) for p in prompts]
        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(lambda p: complete(server, p), prompts)) == alone
