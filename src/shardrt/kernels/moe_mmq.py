"""A mixture of experts' feed-forward for many tokens (a prefill, a large batch) in three launches
of the int8 tensor-core kernel (`mmq`), its experts kept in their GGUF blocks, no host sync.

The n * k slots (token t's j-th choice is slot t * k + j) are sorted by expert and laid out in
tiles of `block_m` rows, each tile one expert's slots, the last tile of an expert padded (`Tiles`).
One launch of `mmq.grouped_linear` then multiplies every tile by its expert's gate matrix, one by
its up matrix, and, after the SwiGLU (whose kernel also writes the hidden rows quantized per 32), one by
its down matrix; each slot's output is weighted by the router's probability and summed over the
token's k slots. An expert is read once per tile of its slots, not once per slot (as the decode
kernels of `moe_qdot` do) nor in a launch of its own (as `moe.by_expert` does, a host sync and a
few launches for each expert).

The layout is computed on the device from the expert ids alone, in a buffer sized for the worst
case (every chosen expert's last tile nearly empty), with the count of tiles in use read by the
kernel, so the whole feed-forward can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import mmq, qdot
from ._triton import triton, use_triton
from .activation import gated_quantized, silu_mul
from .experts import QuantizedExperts


@dataclass(frozen=True)
class Tiles:
    """The slots of n tokens' k choices laid out by expert in tiles of `block_m` rows.

    src: int32 [capacity], the activation row each row reads (-1: padding); tile_expert: int32
    [capacity / block_m], each tile's expert; count: int32 [1], the tiles in use; position: int64
    [n * k], the row of slot t * k + j."""

    src: torch.Tensor
    tile_expert: torch.Tensor
    count: torch.Tensor
    position: torch.Tensor
    block_m: int

    @property
    def capacity(self) -> int:
        return self.src.shape[0]


def tiles(experts: torch.Tensor, count: int, block_m: int) -> Tiles:
    """The layout of the slots of `experts` [n, k] (ids below `count`); src names the token."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    slots = flat.numel()
    device = experts.device
    order = flat.argsort(stable=True)  # the slots by expert, in slot order within one
    per_expert = torch.zeros(count, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))  # bincount without its host sync
    padded = (per_expert + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    by_expert = flat[order]
    rank = torch.arange(slots, device=device) - (per_expert.cumsum(0) - per_expert)[by_expert]
    row = (padded_end - padded)[by_expert] + rank
    capacity = -(-(slots + min(count, slots) * (block_m - 1)) // block_m) * block_m
    src = torch.full((capacity,), -1, dtype=torch.int32, device=device)
    src[row] = (order // k).to(torch.int32)
    position = torch.empty(slots, dtype=torch.int64, device=device)
    position[order] = row
    starts = torch.arange(0, capacity, block_m, device=device)
    tile_expert = torch.searchsorted(padded_end, starts, right=True).clamp_(max=count - 1).to(torch.int32)
    used = (padded_end[-1:] // block_m).to(torch.int32)
    return Tiles(src, tile_expert, used, position, block_m)


def runs(x: torch.Tensor, *weights) -> bool:
    """Whether this path multiplies activations like x with these experts: the integer path runs
    here and every weight is experts in blocks of a type the tensor-core kernel reads."""
    return use_triton(x) and (qdot.supported(x) or not x.is_cuda) and all(
        isinstance(w, QuantizedExperts) and w.qtype in mmq.MMQ_TYPES for w in weights)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                gate_up: tuple[QuantizedExperts, QuantizedExperts], down: QuantizedExperts,
                block_m: int | None = None) -> torch.Tensor:
    """x [n, dim] through its routed experts (ids and router weights [n, k]) and their SwiGLU ->
    [n, dim] in x's dtype. block_m: rows a tile (default: mmq's for the mean slots per expert)."""
    gate, up = gate_up
    n, k = experts.shape
    wanted = block_m or mmq.block_m(triton.cdiv(n * k, gate.count))
    key = ("grouped", gate.qtype, up.qtype, down.qtype, gate.cols, down.cols, x.device)
    layout, out = mmq.fit_rows(key, wanted, lambda rows: _experts_in_tiles(x, experts, gate, up, down, rows))
    chosen = out[layout.position].view(n, k, down.rows).float()
    return (chosen * weights.float()[..., None]).sum(dim=1).to(x.dtype)


def _experts_in_tiles(x: torch.Tensor, experts: torch.Tensor, gate: QuantizedExperts, up: QuantizedExperts,
                      down: QuantizedExperts, block_m: int) -> tuple[Tiles, torch.Tensor]:
    """The slots of x's chosen experts in tiles of block_m rows, and each slot's expert output
    [layout.capacity, dim] (the router weights not yet applied)."""
    ffn = gate.rows
    layout = tiles(experts, gate.count, block_m)
    both = torch.empty((layout.capacity, 2 * ffn), dtype=x.dtype, device=x.device)
    xq = qdot.quantize_rows(x)
    mmq.grouped_linear(xq, gate, layout, both[:, :ffn])
    mmq.grouped_linear(xq, up, layout, both[:, ffn:])
    _, hidden_q = gated_quantized(silu_mul, both)  # the unit's kernel quantizes the hidden rows it writes
    # the down products read the hidden rows where they are: a row's own index, padding still -1
    own = torch.where(layout.src >= 0, torch.arange(layout.capacity, device=x.device, dtype=torch.int32), -1)
    out = torch.empty((layout.capacity, down.rows), dtype=x.dtype, device=x.device)
    mmq.grouped_linear(hidden_q, down, replace(layout, src=own), out)
    return layout, out
