"""Rotary position embedding: the cos/sin tables, and one kernel that rotates q and k by their
positions (after the per-head q/k RMSNorm of qwen3, when the model has one) and writes k and v
into the KV cache at those positions.

Two rope layouts: "interleaved" rotates pairs (2i, 2i+1), as llama.cpp's converter permutes
llama's q/k rows for; "neox" rotates (i, i + rot/2), as qwen files are laid out. Only the first
`rot` dims of a head rotate (partial rotary); the rest pass through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._triton import tl, triton, use_triton
from .norm import rms_norm_reference


@dataclass(frozen=True)
class Yarn:
    """YaRN context extension (gpt-oss, long-context Qwen): each frequency interpolated by `factor`,
    extrapolated, or blended, by how many turns it makes over the original context; cos and sin
    scaled by `attention_factor` (0: 0.1 ln(factor) + 1). `truncate`: the blend's bounds rounded
    out to whole dimensions (transformers' default; gpt-oss's own configuration does not)."""

    factor: float
    original_context: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True

    def inv_freq(self, base: float, rot: int) -> torch.Tensor:
        def turns_dim(turns: float) -> float:  # the dimension whose frequency turns `turns` times
            return rot * math.log(self.original_context / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = turns_dim(self.beta_fast), turns_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rot - 1)
        ramp = ((torch.arange(rot // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
        freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        return freq / self.factor * ramp + freq * (1 - ramp)

    @property
    def scale(self) -> float:
        return self.attention_factor or (0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0)


def rope_tables(base: float, rot: int, max_ctx: int, device, linear_factor: float = 1.0,
                freq_divisors: torch.Tensor | None = None, yarn: Yarn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_ctx, rot/2] float32. `freq_divisors`: llama 3's rope_freqs.weight."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    if yarn is not None:
        inv_freq = yarn.inv_freq(base, rot)
    if freq_divisors is not None:
        inv_freq = inv_freq / freq_divisors.to(torch.float64).cpu()
    positions = torch.arange(max_ctx, dtype=torch.float64) / linear_factor
    angles = torch.outer(positions, inv_freq)
    scale = yarn.scale if yarn is not None else 1.0
    return (angles.cos() * scale).float().to(device), (angles.sin() * scale).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x: [n, heads, head_dim]; cos/sin: [n, rot/2] (the rows of each token's position)."""
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


def rope_kv_write_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int, style: str,
                            q_norm=None, k_norm=None, eps: float = 0.0, slots=None) -> torch.Tensor:
    n, (n_kv_heads, _, head_dim) = qkv.shape[0], k_cache.shape[-3:]
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(n, -1, head_dim) for t in (q, k, v))
    if q_norm is not None:
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    at = positions.clamp(min=0)  # a padding row rotates as at 0
    c, s = cos[at], sin[at]
    q, k = apply_rope(q, c, s, style), apply_rope(k, c, s, style)
    if slots is None:  # graph-safe: no padding rows here
        k_cache.index_copy_(1, positions, k.transpose(0, 1))
        v_cache.index_copy_(1, positions, v.transpose(0, 1))
    else:  # eager only: selecting the real rows waits for the device
        real = positions >= 0
        k_cache[slots[real], :, positions[real]] = k[real]
        v_cache[slots[real], :, positions[real]] = v[real]
    return q


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, style: str,
                  q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                  eps: float = 0.0, slots: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [n, (heads + 2 kv_heads) * head_dim] from the fused projection; cos/sin the full tables
    [max_ctx, rot/2]; positions [n] int64 on the device; k/v_cache [kv_heads, max_ctx, head_dim],
    or with `slots` [n] (int64) every sequence's, [max_seqs, kv_heads, max_ctx, head_dim], token i
    going to sequence slots[i]. A token at a negative position (a padding row of a batch) is
    rotated as at 0 and written nowhere. Returns q [n, heads, head_dim], rotated; k (rotated) and
    v land in the caches."""
    if not use_triton(qkv):
        return rope_kv_write_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads, style, q_norm, k_norm, eps,
                                       slots)
    if slots is None:
        k_cache, v_cache = k_cache[None], v_cache[None]
    n, (n_kv_heads, _, head_dim) = qkv.shape[0], k_cache.shape[1:]
    q = torch.empty((n, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    _rope_kv_kernel[(n, n_heads + 2 * n_kv_heads)](
        qkv, cos, sin, positions, positions if slots is None else slots, k_cache, v_cache, q,
        q_norm if has_norm else q, k_norm if has_norm else q,
        qkv.stride(0), cos.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        n_heads, n_kv_heads, head_dim, cos.shape[1] * 2, eps,
        HAS_SLOTS=slots is not None, INTERLEAVED=style == "interleaved", HAS_NORM=has_norm,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1,
    )
    return q


if triton is not None:
    @triton.jit
    def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr, q_ptr, qn_ptr, kn_ptr,
                        stride_qkv, stride_cos, stride_ks, stride_kh, stride_kt, stride_vs, stride_vh, stride_vt,
                        n_heads, n_kv_heads, head_dim, rot, eps, HAS_SLOTS: tl.constexpr,
                        INTERLEAVED: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
        token, head = tl.program_id(0), tl.program_id(1)  # heads: q heads, then k heads, then v heads
        d = tl.arange(0, BLOCK_D)
        in_head = d < head_dim
        src = qkv_ptr + token * stride_qkv + head * head_dim
        pos = tl.load(pos_ptr + token)
        written = in_head & (pos >= 0)  # a padding row writes nothing
        pos = tl.maximum(pos, 0)
        if HAS_SLOTS:
            slot = tl.load(slot_ptr + token)
            k_ptr += slot * stride_ks
            v_ptr += slot * stride_vs
        x = tl.load(src + d, mask=in_head, other=0.0)
        if head >= n_heads + n_kv_heads:  # v: straight into the cache
            kv = head - n_heads - n_kv_heads
            tl.store(v_ptr + kv * stride_vh + pos * stride_vt + d, x, mask=written)
        else:
            if INTERLEAVED:
                partner = d ^ 1
                freq = d // 2
                sign = tl.where(d % 2 == 0, -1.0, 1.0)
            else:
                half = rot // 2
                partner = tl.where(d < half, d + half, d - half)
                freq = d % half
                sign = tl.where(d < half, -1.0, 1.0)
            rotates = d < rot
            xp = tl.load(src + partner, mask=rotates, other=0.0)
            x32, xp32 = x.to(tl.float32), xp.to(tl.float32)
            if HAS_NORM:  # qwen3: RMSNorm over each q and k head before the rotation
                norm_ptr = qn_ptr if head < n_heads else kn_ptr
                rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / head_dim + eps)
                w = tl.load(norm_ptr + d, mask=in_head, other=0.0).to(tl.float32)
                wp = tl.load(norm_ptr + partner, mask=rotates, other=0.0).to(tl.float32)
                x32 = ((x32 * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
                xp32 = ((xp32 * rstd).to(x.dtype).to(tl.float32) * wp).to(x.dtype).to(tl.float32)
            c = tl.load(cos_ptr + pos * stride_cos + freq, mask=rotates, other=1.0)
            s = tl.load(sin_ptr + pos * stride_cos + freq, mask=rotates, other=0.0)
            y = tl.where(rotates, x32 * c + sign * xp32 * s, x32).to(x.dtype)
            if head < n_heads:
                tl.store(q_ptr + (token * n_heads + head) * head_dim + d, y, mask=in_head)
            else:
                kv = head - n_heads
                tl.store(k_ptr + kv * stride_kh + pos * stride_kt + d, y, mask=written)
