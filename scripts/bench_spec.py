"""Speculative decoding against plain decoding, in one run, on the demo model across three
processes (cpu:0 in-process, cpu:1 and cpu:2 in daemons).

Prints one JSON line per drafter: decode tokens/s and acceptance length beside plain decoding,
on a repetitive prompt (a code edit) and a free-form one. Greedy; every drafter's tokens are
compared with plain decoding's (equal in float32; in bf16 a (k+1)-token verify rounds
differently from one-token steps, so long outputs may part ways).

    python scripts/bench_spec.py [--tokens 96] [--draft-tokens 4] [--devices cpu:0,cpu:1,cpu:2]
"""

from __future__ import annotations

import argparse
import json

from shardrt.config import DraftConfig, LaunchConfig
from shardrt.demo_model import demo_model_path
from shardrt.launch import Cluster
from shardrt.placement import parse_devices
from shardrt.sampling import SamplingParams
from shardrt.tokenizer import Tokenizer

PROMPTS = {
    "code_edit": (
        "Rename the variable `total` to `subtotal` in this function and return it unchanged otherwise.\n\n"
        "def price(items, tax):\n    total = 0\n    for item in items:\n        total += item.price * item.count\n"
        "    total = total * (1 + tax)\n    return total\n\nAnswer:\n\ndef price(items, tax):\n"
    ),
    "free_form": "Write a short story about a lighthouse keeper who finds a message in a bottle.\n\n",
}


def measure(cluster: Cluster, tokenizer: Tokenizer, prompt: str, params: SamplingParams, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        result = cluster.generate(tokenizer, tokenizer.encode(prompt), params)
        if best is None or result.decode_tokens_per_s > best.decode_tokens_per_s:
            best = result
    return {"tokens": best.tokens, "tok_s": round(best.decode_tokens_per_s, 2), "spec": best.spec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--devices", default="cpu:0,cpu:1,cpu:2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bf16 on GPUs), float32, bfloat16")
    args = parser.parse_args()
    model = demo_model_path(progress=False)
    tokenizer = Tokenizer(model)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    # no prefix cache: each repeat measures the whole request, not prefix reuse
    base = LaunchConfig(devices=parse_devices(args.devices), max_ctx=1024, prefix_cache_slots=0, dtype=args.dtype)

    with Cluster(base, model) as cluster:
        plain = {name: measure(cluster, tokenizer, p, params, args.repeats) for name, p in PROMPTS.items()}
    drafts = {"ngram": DraftConfig("ngram", tokens=args.draft_tokens),
              "capture": DraftConfig("capture", tokens=args.draft_tokens),
              "model": DraftConfig("model", model=model, tokens=args.draft_tokens)}
    for name, draft in drafts.items():
        with Cluster(LaunchConfig(**{**base.__dict__, "draft": draft}), model) as cluster:
            line = {"bench": "spec", "drafter": name, "devices": args.devices, "dtype": args.dtype,
                    "draft_tokens": args.draft_tokens,
                    "decode_tokens": args.tokens}
            if name == "model":
                line["note"] = "the draft is the target model itself (the only model shipped): it shows the mechanism, not a speed-up"
            for prompt_name, prompt in PROMPTS.items():
                got = measure(cluster, tokenizer, prompt, params, args.repeats)
                line[prompt_name] = {
                    "spec_tok_s": got["tok_s"], "plain_tok_s": plain[prompt_name]["tok_s"],
                    "speedup": round(got["tok_s"] / plain[prompt_name]["tok_s"], 2),
                    "acceptance_length": got["spec"]["acceptance_length"], "accept_rate": got["spec"]["accept_rate"],
                    "same_tokens_as_plain": got["tokens"] == plain[prompt_name]["tokens"],
                }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
