"""The int8 tensor-core path for batches of rows (shardrt.kernels.mmq), against
dequantize(W) @ dequantize(quantize(x)) computed in float64 from the `gguf` package's own
dequantization: under Triton's interpreter on the CPU (its int8 products in numpy) and, on a
GPU, as built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardrt.kernels import mmq, qdot, quant
from shardrt.kernels._triton import OutOfResources, pointers

from .test_qdot import worst_errors
from .test_quant import random_blocks
from .triton_interpreter import interpret
from .triton_targets import HAVE_PTXAS, SHARED_LIMIT, builds_within, shared_bytes

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def check_types(device: str, types, rows: int, cols: int, counts, config=None) -> dict:
    """worst_errors (test_qdot) of mmq.linear with `config`'s block."""
    return worst_errors(device, types, rows, cols, counts, lambda xq, w, out: mmq.linear(xq, w, out, config))


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_kernel_source_under_the_interpreter():
    # rows 40: no multiple of a program's 32 rows; cols 768: three super-blocks (and three steps
    # of 8 blocks); 3 rows (one tile, mostly padding), 17 (past one 16-row tile) and 70 (two
    # programs down the rows); scales from subnormal to 6e4 and zero. Against the CPU's stand-in of
    # 4 SMs (two programs each wanted) so few programs that K is split in two (parts of 2 and 1
    # steps); then 130 rows in programs of 16: enough programs that K is not split
    worst = interpret("import json; from tests.test_mmq import check_types; "
                      "from shardrt.kernels.mmq import MMQ_TYPES, Q; "
                      "print(json.dumps([check_types('cpu', MMQ_TYPES, 40, 768, (3, 17, 70), (32, 4)), "
                      "check_types('cpu', (Q.Q4_K, Q.Q6_K, Q.Q4_0), 130, 768, (17,), (16, 1))]))")
    assert set(worst[0]) == {t.name for t in mmq.MMQ_TYPES} and len(worst[1]) == 3
    assert all(error < 1e-5 for errors in worst for error in errors.values()), worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_blocks_of_32_take_steps_of_fewer_blocks_where_the_row_is_short():
    # 96 columns: three blocks of 32, so a step of one block
    assert mmq.step(quant.Q.Q8_0, 96) == 32 and mmq.step(quant.Q.Q8_0, 4096) == 256
    worst = interpret("import json; from tests.test_mmq import check_types; from shardrt.kernels.quant import Q; "
                      "print(json.dumps(check_types('cpu', (Q.Q8_0, Q.Q4_1, Q.Q5_0), 16, 96, (20,), (16, 4))))")
    assert all(error < 1e-5 for error in worst.values()), worst


def test_the_path_is_offered_for_batches_of_rows_on_cuda_only():
    weight = quant.quantized_weight(random_blocks(quant.Q.Q4_K, 8, 256, 1e-2, np.random.default_rng(0)),
                                    quant.Q.Q4_K, 256, torch.device("cpu"))
    assert "mmq" not in quant.candidates(weight, 16, torch.zeros(16, 256, dtype=torch.bfloat16))  # a CPU tensor
    assert mmq.block_m(3) == 16 and mmq.block_m(33) == 64 and mmq.block_m(200) == 64
    # K split over programs until a GPU of 4 SMs (the CPU's stand-in) has two each, a step each at least
    cpu = torch.device("cpu")
    assert mmq.splits(8, 16, cpu) == 1 and mmq.splits(3, 16, cpu) == 4 and mmq.splits(1, 3, cpu) == 2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [None, (32, 2), (256, 8)])
def test_the_kernel_on_the_gpu_with_its_tensor_cores(config):
    worst = check_types("cuda", mmq.MMQ_TYPES, 1000, 4 * 768, (2, 9, 16, 33, 64, 100), config)
    assert all(error < 1e-5 for error in worst.values()), worst


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_linear_offers_it_for_batches_and_it_is_captured_in_a_graph():
    rng = np.random.default_rng(5)
    raw = random_blocks(quant.Q.Q4_K, 512, 1024, 1e-2, rng)
    weight = quant.quantized_weight(raw, quant.Q.Q4_K, 1024, torch.device("cuda"))
    x = torch.randn(24, 1024, device="cuda", dtype=torch.bfloat16)
    assert "mmq" in quant.candidates(weight, 24, x) and "mmq" not in quant.candidates(weight, 1, x)
    out = torch.empty(24, 512, device="cuda", dtype=torch.bfloat16)
    quant.PRODUCTS["mmq"](x, weight, out)
    graph = torch.cuda.CUDAGraph()
    captured = torch.empty_like(out)
    with torch.cuda.graph(graph):
        quant.PRODUCTS["mmq"](x, weight, captured)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


def mmq_shared(arch: int, qtype, block, cols: int, grouped: bool):
    """rows -> shared bytes of mmq's kernel for `qtype` with `block` (weight rows, warps) on sm_`arch`,
    as mmq.linear (or grouped_linear) launches it on a matrix of `cols` columns."""
    weight = quant.quantized_weight(random_blocks(qtype, 8, cols, 1e-2, np.random.default_rng(0)), qtype, cols,
                                    torch.device("cpu"))
    index = torch.zeros(1, dtype=torch.int32 if grouped else torch.int8)
    planes = dict(zip(("p0", "p1", "p2", "p3"), pointers(weight.planes)))

    def shared(rows: int) -> int:
        args = {"x_ptr": torch.zeros(1, dtype=torch.int8), "xd_ptr": torch.zeros(1), "xs_ptr": torch.zeros(1),
                "out_ptr": torch.zeros(1, dtype=torch.bfloat16), **planes, "src_ptr": index,
                "tile_expert_ptr": index, "tiles_ptr": index, "M": 64, "N": 4096, "stride_x": cols,
                "stride_xd": cols // 32, "stride_xs": cols // 16, "stride_out": 4096, "stride_part": 0,
                "PART_K": cols}
        constexprs = {"K": cols, "QTYPE": int(qtype), "STEP": mmq.step(qtype, cols), "BLOCK_M": rows,
                      "BLOCK_N": block[0], "GROUPED": grouped}
        return shared_bytes(mmq._mmq_kernel, args, constexprs, arch, block[1])
    return shared


@pytest.mark.skipif(not HAVE_PTXAS, reason="needs Triton's CUDA compiler (its ptxas)")
def test_a_block_too_big_for_the_gpus_shared_memory_takes_fewer_rows():
    # Built here for GPUs this machine does not have. Q8_0's 256x8 block at 64 activation rows
    # needs 246,272 bytes: an H100 refused it (227 KiB a block), so 32 rows a program there; on a
    # GeForce RTX 30/40 card (99 KiB) Q5_K's takes 32 and Q8_0's fits at no row count, so the
    # GPU's refusal stands (and `quant.choose` drops that block). The default block fits an H100
    # at 64 rows in the grouped (mixture-of-experts) kernel too.
    Q = quant.Q
    cases = [(90, Q.Q8_0, (256, 8), False, 32), (90, Q.Q4_K, (256, 8), False, 64), (90, Q.Q8_0, (128, 4), True, 64),
             (86, Q.Q5_K, (256, 8), False, 32)]
    for arch, qtype, block, grouped, rows in cases:
        key = ("test", arch, qtype, block, grouped)
        shared = mmq.fit_rows(key, 64, builds_within(arch, mmq_shared(arch, qtype, block, 4096, grouped)))
        assert shared <= SHARED_LIMIT[arch] and mmq._rows_that_fit[key, 64] == rows, (arch, qtype.name, block, shared)
    key = ("test", 86, Q.Q8_0, (256, 8), False)
    tried = []
    with pytest.raises(OutOfResources):
        mmq.fit_rows(key, 64, builds_within(86, lambda rows: tried.append(rows) or mmq_shared(86, Q.Q8_0, (256, 8),
                                                                                            4096, False)(rows)))
    assert tried == [64, 32, 16] and (key, 64) not in mmq._rows_that_fit
