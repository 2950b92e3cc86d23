"""Gemma 3 (local sliding-window layers beside global ones, their two rope bases, GeGLU, the
norms after attention and feed-forward, scaled and tied embeddings) against transformers: a tiny
random Gemma 3 (from_config, seeded; a window of 8 so that a 49-token run crosses it many
times), written to GGUF as llama.cpp writes it, run by shardrt in one process and over three."""

from __future__ import annotations

import pytest
import torch

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.sampling import SamplingParams
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

from .hf_gguf import PROMPT, TOKENS, greedy_of, tiny_gemma3, write_gemma3, written

@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return written(tiny_gemma3(seed=0), write_gemma3, tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf")


def test_the_layers_are_what_gemma3_makes_them(gemma):
    path, model, _, _ = gemma
    stage = Stage(path, 0, 7, "cpu", max_ctx=128)
    cfg = stage.cfg
    assert (cfg.sliding_window, cfg.activation, cfg.post_norms, cfg.tied_embeddings) == (8, "gelu", True, True)
    assert [cfg.local(i) for i in range(7)] == [t == "sliding_attention" for t in model.config.layer_types]
    assert cfg.embed_scale == pytest.approx(8.0) and cfg.attention_scale == pytest.approx(0.25)


def test_logits_and_greedy_tokens_equal_transformers(gemma):
    path, _, ref, greedy = gemma
    stage = Stage(path, 0, 7, "cpu", max_ctx=128)
    ours = stage.forward(PROMPT, 0, all_logits=True)
    assert ref.abs().max() > 1 and (ours - ref).abs().max() < 1e-3
    assert greedy_of(Pipeline([stage])) == greedy and len(set(greedy)) > 4


def test_three_processes_and_speculative_decoding_give_the_same_tokens(gemma):
    path, _, _, greedy = gemma
    tokenizer = Tokenizer(path)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1,cpu:2"), max_ctx=128).with_defaults()
    with Cluster(config, path) as cluster:
        assert cluster.generate(tokenizer, PROMPT.tolist(), params).tokens == greedy
    spec = LaunchConfig(devices=parse_devices("cpu:0"), max_ctx=128, draft=DraftConfig(kind="ngram")).with_defaults()
    with Cluster(spec, path) as cluster:
        assert cluster.generate(tokenizer, PROMPT.tolist(), params).tokens == greedy


def test_transformers_reads_our_file_as_we_do(gemma):
    from transformers import AutoModelForCausalLM

    path, model, ref, _ = gemma
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=model.config,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        assert (loaded(PROMPT[None]).logits[0] - ref).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_window_in_the_gpu_kernels_follows_transformers(gemma):
    path, _, ref, greedy = gemma
    gpu = Stage(path, 0, 7, "cuda:0", max_ctx=128, dtype=torch.float32)
    assert greedy_of(Pipeline([gpu])) == greedy and gpu.graph_forwards >= TOKENS - 1
