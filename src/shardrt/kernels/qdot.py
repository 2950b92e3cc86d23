"""Integer dot products of GGUF blocks with activations quantized per block of 32: the decode
and small-batch path for quantized weights on CUDA GPUs.

A one-row product with 4-bit weights is bound by unpacking, not by memory, when every weight
is turned into a float: a nibble costs a shift, a mask, a conversion and a multiply-add. Here the
activation rows are quantized once per product to int8 per block of 32 (`QuantizedRows`: the
int8 values packed four to a word, the block's scale, and the scaled sums of each half block),
and the kernel multiplies packed words of weights into packed words of activations four at a
time (`dp4a`), applying the blocks' scales and mins to the integer sums. A 4-bit word of eight
weights then costs about three integer instructions, so the kernel streams the blocks at close
to the memory's rate. The result is exactly dequantize(W) @ dequantize(quantize(x)), up to
float32 rounding of the scaled sums; quantizing the activations is the only approximation, as
in llama.cpp's integer kernels.

The weights are read in the plane layout of `quant.split_planes` (each field of the blocks one
contiguous array per row), as int32 words: one program takes BLOCK_N weight rows and walks each
row in UNITS units per step, a unit being the smallest run of words that shares its scales
(`UNIT` elements). Up to `MAX_ROWS` activation rows share each weight load.

The inline `dp4a` is PTX: this path runs on CUDA builds of torch (compute capability 7.0 and
later, where Triton runs at all: kernels/support.py). ROCm builds and float32 products take the
float kernels in `quant`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from ._triton import pointers, tl, triton

Q = GGMLQuantizationType
QDOT_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
              Q.MXFP4)
MAX_ROWS = 8  # activation rows one kernel takes (one accumulator each); more go to the paths in `quant`
# elements of a weight row one unit covers (see each type's branch in `_qdot_kernel`)
UNIT = {Q.Q8_0: 32, Q.Q4_0: 32, Q.Q4_1: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q4_K: 64, Q.Q5_K: 64, Q.Q6_K: 64,
        Q.Q2_K: 64, Q.Q3_K: 64, Q.IQ4_NL: 32, Q.IQ4_XS: 32, Q.MXFP4: 32}
# (rows per program, units per step, warps) per type where no sweep measured the matrix: the
# config that won most often on an H200. `MEASURED` (qdot_configs.py, that sweep) and
# SHARDRT_QDOT_CONFIG (a file from scripts/bench_matvec.py --write-config) name the fastest per matrix.
DEFAULT_CONFIG = {Q.Q8_0: (1, 128, 4), Q.Q6_K: (1, 32, 1), Q.Q2_K: (1, 32, 1), Q.Q3_K: (1, 32, 1)}
DEFAULT_4BIT = (4, 32, 4)  # Q4_0..Q5_1, Q4_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4
CONFIG_ENV = "SHARDRT_QDOT_CONFIG"
# the planes (`quant.split_planes`) the kernel reads as int32 words; the others keep their dtype
WORD_PLANES = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0,), Q.Q5_0: (0,), Q.Q5_1: (0,), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2, 3), Q.Q6_K: (0, 3), Q.Q2_K: (0, 2), Q.Q3_K: (0, 2, 3), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
               Q.MXFP4: (0,)}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1's values, doubled
TABLE_TYPES = (Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4)  # their nibbles name values in a table (`value_table`)


@dataclass(frozen=True)
class QuantizedRows:
    """m activation rows of `cols` values, quantized per block of 32: `words` int32 [m, cols/4]
    (four int8 values each, little end first), `scale` float32 [m, cols/32] (the block's step),
    `sums` float32 [m, cols/16] (scale times the sum of each half block's int8 values)."""

    words: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor

    @property
    def rows(self) -> int:
        return self.words.shape[0]

    def dequantize(self) -> torch.Tensor:
        """float32 [m, cols]: what the integer products multiply with."""
        q = self.words.contiguous().view(torch.int8).float().reshape(self.rows, -1, 32)
        return (q * self.scale[..., None]).reshape(self.rows, -1)


def supported(x: torch.Tensor) -> bool:
    """Whether the integer path runs for activations like x: half precision on a CUDA (not ROCm)
    GPU that runs the Triton kernels (dp4a exists from compute capability 6.1; Triton needs 7.0)."""
    if triton is None or not x.is_cuda or torch.version.hip is not None:
        return False
    return x.dtype in (torch.bfloat16, torch.float16)  # float32 products stay exact: the float kernels


def quantize_rows_reference(x: torch.Tensor) -> QuantizedRows:
    """The torch formulation of `quantize_rows`, with the same float32 roundings."""
    m, cols = x.shape
    blocks = x.float().reshape(m, cols // 32, 32)
    amax = blocks.abs().amax(dim=2)
    # correctly rounded divisions, as the kernel's div_rn (torch divides by a Python number, or
    # divides one into a tensor, through a reciprocal: a second rounding)
    steps = torch.full_like(amax, 127.0)
    scale = amax / steps
    inverse = torch.where(amax > 0, steps / torch.where(amax > 0, amax, steps), 0)
    q = torch.round(blocks * inverse[..., None]).to(torch.int32)  # half to even, as rint
    sums = q.reshape(m, cols // 16, 16).sum(dim=2).float() * scale.repeat_interleave(2, dim=1)
    words = q.to(torch.int8).reshape(m, cols).view(torch.int32)
    return QuantizedRows(words.contiguous(), scale, sums)


def empty_rows(m: int, cols: int, device) -> QuantizedRows:
    """Room for m rows of `cols` values quantized."""
    return QuantizedRows(torch.empty((m, cols // 4), dtype=torch.int32, device=device),
                         torch.empty((m, cols // 32), dtype=torch.float32, device=device),
                         torch.empty((m, cols // 16), dtype=torch.float32, device=device))


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """x [m, cols] (cols a multiple of 32) -> QuantizedRows, in one kernel."""
    m, cols = x.shape
    rows = empty_rows(m, cols, x.device)
    blocks = 16
    _quantize_rows_kernel[(m, triton.cdiv(cols // 32, blocks))](
        x, rows.words, rows.scale, rows.sums, cols // 32, x.stride(0), BLOCKS=blocks, EMULATE=interpreted(),
        num_warps=2)
    return rows


def config(qtype: Q, rows: int, cols: int, m: int = 1) -> tuple[int, int, int]:
    """(rows per program, units per step, warps) for m activation rows: the measured config of this
    matrix for the fewest measured rows >= m (else the most), else the default."""
    measured = measured_configs().get(f"{qtype.name} {rows}x{cols}")
    if not measured:
        block_n, units, warps = DEFAULT_CONFIG.get(qtype, DEFAULT_4BIT)
        while block_n > 1 and rows // block_n < 1024:  # enough programs to fill the GPU
            block_n //= 2
        return block_n, units, warps
    counts = sorted(measured)
    return tuple(measured[next((c for c in counts if c >= m), counts[-1])])


_measured: dict[str, dict[int, tuple]] | None = None


def measured_configs() -> dict[str, dict[int, tuple]]:
    """'TYPE ROWSxCOLS' -> {rows of x: config}: the sweep kept in `qdot_configs`, then the file
    that SHARDRT_QDOT_CONFIG names, which wins."""
    global _measured
    if _measured is None:
        from .qdot_configs import MEASURED

        table = {key: {int(m): tuple(c) for m, c in by_rows.items()} for key, by_rows in MEASURED.items()}
        path = os.environ.get(CONFIG_ENV)
        if path:
            table.update(read_configs(path))
        _measured = table
    return _measured


def read_configs(path: str) -> dict[str, dict[int, tuple]]:
    """A config file: {"TYPE ROWSxCOLS": {"M": [rows per program, units, warps], ...}, ...}."""
    from ..errors import ConfigError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{CONFIG_ENV}: cannot read {path!r} as JSON ({exc})") from None
    table = {}
    for key, by_rows in (doc.items() if isinstance(doc, dict) else [(None, None)]):
        ok = isinstance(by_rows, dict) and all(
            str(m).isdigit() and isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and v > 0 for v in c)
            and all(v & (v - 1) == 0 for v in c) for m, c in by_rows.items())
        if not isinstance(key, str) or not ok:
            raise ConfigError(f"{CONFIG_ENV}: {path!r}: entry {key!r} is not {{\"M\": [rows, units, warps]}} "
                              "with powers of two")
        table[key] = {int(m): tuple(c) for m, c in by_rows.items()}
    return table


def kernel_planes(w) -> tuple[torch.Tensor, ...]:
    """The four plane pointers of `_decode`: the type's word planes as int32, unused ones any valid tensor."""
    return pointers(tuple(p.reshape(p.shape[0], -1).view(torch.int32) if i in WORD_PLANES[w.qtype] else p
                          for i, p in enumerate(w.planes)))


def linear(xq: QuantizedRows, w, out: torch.Tensor, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """xq (m <= MAX_ROWS rows) @ w.T -> out [m, w.rows] (any float dtype, rows may be strided)."""
    m = xq.rows
    block_n, units, warps = block or config(w.qtype, w.rows, w.cols, m)
    _qdot_kernel[(triton.cdiv(w.rows, block_n),)](
        xq.words, xq.scale, xq.sums, out, *kernel_planes(w), value_table(w.qtype, out.device), w.rows,
        xq.words.stride(0), xq.scale.stride(0), xq.sums.stride(0), out.stride(0), K=w.cols, QTYPE=int(w.qtype), M=m,
        UNIT=UNIT[w.qtype], BLOCK_N=block_n, UNITS=units, EMULATE=interpreted(), num_warps=warps)
    return out


def interpreted() -> bool:
    """Triton's interpreter (`TRITON_INTERPRET=1`) runs no PTX: the kernel then emulates dp4a."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_value_tables: dict[tuple, torch.Tensor] = {}


def value_table(qtype: Q, device: torch.device) -> torch.Tensor:
    """The 16 int8 values a nibble of `qtype` names on `device`: MXFP4's (its e2m1 values doubled),
    else IQ4_NL / IQ4_XS's (any other type reads none). The kernels' emulation and the float
    dequantization read it; the PTX path holds the values in registers."""
    values = MXFP4_VALUES if qtype == Q.MXFP4 else IQ4_VALUES
    key = (values, device)
    if key not in _value_tables:
        _value_tables[key] = torch.tensor(values, dtype=torch.int8, device=device)
    return _value_tables[key]


def nibble_table_asm(values) -> str:
    """PTX for `_iq4_values`: a word of eight nibbles -> two words of the four low nibbles' and the
    four high nibbles' int8 values in `values`, by byte permutes (prmt): one over each half of the
    table with the index's low three bits, then a choice between the two by its fourth bit."""
    words = [int.from_bytes(bytes(v & 0xFF for v in values[i : i + 4]), "little") for i in range(0, 16, 4)]
    return ("""{
            .reg .b32 t0, t1, t2, t3, s, a, b, lo01, lo23, sel;
            mov.b32 t0, 0x%08X; mov.b32 t1, 0x%08X; mov.b32 t2, 0x%08X; mov.b32 t3, 0x%08X;
            and.b32 s, $2, 0x7777;
            prmt.b32 a, t0, t1, s; prmt.b32 b, t2, t3, s;
            and.b32 sel, $2, 0x8888; shr.u32 sel, sel, 1; or.b32 sel, sel, 0x3210;
            prmt.b32 lo01, a, b, sel;
            shr.u32 s, $2, 16; and.b32 s, s, 0x7777;
            prmt.b32 a, t0, t1, s; prmt.b32 b, t2, t3, s;
            shr.u32 sel, $2, 16; and.b32 sel, sel, 0x8888; shr.u32 sel, sel, 1; or.b32 sel, sel, 0x3210;
            prmt.b32 lo23, a, b, sel;
            prmt.b32 $0, lo01, lo23, 0x6420;
            prmt.b32 $1, lo01, lo23, 0x7531;
            }""" % tuple(words))


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, words_ptr, scale_ptr, sums_ptr, NB, stride_x, BLOCKS: tl.constexpr,
                              EMULATE: tl.constexpr):
        row = tl.program_id(0)
        b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
        ok = b < NB
        x = tl.load(x_ptr + row * stride_x + b[:, None] * 32 + tl.arange(0, 32)[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        packed, scale, halves = _quantize_blocks(x, BLOCKS, EMULATE)
        _store_blocks(words_ptr, scale_ptr, sums_ptr, row, NB, b, packed, scale, halves)

    @triton.jit
    def _quantize_blocks(x, BLOCKS: tl.constexpr, EMULATE: tl.constexpr):
        """x [BLOCKS, 32] float32 -> (the int8 values packed four to a word [BLOCKS, 8], the step
        [BLOCKS], scale times each half block's sum [BLOCKS, 2]): QuantizedRows's three parts."""
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(amax, 127.0)
        inverse = tl.where(amax > 0, tl.math.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
        # the product rounded to float32, then to the nearest integer, ties to even, as torch.round
        # does (rint: no add after the multiply that the compiler could fuse into one rounding;
        # the interpreter, which has no libdevice and fuses nothing, adds and takes 1.5 * 2^23)
        if EMULATE:
            q = ((x * inverse[:, None] + 12582912.0) - 12582912.0).to(tl.int32)
        else:
            q = tl.extra.cuda.libdevice.rint(x * inverse[:, None]).to(tl.int32)
        halves = tl.sum(tl.reshape(q, (BLOCKS, 2, 16)), axis=2).to(tl.float32) * scale[:, None]
        packed = tl.sum(tl.reshape((q & 0xFF).to(tl.uint32), (BLOCKS, 8, 4)) << (8 * tl.arange(0, 4)).to(tl.uint32)[None, None, :],
                        axis=2).to(tl.int32, bitcast=True)
        return packed, scale, halves

    @triton.jit
    def _store_blocks(words_ptr, scale_ptr, sums_ptr, row, NB, b, packed, scale, halves):
        """Blocks b [BLOCKS] of row `row` (NB blocks a row; those past NB left alone) into
        QuantizedRows's three tensors: _quantize_blocks's parts."""
        whole = b < NB
        tl.store(words_ptr + row * NB * 8 + b[:, None] * 8 + tl.arange(0, 8)[None, :], packed, mask=whole[:, None])
        tl.store(scale_ptr + row * NB + b, scale, mask=whole)
        tl.store(sums_ptr + row * NB * 2 + b[:, None] * 2 + tl.arange(0, 2)[None, :], halves, mask=whole[:, None])

    @triton.jit
    def _byte(a, k: tl.constexpr, SIGNED: tl.constexpr):
        return (a << (24 - 8 * k)) >> 24 if SIGNED else (a >> (8 * k)) & 0xFF

    @triton.jit
    def _dot_u8(a, b, c, EMULATE: tl.constexpr):
        """c + the dot product of a's four unsigned bytes with b's four signed bytes (EMULATE: in
        plain integer operations, for Triton's interpreter, which runs no PTX)."""
        if EMULATE:
            return c + _byte(a, 0, False) * _byte(b, 0, True) + _byte(a, 1, False) * _byte(b, 1, True) \
                + _byte(a, 2, False) * _byte(b, 2, True) + _byte(a, 3, False) * _byte(b, 3, True)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _dot_s8(a, b, c, EMULATE: tl.constexpr):
        """c + the dot product of a's four signed bytes with b's four signed bytes."""
        if EMULATE:
            return c + _byte(a, 0, True) * _byte(b, 0, True) + _byte(a, 1, True) * _byte(b, 1, True) \
                + _byte(a, 2, True) * _byte(b, 2, True) + _byte(a, 3, True) * _byte(b, 3, True)
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)

    IQ4_ASM = tl.constexpr(nibble_table_asm(IQ4_VALUES))
    MXFP4_ASM = tl.constexpr(nibble_table_asm(MXFP4_VALUES))

    @triton.jit
    def _iq4_values(q, table_ptr, EMULATE: tl.constexpr, MXFP4: tl.constexpr):
        """A word of eight nibbles -> (low nibbles' values, high nibbles' values), each four int8
        from the 16-entry table (IQ4's, or MXFP4's): `nibble_table_asm`, or the table's loads."""
        if EMULATE:
            return _table4(q, 0, table_ptr), _table4(q, 4, table_ptr)
        if MXFP4:
            return tl.inline_asm_elementwise(MXFP4_ASM, "=r,=r,r", [q], dtype=(tl.int32, tl.int32), is_pure=True,
                                             pack=1)
        return tl.inline_asm_elementwise(IQ4_ASM, "=r,=r,r", [q], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _e8m0_half(e):
        """float32 2^(e - 128) for MXFP4's exponent byte e (int32 0..255), exactly: half of E8M0's
        2^(e - 127), as the doubled values of `MXFP4_VALUES` want; e < 2 gives the subnormals."""
        return tl.where(e >= 2, (e - 1) << 23, 0x00200000 << tl.minimum(e, 1)).to(tl.float32, bitcast=True)

    @triton.jit
    def _table4(q, shift: tl.constexpr, table_ptr):
        """The int8 table entries of the four nibbles at bit `shift` of q's bytes, packed in a word."""
        out = tl.zeros_like(q)
        for k in tl.static_range(4):
            value = tl.load(table_ptr + ((q >> (8 * k + shift)) & 0xF)).to(tl.int32)
            out |= (value & 0xFF) << (8 * k)
        return out

    @triton.jit
    def _spread_bits(t):
        """Four bits t (0..15) -> bit 4 of each byte of a word, bit i in byte i."""
        return ((t & 0xF) * 0x204081 & 0x01010101) << 4

    @triton.jit
    def _decode(QTYPE: tl.constexpr, p0, p1, p2, p3, table_ptr, r3, u3, w, ok3, r2, u2, ok2, K: tl.constexpr,
                NU: tl.constexpr, EMULATE: tl.constexpr):
        """The weights of units u of rows r: four-word tensors [BLOCK_N, UNITS, 4] of packed small
        integers, each matching four words of activations, and the float factors [BLOCK_N, UNITS]
        of their dot products (see `_row_dot`)."""
        if QTYPE == 8:  # Q8_0: unit = block; qs int8 [r, K] as words, d f16 [r, K/32]
            q = p0 + r3 * (K // 4) + u3 * 8 + w
            d = tl.load(p1 + r2 * NU + u2, mask=ok2, other=0.0).to(tl.float32)
            return tl.load(q, mask=ok3, other=0), tl.load(q + 4, mask=ok3, other=0), d
        elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1: unit = block
            # qs [r, K/2]: byte l holds element l (low nibble) and l + 16 (high nibble)
            q = tl.load(p0 + r3 * (K // 8) + u3 * 4 + w, mask=ok3, other=0)
            lo = q & 0x0F0F0F0F
            hi = (q >> 4) & 0x0F0F0F0F
            if QTYPE == 6 or QTYPE == 7:  # qh int32 [r, K/32]: bit e is element e's fifth bit
                qh = tl.load(p2 + r2 * NU + u2, mask=ok2, other=0)[:, :, None]
                lo |= _spread_bits(qh >> (4 * w))
                hi |= _spread_bits(qh >> (16 + 4 * w))
            if QTYPE == 2 or QTYPE == 6:
                return lo, hi, tl.load(p1 + r2 * NU + u2, mask=ok2, other=0.0).to(tl.float32)
            else:
                dm = p1 + (r2 * NU + u2) * 2  # (d, m) f16 [r, K/32, 2]
                return lo, hi, tl.load(dm, mask=ok2, other=0.0).to(tl.float32), \
                    tl.load(dm + 1, mask=ok2, other=0.0).to(tl.float32)
        elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: unit = sub-blocks 2u (low nibbles), 2u + 1 (high)
            q = p0 + r3 * (K // 8) + u3 * 8 + w  # words a: elements 0..15 of each sub-block, b: 16..31
            q_a = tl.load(q, mask=ok3, other=0)
            q_b = tl.load(q + 4, mask=ok3, other=0)
            lo_a, hi_a = q_a & 0x0F0F0F0F, (q_a >> 4) & 0x0F0F0F0F
            lo_b, hi_b = q_b & 0x0F0F0F0F, (q_b >> 4) & 0x0F0F0F0F
            if QTYPE == 13:  # qh [r, K/8]: bit 2j (+1) of byte l: element l's fifth bit in unit j (its high half)
                qh = p3 + r3 * (K // 32) + (u3 // 4) * 8 + w
                qh_a = tl.load(qh, mask=ok3, other=0)
                qh_b = tl.load(qh + 4, mask=ok3, other=0)
                shift = 2 * (u3 % 4)
                lo_a |= ((qh_a >> shift) & 0x01010101) << 4
                hi_a |= ((qh_a >> (shift + 1)) & 0x01010101) << 4
                lo_b |= ((qh_b >> shift) & 0x01010101) << 4
                hi_b |= ((qh_b >> (shift + 1)) & 0x01010101) << 4
            sm = tl.load(p2 + r2 * (K // 64) + u2, mask=ok2, other=0)  # (scale, min) of 2u, then of 2u + 1
            sb = p1 + (r2 * (K // 256) + u2 // 4) * 2
            d = tl.load(sb, mask=ok2, other=0.0).to(tl.float32)
            dmin = tl.load(sb + 1, mask=ok2, other=0.0).to(tl.float32)
            return lo_a, lo_b, hi_a, hi_b, d * (sm & 0xFF).to(tl.float32), d * ((sm >> 16) & 0xFF).to(tl.float32), \
                dmin * ((sm >> 8) & 0xFF).to(tl.float32), dmin * ((sm >> 24) & 0xFF).to(tl.float32)
        elif QTYPE == 14:  # Q6_K: unit v = 4 groups of 16 of half n = v // 2 of a super-block, h = v % 2
            # ql [r, K/2]: half n's bytes l (0..63); l < 32: element l (low nibble), l + 64 (high);
            # l >= 32: element l (low), l + 64 (high). qh [r, K/4]: byte l (0..31) holds the two
            # high bits of elements l, l + 32, l + 64, l + 96. Group g = 2 * quarter + h.
            n3 = u3 // 2
            h3 = u3 % 2
            ql = p0 + r3 * (K // 8) + n3 * 16 + h3 * 4 + w
            ql_a = tl.load(ql, mask=ok3, other=0)
            ql_b = tl.load(ql + 8, mask=ok3, other=0)
            qh = tl.load(p3 + r3 * (K // 16) + n3 * 8 + h3 * 4 + w, mask=ok3, other=0)
            sc = p2 + r2 * (K // 16) + (u2 // 2) * 8 + u2 % 2  # int8 scale of group 2 * quarter + h
            d = tl.load(p1 + r2 * (K // 256) + u2 // 4, mask=ok2, other=0.0).to(tl.float32)
            return (ql_a & 0x0F0F0F0F) | ((qh & 0x03030303) << 4), \
                (ql_b & 0x0F0F0F0F) | (((qh >> 2) & 0x03030303) << 4), \
                ((ql_a >> 4) & 0x0F0F0F0F) | (((qh >> 4) & 0x03030303) << 4), \
                ((ql_b >> 4) & 0x0F0F0F0F) | (((qh >> 6) & 0x03030303) << 4), \
                d * tl.load(sc, mask=ok2, other=0).to(tl.float32), d * tl.load(sc + 2, mask=ok2, other=0).to(tl.float32), \
                d * tl.load(sc + 4, mask=ok2, other=0).to(tl.float32), d * tl.load(sc + 6, mask=ok2, other=0).to(tl.float32)
        elif QTYPE == 10 or QTYPE == 11:  # Q2_K, Q3_K: unit v = sb * 4 + 2 * half + g, words 4v.. of qs
            # qs [r, K/4]: byte l of a half holds elements 32j + l (j = 0..3, bits 2j) of that half;
            # the unit holds l in 16g..16g + 15. Scales [r, K/16] re-laid: unit v's four (one per j) at 4v.
            q = tl.load(p0 + r3 * (K // 16) + u3 * 4 + w, mask=ok3, other=0)
            sc = tl.load(p2 + r2 * (K // 64) + u2, mask=ok2, other=0)  # four scale bytes, j = 0..3
            sb = r2 * (K // 256) + u2 // 4
            if QTYPE == 10:  # byte: scale (low 4 bits), min (high 4 bits); d, dmin f16 [r, K/256, 2]
                d = tl.load(p1 + sb * 2, mask=ok2, other=0.0).to(tl.float32)
                dmin = tl.load(p1 + sb * 2 + 1, mask=ok2, other=0.0).to(tl.float32)
                return q & 0x03030303, (q >> 2) & 0x03030303, (q >> 4) & 0x03030303, (q >> 6) & 0x03030303, \
                    d * (sc & 0xF).to(tl.float32), d * ((sc >> 8) & 0xF).to(tl.float32), \
                    d * ((sc >> 16) & 0xF).to(tl.float32), d * ((sc >> 24) & 0xF).to(tl.float32), \
                    dmin * ((sc >> 4) & 0xF).to(tl.float32), dmin * ((sc >> 12) & 0xF).to(tl.float32), \
                    dmin * ((sc >> 20) & 0xF).to(tl.float32), dmin * ((sc >> 28) & 0xF).to(tl.float32)
            else:  # Q3_K: hmask [r, K/8]: bit 4 half + j of byte l is element 128 half + 32j + l's third bit;
                # bytes: signed scales (already less 32); values 0..7 less 4; d f16 [r, K/256]
                hm = tl.load(p3 + r3 * (K // 32) + (u3 // 4) * 8 + 4 * (u3 % 2) + w, mask=ok3, other=0) \
                    >> (4 * ((u3 // 2) % 2))
                d = tl.load(p1 + sb, mask=ok2, other=0.0).to(tl.float32)
                return (q & 0x03030303) | ((hm & 0x01010101) << 2), \
                    ((q >> 2) & 0x03030303) | (((hm >> 1) & 0x01010101) << 2), \
                    ((q >> 4) & 0x03030303) | (((hm >> 2) & 0x01010101) << 2), \
                    ((q >> 6) & 0x03030303) | (((hm >> 3) & 0x01010101) << 2), \
                    d * ((sc << 24) >> 24).to(tl.float32), d * ((sc << 16) >> 24).to(tl.float32), \
                    d * ((sc << 8) >> 24).to(tl.float32), d * (sc >> 24).to(tl.float32)
        elif QTYPE == 20 or QTYPE == 39:  # IQ4_NL, MXFP4: unit = block; qs as Q4_0's, values from the
            # type's table; IQ4_NL: d f16 [r, K/32]; MXFP4: its exponent byte [r, K/32]
            lo, hi = _iq4_values(tl.load(p0 + r3 * (K // 8) + u3 * 4 + w, mask=ok3, other=0), table_ptr, EMULATE,
                                 QTYPE == 39)
            if QTYPE == 39:
                return lo, hi, _e8m0_half(tl.load(p1 + r2 * NU + u2, mask=ok2, other=0).to(tl.int32))
            return lo, hi, tl.load(p1 + r2 * NU + u2, mask=ok2, other=0.0).to(tl.float32)
        else:  # IQ4_XS (23): unit = sub-block of 32; qs as Q4_0's; scales int8 [r, K/32] (less 32); d f16 [r, K/256]
            q = tl.load(p0 + r3 * (K // 8) + u3 * 4 + w, mask=ok3, other=0)
            lo, hi = _iq4_values(q, table_ptr, EMULATE, False)
            sc = tl.load(p2 + r2 * NU + u2, mask=ok2, other=0).to(tl.float32)
            return lo, hi, sc * tl.load(p1 + r2 * (K // 256) + u2 // 8, mask=ok2, other=0.0).to(tl.float32)

    @triton.jit
    def _row_dot(QTYPE: tl.constexpr, wt, xw, xd, xs, u3, w, ok3, u2, ok2, EMULATE: tl.constexpr):
        """One activation row's part of units u: wt from `_decode`; xw, xd, xs point at the row's
        words, block scales and half-block sums, broadcast to the weights' shapes (so that the
        loads share the weights' layout)."""
        if QTYPE == 8:
            x = xw + u3 * 8 + w
            dot = tl.sum(_dot_s8(wt[0], tl.load(x, mask=ok3, other=0),
                                 _dot_s8(wt[1], tl.load(x + 4, mask=ok3, other=0), 0, EMULATE), EMULATE), axis=2)
            return wt[2] * tl.load(xd + u2, mask=ok2, other=0.0) * dot.to(tl.float32)
        elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:
            x = xw + u3 * 8 + w
            dot = tl.sum(_dot_u8(wt[0], tl.load(x, mask=ok3, other=0),
                                 _dot_u8(wt[1], tl.load(x + 4, mask=ok3, other=0), 0, EMULATE), EMULATE), axis=2)
            dx = tl.load(xd + u2, mask=ok2, other=0.0)
            sx = tl.load(xs + 2 * u2, mask=ok2, other=0.0) + tl.load(xs + 2 * u2 + 1, mask=ok2, other=0.0)
            if QTYPE == 2 or QTYPE == 6:
                return wt[2] * (dx * dot.to(tl.float32) - (8.0 if QTYPE == 2 else 16.0) * sx)
            else:
                return wt[2] * dx * dot.to(tl.float32) + wt[3] * sx
        elif QTYPE == 12 or QTYPE == 13:
            x = xw + u3 * 16 + w
            dot_lo = tl.sum(_dot_u8(wt[0], tl.load(x, mask=ok3, other=0),
                                    _dot_u8(wt[1], tl.load(x + 4, mask=ok3, other=0), 0, EMULATE), EMULATE), axis=2)
            dot_hi = tl.sum(_dot_u8(wt[2], tl.load(x + 8, mask=ok3, other=0),
                                    _dot_u8(wt[3], tl.load(x + 12, mask=ok3, other=0), 0, EMULATE), EMULATE), axis=2)
            sx = xs + 4 * u2
            return wt[4] * tl.load(xd + 2 * u2, mask=ok2, other=0.0) * dot_lo.to(tl.float32) \
                + wt[5] * tl.load(xd + 2 * u2 + 1, mask=ok2, other=0.0) * dot_hi.to(tl.float32) \
                - wt[6] * (tl.load(sx, mask=ok2, other=0.0) + tl.load(sx + 1, mask=ok2, other=0.0)) \
                - wt[7] * (tl.load(sx + 2, mask=ok2, other=0.0) + tl.load(sx + 3, mask=ok2, other=0.0))
        elif QTYPE == 14:
            x = xw + (u3 // 2) * 32 + (u3 % 2) * 4 + w
            dq = xd + (u2 // 2) * 4  # the activation block of quarter q is n * 4 + q
            sq = xs + (u2 // 2) * 8 + u2 % 2  # its half block: n * 8 + 2q + h
            out = tl.zeros_like(wt[4])
            for quarter in tl.static_range(4):
                dot = tl.sum(_dot_u8(wt[quarter], tl.load(x + 8 * quarter, mask=ok3, other=0), 0, EMULATE), axis=2)
                out += wt[4 + quarter] * (tl.load(dq + quarter, mask=ok2, other=0.0) * dot.to(tl.float32)
                                          - 32 * tl.load(sq + 2 * quarter, mask=ok2, other=0.0))
            return out
        elif QTYPE == 10 or QTYPE == 11:
            # activation word of element 128 half + 32j + 16g + 4w: (v // 4) * 64 + 32 half + 8j + 4g + w
            x = xw + (u3 // 4) * 64 + 32 * ((u3 // 2) % 2) + 4 * (u3 % 2) + w
            blk = (u2 // 4) * 8 + 4 * ((u2 // 2) % 2)  # activation block of j: blk + j; half block: 2 (blk + j) + g
            sx = xs + 2 * blk + u2 % 2
            out = tl.zeros_like(wt[4])
            for j in tl.static_range(4):
                dot = tl.sum(_dot_u8(wt[j], tl.load(x + 8 * j, mask=ok3, other=0), 0, EMULATE), axis=2).to(tl.float32)
                if QTYPE == 10:
                    out += wt[4 + j] * tl.load(xd + blk + j, mask=ok2, other=0.0) * dot \
                        - wt[8 + j] * tl.load(sx + 2 * j, mask=ok2, other=0.0)
                else:
                    out += wt[4 + j] * (tl.load(xd + blk + j, mask=ok2, other=0.0) * dot
                                        - 4 * tl.load(sx + 2 * j, mask=ok2, other=0.0))
            return out
        else:
            x = xw + u3 * 8 + w
            dot = tl.sum(_dot_s8(wt[0], tl.load(x, mask=ok3, other=0),
                                 _dot_s8(wt[1], tl.load(x + 4, mask=ok3, other=0), 0, EMULATE), EMULATE), axis=2)
            return wt[2] * tl.load(xd + u2, mask=ok2, other=0.0) * dot.to(tl.float32)

    @triton.jit
    def _qdot_kernel(xw_ptr, xd_ptr, xs_ptr, out_ptr, p0, p1, p2, p3, table_ptr, N, stride_xw, stride_xd,
                     stride_xs, stride_out, K: tl.constexpr, QTYPE: tl.constexpr, M: tl.constexpr, UNIT: tl.constexpr,
                     BLOCK_N: tl.constexpr, UNITS: tl.constexpr, EMULATE: tl.constexpr):
        """out[m, rows] for m < M (M <= 8): the sum over the K / UNIT units of each row of the integer
        dots of the unit's weights with the activations, times the scales. The weights are decoded
        once per step and multiplied into every row. K is a constant: one compile per width, and
        the strides are known to the compiler."""
        NU: tl.constexpr = K // UNIT
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r2 = rows.to(tl.int64)[:, None]
        r3 = r2[:, :, None]
        z2 = r2 * 0  # activations broadcast over the rows, so their loads take the weights' layout
        z3 = r3 * 0
        w = tl.arange(0, 4)[None, None, :]
        acc0 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc1 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc2 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc3 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc4 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc5 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc6 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        acc7 = tl.zeros((BLOCK_N, UNITS), tl.float32)
        for u0 in range(0, NU, UNITS):
            u2 = (u0 + tl.arange(0, UNITS))[None, :]
            u3 = u2[:, :, None]
            ok2 = (rows < N)[:, None] & (u2 < NU)
            ok3 = ok2[:, :, None] & (w < 4)
            wt = _decode(QTYPE, p0, p1, p2, p3, table_ptr, r3, u3, w, ok3, r2, u2, ok2, K, NU, EMULATE)
            acc0 += _row_dot(QTYPE, wt, xw_ptr + z3, xd_ptr + z2, xs_ptr + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 1:
                acc1 += _row_dot(QTYPE, wt, xw_ptr + stride_xw + z3, xd_ptr + stride_xd + z2, xs_ptr + stride_xs + z2,
                                 u3, w, ok3, u2, ok2, EMULATE)
            if M > 2:
                acc2 += _row_dot(QTYPE, wt, xw_ptr + 2 * stride_xw + z3, xd_ptr + 2 * stride_xd + z2,
                                 xs_ptr + 2 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 3:
                acc3 += _row_dot(QTYPE, wt, xw_ptr + 3 * stride_xw + z3, xd_ptr + 3 * stride_xd + z2,
                                 xs_ptr + 3 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 4:
                acc4 += _row_dot(QTYPE, wt, xw_ptr + 4 * stride_xw + z3, xd_ptr + 4 * stride_xd + z2,
                                 xs_ptr + 4 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 5:
                acc5 += _row_dot(QTYPE, wt, xw_ptr + 5 * stride_xw + z3, xd_ptr + 5 * stride_xd + z2,
                                 xs_ptr + 5 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 6:
                acc6 += _row_dot(QTYPE, wt, xw_ptr + 6 * stride_xw + z3, xd_ptr + 6 * stride_xd + z2,
                                 xs_ptr + 6 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
            if M > 7:
                acc7 += _row_dot(QTYPE, wt, xw_ptr + 7 * stride_xw + z3, xd_ptr + 7 * stride_xd + z2,
                                 xs_ptr + 7 * stride_xs + z2, u3, w, ok3, u2, ok2, EMULATE)
        ok = rows < N
        tl.store(out_ptr + rows, tl.sum(acc0, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 1:
            tl.store(out_ptr + stride_out + rows, tl.sum(acc1, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 2:
            tl.store(out_ptr + 2 * stride_out + rows, tl.sum(acc2, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 3:
            tl.store(out_ptr + 3 * stride_out + rows, tl.sum(acc3, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 4:
            tl.store(out_ptr + 4 * stride_out + rows, tl.sum(acc4, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 5:
            tl.store(out_ptr + 5 * stride_out + rows, tl.sum(acc5, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 6:
            tl.store(out_ptr + 6 * stride_out + rows, tl.sum(acc6, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
        if M > 7:
            tl.store(out_ptr + 7 * stride_out + rows, tl.sum(acc7, axis=1).to(out_ptr.dtype.element_ty), mask=ok)
