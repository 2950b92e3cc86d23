"""Compute kernels under the model: each op is a Triton kernel (one source for CUDA and ROCm)
beside the torch reference it is tested against.

`model.py` calls the ops here and never knows which implementation ran: the Triton kernel on a
GPU tensor when Triton is importable, the torch reference otherwise (CPU, or
`SHARDRT_KERNELS=torch` to compare). Every op is graph-safe: no host sync, no shape that
depends on tensor values, positions as device tensors. A weight is a dense tensor, a
`QuantizedWeight` (GGUF blocks kept as they are), or a tuple of those stacked by rows; a mixture
of experts' stacked matrices may also be `QuantizedExperts` (experts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quant
from .activation import clamped_swiglu, gated_quantized, gelu_mul, silu_mul
from .attention import cached_attention
from .experts import QuantizedExperts
from .moe import ExpertBiases, moe
from .moe import quantizes_input as moe_quantizes_input
from .norm import add_rms_norm, add_rms_norm_quantized, rms_norm, rms_norm_quantized
from .quant import QuantizedWeight
from .rope import apply_rope, rope_kv_write, rope_tables

__all__ = ["QuantizedWeight", "add_rms_norm", "add_normed", "apply_rope", "cached_attention", "embedding", "gelu_mul",
           "linear", "moe", "moe_quantizes_input", "normed", "integer_rows", "gated_quantized", "rms_norm", "QuantizedExperts",
           "rope_kv_write", "rope_tables", "silu_mul", "weight_bytes", "clamped_swiglu", "ExpertBiases"]

Weight = torch.Tensor | QuantizedWeight | tuple


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None, xq=None) -> torch.Tensor:
    """x [n, in] @ weight.T (+ bias) -> [n, out]. `xq`: x already quantized for the integer
    products (`normed`), else each takes its own."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if isinstance(weight, QuantizedWeight):
        return quant.linear(x, weight, bias, xq=xq)
    out = torch.empty((x.shape[0], sum(part.shape[0] for part in weight)), dtype=x.dtype, device=x.device)
    if xq is None:
        xq = quant.quantize_for(x, weight)  # quantized once for every part that takes the integer path
    row = 0
    for part in weight:  # parts of different types (llama.cpp's Q4_K_M mixes Q4_K and Q6_K): each its columns
        rows = part.shape[0]
        if isinstance(part, QuantizedWeight):
            quant.linear(x, part, out=out[:, row : row + rows], xq=xq)
        else:
            out[:, row : row + rows] = F.linear(x, part)
        row += rows
    return out if bias is None else out.add_(bias)


def normed(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """(rms_norm(x), its rows quantized for the integer products, or None): with `quantize` (the
    products that h feeds take them: `integer_rows`) both come from one kernel."""
    if quantize:
        return rms_norm_quantized(x, weight, eps)
    return rms_norm(x, weight, eps), None


def add_normed(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """(x + delta, its rms_norm, those rows quantized or None): `normed` after the residual add."""
    if quantize:
        return add_rms_norm_quantized(x, delta, weight, eps)
    return (*add_rms_norm(x, delta, weight, eps), None)


def integer_rows(x: torch.Tensor, weight: Weight | None) -> bool:
    """Whether a product of rows like x (as many, of the same kind) with `weight` (or one of its
    parts) multiplies them quantized (per 32: GGUF's blocks are whole multiples of 32 wide)."""
    if isinstance(weight, QuantizedWeight):
        weight = (weight,)
    return isinstance(weight, tuple) and quant.integer_path(x, weight)


def embedding(ids: torch.Tensor, weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, QuantizedWeight):
        return quant.embedding(ids, weight, dtype)
    return F.embedding(ids, weight)


def weight_bytes(weight: Weight | None) -> int:
    if weight is None:
        return 0
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    if isinstance(weight, (QuantizedWeight, QuantizedExperts)):
        return weight.nbytes
    return sum(weight_bytes(part) for part in weight)
