"""Quantized GGUF weights kept quantized on the device, and the ops that read them.

`QuantizedWeight` holds a matrix of GGUF blocks split into planes (the quants, the scales) so
that each plane is one contiguous, aligned array the kernels can load in wide, coalesced reads;
the bytes are the file's, except that Q4_K/Q5_K/Q3_K/IQ4_XS keep their packed sub-block scales
unpacked to a byte each (at most +3.6%), Q2_K/Q3_K's scales are re-laid in the order the integer
kernel reads them, and IQ3_S/IQ1_M gather their scattered scale bits (+3.6%). `linear(x, w)` picks
one of five paths (mmq with one of several blocks) per type, shape and row count by timing them
once (`choose`):

- qdot: integer dot products against x quantized per block of 32 (qdot.py), for 1 to 8 rows of
  bf16/fp16 activations on CUDA: the decode and speculative-verify path, near the memory's rate;
- mmq: the same quantized rows in int8 tensor-core products (mmq.py), for batches of rows;
- matvec: one row dequantized to float in registers and summed per scale group;
- tile: a tile of weights dequantized in registers into a tensor-core product, up to 64 rows
  (float32 activations, ROCm, batches);
- dequantized: the whole matrix dequantized into a reused scratch buffer, then cuBLAS (prefill).

`embedding(ids, w)` dequantizes just the rows asked for. Each op has a torch reference over the
same planes (the CPU path of the tests; the CPU itself runs dequantized weights). Types with a
kernel: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4, and the
i-quants of GRID_TYPES (the float paths only: tile and dequantized).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import mmq, qdot
from ._triton import OutOfResources, dot_precision, pointers, tl, triton, use_triton
from .qdot import IQ4_VALUES, MXFP4_VALUES

log = logging.getLogger(__name__)
Q = GGMLQuantizationType
# the i-quants whose groups of 8 (or 4) weights are a row of a grid of values (`grid_table`), with signs
GRID_TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M)
KERNEL_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
                Q.MXFP4) + GRID_TYPES
# byte offsets of each type's f16 fields (scales, mins) in its block (MXFP4's scale: an exponent byte)
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
              Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,)}
# (IQ1_M's f16 scale is spread over the top nibbles of its four scale words)
# bytes per block the planes hold beyond the file's (scales unpacked to a byte each)
EXTRA_BYTES = {Q.Q4_K: 4, Q.Q5_K: 4, Q.Q3_K: 4, Q.IQ4_XS: 2, Q.IQ3_S: 4, Q.IQ1_M: 2}


@dataclass
class QuantizedWeight:
    """A [rows, cols] matrix of GGUF blocks of `qtype`, as planes (see `split_planes`)."""

    qtype: Q
    rows: int
    cols: int
    planes: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes)

    @property
    def device(self) -> torch.device:
        return self.planes[0].device


def has_kernel(qtype: Q) -> bool:
    return qtype in KERNEL_TYPES


def device_bytes(qtype: Q, rows: int, cols: int) -> int:
    """Bytes a QuantizedWeight of this type and shape holds on the device."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block_elems
    return blocks * (block_bytes + EXTRA_BYTES.get(qtype, 0))


# -- planes: the blocks' fields, each a contiguous array per row ---------------------------------

def split_planes(raw: torch.Tensor, qtype: Q, cols: int) -> tuple[torch.Tensor, ...]:
    """raw: uint8 [rows, row_bytes] as stored in the file, on any device -> the planes of `qtype`,
    on that device (so a GPU re-lays a matrix at its memory's pace, not the host's):

    Q8_0: qs int8 [r, c], d f16 [r, c/32]
    Q4_0: qs uint8 [r, c/2], d f16 [r, c/32]              Q4_1: qs, (d, m) f16 [r, c/32, 2]
    Q5_0: qs, d, qh int32 [r, c/32] (bit e: element e)    Q5_1: qs, (d, m), qh
    Q4_K: qs uint8 [r, c/2], (d, dmin) f16 [r, c/256, 2], (scale, min) uint8 [r, c/32, 2]
    Q5_K: as Q4_K, then qh uint8 [r, c/8]
    Q6_K: ql uint8 [r, c/2], d f16 [r, c/256], scales int8 [r, c/16], qh uint8 [r, c/4]
    Q2_K: qs uint8 [r, c/4], (d, dmin) f16 [r, c/256, 2], scales uint8 [r, c/16] (scale | min << 4)
    Q3_K: qs uint8 [r, c/4], d f16 [r, c/256], scales int8 [r, c/16] (less 32), hmask uint8 [r, c/8]
    IQ4_NL: qs uint8 [r, c/2], d f16 [r, c/32] (Q4_0's layout; values from IQ4's table)
    IQ4_XS: qs uint8 [r, c/2], d f16 [r, c/256], scales int8 [r, c/32] (less 32)
    MXFP4: qs uint8 [r, c/2] (Q4_0's layout; values from e2m1's table, doubled), e uint8 [r, c/32]
           (the block's scale is 2^(e - 128), half of E8M0's 2^(e - 127))

    IQ2_XXS: grid uint8 [r, c/8], d f16 [r, c/256], aux int32 [r, c/32] (four 7-bit sign indices, the scale << 28)
    IQ2_XS: qs int16 [r, c/8] (9-bit grid index | 7-bit sign index << 9), d, scales uint8 [r, c/32] (a nibble per 16)
    IQ2_S: grid uint8 [r, c/8], d, signs uint8 [r, c/8], (qh | scales << 8) int16 [r, c/32] (qh: the grid
           index's bits 8-9, two per group of 8; scales: a nibble per 16)
    IQ3_XXS: grid uint8 [r, c/4] (a row of 4), d, aux int32 [r, c/32] (as IQ2_XXS's)
    IQ3_S: grid uint8 [r, c/4], d, signs uint8 [r, c/8], (qh | scale << 8) int16 [r, c/32] (qh: the grid
           index's bit 8, one per row of 4; the scale: the block's nibble)
    IQ1_S: grid uint8 [r, c/8], d, qh int16 [r, c/32] (three index bits per group of 8, the scale at 12-14, the
           delta's sign at 15)
    IQ1_M: grid uint8 [r, c/8], d f16 [r, c/256] (gathered from the scale words' top nibbles), qh uint8
           [r, c/16] (per group of 8: three index bits and the delta's sign), scales int16 [r, c/64] (3 bits per 16)
    A sign index names the sign byte whose eighth bit makes the count of set bits even (llama.cpp's ksigns).

    Q2_K's and Q3_K's sixteen scales per super-block are re-laid so that the four a kernel unit
    needs sit in one word: new index 4 * (2 * half + g) + j for the file's 8 * half + 2j + g
    (`UNIT_SCALE_ORDER`), where element 128 half + 32j + 16g + l has scale 8 * half + 2j + g.
    """
    rows = raw.shape[0]
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    b = raw.reshape(rows, cols // block_elems, block_bytes)

    def f16(lo: int, hi: int) -> torch.Tensor:
        return b[..., lo:hi].contiguous().view(torch.float16)

    def flat(lo: int, hi: int, dtype=torch.uint8) -> torch.Tensor:
        return b[..., lo:hi].contiguous().view(dtype).reshape(rows, -1)

    def word(lo: int) -> torch.Tensor:  # int32 [rows, blocks]
        return b[..., lo : lo + 4].contiguous().view(torch.int32)[..., 0]

    if qtype == Q.Q8_0:
        return flat(2, 34, torch.int8), f16(0, 2)[..., 0]
    if qtype in (Q.Q4_0, Q.IQ4_NL):
        return flat(2, 18), f16(0, 2)[..., 0]
    if qtype == Q.MXFP4:
        return flat(1, 17), flat(0, 1)
    if qtype == Q.Q4_1:
        return flat(4, 20), f16(0, 4)
    if qtype == Q.Q5_0:
        return flat(6, 22), f16(0, 2)[..., 0], word(2)
    if qtype == Q.Q5_1:
        return flat(8, 24), f16(0, 4), word(4)
    if qtype in (Q.Q4_K, Q.Q5_K):
        packed = b[..., 4:16]  # 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4)
        scale_min = torch.empty((rows, b.shape[1], 8, 2), dtype=torch.uint8, device=raw.device)
        scale_min[..., :4, 0] = packed[..., 0:4] & 63
        scale_min[..., :4, 1] = packed[..., 4:8] & 63
        scale_min[..., 4:, 0] = (packed[..., 8:12] & 0xF) | ((packed[..., 0:4] >> 6) << 4)
        scale_min[..., 4:, 1] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
        planes = (flat(16, 144) if qtype == Q.Q4_K else flat(48, 176), f16(0, 4), scale_min.reshape(rows, -1, 2))
        return planes if qtype == Q.Q4_K else planes + (flat(16, 48),)
    if qtype == Q.Q6_K:
        return flat(0, 128), f16(208, 210)[..., 0], flat(192, 208, torch.int8), flat(128, 192)
    if qtype == Q.Q2_K:
        return flat(16, 80), f16(80, 84), b[..., unit_scale_order(raw.device)].reshape(rows, -1)
    if qtype == Q.Q3_K:
        scales = q3k_scales(b[..., 96:108])[..., unit_scale_order(raw.device)]
        return flat(32, 96), f16(108, 110)[..., 0], scales.reshape(rows, -1), flat(0, 32)
    if qtype == Q.IQ4_XS:
        high = b[..., 2:4].contiguous().view(torch.int16).int() & 0xFFFF  # [rows, blocks, 1]: 2 bits a sub-block
        low = b[..., 4:8].int()
        sub = torch.arange(8, device=raw.device)
        scales = ((low[..., sub // 2] >> (4 * (sub % 2))) & 0xF) | (((high >> (2 * sub)) & 3) << 4)
        return flat(8, 136), f16(0, 2)[..., 0], (scales - 32).to(torch.int8).reshape(rows, -1)
    if qtype in GRID_TYPES:
        return _grid_planes(b, qtype)
    raise ValueError(f"{qtype.name} has no kernel")


def _grid_planes(b: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, ...]:
    """The planes of an i-quant of GRID_TYPES (see split_planes) from its blocks b [rows, blocks, bytes]."""
    rows = b.shape[0]

    def flat(lo: int, hi: int, dtype=torch.uint8) -> torch.Tensor:
        return b[..., lo:hi].contiguous().view(dtype).reshape(rows, -1)

    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]  # all but IQ1_M: the f16 scale first

    def interleave(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # two byte planes -> int16 [rows, n]
        return torch.stack((low, high), dim=-1).contiguous().view(torch.int16).reshape(rows, -1)

    if qtype == Q.IQ2_XXS:  # d, then per 32: four grid bytes and a word
        groups = b[..., 2:].reshape(rows, -1, 8, 8)
        return groups[..., :4].reshape(rows, -1), d, groups[..., 4:].contiguous().view(torch.int32).reshape(rows, -1)
    if qtype == Q.IQ2_XS:
        return flat(2, 66, torch.int16), d, flat(66, 74)
    if qtype == Q.IQ2_S:
        return flat(2, 34), d, flat(34, 66), interleave(b[..., 66:74], b[..., 74:82])
    if qtype == Q.IQ3_XXS:
        return flat(2, 66), d, flat(66, 98, torch.int32)
    if qtype == Q.IQ3_S:
        block = torch.arange(8, device=b.device)
        scales = ((b[..., 106 + block // 2] >> (4 * (block % 2))) & 0xF).to(torch.uint8)
        return flat(2, 66), d, flat(74, 106), interleave(b[..., 66:74], scales)
    if qtype == Q.IQ1_S:
        return flat(2, 34), d, flat(34, 50, torch.int16)
    # IQ1_M: qs, qh, then four scale words whose top nibbles hold d's bits, lowest first
    words = b[..., 48:56].contiguous().view(torch.int16).int() & 0xFFFF  # [rows, blocks, 4]
    bits = sum((words[..., i] >> (12 - 4 * i)) & (0xF << (4 * i)) for i in range(4))
    d = bits.to(torch.uint16).view(torch.float16)
    return flat(0, 32), d, flat(32, 48), flat(48, 56, torch.int16)


@functools.cache
def _grid_values(qtype: Q) -> tuple[int, ...]:
    """The type's grid (llama.cpp's iq2xxs_grid and kin), row by row, as the `gguf` package decodes it."""
    from gguf import quants

    traits = getattr(quants, qtype.name)
    traits.init_grid()
    return tuple(int(v) for v in traits.grid.reshape(-1))


GRID_WIDTH = {Q.IQ3_XXS: 4, Q.IQ3_S: 4}  # values in a grid row (8 for the others)
_grid_tables: dict[tuple, torch.Tensor] = {}


def grid_table(qtype: Q, device: torch.device) -> torch.Tensor:
    """int8 [grid rows * width]: the values of `qtype`'s grid on `device`."""
    key = (qtype, device)
    if key not in _grid_tables:
        _grid_tables[key] = torch.tensor(_grid_values(qtype), dtype=torch.int8, device=device)
    return _grid_tables[key]


# Q2_K/Q3_K: position 4 * (2 * half + g) + j of the re-laid scales holds the file's 8 * half + 2j + g
UNIT_SCALE_ORDER = [8 * half + 2 * j + g for half in range(2) for g in range(2) for j in range(4)]


def unit_scale_order(device: torch.device) -> torch.Tensor:
    return torch.tensor(UNIT_SCALE_ORDER, device=device)


def q3k_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's twelve bytes of scales [..., 12] -> the sixteen signed scales [..., 16], less 32:
    scale k has its low four bits in byte k (k < 8) or the high nibble of byte k - 8, and its
    top two bits at bit 2 * (k // 4) of byte 8 + k % 4."""
    k = torch.arange(16, device=packed.device)
    packed = packed.int()
    low = (packed[..., k % 8] >> (4 * (k // 8))) & 0xF
    high = (packed[..., 8 + k % 4] >> (2 * (k // 4))) & 3
    return ((low | (high << 4)) - 32).to(torch.int8)


def quantized_weight(raw: np.ndarray, qtype: Q, cols: int, device: torch.device) -> QuantizedWeight:
    """raw: uint8 [rows, row_bytes] as the file holds them (a read-only map, say): copied to the
    device as they are, then split into planes there."""
    with warnings.catch_warnings():  # a read-only map: torch warns it cannot write, and it never does
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(raw)
    planes = split_planes(blocks.to(device), qtype, cols)
    return QuantizedWeight(qtype, raw.shape[0], cols, planes)


def stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices of one type stacked by rows (q/k/v, gate/up), plane by plane."""
    planes = tuple(torch.cat(parts) for parts in zip(*(w.planes for w in weights)))
    return QuantizedWeight(weights[0].qtype, sum(w.rows for w in weights), weights[0].cols, planes)


# -- the torch reference over the planes ----------------------------------------------------------

def dequantize_reference(w: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [rows, cols] (all rows, or those indexed by `rows`)."""
    planes = w.planes if rows is None else tuple(p[rows] for p in w.planes)
    r, c, t = planes[0].shape[0], w.cols, w.qtype

    def nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
        """4-bit quants: each `group` bytes hold `group` elements in low nibbles, then `group` in high."""
        g = qs.reshape(r, -1, group).int()
        return torch.stack((g & 0xF, g >> 4), dim=2).reshape(r, c)

    if t == Q.Q8_0:
        qs, d = planes
        return (qs.float().reshape(r, -1, 32) * d.float()[..., None]).reshape(r, c)
    if t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        q = nibbles(planes[0], 16).reshape(r, -1, 32)
        if t in (Q.Q5_0, Q.Q5_1):
            q = q | (((planes[2][..., None] >> torch.arange(32)) & 1) << 4)
        if t in (Q.Q4_0, Q.Q5_0):
            out = planes[1].float()[..., None] * (q - (8 if t == Q.Q4_0 else 16)).float()
        else:
            dm = planes[1].float()
            out = dm[..., 0:1] * q.float() + dm[..., 1:2]
        return out.reshape(r, c)
    if t in (Q.Q4_K, Q.Q5_K):
        qs, dm, scale_min = planes[:3]
        q = nibbles(qs, 32).reshape(r, -1, 8, 32)
        if t == Q.Q5_K:  # bit 2j + nibble of qh[l]: the fifth bit of element l of sub-block 2j + nibble
            qh = planes[3].int().reshape(r, -1, 1, 32)
            q = q + ((qh >> torch.arange(8).reshape(1, 1, 8, 1)) & 1) * 16
        dm = dm.float().reshape(r, -1, 1, 2)
        sm = scale_min.float().reshape(r, -1, 8, 2)
        out = dm[..., 0:1] * sm[..., 0:1] * q.float() - dm[..., 1:2] * sm[..., 1:2]
        return out.reshape(r, c)
    if t == Q.Q6_K:
        ql, d, scales, qh = planes
        ql = ql.int().reshape(r, -1, 2, 2, 32)  # [.., half n, (l | l + 32), l]
        low = torch.stack((ql & 0xF, ql >> 4), dim=3).reshape(r, -1, 2, 4, 32)  # quarter = nibble * 2 + (l | l + 32)
        high = (qh.int().reshape(r, -1, 2, 1, 32) >> (2 * torch.arange(4)).reshape(1, 1, 1, 4, 1)) & 3
        q = (low | (high << 4)) - 32
        sc = scales.float().reshape(r, -1, 2, 4, 2, 1)  # index n * 8 + 2 * quarter + l // 16
        out = d.float().reshape(r, -1, 1, 1, 1, 1) * sc * q.float().reshape(r, -1, 2, 4, 2, 16)
        return out.reshape(r, c)
    if t in (Q.Q2_K, Q.Q3_K):
        qs, d, scales = planes[:3]
        q = (qs.int().reshape(r, -1, 2, 1, 32) >> (2 * torch.arange(4)).reshape(1, 1, 1, 4, 1)) & 3  # [.., half, j, l]
        # the re-laid scales: [.., half, g, j] -> [.., half, j, g, 1] beside q as [.., half, j, g, 16]
        sc = scales.reshape(r, -1, 2, 2, 4).permute(0, 1, 2, 4, 3).reshape(r, -1, 2, 4, 2, 1).int()
        q = q.reshape(r, -1, 2, 4, 2, 16)
        if t == Q.Q2_K:
            dm = d.float().reshape(r, -1, 1, 1, 1, 1, 2)
            out = dm[..., 0] * (sc & 0xF).float() * q.float() - dm[..., 1] * (sc >> 4).float()
        else:
            bit = (4 * torch.arange(2).reshape(2, 1) + torch.arange(4)).reshape(1, 1, 2, 4, 1)
            high = ((planes[3].int().reshape(r, -1, 1, 1, 32) >> bit) & 1).reshape(r, -1, 2, 4, 2, 16)
            out = d.float().reshape(r, -1, 1, 1, 1, 1) * sc.float() * (q + 4 * high - 4).float()
        return out.reshape(r, c)
    if t in (Q.IQ4_NL, Q.MXFP4):
        qs, d = planes
        values = torch.tensor(IQ4_VALUES if t == Q.IQ4_NL else MXFP4_VALUES, dtype=torch.float32, device=qs.device)
        if t == Q.MXFP4:  # 2^(e - 128), exactly
            d = torch.ldexp(torch.ones(d.shape, device=d.device), d.int() - 128)
        return (values[nibbles(qs, 16)].reshape(r, -1, 32) * d.float()[..., None]).reshape(r, c)
    if t == Q.IQ4_XS:
        qs, d, scales = planes
        values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=qs.device)
        q = values[nibbles(qs, 16)].reshape(r, -1, 8, 32)
        out = d.float().reshape(r, -1, 1, 1) * scales.float().reshape(r, -1, 8, 1) * q
        return out.reshape(r, c)
    if t in GRID_TYPES:
        return _grid_reference(t, planes, r, c)
    raise ValueError(f"{t.name} has no kernel")


IQ1_DELTA = 0.125  # IQ1_S / IQ1_M: the grid's values are shifted by this, its sign per group


def _grid_reference(t: Q, planes: tuple[torch.Tensor, ...], r: int, c: int) -> torch.Tensor:
    """float32 [r, c] of an i-quant of GRID_TYPES, from its planes (see split_planes)."""
    grid = grid_table(t, planes[0].device).float().reshape(-1, GRID_WIDTH.get(t, 8))
    d = planes[1].float().reshape(r, -1, 1)  # [r, super-blocks, 1]
    bit = torch.arange(8, device=grid.device)

    def signs(byte: torch.Tensor) -> torch.Tensor:  # sign bytes [...] -> +-1 [..., 8]
        return 1.0 - 2.0 * ((byte.int()[..., None] >> bit) & 1).float()

    def sign_bytes(aux: torch.Tensor) -> torch.Tensor:  # words [..] -> the four groups' sign bytes [.., 4]
        index = (aux.int()[..., None] >> (7 * torch.arange(4, device=aux.device))) & 127
        return index | (parity(index) << 7)

    def u16(plane: torch.Tensor) -> torch.Tensor:
        return plane.int() & 0xFFFF

    if t in (Q.IQ2_XXS, Q.IQ3_XXS):  # per 32: a 4-bit scale and four groups' signs in one word
        aux = planes[2].reshape(r, -1, 8)
        scale = d * (0.5 + ((aux.int() >> 28) & 0xF).float()) * (0.25 if t == Q.IQ2_XXS else 0.5)
        values = grid[planes[0].int()].reshape(r, -1, 8, 4, 8)
        out = scale[..., None, None] * values * signs(sign_bytes(aux))
    elif t == Q.IQ2_XS:
        q = u16(planes[0]).reshape(r, -1, 16, 2)  # [.., sub-block of 16, group]
        sc = planes[2].int().reshape(r, -1, 8, 1) >> torch.tensor([0, 4], device=grid.device)
        scale = d * (0.5 + (sc & 0xF).reshape(r, -1, 16).float()) * 0.25
        index = (q >> 9) & 127
        out = scale[..., None, None] * grid[q & 511] * signs(index | (parity(index) << 7))
    elif t == Q.IQ2_S:
        high = u16(planes[3]).reshape(r, -1, 8)
        qh = (high & 0xFF)[..., None] >> (2 * torch.arange(4, device=grid.device))  # [.., block, group]
        index = planes[0].int().reshape(r, -1, 8, 4) | ((qh & 3) << 8)
        sc = (high >> 8)[..., None] >> torch.tensor([0, 4], device=grid.device)
        scale = d * (0.5 + (sc & 0xF).reshape(r, -1, 16).float()) * 0.25
        out = scale[..., None, None] * (grid[index] * signs(planes[2].reshape(r, -1, 8, 4))).reshape(r, -1, 16, 2, 8)
    elif t == Q.IQ3_S:
        high = u16(planes[3]).reshape(r, -1, 8)
        index = planes[0].int().reshape(r, -1, 8, 8) | ((((high & 0xFF)[..., None] >> bit) & 1) << 8)
        scale = d * (1 + 2 * (high >> 8)).float()
        values = grid[index].reshape(r, -1, 8, 4, 8)
        out = scale[..., None, None] * values * signs(planes[2].reshape(r, -1, 8, 4))
    elif t == Q.IQ1_S:
        qh = u16(planes[2]).reshape(r, -1, 8)
        high_bits = (qh[..., None] >> (3 * torch.arange(4, device=grid.device))) & 7  # [.., block, group]
        index = planes[0].int().reshape(r, -1, 8, 4) | (high_bits << 8)
        scale = d * (2 * ((qh >> 12) & 7) + 1).float()
        delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA)
        out = scale[..., None, None] * (grid[index] + delta[..., None, None])
    else:  # IQ1_M
        qh = planes[2].int().reshape(r, -1, 16, 1) >> torch.tensor([0, 4], device=grid.device)  # [.., sub-block, group]
        index = planes[0].int().reshape(r, -1, 16, 2) | ((qh & 7) << 8)
        delta = torch.where((qh & 8) == 0, IQ1_DELTA, -IQ1_DELTA)
        sc = u16(planes[3]).reshape(r, -1, 4, 1) >> (3 * torch.arange(4, device=grid.device))
        scale = d * (2 * (sc & 7).reshape(r, -1, 16) + 1).float()
        out = scale[..., None, None] * (grid[index] + delta[..., None])
    return out.reshape(r, c)


def parity(x: torch.Tensor) -> torch.Tensor:
    """1 where x (7 bits) has an odd number of set bits: the eighth bit of a sign byte."""
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    return (x ^ (x >> 1)) & 1


# -- the ops -----------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, xq: qdot.QuantizedRows | None = None) -> torch.Tensor:
    """x [n, cols] @ w.T (+ bias) -> [n, rows] in x's dtype; into `out` if given. `xq`: x already
    quantized for the integer path (parts of one product share it)."""
    n = x.shape[0]
    if not use_triton(x):
        y = torch.nn.functional.linear(x, dequantize_reference(w).to(x.dtype), bias)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((n, w.rows), dtype=x.dtype, device=x.device)
    path = choose(w, n, x)
    if path in INTEGER_PRODUCTS:
        INTEGER_PRODUCTS[path](xq if xq is not None else qdot.quantize_rows(x), w, out)
    else:
        PRODUCTS[path](x, w, out)
    if bias is not None:
        out += bias
    return out


def quantize_for(x: torch.Tensor, weights) -> qdot.QuantizedRows | None:
    """x quantized once for the parts of `weights` that take the integer path, or None."""
    return qdot.quantize_rows(x) if integer_path(x, weights) else None


def integer_path(x: torch.Tensor, weights) -> bool:
    """Whether some part of `weights` multiplies rows like x through an integer product."""
    return use_triton(x) and any(isinstance(w, QuantizedWeight) and choose(w, x.shape[0], x) in INTEGER_PRODUCTS
                                 for w in weights)


# Which kernel multiplies n rows with a weight. Every candidate is right; which is fastest depends
# on the type, the shape, n and the GPU, so the first product of each (type, shape, dtype, rows
# bucket) times them once, outside any graph capture, and keeps the fastest:
#   qdot         integer dot products against the rows quantized per 32 (qdot.py), up to 8 rows
#   mmq          the same rows in int8 tensor-core products (mmq.py), 2 to MMQ_ROWS rows, with
#                the type's own block; mmq-RxW with programs of R weight rows and W warps instead
#   matvec       one row, dequantized to float in registers, summed per scale group
#   tile         a tile of weights dequantized in registers into a tensor-core product, up to 64 rows
#   dequantized  the whole matrix dequantized into a scratch buffer, then cuBLAS (prefill)
# SHARDRT_QUANT_PATH=NAME takes that path wherever it is a candidate (to compare, or to test one).
MAX_TILE_ROWS = 64
MMQ_ROWS = 256  # past this many rows cuBLAS on the dequantized matrix wins anyway
PATHS = ("qdot", "mmq", "matvec", "tile", "dequantized")  # and mmq's other blocks (MMQ_BLOCKS)
PATH_ENV = "SHARDRT_QUANT_PATH"
_choices: dict[tuple, str] = {}


def candidates(w: QuantizedWeight, n: int, x: torch.Tensor) -> tuple[str, ...]:
    out = ()
    if n <= qdot.MAX_ROWS and w.qtype in qdot.QDOT_TYPES and qdot.supported(x):
        out += ("qdot",)
    if 1 < n <= MMQ_ROWS and mmq.supported(w.qtype, x):
        out += ("mmq",) + tuple(mmq_path(block) for block in mmq.other_blocks(w.qtype))
    if n == 1 and w.qtype in MATVEC_CONFIG:
        out += ("matvec",)
    if n <= MAX_TILE_ROWS:
        out += ("tile",)
    return out + (("dequantized",) if n > qdot.MAX_ROWS else ())


def choose(w: QuantizedWeight, n: int, x: torch.Tensor) -> str:
    """The path for n rows like x (see above); during a graph capture, before any timing: the first
    candidate."""
    options = candidates(w, n, x)
    forced = forced_path()
    if forced in options:
        return forced
    if len(options) == 1:
        return options[0]
    bucket = 1 << (n - 1).bit_length()
    key = (w.qtype, w.rows, w.cols, x.dtype, w.device, bucket)
    if key not in _choices:
        if not x.is_cuda or torch.cuda.is_current_stream_capturing():
            return options[0]
        times = {}
        for path in options:
            try:
                times[path] = _gpu_time(path, w, bucket, x.dtype)
            except OutOfResources:  # another block than the type's own may not fit this GPU at any rows
                if path not in MMQ_BLOCKS:
                    raise
                log.info("%s: its programs need more shared memory than %s has", path, w.device)
        _choices[key] = min(times, key=times.get)
        log.debug("%s %dx%d x%d: %s", w.qtype.name, w.rows, w.cols, bucket,
                  ", ".join(f"{p} {t:.3f} ms" for p, t in sorted(times.items(), key=lambda kv: kv[1])))
    return _choices[key]


def forced_path() -> str | None:
    value = os.environ.get(PATH_ENV)
    if value is not None and value not in PRODUCTS:
        from ..errors import ConfigError

        raise ConfigError(f"{PATH_ENV}: {value!r} is not one of {', '.join(PATHS)} "
                          f"(or mmq with another block: {', '.join(MMQ_BLOCKS)})")
    return value


def choices() -> dict[str, str]:
    """The paths chosen so far, as 'TYPE ROWSxCOLS dtype xN' -> path (for stats)."""
    return {f"{t.name} {r}x{c} {str(d).removeprefix('torch.')} x{n}": path
            for (t, r, c, d, _, n), path in sorted(_choices.items(), key=lambda kv: (kv[0][:3], kv[0][5]))}


def _gpu_time(path: str, w: QuantizedWeight, n: int, dtype: torch.dtype, reps: int = 20) -> float:
    """GPU time of `reps` products as the decode graphs run them: captured in one CUDA graph, so
    a path of two kernels (qdot quantizes x first) pays no more launch cost than it will there."""
    x = torch.randn(n, w.cols, device=w.device, dtype=dtype)
    out = torch.empty(n, w.rows, device=w.device, dtype=dtype)
    op = functools.partial(PRODUCTS[path], x, w, out)
    with torch.cuda.device(w.device):
        for _ in range(3):
            op()  # compiles, then warms (and makes the scratch matrix outside the graph's pool)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                op()
        graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        stop.record()
        stop.synchronize()
    return start.elapsed_time(stop)


def embedding(ids: torch.Tensor, w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The rows `ids` of w, dequantized to `dtype`: [n, cols]."""
    if not use_triton(w.planes[0]):
        return dequantize_reference(w, ids.to(w.device)).to(dtype)
    out = torch.empty((ids.shape[0], w.cols), dtype=dtype, device=w.device)
    _launch_dequantize(w, out, ids.to(w.device))
    return out


_scratch: dict[tuple, torch.Tensor] = {}


def dequantize(w: QuantizedWeight, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
    """The whole matrix in `dtype`. With scratch=True it lands in one buffer per device and dtype,
    reused by every weight (prefill dequantizes one matrix at a time, then multiplies)."""
    if scratch:
        key = (w.device, dtype)
        buffer = _scratch.get(key)
        if buffer is None or buffer.numel() < w.rows * w.cols:
            _scratch[key] = buffer = torch.empty(w.rows * w.cols, dtype=dtype, device=w.device)
        out = buffer[: w.rows * w.cols].view(w.rows, w.cols)
    else:
        out = torch.empty((w.rows, w.cols), dtype=dtype, device=w.device)
    if not use_triton(out):
        return out.copy_(dequantize_reference(w))
    _launch_dequantize(w, out, None)
    return out


def scratch_bytes(device: torch.device) -> int:
    return sum(b.numel() * b.element_size() for (dev, _), b in _scratch.items() if dev == device)


def _block_k(w: QuantizedWeight) -> int:
    if w.qtype in SUPER_BLOCK_TYPES:
        return 256
    return next(b for b in (256, 128, 64, 32) if w.cols % b == 0)


SUPER_BLOCK_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS) + GRID_TYPES


def _planes4(w: QuantizedWeight) -> tuple[torch.Tensor, ...]:
    if w.qtype in qdot.TABLE_TYPES:  # the fourth pointer: the table of values
        return pointers(w.planes, 3) + (qdot.value_table(w.qtype, w.device),)
    return pointers(w.planes)


def _grid_or_any(w: QuantizedWeight) -> torch.Tensor:
    """The grid pointer of the float kernels: the type's grid, or any valid tensor."""
    return grid_table(w.qtype, w.device) if w.qtype in GRID_TYPES else w.planes[0]


def _fused_linear(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor | None) -> torch.Tensor:
    """Up to MAX_TILE_ROWS rows: each program dequantizes a tile of weight rows once and
    multiplies every row of x with it on the tensor cores."""
    n = x.shape[0]
    if out is None:
        out = torch.empty((n, w.rows), dtype=x.dtype, device=x.device)
    block_n = 32 if w.rows >= 4096 else 16
    _fused_linear_kernel[(triton.cdiv(w.rows, block_n),)](
        x, out, *_planes4(w), _grid_or_any(w), n, w.rows, w.cols, x.stride(0), out.stride(0),
        QTYPE=int(w.qtype), BLOCK_M=max(16, triton.next_power_of_2(n)), BLOCK_N=block_n, BLOCK_K=_block_k(w),
        PRECISION=dot_precision(x.dtype), num_warps=4,
    )
    return out


# The float path for one row (float32 activations, ROCm), `_matvec`: it walks each weight row in
# units of the block layout and sums per scale group, without the 16-row tile of tensor-core
# dots; `choose` times it against the others. (rows per program, units per loop step, warps) per
# type, from a sweep on an H200.
MATVEC_CONFIG = {Q.Q4_K: (16, 4, 8), Q.Q5_K: (16, 4, 8), Q.Q6_K: (4, 8, 4), Q.Q8_0: (32, 4, 8),
                 Q.Q4_0: (16, 8, 8), Q.Q4_1: (16, 8, 8), Q.Q5_0: (16, 8, 8), Q.Q5_1: (16, 8, 8)}
# elements of a row one unit covers: a block (Q8_0, Q4_0..Q5_1), a quarter super-block (Q4_K,
# Q5_K: two sub-blocks, low and high nibbles), half a super-block (Q6_K)
MATVEC_UNIT = {Q.Q8_0: 32, Q.Q4_0: 32, Q.Q4_1: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q4_K: 64, Q.Q5_K: 64, Q.Q6_K: 128}


def _matvec(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor | None) -> torch.Tensor:
    """x [1, cols] @ w.T -> [1, rows]."""
    if out is None:
        out = torch.empty((1, w.rows), dtype=x.dtype, device=x.device)
    block_n, units, warps = MATVEC_CONFIG[w.qtype]
    _matvec_kernel[(triton.cdiv(w.rows, block_n),)](
        x, out, *_planes4(w), w.rows, w.cols, QTYPE=int(w.qtype), UNIT=MATVEC_UNIT[w.qtype],
        BLOCK_N=block_n, UNITS=units, num_warps=warps)
    return out


def _dequantized_product(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor) -> torch.Tensor:
    weight = dequantize(w, x.dtype, scratch=True)
    if out.is_contiguous():
        return torch.mm(x, weight.T, out=out)
    return out.copy_(x @ weight.T)


def mmq_path(block: tuple[int, int]) -> str:
    return f"mmq-{block[0]}x{block[1]}"


def _quantizing(product):
    """An integer product (xq, w, out) as a product of x itself, quantized first."""
    return lambda x, w, out: product(qdot.quantize_rows(x), w, out)


MMQ_BLOCKS = {mmq_path(block): block for block in mmq.ALL_OTHER_BLOCKS}
# the paths that multiply x quantized per block of 32 (parts of one product share it)
INTEGER_PRODUCTS = {"qdot": qdot.linear, "mmq": mmq.linear,
                    **{path: functools.partial(mmq.linear, block=block) for path, block in MMQ_BLOCKS.items()}}
PRODUCTS = {**{path: _quantizing(product) for path, product in INTEGER_PRODUCTS.items()},
            "matvec": lambda x, w, out: _matvec(x, w, out), "tile": lambda x, w, out: _fused_linear(x, w, out),
            "dequantized": _dequantized_product}


def _launch_dequantize(w: QuantizedWeight, out: torch.Tensor, rows: torch.Tensor | None) -> None:
    n = rows.shape[0] if rows is not None else w.rows
    block_n = 16
    _dequantize_kernel[(triton.cdiv(n, block_n), w.cols // _block_k(w))](
        out, *_planes4(w), _grid_or_any(w), rows if rows is not None else out, n, w.cols, out.stride(0),
        QTYPE=int(w.qtype), GATHER=rows is not None, BLOCK_N=block_n, BLOCK_K=_block_k(w), num_warps=4,
    )


if triton is not None:
    from .qdot import _e8m0_half

    @triton.jit
    def _nibbles(b, R: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
        """bytes [R, N * G] -> 4-bit quants [R, N, 2 * G]: each group of G bytes holds G elements
        in its low nibbles, then G in its high nibbles."""
        b = tl.reshape(b.to(tl.int32), (R, N, G))
        return tl.reshape(tl.permute(tl.join(b & 0xF, b >> 4), (0, 1, 3, 2)), (R, N, 2 * G))

    @triton.jit
    def _dequant_tile(p0, p1, p2, p3, g_ptr, rows, row_ok, k0, K, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """Weights [BLOCK_N, BLOCK_K] at rows `rows`, columns k0.., as float32. g_ptr: the grid of an
        i-quant of GRID_TYPES (`grid_table`)."""
        r = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None]
        if QTYPE == 8:  # Q8_0
            NB: tl.constexpr = BLOCK_K // 32
            qs = tl.load(p0 + r * K + k0 + tl.arange(0, BLOCK_K)[None, :], mask=mask, other=0)
            d = tl.load(p1 + r * (K // 32) + k0 // 32 + tl.arange(0, NB)[None, :], mask=mask, other=0.0)
            w = tl.reshape(qs.to(tl.float32), (BLOCK_N, NB, 32)) * d.to(tl.float32)[:, :, None]
        elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
            NB: tl.constexpr = BLOCK_K // 32
            blocks = k0 // 32 + tl.arange(0, NB)[None, :]
            qs = tl.load(p0 + r * (K // 2) + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=mask, other=0)
            q = _nibbles(qs, BLOCK_N, 16, NB)
            if QTYPE == 6 or QTYPE == 7:
                qh = tl.load(p2 + r * (K // 32) + blocks, mask=mask, other=0)
                q = q | (((qh[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1) << 4)
            if QTYPE == 2 or QTYPE == 6:
                d = tl.load(p1 + r * (K // 32) + blocks, mask=mask, other=0.0).to(tl.float32)
                w = d[:, :, None] * (q - (8 if QTYPE == 2 else 16)).to(tl.float32)
            else:
                d = tl.load(p1 + (r * (K // 32) + blocks) * 2, mask=mask, other=0.0).to(tl.float32)
                m = tl.load(p1 + (r * (K // 32) + blocks) * 2 + 1, mask=mask, other=0.0).to(tl.float32)
                w = d[:, :, None] * q.to(tl.float32) + m[:, :, None]
        elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: one super-block of 256 per tile
            qs = tl.load(p0 + r * (K // 2) + k0 // 2 + tl.arange(0, 128)[None, :], mask=mask, other=0)
            q = tl.reshape(_nibbles(qs, BLOCK_N, 32, 4), (BLOCK_N, 8, 32))  # sub-block 2j + nibble
            if QTYPE == 13:
                qh = tl.load(p3 + r * (K // 8) + k0 // 8 + tl.arange(0, 32)[None, :], mask=mask, other=0).to(tl.int32)
                q = q + ((qh[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1) * 16
            sb = r * (K // 256) + k0 // 256
            d = tl.load(p1 + sb * 2, mask=mask, other=0.0).to(tl.float32)
            dmin = tl.load(p1 + sb * 2 + 1, mask=mask, other=0.0).to(tl.float32)
            at = (r * (K // 32) + k0 // 32 + tl.arange(0, 8)[None, :]) * 2
            sc = tl.load(p2 + at, mask=mask, other=0).to(tl.float32)
            mn = tl.load(p2 + at + 1, mask=mask, other=0).to(tl.float32)
            w = (d * sc)[:, :, None] * q.to(tl.float32) - (dmin * mn)[:, :, None]
        elif QTYPE == 10 or QTYPE == 11:  # Q2_K, Q3_K: one super-block of 256 per tile
            qs = tl.load(p0 + r * (K // 4) + k0 // 4 + tl.arange(0, 64)[None, :], mask=mask, other=0).to(tl.int32)
            q = (tl.reshape(qs, (BLOCK_N, 2, 1, 32)) >> (2 * tl.arange(0, 4))[None, None, :, None]) & 3  # half, j, l
            sc = tl.load(p2 + r * (K // 16) + k0 // 16 + tl.arange(0, 16)[None, :], mask=mask, other=0).to(tl.int32)
            sc = tl.reshape(tl.permute(tl.reshape(sc, (BLOCK_N, 2, 2, 4)), (0, 1, 3, 2)), (BLOCK_N, 2, 4, 2, 1))
            if QTYPE == 10:
                sb = r * (K // 256) + k0 // 256
                d = tl.reshape(tl.load(p1 + sb * 2, mask=mask, other=0.0).to(tl.float32), (BLOCK_N, 1, 1, 1, 1))
                dmin = tl.reshape(tl.load(p1 + sb * 2 + 1, mask=mask, other=0.0).to(tl.float32), (BLOCK_N, 1, 1, 1, 1))
                w = d * (sc & 0xF).to(tl.float32) * tl.reshape(q, (BLOCK_N, 2, 4, 2, 16)).to(tl.float32) \
                    - dmin * (sc >> 4).to(tl.float32)
            else:
                hm = tl.load(p3 + r * (K // 8) + k0 // 8 + tl.arange(0, 32)[None, :], mask=mask, other=0).to(tl.int32)
                bit = 4 * tl.arange(0, 2)[:, None] + tl.arange(0, 4)[None, :]
                high = (tl.reshape(hm, (BLOCK_N, 1, 1, 32)) >> bit[None, :, :, None]) & 1
                d = tl.reshape(tl.load(p1 + r * (K // 256) + k0 // 256, mask=mask, other=0.0).to(tl.float32),
                               (BLOCK_N, 1, 1, 1, 1))
                w = d * sc.to(tl.float32) * tl.reshape(q + 4 * high - 4, (BLOCK_N, 2, 4, 2, 16)).to(tl.float32)
        elif QTYPE == 20 or QTYPE == 39:  # IQ4_NL, MXFP4: blocks of 32 as Q4_0's; p3: the table of values
            NB: tl.constexpr = BLOCK_K // 32
            qs = tl.load(p0 + r * (K // 2) + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=mask, other=0)
            values = tl.load(p3 + _nibbles(qs, BLOCK_N, 16, NB)).to(tl.float32)  # [BLOCK_N, NB, 32]
            scale = p1 + r * (K // 32) + k0 // 32 + tl.arange(0, NB)[None, :]
            if QTYPE == 39:  # the exponent byte
                d = _e8m0_half(tl.load(scale, mask=mask, other=0).to(tl.int32))
            else:
                d = tl.load(scale, mask=mask, other=0.0).to(tl.float32)
            w = d[:, :, None] * values
        elif QTYPE == 23:  # IQ4_XS: one super-block of 256 per tile; p3: the table of values
            qs = tl.load(p0 + r * (K // 2) + k0 // 2 + tl.arange(0, 128)[None, :], mask=mask, other=0)
            values = tl.load(p3 + _nibbles(qs, BLOCK_N, 16, 8)).to(tl.float32)  # [BLOCK_N, 8, 32]
            sc = tl.load(p2 + r * (K // 32) + k0 // 32 + tl.arange(0, 8)[None, :], mask=mask, other=0).to(tl.float32)
            d = tl.load(p1 + r * (K // 256) + k0 // 256, mask=mask, other=0.0).to(tl.float32)
            w = (d * sc)[:, :, None] * values
        elif QTYPE == 16 or QTYPE == 17 or QTYPE == 18 or QTYPE == 19 or QTYPE == 21 or QTYPE == 22 \
                or QTYPE == 29:  # GRID_TYPES: IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M
            w = _grid_tile(p0, p1, p2, p3, g_ptr, r, mask, k0, K, QTYPE, BLOCK_N)
        else:  # Q6_K (14): one super-block of 256 per tile
            ql = tl.load(p0 + r * (K // 2) + k0 // 2 + tl.arange(0, 128)[None, :], mask=mask, other=0).to(tl.int32)
            ql = tl.reshape(ql, (BLOCK_N, 4, 32))  # [half n, (l | l + 32)] flattened, l
            low = tl.reshape(tl.permute(tl.join(ql & 0xF, ql >> 4), (0, 1, 3, 2)), (BLOCK_N, 2, 2, 2, 32))
            low = tl.reshape(tl.permute(low, (0, 1, 3, 2, 4)), (BLOCK_N, 2, 4, 32))  # quarter = nibble * 2 + half
            qh = tl.load(p3 + r * (K // 4) + k0 // 4 + tl.arange(0, 64)[None, :], mask=mask, other=0).to(tl.int32)
            qh = tl.reshape(qh, (BLOCK_N, 2, 1, 32))
            high = (qh >> (2 * tl.arange(0, 4))[None, None, :, None]) & 3
            q = (low | (high << 4)) - 32
            sc = tl.load(p2 + r * (K // 16) + k0 // 16 + tl.arange(0, 16)[None, :], mask=mask, other=0).to(tl.float32)
            d = tl.load(p1 + r * (K // 256) + k0 // 256, mask=mask, other=0.0).to(tl.float32)
            scale = tl.reshape(d * sc, (BLOCK_N, 2, 4, 2, 1))  # index n * 8 + 2 * quarter + l // 16
            w = scale * tl.reshape(q.to(tl.float32), (BLOCK_N, 2, 4, 2, 16))
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _sign_bits(index):
        """7-bit sign indices [...] -> +-1.0 [..., 8]: the index's bits, the eighth making the count even."""
        odd = index ^ (index >> 4)
        odd = odd ^ (odd >> 2)
        byte = index | (((odd ^ (odd >> 1)) & 1) << 7)
        return _signs(byte)

    @triton.jit
    def _signs(byte):
        """sign bytes [...] (int32) -> +-1.0 [..., 8]: bit j set, element j negative."""
        return 1.0 - 2.0 * ((tl.expand_dims(byte, -1) >> tl.arange(0, 8)) & 1).to(tl.float32)

    @triton.jit
    def _grid_rows(g_ptr, index, WIDTH: tl.constexpr):
        """grid rows [..., WIDTH] as float32 for row indices [...]."""
        return tl.load(g_ptr + tl.expand_dims(index, -1) * WIDTH + tl.arange(0, WIDTH)).to(tl.float32)

    @triton.jit
    def _grid_tile(p0, p1, p2, p3, g_ptr, r, mask, k0, K, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
        """One super-block [BLOCK_N, 256] of an i-quant of GRID_TYPES (see split_planes for its planes),
        r [BLOCK_N, 1] its rows, as float32."""
        d = tl.load(p1 + r * (K // 256) + k0 // 256, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N, 1]
        g32 = tl.arange(0, 32)[None, :]
        b8 = tl.arange(0, 8)[None, :]
        if QTYPE == 16 or QTYPE == 18:  # IQ2_XXS, IQ3_XXS: per block of 32 a word of signs and the scale
            aux = tl.load(p2 + r * (K // 32) + k0 // 32 + b8, mask=mask, other=0)  # [BLOCK_N, 8]
            scale = d * (0.5 + ((aux >> 28) & 0xF).to(tl.float32)) * (0.25 if QTYPE == 16 else 0.5)
            sign = _sign_bits((tl.reshape(aux, (BLOCK_N, 8, 1)) >> (7 * tl.arange(0, 4))[None, None, :]) & 127)
            if QTYPE == 16:
                index = tl.load(p0 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
                values = tl.reshape(_grid_rows(g_ptr, index, 8), (BLOCK_N, 8, 4, 8))
            else:
                rows_of_4 = tl.arange(0, 64)[None, :]
                index = tl.load(p0 + r * (K // 4) + k0 // 4 + rows_of_4, mask=mask, other=0).to(tl.int32)
                values = tl.reshape(_grid_rows(g_ptr, index, 4), (BLOCK_N, 8, 4, 8))
            w = tl.reshape(scale, (BLOCK_N, 8, 1, 1)) * values * sign
        elif QTYPE == 17:  # IQ2_XS: a 9-bit grid index and a 7-bit sign index per group, a scale per 16
            q = tl.load(p0 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32) & 0xFFFF
            sc = tl.load(p2 + r * (K // 32) + k0 // 32 + b8, mask=mask, other=0).to(tl.int32)
            sc = (tl.reshape(sc, (BLOCK_N, 8, 1)) >> (4 * tl.arange(0, 2))[None, None, :]) & 0xF
            sc = tl.reshape(sc, (BLOCK_N, 16))
            scale = d * (0.5 + sc.to(tl.float32)) * 0.25
            values = _grid_rows(g_ptr, q & 511, 8) * _sign_bits((q >> 9) & 127)  # [BLOCK_N, 32, 8]
            w = tl.reshape(scale, (BLOCK_N, 16, 1, 1)) * tl.reshape(values, (BLOCK_N, 16, 2, 8))
        elif QTYPE == 22:  # IQ2_S: index bits 8-9 two per group in qh, sign bytes, a scale per 16
            high = tl.load(p3 + r * (K // 32) + k0 // 32 + b8, mask=mask, other=0).to(tl.int32) & 0xFFFF
            qh = (tl.reshape(high & 0xFF, (BLOCK_N, 8, 1)) >> (2 * tl.arange(0, 4))[None, None, :]) & 3
            low = tl.load(p0 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
            index = tl.reshape(low, (BLOCK_N, 8, 4)) | (qh << 8)
            byte = tl.load(p2 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
            values = _grid_rows(g_ptr, index, 8) * _signs(tl.reshape(byte, (BLOCK_N, 8, 4)))  # [BLOCK_N, 8, 4, 8]
            sc = (tl.reshape(high >> 8, (BLOCK_N, 8, 1)) >> (4 * tl.arange(0, 2))[None, None, :]) & 0xF
            scale = d * (0.5 + tl.reshape(sc, (BLOCK_N, 16)).to(tl.float32)) * 0.25
            w = tl.reshape(scale, (BLOCK_N, 16, 1, 1)) * tl.reshape(values, (BLOCK_N, 16, 2, 8))
        elif QTYPE == 21:  # IQ3_S: index bit 8 one per row of 4 in qh, sign bytes, a scale per 32
            high = tl.load(p3 + r * (K // 32) + k0 // 32 + b8, mask=mask, other=0).to(tl.int32) & 0xFFFF
            low = tl.load(p0 + r * (K // 4) + k0 // 4 + tl.arange(0, 64)[None, :], mask=mask, other=0).to(tl.int32)
            bit = (tl.reshape(high & 0xFF, (BLOCK_N, 8, 1)) >> tl.arange(0, 8)[None, None, :]) & 1
            values = tl.reshape(_grid_rows(g_ptr, tl.reshape(low, (BLOCK_N, 8, 8)) | (bit << 8), 4), (BLOCK_N, 8, 4, 8))
            byte = tl.load(p2 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
            scale = d * (1 + 2 * (high >> 8)).to(tl.float32)
            w = tl.reshape(scale, (BLOCK_N, 8, 1, 1)) * values * _signs(tl.reshape(byte, (BLOCK_N, 8, 4)))
        elif QTYPE == 19:  # IQ1_S: three index bits per group, the scale and the delta's sign per 32 in qh
            qh = tl.load(p2 + r * (K // 32) + k0 // 32 + b8, mask=mask, other=0).to(tl.int32) & 0xFFFF
            low = tl.load(p0 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
            high_bits = (tl.reshape(qh, (BLOCK_N, 8, 1)) >> (3 * tl.arange(0, 4))[None, None, :]) & 7
            index = tl.reshape(low, (BLOCK_N, 8, 4)) | (high_bits << 8)
            delta = tl.where((qh & 0x8000) == 0, 0.125, -0.125)  # IQ1_DELTA
            scale = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
            values = _grid_rows(g_ptr, index, 8) + tl.reshape(delta, (BLOCK_N, 8, 1, 1))
            w = tl.reshape(scale, (BLOCK_N, 8, 1, 1)) * values
        else:  # IQ1_M (29): per group three index bits and the delta's sign in a nibble of qh, a scale per 16
            qh = tl.load(p2 + r * (K // 16) + k0 // 16 + tl.arange(0, 16)[None, :], mask=mask, other=0).to(tl.int32)
            nib = (tl.reshape(qh, (BLOCK_N, 16, 1)) >> (4 * tl.arange(0, 2))[None, None, :]) & 0xF  # [BLOCK_N, 16, 2]
            low = tl.load(p0 + r * (K // 8) + k0 // 8 + g32, mask=mask, other=0).to(tl.int32)
            index = tl.reshape(low, (BLOCK_N, 16, 2)) | ((nib & 7) << 8)
            delta = tl.where((nib & 8) == 0, 0.125, -0.125)  # IQ1_DELTA
            words = tl.load(p3 + r * (K // 64) + k0 // 64 + tl.arange(0, 4)[None, :], mask=mask, other=0).to(tl.int32)
            sc = (tl.reshape(words, (BLOCK_N, 4, 1)) >> (3 * tl.arange(0, 4))[None, None, :]) & 7
            scale = d * tl.reshape(2 * sc + 1, (BLOCK_N, 16)).to(tl.float32)
            values = _grid_rows(g_ptr, index, 8) + tl.reshape(delta, (BLOCK_N, 16, 2, 1))
            w = tl.reshape(scale, (BLOCK_N, 16, 1, 1)) * values
        return tl.reshape(w, (BLOCK_N, 256))

    @triton.jit
    def _fused_linear_kernel(x_ptr, out_ptr, p0, p1, p2, p3, g_ptr, M, N, K, stride_x, stride_out,
                             QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _dequant_tile(p0, p1, p2, p3, g_ptr, rows, row_ok, k0, K, QTYPE, BLOCK_N, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_x + k0 + tl.arange(0, BLOCK_K)[None, :], mask=m_ok[:, None], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        tl.store(out_ptr + m[:, None] * stride_out + rows[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _dequantize_kernel(out_ptr, p0, p1, p2, p3, g_ptr, ids_ptr, N, K, stride_out, QTYPE: tl.constexpr,
                           GATHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = i < N
        rows = tl.load(ids_ptr + i, mask=ok, other=0) if GATHER else i
        k0 = tl.program_id(1) * BLOCK_K
        w = _dequant_tile(p0, p1, p2, p3, g_ptr, rows, ok, k0, K, QTYPE, BLOCK_N, BLOCK_K)
        tl.store(out_ptr + i.to(tl.int64)[:, None] * stride_out + k0 + tl.arange(0, BLOCK_K)[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _matvec_kernel(x_ptr, out_ptr, p0, p1, p2, p3, N, K, QTYPE: tl.constexpr, UNIT: tl.constexpr,
                       BLOCK_N: tl.constexpr, UNITS: tl.constexpr):
        """One program: BLOCK_N rows, UNITS units of each row per step. The quants are multiplied
        into x and summed per scale group first; scales and mins are applied to those sums (the
        mins as min times the sum of x over the group), so each weight costs a few operations.
        Q4_K/Q5_K instead keep a sum per element and scale each product, which measured faster."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r2 = rows.to(tl.int64)[:, None]
        r3 = r2[:, :, None]
        NU = K // UNIT
        # the accumulator's last axis: Q6_K's 4 scale groups of 16 per unit half, Q4_K/Q5_K's 32
        # elements per sub-block, one for the others
        G: tl.constexpr = 4 if QTYPE == 14 else (32 if QTYPE == 12 or QTYPE == 13 else 1)
        acc = tl.zeros((BLOCK_N, UNITS, G), tl.float32)
        for u0 in range(0, NU, UNITS):
            u2 = (u0 + tl.arange(0, UNITS))[None, :]
            u3 = u2[:, :, None]
            ok2 = (rows < N)[:, None] & (u2 < NU)
            ok3 = ok2[:, :, None]
            if QTYPE == 8:  # Q8_0
                l = tl.arange(0, 32)[None, None, :]
                q = tl.load(p0 + r3 * K + u3 * 32 + l, mask=ok3, other=0).to(tl.float32)
                x = tl.load(x_ptr + u3 * 32 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                d = tl.load(p1 + r2 * NU + u2, mask=ok2, other=0.0).to(tl.float32)
                acc += (d * tl.sum(q * x, axis=2))[:, :, None]
            elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
                l = tl.arange(0, 16)[None, None, :]
                b = tl.load(p0 + r3 * (K // 2) + u3 * 16 + l, mask=ok3, other=0).to(tl.int32)
                lo = b & 0xF
                hi = b >> 4
                if QTYPE == 6 or QTYPE == 7:
                    qh = tl.load(p2 + r3 * NU + u3, mask=ok3, other=0)
                    lo = lo | (((qh >> l) & 1) << 4)
                    hi = hi | (((qh >> (l + 16)) & 1) << 4)
                x_lo = tl.load(x_ptr + u3 * 32 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + u3 * 32 + 16 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                qx = tl.sum(lo.to(tl.float32) * x_lo + hi.to(tl.float32) * x_hi, axis=2)
                sx = tl.sum(x_lo + x_hi, axis=2)
                if QTYPE == 2 or QTYPE == 6:
                    d = tl.load(p1 + r2 * NU + u2, mask=ok2, other=0.0).to(tl.float32)
                    acc += (d * (qx - (8 if QTYPE == 2 else 16) * sx))[:, :, None]
                else:
                    d = tl.load(p1 + (r2 * NU + u2) * 2, mask=ok2, other=0.0).to(tl.float32)
                    m = tl.load(p1 + (r2 * NU + u2) * 2 + 1, mask=ok2, other=0.0).to(tl.float32)
                    acc += (d * qx + m * sx)[:, :, None]
            elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: a unit is sub-blocks 2u (low nibbles), 2u + 1 (high)
                l = tl.arange(0, 32)[None, None, :]
                b = tl.load(p0 + r3 * (K // 2) + u3 * 32 + l, mask=ok3, other=0).to(tl.int32)
                lo = b & 0xF
                hi = b >> 4
                if QTYPE == 13:
                    qh = tl.load(p3 + r3 * (K // 8) + (u3 // 4) * 32 + l, mask=ok3, other=0).to(tl.int32)
                    shift = 2 * (u3 % 4)
                    lo += ((qh >> shift) & 1) << 4
                    hi += ((qh >> (shift + 1)) & 1) << 4
                x_lo = tl.load(x_ptr + u3 * 64 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + u3 * 64 + 32 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                sb = r3 * (K // 256) + u3 // 4
                d = tl.load(p1 + sb * 2, mask=ok3, other=0.0).to(tl.float32)
                dmin = tl.load(p1 + sb * 2 + 1, mask=ok3, other=0.0).to(tl.float32)
                at = (r3 * (K // 32) + 2 * u3) * 2  # (scale, min) of sub-block 2u; 2u + 1 follows
                sc_lo = tl.load(p2 + at, mask=ok3, other=0).to(tl.float32)
                mn_lo = tl.load(p2 + at + 1, mask=ok3, other=0).to(tl.float32)
                sc_hi = tl.load(p2 + at + 2, mask=ok3, other=0).to(tl.float32)
                mn_hi = tl.load(p2 + at + 3, mask=ok3, other=0).to(tl.float32)
                acc += d * (sc_lo * lo.to(tl.float32) * x_lo + sc_hi * hi.to(tl.float32) * x_hi)
                acc -= dmin * (mn_lo * x_lo + mn_hi * x_hi)
            else:  # Q6_K: a unit is half a super-block; ql byte l: low nibble element l, high l + 64
                l = tl.arange(0, 64)[None, None, :]
                b = tl.load(p0 + r3 * (K // 2) + u3 * 64 + l, mask=ok3, other=0).to(tl.int32)
                qh = tl.load(p3 + r3 * (K // 4) + u3 * 32 + (l % 32), mask=ok3, other=0).to(tl.int32)
                shift = 2 * (l // 32)
                lo = ((b & 0xF) | (((qh >> shift) & 3) << 4)) - 32
                hi = ((b >> 4) | (((qh >> (shift + 4)) & 3) << 4)) - 32
                x_lo = tl.load(x_ptr + u3 * 128 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + u3 * 128 + 64 + l, mask=u3 < NU, other=0.0).to(tl.float32)
                qx_lo = tl.sum(tl.reshape(lo.to(tl.float32) * x_lo, (BLOCK_N, UNITS, 4, 16)), axis=3)
                qx_hi = tl.sum(tl.reshape(hi.to(tl.float32) * x_hi, (BLOCK_N, UNITS, 4, 16)), axis=3)
                g = tl.arange(0, 4)[None, None, :]
                sc_lo = tl.load(p2 + r3 * (K // 16) + u3 * 8 + g, mask=ok3, other=0).to(tl.float32)
                sc_hi = tl.load(p2 + r3 * (K // 16) + u3 * 8 + 4 + g, mask=ok3, other=0).to(tl.float32)
                d = tl.load(p1 + r3 * (K // 256) + u3 // 2, mask=ok3, other=0.0).to(tl.float32)
                acc += d * (sc_lo * qx_lo + sc_hi * qx_hi)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)
