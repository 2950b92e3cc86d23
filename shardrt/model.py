"""The decoder-only transformer of the llama family (llama, mistral, qwen2, qwen3) on one screen.

`ModelConfig` reads every shape and rope parameter from GGUF metadata; `Block` is one
transformer layer over a preallocated KV cache. Weights stay in GGUF's layout: llama files
carry q/k rows permuted for interleaved ("normal") rope, qwen files use half-split ("neox")
rope, so each family applies the rope its file was written for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelFormatError
from .gguf_file import GGUFFile

# architecture -> rope style its GGUF weights are laid out for
ROPE_STYLE = {"llama": "interleaved", "mistral": "interleaved", "qwen2": "neox", "qwen3": "neox"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    context_length: int
    rope_base: float
    rope_dim: int
    rope_style: str
    rope_linear_factor: float
    has_rope_freqs: bool  # llama 3 rope scaling: per-frequency divisors in tensor rope_freqs.weight
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.architecture
        if arch not in ROPE_STYLE:
            raise ModelFormatError(
                f"model: general.architecture = {arch!r} is not supported; supported: {', '.join(sorted(ROPE_STYLE))}"
            )

        def key(name: str, default=None, required: bool = True):
            full = f"{arch}.{name}"
            if full in gguf.metadata:
                return gguf.get(full)
            if required and default is None:
                raise ModelFormatError(f"model: {gguf.path.name!r} lacks metadata key {full!r}")
            return default

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", dim // n_heads))
        n_kv_heads = int(key("attention.head_count_kv", n_heads))
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelFormatError(f"model: head_count {n_heads} is not a positive multiple of head_count_kv {n_kv_heads}")
        scaling = str(key("rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):
            raise ModelFormatError(f"model: {arch}.rope.scaling.type = {scaling!r} is not supported; supported: none, linear")
        if "token_embd.weight" not in gguf.tensors:
            raise ModelFormatError(f"model: {gguf.path.name!r} lacks tensor 'token_embd.weight'")
        vocab = int(key("vocab_size", gguf.tensors["token_embd.weight"].shape[1]))
        return cls(
            arch=arch,
            n_layers=int(key("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(key("feed_forward_length")),
            vocab_size=vocab,
            norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            context_length=int(key("context_length", 2048)),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_dim=int(key("rope.dimension_count", head_dim)),
            rope_style=ROPE_STYLE[arch],
            rope_linear_factor=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            has_rope_freqs="rope_freqs.weight" in gguf.tensors,
            qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
            tied_embeddings="output.weight" not in gguf.tensors,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(cfg: ModelConfig, max_ctx: int, device, rope_freqs: torch.Tensor | None = None):
    """cos and sin, each [max_ctx, rope_dim/2], float32."""
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim)
    if rope_freqs is not None:
        inv_freq = inv_freq / rope_freqs.to(torch.float64).cpu()
    positions = torch.arange(max_ctx, dtype=torch.float64) / cfg.rope_linear_factor
    angles = torch.outer(positions, inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x: [n, heads, head_dim]; cos/sin: [n, rope_dim/2]. Rotates the first rope_dim dims."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if style == "interleaved":
        pairs = x_rot.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
        rotated = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


class Block(torch.nn.Module):
    """One transformer layer. `weights` maps GGUF short names (attn_q.weight, ...) to tensors."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        for name, tensor in weights.items():
            self.register_buffer(name.replace(".", "_"), tensor, persistent=False)
        self.has_bias = cfg.qkv_bias
        self.has_qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, k_cache, v_cache, base_pos: int):
        """x: [n, dim] at positions base_pos..base_pos+n; k/v_cache: [kv_heads, max_ctx, head_dim]."""
        cfg, n = self.cfg, x.shape[0]
        h = rms_norm(x, self.attn_norm_weight, cfg.norm_eps)
        q = F.linear(h, self.attn_q_weight, self.attn_q_bias if self.has_bias else None)
        k = F.linear(h, self.attn_k_weight, self.attn_k_bias if self.has_bias else None)
        v = F.linear(h, self.attn_v_weight, self.attn_v_bias if self.has_bias else None)
        q = q.view(n, cfg.n_heads, cfg.head_dim)
        k = k.view(n, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(n, cfg.n_kv_heads, cfg.head_dim)
        if self.has_qk_norm:
            q = rms_norm(q, self.attn_q_norm_weight, cfg.norm_eps)
            k = rms_norm(k, self.attn_k_norm_weight, cfg.norm_eps)
        q = apply_rope(q, cos, sin, cfg.rope_style)
        k = apply_rope(k, cos, sin, cfg.rope_style)

        end = base_pos + n
        k_cache[:, base_pos:end] = k.transpose(0, 1)
        v_cache[:, base_pos:end] = v.transpose(0, 1)
        keys, values = k_cache[:, :end], v_cache[:, :end]
        mask = None
        if n > 1:  # query i sees keys up to base_pos + i
            key_pos = torch.arange(end, device=x.device)
            query_pos = torch.arange(base_pos, end, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
            scale=1.0 / math.sqrt(cfg.head_dim), enable_gqa=cfg.n_heads != cfg.n_kv_heads,
        )
        x = x + F.linear(attn[0].transpose(0, 1).reshape(n, cfg.n_heads * cfg.head_dim), self.attn_output_weight)

        h = rms_norm(x, self.ffn_norm_weight, cfg.norm_eps)
        ffn = F.silu(F.linear(h, self.ffn_gate_weight)) * F.linear(h, self.ffn_up_weight)
        return x + F.linear(ffn, self.ffn_down_weight)


BLOCK_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
BIAS_TENSORS = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
QK_NORM_TENSORS = ("attn_q_norm.weight", "attn_k_norm.weight")


def block_tensor_names(cfg: ModelConfig) -> tuple[str, ...]:
    names = BLOCK_TENSORS
    if cfg.qkv_bias:
        names += BIAS_TENSORS
    if cfg.qk_norm:
        names += QK_NORM_TENSORS
    return names
