"""Write a random-weight GGUF of a real model's shape, so anyone can benchmark a box without
downloading weights: Llama 3 8B / 1B / 70B bodies (or a tiny one for CI), llama architecture;
Qwen3-30B-A3B's mixture of experts (or a tiny one), qwen3moe architecture; and Qwen3.6-27B (the
same body as Qwen3.5-27B: gated DeltaNet layers with every fourth a gated full-attention one, or a
tiny one), qwen35 architecture, with llama.cpp's tensor names and ssm.* keys. The tokenizer comes
from another GGUF, the demo model by default; the vocabulary is its size, except for shapes that
name their own (qwen3.6-27b: 248320), whose extra rows get "[PADn]" tokens of type UNUSED, as
llama.cpp's converter pads a vocabulary smaller than the model's embedding.

    python scripts/make_gguf.py OUT.gguf --shape llama3-8b [--layers N] [--type bf16] [--tokenizer-from GGUF]
    python scripts/make_gguf.py OUT.gguf --shape qwen3-30b-a3b --type q4_k_m
    python scripts/make_gguf.py OUT.gguf --shape qwen3.6-27b --type q4_k_m

--type: f32, f16, bf16 (weights N(0, 0.02)), or quantized: q8_0, q4_0, q6_k, and q4_k_m (Q4_K, with
attn_v, ffn_down (the experts' too), the DeltaNet's attn_qkv and the output in Q6_K, as llama.cpp's
Q4_K_M mostly is: it gives Q6_K to those on some layers). Quantized tensors are random blocks whose
scales give weights of about that spread and no mean; a matrix whose rows are not whole blocks of
its type falls back as llama.cpp's quantizer does (Q4_K to Q5_0, Q6_K to Q8_0, else F16). Norms are
near 1; they, the router, the DeltaNet's convolution and its decay (ssm_a = -A, A in (0, 16), and
the bias ssm_dt near 1, as transformers initialises them) stay F32 (llama.cpp never quantizes them,
and its convolution op reads F32 only). Tensors are streamed to the file one at a time (drawn on
the GPU when there is one), so a 40 GiB file needs no more than one tensor's worth of memory.
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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, TokenType
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
    # qwen35: DeltaNet layers, every full_attention_every-th layer a full-attention one; the
    # DeltaNet's key heads, value heads (each with its own state), head size (of keys and values
    # alike: llama.cpp's ssm.state_size is both) and convolution width
    full_attention_every: int = 0
    ssm_k_heads: int = 0
    ssm_v_heads: int = 0
    ssm_head_dim: int = 0
    ssm_conv: int = 0
    rope_dim: int = 0  # rope over this many dims of a head; 0: all of them
    rope_sections: tuple[int, ...] = ()  # M-RoPE's split of the rope_dim / 2 pairs (qwen35)
    vocab: int = 0  # embedding and head rows; 0 (or fewer than the tokenizer has): the tokenizer's tokens

    @property
    def arch(self) -> str:
        return "qwen35" if self.full_attention_every else "qwen3moe" if self.experts else "llama"

    @property
    def head_width(self) -> int:
        return self.head_dim or self.dim // self.heads

    @property
    def norm_eps(self) -> float:
        return 1e-5 if self.arch == "llama" else 1e-6

    def recurrent(self, layer: int) -> bool:
        """Whether `layer` is a DeltaNet one, as llama.cpp marks it from full_attention_interval."""
        return self.full_attention_every > 0 and (layer + 1) % self.full_attention_every != 0


SHAPES = {
    "tiny": Shape(layers=4, dim=256, heads=4, kv_heads=2, ffn=512, rope_base=10000.0),  # K-quant rows: 256s
    "tiny-moe": Shape(layers=2, dim=256, heads=4, kv_heads=2, ffn=512, rope_base=1e6, head_dim=64, experts=8,
                      experts_used=2, expert_ffn=256),
    # its config's intermediate_size 6144 is written as feed_forward_length, which no layer uses
    "qwen3-30b-a3b": Shape(layers=48, dim=2048, heads=32, kv_heads=4, ffn=6144, rope_base=1e6, head_dim=128,
                           experts=128, experts_used=8, expert_ffn=768),
    # Qwen/Qwen3.6-27B's config.json (text_config; Qwen3.5-27B's is the same): 64 layers of 16 x (3
    # DeltaNet, 1 gated attention), hidden 5120, attention 24 heads / 4 KV of 256, partial rotary 0.25
    # with mrope_section [11, 11, 10], rope_theta 1e7; DeltaNet 16 key / 48 value heads of 128,
    # conv kernel 4; intermediate 17408; vocabulary 248320 (padded); its MTP layer is left out
    "qwen3.6-27b": Shape(layers=64, dim=5120, heads=24, kv_heads=4, ffn=17408, rope_base=1e7, head_dim=256,
                         full_attention_every=4, ssm_k_heads=16, ssm_v_heads=48, ssm_head_dim=128, ssm_conv=4,
                         rope_dim=64, rope_sections=(11, 11, 10, 0), vocab=248320),
    # two of each three layers DeltaNet; ffn 384 leaves ffn_down's rows short of whole K-quant blocks,
    # so q4_k_m falls back for it (to Q8_0) as llama.cpp's quantizer would
    "tiny-qwen35": Shape(layers=6, dim=256, heads=4, kv_heads=2, ffn=384, rope_base=1e7, head_dim=64,
                         full_attention_every=3, ssm_k_heads=2, ssm_v_heads=4, ssm_head_dim=64, ssm_conv=4,
                         rope_dim=16, rope_sections=(3, 3, 2, 0)),
    "llama3-1b": Shape(layers=16, dim=2048, heads=32, kv_heads=8, ffn=8192),
    "llama3-8b": Shape(layers=32, dim=4096, heads=32, kv_heads=8, ffn=14336),
    "llama3-70b": Shape(layers=80, dim=8192, heads=64, kv_heads=8, ffn=28672),
    "smollm2-135m": Shape(layers=30, dim=576, heads=9, kv_heads=3, ffn=1536, rope_base=100000.0),  # a drafter's
}
Q = GGMLQuantizationType
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
# Q6_K in q4_k_m (llama.cpp counts the DeltaNet's fused attn_qkv among the attn_v-like tensors)
SIX_BIT_TENSORS = ("attn_v.weight", "attn_qkv.weight", "ffn_down.weight", "ffn_down_exps.weight", "output.weight")
# F32 whatever the type: norms, the router, the DeltaNet's convolution (ggml_ssm_conv reads F32
# only) and its decay, ssm_a and ssm_dt.bias (as llama.cpp's converter: what does not end in .weight)
FLOAT32_TENSORS = ("norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias")
# llama.cpp's quantizer (tensor_type_fallback) for a row that is not whole blocks of the type: the
# type of the next smaller block, else (still not whole blocks) F16
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


def tensor_type(type_name: str, name: str, dims: tuple[int, ...]) -> Q:
    """The GGUF type tensor `name` of torch-order shape `dims` is written in under --type `type_name`."""
    if name.endswith(FLOAT32_TENSORS) or len(dims) < 2:
        return Q.F32
    if type_name == "q4_k_m":
        short = name.split(".", 2)[2] if name.startswith("blk.") else name  # (attn_output.weight is not output.weight)
        qtype = Q.Q6_K if short in SIX_BIT_TENSORS else Q.Q4_K
    else:
        qtype = Q[type_name.upper()]
    row = dims[-1]
    if qtype in FLOAT_TYPES or row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = FALLBACK.get(qtype, Q.F16)
    return fallback if fallback in FLOAT_TYPES or row % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q6_k", "q4_k_m")
# where each type's f16 scales sit in its block (byte offsets), and a value giving weights of
# roughly N(0, 0.02) spread with random quants (the rest of each block is random bytes). Each block
# gets a random sign on its scales, and Q4_K's dmin is 7.5 d (its quants' mean times d), so that
# rows have no mean: rows sharing one push a common offset into the residual stream, which then
# grows with every layer (with dmin = 4 d, Qwen3.6-27B's 64 layers took the residual's RMS to 3e4,
# against 130 without)
SCALE_FIELDS = {Q.Q8_0: ((0, 2.7e-4),), Q.Q4_0: ((0, 4.5e-3),), Q.Q5_0: ((0, 2.2e-3),), Q.Q4_K: ((0, 8e-5), (2, 6e-4)),
                Q.Q6_K: ((208, 2e-5),)}


def tensor_shapes(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch-order shape) of every tensor, in file order."""
    if shape.arch == "qwen35":
        return qwen35_tensor_shapes(shape, vocab)
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


def qwen35_tensor_shapes(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """qwen35's tensors as llama.cpp's loader creates them (llama_model_qwen35::load_arch_tensors):
    a DeltaNet layer's fused q/k/v (the convolution's channels), output gate, beta and alpha (the
    decay's input) per value head, convolution, decay, gated norm (one head wide) and output; an
    attention layer's q with a gate per head (twice the rows), k, v, output and q/k norms; both with
    post_attention_norm before a dense SwiGLU."""
    dim, head_dim, ffn = shape.dim, shape.head_width, shape.ffn
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    keys, values = shape.ssm_k_heads * shape.ssm_head_dim, shape.ssm_v_heads * shape.ssm_head_dim
    conv, heads = 2 * keys + values, shape.ssm_v_heads
    out = [("token_embd.weight", (vocab, dim))]
    for i in range(shape.layers):
        blk = f"blk.{i}."
        out += [(blk + "attn_norm.weight", (dim,)), (blk + "post_attention_norm.weight", (dim,))]
        if shape.recurrent(i):
            out += [(blk + "attn_qkv.weight", (conv, dim)), (blk + "attn_gate.weight", (values, dim)),
                    (blk + "ssm_conv1d.weight", (conv, shape.ssm_conv)), (blk + "ssm_dt.bias", (heads,)),
                    (blk + "ssm_a", (heads,)), (blk + "ssm_beta.weight", (heads, dim)),
                    (blk + "ssm_alpha.weight", (heads, dim)), (blk + "ssm_norm.weight", (shape.ssm_head_dim,)),
                    (blk + "ssm_out.weight", (dim, values))]
        else:
            out += [(blk + "attn_q.weight", (2 * q, dim)), (blk + "attn_k.weight", (kv, dim)),
                    (blk + "attn_v.weight", (kv, dim)), (blk + "attn_output.weight", (dim, q)),
                    (blk + "attn_q_norm.weight", (head_dim,)), (blk + "attn_k_norm.weight", (head_dim,))]
        out += [(blk + "ffn_gate.weight", (ffn, dim)), (blk + "ffn_up.weight", (ffn, dim)),
                (blk + "ffn_down.weight", (dim, ffn))]
    return out + [("output_norm.weight", (dim,)), ("output.weight", (vocab, dim))]


def random_tensor(name: str, shape: tuple[int, ...], qtype: Q, generator: torch.Generator) -> np.ndarray:
    """The tensor's bytes as the writer takes them: floats, or uint8 blocks [rows, row_bytes]."""
    device = generator.device
    if qtype not in FLOAT_TYPES:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = torch.randint(0, 256, (math.prod(shape) // block_elems, block_bytes), generator=generator,
                               device=device, dtype=torch.uint8)
        sign = torch.randint(0, 2, (blocks.shape[0],), generator=generator, device=device) * 2 - 1
        for at, value in SCALE_FIELDS[qtype]:
            scale = (value * sign).to(torch.float16)
            blocks[:, at : at + 2] = scale.view(torch.uint8).view(-1, 2)
        return blocks.cpu().numpy().reshape(*shape[:-1], -1)
    dtype = FLOAT_TYPES[qtype]
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if name.endswith(("norm.weight", "ssm_dt.bias")):  # (transformers initialises dt_bias to ones)
        x = 1.0 + 0.1 * x
    elif name.endswith("ssm_a"):  # -A, A ~ U(0, 16) as transformers draws it (A_log = log A): every speed of decay
        x = -16.0 * torch.rand(shape, generator=generator, device=device)
    elif name.endswith("ssm_conv1d.weight"):  # about the spread of torch's Conv1d init for a width-4 kernel
        x = 0.3 * x
    else:
        x = 0.02 * x
    x = x.to(dtype).cpu()
    return (x.view(torch.uint16) if dtype == torch.bfloat16 else x).numpy().view(NUMPY_BITS[dtype])


# a padded vocabulary's extra tokens, as llama.cpp's converter writes them: "[PADn]", of type UNUSED
# (with a SentencePiece vocabulary's score for them)
PAD_ENTRIES = {"tokenizer.ggml.token_type": int(TokenType.UNUSED), "tokenizer.ggml.scores": -1000.0}


def tokenizer_keys(source: GGUFReader, vocab: int) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """(key, value, type, array element type) of the source's tokenizer.* keys, its per-token lists
    padded to `vocab` entries."""
    out = []
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            value, sub_type = field.contents(), field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            if key == "tokenizer.ggml.tokens":
                value = value + [f"[PAD{i}]" for i in range(len(value), vocab)]
            elif key in PAD_ENTRIES:
                value = value + [PAD_ENTRIES[key]] * (vocab - len(value))
            out.append((key, value, field.types[0], sub_type))
    return out


def write(out: Path, shape: Shape, type_name: str, tokenizer_from: Path, seed: int, progress: bool = True,
          context: int = 8192) -> int:
    if type_name not in TYPES:
        raise ValueError(f"--type: {type_name!r} is not one of {', '.join(TYPES)}")
    source = GGUFReader(tokenizer_from)
    vocab = max(len(source.fields["tokenizer.ggml.tokens"].data), shape.vocab)
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
    writer.add_rope_dimension_count(shape.rope_dim or head_dim)
    if shape.arch != "llama":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if shape.experts:
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ffn)
    if shape.arch == "qwen35":  # the keys llama_model_qwen35::load_arch_hparams reads
        writer.add_rope_dimension_sections(list(shape.rope_sections))
        writer.add_ssm_conv_kernel(shape.ssm_conv)
        writer.add_ssm_state_size(shape.ssm_head_dim)
        writer.add_ssm_group_count(shape.ssm_k_heads)
        writer.add_ssm_time_step_rank(shape.ssm_v_heads)
        writer.add_ssm_inner_size(shape.ssm_v_heads * shape.ssm_head_dim)
        writer.add_full_attention_interval(shape.full_attention_every)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_vocab_size(vocab)
    for key, value, value_type, sub_type in tokenizer_keys(source, vocab):
        writer.add_key_value(key, value, value_type, sub_type)
    names = tensor_shapes(shape, vocab)
    sizes = []
    for name, dims in names:
        qtype = tensor_type(type_name, name, dims)
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
            data = random_tensor(name, dims, tensor_type(type_name, name, dims), generator)
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
