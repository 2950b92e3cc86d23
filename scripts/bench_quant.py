"""Quantized weights on GPUs, in one run: the same random model of one of make_gguf.py's shapes
(Llama-3-8B's by default) written as bf16, Q8_0 and Q4_K_M (Q4_K with Q6_K for attn_v, a
DeltaNet's attn_qkv, ffn_down and the head), each decoded on one GPU and split over two, with the
weight memory every stage holds beside the GGUF bytes of its span; with --llama-bench, llama.cpp's
llama-bench on each same file right after (prefill of the prompt, decode at the prompt's depth,
flash attention, every layer on the GPU), and the ratios. One JSON line.

    python scripts/bench_quant.py [--shape llama3-8b] [--types bf16,q8_0,q4_k_m] [--layers N]
    python scripts/bench_quant.py --placements one --llama-bench PATH/llama-bench
    python scripts/bench_quant.py --device cpu --shape tiny --types q8_0 --placements one   # runs anywhere

A mixture of experts: --shape qwen3-30b-a3b (qwen3moe, 128 experts, top 8), its experts kept in
their blocks and decoded by the grouped kernels (kernels/moe_qdot.py); name --types q4_k_m alone
there (its bf16 file would be 57 GiB):

    python scripts/bench_quant.py --shape qwen3-30b-a3b --types q4_k_m --placements one --llama-bench PATH/llama-bench

A hybrid: --shape qwen3.6-27b (qwen35, Qwen3.6-27B's body: 48 gated DeltaNet layers, each with a
recurrent state instead of a KV cache, and 16 gated full-attention ones; vocabulary 248320); its
Q4_K_M file is 16.4 GiB, its bf16 one 50 GiB:

    python scripts/bench_quant.py --shape qwen3.6-27b --types q4_k_m --placements one --llama-bench PATH/llama-bench

Several shapes in one run (`--shape qwen3-30b-a3b,qwen3.6-27b`): shardrt runs on every file first,
then llama-bench on each, and the line holds one report per shape under "shapes". Without --keep
the files stay in the temporary folder until llama-bench has read them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402
import make_gguf  # noqa: E402

from shardrt.demo_model import demo_model_path  # noqa: E402
from shardrt.gguf_file import GGUFFile  # noqa: E402
from shardrt.tokenizer import Tokenizer  # noqa: E402


FLOAT_TYPES = ("f32", "f16", "bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama3-8b",
                        help=f"one or more of make_gguf's shapes, comma-separated: {', '.join(sorted(make_gguf.SHAPES))}")
    parser.add_argument("--layers", type=int, help="layers of the shape to write (default: all)")
    parser.add_argument("--types", default="bf16,q8_0,q4_k_m")
    parser.add_argument("--placements", default="one,split")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--tokenizer-from", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=1250)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--max-ctx", type=int, default=4096)
    parser.add_argument("--weights", choices=("auto", "quantized", "dequantized"), default="auto",
                        help="how quantized files are held (bf16 files: always as they are)")
    parser.add_argument("--llama-bench", type=Path,
                        help="llama.cpp's llama-bench, run on the same files once shardrt has run on all of them")
    parser.add_argument("--profile", action="store_true", help="profile one decode replay per stage (a second load)")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.llama_bench and not args.llama_bench.is_file():
        parser.error(f"--llama-bench: {str(args.llama_bench)!r} is not a file")
    shapes = args.shape.split(",")
    unknown = [name for name in shapes if name not in make_gguf.SHAPES]
    if unknown:
        parser.error(f"--shape: {unknown[0]!r} is not one of {', '.join(sorted(make_gguf.SHAPES))}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = args.keep or Path(tmp)
        reports = [run_shape(args, name, folder) for name in shapes]
        if args.llama_bench:  # after shardrt's runs, so that a build of it may still be finishing then
            for report in reports:
                for entry in report["types"].values():
                    entry["llama_bench"] = llama_bench(args.llama_bench, Path(entry["file"]), args.prompt_tokens,
                                                       args.decode_tokens)
        for report in reports:  # the temporary folder goes with its files
            for entry in report["types"].values():
                entry.pop("file")
            report["ratios"] = ratios(report["types"])
    print(json.dumps(reports[0] if len(reports) == 1 else {"bench": "quant", "shapes": reports}))
    return 0


def run_shape(args, shape_name: str, folder: Path) -> dict:
    """shardrt on each type's file of one shape (written into `folder` unless it is there)."""
    shape = make_gguf.SHAPES[shape_name]
    if args.layers:
        shape = replace(shape, layers=args.layers)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    placements = {"one": f"{args.device}:0", "split": f"{args.device}:0,{args.device}:1" if gpus >= 2 else None}
    report: dict = {"bench": "quant", "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "shape": shape_name, "layers": shape.layers, "prompt_tokens": args.prompt_tokens,
                    "decode_tokens": args.decode_tokens, "types": {}}
    for type_name in args.types.split(","):
        # named for what it holds, so a kept file is reused only for the same shape and layers
        model = folder / f"random-{shape_name}-{shape.layers}l-{type_name}.gguf"
        if not model.is_file():
            make_gguf.write(model, shape, type_name, args.tokenizer_from or demo_model_path(progress=False), seed=0,
                            progress=False)
        with GGUFFile(model) as gguf:
            file_bytes = gguf.file_size
        tokenizer = Tokenizer(model)
        prompt = tokenizer.encode(bench_gpu.TEXT * (args.prompt_tokens // 20 + 1))[: args.prompt_tokens]
        entry: dict = {"file_gib": round(file_bytes / 2**30, 3), "placements": {}, "file": str(model)}
        weights = "dequantized" if type_name in FLOAT_TYPES else args.weights
        for name in args.placements.split(","):
            if placements.get(name) is None:
                entry["placements"][name] = {"skipped": f"needs 2 GPUs, torch sees {gpus}"}
                continue
            run = bench_gpu.run_placement(model, tokenizer, prompt, placements[name], all_daemons=False, graphs=True,
                                          decode_tokens=args.decode_tokens, max_ctx=args.max_ctx, dtype=dtype,
                                          weights=weights)
            run.pop("tokens", None)
            run["weight_gib"] = round(sum(s["weight_gib"] for s in run["stages"]), 3)
            if args.profile and args.device == "cuda":
                bench_gpu.add_profiles(model, placements[name], run["stages"], args.max_ctx, dtype, weights)
            entry["placements"][name] = run
        report["types"][type_name] = entry
        if not args.keep and not args.llama_bench:  # nothing reads it again: free the disk for the next
            model.unlink()
    return report


def llama_bench(binary: Path, model: Path, prompt_tokens: int, decode_tokens: int) -> dict:
    """llama.cpp on the same file: prefill of the prompt from an empty cache, and decode with the
    prompt's tokens already in the cache (its -d), every layer on the GPU, flash attention."""
    cmd = [str(binary), "-m", str(model), "-ngl", "99", "-fa", "1", "-p", str(prompt_tokens), "-n", str(decode_tokens),
           "-d", f"0,{prompt_tokens}", "-r", "3", "-o", "jsonl"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
        return {"error": f"exit {done.returncode}: {last}"}
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    out = {"command": " ".join(cmd[:1] + ["-m", model.name] + cmd[3:])}
    for row in rows:
        if row["n_prompt"] == prompt_tokens and row["n_gen"] == 0 and row["n_depth"] == 0:
            out["prefill_tok_s"] = round(row["avg_ts"], 1)
        if row["n_gen"] == decode_tokens and row["n_prompt"] == 0 and row["n_depth"] == prompt_tokens:
            out["decode_tok_s"] = round(row["avg_ts"], 1)
    return out


def ratios(types: dict) -> dict:
    def get(type_name, key, placement="one"):
        return types.get(type_name, {}).get("placements", {}).get(placement, {}).get(key)

    out = {}
    for t in types:
        for key, name in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            a, b = get(t, key), get("bf16", key)
            if t != "bf16" and a and b:
                out[f"{t}_over_bf16_{name}"] = round(a / b, 3)
        entry = types[t]
        one = entry["placements"].get("one", {})
        peer = entry.get("llama_bench", {})
        for key, name in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            if one.get(key) and peer.get(key):
                out[f"{t}_over_llama_cpp_{name}"] = round(one[key] / peer[key], 3)
        if "weight_gib" in one:
            out[f"{t}_weight_over_file"] = round(one["weight_gib"] / entry["file_gib"], 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
