"""GPU decode speed of shardrt in one run, on one file: one GPU in-process, a two-GPU split, every
stage in a daemon, and one GPU without graphs, beside a minimal reference decode loop (plain
PyTorch, the whole one-token step in one CUDA graph) on the same weights as the yardstick.

Prints one JSON line: decode tok/s and time to first token (the first request after load, and a
warm one) per placement; per stage its ms per decode step (in its own process), the hop it costs
as the coordinator sees it, and, from one profiled graph replay in a separate load (a process
that ran the profiler is not timed), GPU ms and kernels per step;
the echo hop through the shared-memory doorbell (p50/p99); and the ratios split/one,
all-daemons/one and shardrt/reference.

    python scripts/bench_gpu.py [--shape llama3-8b | --model PATH] [--prompt-tokens 1250] [--decode-tokens 128]
    python scripts/bench_gpu.py --device cpu --shape tiny          # what CI runs

Without --model it writes a random-weight GGUF of --shape (scripts/make_gguf.py) to --workdir.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ipc  # noqa: E402
import make_gguf  # noqa: E402

from shardrt.config import LaunchConfig  # noqa: E402
from shardrt.demo_model import demo_model_path  # noqa: E402
from shardrt.gguf_file import GGUFFile  # noqa: E402
from shardrt.gguf_loader import host_tensor  # noqa: E402
from shardrt.launch import Cluster  # noqa: E402
from shardrt.model import ModelConfig  # noqa: E402
from shardrt.placement import parse_devices  # noqa: E402
from shardrt.sampling import SamplingParams  # noqa: E402
from shardrt.tokenizer import Tokenizer  # noqa: E402

TEXT = ("The history of computing is a story of machines that grew smaller, faster and cheaper, "
        "and of the people who learned to program them. ")


# -- the yardstick: a plain PyTorch decode loop, one CUDA graph per step ------------------------

class Reference:
    """Llama decode as a PyTorch user would first write it: separate q/k/v and gate/up matmuls,
    rope by gathered cos/sin, a static KV cache written with index_copy_, attention over the
    whole cache with a position mask. The one-token step is captured in one CUDA graph."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, max_ctx: int):
        with GGUFFile(path) as gguf:
            self.cfg = cfg = ModelConfig.from_gguf(gguf)

            def load(name):
                return host_tensor(gguf, gguf.tensors[name]).to(device=device, dtype=dtype)

            self.embedding = load("token_embd.weight")
            self.layers = [{t: load(f"blk.{i}.{t}.weight") for t in
                            ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                             "ffn_up", "ffn_down")} for i in range(cfg.n_layers)]
            self.norm, self.head = load("output_norm.weight"), load("output.weight")
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        angles = torch.outer(torch.arange(max_ctx, dtype=torch.float32), inv)
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, max_ctx, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.keys = torch.arange(max_ctx, device=device)
        self.device, self.graph = device, None

    def rms(self, x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(x.dtype) * w

    def rope(self, x, pos):  # llama files: interleaved pairs
        c, s = self.cos[pos][:, None], self.sin[pos][:, None]
        a, b = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2).to(x.dtype)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cfg, n = self.cfg, ids.shape[0]
        x = F.embedding(ids, self.embedding)
        mask = (self.keys[None, :] <= pos[:, None])[None, None]
        for i, w in enumerate(self.layers):
            h = self.rms(x, w["attn_norm"])
            q = self.rope(F.linear(h, w["attn_q"]).view(n, cfg.n_heads, cfg.head_dim), pos)
            k = self.rope(F.linear(h, w["attn_k"]).view(n, cfg.n_kv_heads, cfg.head_dim), pos)
            v = F.linear(h, w["attn_v"]).view(n, cfg.n_kv_heads, cfg.head_dim)
            self.k[i].index_copy_(2, pos, k.transpose(0, 1)[None])
            self.v[i].index_copy_(2, pos, v.transpose(0, 1)[None])
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=True)
            x = x + F.linear(a[0].transpose(0, 1).reshape(n, -1), w["attn_output"])
            h = self.rms(x, w["ffn_norm"])
            x = x + F.linear(F.silu(F.linear(h, w["ffn_gate"])) * F.linear(h, w["ffn_up"]), w["ffn_down"])
        return F.linear(self.rms(x[-1:], self.norm), self.head).argmax(-1)

    @torch.inference_mode()
    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """Greedy tokens and decode tok/s: eager prefill, then one-token steps (graph replays on a GPU)."""
        dev = self.device
        token = self.forward(torch.tensor(prompt, device=dev), torch.arange(len(prompt), device=dev))
        step_ids, step_pos = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        if dev.type == "cuda" and self.graph is None:
            step_ids.copy_(token)
            step_pos.fill_(len(prompt))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(step_ids, step_pos)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.forward(step_ids, step_pos)
            self.step_ids, self.step_pos = step_ids, step_pos
        tokens = [int(token)]
        sync(dev)
        t0 = time.perf_counter()
        for i in range(n - 1):
            if self.graph is not None:
                self.step_ids.fill_(tokens[-1])
                self.step_pos.fill_(len(prompt) + i)
                self.graph.replay()
                tokens.append(int(self.out))
            else:
                tokens.append(int(self.forward(torch.tensor([tokens[-1]]), torch.tensor([len(prompt) + i]))))
        return tokens, (n - 1) / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- shardrt placements ------------------------------------------------------------------------

def stage_rows(cluster: Cluster, prompt: list[int], steps: int) -> list[dict]:
    """Per stage over `steps` greedy one-token steps after the prompt: ms per step in its own
    process; for a daemon, the coordinator's wait beyond the daemon's handling of the request
    (`hop_us`: the doorbell both ways) and the handling beyond the stage (`daemon_overhead_us`);
    (the graph profile comes from a separate, profiled load: see add_profiles)."""
    pipeline = cluster.pipeline
    pipeline.reset()
    token = pipeline.greedy(torch.tensor(prompt), 0)
    before = [stats_of(s) for s in pipeline.stages]
    for i in range(steps):
        token = pipeline.greedy(torch.tensor([token]), len(prompt) + i)
    rows = []
    for stage, was in zip(pipeline.stages, before):
        now = stats_of(stage)

        def per_step_us(key):
            return round((now[key] - was[key]) / steps * 1e6, 1)

        remote = hasattr(stage, "daemon")
        row = {"stage": stage.description if remote else f"{stage.span} on {stage.device}",
               "in": "daemon" if remote else "coordinator", "steps": now["forwards"] - was["forwards"],
               "ms_per_step": round(per_step_us("compute_s") / 1e3, 3),
               "graph_steps": now["graph_forwards"] - was["graph_forwards"],
               "weight_gib": round(now["weight_bytes"] / 2**30, 3)}
        if remote:
            row["hop_us"] = hop_percentiles(stage, now["recent_request_us"], steps)
            row["daemon_overhead_us"] = round(per_step_us("request_s") - per_step_us("compute_s"), 1)
        rows.append(row)
    return rows


def hop_percentiles(stage, handled_us: list[float], steps: int) -> dict:
    """p50/p99 over the last `steps` forwards of the coordinator's wait beyond the daemon's handling:
    the doorbell both ways, the decode and the checks of each message."""
    waits = list(stage.recent_forwards)[-steps:]
    hops = sorted(w * 1e6 - h for w, h in zip(waits, handled_us[-steps:]))
    return {"p50": round(hops[len(hops) // 2], 1), "p99": round(hops[int(len(hops) * 0.99)], 1), "mean": round(sum(hops) / len(hops), 1)}


def stats_of(stage) -> dict:
    if hasattr(stage, "daemon"):
        reply = stage.stats()
        inner = reply["stages"]
        return {"forwards": stage.forwards, "wall_s": stage.forward_seconds, "compute_s": reply["forward_seconds"],
                "request_s": reply["request_seconds"], "recent_request_us": reply["recent_request_us"],
                "weight_bytes": sum(s["weight_bytes"] for s in inner),
                "allocated_bytes": max((s.get("device_allocated_bytes", 0) for s in inner), default=0),
                "graph_forwards": sum(s.get("graph_forwards", 0) for s in inner),
                "profile": [s.get("graphs", {}).get("profile") for s in inner]}
    s = stage.stats()
    return {"forwards": s["forwards"], "wall_s": s["forward_seconds"], "compute_s": s["forward_seconds"],
            "request_s": s["forward_seconds"], "weight_bytes": s["weight_bytes"],
            "allocated_bytes": s.get("device_allocated_bytes", 0),
            "graph_forwards": s["graph_forwards"], "profile": [s.get("graphs", {}).get("profile")]}


def run_placement(model: Path, tokenizer: Tokenizer, prompt: list[int], devices: str, *, all_daemons: bool,
                  graphs: bool, decode_tokens: int, max_ctx: int, dtype: str, weights: str = "quantized") -> dict:
    config = LaunchConfig(devices=parse_devices(devices), all_daemons=all_daemons, graphs=graphs, max_ctx=max_ctx,
                          dtype=dtype, prefix_cache_slots=0, weights=weights).with_defaults()
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    with Cluster(config, model) as cluster:
        load_s = time.perf_counter() - t0
        first = cluster.generate(tokenizer, prompt, params)

        warm = cluster.generate(tokenizer, prompt, params)
        rows = stage_rows(cluster, prompt, decode_tokens - 1)
    free_memory()
    return {"devices": devices, "all_daemons": all_daemons, "graphs": graphs, "load_s": round(load_s, 1),
            "decode_tok_s": round(warm.decode_tokens_per_s, 2),
            "ttft_first_s": round(first.prefill_seconds, 4), "ttft_warm_s": round(warm.prefill_seconds, 4),
            "first_over_warm_prefill": round(first.prefill_seconds / warm.prefill_seconds, 2),
            "prefill_tok_s": round(len(prompt) / warm.prefill_seconds, 1),
            "stages": rows, "tokens": warm.tokens}


def add_profiles(model: Path, devices: str, rows: list[dict], max_ctx: int, dtype: str, weights: str = "auto") -> None:
    """Load the placement again with SHARDRT_PROFILE=1 (each GPU stage profiles one graph replay
    at load; daemons inherit it) and put each stage's profile into its row."""
    os.environ["SHARDRT_PROFILE"] = "1"
    try:
        config = LaunchConfig(devices=parse_devices(devices), max_ctx=max_ctx, dtype=dtype,
                              weights=weights).with_defaults()
        with Cluster(config, model) as cluster:
            for row, stage in zip(rows, cluster.pipeline.stages):
                row["profile"] = stats_of(stage)["profile"]
    finally:
        del os.environ["SHARDRT_PROFILE"]
    free_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(make_gguf.SHAPES), default="llama3-8b")
    parser.add_argument("--model", type=Path, help="a GGUF to use instead of writing a random one")
    parser.add_argument("--workdir", type=Path, help="where the random GGUF goes (default: a temporary directory)")
    parser.add_argument("--tokenizer-from", type=Path, help="GGUF whose tokenizer the random one gets (default: the demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=1250)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--max-ctx", type=int, default=4096)
    parser.add_argument("--hop-iters", type=int, default=2000)
    parser.add_argument("--placements", default="reference,one,split,all_daemons,one_eager")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    names = [d.strip() for d in args.placements.split(",") if d.strip()]

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / f"random-{args.shape}.gguf"
            make_gguf.write(model, make_gguf.SHAPES[args.shape], "bf16", args.tokenizer_from or demo_model_path(),
                            seed=0, progress=False)
        tokenizer = Tokenizer(model)
        prompt = (tokenizer.encode(TEXT * (args.prompt_tokens // 20 + 1)))[: args.prompt_tokens]
        dev0 = f"{args.device}:0"
        two = f"{args.device}:0,{args.device}:1" if gpus >= 2 else None
        report: dict = {"bench": "gpu", "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                        "gpus": gpus if args.device == "cuda" else 0, "model": model.name,
                        "shape": None if args.model else args.shape, "file_gib": round(model.stat().st_size / 2**30, 2),
                        "dtype": dtype, "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens,
                        "max_ctx": args.max_ctx, "placements": {}}
        plans = {"one": (dev0, False, True), "split": (two, False, True),
                 "all_daemons": (two or dev0, True, True), "one_eager": (dev0, False, False)}
        for name in names:
            if name == "reference":
                ref = Reference(model, torch.device(dev0), getattr(torch, dtype), args.max_ctx)
                tokens, tok_s = ref.decode(prompt, args.decode_tokens)
                report["reference"] = {"decode_tok_s": round(tok_s, 2), "graphs": ref.graph is not None,
                                       "tokens": tokens}
                del ref
                free_memory()
                continue
            devices, all_daemons, graphs = plans[name]
            if devices is None:
                report["placements"][name] = {"skipped": f"needs 2 GPUs, torch sees {gpus}"}
                continue
            decode = args.decode_tokens if graphs or args.device == "cpu" else min(args.decode_tokens, 32)
            report["placements"][name] = run_placement(model, tokenizer, prompt, devices, all_daemons=all_daemons,
                                                       graphs=graphs, decode_tokens=decode, max_ctx=args.max_ctx,
                                                       dtype=dtype)
        if args.device == "cuda":  # after the timed runs: a profiled process is not timed
            for name in ("one", "split"):
                if "stages" in report["placements"].get(name, {}):
                    add_profiles(model, plans[name][0], report["placements"][name]["stages"], args.max_ctx, dtype)
        hop = bench_ipc.echo_hops({"8KiB": 8 << 10}, args.hop_iters, 20_000)["8KiB"]
        report["hop_8KiB_us"] = hop
    report["ratios"] = ratios(report)
    for p in report["placements"].values():  # token lists agree or not: say how far, then drop them
        if "tokens" in p and "reference" in report:
            p["same_tokens_as_reference"] = agreeing_prefix(p["tokens"], report["reference"]["tokens"])
        p.pop("tokens", None)
    report.get("reference", {}).pop("tokens", None)
    print(json.dumps(report))
    return 0


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def ratios(report: dict) -> dict:
    p = report["placements"]

    def tok_s(name):
        return p.get(name, {}).get("decode_tok_s")

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return {"split_over_one": ratio(tok_s("split"), tok_s("one")),
            "all_daemons_over_one": ratio(tok_s("all_daemons"), tok_s("one")),
            "one_over_reference": ratio(tok_s("one"), report.get("reference", {}).get("decode_tok_s")),
            "graphs_over_eager": ratio(tok_s("one"), tok_s("one_eager"))}


if __name__ == "__main__":
    sys.exit(main())
