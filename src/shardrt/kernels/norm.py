"""RMSNorm, and the residual add fused with the RMSNorm that follows it."""

from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    return total, rms_norm_reference(total, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] normalised over its last dimension, times `weight`."""
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    _launch(rows, None, None, out, weight, eps)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass: the residual stream and the next layer's input."""
    if not use_triton(x):
        return add_rms_norm_reference(x, delta, weight, eps)
    rows, deltas = x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1])
    total, out = torch.empty_like(rows), torch.empty_like(rows)
    _launch(rows, deltas, total, out, weight, eps)
    return total.view(x.shape), out.view(x.shape)


def _launch(rows, deltas, total, out, weight, eps) -> None:
    n, dim = rows.shape
    block = triton.next_power_of_2(dim)
    has_delta = deltas is not None
    _rms_norm_kernel[(n,)](
        rows, deltas if has_delta else rows, total if has_delta else out, out, weight,
        rows.stride(0), deltas.stride(0) if has_delta else 0, dim, eps,
        HAS_DELTA=has_delta, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, delta_ptr, total_ptr, out_ptr, w_ptr, stride_x, stride_delta, dim, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # rounded as the torch add rounds
            tl.store(total_ptr + row * dim + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x32 * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(out_ptr + row * dim + cols, y.to(x.dtype), mask=mask)
