"""Mixture-of-experts feed-forward: a router picks the top k of E experts for each row, and the row
goes through those experts' SwiGLU, their outputs weighted by the router's probabilities.

The experts are stacked 3-D tensors, as GGUF stores them: gate and up together
`[E, 2 * ff, dim]` (gate rows first), down `[E, dim, ff]`. Two ways through them, the same function:

- a few rows (decode, a short verify, small batches on a GPU): the chosen experts' matrices are
  gathered and multiplied in one batched product per matrix. No host sync, so it runs inside a
  captured graph, and only the chosen experts' weights are read;
- more rows (prefill, and always on a CPU): each expert that some row chose takes its rows at once
  (the host learns which experts those are), as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import quant
from .activation import silu_mul

GATHER_ROWS = 64  # rows x top-k up to which a GPU gathers the chosen experts' weights


def route(x: torch.Tensor, router: torch.Tensor, k: int, normalize: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] in x's dtype, experts [n, k]): softmax over the router's logits (float32),
    the top k, renormalized to sum to one with `normalize` (the same as a softmax over the top k
    logits, gpt-oss's order)."""
    logits = quant.linear(x, router, bias) if isinstance(router, quant.QuantizedWeight) else F.linear(x, router, bias)
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


def gathers(x: torch.Tensor, k: int) -> bool:
    """Whether `moe` takes the gathered (graph-safe) path for rows like x."""
    return x.device.type != "cpu" and x.shape[0] * k <= GATHER_ROWS


@dataclass(frozen=True)
class ExpertBiases:
    """gpt-oss's biases: the router's [E], the experts' gate and up [E, 2 * ff], down [E, dim]."""

    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, k: int,
        normalize: bool = True, act=silu_mul, biases: ExpertBiases | None = None) -> torch.Tensor:
    """x [n, dim] -> [n, dim]. `act`: the gated unit, gate_up [m, 2 * ff] -> [m, ff]."""
    weights, experts = route(x, router, k, normalize, biases.router if biases is not None else None)
    n, dim = x.shape
    if gathers(x, k):
        chosen = experts.reshape(-1)
        rows = x.repeat_interleave(k, dim=0)[:, :, None]  # [n * k, dim, 1]
        hidden = torch.bmm(gate_up[chosen], rows)[..., 0]  # [n * k, 2 ff]
        hidden = act(hidden + biases.gate_up[chosen] if biases is not None else hidden)
        out = torch.bmm(down[chosen], hidden[:, :, None])[..., 0]
        out = (out + biases.down[chosen] if biases is not None else out).view(n, k, dim)
        return (out * weights[..., None]).sum(dim=1)
    out = torch.zeros_like(x)
    for expert in experts.unique().tolist():
        rows, slot = (experts == expert).nonzero(as_tuple=True)
        up_bias, down_bias = (biases.gate_up[expert], biases.down[expert]) if biases is not None else (None, None)
        y = F.linear(act(F.linear(x[rows], gate_up[expert], up_bias)), down[expert], down_bias)
        out.index_add_(0, rows, y * weights[rows, slot, None])
    return out
