"""Mixture of experts (qwen3moe) against transformers: a tiny random Qwen3-MoE made with
transformers (from_config, seeded), written to GGUF with llama.cpp's names and keys
(tests/hf_gguf.py), then run by shardrt in one process and split over three, and read back by
transformers' own GGUF loader. Float32 on the CPU; the gathered (graph) path on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardrt import kernels
from shardrt.config import DraftConfig, LaunchConfig
from shardrt.errors import ModelFormatError
from shardrt.gguf_file import GGUFFile
from shardrt.kernels import moe_qdot
from shardrt.kernels.experts import QuantizedExperts
from shardrt.kernels.activation import clamped_swiglu, silu_mul
from shardrt.kernels.moe import ExpertBiases, gathered, route
from shardrt.kernels.quant import Q, dequantize_reference
from shardrt.launch import Cluster
from shardrt.pipeline import Pipeline
from shardrt.placement import parse_devices
from shardrt.sampling import SamplingParams
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

from .hf_gguf import PROMPT, TOKENS, greedy_of, rewrite, tiny_qwen3_moe, write_qwen3_moe, written
from .synthetic import write_model
from .test_qdot import follows_the_cpu
from .test_quant import random_blocks

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


# -- experts kept in their GGUF blocks ------------------------------------------------------------

def expert_blocks(rng, count: int, dim: int, ffn: int, types=(Q.Q4_K, Q.Q4_K, Q.Q6_K), device="cpu"):
    """Random gate, up and down experts in blocks, Q4_K_M's types: ((gate, up), down)."""
    shapes = ((ffn, dim), (ffn, dim), (dim, ffn))
    gate, up, down = (QuantizedExperts.from_blocks(random_blocks(t, count * rows, cols, 1e-2, rng), t, count, cols,
                                                   torch.device(device)) for t, (rows, cols) in zip(types, shapes))
    return (gate, up), down


def dense_of(experts: QuantizedExperts) -> torch.Tensor:
    """[E, rows, cols] float32, as the dense path would hold them (quant's reference dequantization,
    which tests/test_quant.py holds against gguf's)."""
    return dequantize_reference(experts.stacked).reshape(experts.shape)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("kind", ["q4_k_m", "gpt-oss mxfp4"])
def test_experts_in_blocks_give_what_the_dense_experts_give(rows, kind):
    # on the CPU both the prefill path (each chosen expert over its rows) and the gathered one (the
    # chosen experts' matrices dequantized by id) read the blocks through the torch references;
    # gpt-oss's experts: MXFP4 blocks, with its biases and clamped SwiGLU
    rng = np.random.default_rng(rows)
    oss = kind.startswith("gpt-oss")
    gate_up, down = expert_blocks(rng, 6, 256, 256, types=(Q.MXFP4,) * 3 if oss else (Q.Q4_K, Q.Q4_K, Q.Q6_K))
    gate_up_dense, down_dense = torch.cat([dense_of(p) for p in gate_up], dim=1), dense_of(down)
    router = torch.from_numpy(rng.standard_normal((6, 256)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((rows, 256)).astype(np.float32))
    act = clamped_swiglu if oss else silu_mul
    biases = ExpertBiases(*(torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
                            for shape in ((6,), (6, 512), (6, 256)))) if oss else None
    want = kernels.moe(x, router, gate_up_dense, down_dense, 3, act=act, biases=biases)
    weights, experts = route(x, router, 3, True, biases.router if oss else None)
    for got in (kernels.moe(x, router, gate_up, down, 3, act=act, biases=biases),
                gathered(x, weights, experts, gate_up, down, act, biases),
                gathered(x, weights, experts, gate_up_dense, down, act, biases)):  # dense gate/up, down in blocks
        assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_mxfp4_experts_stay_in_blocks_where_quantized_weights_do(tmp_path):
    """gpt-oss's files hold their experts in MXFP4: kept as blocks on a GPU stage (here the meta
    device: the shapes and types a GPU holds, no GPU needed), about the file's bytes."""
    from shardrt.gguf_loader import LayerSpan, StageWeights
    from shardrt.model import ModelConfig

    path = write_model(tmp_path / "mx.gguf", "qwen3moe", n_layers=1, dim=256, n_heads=4, n_kv_heads=2, qtype="Q8_0",
                       experts=(4, 2, 256), expert_qtypes=("MXFP4",) * 3, seed=2)
    with GGUFFile(path) as gguf:
        file_bytes = sum(i.n_bytes for n, i in gguf.tensors.items() if "_exps" in n)
        weights = StageWeights(gguf, ModelConfig.from_gguf(gguf), LayerSpan.of(0, 1, 1), quantized=True)
        block = weights.load_block(0, torch.device("meta"), torch.bfloat16)
    held = (*block["ffn_gate_up_exps"], block["ffn_down_exps"])
    assert all(isinstance(w, QuantizedExperts) and w.qtype == Q.MXFP4 for w in held)
    assert sum(w.nbytes for w in held) == file_bytes and not weights.without_kernel


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("expert_types", [("Q4_K", "Q4_K", "Q6_K"), ("MXFP4",) * 3])
def test_a_gpu_stage_with_experts_in_blocks_follows_the_cpu(tmp_path, graphs, expert_types):
    """A qwen3moe file with Q4_K_M's experts (Q4_K gate and up, Q6_K down), or MXFP4's (gpt-oss's
    type; its nibble table in the integer kernels' registers), through the real model:
    `weights: auto` keeps them in blocks on the GPU at about their file bytes, decode steps take
    the grouped integer kernels (in graphs, or eagerly), the prompt the prefill path, and the
    logits follow the CPU's float32 ones from the dequantized experts, teacher-forced over a
    prompt and eight decode steps. Every token takes all 8 experts, weighted by the router: with
    a top k of fewer, bf16 and int8 activations would move near-tied choices to other experts
    now and then (test_moe_qdot.py checks the kernels on ids of every kind)."""
    path = write_model(tmp_path / "moe.gguf", "qwen3moe", n_layers=3, dim=256, n_heads=4, n_kv_heads=2, qtype="Q8_0",
                       experts=(8, 8, 256), expert_qtypes=expert_types, seed=5)
    cpu = Stage(path, 0, 3, "cpu", max_ctx=64)
    gpu = Stage(path, 0, 3, "cuda:0", max_ctx=64, graphs=graphs)
    assert gpu.quantized and gpu.dtype == torch.bfloat16
    with GGUFFile(path) as gguf:
        file_bytes = sum(i.n_bytes for n, i in gguf.tensors.items() if "_exps" in n)
    held = [b.feed_forward.experts_gate_up for b in gpu.blocks] + [b.feed_forward.experts_down for b in gpu.blocks]
    assert all(isinstance(p, QuantizedExperts) for w in held for p in (w if isinstance(w, tuple) else (w,)))
    assert sum(kernels.weight_bytes(w) for w in held) <= 1.1 * file_bytes
    follows_the_cpu(cpu, gpu)
    assert not graphs or gpu.graph_forwards >= 8


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_moe_decode_captured_in_a_graph_follows_each_new_routing():
    """moe() over experts in blocks captured once in a CUDA graph: each replay routes its own
    input on the device and gives what an eager call gives, however the choice of experts moves."""
    rng = np.random.default_rng(0)
    gate_up, down = expert_blocks(rng, 64, 2048, 768, device="cuda")
    router = torch.from_numpy(rng.standard_normal((64, 2048)).astype(np.float32)).cuda().bfloat16()
    x = torch.zeros(4, 2048, device="cuda", dtype=torch.bfloat16)
    assert moe_qdot.runs(x, *gate_up, down)  # the grouped integer kernels, not the float fallback
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels outside the capture
        kernels.moe(x, router, gate_up, down, 8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.moe(x, router, gate_up, down, 8)
    chosen = []
    for seed in range(4):
        fresh = torch.randn(4, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).bfloat16()
        x.copy_(fresh)
        graph.replay()
        want = kernels.moe(fresh, router, gate_up, down, 8)
        assert want.abs().max() > 0 and torch.allclose(out, want, rtol=1e-2, atol=1e-3 * want.abs().max().item()), seed
        chosen.append(route(fresh, router, 8, True)[1].sort(dim=1).values)
    assert not all(torch.equal(chosen[0], c) for c in chosen[1:])  # the replays read other experts
