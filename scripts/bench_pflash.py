"""Speculative prefill (PFlash) on needle-in-a-haystack prompts, with and without the drafter.

For each prompt length (4K, 8K and 16K target tokens by default) and each depth of the key
sentence in the filler, one request through a Cluster whose PFlash drafter (the demo model by
default) compresses the prompt: whether the key survives in the kept text, the keep ratio, the
drafter's time and the target's prefill; and, once per length, the same prompt prefilled whole
by the target. TTFT with PFlash is the drafter's time plus the target's prefill of the kept text.
A length that the drafter's context (or, for the plain run, the target's) cannot hold is
reported as such. Greedy; the prefix cache is off, so every run prefills. One JSON line.

    python scripts/bench_pflash.py [--lengths 4096,8192,16384] [--depths 0.1,0.3,0.5,0.7,0.9]
        [--target-gpus cuda:0] [--pflash-gpu cpu:0] [--model PATH] [--drafter PATH] [--keep 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shardrt.config import LaunchConfig, PflashConfig
from shardrt.demo_model import demo_model_path
from shardrt.gguf_file import GGUFFile
from shardrt.launch import Cluster
from shardrt.model import ModelConfig
from shardrt.niah import haystack
from shardrt.pflash import PFLASH_MAX_CTX, PromptText
from shardrt.placement import default_device, parse_device, parse_devices
from shardrt.sampling import SamplingParams
from shardrt.tokenizer import Tokenizer

ANSWER_TOKENS = 12
ROOM = 64  # a prompt of "8K" leaves this many tokens of an 8192-token context for the answer


def context_of(path: Path) -> int:
    with GGUFFile(path) as gguf:
        return ModelConfig.from_gguf(gguf).context_length


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384", help="prompt lengths in target tokens")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the key sentence sits, 0..1")
    ap.add_argument("--target-gpus", default=None, help="the target's devices (default: the first GPU, else cpu:0)")
    ap.add_argument("--pflash-gpu", default="cpu:0", help="the drafter daemon's device")
    ap.add_argument("--model", default=None, help="target GGUF (default: the demo model)")
    ap.add_argument("--drafter", default=None, help="drafter GGUF (default: the demo model)")
    ap.add_argument("--keep", type=float, default=PflashConfig.keep)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    target = Path(args.model) if args.model else demo_model_path(progress=False)
    drafter = Path(args.drafter) if args.drafter else demo_model_path(progress=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    devices = parse_devices(args.target_gpus) if args.target_gpus else (default_device(),)
    drafter_ctx = min(context_of(drafter), PFLASH_MAX_CTX)
    target_ctx = context_of(target)
    max_ctx = min(target_ctx, max(lengths) + ANSWER_TOKENS + ROOM)
    config = LaunchConfig(devices=devices, max_ctx=max_ctx, prefix_cache_slots=0,
                          pflash=PflashConfig(drafter, parse_device(args.pflash_gpu), keep=args.keep, min_prompt=0))
    tokenizer = Tokenizer(target)
    params = SamplingParams(max_tokens=ANSWER_TOKENS)
    report = {"bench": "pflash", "target": target.name, "drafter": drafter.name,
              "target_devices": [str(d) for d in devices], "pflash_device": args.pflash_gpu, "keep": args.keep,
              "drafter_context": drafter_ctx, "target_max_ctx": max_ctx, "lengths": {}}
    kept_all = cases_all = 0
    t_start = time.perf_counter()
    with Cluster(config, target) as cluster:
        for length in lengths:
            tokens = length - ROOM
            if tokens > drafter_ctx:
                report["lengths"][str(length)] = {
                    "skipped": f"a {length}-token prompt does not fit the drafter's context of {drafter_ctx} tokens "
                               f"({drafter.name}); use a drafter trained on longer contexts"}
                print(f"{length}: skipped (drafter context {drafter_ctx})", file=sys.stderr, flush=True)
                continue
            cases = []
            for depth in depths:
                h = haystack(tokenizer, tokens, depth, seed=args.seed)
                ids = tokenizer.encode(h.text)
                result = cluster.generate(tokenizer, ids, params, prompt=PromptText.plain(h.text))
                p = result.pflash
                case = {"depth": depth, "prompt_tokens": p["prompt_tokens"], "kept_tokens": p["kept_tokens"],
                        "keep_ratio": p["keep_ratio"], "key_kept": h.key in p["kept_text"],
                        "answer_has_key": h.key in result.text, "drafter_ms": p["drafter_ms"],
                        "target_prefill_ms": p["target_prefill_ms"],
                        "ttft_ms": round(p["drafter_ms"] + p["target_prefill_ms"], 1)}
                if p["passed_through"]:
                    case["passed_through"] = p["passed_through"]
                cases.append(case)
                print(f"{length} depth {depth}: {json.dumps(case)}", file=sys.stderr, flush=True)
            row = {"cases": cases, "key_kept_rate": round(sum(c["key_kept"] for c in cases) / len(cases), 3),
                   "keep_ratio_mean": round(sum(c["keep_ratio"] for c in cases) / len(cases), 4),
                   "ttft_pflash_ms_mean": round(sum(c["ttft_ms"] for c in cases) / len(cases), 1)}
            kept_all += sum(c["key_kept"] for c in cases)
            cases_all += len(cases)
            h = haystack(tokenizer, tokens, depths[0], seed=args.seed)
            ids = tokenizer.encode(h.text)
            if len(ids) + ANSWER_TOKENS > max_ctx:
                row["baseline"] = f"the target's context ({max_ctx}) cannot hold the {len(ids)}-token prompt whole"
            else:
                plain = cluster.generate(tokenizer, ids, params)
                row["ttft_plain_ms"] = round(plain.prefill_seconds * 1000, 1)
                row["plain_answer_has_key"] = h.key in plain.text
                row["ttft_speedup"] = round(row["ttft_plain_ms"] / row["ttft_pflash_ms_mean"], 2)
                print(f"{length} plain: {row['ttft_plain_ms']} ms", file=sys.stderr, flush=True)
            report["lengths"][str(length)] = row
    report["key_kept_rate"] = round(kept_all / cases_all, 3) if cases_all else None
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
