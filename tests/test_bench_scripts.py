"""The benchmark scripts run end to end on the CPU, as anyone would first try them: the random
GGUF writer against transformers (and, for qwen35, against the tensors and keys llama.cpp's loader
requires), and the GPU benchmark's tiny CPU mode, whose one JSON line must hold every placement
and measurement it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize

from shardrt.gguf_file import GGUFFile
from shardrt.gguf_loader import LayerSpan, StageWeights
from shardrt.kernels.quant import Q
from shardrt.model import ModelConfig
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

from .oracle import hf_last_logits, load_hf_model
from .synthetic import VOCAB_SIZE, add_tokenizer

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import make_gguf  # noqa: E402


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A GGUF holding only the minimal byte-level tokenizer (tests/synthetic.py, 259 tokens): a
    source whose vocabulary keeps the embedding and the head small, and quick to read."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.gguf"
    writer = GGUFWriter(path, "llama")
    add_tokenizer(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_script(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_make_gguf_writes_a_model_transformers_reads_alike(tmp_path, demo_model):
    out = tmp_path / "tiny.gguf"
    run_script("make_gguf.py", str(out), "--shape", "tiny", "--layers", "3", "--tokenizer-from", str(demo_model))
    stage = Stage(out, 0, 3, "cpu", max_ctx=64)
    assert stage.cfg.n_layers == 3 and stage.cfg.dim == 256 and stage.cfg.vocab_size == 49152
    ids = [1, 17, 400, 5000, 49151]
    want = hf_last_logits(load_hf_model(out), ids)
    got = stage.forward(torch.tensor(ids), 0)[0]
    assert (got - want).abs().max().item() < 1e-4


def test_make_gguf_writes_a_mixture_of_experts_transformers_reads_alike(tmp_path, demo_model):
    """The qwen3moe shapes (Qwen3-30B-A3B's, here its tiny sibling) in Q4_K_M's types: experts Q4_K
    and Q6_K in blocks of each expert's rows, the router in F32, as llama.cpp's converter writes them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "tiny-moe.gguf"
    run_script("make_gguf.py", str(out), "--shape", "tiny-moe", "--type", "q4_k_m", "--tokenizer-from", str(demo_model))
    stage = Stage(out, 0, 2, "cpu", max_ctx=64)
    cfg = stage.cfg
    assert (cfg.arch, cfg.n_experts, cfg.n_experts_used, cfg.expert_ffn_dim, cfg.head_dim) == ("qwen3moe", 8, 2, 256, 64)
    # transformers' GGUF reader maps neither expert_feed_forward_length nor key_length for qwen3moe
    config = AutoConfig.from_pretrained(out.parent, gguf_file=out.name)
    config.moe_intermediate_size, config.head_dim = cfg.expert_ffn_dim, cfg.head_dim
    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, config=config, dtype=torch.float32)
    ids = [1, 17, 400, 5000, 49151]
    want = hf_last_logits(model.eval(), ids)
    got = stage.forward(torch.tensor(ids), 0)[0]
    assert want.abs().max() > 0.5 and (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("type_name", ["f32", "q4_k_m"])
def test_make_gguf_writes_a_tiny_qwen35_that_shardrt_runs(tmp_path, demo_model, type_name):
    out = tmp_path / "tiny-qwen35.gguf"
    run_script("make_gguf.py", str(out), "--shape", "tiny-qwen35", "--type", type_name, "--tokenizer-from",
               str(demo_model))
    shape = make_gguf.SHAPES["tiny-qwen35"]
    stage = Stage(out, 0, shape.layers, "cpu", max_ctx=64)
    cfg = stage.cfg
    assert [cfg.recurrent(i) for i in range(cfg.n_layers)] == [True, True, False, True, True, False]
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.rope_dim) == \
        ("qwen35", shape.layers, shape.dim, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn, shape.rope_dim)
    assert (cfg.ssm_conv_kernel, cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim) == \
        (shape.ssm_conv, shape.ssm_k_heads, shape.ssm_v_heads, shape.ssm_head_dim, shape.ssm_head_dim)
    # KV for the two attention layers; for the four DeltaNet ones a state per value head, keys x values
    assert stage.k_cache.shape[0] == 2 and tuple(stage.state.ssm.shape) == (4, 1, 4, 64, 64)
    ids = torch.tensor([1, 17, 400, 5000, 49151])
    logits = stage.forward(ids, 0, all_logits=True)
    step = stage.forward(torch.tensor([42]), len(ids))  # a decode step from the state the prompt left
    assert torch.isfinite(logits).all() and torch.isfinite(step).all() and torch.isfinite(stage.state.ssm).all()
    assert stage.state.ssm.abs().max() > 0 and logits.std() > 0.1 and not torch.equal(logits[-1], logits[-2])
    if type_name == "q4_k_m":
        types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
        assert types["blk.0.attn_qkv.weight"] == types["blk.2.attn_v.weight"] == Q.Q6_K
        assert {types[f"blk.{n}"] for n in ("0.ssm_out.weight", "0.ssm_beta.weight", "2.attn_output.weight")} == {Q.Q4_K}
        assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # 384-long rows: not whole Q6_K blocks, so llama.cpp's fallback
        assert {types[f"blk.0.{n}"] for n in ("ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ssm_norm.weight")} == \
            {Q.F32}


def llama_cpp_qwen35_tensors(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's loader creates for a qwen35 file of Qwen3.6-27B's hparams, in ggml
    order (row length first), from the create_tensor calls of llama_model_qwen35::load_arch_tensors:
    n_embd 5120, n_ff 17408, n_head 24, n_head_kv 4, n_embd_head_k 256, so attn_q {n_embd, 256 * 24 * 2}
    (a gate per head beside the query), attn_k and attn_v {n_embd, 256 * 4}, attn_output {256 * 24, n_embd};
    the DeltaNet's head_k_dim = head_v_dim = ssm_d_state 128, n_k_heads = ssm_n_group 16, n_v_heads =
    ssm_dt_rank 48: key_dim 2048, value_dim 6144, conv_dim 2 * 2048 + 6144 = 10240, ssm_d_conv 4. A layer
    is recurrent where (i + 1) % full_attention_interval (4) != 0."""
    out = {"token_embd.weight": (5120, vocab), "output_norm.weight": (5120,), "output.weight": (5120, vocab)}
    for i in range(layers):
        blk = {"attn_norm.weight": (5120,), "post_attention_norm.weight": (5120,), "ffn_gate.weight": (5120, 17408),
               "ffn_down.weight": (17408, 5120), "ffn_up.weight": (5120, 17408)}
        if (i + 1) % 4:
            blk |= {"attn_qkv.weight": (5120, 10240), "attn_gate.weight": (5120, 6144), "ssm_conv1d.weight": (4, 10240),
                    "ssm_dt.bias": (48,), "ssm_a": (48,), "ssm_beta.weight": (5120, 48), "ssm_alpha.weight": (5120, 48),
                    "ssm_norm.weight": (128,), "ssm_out.weight": (6144, 5120)}
        else:
            blk |= {"attn_q.weight": (5120, 12288), "attn_k.weight": (5120, 1024), "attn_v.weight": (5120, 1024),
                    "attn_output.weight": (6144, 5120), "attn_q_norm.weight": (256,), "attn_k_norm.weight": (256,)}
        out |= {f"blk.{i}.{name}": dims for name, dims in blk.items()}
    return out


def test_make_gguf_writes_qwen3_6_27b_as_llama_cpp_loads_it(tmp_path, small_tokenizer):
    """Four layers of the 27B shape (three DeltaNet, one attention; the small tokenizer's vocabulary,
    not the padded 248320, to write fast) in Q4_K_M: every tensor llama.cpp's loader creates, of the
    shape it creates, and no other (it refuses a file with tensors it did not create); the keys
    llama_model_qwen35::load_arch_hparams requires; and shardrt's config and shape checks on the file."""
    out = tmp_path / "qwen3.6-27b-4l.gguf"
    make_gguf.write(out, replace(make_gguf.SHAPES["qwen3.6-27b"], layers=4, vocab=0), "q4_k_m", small_tokenizer,
                    seed=0, progress=False)
    reader = GGUFReader(out)
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == llama_cpp_qwen35_tensors(4, VOCAB_SIZE)

    def key(name):
        return reader.fields[f"qwen35.{name}"].contents()

    want = {"block_count": 4, "embedding_length": 5120, "feed_forward_length": 17408, "attention.head_count": 24,
            "attention.head_count_kv": 4, "attention.key_length": 256, "attention.value_length": 256,
            "rope.dimension_count": 64, "rope.dimension_sections": [11, 11, 10, 0], "ssm.conv_kernel": 4,
            "ssm.state_size": 128, "ssm.group_count": 16, "ssm.time_step_rank": 48, "ssm.inner_size": 6144,
            "full_attention_interval": 4, "vocab_size": VOCAB_SIZE}
    assert reader.fields["general.architecture"].contents() == "qwen35" and {k: key(k) for k in want} == want
    assert key("rope.freq_base") == 1e7 and key("attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    types = {t.name: t.tensor_type for t in reader.tensors}
    # ggml_ssm_conv reads an F32 kernel; the decay and the vectors stay F32, as llama.cpp's converter writes them
    assert {types[f"blk.0.{n}"] for n in ("ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ssm_norm.weight")} == {Q.F32}
    assert {types[n] for n in ("blk.0.attn_qkv.weight", "blk.3.attn_v.weight", "blk.1.ffn_down.weight",
                               "output.weight")} == {Q.Q6_K}
    assert {types[n] for n in ("token_embd.weight", "blk.3.attn_q.weight", "blk.3.attn_output.weight",
                               "blk.0.attn_gate.weight", "blk.0.ssm_out.weight", "blk.0.ffn_up.weight")} == {Q.Q4_K}
    with GGUFFile(out) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        weights = StageWeights(gguf, cfg, LayerSpan.of(0, 4, 4), prefetch=False)  # checks every shape it reads
        assert set(weights.names) == set(types)
    assert [cfg.recurrent(i) for i in range(4)] == [True, True, True, False] and cfg.attention_gate
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.rope_dim, cfg.rope_base) == \
        (5120, 24, 4, 256, 17408, 64, 1e7)
    assert (cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim, cfg.ssm_conv_kernel) == \
        (16, 48, 128, 128, 4)


def test_make_gguf_pads_the_vocabulary_as_llama_cpp_converter_does(tmp_path, small_tokenizer):
    out = tmp_path / "padded.gguf"
    vocab = VOCAB_SIZE + 100
    make_gguf.write(out, replace(make_gguf.SHAPES["tiny-qwen35"], layers=3, vocab=vocab), "q8_0", small_tokenizer,
                    seed=0, progress=False)
    reader, source = GGUFReader(out), GGUFReader(small_tokenizer)
    tokens, kinds = (reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type"))
    assert tokens[:VOCAB_SIZE] == source.fields["tokenizer.ggml.tokens"].contents()
    assert kinds[:VOCAB_SIZE] == source.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[VOCAB_SIZE:] == [f"[PAD{i}]" for i in range(VOCAB_SIZE, vocab)]
    assert kinds[VOCAB_SIZE:] == [TokenType.UNUSED] * 100
    stage = Stage(out, 0, 3, "cpu", max_ctx=16)
    assert stage.cfg.vocab_size == vocab and stage.forward(torch.tensor([1, vocab - 1]), 0).shape[-1] == vocab
    text = "hi there, hi!"
    assert Tokenizer(out).encode(text) == Tokenizer(small_tokenizer).encode(text)


def test_make_gguf_falls_back_where_rows_are_not_whole_blocks():
    """llama.cpp's quantizer (tensor_type_fallback): Q4_K to Q5_0, Q6_K to Q8_0, and a 32-block type,
    or a fallback that still does not fit, to F16; the fallback's random blocks have the others' spread."""
    t = make_gguf.tensor_type
    assert t("q4_k_m", "blk.0.ffn_up.weight", (64, 320)) == Q.Q5_0
    assert t("q4_k_m", "blk.0.ffn_down.weight", (64, 384)) == Q.Q8_0
    assert t("q4_k_m", "blk.0.ffn_up.weight", (64, 100)) == t("q8_0", "blk.0.ffn_up.weight", (64, 100)) == Q.F16
    # (and attn_output is not the head)
    assert t("q4_k_m", "blk.0.attn_output.weight", (64, 256)) == Q.Q4_K
    assert t("q4_k_m", "output.weight", (64, 256)) == Q.Q6_K
    generator = torch.Generator().manual_seed(0)
    for qtype in make_gguf.SCALE_FIELDS:
        weights = dequantize(make_gguf.random_tensor("w", (1024, 5120), qtype, generator), qtype)
        assert 0.015 < weights.std() < 0.035, qtype.name
        # no mean the rows share: a product with a constant input has no common offset (one would
        # grow in the residual stream layer by layer; Q4_K's quants are all positive)
        assert abs((weights @ np.ones(5120)).mean()) < 1.0, qtype.name


def test_bench_gpu_runs_on_the_cpu_with_a_tiny_shape(tmp_path):
    line = run_script("bench_gpu.py", "--device", "cpu", "--shape", "tiny", "--prompt-tokens", "48",
                      "--decode-tokens", "8", "--hop-iters", "50", "--workdir", str(tmp_path))
    report = json.loads(line)
    assert report["bench"] == "gpu" and report["device"] == "cpu" and report["prompt_tokens"] == 48
    assert report["reference"]["decode_tok_s"] > 0
    assert set(report["placements"]) == {"one", "split", "all_daemons", "one_eager"}
    for name, placement in report["placements"].items():
        assert placement["decode_tok_s"] > 0 and placement["ttft_first_s"] > 0, name
        # float32 on one CPU: every placement computes the reference's greedy tokens
        assert placement["same_tokens_as_reference"] == 8, name
        for stage in placement["stages"]:
            assert stage["steps"] == 7 and stage["ms_per_step"] > 0 and stage["graph_steps"] == 0
    daemons = report["placements"]["all_daemons"]["stages"]
    assert [s["in"] for s in daemons] == ["daemon", "daemon"]
    assert all(0 < s["hop_us"]["p50"] <= s["hop_us"]["p99"] for s in daemons)
    assert report["hop_8KiB_us"]["p50"] > 0
    assert report["ratios"]["split_over_one"] > 0
    assert not list(tmp_path.iterdir())  # the random GGUF went with its temporary directory


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen35"])
def test_bench_quant_runs_on_the_cpu_with_a_tiny_shape(tmp_path, shape):
    line = run_script("bench_quant.py", "--device", "cpu", "--shape", shape, "--types", "bf16,q4_k_m",
                      "--placements", "one", "--prompt-tokens", "32", "--decode-tokens", "6", "--workdir", str(tmp_path))
    report = json.loads(line)
    assert report["shape"] == shape and report["layers"] == make_gguf.SHAPES[shape].layers
    assert set(report["types"]) == {"bf16", "q4_k_m"}
    bf16, q4 = (report["types"][t] for t in ("bf16", "q4_k_m"))
    assert q4["file_gib"] < bf16["file_gib"]  # the blocks are smaller than bf16 on disk
    for entry in (bf16, q4):
        one = entry["placements"]["one"]
        assert one["decode_tok_s"] > 0 and one["prefill_tok_s"] > 0 and one["weight_gib"] > 0
    assert report["ratios"]["q4_k_m_over_bf16_decode"] > 0
    assert not list(tmp_path.iterdir())


def test_bench_ipc_reports_tcp_with_curve_beside_ipc():
    out = json.loads(run_script("bench_ipc.py", "--iters", "50", "--spin-us", "0", "--transport", "tcp").strip().splitlines()[-1])
    trips = out["round_trip_us"]
    assert set(trips) == {"doorbell", "zmq_only", "bare_zmq", "tcp_curve", "tcp_curve_daemon"}
    for name in ("8KiB", "64KiB", "1MiB"):
        assert 0 < trips["tcp_curve"][name]["p50"] <= trips["tcp_curve"][name]["p99"]
        assert 0 < trips["tcp_curve_daemon"][name]["p50"] <= trips["tcp_curve_daemon"][name]["p99"]
        assert out["tcp_curve_over_bare_ipc_p50"][name] == round(trips["tcp_curve"][name]["p50"] / trips["bare_zmq"][name]["p50"], 2)
