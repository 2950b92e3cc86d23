"""Quantized weights kept in their GGUF blocks (shardrt.kernels.quant), against the `gguf`
package's own dequantization: the planes the loader splits a tensor into, and every op that
reads them (the products `linear` chooses among, the embedding rows, the whole matrix), over odd
shapes and random blocks with extreme scales. On the CPU the ops run their torch reference; on a
GPU the Triton kernels (run these through the device; tests/test_qdot.py has the integer path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from shardrt import kernels
from shardrt.kernels import quant
from shardrt.kernels.quant import F16_FIELDS, KERNEL_TYPES, Q

from .triton_interpreter import interpret

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCALES = {"small": 1e-3, "subnormal": 3e-7, "large": 6e4, "zero": 0.0}


def random_blocks(qtype: Q, rows: int, cols: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with every f16 field set to `scale` times a random sign and magnitude in [0.5, 1]."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, block_bytes)
    for at in F16_FIELDS.get(qtype, ()):
        values = scale * rng.uniform(0.5, 1.0, size=blocks.shape[:2]) * rng.choice((-1, 1), size=blocks.shape[:2])
        blocks[..., at : at + 2] = np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(*blocks.shape[:2], 2)
    if qtype == Q.IQ1_M:  # its f16 scale: the top nibbles of its four scale words, lowest first
        d = (scale * rng.uniform(0.5, 1.0, size=blocks.shape[:2]) * rng.choice((-1, 1), size=blocks.shape[:2]))
        bits = d.astype(np.float16).view(np.uint16)
        words = blocks[..., 48:56].copy().view(np.uint16)
        for i in range(4):
            words[..., i] = (words[..., i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        blocks[..., 48:56] = words.view(np.uint8)
    if qtype == Q.MXFP4:  # the exponent byte: a scale of 2^(e - 128) near `scale`, within 2^-3..2^3 of it
        e = 128 + np.clip(np.round(np.log2(max(scale, 2.0**-126))), -127, 126) + rng.integers(-3, 4, size=blocks.shape[:2])
        blocks[..., 0] = np.clip(e, 0, 255).astype(np.uint8)
        if scale == 0:  # no zero scale in E8M0: zero weights are nibbles of value 0
            blocks[..., 1:] = 0
    return raw


def gguf_dequantized(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, qtype).reshape(rows, cols).astype(np.float64))


def cols_for(qtype: Q) -> int:
    return 768 if qtype in quant.SUPER_BLOCK_TYPES else 96 * 3  # 3 super-blocks; 9 blocks of 32


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_planes_hold_what_gguf_dequantizes(qtype, scale):
    rng = np.random.default_rng(7)
    rows, cols = 17, cols_for(qtype)
    raw = random_blocks(qtype, rows, cols, SCALES[scale], rng)
    weight = quant.quantized_weight(raw, qtype, cols, torch.device("cpu"))
    assert weight.shape == (rows, cols)
    assert weight.nbytes == quant.device_bytes(qtype, rows, cols) <= 1.04 * raw.nbytes  # Q3_K: 114 bytes for 110
    want = gguf_dequantized(raw, qtype, rows, cols)
    got = quant.dequantize_reference(weight).double()
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got - want).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 16, 17, 512])
def test_linear_equals_the_dequantized_matrix_product(device, qtype, n):
    rng = np.random.default_rng(n)
    rows, cols = 33, cols_for(qtype)  # rows: not a multiple of any tile
    raw = random_blocks(qtype, rows, cols, 1e-2, rng)
    want_w = gguf_dequantized(raw, qtype, rows, cols)
    weight = quant.quantized_weight(raw, qtype, cols, torch.device(device))
    x = torch.from_numpy(rng.standard_normal((n, cols)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(rows).astype(np.float32))
    want = x.double() @ want_w.T + bias.double()
    for dtype, tolerance in [(torch.float32, 1e-5)] + ([(torch.bfloat16, 2e-2)] if device == "cuda" else []):
        got = kernels.linear(x.to(device, dtype), weight, bias.to(device, dtype))
        assert got.shape == (n, rows) and got.dtype == dtype
        error = ((got.double().cpu() - want).norm() / want.norm()).item()
        assert error < tolerance, (dtype, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-row kernels run on a GPU")
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_both_one_row_gpu_kernels_equal_the_dequantized_product(qtype, scale):
    # `linear` picks one of the two for a single row by timing them (the matvec kernel where it
    # has a configuration for the type); both must be right
    rng = np.random.default_rng(11)
    rows, cols = 1000, 4 * cols_for(qtype)  # rows: no multiple of a program's rows
    raw = random_blocks(qtype, rows, cols, SCALES[scale], rng)
    want_w = gguf_dequantized(raw, qtype, rows, cols)
    weight = quant.quantized_weight(raw, qtype, cols, torch.device("cuda"))
    x = torch.from_numpy(rng.standard_normal((1, cols)).astype(np.float32))
    want = x.double() @ want_w.T
    for kernel in (quant._matvec, quant._fused_linear) if qtype in quant.MATVEC_CONFIG else (quant._fused_linear,):
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            got = kernel(x.to("cuda", dtype), weight, None).double().cpu()
            error = ((got - want).norm() / want.norm()).item() if want.norm() > 0 else got.abs().max().item()
            assert error < tolerance, (kernel.__name__, dtype, error)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_embedding_and_dequantize_give_the_rows(device, qtype):
    rng = np.random.default_rng(3)
    rows, cols = 40, cols_for(qtype)
    raw = random_blocks(qtype, rows, cols, 5.0, rng)
    want = gguf_dequantized(raw, qtype, rows, cols)
    weight = quant.quantized_weight(raw, qtype, cols, torch.device(device))
    ids = torch.tensor([39, 0, 7, 7, 21])
    got = kernels.embedding(ids.to(device), weight, torch.float32)
    assert torch.allclose(got.double().cpu(), want[ids], rtol=1e-6, atol=0)
    whole = quant.dequantize(weight, torch.float32, scratch=True)
    assert torch.allclose(whole.double().cpu(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_parts_of_different_types_fill_their_own_columns(device):
    """q/k/v of a Q4_K_M file: Q4_K, Q4_K and Q6_K (and here a dense part too), one output."""
    rng = np.random.default_rng(11)
    cols, types, sizes = 512, (Q.Q4_K, Q.Q6_K), (24, 8)
    raws = [random_blocks(t, r, cols, 1e-2, rng) for t, r in zip(types, sizes)]
    dense = torch.from_numpy(rng.standard_normal((5, cols)).astype(np.float32))
    parts = tuple(quant.quantized_weight(raw, t, cols, torch.device(device)) for raw, t in zip(raws, types))
    weight = parts + (dense.to(device),)
    whole = torch.cat([gguf_dequantized(raw, t, r, cols) for raw, t, r in zip(raws, types, sizes)] + [dense.double()])
    x = torch.from_numpy(rng.standard_normal((3, cols)).astype(np.float32))
    got = kernels.linear(x.to(device), weight, torch.ones(37, device=device))
    want = x.double() @ whole.T + 1
    assert got.shape == (3, 37) and torch.allclose(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
    assert kernels.weight_bytes(weight) == sum(p.nbytes for p in parts) + dense.numel() * 4


def test_stacking_one_type_concatenates_rows():
    rng = np.random.default_rng(5)
    raws = [random_blocks(Q.Q4_K, r, 256, 1e-2, rng) for r in (4, 2, 2)]
    stacked = quant.stack([quant.quantized_weight(raw, Q.Q4_K, 256, torch.device("cpu")) for raw in raws])
    assert stacked.shape == (8, 256)
    want = torch.cat([gguf_dequantized(raw, Q.Q4_K, raw.shape[0], 256) for raw in raws])
    assert torch.allclose(quant.dequantize_reference(stacked).double(), want, rtol=1e-6, atol=0)


def test_matrices_of_a_type_without_a_kernel_load_dense_and_are_counted(tmp_path):
    """A ternary (TQ1_0/TQ2_0) matrix beside K-quant blocks: dequantized (the stage says so once), the rest kept."""
    from shardrt.gguf_file import GGUFFile
    from shardrt.gguf_loader import LayerSpan, StageWeights
    from shardrt.model import ModelConfig

    from .synthetic import write_model

    path = write_model(tmp_path / "mixed.gguf", n_layers=2, dim=256, ffn_dim=512, qtype="Q4_K",
                       tensor_types={"blk.0.attn_v.weight": Q.TQ1_0, "blk.1.ffn_down.weight": Q.TQ2_0})
    meta = torch.device("meta")  # shapes and types as a GPU stage holds them, no GPU needed
    with GGUFFile(path) as gguf:
        weights = StageWeights(gguf, ModelConfig.from_gguf(gguf), LayerSpan.of(0, 2, 2), quantized=True)
        first, second = (weights.load_block(i, meta, torch.bfloat16) for i in range(2))
    qk, v = first["attn_qkv"]  # q and k stay Q4_K blocks, stacked into one; v is dense
    assert isinstance(qk, quant.QuantizedWeight) and qk.qtype == Q.Q4_K and isinstance(v, torch.Tensor)
    assert qk.rows == first["attn_output"].rows + v.shape[0]  # q's rows (as many as the output's) and k's (as v's)
    assert isinstance(second["ffn_down"], torch.Tensor) and second["ffn_down"].dtype == torch.bfloat16
    assert isinstance(second["ffn_gate_up"], quant.QuantizedWeight)
    assert weights.without_kernel == {"TQ1_0": 1, "TQ2_0": 1}


def test_iquant_matrices_stay_in_blocks_at_their_planned_bytes(tmp_path):
    """IQ2_XXS and IQ3_S matrices beside K-quant blocks: kept as blocks, at the bytes the memory plan counts."""
    from shardrt.gguf_file import GGUFFile
    from shardrt.gguf_loader import LayerSpan, StageWeights
    from shardrt.model import ModelConfig

    from .synthetic import write_model

    path = write_model(tmp_path / "iq.gguf", n_layers=2, dim=256, ffn_dim=512, qtype="Q4_K",
                       tensor_types={"blk.0.attn_v.weight": Q.IQ2_XXS, "blk.1.ffn_down.weight": Q.IQ3_S})
    meta = torch.device("meta")
    with GGUFFile(path) as gguf:
        weights = StageWeights(gguf, ModelConfig.from_gguf(gguf), LayerSpan.of(0, 2, 2), quantized=True)
        first, second = (weights.load_block(i, meta, torch.bfloat16) for i in range(2))
        v_info, down_info = (gguf.tensors[n] for n in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight"))
    qk, v = first["attn_qkv"]
    assert (qk.qtype, v.qtype, second["ffn_down"].qtype) == (Q.Q4_K, Q.IQ2_XXS, Q.IQ3_S) and not weights.without_kernel
    assert v.nbytes == quant.device_bytes(Q.IQ2_XXS, v.rows, v.cols) == v_info.n_bytes
    down = second["ffn_down"]
    assert down.nbytes == quant.device_bytes(Q.IQ3_S, down.rows, down.cols) == down_info.n_bytes * 114 // 110


def check_float_kernels(types) -> dict:
    """Per type: the largest relative error of the float kernels' source (the tile product, the
    whole matrix and some rows dequantized) against gguf's dequantization in float64."""
    worst = {}
    for qtype in types:
        rng = np.random.default_rng(int(qtype))
        rows, cols = 33, cols_for(qtype)
        raw = random_blocks(qtype, rows, cols, 1e-2, rng)
        want_w = gguf_dequantized(raw, qtype, rows, cols)
        weight = quant.quantized_weight(raw, qtype, cols, torch.device("cpu"))
        x = torch.from_numpy(rng.standard_normal((5, cols)).astype(np.float32))
        want = x.double() @ want_w.T
        product = quant._fused_linear(x, weight, None).double()
        ids = torch.tensor([32, 0, 7, 7])
        rows_got = quant.embedding(ids, weight, torch.float32).double()
        whole = quant.dequantize(weight, torch.float32).double()
        worst[qtype.name] = max(((product - want).norm() / want.norm()).item(),
                                ((rows_got - want_w[ids]).norm() / want_w[ids].norm()).item(),
                                ((whole - want_w).norm() / want_w.norm()).item())
    return worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_float_kernels_source_under_the_interpreter():
    worst = interpret("import json; from tests.test_quant import check_float_kernels; "
                      "from shardrt.kernels.quant import KERNEL_TYPES; "
                      "print(json.dumps(check_float_kernels(KERNEL_TYPES)))")
    assert set(worst) == {t.name for t in KERNEL_TYPES}
    assert all(error < 1e-5 for error in worst.values()), worst
