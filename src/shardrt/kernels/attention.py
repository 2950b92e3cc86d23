"""Attention of a few new tokens (decode, speculative verify) over the KV cache, with the
positions as a device tensor, so one captured graph serves every step.

Split-KV ("flash decoding"): the cache is cut into chunks, one program per (kv head, chunk)
computes a partial softmax for every query of that kv head's group, and a second kernel
combines the partials. Only chunks up to the furthest query position are read, so a step costs
the live context, not max_ctx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from ._triton import dot_precision, tl, triton, use_triton

MAX_QUERY_TOKENS = 16  # the tokens of one program; an eager prefill of more goes through scaled_dot_product_attention
LONG_RUN = 128  # rows of one sequence in a mixed step above which scaled_dot_product_attention takes them
MIN_PROGRAMS = 512  # (kv head, split, tile) programs a tiled launch aims for: enough to fill a GPU
MANY_PROGRAMS = 4  # programs of one sequence (64 rows: the largest graph's prompt) beyond which splits shrink
BLOCK_N = 64
MAX_SPLITS = 256


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        positions: torch.Tensor, scale: float, slots: torch.Tensor | None = None,
                        window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    if slots is None:  # every query over the one cache
        keys = torch.arange(k_cache.shape[1], device=q.device)[None, :]
        seen = (keys <= positions[:, None]) & ((keys > positions[:, None] - window) if window else True)
        return sdpa(q, k_cache, v_cache, seen, scale, sinks)
    # each run of consecutive rows of one sequence (a decode token, or a prompt chunk) over that
    # sequence's live prefix, causal within the run (on a CPU, faster than gathering the
    # sequences' caches for one masked batch)
    out = torch.zeros_like(q)
    for start, stop, slot, end in _runs(slots.tolist(), (positions + 1).tolist()):
        n = stop - start
        mask = causal_lower_right(n, end) if n > 1 else None
        if window or (sinks is not None and n > 1):
            mask = seen_keys(end - n, n, end, window or end, q.device)
        out[start:stop] = sdpa(q[start:stop], k_cache[slot, :, :end], v_cache[slot, :, :end], mask, scale, sinks)
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, heads, d] over k/v [kv_heads, keys, d]: scaled_dot_product_attention, with `mask` a
    bool [n, keys] tensor, a bias object or None. `sinks` [heads] (gpt-oss): one more logit per
    head in every row's softmax, with a zero value, so a row may give weight to no key (a bool
    mask then, or None)."""
    gqa = q.shape[1] != k.shape[0]
    q4, k4, v4 = q.transpose(0, 1)[None], k[None], v[None]
    if sinks is not None:
        n, keys = q.shape[0], k.shape[1]
        bias = torch.zeros((1, q.shape[1], n, keys + 1), dtype=q.dtype, device=q.device)
        if mask is not None:
            bias[..., :keys].masked_fill_(~mask, float("-inf"))
        bias[..., keys] = sinks.to(q.dtype)[:, None]
        zero = torch.zeros_like(k4[:, :, :1])
        k4, v4, mask = torch.cat([k4, zero], dim=2), torch.cat([v4, zero], dim=2), bias
    elif isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias):
        mask = mask[None, None]
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=gqa)[0].transpose(0, 1)


@dataclass(frozen=True)
class Runs:
    """An eager step's runs of consecutive rows of one sequence, planned once for every layer:
    `runs` (first row, row after the last, slot, keys the last row sees) on the host, the `long`
    ones among them, and for the kernel the `tiles` [t, 2] int32 (first row, rows) of the others
    and the `positions` it reads (the long runs' rows as padding, -1), on the device."""

    runs: tuple
    long: tuple
    tiles: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, slots: list[int], positions: list[int], device_positions: torch.Tensor) -> "Runs":
        runs = tuple(_runs(slots, [p + 1 for p in positions]))
        long = tuple(run for run in runs if run[1] - run[0] > LONG_RUN)
        tiles = [(first, min(MAX_QUERY_TOKENS, stop - first)) for start, stop, _, _ in runs if stop - start <= LONG_RUN
                 for first in range(start, stop, MAX_QUERY_TOKENS)]
        kernel_positions = device_positions
        if long:
            for_kernel = list(positions)
            for start, stop, _, _ in long:
                for_kernel[start:stop] = [-1] * (stop - start)
            kernel_positions = torch.tensor(for_kernel, dtype=torch.long)
        tile_table = torch.tensor(tiles or [(0, 0)], dtype=torch.int32)  # (0, 0): a tile of no rows
        return cls(runs, long, tile_table.to(device_positions.device), kernel_positions.to(device_positions.device))


def ragged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, runs: Runs, scale: float, window: int = 0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """An eager step of several sequences (serve's mixed steps), each run over its sequence's
    prefix, causal within the run. With the kernels, the runs up to LONG_RUN rows (decode tokens,
    the tails of prompts that share a cached prefix) go through one launch of the split-KV
    kernel, in tiles of MAX_QUERY_TOKENS rows of one run; a longer run (a prompt chunk) through
    scaled_dot_product_attention, whose tiles are larger. Rows in no run (padding) give zeros."""
    if not use_triton(q) or (sinks is not None and runs.long):
        return attention_reference(q, k_cache, v_cache, positions, scale, slots, window, sinks)
    out = cached_attention(q, k_cache, v_cache, runs.positions, scale, slots, window=window, tiles=runs.tiles,
                           sinks=sinks)
    for start, stop, slot, end in runs.long:
        n = stop - start
        mask = seen_keys(end - n, n, end, window, q.device) if window else causal_lower_right(n, end)
        out[start:stop] = sdpa(q[start:stop], k_cache[slot, :, :end], v_cache[slot, :, :end], mask, scale)
    return out


def seen_keys(first: int, n: int, keys: int, window: int, device) -> torch.Tensor:
    """bool [n, keys]: which keys queries at positions first.. see, causal and, with a sliding
    window, only the last `window` positions up to each query's own."""
    pos = torch.arange(first, first + n, device=device)[:, None]
    key = torch.arange(keys, device=device)[None, :]
    return (key <= pos) & (key > pos - window)


def _runs(slots: list[int], ends: list[int]) -> list[tuple[int, int, int, int]]:
    """(first row, row after the last, slot, keys seen by the last row) of each run of rows of one
    slot at consecutive positions; padding rows (nothing seen) are left out."""
    runs: list[list[int]] = []
    for i, (slot, end) in enumerate(zip(slots, ends)):
        if end <= 0:
            continue
        if runs and runs[-1][1] == i and runs[-1][2] == slot and runs[-1][3] + 1 == end:
            runs[-1][1], runs[-1][3] = i + 1, end
        else:
            runs.append([i, i + 1, slot, end])
    return [tuple(r) for r in runs]


def kernel_takes(q: torch.Tensor) -> bool:
    """Whether `cached_attention` runs the kernel for these queries (else the reference)."""
    return use_triton(q) and q.shape[0] <= MAX_QUERY_TOKENS


def split_size(ctx: int, splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(keys per chunk, number of chunks) for a cache of `ctx` positions, in at most `splits`."""
    chunk = max(BLOCK_N, _cdiv(_cdiv(ctx, max(1, min(splits, MAX_SPLITS))), BLOCK_N) * BLOCK_N)
    return chunk, _cdiv(ctx, chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: float | None = None, slots: torch.Tensor | None = None, batch: bool = False,
                     window: int = 0, tiles: torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, heads, head_dim] at `positions` [n] (int64, on q's device); k/v_cache
    [kv_heads, max_ctx, head_dim], or with `slots` [n] (int64) every sequence's,
    [max_seqs, kv_heads, max_ctx, head_dim]: query i reads sequence slots[i]. `batch`: the
    queries are of different sequences (one token each, batched decode); else they are tokens
    of one sequence, slots[0]. Query i sees keys 0..positions[i]; a negative position (a padding
    row) sees none and gives zeros; with a sliding `window`, only keys in
    (positions[i] - window, positions[i]]. `tiles` [t, 2] int32 (with `slots`): the programs'
    (first row, rows) instead, each up to MAX_QUERY_TOKENS consecutive rows of one sequence
    (ragged_attention); rows in no tile must be padding. `sinks` [heads] float32: gpt-oss's extra
    logit per head in each softmax (see `sdpa`). Returns [n, heads, head_dim]."""
    n, n_heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if not use_triton(q):
        return attention_reference(q, k_cache, v_cache, positions, scale, slots, window, sinks)
    if slots is None:
        k_cache, v_cache = k_cache[None], v_cache[None]
    # a program takes up to MAX_QUERY_TOKENS tokens of one sequence, which share each key it
    # loads; in a batch, one token
    tokens = 1 if batch else min(n, MAX_QUERY_TOKENS)
    n_kv_heads, ctx = k_cache.shape[1], k_cache.shape[2]
    programs = _cdiv(n, tokens) if tiles is None else tiles.shape[0]
    if tiles is not None:
        tokens = MAX_QUERY_TOKENS
    group = n_heads // n_kv_heads
    rows = n * group
    # few programs (decode, a verify, a graph's prompt): the cache in up to MAX_SPLITS chunks; many
    # (tiles, or a prefill of one sequence: gpt-oss's, whose sinks no SDPA takes) need fewer splits,
    # and so write fewer partial results (at most MIN_PROGRAMS rows' worth, not splits x rows)
    many = tiles is not None or (not batch and programs > MANY_PROGRAMS)
    chunk, splits = split_size(ctx, _cdiv(MIN_PROGRAMS, programs * n_kv_heads) if many else MAX_SPLITS)
    partial = torch.empty((n_kv_heads, splits, rows, head_dim), dtype=torch.float32, device=q.device)
    max_sum = torch.empty((n_kv_heads, splits, rows, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _attention_split_kernel[(n_kv_heads, splits, programs)](
        q, k_cache, v_cache, positions, positions if slots is None else slots, positions if tiles is None else tiles,
        partial, max_sum,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        rows, splits, chunk, head_dim, scale, window if window else 1 << 30, HAS_SLOTS=slots is not None,
        TILED=tiles is not None, TOKENS=tokens,
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(tokens * group)), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype), num_warps=4,
    )
    _attention_combine_kernel[(n_kv_heads, rows)](
        partial, max_sum, positions, positions if sinks is None else sinks, out, out.stride(0), out.stride(1), rows,
        splits, chunk, head_dim, GROUP=group, BLOCK_D=block_d, HAS_SINKS=sinks is not None, num_warps=1,
    )
    return out


if triton is not None:
    @triton.jit
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, tile_ptr, o_ptr, ms_ptr,
                                stride_qt, stride_qh, stride_ks, stride_kh, stride_kt, stride_vs, stride_vh, stride_vt,
                                n_rows, n_splits, chunk, head_dim, scale, window,
                                HAS_SLOTS: tl.constexpr, TILED: tl.constexpr, TOKENS: tl.constexpr,
                                GROUP: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                PRECISION: tl.constexpr):
        kv_head, split = tl.program_id(0), tl.program_id(1)
        if TILED:  # a tile of the table: its first row and how many rows, of one sequence
            first_token = tl.load(tile_ptr + tl.program_id(2) * 2)
            last_token = first_token + tl.load(tile_ptr + tl.program_id(2) * 2 + 1)
        else:
            first_token = tl.program_id(2) * TOKENS
            last_token = first_token + TOKENS
        # row r of this program: token first_token + r // GROUP, q head kv_head * GROUP + r % GROUP
        rows = first_token * GROUP + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.minimum(n_rows, last_token * GROUP)
        token = rows // GROUP
        pos = tl.load(pos_ptr + token, mask=row_ok, other=-1)
        if HAS_SLOTS:  # the sequence of the program's tokens
            slot = tl.load(slot_ptr + first_token)
            k_ptr += slot * stride_ks
            v_ptr += slot * stride_vs
        start = split * chunk
        end = tl.minimum(start + chunk, tl.max(pos, axis=0) + 1)
        if start < end:  # chunks past every query's position are neither read nor combined
            d = tl.arange(0, BLOCK_D)
            d_ok = d < head_dim
            q_rows = token * stride_qt + (kv_head * GROUP + rows % GROUP) * stride_qh
            q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for first in range(start, end, BLOCK_N):
                keys = first + tl.arange(0, BLOCK_N)
                key_ok = keys < end
                kv_mask = key_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + kv_head * stride_kh + keys[:, None] * stride_kt + d[None, :], mask=kv_mask,
                            other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                seen = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window) \
                    & key_ok[None, :]
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
                p = tl.exp(s - m_ref[:, None])
                alpha = tl.exp(m - m_ref)
                total = total * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + kv_head * stride_vh + keys[:, None] * stride_vt + d[None, :], mask=kv_mask,
                            other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
            base = (kv_head * n_splits + split) * n_rows + rows
            tl.store(o_ptr + base[:, None] * head_dim + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(ms_ptr + base * 2, m, mask=row_ok)
            tl.store(ms_ptr + base * 2 + 1, total, mask=row_ok)

    @triton.jit
    def _attention_combine_kernel(o_ptr, ms_ptr, pos_ptr, sink_ptr, out_ptr, stride_ot, stride_oh,
                                  n_rows, n_splits, chunk, head_dim,
                                  GROUP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
        kv_head, row = tl.program_id(0), tl.program_id(1)
        token = row // GROUP
        pos = tl.load(pos_ptr + token)
        used = tl.where(pos >= 0, pos // chunk + 1, 0)  # the chunks holding keys 0..pos; none for padding
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        acc = tl.zeros([BLOCK_D], tl.float32)
        total = 0.0
        m = float("-inf")
        for split in range(0, used):
            base = (kv_head * n_splits + split) * n_rows + row
            m_s = tl.load(ms_ptr + base * 2)
            total_s = tl.load(ms_ptr + base * 2 + 1)
            o_s = tl.load(o_ptr + base * head_dim + d, mask=d_ok, other=0.0)
            m_new = tl.maximum(m, m_s)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits that saw no key (before a window)
            a, b = tl.exp(m - m_ref), tl.exp(m_s - m_ref)
            acc = acc * a + o_s * b
            total = total * a + total_s * b
            m = m_new
        if HAS_SINKS:  # the head's sink: one more logit in the softmax, with a zero value
            sink = tl.load(sink_ptr + kv_head * GROUP + row % GROUP).to(tl.float32)
            m_new = tl.maximum(m, sink)
            a = tl.exp(m - m_new)
            acc = acc * a
            total = total * a + tl.exp(sink - m_new)
        out = acc / tl.maximum(total, 1e-30)  # a padding row: 0 / 0 made 0
        dst = out_ptr + token * stride_ot + (kv_head * GROUP + row % GROUP) * stride_oh + d
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d_ok)
