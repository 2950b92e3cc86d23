"""Tiny synthetic GGUF models for tests: llama, qwen2 (q/k/v bias), qwen3 (q/k norm), qwen3moe
(qwen3's attention, a router and stacked experts instead of the feed-forward).

Weights are random (seeded numpy) and written with `gguf.GGUFWriter` in the tensor types a test
asks for; the metadata is what llama.cpp writes and what transformers' GGUF loader reads, plus a
minimal byte-level ("gpt2") tokenizer so `AutoTokenizer` / `AutoModelForCausalLM` can open the file.

`write_model` also writes deliberately broken files: drop tensors or metadata keys, store one
tensor in a type shardrt does not run, or write under another architecture name. Byte-level damage
(magic, version, truncation) is left to the tests, which patch the written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize

Q = GGMLQuantizationType

# Where the f16 super-block scale `d` (and `dmin`, if any) sit in a K-quant block, as byte offsets.
# gguf-py can dequantize K-quants but not quantize them, so their blocks are random bytes with
# these scales set to give weights of a chosen spread.
_K_SCALE_FIELDS: dict[Q, tuple[int, int | None]] = {
    Q.Q2_K: (-4, -2),
    Q.Q3_K: (-2, None),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (-2, None),
}
# dmin / d for the K-quants with a minimum, so the weights come out roughly centred on zero
_K_DMIN_RATIO = {Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}

# the dense families whose files transformers reads back (tests/test_synthetic_models.py); write_model
# also writes qwen3moe, whose check against transformers is tests/test_moe.py's
ARCHS = ("llama", "qwen2", "qwen3")


def qtype_of(t: str | Q) -> Q:
    return t if isinstance(t, Q) else Q[t]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_vocab() -> tuple[list[str], list[str], list[int], int]:
    """tokens, merges, token types and the eos id of the minimal byte-level tokenizer (259 tokens)."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)]
    space = spelling[ord(" ")]
    merges = [f"{space} h", f"{space}h i"]
    tokens += [f"{space}h", f"{space}hi", "<|endoftext|>"]
    types = [int(TokenType.NORMAL)] * (len(tokens) - 1) + [int(TokenType.CONTROL)]
    return tokens, merges, types, len(tokens) - 1


VOCAB_SIZE = len(tokenizer_vocab()[0])


def _k_quant_bytes(rows: int, cols: int, qtype: Q, std: float, rng: np.random.Generator) -> np.ndarray:
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    d_at, dmin_at = _K_SCALE_FIELDS[qtype]
    ratio = _K_DMIN_RATIO.get(qtype, 0.0)

    def set_scales(d: float) -> None:
        for at, value in ((d_at, d), (dmin_at, d * ratio)):
            if at is None:
                continue
            stop = at + 2 if at + 2 != 0 else None
            blocks[:, at:stop] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)

    set_scales(1.0)
    spread = float(dequantize(blocks, qtype).std())
    set_scales(std / spread)
    return blocks.reshape(rows, -1)


def add_tokenizer(w: GGUFWriter) -> int:
    """The minimal byte-level tokenizer's metadata; returns its vocabulary size."""
    tokens, merges, token_types, eos_id = tokenizer_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(token_types)
    w.add_eos_token_id(eos_id)
    w.add_bos_token_id(eos_id)
    w.add_add_bos_token(False)
    return len(tokens)


def encode_weight(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """(array to hand to add_tensor, raw_dtype) for a float32 matrix w [rows, cols] stored as qtype."""
    block_elems, _ = GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block_elems:
        raise ValueError(f"row length {w.shape[-1]} is not a multiple of {qtype.name}'s block of {block_elems}")
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in _K_SCALE_FIELDS:  # no quantizer in gguf-py: random blocks with the spread of w
        return _k_quant_bytes(w.shape[0], w.shape[1], qtype, float(w.std()), rng), qtype
    return quantize(w, qtype), qtype


def write_model(
    path: str | Path,
    arch: str = "llama",
    *,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    ffn_dim: int = 128,
    qtype: str | Q = "F32",
    embed_qtype: str | Q | None = None,
    tied: bool = False,
    seed: int = 0,
    rope_base: float = 10000.0,
    context_length: int = 256,
    norm_eps: float = 1e-5,
    rope_freqs: np.ndarray | None = None,
    tokenizer: bool = True,
    drop_tensors: Iterable[str] = (),
    drop_keys: Iterable[str] = (),
    tensor_types: Mapping[str, int | Q] | None = None,
    extra_keys: Mapping[str, Any] | None = None,
    experts: tuple[int, int, int] = (8, 2, 256),
    expert_qtypes: tuple[str | Q, str | Q, str | Q] | None = None,
) -> Path:
    """Write a random model to `path` and return the path.

    qtype: type of every 2-D weight except the embedding (embed_qtype, default qtype) — norms,
        biases and rope_freqs stay F32. head_dim defaults to dim // n_heads, except for qwen3, where
        transformers fixes it at 128 (Qwen3Config's default; the GGUF loader does not read
        attention.key_length for qwen3).
    tied: omit output.weight (the head reuses token_embd.weight).
    rope_freqs: write a `rope_freqs.weight` F32 tensor (llama 3 rope scaling) with these values.
    drop_tensors / drop_keys: leave these tensors / metadata keys (full names) out.
    tensor_types: write these tensors with this type id instead, as random bytes of the right size
        (for ids gguf knows) — the way to make a file holding a type shardrt does not run; an id that
        is no GGMLQuantizationType is patched into the tensor directory after writing.
    extra_keys: more metadata, name -> value (str, int, float, bool, or list); replaces a key written above.
    experts: qwen3moe's (expert count, used per token, expert ffn width); expert_qtypes: the types
        of its stacked gate, up and down experts (default qtype); the router stays F32, as
        llama.cpp writes it.
    """
    path = Path(path)
    qtype, embed_qtype = qtype_of(qtype), qtype_of(embed_qtype or qtype)
    if head_dim is None:
        head_dim = 128 if arch == "qwen3" else dim // n_heads
    rng = np.random.default_rng(seed)
    drop_tensors, drop_keys = set(drop_tensors), set(drop_keys)
    tensor_types = dict(tensor_types or {})
    tokens, merges, token_types, eos_id = tokenizer_vocab()
    vocab = len(tokens)

    w = GGUFWriter(path, arch)
    w.add_name(f"synthetic-{arch}")
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_vocab_size(vocab)
    n_experts, n_used, expert_ffn = experts
    if arch == "qwen3moe":
        w.add_expert_count(n_experts)
        w.add_expert_used_count(n_used)
        w.add_expert_feed_forward_length(expert_ffn)
    file_types = LlamaFileType.__members__  # general.file_type: informative only
    ftype = LlamaFileType.ALL_F32 if qtype == Q.F32 else file_types.get(f"MOSTLY_{qtype.name}", LlamaFileType.GUESSED)
    w.add_file_type(int(ftype))
    if tokenizer:
        add_tokenizer(w)
    for key in drop_keys:
        for kv in w.kv_data:
            kv.pop(key, None)
    for key, value in (extra_keys or {}).items():  # added last, so they replace what is above
        for kv in w.kv_data:
            kv.pop(key, None)
        w.add_key_value(key, value, _value_type(value), sub_type=_value_type(value[0]) if isinstance(value, list) else None)

    patch_ids: dict[str, int] = {}

    def add(name: str, array: np.ndarray, t: Q = Q.F32) -> None:
        if name in drop_tensors:
            return
        if name in tensor_types:
            type_id = int(tensor_types[name])
            try:
                t = Q(type_id)
            except ValueError:  # an id gguf does not know: write F32 now, patch the id afterwards
                patch_ids[name] = type_id
                t = Q.F32
            else:
                block_elems, block_bytes = GGML_QUANT_SIZES[t]
                rows = array.shape[0] if array.ndim == 2 else 1
                n_bytes = array.size // block_elems * block_bytes
                raw = rng.integers(0, 256, size=(rows, n_bytes // rows), dtype=np.uint8)
                w.add_tensor(name, raw, raw_dtype=t)
                return
        if array.ndim == 3 and t != Q.F32:  # stacked experts: blocks of each expert's rows, in order
            data, raw_dtype = encode_weight(array.reshape(-1, array.shape[-1]), t, rng)
            data = data.reshape(*array.shape[:-1], -1)
        else:
            data, raw_dtype = encode_weight(array, t, rng) if array.ndim == 2 else (array.astype(np.float32), None)
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    add("token_embd.weight", rng.standard_normal((vocab, dim)).astype(np.float32), embed_qtype)
    if rope_freqs is not None:
        add("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(dim))
        add(p + "attn_q.weight", matrix(q_dim, dim), qtype)
        add(p + "attn_k.weight", matrix(kv_dim, dim), qtype)
        add(p + "attn_v.weight", matrix(kv_dim, dim), qtype)
        if arch == "qwen2":
            add(p + "attn_q.bias", 0.1 * rng.standard_normal(q_dim).astype(np.float32))
            add(p + "attn_k.bias", 0.1 * rng.standard_normal(kv_dim).astype(np.float32))
            add(p + "attn_v.bias", 0.1 * rng.standard_normal(kv_dim).astype(np.float32))
        if arch in ("qwen3", "qwen3moe"):
            add(p + "attn_q_norm.weight", norm(head_dim))
            add(p + "attn_k_norm.weight", norm(head_dim))
        add(p + "attn_output.weight", matrix(dim, q_dim), qtype)
        add(p + "ffn_norm.weight", norm(dim))
        if arch == "qwen3moe":
            gate_type, up_type, down_type = (qtype_of(t) for t in expert_qtypes or (qtype,) * 3)
            add(p + "ffn_gate_inp.weight", matrix(n_experts, dim))
            add(p + "ffn_gate_exps.weight", np.stack([matrix(expert_ffn, dim) for _ in range(n_experts)]), gate_type)
            add(p + "ffn_up_exps.weight", np.stack([matrix(expert_ffn, dim) for _ in range(n_experts)]), up_type)
            add(p + "ffn_down_exps.weight", np.stack([matrix(dim, expert_ffn) for _ in range(n_experts)]), down_type)
            continue
        add(p + "ffn_gate.weight", matrix(ffn_dim, dim), qtype)
        add(p + "ffn_up.weight", matrix(ffn_dim, dim), qtype)
        add(p + "ffn_down.weight", matrix(dim, ffn_dim), qtype)
    add("output_norm.weight", norm(dim))
    if not tied:
        add("output.weight", matrix(vocab, dim), qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, type_id in patch_ids.items():
        patch_tensor_type(path, name, type_id)
    return path


def _value_type(value: Any):
    from gguf import GGUFValueType

    return GGUFValueType.get_type(value)


def tensor_info_offset(path: str | Path, name: str) -> int:
    """Byte offset of tensor `name`'s type id in the file's tensor directory."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == name:
            field = tensor.field
            # parts: name length, name, n_dims, dims, type, offset
            return int(field.offset + sum(part.nbytes for part in field.parts[:4]))
    raise KeyError(name)


def patch_tensor_type(path: str | Path, name: str, type_id: int) -> None:
    """Overwrite tensor `name`'s type id in place (the file's size and offsets stay as they are)."""
    at = tensor_info_offset(path, name)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(int(type_id).to_bytes(4, "little"))


def rope_freqs_llama3(head_dim: int, rope_base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                      high_freq_factor: float = 4.0, original_context: int = 64) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for llama 3 rope scaling: default inv_freq / llama3 inv_freq, per pair."""
    import math

    inv_freq = 1.0 / rope_base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    factors = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
