"""gpt-oss against transformers: a tiny random GptOss made with transformers (from_config, seeded;
sinks, biases, windows, YaRN rope, the clamped SwiGLU), written to GGUF with llama.cpp's names and
keys (tests/hf_gguf.py), then run by shardrt in one process and split over three. Float32 on the
CPU; the split-KV kernel with its sinks on a GPU. transformers' own GGUF reader does not read
llama.cpp's gpt-oss files (it looks for other expert tensor names), so it is not asked to."""

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

from .hf_gguf import PROMPT, TOKENS, greedy_of, rewrite, tiny_gpt_oss, write_gpt_oss, written

@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    return written(tiny_gpt_oss(seed=1), write_gpt_oss, tmp_path_factory.mktemp("oss") / "tiny-gpt-oss.gguf")


def test_the_layers_are_what_gpt_oss_makes_them(oss):
    path, *_ = oss
    cfg = Stage(path, 0, 4, "cpu", max_ctx=64).cfg
    assert [cfg.local(i) for i in range(4)] == [True, False, True, False]  # even layers slide, as transformers'
    assert cfg.attention_sinks and cfg.expert_biases and cfg.qkv_bias and cfg.output_bias
    assert (cfg.yarn.factor, cfg.yarn.original_context, cfg.yarn.truncate) == (8.0, 64, False)


def test_logits_and_greedy_tokens_equal_transformers(oss):
    path, _, ref, greedy = oss
    stage = Stage(path, 0, 4, "cpu", max_ctx=128)
    ours = stage.forward(PROMPT, 0, all_logits=True)
    assert ref.abs().max() > 1 and (ours - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([stage])) == greedy  # 49 positions: the window of 8 slides
    assert len(set(greedy)) > 4


def test_without_the_sinks_the_logits_differ(oss, tmp_path):
    # the sinks carry weight here: zeroing them moves the logits (so the test above checks them)
    path, _, ref, _ = oss
    flat = rewrite(path, tmp_path / "flat.gguf", "gpt-oss",
                   edit={f"blk.{i}.attn_sinks.weight": lambda a: a * 0 - 30 for i in range(4)})
    ours = Stage(flat, 0, 4, "cpu", max_ctx=64).forward(PROMPT, 0, all_logits=True)
    assert (ours - ref).abs().max() > 1e-2


def test_three_processes_and_speculative_decoding_give_the_same_tokens(oss):
    path, _, _, greedy = oss
    tokenizer = Tokenizer(path)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128).with_defaults()
    with Cluster(config, path) as cluster:
        assert [s.span.stop - s.span.start for s in cluster.pipeline.stages] == [1, 2, 1]
        assert cluster.generate(tokenizer, PROMPT.tolist(), params).tokens == greedy
    spec = LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=128, draft=DraftConfig(kind="ngram")).with_defaults()
    with Cluster(spec, path) as cluster:
        result = cluster.generate(tokenizer, PROMPT.tolist(), params)
        assert result.tokens == greedy and result.spec["target_forwards"] < TOKENS + 1


@pytest.mark.parametrize("damage, needle", [
    (dict(drop_tensors=["blk.2.attn_sinks.weight"]), "'blk.2.attn_sinks.weight'"),
    (dict(drop_tensors=["blk.0.ffn_down_exps.bias"]), "'blk.0.ffn_down_exps.bias'"),
    (dict(extra_keys={"gpt-oss.rope.scaling.factor": 0.5}), "rope.scaling.factor = 0.5 is below 1"),
    (dict(extra_keys={"gpt-oss.attention.sliding_window": 0}), "sliding_window = 0 is not a positive window"),
])
def test_a_damaged_gpt_oss_file_is_refused_by_name(oss, tmp_path, damage, needle):
    path, *_ = oss
    broken = rewrite(path, tmp_path / "broken.gguf", "gpt-oss", **damage)
    with pytest.raises(ModelFormatError, match=needle):
        Stage(broken, 0, 4, "cpu", max_ctx=16)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_sinks_in_the_gpu_kernels_follow_transformers(oss):
    path, _, ref, greedy = oss
    gpu = Stage(path, 0, 4, "cuda:0", max_ctx=128, dtype=torch.float32)
    assert (gpu.forward(PROMPT.cuda(), 0, all_logits=True).cpu() - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([gpu])) == greedy
