"""RMSNorm, and the residual add fused with the RMSNorm that follows it; either can also write
its output quantized per block of 32 (qdot.QuantizedRows) for the integer products it feeds, in
the same kernel, so a quantized layer's decode step does not spend a launch on each activation
quantization."""

from __future__ import annotations

import torch

from . import qdot
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


def rms_norm_quantized(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, qdot.QuantizedRows]:
    """(rms_norm(x), those rows quantized as qdot.quantize_rows quantizes them) for x [n, dim],
    dim a multiple of 32: one kernel on GPUs, the very same values."""
    if not use_triton(x):
        out = rms_norm_reference(x, weight, eps)
        return out, qdot.quantize_rows_reference(out)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = qdot.empty_rows(*x.shape, x.device)
    _launch(x, None, None, out, weight, eps, rows)
    return out, rows


def add_rms_norm_quantized(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, qdot.QuantizedRows]:
    """add_rms_norm, and its normed rows quantized (rms_norm_quantized) in the same kernel."""
    if not use_triton(x):
        total, out = add_rms_norm_reference(x, delta, weight, eps)
        return total, out, qdot.quantize_rows_reference(out)
    total, out = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    rows = qdot.empty_rows(*x.shape, x.device)
    _launch(x, delta, total, out, weight, eps, rows)
    return total, out, rows


def _launch(rows, deltas, total, out, weight, eps, quantized: qdot.QuantizedRows | None = None) -> None:
    n, dim = rows.shape
    block = triton.next_power_of_2(dim)
    has_delta, quantize = deltas is not None, quantized is not None
    if quantize and dim % 32:
        raise ValueError(f"rms_norm_quantized: {dim} columns are not whole blocks of 32")
    words, scale, sums = (quantized.words, quantized.scale, quantized.sums) if quantize else (out, out, out)
    _rms_norm_kernel[(n,)](
        rows, deltas if has_delta else rows, total if has_delta else out, out, weight, words, scale, sums,
        rows.stride(0), deltas.stride(0) if has_delta else 0, dim, eps,
        HAS_DELTA=has_delta, QUANTIZE=quantize, BLOCK=block, BLOCKS=max(1, block // 32), EMULATE=qdot.interpreted(),
        num_warps=min(16, max(1, block // 256)),
    )


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, delta_ptr, total_ptr, out_ptr, w_ptr, words_ptr, scale_ptr, sums_ptr,
                         stride_x, stride_delta, dim, eps, HAS_DELTA: tl.constexpr, QUANTIZE: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCKS: tl.constexpr, EMULATE: tl.constexpr):
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
        if QUANTIZE:  # the stored values, as qdot's kernel would read them back
            packed, scale, halves = qdot._quantize_blocks(tl.reshape(y.to(x.dtype).to(tl.float32), (BLOCKS, 32)),
                                                          BLOCKS, EMULATE)
            qdot._store_blocks(words_ptr, scale_ptr, sums_ptr, row, dim // 32, tl.arange(0, BLOCKS), packed, scale,
                               halves)
