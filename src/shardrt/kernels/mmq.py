"""Integer tensor-core products of GGUF blocks with activations quantized per block of 32: the
path for a batch of rows (9 to 64: a batch of decode steps, a speculative verify) on CUDA GPUs.

qdot (qdot.py) multiplies with `dp4a`, one accumulator per activation row: past a few rows its
integer instructions, not the memory, set its pace, and the float tile kernel of `quant` pays
for turning every weight into a float. Here a program takes BLOCK_N weight rows and BLOCK_M
activation rows; for each block of 32 weights it unpacks the block's small integers to int8 in
registers and meets the int8 activations (`qdot.QuantizedRows`) in one int8 tensor-core product,
whose int32 sums are exact. Each block's float epilogue then multiplies in the two scales and
takes off the block's min or offset with the activations' block sums. The result is qdot's:
dequantize(W) @ dequantize(quantize(x)), up to float32 rounding of the scaled sums.

Measured at 16 rows on an H200 (scripts/bench_matvec.py), it beats the float tile kernel where
the K range is long or the rows few (Llama-3 8B's ffn_down: Q4_K 64 vs 87 us, Q6_K 72 vs 98 us;
attn_v 11 vs 18-22 us) and loses on the widest matrices (ffn_gate_up Q4_K: 133 vs 91 us), so
`quant.choose` times both per matrix. Both stay far below the memory's rate (0.5-0.75 TB/s): an
Nsight Compute profile of the gate/up product shows them bound by the L1/shared-memory pipe
(78-86% busy, DRAM 8-13%, 16-21% occupancy), where the tiles are moved into the tensor cores'
operand layout.

Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (one scale per block of 32), Q4_K, Q5_K (a scale and a min
per 32) and Q6_K (a scale per 16: each block of 32 takes two products, the activations' halves
masked). The other types keep the float kernels of `quant`. The weights are read in the plane
layout of `quant.split_planes`. Q4_0..Q5_1 keep a block's two halves in the low and the high
nibbles of 16 bytes: their unpacked tile holds the elements in the order 0, 16, 1, 17, ..., and
the activations are read in that order too, which leaves the products' sums unchanged.
"""

from __future__ import annotations

import functools
import logging

import torch
from gguf import GGMLQuantizationType

from . import qdot
from ._triton import OutOfResources, pointers, tl, triton

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
MMQ_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
MAX_ROWS = 64  # activation rows of one program; more rows take more programs
SUPER_BLOCK_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# A program takes BLOCK_N weight rows (128 by default, as many as its registers hold well): every
# program reads the activations of its K range again, so the more weight rows share them, the
# fewer bytes per weight the caches serve. A matrix of few rows (4096 outputs: 32 programs)
# would leave most SMs idle, so K is split over programs until there are at least two per SM,
# each writing float32 partial sums that a second kernel adds up into `out`. The blocks
# (weight rows per program, warps) are the fastest at 16 rows on an H200 of (64, 4), (128, 4),
# (128, 8), (256, 8) for Llama-3 8B's matrices (scripts/bench_matvec.py); Q6_K's larger blocks
# (210 bytes a super-block, two products a block of 32) take fewer rows.
BLOCKS = {Q.Q6_K: (64, 4)}
DEFAULT_BLOCK = (128, 4)
# The other blocks `quant.choose` times beside a type's own, per matrix and rows bucket: which is
# fastest depends on the matrix (each of (64, 4), (128, 4), (128, 8), (256, 8) won on some Llama-3
# 8B matrix at 16 rows, above). Q6_K's were not swept: its own block's neighbours.
OTHER_BLOCKS = {Q.Q6_K: ((32, 4), (64, 8), (128, 8))}
DEFAULT_OTHER_BLOCKS = ((64, 4), (128, 8), (256, 8))
ALL_OTHER_BLOCKS = tuple(dict.fromkeys(DEFAULT_OTHER_BLOCKS + sum(OTHER_BLOCKS.values(), ())))
PROGRAMS_PER_SM = 2
SUM_BLOCK = 1024  # outputs of one program of the partial sums' kernel


def supported(qtype: Q, x: torch.Tensor) -> bool:
    """Whether the integer tensor-core path runs for blocks of `qtype` and activations like x."""
    return qtype in MMQ_TYPES and qdot.supported(x)


def other_blocks(qtype: Q) -> tuple[tuple[int, int], ...]:
    """The blocks (weight rows per program, warps) besides the type's own worth timing for it."""
    return OTHER_BLOCKS.get(qtype, DEFAULT_OTHER_BLOCKS)


def block_m(m: int) -> int:
    """Activation rows per program for m rows: a tensor-core tile is 16 rows at least."""
    return max(16, min(MAX_ROWS, triton.next_power_of_2(m)))


def step(qtype: Q, cols: int) -> int:
    """Elements of a weight row one loop step covers: a super-block, else up to 8 blocks."""
    if qtype in SUPER_BLOCK_TYPES:
        return 256
    return next(s for s in (256, 128, 64, 32) if cols % s == 0)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's SMs (4 for the CPU that Triton's interpreter runs on, in the tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def splits(programs: int, steps: int, device: torch.device) -> int:
    """How many programs share each row's K range (a power of two, each at least one step): the
    fewest that give PROGRAMS_PER_SM programs per SM."""
    count = 1
    while programs * count < PROGRAMS_PER_SM * multiprocessors(device) and 2 * count <= steps:
        count *= 2
    return count


def linear(xq: qdot.QuantizedRows, w, out: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """xq (any number of rows) @ w.T -> out [m, w.rows] (any float dtype, rows may be strided);
    `block`: (weight rows per program, warps), else the type's in BLOCKS; fewer activation rows
    per program than wanted where the GPU's shared memory is too small for them (`fit_rows`)."""
    block_n, warps = block or BLOCKS.get(w.qtype, DEFAULT_BLOCK)
    key = (w.qtype, w.cols, block_n, warps, out.device)
    return fit_rows(key, block_m(xq.rows), lambda bm: _launch(xq, w, out, bm, block_n, warps))


_rows_that_fit: dict[tuple, int] = {}  # (kernel's key, wanted rows per program) -> rows that built


def fit_rows(key: tuple, wanted: int, build, smallest: int = 16):
    """build(rows per program) -> its result, with `wanted` rows, else (on a GPU whose SMs have too
    little shared memory for that many: Q8_0's 256x8 block at 64 rows needs 240 KiB, an H100 has
    227, a GeForce RTX 30 or 40 card 99) half as many, and so on down to `smallest`; the rows that
    built are kept for the next call with the same key (the kernel, its GPU) and wanted rows."""
    rows = _rows_that_fit.get((key, wanted), wanted)
    while True:
        try:
            result = build(rows)
        except OutOfResources:  # raised while loading the kernel, before anything runs
            if rows <= smallest:
                raise
            log.info("mmq %s: %d activation rows per program need more shared memory than the GPU has; "
                     "taking %d", key, rows, rows // 2)
            rows //= 2
            continue
        _rows_that_fit[key, wanted] = rows
        return result


def _launch(xq: qdot.QuantizedRows, w, out: torch.Tensor, bm: int, block_n: int, warps: int) -> torch.Tensor:
    m = xq.rows
    width = step(w.qtype, w.cols)
    steps = w.cols // width
    tiles = (triton.cdiv(w.rows, block_n), triton.cdiv(m, bm))
    parts = splits(tiles[0] * tiles[1], steps, out.device)
    per_part = triton.cdiv(steps, parts)
    parts = triton.cdiv(steps, per_part)
    x8 = xq.words.view(torch.int8)
    planes = pointers(w.planes)
    target = out if parts == 1 else torch.empty((parts, m, w.rows), dtype=torch.float32, device=out.device)
    _mmq_kernel[(tiles[0], parts, tiles[1])](
        x8, xq.scale, xq.sums, target, *planes, x8, x8, x8, m, w.rows, x8.stride(0), xq.scale.stride(0),
        xq.sums.stride(0), target.stride(-2), m * w.rows if parts > 1 else 0, per_part * width, K=w.cols,
        QTYPE=int(w.qtype), STEP=width, BLOCK_M=bm, BLOCK_N=block_n, GROUPED=False, num_warps=warps)
    if parts > 1:
        _sum_parts_kernel[(m, triton.cdiv(w.rows, SUM_BLOCK))](target, out, w.rows, out.stride(0), m * w.rows,
                                                                 PARTS=parts, BLOCK=SUM_BLOCK, num_warps=4)
    return out


def grouped_linear(xq: qdot.QuantizedRows, experts, tiles, out: torch.Tensor,
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """A mixture of experts' products in one launch: row p of out [tiles.capacity, experts.rows]
    is activation row tiles.src[p] of xq times the matrix of the expert of p's tile (`moe_mmq.Tiles`:
    each tile's rows are one expert's slots), a row of zeros for padding; rows of tiles past the
    count in use are left as they were. `experts`: a `QuantizedExperts` (kernels.experts)."""
    w = experts.stacked
    bm = tiles.block_m
    block_n, warps = block or BLOCKS.get(w.qtype, DEFAULT_BLOCK)
    width = step(w.qtype, w.cols)
    x8 = xq.words.view(torch.int8)
    planes = pointers(w.planes)
    grid = (triton.cdiv(experts.rows, block_n), 1, tiles.capacity // bm)
    _mmq_kernel[grid](
        x8, xq.scale, xq.sums, out, *planes, tiles.src, tiles.tile_expert, tiles.count, tiles.capacity,
        experts.rows, x8.stride(0), xq.scale.stride(0), xq.sums.stride(0), out.stride(0), 0, w.cols, K=w.cols,
        QTYPE=int(w.qtype), STEP=width, BLOCK_M=bm, BLOCK_N=block_n, GROUPED=True, num_warps=warps)
    return out


if triton is not None:
    @triton.jit
    def _dot(x_ptr, stride_x, m, m_ok, e, w):
        """int32 [BLOCK_M, BLOCK_N]: the int8 activations of rows m at elements e ([32]) times the
        int8 weights w [BLOCK_N, 32], summed over the 32."""
        x = tl.load(x_ptr + m[:, None] * stride_x + e[None, :], mask=m_ok[:, None], other=0)
        return tl.dot(x, tl.trans(w), out_dtype=tl.int32)

    @triton.jit
    def _half_dots(x_ptr, stride_x, m, m_ok, e, w):
        """Like `_dot`, one sum per half of the 32 (Q6_K's scales cover 16 elements)."""
        x = tl.load(x_ptr + m[:, None] * stride_x + e[None, :], mask=m_ok[:, None], other=0)
        low = (tl.arange(0, 32) < 16)[None, :]
        return tl.dot(tl.where(low, x, 0).to(tl.int8), tl.trans(w), out_dtype=tl.int32), \
            tl.dot(tl.where(low, 0, x).to(tl.int8), tl.trans(w), out_dtype=tl.int32)

    @triton.jit
    def _block_sum(xs_ptr, stride_xs, m, m_ok, b):
        """float32 [BLOCK_M]: the scale times the sum of the int8 activations of block b."""
        at = xs_ptr + m * stride_xs + 2 * b
        return tl.load(at, mask=m_ok, other=0.0) + tl.load(at + 1, mask=m_ok, other=0.0)

    @triton.jit
    def _sum_parts_kernel(parts_ptr, out_ptr, N, stride_out, stride_part, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """out[m, n] = the sum of the PARTS float32 partial sums [PARTS, M, N], in out's dtype."""
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        total = tl.zeros((BLOCK,), tl.float32)
        for part in tl.static_range(PARTS):
            total += tl.load(parts_ptr + part * stride_part + m * N + n, mask=ok, other=0.0)
        tl.store(out_ptr + m * stride_out + n, total.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _mmq_kernel(x_ptr, xd_ptr, xs_ptr, out_ptr, p0, p1, p2, p3, src_ptr, tile_expert_ptr, tiles_ptr, M, N,
                    stride_x, stride_xd, stride_xs, stride_out, stride_part, PART_K, K: tl.constexpr,
                    QTYPE: tl.constexpr, STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPED: tl.constexpr):
        """out[m, n] for the program's tile (of part program_id(1) of K, PART_K elements: out then
        holds that part's partial sums, at stride_part): the sum over the blocks of each weight
        row of the block's int8 product with the activations, scaled (see the module's docstring).
        GROUPED: the tile's rows are slots of one expert (`tile_expert_ptr`), each reading the
        activation row `src_ptr` names (-1: padding, a row of zeros), and N is one expert's rows;
        tiles past the count at `tiles_ptr` do nothing."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_start = tl.program_id(1) * PART_K
        out_ptr += tl.program_id(1) * stride_part
        n_ok = n < N
        m_ok = m < M
        r = n.to(tl.int64)
        store_m = m
        if GROUPED:
            if tl.program_id(2) >= tl.load(tiles_ptr):
                return
            r += tl.load(tile_expert_ptr + tl.program_id(2)).to(tl.int64) * N
            src = tl.load(src_ptr + m, mask=m_ok, other=-1)
            m_ok = src >= 0
            m = tl.where(m_ok, src, 0)
        r2 = r[:, None]
        ok2 = n_ok[:, None]
        i = tl.arange(0, 32)
        i16 = tl.arange(0, 16)[None, :]
        # Q4_0..Q5_1: position p of the unpacked tile holds element p // 2 + 16 (p % 2) of the block
        paired = i // 2 + 16 * (i % 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + PART_K, K), STEP):
            if QTYPE == 8:  # Q8_0: qs int8 [r, K], d f16 [r, K/32]
                for j in tl.static_range(STEP // 32):
                    b = k0 // 32 + j
                    w = tl.load(p0 + r2 * K + b * 32 + i[None, :], mask=ok2, other=0)
                    wd = tl.load(p1 + r * (K // 32) + b, mask=n_ok, other=0.0).to(tl.float32)
                    xd = tl.load(xd_ptr + m * stride_xd + b, mask=m_ok, other=0.0)
                    dot = _dot(x_ptr, stride_x, m, m_ok, b * 32 + i, w)
                    acc += dot.to(tl.float32) * xd[:, None] * wd[None, :]
            elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:
                # Q4_0, Q4_1, Q5_0, Q5_1: qs [r, K/2] (16 bytes a block: elements l, l + 16 in the
                # low, high nibble of byte l); Q4_0/Q5_0: d f16 [r, K/32]; Q4_1/Q5_1: d, m f16
                # [r, K/32, 2]; Q5_0/Q5_1: the fifth bits int32 [r, K/32] (bit e: element e)
                for j in tl.static_range(STEP // 32):
                    b = k0 // 32 + j
                    qs = tl.load(p0 + r2 * (K // 2) + b * 16 + i16, mask=ok2, other=0)
                    q = tl.reshape(tl.join(qs & 0xF, qs >> 4), (BLOCK_N, 32))
                    if QTYPE == 6 or QTYPE == 7:
                        qh = tl.load(p2 + r * (K // 32) + b, mask=n_ok, other=0)
                        q = q | (((qh[:, None] >> paired[None, :]) & 1) << 4).to(tl.uint8)
                    xd = tl.load(xd_ptr + m * stride_xd + b, mask=m_ok, other=0.0)
                    if QTYPE == 2 or QTYPE == 6:  # d (q - 8), d (q - 16)
                        w = (q.to(tl.int16) - (8 if QTYPE == 2 else 16)).to(tl.int8)
                        wd = tl.load(p1 + r * (K // 32) + b, mask=n_ok, other=0.0).to(tl.float32)
                        dot = _dot(x_ptr, stride_x, m, m_ok, b * 32 + paired, w)
                        acc += dot.to(tl.float32) * xd[:, None] * wd[None, :]
                    else:  # d q + m
                        wd = tl.load(p1 + (r * (K // 32) + b) * 2, mask=n_ok, other=0.0).to(tl.float32)
                        wm = tl.load(p1 + (r * (K // 32) + b) * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
                        dot = _dot(x_ptr, stride_x, m, m_ok, b * 32 + paired, q.to(tl.int8))
                        sx = _block_sum(xs_ptr, stride_xs, m, m_ok, b)
                        acc += dot.to(tl.float32) * xd[:, None] * wd[None, :] + sx[:, None] * wm[None, :]
            elif QTYPE == 12 or QTYPE == 13:
                # Q4_K, Q5_K: qs [r, K/2] (128 bytes a super-block: byte 32g + l holds element
                # 64g + l of sub-block 2g in its low nibble, 64g + 32 + l in its high); d, dmin f16
                # [r, K/256, 2]; scale, min bytes [r, K/32, 2]; Q5_K: qh [r, K/8] (bit 2g + h of
                # byte l: the fifth bit of element l of sub-block 2g + h)
                sb = k0 // 256
                d = tl.load(p1 + (r * (K // 256) + sb) * 2, mask=n_ok, other=0.0).to(tl.float32)
                dmin = tl.load(p1 + (r * (K // 256) + sb) * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
                if QTYPE == 13:
                    qh = tl.load(p3 + r2 * (K // 8) + sb * 32 + i[None, :], mask=ok2, other=0)
                for g in tl.static_range(4):
                    qs = tl.load(p0 + r2 * (K // 2) + sb * 128 + g * 32 + i[None, :], mask=ok2, other=0)
                    for h in tl.static_range(2):
                        q = (qs >> (4 * h)) & 0xF
                        if QTYPE == 13:
                            q = q | (((qh >> (2 * g + h)) & 1) << 4)
                        b = sb * 8 + 2 * g + h
                        sc = tl.load(p2 + (r * (K // 32) + b) * 2, mask=n_ok, other=0).to(tl.float32)
                        mn = tl.load(p2 + (r * (K // 32) + b) * 2 + 1, mask=n_ok, other=0).to(tl.float32)
                        xd = tl.load(xd_ptr + m * stride_xd + b, mask=m_ok, other=0.0)
                        dot = _dot(x_ptr, stride_x, m, m_ok, b * 32 + i, q.to(tl.int8))
                        sx = _block_sum(xs_ptr, stride_xs, m, m_ok, b)
                        acc += dot.to(tl.float32) * xd[:, None] * (d * sc)[None, :] - sx[:, None] * (dmin * mn)[None, :]
            else:
                # Q6_K: ql [r, K/2] (half n of a super-block: bytes 64n + l and 64n + 32 + l),
                # d f16 [r, K/256], scales int8 [r, K/16], qh [r, K/4] (bits 2q of byte 32n + l:
                # the top two bits of quarter q); quarter q of half n: elements 128n + 32q + l,
                # its value (low nibble of byte a (q = 0), b (1), high of a (2), b (3)) | top << 4, less 32
                sb = k0 // 256
                d = tl.load(p1 + r * (K // 256) + sb, mask=n_ok, other=0.0).to(tl.float32)
                for half in tl.static_range(2):
                    ql_a = tl.load(p0 + r2 * (K // 2) + sb * 128 + half * 64 + i[None, :], mask=ok2, other=0)
                    ql_b = tl.load(p0 + r2 * (K // 2) + sb * 128 + half * 64 + 32 + i[None, :], mask=ok2, other=0)
                    qh = tl.load(p3 + r2 * (K // 4) + sb * 64 + half * 32 + i[None, :], mask=ok2, other=0)
                    for quarter in tl.static_range(4):
                        ql = ql_a if quarter % 2 == 0 else ql_b
                        low = (ql >> (4 * (quarter // 2))) & 0xF
                        w = ((low | (((qh >> (2 * quarter)) & 3) << 4)).to(tl.int16) - 32).to(tl.int8)
                        b = sb * 8 + half * 4 + quarter
                        sc = p2 + r * (K // 16) + 2 * b
                        sc0 = tl.load(sc, mask=n_ok, other=0).to(tl.int32)
                        sc1 = tl.load(sc + 1, mask=n_ok, other=0).to(tl.int32)
                        xd = tl.load(xd_ptr + m * stride_xd + b, mask=m_ok, other=0.0)
                        dot0, dot1 = _half_dots(x_ptr, stride_x, m, m_ok, b * 32 + i, w)
                        dot = dot0 * sc0[None, :] + dot1 * sc1[None, :]
                        acc += dot.to(tl.float32) * xd[:, None] * d[None, :]
        tl.store(out_ptr + store_m[:, None] * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(store_m < M)[:, None] & n_ok[None, :])
