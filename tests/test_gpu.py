"""On a CUDA GPU: the stage on the GPU against the CPU, and the mixed cpu:0,cuda:0 split with
the CUDA stage in a pinned daemon. Skipped where torch sees no GPU (CI)."""

from __future__ import annotations

import os

import pytest
import torch

from shardrt.config import LaunchConfig
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


def test_cuda_bf16_agrees_with_cpu(demo_model, cpu_run):
    ids, logits, tokens = cpu_run
    stage = Stage(demo_model, 0, 30, "cuda:0", max_ctx=256)
    assert stage.dtype == torch.bfloat16
    got = stage.forward(torch.tensor(ids), 0, all_logits=True).cpu()
    cos = torch.nn.functional.cosine_similarity(got, logits, dim=-1)
    assert cos.min().item() > 0.99
    assert (got.argmax(-1) == logits.argmax(-1)).float().mean().item() > 0.9


def test_mixed_cpu_and_cuda_daemon(demo_model, cpu_run):
    ids, logits, tokens = cpu_run
    config = LaunchConfig(devices=parse_devices("cpu:0,cuda:0"), max_ctx=256, dtype="float32")
    with Cluster(config, demo_model) as cluster:
        (remote,) = cluster.remote
        assert remote.hello["visible_env"] == {"CUDA_VISIBLE_DEVICES": "0"}
        assert remote.hello["local_devices"] == [0] and remote.hello["backend"] == "cuda"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "0"
        got = cluster.pipeline.forward(torch.tensor(ids), 0, all_logits=True)
        assert (got - logits).abs().max().item() < 1e-2
        assert greedy(cluster.pipeline, ids) == tokens
