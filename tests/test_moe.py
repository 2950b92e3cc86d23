"""Mixture of experts (qwen3moe) against transformers: a tiny random Qwen3-MoE made with
transformers (from_config, seeded), written to GGUF with llama.cpp's names and keys
(tests/hf_gguf.py), then run by shardrt in one process and split over three, and read back by
transformers' own GGUF loader. Float32 on the CPU; the gathered (graph) path on a GPU."""

from __future__ import annotations

import pytest
import torch

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.errors import ModelFormatError
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.sampling import SamplingParams
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

from .hf_gguf import PROMPT, TOKENS, greedy_of, rewrite, tiny_qwen3_moe, write_qwen3_moe, written

@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return written(tiny_qwen3_moe(seed=1), write_qwen3_moe, tmp_path_factory.mktemp("moe") / "tiny-qwen3moe.gguf")


def test_logits_and_greedy_tokens_equal_transformers(moe):
    path, model, ref, greedy = moe
    stage = Stage(path, 0, 3, "cpu", max_ctx=128)
    assert stage.cfg.moe and (stage.cfg.n_experts, stage.cfg.n_experts_used, stage.cfg.expert_ffn_dim) == (8, 2, 32)
    ours = stage.forward(PROMPT, 0, all_logits=True)
    assert ref.abs().max() > 1 and (ours - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([stage])) == greedy
    assert len(set(greedy)) > 4  # not one token over and over


def test_three_processes_and_speculative_decoding_give_the_same_tokens(moe):
    path, _, _, greedy = moe
    tokenizer = Tokenizer(path)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128).with_defaults()
    with Cluster(config, path) as cluster:
        assert [s.span.stop - s.span.start for s in cluster.pipeline.stages] == [1, 1, 1]
        assert cluster.generate(tokenizer, PROMPT.tolist(), params).tokens == greedy
    spec = LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=128, draft=DraftConfig(kind="ngram")).with_defaults()
    with Cluster(spec, path) as cluster:
        result = cluster.generate(tokenizer, PROMPT.tolist(), params)
        assert result.tokens == greedy and result.spec["target_forwards"] < TOKENS + 1


def test_transformers_reads_our_file_as_we_do(moe):
    # transformers' GGUF reader maps no qwen3moe.expert_feed_forward_length (its config would take
    # the default 768): given the model's config, it reads the tensors (names, expert layout) alone
    from transformers import AutoModelForCausalLM

    path, model, ref, _ = moe
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=model.config,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        assert (loaded(PROMPT[None]).logits[0] - ref).abs().max() < 1e-4


def test_a_stage_maps_only_its_layers_experts(moe):
    path, *_ = moe
    first, last = Stage(path, 0, 1, "cpu", max_ctx=16), Stage(path, 2, 3, "cpu", max_ctx=16)
    whole = Stage(path, 0, 3, "cpu", max_ctx=16)
    assert first.cover.covered_bytes < whole.cover.covered_bytes and last.cover.covered_bytes < whole.cover.covered_bytes


@pytest.mark.parametrize("damage, needle", [
    (dict(drop_tensors=["blk.1.ffn_up_exps.weight"]), "'blk.1.ffn_up_exps.weight'"),
    (dict(extra_keys={"qwen3moe.expert_used_count": 9}), "expert_used_count 9 and expert_count 8"),
])
def test_a_damaged_moe_file_is_refused_by_name(moe, tmp_path, damage, needle):
    path, *_ = moe
    broken = rewrite(path, tmp_path / "broken.gguf", "qwen3moe", **damage)
    with pytest.raises(ModelFormatError, match=needle):
        Stage(broken, 0, 3, "cpu", max_ctx=16)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_gathered_experts_in_gpu_graphs_follow_the_cpu(moe):
    path, _, ref, greedy = moe
    gpu = Stage(path, 0, 3, "cuda:0", max_ctx=128, dtype=torch.float32)
    assert gpu.runner.buckets == (1, 2, 4, 8, 16, 32)  # GATHER_ROWS 64 / top 2
    assert greedy_of(Pipeline([gpu])) == greedy and gpu.graph_forwards >= TOKENS - 1
