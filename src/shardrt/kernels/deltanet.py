"""The gated delta rule of Qwen3.5's linear-attention (DeltaNet) layers: the causal depthwise
convolution over q/k/v with its carried state, the recurrence one token at a time (decode,
speculative verifies, and replaying kept rows exactly), and its chunked form for long prompts.
Torch references that run on any device; the recurrence also as a Triton kernel (one program per
sequence, value head and block of value columns, its state in registers across the tokens).

The recurrent state of one head is a [k_dim, v_dim] float32 matrix S. A token with key k,
value v, query q, decay g (a log, <= 0) and write strength beta does

    S <- exp(g) S;   S <- S + k (beta (v - k^T S))^T;   out = q^T S

where q and k are L2-normalised and q is scaled by 1 / sqrt(k_dim). Value heads share key heads
in tiled order (value head j reads key head j % key_heads), as llama.cpp's converter lays them out.
"""

from __future__ import annotations

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


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dimension times weight, then times silu(gate) (in float32)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return (normed * F.silu(gate.float())).to(x.dtype)


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
            state = state * decay
            delta = (v - tl.sum(state * k[:, None], axis=0)) * beta
            state = state + k[:, None] * delta[None, :]
            tl.store(out_ptr + (row * H + head) * DV + dv, tl.sum(state * q[:, None], axis=0), mask=v_ok)
        tl.store(after_ptr + cell, state, mask=both)
