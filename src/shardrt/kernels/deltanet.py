"""The gated delta rule of Qwen3.5's linear-attention (DeltaNet) layers: the causal depthwise
convolution over q/k/v with its carried state, the recurrence one token at a time (decode,
speculative verifies, and replaying kept rows exactly), and its chunked form for long prompts.
Torch references that run on any device; the recurrence also as a Triton kernel (one program per
sequence, value head and block of value columns, its state in registers across the tokens).

A decode step (one token per sequence, `decode_step`) runs on GPUs as two kernels: the convolution
step over the sequences' conv states in place, then the recurrence with the L2 norms, the decay
and the write strength computed inside it from the layer's projection; with a kept row named, they
also write what the step fed (the rows a rollback replays). In torch that step is ~45 small
kernels a layer, most of a hybrid model's decode time beside its matrix products.

The recurrent state of one head is a [k_dim, v_dim] float32 matrix S. A token with key k,
value v, query q, decay g (a log, <= 0) and write strength beta does

    S <- exp(g) S;   S <- S + k (beta (v - k^T S))^T;   out = q^T S

where q and k are L2-normalised and q is scaled by 1 / sqrt(k_dim). Value heads share key heads
in tiled order (value head j reads key head j % key_heads), as llama.cpp's converter lays them out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

L2_EPS = 1e-6  # inside the square root of the L2 norm of q and k (as transformers and FLA use it)
CHUNK = 64  # tokens of one block of the chunked form


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise causal convolution with SiLU over x [b, t, channels], continuing from state
    [b, channels, kernel - 1] (the inputs before x, oldest first). Returns (out [b, t, channels],
    the state after x)."""
    seen = torch.cat((state.to(x.dtype), x.transpose(1, 2)), dim=2)  # [b, channels, kernel - 1 + t]
    out = F.conv1d(seen, weight[:, None, :].to(x.dtype), groups=weight.shape[0])  # [b, channels, t]
    return F.silu(out).transpose(1, 2), seen[:, :, x.shape[1]:]


def conv_state_after(state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The convolution state [channels, kernel - 1] after the inputs `rows` [t, channels] followed `state`."""
    return torch.cat((state, rows.transpose(0, 1).to(state.dtype)), dim=1)[:, -state.shape[1]:]


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def tile_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., key_heads, d] -> [..., heads, d] in tiled order (head j is key head j % key_heads)."""
    return x.repeat(*([1] * (x.dim() - 2)), heads // x.shape[-2], 1)


def recurrent(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time. q, k [b, t, key_heads, k_dim] (normalised, q scaled), v [b, t, heads,
    v_dim], g and beta [b, t, heads], all float32; state [b, heads, k_dim, v_dim] float32, not
    changed. Returns (out [b, t, heads, v_dim], the state after the last token). Each token's
    arithmetic is the same whatever t (and b) is, so replaying kept rows gives the state bit for bit."""
    if use_triton(v):
        return _recurrent_triton(q, k, v, g, beta, state)
    return recurrent_reference(q, k, v, g, beta, state)


def recurrent_in_place(q, k, v, g, beta, states: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """`recurrent` for sequence i's rows over states[seqs[i]] ([slots, heads, k_dim, v_dim]), which
    it updates in place; returns out. On GPUs the kernel reads and writes those states where they
    lie, so a decode step moves each state twice, not six times (gather, read, write, scatter).
    seqs [b] int64 on the device, distinct but for a scratch slot that padding rows may share."""
    if use_triton(v):
        return _recurrent_triton(q, k, v, g, beta, states, seqs)[0]
    out, after = recurrent_reference(q, k, v, g, beta, states.index_select(0, seqs))
    states.index_copy_(0, seqs, after)
    return out


def recurrent_reference(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    heads = v.shape[2]
    q, k = tile_heads(q, heads), tile_heads(k, heads)
    out = torch.empty_like(v)
    for i in range(q.shape[1]):
        state = state * g[:, i].exp()[..., None, None]
        k_i = k[:, i, :, None, :]  # [b, heads, 1, k_dim]
        delta = (v[:, i] - (k_i @ state)[:, :, 0]) * beta[:, i, :, None]
        state = state + k_i.transpose(-1, -2) @ delta[:, :, None, :]
        out[:, i] = (q[:, i, :, None, :] @ state)[:, :, 0]
    return out, state


def chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `recurrent` (up to rounding), a block of `chunk` tokens at a time: within a
    block the delta rule's writes are one triangular solve, so the sequential loop runs over
    blocks. With the decays cumulated inside a block (c_i = g_1 + ... + g_i) and the block's
    entering state S0, the writes d = (I + L)^-1 (beta v - beta exp(c) k S0), with L the strictly
    lower part of beta_i exp(c_i - c_j) k_i.k_j; out_i = exp(c_i) q_i S0 + sum_{j<=i} exp(c_i - c_j)
    q_i.k_j d_j, and the block leaves exp(c_last) S0 + sum_j exp(c_last - c_j) k_j d_j^T."""
    b, t, heads = v.shape[:3]
    pad = -t % chunk
    q, k = tile_heads(q, heads), tile_heads(k, heads)

    def blocks(x):  # [b, t, heads, ...] -> [b, heads, blocks, chunk, ...], padded with zeros
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(b, heads, -1, chunk, *x.shape[3:])

    q, k, v, g, beta = (blocks(x) for x in (q, k, v, g, beta))  # padding: g = 0, beta = 0 (no write)
    decay = g.cumsum(-1)  # [b, heads, blocks, chunk]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    between = (decay[..., :, None] - decay[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(c_i - c_j), j <= i
    solve = torch.eye(chunk, device=q.device) + (beta[..., None] * (k @ k.transpose(-1, -2)) * between).tril(-1)
    writes_v = torch.linalg.solve_triangular(solve, beta[..., None] * v, upper=False, unitriangular=True)
    writes_k = torch.linalg.solve_triangular(solve, (beta * decay.exp())[..., None] * k, upper=False, unitriangular=True)
    seen = (q @ k.transpose(-1, -2)) * between
    out = torch.empty_like(v)
    for i in range(q.shape[2]):
        d = writes_v[:, :, i] - writes_k[:, :, i] @ state
        out[:, :, i] = (q[:, :, i] * decay[:, :, i, :, None].exp()) @ state + seen[:, :, i] @ d
        last = decay[:, :, i, -1:]
        state = state * last.exp()[..., None] + (k[:, :, i] * (last - decay[:, :, i]).exp()[..., None]).transpose(-1, -2) @ d
    return out.reshape(b, heads, -1, v.shape[-1])[:, :, :t].transpose(1, 2), state


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm of x [n, heads, d] over its last dimension times weight, then times silu(gate) (in
    float32), in `dtype` (x's by default; x is rounded to it first)."""
    dtype = dtype or x.dtype
    if use_triton(x):
        return _gated_rms_norm_triton(x, gate, weight, eps, dtype)
    return gated_rms_norm_reference(x.to(dtype), gate, weight, eps)


def gated_rms_norm_reference(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return (normed * F.silu(gate.float())).to(x.dtype)


class Shape(NamedTuple):
    """A DeltaNet layer's heads: key (and query) heads of k_dim, value heads of v_dim."""

    key_heads: int
    k_dim: int
    heads: int
    v_dim: int

    @property
    def conv_dim(self) -> int:  # q, k and v side by side
        return 2 * self.key_heads * self.k_dim + self.heads * self.v_dim


def decay_and_strength(a: torch.Tensor, b: torch.Tensor, ssm_a: torch.Tensor, ssm_dt: torch.Tensor):
    """(g, beta) from the projection's decay input a and write input b: g = ssm_a * softplus(a + ssm_dt)
    (a log, <= 0), beta = sigmoid(b), float32."""
    return ssm_a * F.softplus(a.float() + ssm_dt), b.float().sigmoid()


def split_heads(qkv: torch.Tensor, shape: Shape):
    """The convolution's output [b, t, conv_dim] as the rule's q, k (normalised, q scaled) and v."""
    b, t = qkv.shape[:2]
    key = shape.key_heads * shape.k_dim
    q, k, v = qkv.split([key, key, shape.heads * shape.v_dim], dim=-1)
    q = l2_normalise(q.reshape(b, t, shape.key_heads, shape.k_dim)) * shape.k_dim ** -0.5
    k = l2_normalise(k.reshape(b, t, shape.key_heads, shape.k_dim))
    return q, k, v.float().reshape(b, t, shape.heads, shape.v_dim)


def decode_step(mixed, a, b, conv, ssm, seqs, conv_weight, ssm_a, ssm_dt, shape: Shape, kept=None, kept_at=None):
    """One token of sequence seqs[i] per row i: mixed [n, conv_dim] (the convolution's inputs) and
    a, b [n, heads] (decay and write inputs), views of the layer's projection; conv [slots, conv_dim,
    kernel - 1] and ssm [slots, heads, k_dim, v_dim] updated in place at seqs (int64 on the device;
    distinct but for a scratch slot padding rows share). With `kept` (a Fed of [rows, ...] tensors)
    and kept_at ([1] int64 on the device), what row 0 fed goes to that row of kept. Returns the
    heads' outputs [n, heads, v_dim] float32. Nothing here waits for the device: a graph captures it."""
    run = _decode_step_triton if use_triton(mixed) else decode_step_reference
    return run(mixed, a, b, conv, ssm, seqs, conv_weight, ssm_a, ssm_dt, shape, kept, kept_at)


def decode_step_reference(mixed, a, b, conv, ssm, seqs, conv_weight, ssm_a, ssm_dt, shape, kept=None, kept_at=None):
    qkv, conv_after = causal_conv(mixed[:, None], conv.index_select(0, seqs), conv_weight)
    conv.index_copy_(0, seqs, conv_after)
    q, k, v = split_heads(qkv, shape)
    g, beta = (x[:, None] for x in decay_and_strength(a, b, ssm_a, ssm_dt))
    out = recurrent_in_place(q, k, v, g, beta, ssm, seqs)
    if kept is not None:
        for rows, new in zip(kept, (mixed[:1], q[0], k[0], v[0], g[0], beta[0])):
            rows.index_copy_(0, kept_at, new.to(rows.dtype))
    return out[:, 0]


def _decode_step_triton(mixed, a, b, conv, ssm, seqs, conv_weight, ssm_a, ssm_dt, shape, kept, kept_at):
    n, channels = mixed.shape
    width = conv_weight.shape[1]
    assert conv.is_contiguous() and ssm.is_contiguous(), "states updated in place must be contiguous"
    keep = kept is not None
    kept = kept if keep else (conv,) * 6
    kept_at = kept_at if keep else seqs
    qkv = torch.empty(n, channels, dtype=mixed.dtype, device=mixed.device)
    block_c = min(256, triton.next_power_of_2(channels))
    _conv_step_kernel[(n, triton.cdiv(channels, block_c))](
        mixed, mixed.stride(0), conv, conv_weight, seqs, qkv, kept[0], kept_at, channels,
        WIDTH=width, BLOCK_W=triton.next_power_of_2(width), BLOCK_C=block_c, KEEP=keep, num_warps=4)
    out = torch.empty(n, shape.heads, shape.v_dim, dtype=torch.float32, device=mixed.device)
    block_v = min(64, triton.next_power_of_2(shape.v_dim))
    _decode_rule_kernel[(n, shape.heads, triton.cdiv(shape.v_dim, block_v))](
        qkv, a, b, a.stride(0), b.stride(0), ssm_a, ssm_dt, ssm, out, seqs, *kept[1:], kept_at,
        shape.heads, shape.key_heads, shape.k_dim, shape.v_dim, shape.k_dim ** -0.5, L2_EPS,
        BLOCK_K=triton.next_power_of_2(shape.k_dim), BLOCK_V=block_v, KEEP=keep, num_warps=4)
    return out


def _gated_rms_norm_triton(x, gate, weight, eps, dtype):
    n, heads, d = x.shape
    x = x.contiguous()
    assert gate.stride(2) == 1 and gate.stride(1) == d, "the gate's heads must lie side by side"
    out = torch.empty(n, heads, d, dtype=dtype, device=x.device)
    _gated_rms_norm_kernel[(n * heads,)](x, gate, gate.stride(0), weight, out, heads, d, eps,
                                         BLOCK=triton.next_power_of_2(d), ROUND=weight.dtype == dtype, num_warps=4)
    return out


def _recurrent_triton(q, k, v, g, beta, state, seqs=None):
    """(out, the states after): new states from `state` [b, ...], or with `seqs` those of
    state[seqs] written over in place (state then returned)."""
    b, t, key_heads, k_dim = q.shape
    heads, v_dim = v.shape[2:]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if seqs is None:
        state = state.contiguous()
        after = torch.empty_like(state)
    else:
        assert state.is_contiguous(), "states updated in place must be contiguous"
        after = state
    out = torch.empty_like(v)
    block_v = min(64, triton.next_power_of_2(v_dim))
    _recurrent_kernel[(b, heads, triton.cdiv(v_dim, block_v))](
        q, k, v, g, beta, state, out, after, seqs if seqs is not None else state, t, heads, key_heads, k_dim, v_dim,
        BLOCK_K=triton.next_power_of_2(k_dim), BLOCK_V=block_v, INDEXED=seqs is not None, num_warps=4)
    return out, after


if triton is not None:
    @triton.jit
    def _delta(state, q, k, v, decay, beta):
        """One token of the rule on a head's block of state [BLOCK_K, BLOCK_V]: (state after, out).
        Every kernel here goes through this one body, so a replay computes what a step computed."""
        state = state * decay
        delta = (v - tl.sum(state * k[:, None], axis=0)) * beta
        state = state + k[:, None] * delta[None, :]
        return state, tl.sum(state * q[:, None], axis=0)

    @triton.jit
    def _recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, after_ptr, seqs_ptr,
                          T, H, HK, DK, DV, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, INDEXED: tl.constexpr):
        seq, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(seqs_ptr + seq).to(tl.int64) if INDEXED else seq  # the state's row (INDEXED: seqs[seq])
        key_head = head % HK  # tiled: value head j reads key head j % key_heads
        dk = tl.arange(0, BLOCK_K)
        dv = block * BLOCK_V + tl.arange(0, BLOCK_V)
        k_ok, v_ok = dk < DK, dv < DV
        cell = ((slot * H + head) * DK + dk[:, None]) * DV + dv[None, :]
        both = k_ok[:, None] & v_ok[None, :]
        state = tl.load(state_ptr + cell, mask=both, other=0.0)  # [BLOCK_K, BLOCK_V] float32
        for i in range(T):
            row = seq * T + i
            q = tl.load(q_ptr + (row * HK + key_head) * DK + dk, mask=k_ok, other=0.0)
            k = tl.load(k_ptr + (row * HK + key_head) * DK + dk, mask=k_ok, other=0.0)
            v = tl.load(v_ptr + (row * H + head) * DV + dv, mask=v_ok, other=0.0)
            decay = tl.exp(tl.load(g_ptr + row * H + head))
            beta = tl.load(beta_ptr + row * H + head)
            state, out = _delta(state, q, k, v, decay, beta)
            tl.store(out_ptr + (row * H + head) * DV + dv, out, mask=v_ok)
        tl.store(after_ptr + cell, state, mask=both)

    @triton.jit
    def _conv_step_kernel(mixed_ptr, mixed_stride, state_ptr, weight_ptr, seqs_ptr, out_ptr, kept_ptr, kept_at_ptr,
                          C, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, KEEP: tl.constexpr):
        """One token of row `row`'s sequence through the causal convolution (SiLU) of BLOCK_C
        channels, rounded where causal_conv rounds (to the inputs' dtype after the sum and after
        the SiLU); its conv state [C, WIDTH - 1] shifted in place."""
        row, block = tl.program_id(0), tl.program_id(1)
        slot = tl.load(seqs_ptr + row).to(tl.int64)
        c = block * BLOCK_C + tl.arange(0, BLOCK_C)
        j = tl.arange(0, BLOCK_W)
        c_ok = c < C
        x = tl.load(mixed_ptr + row * mixed_stride + c, mask=c_ok, other=0.0)
        held = (slot * C + c[:, None]) * (WIDTH - 1) + j[None, :]
        past = tl.load(state_ptr + held, mask=c_ok[:, None] & (j[None, :] < WIDTH - 1), other=0.0)
        later = tl.load(state_ptr + held + 1, mask=c_ok[:, None] & (j[None, :] < WIDTH - 2), other=0.0)
        window = tl.where(j[None, :] == WIDTH - 1, x[:, None], past)  # oldest first, this token last
        w = tl.load(weight_ptr + c[:, None] * WIDTH + j[None, :], mask=c_ok[:, None] & (j[None, :] < WIDTH), other=0.0)
        w = w.to(x.dtype).to(tl.float32)
        y = tl.sum(window.to(tl.float32) * w, axis=1).to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * C + c, (y * tl.sigmoid(y)).to(x.dtype), mask=c_ok)
        tl.debug_barrier()  # every thread has read the state before any writes it
        tl.store(state_ptr + held, tl.where(j[None, :] == WIDTH - 2, x[:, None], later),
                 mask=c_ok[:, None] & (j[None, :] < WIDTH - 1))
        if KEEP:
            if row == 0:
                kept_at = tl.load(kept_at_ptr).to(tl.int64)
                tl.store(kept_ptr + kept_at * C + c, x, mask=c_ok)

    @triton.jit
    def _decode_rule_kernel(qkv_ptr, a_ptr, b_ptr, a_stride, b_stride, ssm_a_ptr, ssm_dt_ptr, state_ptr, out_ptr, seqs_ptr,
                            kept_q_ptr, kept_k_ptr, kept_v_ptr, kept_g_ptr, kept_beta_ptr, kept_at_ptr,
                            H, HK, DK, DV, scale, eps,
                            BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, KEEP: tl.constexpr):
        """One token of row `row`'s sequence through head `head` (a block of its value columns):
        split_heads' normalised q and k and decay_and_strength's g and beta from the convolution's
        output and the projection, then _delta on the state where it lies."""
        row, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(seqs_ptr + row).to(tl.int64)
        key_head = head % HK
        dk = tl.arange(0, BLOCK_K)
        dv = block * BLOCK_V + tl.arange(0, BLOCK_V)
        k_ok, v_ok = dk < DK, dv < DV
        C = 2 * HK * DK + H * DV
        q = tl.load(qkv_ptr + row * C + key_head * DK + dk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(qkv_ptr + row * C + (HK + key_head) * DK + dk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(qkv_ptr + row * C + 2 * HK * DK + head * DV + dv, mask=v_ok, other=0.0).to(tl.float32)
        q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + eps)) * scale
        k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + eps))
        a = tl.load(a_ptr + row * a_stride + head).to(tl.float32) + tl.load(ssm_dt_ptr + head)
        g = tl.load(ssm_a_ptr + head) * tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # softplus, as torch's
        beta = tl.sigmoid(tl.load(b_ptr + row * b_stride + head).to(tl.float32))
        cell = ((slot * H + head) * DK + dk[:, None]) * DV + dv[None, :]
        both = k_ok[:, None] & v_ok[None, :]
        state = tl.load(state_ptr + cell, mask=both, other=0.0)
        state, out = _delta(state, q, k, v, tl.exp(g), beta)
        tl.store(out_ptr + (row * H + head) * DV + dv, out, mask=v_ok)
        tl.store(state_ptr + cell, state, mask=both)
        if KEEP:
            if row == 0:
                at = tl.load(kept_at_ptr).to(tl.int64)
                tl.store(kept_v_ptr + (at * H + head) * DV + dv, v, mask=v_ok)
                if block == 0:
                    tl.store(kept_g_ptr + at * H + head, g)
                    tl.store(kept_beta_ptr + at * H + head, beta)
                    if head < HK:
                        tl.store(kept_q_ptr + (at * HK + head) * DK + dk, q, mask=k_ok)
                        tl.store(kept_k_ptr + (at * HK + head) * DK + dk, k, mask=k_ok)

    @triton.jit
    def _gated_rms_norm_kernel(x_ptr, gate_ptr, gate_stride, weight_ptr, out_ptr, H, D, eps,
                               BLOCK: tl.constexpr, ROUND: tl.constexpr):
        """gated_rms_norm_reference of one head of one row, rounding where it rounds (ROUND: the
        product with the weight, where torch computes it in the output's dtype)."""
        r = tl.program_id(0)
        row, head = r // H, r % H
        d = tl.arange(0, BLOCK)
        ok = d < D
        out_dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + r * D + d, mask=ok, other=0.0).to(out_dtype).to(tl.float32)
        normed = (x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))).to(out_dtype).to(tl.float32)
        normed = normed * tl.load(weight_ptr + d, mask=ok, other=0.0).to(tl.float32)
        if ROUND:
            normed = normed.to(out_dtype).to(tl.float32)
        z = tl.load(gate_ptr + row * gate_stride + head * D + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * D + d, (normed * (z * tl.sigmoid(z))).to(out_dtype), mask=ok)
