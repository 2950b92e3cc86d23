"""Prefill and decode tokens/s of shardrt and of transformers on the same GGUF, prompt and device.

Prints one JSON line. Both sides run greedy with their own KV cache, one token per decode step,
in this process, with the same torch thread count.

    python scripts/bench_decode.py [--model PATH] [--prompt-tokens 128] [--decode-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from shardrt.demo_model import demo_model_path
from shardrt.gguf_file import GGUFFile
from shardrt.model import ModelConfig
from shardrt.stage import Stage
from shardrt.tokenizer import Tokenizer

TEXT = ("The history of computing is a story of machines that grew smaller, faster and cheaper, "
        "and of the people who learned to program them. ") * 40


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_shardrt(stage: Stage, ids: list[int], n: int) -> tuple[float, float]:
    stage.reset()
    t0 = time.perf_counter()
    logits = stage.forward(torch.tensor(ids), 0)
    sync(stage.device)
    t1 = time.perf_counter()
    for i in range(n):
        logits = stage.forward(logits[-1].argmax().view(1), len(ids) + i)
    sync(stage.device)
    return t1 - t0, time.perf_counter() - t1


@torch.inference_mode()
def time_transformers(model, ids: list[int], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(torch.tensor([ids], device=model.device), use_cache=True)
    sync(model.device)
    t1 = time.perf_counter()
    for _ in range(n):
        token = out.logits[0, -1].argmax().view(1, 1)
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
    sync(model.device)
    return t1 - t0, time.perf_counter() - t1


def best(runs: list[tuple[float, float]], n_prefill: int, n_decode: int) -> dict:
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": round(n_prefill / prefill, 1), "decode_tok_s": round(n_decode / decode, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="torch device for both, e.g. cpu or cuda:0")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    path = demo_model_path(progress=False) if args.model is None else args.model
    ids = Tokenizer(path).encode(TEXT)[: args.prompt_tokens]
    with GGUFFile(path) as gguf:
        n_layers = ModelConfig.from_gguf(gguf).n_layers
    dtype = getattr(torch, args.dtype)
    stage = Stage(path, 0, n_layers, args.device, max_ctx=len(ids) + args.decode_tokens + 1, dtype=dtype)

    from transformers import AutoModelForCausalLM
    from pathlib import Path

    hf = AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name, dtype=dtype)
    hf = hf.to(args.device).eval()
    ours, theirs = [], []
    time_shardrt(stage, ids, 4)  # warm-up both
    time_transformers(hf, ids, 4)
    for _ in range(args.repeats):
        ours.append(time_shardrt(stage, ids, args.decode_tokens))
        theirs.append(time_transformers(hf, ids, args.decode_tokens))
    print(json.dumps({
        "bench": "decode", "model": Path(path).name, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens, "repeats": args.repeats,
        "shardrt": best(ours, len(ids), args.decode_tokens),
        "transformers": best(theirs, len(ids), args.decode_tokens),
    }))


if __name__ == "__main__":
    main()
