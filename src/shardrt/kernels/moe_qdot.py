"""Grouped integer dot products for a mixture of experts' decode: the chosen experts' rows read in
their GGUF blocks, the routing never leaving the device.

A step of n tokens sends each through its top k experts: n * k slots (token, expert), slot
t * k + j for the token's j-th choice. The experts stay in their blocks (`experts.QuantizedExperts`),
and the feed-forward is two kernels over them, built from qdot's integer path (its `_decode` of a
weight unit and `_row_dot` against activations quantized per block of 32, `qdot.quantize_rows`):

- `_gate_up_kernel`, one program per (slot, BLOCK_N rows of the expert's ffn): loads the slot's
  expert id from the routing tensor, dots that expert's gate rows and up rows with the token's
  activations and writes silu(gate) * up, float32 [n * k, ffn];
- those hidden rows quantized per block of 32 (`qdot.quantize_rows`), as the token's were;
- `_down_kernel`, one program per (token, BLOCK_N rows of the output): the down rows of each of
  the token's k experts (k * BLOCK_N weight rows, all in one step) dotted with the slot's hidden
  row, weighted by the router's probability and summed over k, into the output [n, dim].

An expert id is only ever an index the kernels load, never a host value, so the whole step is
captured in a CUDA graph once and a replay reads whichever experts the router picks then. Each
slot reads its expert's rows by itself (tokens that share an expert read it once each): the path
is for decode, a few tokens; a prefill multiplies each chosen expert once over all its rows (`moe`).
The result is the weighted sum over k of dequantize(down) @ dequantize(quantize(silu(gate x) *
up x)) with gate x, up x = dequantize(W) @ dequantize(quantize(x)), up to float32 rounding.
"""

from __future__ import annotations

import torch

from . import qdot
from ._triton import tl, triton, use_triton
from .activation import OAI_ALPHA, OAI_LIMIT
from .experts import QuantizedExperts
from .quant import Q

MIN_PROGRAMS = 1024  # fewer rows per program until a step has this many programs (as qdot.config)
# the down kernel's (rows per program, units per step, warps) where measured: Qwen3-30B-A3B's experts
# on an H200 (scripts/bench_moe.py), best or within 5% of it at 1, 2, 4 and 8 tokens; the rule in
# `config` gave 1.3-2x slower programs there (each reads k experts' rows: fewer, fuller programs win)
DOWN_CONFIG = {Q.Q4_K: (8, 32, 8), Q.Q6_K: (4, 32, 4)}


def runs(x: torch.Tensor, *weights) -> bool:
    """Whether the grouped kernels multiply activations like x with these experts: the integer path
    runs here (qdot.supported) and every weight is experts in blocks of a type it reads."""
    return use_triton(x) and qdot.supported(x) and all(
        isinstance(w, QuantizedExperts) and w.qtype in qdot.QDOT_TYPES for w in weights) and one_table(weights)


def one_table(weights) -> bool:
    """A kernel takes one table of nibble values for all its weights: MXFP4's and IQ4's do not mix."""
    return len({w.qtype == Q.MXFP4 for w in weights if w.qtype in qdot.TABLE_TYPES}) <= 1


def config(qtypes, rows: int, cols: int, groups: int, slots: int = 1) -> tuple[int, tuple[int, ...], int]:
    """(weight rows per program and slot, units per step for each type, warps) for `groups` x `rows`
    output rows, each program reading `slots` weight rows per output row: qdot's default for the
    (first) type, fewer rows per program until the step has MIN_PROGRAMS programs, no more units
    per step than a row holds, warps for the slots' rows."""
    block_n, units, warps = qdot.DEFAULT_CONFIG.get(qtypes[0], qdot.DEFAULT_4BIT)
    while block_n > 1 and groups * rows // block_n < MIN_PROGRAMS:
        block_n //= 2
    per_type = tuple(min(units, triton.next_power_of_2(cols // qdot.UNIT[t])) for t in qtypes)
    return block_n, per_type, min(8, warps * slots)


def gate_up_silu(xq: qdot.QuantizedRows, experts: torch.Tensor, gate: QuantizedExperts, up: QuantizedExperts,
                 block: tuple[int, int, int] | None = None, bias: torch.Tensor | None = None,
                 clamped: bool = False) -> torch.Tensor:
    """xq: n token rows quantized; experts [n, k] ids on the device -> float32 [n * k, ffn]: row
    t * k + j is silu(g) * u for g, u = gate_e x_t, up_e x_t, e = experts[t, j]. `block`: (rows per
    program, units per step, warps) instead of `config`'s. gpt-oss's: `bias` [E, 2 * ffn] (gate's,
    then up's) added to g, u, and with `clamped` its unit (activation.clamped_swiglu) instead."""
    n, k = experts.shape
    ffn, dim = gate.rows, gate.cols
    qtypes = (gate.qtype, up.qtype)
    if block is None:
        block_n, (gate_units, up_units), warps = config(qtypes, ffn, dim, n * k)
    else:
        block_n, units, warps = block
        gate_units, up_units = (min(units, triton.next_power_of_2(dim // qdot.UNIT[t])) for t in qtypes)
    hidden = torch.empty((n * k, ffn), dtype=torch.float32, device=gate.device)
    _gate_up_kernel[(n * k, triton.cdiv(ffn, block_n))](
        xq.words, xq.scale, xq.sums, experts.contiguous(), hidden, *qdot.kernel_planes(gate.stacked),
        *qdot.kernel_planes(up.stacked), qdot.value_table(gate.qtype, hidden.device),
        hidden if bias is None else bias.contiguous(), xq.words.stride(0), xq.scale.stride(0),
        xq.sums.stride(0), FFN=ffn, K=dim, TOP_K=k, GATE=int(gate.qtype), UP=int(up.qtype),
        HAS_BIAS=bias is not None, CLAMPED=clamped, ALPHA=OAI_ALPHA, LIMIT=OAI_LIMIT,
        GATE_UNIT=qdot.UNIT[gate.qtype], UP_UNIT=qdot.UNIT[up.qtype], GATE_UNITS=gate_units, UP_UNITS=up_units,
        BLOCK_N=block_n, EMULATE=qdot.interpreted(), num_warps=warps)
    return hidden


def down_weighted(hq: qdot.QuantizedRows, experts: torch.Tensor, weights: torch.Tensor, down: QuantizedExperts,
                  dtype: torch.dtype, block: tuple[int, int, int] | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """hq: the n * k hidden rows quantized (slot t * k + j); experts, weights [n, k] -> [n, dim] in
    `dtype`: row t is the sum over j of weights[t, j] * (down_e h_{t * k + j} + bias[e]), e =
    experts[t, j] (`bias` [E, dim]: gpt-oss's)."""
    n, k = experts.shape
    dim, ffn = down.rows, down.cols
    slots = triton.next_power_of_2(k)
    if block is None and down.qtype in DOWN_CONFIG:
        block = DOWN_CONFIG[down.qtype]
    if block is None:
        block_n, (units,), warps = config((down.qtype,), dim, ffn, n, slots)
    else:
        block_n, units, warps = block
        units = min(units, triton.next_power_of_2(ffn // qdot.UNIT[down.qtype]))
    out = torch.empty((n, dim), dtype=dtype, device=down.device)
    _down_kernel[(n, triton.cdiv(dim, block_n))](
        hq.words, hq.scale, hq.sums, experts.contiguous(), weights.contiguous(), out, *qdot.kernel_planes(down.stacked),
        qdot.value_table(down.qtype, out.device), out if bias is None else bias.contiguous(), hq.words.stride(0),
        hq.scale.stride(0), hq.sums.stride(0), out.stride(0), DIM=dim, K=ffn, TOP_K=k, SLOTS=slots,
        QTYPE=int(down.qtype), UNIT=qdot.UNIT[down.qtype], UNITS=units, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, EMULATE=qdot.interpreted(), num_warps=warps)
    return out


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                gate_up: tuple[QuantizedExperts, QuantizedExperts], down: QuantizedExperts,
                block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [n, dim] through its routed experts (experts, weights [n, k]) and their SwiGLU: [n, dim]."""
    hidden = gate_up_silu(qdot.quantize_rows(x), experts, *gate_up, block)
    return down_weighted(qdot.quantize_rows(hidden), experts, weights, down, x.dtype, block)


if triton is not None:
    from .qdot import _decode, _row_dot

    @triton.jit
    def _expert_dot(QTYPE: tl.constexpr, p0, p1, p2, p3, table_ptr, rows, ok, xw, xd, xs, K: tl.constexpr,
                    UNIT: tl.constexpr, UNITS: tl.constexpr, R: tl.constexpr, EMULATE: tl.constexpr):
        """[R] float32: weight rows `rows` (int64 indices into the stacked experts' planes; `ok`
        masks them) each dotted with its own activation row, whose words, block scales and
        half-block sums start at xw, xd, xs (pointer tensors [R]), over the K / UNIT units of a row."""
        NU: tl.constexpr = K // UNIT
        r2 = rows[:, None]
        r3 = r2[:, :, None]
        xw3 = xw[:, None, None]  # the activations in the weights' layout: their loads take it too
        xd2 = xd[:, None]
        xs2 = xs[:, None]
        w = tl.arange(0, 4)[None, None, :]
        acc = tl.zeros((R, UNITS), tl.float32)
        for u0 in range(0, NU, UNITS):
            u2 = (u0 + tl.arange(0, UNITS))[None, :]
            u3 = u2[:, :, None]
            ok2 = ok[:, None] & (u2 < NU)
            ok3 = ok2[:, :, None] & (w < 4)
            wt = _decode(QTYPE, p0, p1, p2, p3, table_ptr, r3, u3, w, ok3, r2, u2, ok2, K, NU, EMULATE)
            acc += _row_dot(QTYPE, wt, xw3, xd2, xs2, u3, w, ok3, u2, ok2, EMULATE)
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gate_up_kernel(xw_ptr, xd_ptr, xs_ptr, ids_ptr, hidden_ptr, g0, g1, g2, g3, up0, up1, up2, up3, table_ptr,
                        bias_ptr, stride_xw, stride_xd, stride_xs, FFN: tl.constexpr, K: tl.constexpr,
                        TOP_K: tl.constexpr, GATE: tl.constexpr, UP: tl.constexpr, GATE_UNIT: tl.constexpr,
                        UP_UNIT: tl.constexpr, GATE_UNITS: tl.constexpr, UP_UNITS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                        BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
        slot = tl.program_id(0)
        token = slot // TOP_K
        local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = local < FFN
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        rows = expert * FFN + local
        zero = rows * 0  # the token's activation row, one pointer per weight row
        xw = xw_ptr + token * stride_xw + zero
        xd = xd_ptr + token * stride_xd + zero
        xs = xs_ptr + token * stride_xs + zero
        gate = _expert_dot(GATE, g0, g1, g2, g3, table_ptr, rows, ok, xw, xd, xs, K, GATE_UNIT, GATE_UNITS, BLOCK_N,
                           EMULATE)
        up = _expert_dot(UP, up0, up1, up2, up3, table_ptr, rows, ok, xw, xd, xs, K, UP_UNIT, UP_UNITS, BLOCK_N,
                         EMULATE)
        if HAS_BIAS:  # [E, 2 * FFN]: the gate's, then the up's
            gate += tl.load(bias_ptr + expert * 2 * FFN + local, mask=ok, other=0.0).to(tl.float32)
            up += tl.load(bias_ptr + expert * 2 * FFN + FFN + local, mask=ok, other=0.0).to(tl.float32)
        if CLAMPED:  # gpt-oss's: (clamp(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)
            gate = tl.minimum(gate, LIMIT)
            hidden = (tl.minimum(tl.maximum(up, -LIMIT), LIMIT) + 1.0) * gate / (1.0 + tl.exp(-ALPHA * gate))
        else:
            hidden = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(hidden_ptr + slot * FFN + local, hidden, mask=ok)

    @triton.jit
    def _down_kernel(hw_ptr, hd_ptr, hs_ptr, ids_ptr, weights_ptr, out_ptr, p0, p1, p2, p3, table_ptr, bias_ptr,
                     stride_hw, stride_hd, stride_hs, stride_out, DIM: tl.constexpr, K: tl.constexpr,
                     TOP_K: tl.constexpr, SLOTS: tl.constexpr, QTYPE: tl.constexpr, UNIT: tl.constexpr,
                     UNITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
        token = tl.program_id(0)
        first = tl.program_id(1) * BLOCK_N
        i = tl.arange(0, SLOTS * BLOCK_N)  # weight row i: choice j = i // BLOCK_N, output row first + i % BLOCK_N
        j = i // BLOCK_N
        local = first + i % BLOCK_N
        chosen = j < TOP_K  # SLOTS: TOP_K rounded up to a power of two
        slot = token * TOP_K + j
        rows = tl.load(ids_ptr + slot, mask=chosen, other=0).to(tl.int64) * DIM + local
        dots = _expert_dot(QTYPE, p0, p1, p2, p3, table_ptr, rows, chosen & (local < DIM), hw_ptr + slot * stride_hw,
                           hd_ptr + slot * stride_hd, hs_ptr + slot * stride_hs, K, UNIT, UNITS, SLOTS * BLOCK_N,
                           EMULATE)
        if HAS_BIAS:  # [E, DIM]: at the weight row's own index
            dots += tl.load(bias_ptr + rows, mask=chosen & (local < DIM), other=0.0).to(tl.float32)
        weight = tl.load(weights_ptr + slot, mask=chosen, other=0.0).to(tl.float32)
        out = tl.sum(tl.reshape(dots * weight, (SLOTS, BLOCK_N)), axis=0)
        n = first + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + token * stride_out + n, out.to(out_ptr.dtype.element_ty), mask=n < DIM)
