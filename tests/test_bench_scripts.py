"""The benchmark scripts run end to end on the CPU, as anyone would first try them: the random
GGUF writer against transformers, and the GPU benchmark's tiny CPU mode, whose one JSON line
must hold every placement and measurement it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from shardrt.stage import Stage

from .oracle import hf_last_logits, load_hf_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


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


def test_bench_quant_runs_on_the_cpu_with_a_tiny_shape(tmp_path):
    line = run_script("bench_quant.py", "--device", "cpu", "--shape", "tiny", "--types", "bf16,q4_k_m",
                      "--placements", "one", "--prompt-tokens", "32", "--decode-tokens", "6", "--workdir", str(tmp_path))
    report = json.loads(line)
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
