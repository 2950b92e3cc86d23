"""Write a random-weight GGUF of a real model's shape, so anyone can benchmark a box without
downloading weights: Llama 3 8B / 1B / 70B bodies (or a tiny one for CI), llama architecture, and
Qwen3-30B-A3B's mixture of experts (or a tiny one), qwen3moe architecture; with the tokenizer (and
vocabulary size) of another GGUF, the demo model by default.

    python scripts/make_gguf.py OUT.gguf --shape llama3-8b [--layers N] [--type bf16] [--tokenizer-from GGUF]
    python scripts/make_gguf.py OUT.gguf --shape qwen3-30b-a3b --type q4_k_m

--type: f32, f16, bf16 (weights N(0, 0.02)), or quantized: q8_0, q4_0, q6_k, and q4_k_m (Q4_K, with
attn_v, ffn_down (the experts' too) and the output in Q6_K, as llama.cpp's Q4_K_M mostly is).
Quantized tensors are random blocks whose scales are set to give weights of about that spread.
Norms are near 1 and a router in F32 (llama.cpp never quantizes either). Tensors are streamed to
the file one at a time (drawn on the GPU when there is one), so a 40 GiB file needs no more than
one tensor's worth of memory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    rope_base: float = 500000.0
    head_dim: int = 0  # 0: dim // heads
    experts: int = 0  # a mixture of experts (qwen3moe): experts per layer, used per token, their ffn
    experts_used: int = 0
    expert_ffn: int = 0

    @property
    def arch(self) -> str:
        return "qwen3moe" if self.experts else "llama"

    @property
    def head_width(self) -> int:
        return self.head_dim or self.dim // self.heads


SHAPES = {
    "tiny": Shape(layers=4, dim=256, heads=4, kv_heads=2, ffn=512, rope_base=10000.0),  # K-quant rows: 256s
    "tiny-moe": Shape(layers=2, dim=256, heads=4, kv_heads=2, ffn=512, rope_base=1e6, head_dim=64, experts=8,
                      experts_used=2, expert_ffn=256),
    # its config's intermediate_size 6144 is written as feed_forward_length, which no layer uses
    "qwen3-30b-a3b": Shape(layers=48, dim=2048, heads=32, kv_heads=4, ffn=6144, rope_base=1e6, head_dim=128,
                           experts=128, experts_used=8, expert_ffn=768),
    "llama3-1b": Shape(layers=16, dim=2048, heads=32, kv_heads=8, ffn=8192),
    "llama3-8b": Shape(layers=32, dim=4096, heads=32, kv_heads=8, ffn=14336),
    "llama3-70b": Shape(layers=80, dim=8192, heads=64, kv_heads=8, ffn=28672),
    "smollm2-135m": Shape(layers=30, dim=576, heads=9, kv_heads=3, ffn=1536, rope_base=100000.0),  # a drafter's
}
Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
SIX_BIT_TENSORS = ("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight", "output.weight")  # Q6_K in q4_k_m


def tensor_type(type_name: str, name: str) -> Q:
    """The GGUF type a tensor is written in under --type `type_name`."""
    if name.endswith(("norm.weight", "ffn_gate_inp.weight")):
        return Q.F32
    if type_name == "q4_k_m":
        return Q.Q6_K if name.endswith(SIX_BIT_TENSORS) else Q.Q4_K
    return Q[type_name.upper()]


TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q6_k", "q4_k_m")
# where each type's f16 scales sit in its block (byte offsets), and a value giving weights of
# roughly N(0, 0.02) spread with random quants (the rest of each block is random bytes)
SCALE_FIELDS = {Q.Q8_0: ((0, 2.7e-4),), Q.Q4_0: ((0, 4.5e-3),), Q.Q4_K: ((0, 1e-4), (2, 4e-4)), Q.Q6_K: ((208, 2e-5),)}


def tensor_shapes(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch-order shape) of every tensor, in file order."""
    head_dim, dim = shape.head_width, shape.dim
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    out = [("token_embd.weight", (vocab, dim))]
    for i in range(shape.layers):
        out += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.attn_q.weight", (q, dim)),
                (f"blk.{i}.attn_k.weight", (kv, dim)), (f"blk.{i}.attn_v.weight", (kv, dim)),
                (f"blk.{i}.attn_output.weight", (dim, q)), (f"blk.{i}.ffn_norm.weight", (dim,))]
        if shape.experts:  # qwen3's q/k norms, the router, the stacked experts
            e, ffn = shape.experts, shape.expert_ffn
            out += [(f"blk.{i}.attn_q_norm.weight", (head_dim,)), (f"blk.{i}.attn_k_norm.weight", (head_dim,)),
                    (f"blk.{i}.ffn_gate_inp.weight", (e, dim)), (f"blk.{i}.ffn_gate_exps.weight", (e, ffn, dim)),
                    (f"blk.{i}.ffn_up_exps.weight", (e, ffn, dim)), (f"blk.{i}.ffn_down_exps.weight", (e, dim, ffn))]
        else:
            out += [(f"blk.{i}.ffn_gate.weight", (shape.ffn, dim)), (f"blk.{i}.ffn_up.weight", (shape.ffn, dim)),
                    (f"blk.{i}.ffn_down.weight", (dim, shape.ffn))]
    return out + [("output_norm.weight", (dim,)), ("output.weight", (vocab, dim))]


def random_tensor(name: str, shape: tuple[int, ...], qtype: Q, generator: torch.Generator) -> np.ndarray:
    """The tensor's bytes as the writer takes them: floats, or uint8 blocks [rows, row_bytes]."""
    device = generator.device
    if qtype not in FLOAT_TYPES:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = torch.randint(0, 256, (math.prod(shape) // block_elems, block_bytes), generator=generator,
                               device=device, dtype=torch.uint8)
        for at, value in SCALE_FIELDS[qtype]:
            scale = torch.full((blocks.shape[0],), value, dtype=torch.float16, device=device)
            blocks[:, at : at + 2] = scale.view(torch.uint8).view(-1, 2)
        return blocks.cpu().numpy().reshape(*shape[:-1], -1)
    dtype = FLOAT_TYPES[qtype]
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    x = 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.02 * x
    x = x.to(dtype).cpu()
    return (x.view(torch.uint16) if dtype == torch.bfloat16 else x).numpy().view(NUMPY_BITS[dtype])


def write(out: Path, shape: Shape, type_name: str, tokenizer_from: Path, seed: int, progress: bool = True,
          context: int = 8192) -> int:
    if type_name not in TYPES:
        raise ValueError(f"--type: {type_name!r} is not one of {', '.join(TYPES)}")
    source = GGUFReader(tokenizer_from)
    tokens = source.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    head_dim = shape.head_width
    writer = GGUFWriter(out, shape.arch)
    writer.add_name(f"random {shape.layers}-layer {shape.arch}, dim {shape.dim} ({type_name})")
    writer.add_block_count(shape.layers)
    writer.add_context_length(context)
    writer.add_embedding_length(shape.dim)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_rope_dimension_count(head_dim)
    if shape.experts:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ffn)
    writer.add_layer_norm_rms_eps(1e-6 if shape.experts else 1e-5)
    writer.add_vocab_size(vocab)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    names = tensor_shapes(shape, vocab)
    sizes = []
    for name, dims in names:
        qtype = tensor_type(type_name, name)
        if qtype in FLOAT_TYPES:
            dtype = FLOAT_TYPES[qtype]
            nbytes = math.prod(dims) * torch.empty((), dtype=dtype).element_size()
            writer.add_tensor_info(name, dims, np.dtype(NUMPY_BITS[dtype]), nbytes, raw_dtype=qtype)
        else:
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(dims) // block_elems * block_bytes
            byte_shape = (*dims[:-1], dims[-1] // block_elems * block_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        sizes.append(nbytes)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    total = sum(sizes)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress) as bar:
        for name, dims in names:
            data = random_tensor(name, dims, tensor_type(type_name, name), generator)
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
    writer.close()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, help="how many layers (default: the shape's own)")
    parser.add_argument("--type", choices=TYPES, default="bf16", help="tensor types (see above)")
    parser.add_argument("--tokenizer-from", type=Path, help="GGUF whose tokenizer to copy (default: the demo model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=8192, help="the context length the file declares")
    args = parser.parse_args(argv)
    if args.ctx <= 0:
        parser.error(f"--ctx: {args.ctx} is not a positive number of tokens")
    shape = SHAPES[args.shape]
    if args.layers is not None:
        if args.layers <= 0:
            parser.error(f"--layers: {args.layers} is not a positive number of layers")
        shape = replace(shape, layers=args.layers)
    if args.tokenizer_from is None:
        from shardrt.demo_model import demo_model_path

        args.tokenizer_from = demo_model_path()
    if not args.tokenizer_from.is_file():
        parser.error(f"--tokenizer-from: {str(args.tokenizer_from)!r} is not a file")
    t0 = time.perf_counter()
    total = write(args.out, shape, args.type, args.tokenizer_from, args.seed, context=args.ctx)
    print(f"wrote {args.out} ({total / (1 << 30):.2f} GiB of weights) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
