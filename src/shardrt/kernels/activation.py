"""SwiGLU's gate: silu(gate) * up over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

BLOCK = 1024


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [n, 2 * ffn] -> [n, ffn]."""
    if not use_triton(gate_up):
        return silu_mul_reference(gate_up)
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    n, width = rows.shape
    ffn = width // 2
    out = torch.empty((n, ffn), dtype=rows.dtype, device=rows.device)
    _silu_mul_kernel[(n, triton.cdiv(ffn, BLOCK))](rows, out, rows.stride(0), ffn, BLOCK=BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], ffn)


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, ffn, BLOCK: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ffn
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + ffn + cols, mask=mask, other=0.0).to(tl.float32)
        g32 = gate.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)  # rounded as F.silu rounds
        tl.store(out_ptr + row * ffn + cols, (silu * up).to(gate.dtype), mask=mask)
