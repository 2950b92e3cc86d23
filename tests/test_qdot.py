"""The integer-dot path for quantized weights (shardrt.kernels.qdot): activations quantized per
block of 32, and the kernel that multiplies GGUF blocks into them, against
dequantize(W) @ dequantize(quantize(x)) computed in float64 from the `gguf` package's own
dequantization. The kernel runs under Triton's interpreter on the CPU (its PTX dot products
emulated in integer operations: the same source, indexing and scales) and, on a GPU, as built."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shardrt.errors import ConfigError
from shardrt.kernels import mmq, qdot, quant
from shardrt.kernels.quant import Q

from .test_quant import SCALES, gguf_dequantized, random_blocks
from .triton_interpreter import interpret

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def test_quantized_rows_are_the_nearest_steps_of_each_block():
    x = torch.randn(3, 256) * torch.logspace(-3, 3, 256)  # blocks of very different size
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, values 0
    xq = qdot.quantize_rows_reference(x)
    q = xq.words.view(torch.int8).reshape(3, 8, 32).float()
    assert q.abs().max() == 127 and xq.scale[1, 1] == 0 and q[1, 1].abs().max() == 0
    step = xq.scale[..., None]
    assert ((q * step - x.reshape(3, 8, 32)).abs() <= step / 2 * (1 + 1e-6)).all()  # rounded to the nearest step
    assert torch.allclose(xq.sums, q.reshape(3, 16, 16).sum(-1) * xq.scale.repeat_interleave(2, 1))
    assert torch.allclose(xq.dequantize(), (q * step).reshape(3, 256))


def worst_errors(device: str, types, rows: int, cols: int, counts, product) -> dict:
    """Largest relative error per type, over row counts and scales, of `product(xq, weight, out)`
    (an integer path: x quantized per 32) against dequantize(W) @ dequantize(quantize(x)); NaN
    where the kernel left an output unwritten."""
    worst = {}
    for qtype in types:
        rng = np.random.default_rng(int(qtype))
        for scale in SCALES.values():
            raw = random_blocks(qtype, rows, cols, scale, rng)
            weight = quant.quantized_weight(raw, qtype, cols, torch.device(device))
            dense = gguf_dequantized(raw, qtype, rows, cols)
            for m in counts:
                x = torch.from_numpy(rng.standard_normal((m, cols)).astype(np.float32)).to(device)
                x = x if device == "cpu" else x.bfloat16()  # the interpreter computes in numpy: no bf16
                xq = qdot.quantize_rows(x)
                ref = qdot.quantize_rows_reference(x)
                assert torch.equal(xq.words.cpu(), ref.words.cpu()) and torch.equal(xq.scale.cpu(), ref.scale.cpu())
                want = ref.dequantize().double().cpu() @ dense.T
                out = torch.full((m, rows), float("nan"), device=device)
                product(xq, weight, out)
                norm = want.norm().item()
                error = ((out.double().cpu() - want).norm().item() / norm) if norm else out.abs().max().item()
                worst[qtype.name] = max(worst.get(qtype.name, 0.0), error)
    return worst


def check_types(device: str, types, rows: int = 13, cols: int = 768, counts=(1, 3, 8)) -> dict:
    """worst_errors of qdot.linear (on the CPU in programs of 4 rows, 4 units)."""
    block = (4, 4, 1) if device == "cpu" else None
    return worst_errors(device, types, rows, cols, counts, lambda xq, w, out: qdot.linear(xq, w, out, block=block))


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_kernel_source_under_the_interpreter():
    # rows 13: no multiple of a program's rows; cols 768: three super-blocks, not a multiple of
    # the units per step; 1, 3 and 8 activation rows; scales from subnormal to 6e4 and zero
    worst = interpret("import json; from tests.test_qdot import check_types; "
                      "from shardrt.kernels.qdot import QDOT_TYPES; "
                      "print(json.dumps(check_types('cpu', QDOT_TYPES, counts=(1, 3))))")
    assert set(worst) == {t.name for t in qdot.QDOT_TYPES}
    assert all(error < 1e-5 for error in worst.values()), worst


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_kernel_on_the_gpu_with_its_dot_products():
    worst = check_types("cuda", qdot.QDOT_TYPES, rows=1000, cols=4 * 768, counts=(1, 2, 3, 5, 8))
    assert all(error < 1e-5 for error in worst.values()), worst


def check_normed(device: str, dtype: torch.dtype) -> dict:
    """The norms that also quantize their output (norm.rms_norm_quantized, add_rms_norm_quantized)
    against the norm followed by quantize_rows: whether every part is bit for bit the same, over
    widths that are and are not a power of two (2880: gpt-oss's), one row and several, rows of
    very different size; and the gated units that do (activation.gated_quantized) likewise."""
    from shardrt.kernels import norm

    g = torch.Generator().manual_seed(3)
    same = {}
    for dim in (96, 576, 2880):
        for m in (1, 3):
            x = (torch.randn(m, dim, generator=g) * torch.logspace(-2, 2, m)[:, None]).to(device, dtype)
            delta = torch.randn(m, dim, generator=g).to(device, dtype)
            weight = (torch.rand(dim, generator=g) + 0.5).to(device, dtype)
            h, hq = norm.rms_norm_quantized(x, weight, 1e-6)
            want = norm.rms_norm(x, weight, 1e-6)
            total, h2, hq2 = norm.add_rms_norm_quantized(x, delta, weight, 1e-6)
            want_total, want2 = norm.add_rms_norm(x, delta, weight, 1e-6)
            parts = [(h, want), (total, want_total), (h2, want2)]
            for got_q, of in ((hq, want), (hq2, want2)):
                ref = qdot.quantize_rows(of)
                parts += [(got_q.words, ref.words), (got_q.scale, ref.scale), (got_q.sums, ref.sums)]
            same[f"{dim}x{m}"] = all(torch.equal(a.cpu(), b.cpu()) for a, b in parts)
    from shardrt.kernels import activation

    for act in (activation.silu_mul, activation.gelu_mul):
        for ffn in (96, 1056):  # a block of columns, and one and a bit (1024 columns a program)
            gate_up = torch.randn(3, 2 * ffn, generator=g).to(device, dtype) * 3
            out, q = activation.gated_quantized(act, gate_up)
            want = act(gate_up)
            ref = qdot.quantize_rows(want)
            same[f"{act.__name__} {ffn}"] = all(torch.equal(a.cpu(), b.cpu()) for a, b in (
                (out, want), (q.words, ref.words), (q.scale, ref.scale), (q.sums, ref.sums)))
    return same


def test_the_quantizing_norms_reference_is_the_norm_then_the_rows_quantized():
    from shardrt.kernels import norm

    x, w = torch.randn(2, 64), torch.rand(64) + 0.5
    h, hq = norm.rms_norm_quantized(x, w, 1e-6)
    ref = qdot.quantize_rows_reference(norm.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(h, norm.rms_norm_reference(x, w, 1e-6)) and torch.equal(hq.words, ref.words)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_quantizing_norm_kernel_under_the_interpreter():
    same = interpret("import json, torch; from tests.test_qdot import check_normed; "
                     "print(json.dumps(check_normed('cpu', torch.float32)))")
    assert len(same) == 10 and all(same.values()), same


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
def test_the_quantizing_norm_kernel_on_the_gpu():
    same = check_normed("cuda", torch.bfloat16)
    assert len(same) == 10 and all(same.values()), same


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16, 33, 64, 100, 256])
def test_every_path_linear_may_choose_on_the_gpu_is_right(n):
    # `linear` times its candidates and keeps the fastest: each must compute the product
    rng = np.random.default_rng(n)
    for qtype in quant.KERNEL_TYPES:
        rows, cols = 520, 1024
        raw = random_blocks(qtype, rows, cols, 1e-2, rng)
        weight = quant.quantized_weight(raw, qtype, cols, torch.device("cuda"))
        dense = gguf_dequantized(raw, qtype, rows, cols)
        x = torch.from_numpy(rng.standard_normal((n, cols)).astype(np.float32)).cuda().bfloat16()
        for path in quant.candidates(weight, n, x):
            out = torch.empty(n, rows, device="cuda", dtype=torch.bfloat16)
            quant.PRODUCTS[path](x, weight, out)
            want = x.double().cpu() @ dense.T
            error = ((out.double().cpu() - want).norm() / want.norm()).item()
            assert error < 2e-2, (qtype.name, path, error)  # bf16 output, int8 activations for qdot


def test_config_files_are_checked(tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"Q4_K 4096x4096": {"1": [2, 32, 2], "8": [4, 32, 4]}}))
    assert qdot.read_configs(str(good)) == {"Q4_K 4096x4096": {1: (2, 32, 2), 8: (4, 32, 4)}}
    for text, why in [("{", "cannot read"), ('{"Q4_K 1x1": {"1": [3, 32, 2]}}', "powers of two"),
                      ('{"Q4_K 1x1": {"one": [1, 32, 2]}}', "powers of two"), ("[1, 2]", "entry None")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"SHARDRT_QDOT_CONFIG: .*{why}"):
            qdot.read_configs(str(bad))
    with pytest.raises(ConfigError, match="SHARDRT_QDOT_CONFIG: cannot read '/nonexistent.json'"):
        qdot.read_configs("/nonexistent.json")
    monkeypatch.setattr(qdot, "_measured", None)
    monkeypatch.setenv(qdot.CONFIG_ENV, str(good))
    assert qdot.config(Q.Q4_K, 4096, 4096, 1) == (2, 32, 2)
    assert qdot.config(Q.Q4_K, 4096, 4096, 3) == (4, 32, 4)  # the fewest measured rows >= 3
    # a matrix no sweep measured: its type's default, with fewer rows per program for few rows
    assert qdot.config(Q.Q6_K, 8192, 512) == qdot.DEFAULT_CONFIG[Q.Q6_K]
    assert qdot.config(Q.Q4_K, 8192, 512) == (4, 32, 4) and qdot.config(Q.Q4_K, 1000, 512) == (1, 32, 4)
    monkeypatch.setattr(qdot, "_measured", None)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "Q5_1"])
@pytest.mark.parametrize("graphs", [True, False])
def test_a_gpu_stage_with_blocks_follows_the_dense_cpu_stage(tmp_path, qtype, graphs, monkeypatch):
    """The whole path in a model: `weights: auto` keeps the blocks on the GPU, decode steps take
    the integer dot products (in a graph or eagerly; forced here: on a model this small a float
    kernel may time faster), and the logits follow the CPU's float32 ones, teacher-forced over a
    prompt and eight decode steps."""
    from shardrt.stage import Stage

    from .synthetic import write_model

    monkeypatch.setenv(quant.PATH_ENV, "qdot")
    path = write_model(tmp_path / "model.gguf", n_layers=3, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512,
                       qtype=qtype, seed=3)
    cpu = Stage(path, 0, 3, "cpu", max_ctx=64)
    gpu = Stage(path, 0, 3, "cuda:0", max_ctx=64, graphs=graphs)
    assert gpu.quantized and gpu.dtype == torch.bfloat16 and gpu.kernels.path == "triton"
    follows_the_cpu(cpu, gpu)
    assert not graphs or gpu.graph_forwards >= 8


def follows_the_cpu(cpu, gpu, steps: int = 9) -> None:
    """The GPU stage's logits follow the CPU stage's, teacher-forced over a prompt and steps - 1
    decode steps (each the CPU's greedy token)."""
    inputs, base = torch.arange(1, 20), 0
    for step in range(steps):
        want = cpu.forward(inputs, base).view(-1).double()
        got = gpu.forward(inputs, base).view(-1).double().cpu()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999, step
        assert ((got - want).norm() / want.norm()).item() < 5e-2, step
        base += inputs.numel()
        inputs = torch.tensor([int(want.argmax())])


def test_a_forced_path_must_be_one_of_the_paths(monkeypatch):
    monkeypatch.setenv(quant.PATH_ENV, "cublas")
    with pytest.raises(ConfigError, match="SHARDRT_QUANT_PATH: 'cublas' is not one of qdot, mmq, matvec, tile, "
                                          "dequantized \\(or mmq with another block: mmq-64x4, "):
        quant.forced_path()
    monkeypatch.setenv(quant.PATH_ENV, "mmq-256x8")
    assert quant.forced_path() == "mmq-256x8"


def other_blocks_agree() -> dict:
    """Per type and mmq path the type offers: the largest difference from the type's own block's
    product (the same sums in another order of programs: float32 rounding apart)."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))  # the interpreter has no bf16
    worst = {}
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_0):
        w = quant.quantized_weight(random_blocks(qtype, 300, 512, 1e-2, rng), qtype, 512, torch.device("cpu"))
        own = quant.PRODUCTS["mmq"](x, w, torch.empty(3, 300, dtype=torch.float32))
        for block in mmq.other_blocks(qtype):
            got = quant.PRODUCTS[quant.mmq_path(block)](x, w, torch.empty(3, 300, dtype=torch.float32))
            worst[f"{qtype.name} {quant.mmq_path(block)}"] = ((got - own).abs().max() / own.abs().max()).item()
    return worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_mmq_other_blocks_compute_the_same_product():
    # `choose` times each type's own block and its others; each must be the same product
    worst = interpret("import json; from tests.test_qdot import other_blocks_agree; "
                      "print(json.dumps(other_blocks_agree()))")
    assert len(worst) == 9 and all(error < 1e-5 for error in worst.values()), worst
