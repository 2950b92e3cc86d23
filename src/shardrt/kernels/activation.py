"""The gated feed-forward's activation over a fused [gate | up] projection: SwiGLU's
silu(gate) * up, and GeGLU's gelu(gate) * up (the tanh approximation, as Gemma uses); either can
also write its output quantized per block of 32 for the integer product that follows (the down
projection), in the same kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import qdot
from ._triton import tl, triton, use_triton

BLOCK = 1024


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


OAI_ALPHA, OAI_LIMIT = 1.702, 7.0  # gpt-oss's gated unit


def clamped_swiglu(gate_up: torch.Tensor, alpha: float = OAI_ALPHA, limit: float = OAI_LIMIT) -> torch.Tensor:
    """gpt-oss's: the gate clamped above at `limit`, the up within +-limit, then
    (up + 1) * gate * sigmoid(alpha * gate). gate_up [n, 2 * ffn] (gate first) -> [n, ffn]."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(gate_up.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [n, 2 * ffn] -> [n, ffn]."""
    return _gated(gate_up, "silu")


def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [n, 2 * ffn] -> [n, ffn]."""
    return _gated(gate_up, "gelu")


def gated_quantized(act, gate_up: torch.Tensor) -> tuple[torch.Tensor, qdot.QuantizedRows]:
    """(act(gate_up), those rows quantized as qdot.quantize_rows quantizes them) for gate_up
    [n, 2 * ffn], ffn a multiple of 32: one kernel for silu_mul and gelu_mul on GPUs."""
    if act not in (silu_mul, gelu_mul) or not use_triton(gate_up):
        out = act(gate_up)
        return out, (qdot.quantize_rows if use_triton(out) else qdot.quantize_rows_reference)(out)
    n, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    if ffn % 32:
        raise ValueError(f"gated_quantized: {ffn} columns are not whole blocks of 32")
    rows = qdot.empty_rows(n, ffn, gate_up.device)
    return _gated(gate_up, "silu" if act is silu_mul else "gelu", rows), rows


def _gated(gate_up: torch.Tensor, act: str, quantized: qdot.QuantizedRows | None = None) -> torch.Tensor:
    if not use_triton(gate_up):
        return (silu_mul_reference if act == "silu" else gelu_mul_reference)(gate_up)
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    n, width = rows.shape
    ffn = width // 2
    out = torch.empty((n, ffn), dtype=rows.dtype, device=rows.device)
    quantize = quantized is not None
    words, scale, sums = (quantized.words, quantized.scale, quantized.sums) if quantize else (out, out, out)
    _silu_mul_kernel[(n, triton.cdiv(ffn, BLOCK))](rows, out, words, scale, sums, rows.stride(0), ffn,
                                                   GELU=act == "gelu", QUANTIZE=quantize, BLOCK=BLOCK,
                                                   EMULATE=qdot.interpreted(), num_warps=4)
    return out.view(*gate_up.shape[:-1], ffn)


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, words_ptr, scale_ptr, sums_ptr, stride_x, ffn, GELU: tl.constexpr,
                         QUANTIZE: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < ffn
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + ffn + cols, mask=mask, other=0.0).to(tl.float32)
        g32 = gate.to(tl.float32)
        if GELU:  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(u) = 1 - 2 / (exp(2u) + 1)
            u = 0.7978845608028654 * (g32 + 0.044715 * g32 * g32 * g32)
            act = 0.5 * g32 * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        else:
            act = g32 / (1.0 + tl.exp(-g32))
        act = act.to(gate.dtype).to(tl.float32)  # rounded as F.silu / F.gelu round
        y = (act * up).to(gate.dtype)
        tl.store(out_ptr + row * ffn + cols, y, mask=mask)
        if QUANTIZE:  # the stored values, as qdot's kernel would read them back
            packed, scale, halves = qdot._quantize_blocks(tl.reshape(y.to(tl.float32), (BLOCK // 32, 32)),
                                                          BLOCK // 32, EMULATE)
            qdot._store_blocks(words_ptr, scale_ptr, sums_ptr, row, ffn // 32,
                               block * (BLOCK // 32) + tl.arange(0, BLOCK // 32), packed, scale, halves)
