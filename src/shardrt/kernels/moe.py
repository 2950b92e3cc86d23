"""Mixture-of-experts feed-forward: a router picks the top k of E experts for each row, and the row
goes through those experts' SwiGLU, their outputs weighted by the router's probabilities.

The experts are stacked as GGUF stores them: gate and up `[E, ff, dim]` each, down `[E, dim, ff]`,
either dense (gate and up then stacked into one `[E, 2 * ff, dim]`, gate rows first) or kept in
their blocks (`experts.QuantizedExperts`; gate_up then the pair (gate, up)). Two ways through
them, the same function:

- a few rows (decode, a short verify, small batches on a GPU): only the chosen experts' weights
  are read, with no host sync, so it runs inside a captured graph: blocks through the grouped
  integer kernels (`moe_qdot`), else the chosen matrices gathered (dequantized from blocks) into
  one batched product per matrix;
- more rows (prefill, large batches) on a GPU, SwiGLU experts in blocks: the slots sorted by expert
  into tiles, each tile multiplied by its expert in one launch per matrix (`moe_mmq`), no host sync;
- otherwise (always on a CPU): each expert that some row chose multiplies all its rows at once (the
  host learns, in one sync, how many rows each expert has), as transformers does.

The top k is one Triton kernel on GPUs (`_top_experts_kernel`: softmax, k maxima, renormalized),
beside its torch reference, so a decode step does not spend half a dozen launches routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import moe_mmq, moe_qdot, qdot, quant
from ._triton import tl, triton, use_triton
from .activation import clamped_swiglu, silu_mul
from .experts import QuantizedExperts

GATHER_ROWS = 64  # rows x top-k up to which a GPU gathers the chosen experts' weights


def route(x: torch.Tensor, router: torch.Tensor, k: int, normalize: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] in x's dtype, experts [n, k]): softmax over the router's logits (float32),
    the top k, renormalized to sum to one with `normalize` (the same as a softmax over the top k
    logits, gpt-oss's order)."""
    logits = quant.linear(x, router, bias) if isinstance(router, quant.QuantizedWeight) else F.linear(x, router, bias)
    if use_triton(logits):
        return top_experts(logits, k, normalize, x.dtype)
    return top_experts_reference(logits, k, normalize, x.dtype)


def top_experts_reference(logits: torch.Tensor, k: int, normalize: bool,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def top_experts(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_experts_reference` in one kernel: a program per row."""
    n, count = logits.shape
    weights = torch.empty((n, k), dtype=dtype, device=logits.device)
    experts = torch.empty((n, k), dtype=torch.int64, device=logits.device)
    _top_experts_kernel[(n,)](logits, weights, experts, logits.stride(0), E=count, K=k,
                              BLOCK_E=triton.next_power_of_2(count), SLOTS=triton.next_power_of_2(k),
                              NORMALIZE=normalize, num_warps=1)
    return weights, experts


def gathers(x: torch.Tensor, k: int) -> bool:
    """Whether `moe` takes the gathered (graph-safe) path for rows like x."""
    return x.device.type != "cpu" and x.shape[0] * k <= GATHER_ROWS


@dataclass(frozen=True)
class ExpertBiases:
    """gpt-oss's biases: the router's [E], the experts' gate and up [E, 2 * ff], down [E, dim]."""

    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


Experts = torch.Tensor | QuantizedExperts | tuple  # dense [E, rows, cols], blocks, or parts stacked by rows


def moe(x: torch.Tensor, router: torch.Tensor, gate_up: Experts, down: Experts, k: int,
        normalize: bool = True, act=silu_mul, biases: ExpertBiases | None = None, xq=None) -> torch.Tensor:
    """x [n, dim] -> [n, dim]. `act`: the gated unit, gate_up [m, 2 * ff] -> [m, ff]. `xq`: x
    already quantized (for the grouped decode kernels, where `quantizes_input`)."""
    weights, experts = route(x, router, k, normalize, biases.router if biases is not None else None)
    if gathers(x, k):
        return gathered(x, weights, experts, gate_up, down, act, biases, xq)
    if biases is None and act is silu_mul and isinstance(gate_up, tuple) and len(gate_up) == 2 \
            and x.device.type != "cpu" and moe_mmq.runs(x, *gate_up, down):
        return moe_mmq.moe_experts(x, weights, experts, gate_up, down)
    return by_expert(x, weights, experts, gate_up, down, act, biases)


def quantizes_input(x: torch.Tensor, gate_up: Experts, k: int, act=silu_mul) -> bool:
    """Whether `moe` multiplies rows like x quantized: the grouped decode kernels, which fuse
    these units (with biases)."""
    return gathers(x, k) and _grouped_gate_up(x, gate_up, act)


def _grouped_gate_up(x: torch.Tensor, gate_up: Experts, act) -> bool:
    return (act is silu_mul or act is clamped_swiglu) and isinstance(gate_up, tuple) and len(gate_up) == 2 \
        and moe_qdot.runs(x, *gate_up)


def gathered(x, weights, experts, gate_up: Experts, down: Experts, act=silu_mul,
             biases: ExpertBiases | None = None, xq=None) -> torch.Tensor:
    """The graph-safe path: each row's chosen experts read, no host sync."""
    n, k = experts.shape
    chosen = experts.reshape(-1)
    if _grouped_gate_up(x, gate_up, act):
        hidden = moe_qdot.gate_up_silu(xq if xq is not None else qdot.quantize_rows(x), experts, *gate_up,
                                       bias=biases.gate_up if biases is not None else None,
                                       clamped=act is clamped_swiglu)
    else:
        rows = x.repeat_interleave(k, dim=0)[:, :, None]  # [n * k, dim, 1]
        hidden = torch.bmm(chosen_matrices(gate_up, chosen, x.dtype), rows)[..., 0]  # [n * k, 2 ff]
        hidden = act(hidden + biases.gate_up[chosen] if biases is not None else hidden)
    if moe_qdot.runs(x, down):
        return moe_qdot.down_weighted(qdot.quantize_rows(hidden), experts, weights, down, x.dtype,
                                      bias=biases.down if biases is not None else None)
    out = torch.bmm(chosen_matrices(down, chosen, x.dtype), hidden.to(x.dtype)[:, :, None])[..., 0]
    out = (out + biases.down[chosen] if biases is not None else out).view(n, k, -1)
    return (out * weights[..., None]).sum(dim=1)


def by_expert(x, weights, experts, gate_up: Experts, down: Experts, act=silu_mul,
              biases: ExpertBiases | None = None) -> torch.Tensor:
    """The prefill path: each chosen expert multiplies all the rows that chose it, in one product
    per matrix (blocks through `quant.linear`, which picks its kernel by the row count)."""
    from . import linear

    k = experts.shape[1]
    slots = experts.reshape(-1).argsort(stable=True)  # row t's j-th choice is slot t * k + j
    counts = torch.bincount(experts.reshape(-1)).tolist()  # the one host sync
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        slot = slots[start : start + count]
        start += count
        rows = slot // k
        up_bias, down_bias = (biases.gate_up[expert], biases.down[expert]) if biases is not None else (None, None)
        hidden = act(linear(x[rows], expert_matrix(gate_up, expert), up_bias))
        y = linear(hidden, expert_matrix(down, expert), down_bias)
        out.index_add_(0, rows, y * weights.reshape(-1)[slot, None])
    return out


def expert_matrix(w: Experts, e: int):
    """Expert e's matrix as `kernels.linear` takes it: dense, a QuantizedWeight, or a tuple of parts."""
    if isinstance(w, QuantizedExperts):
        return w.expert(e)
    if isinstance(w, tuple):
        return tuple(expert_matrix(part, e) for part in w)
    return w[e]


def chosen_matrices(w: Experts, chosen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrices of the experts `chosen` (ids on the device) in `dtype`: [m, rows, cols]."""
    if isinstance(w, QuantizedExperts):
        return w.dequantize(chosen, dtype)
    if isinstance(w, tuple):
        return torch.cat([chosen_matrices(part, chosen, dtype) for part in w], dim=1)
    return w[chosen]


if triton is not None:
    @triton.jit
    def _top_experts_kernel(logits_ptr, weights_ptr, experts_ptr, stride, E: tl.constexpr, K: tl.constexpr,
                            BLOCK_E: tl.constexpr, SLOTS: tl.constexpr, NORMALIZE: tl.constexpr):
        row = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + row * stride + e, mask=e < E, other=-float("inf")).to(tl.float32)
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = probs / tl.sum(probs, axis=0)
        left = tl.where(e < E, probs, -1.0)
        s = tl.arange(0, SLOTS)
        chosen = tl.zeros((SLOTS,), tl.int64)
        weights = tl.zeros((SLOTS,), tl.float32)
        for j in tl.static_range(K):  # the largest left, the lowest id among equals
            best = tl.argmax(left, axis=0)
            chosen = tl.where(s == j, best, chosen)
            weights = tl.where(s == j, tl.max(left, axis=0), weights)
            left = tl.where(e == best, -1.0, left)
        if NORMALIZE:
            weights = weights / tl.sum(weights, axis=0)  # slots past K hold 0
        tl.store(weights_ptr + row * K + s, weights.to(weights_ptr.dtype.element_ty), mask=s < K)
        tl.store(experts_ptr + row * K + s, chosen, mask=s < K)
