"""The grouped integer kernels of a mixture of experts' decode (shardrt.kernels.moe_qdot) and the
top-k routing kernel (kernels.moe), against torch formulations in float64 from the `gguf`
package's own dequantization: per slot (token, chosen expert), dequantize(W_expert) @
dequantize(quantize(x)), the SwiGLU, then the down products weighted by the router and summed
over k. Under Triton's interpreter on the CPU (the dp4a products emulated) and, on a GPU, as
built, over expert ids that repeat across tokens and within one, and experts nobody chose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardrt.kernels import moe_qdot, qdot
from shardrt.kernels.experts import QuantizedExperts
from shardrt.kernels.activation import OAI_ALPHA, OAI_LIMIT, clamped_swiglu
from shardrt.kernels.moe import ExpertBiases, gathered, top_experts, top_experts_reference
from shardrt.kernels.quant import Q

from .test_quant import gguf_dequantized, random_blocks
from .triton_interpreter import interpret

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")

EXPERTS = 6
# (gate, up, down types, dim, ffn): Q4_K_M's experts (Q4_K, down Q6_K), single types, gate and up
# of different types; the 32-element types at widths no program's rows divide
CASES = [("Q4_K", "Q4_K", "Q6_K", 256, 256), ("Q6_K", "Q6_K", "Q6_K", 256, 256), ("Q8_0", "Q8_0", "Q8_0", 160, 96),
         ("Q4_0", "Q4_0", "Q4_0", 160, 96), ("Q5_K", "Q4_K", "Q5_K", 256, 256)]
# expert ids [n, k] of EXPERTS: one token's top 4; three tokens' top 2, repeating across tokens and
# within one (the kernel takes any ids); experts 0, 2, 3 and 5 chosen by nobody in the second
ROUTES = [[[5, 0, 3, 2]], [[1, 4], [4, 1], [1, 1]]]


def random_experts(qtype: Q, rows: int, cols: int, device: str, rng) -> tuple[QuantizedExperts, torch.Tensor]:
    """EXPERTS random matrices [rows, cols] of `qtype` in blocks, and as gguf dequantizes them (float64)."""
    raw = random_blocks(qtype, EXPERTS * rows, cols, 1e-2, rng)
    dense = gguf_dequantized(raw, qtype, EXPERTS * rows, cols).reshape(EXPERTS, rows, cols)
    return QuantizedExperts.from_blocks(raw, qtype, EXPERTS, cols, torch.device(device)), dense


def reference_hidden(xq: qdot.QuantizedRows, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    x = xq.dequantize().double().cpu()
    k = ids.shape[1]
    rows = []
    for slot, e in enumerate(ids.reshape(-1).tolist()):
        g, u = gate[e] @ x[slot // k], up[e] @ x[slot // k]
        rows.append(g * torch.sigmoid(g) * u)
    return torch.stack(rows)


def reference_down(hq: qdot.QuantizedRows, ids: torch.Tensor, weights: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    h = hq.dequantize().double().cpu()
    n, k = ids.shape
    return torch.stack([sum(weights[t, j].double() * (down[ids[t, j]] @ h[t * k + j]) for j in range(k))
                        for t in range(n)])


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double().cpu()
    assert not torch.isnan(got).any()
    return ((got - want).norm() / want.norm()).item()


def check_grouped(device: str, cases=CASES, routes=ROUTES, block=None) -> dict:
    """Largest relative error per case of the two kernels against their references, and of the whole
    feed-forward against the float product without any activation quantization."""
    worst = {}
    for gate_type, up_type, down_type, dim, ffn in cases:
        rng = np.random.default_rng(dim + ffn)
        gate, gate_dense = random_experts(Q[gate_type], ffn, dim, device, rng)
        up, up_dense = random_experts(Q[up_type], ffn, dim, device, rng)
        down, down_dense = random_experts(Q[down_type], dim, ffn, device, rng)
        for route in routes:
            ids = torch.tensor(route, device=device)
            n, k = ids.shape
            weights = torch.from_numpy(rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)).to(device)
            x = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)).to(device)
            x = x if device == "cpu" else x.bfloat16()  # the interpreter computes in numpy: no bf16
            xq = qdot.quantize_rows(x)
            hidden = moe_qdot.gate_up_silu(xq, ids, gate, up, block)
            hq = qdot.quantize_rows(hidden)
            assert torch.equal(hq.words.cpu(), qdot.quantize_rows_reference(hidden).words.cpu())
            out = moe_qdot.down_weighted(hq, ids, weights, down, x.dtype, block)
            assert out.shape == (n, dim) and out.dtype == x.dtype
            whole = moe_qdot.moe_experts(x, weights, ids, (gate, up), down, block)
            exact, chosen = x.double().cpu(), ids.cpu()
            g = torch.einsum("tkfd,td->tkf", gate_dense[chosen], exact)
            u = torch.einsum("tkfd,td->tkf", up_dense[chosen], exact)
            float_out = torch.einsum("tkdf,tkf,tk->td", down_dense[chosen], g * torch.sigmoid(g) * u,
                                     weights.double().cpu())
            errors = [relative(hidden, reference_hidden(xq, ids, gate_dense, up_dense)),
                      relative(out, reference_down(hq, ids, weights.cpu(), down_dense)),
                      relative(whole, float_out)]
            key = f"{gate_type}/{up_type}/{down_type}"
            worst[key] = [max(a, b) for a, b in zip(worst.get(key, [0.0] * 3), errors)]
    return worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_grouped_kernels_under_the_interpreter():
    worst = interpret("import json; from tests.test_moe_qdot import check_grouped; "
                      "print(json.dumps(check_grouped('cpu', block=(64, 4, 1))))")
    assert set(worst) == {f"{g}/{u}/{d}" for g, u, d, _, _ in CASES}
    for case, (hidden, down, whole) in worst.items():
        assert hidden < 1e-5 and down < 1e-5, (case, hidden, down)  # the integer products, to float32 rounding
        assert whole < 5e-2, (case, whole)  # what quantizing x and the hidden rows to int8 costs


def clamped_unit(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gpt-oss's unit in float64 (activation.clamped_swiglu)."""
    g = g.clamp(max=OAI_LIMIT)
    return (u.clamp(-OAI_LIMIT, OAI_LIMIT) + 1) * g * torch.sigmoid(OAI_ALPHA * g)


def check_oss(device: str, dim: int = 256, ffn: int = 128, routes=ROUTES) -> list:
    """gpt-oss's experts: MXFP4 blocks, gate/up and down biases, the clamped unit. The largest
    relative errors of the two kernels against their references, and of `moe.gathered` against
    the float product without activation quantization."""
    rng = np.random.default_rng(9)
    gate, gate_dense = random_experts(Q.MXFP4, ffn, dim, device, rng)
    up, up_dense = random_experts(Q.MXFP4, ffn, dim, device, rng)
    down, down_dense = random_experts(Q.MXFP4, dim, ffn, device, rng)
    # bias spread so that some gates pass the clamp's limit
    biases = ExpertBiases(*(torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 4).to(device)
                            for shape in ((EXPERTS,), (EXPERTS, 2 * ffn), (EXPERTS, dim))))
    bias_gate, bias_up = (b.double().cpu() for b in biases.gate_up.chunk(2, dim=1))
    worst = [0.0] * 3
    for route in routes:
        ids = torch.tensor(route, device=device)
        n, k = ids.shape
        weights = torch.from_numpy(rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)).to(device)
        x = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32) * 20).to(device)
        x = x if device == "cpu" else x.bfloat16()
        xq = qdot.quantize_rows(x)
        hidden = moe_qdot.gate_up_silu(xq, ids, gate, up, bias=biases.gate_up, clamped=True)
        xd, chosen = xq.dequantize().double().cpu(), ids.cpu()
        g = torch.einsum("tkfd,td->tkf", gate_dense[chosen], xd) + bias_gate[chosen]
        u = torch.einsum("tkfd,td->tkf", up_dense[chosen], xd) + bias_up[chosen]
        assert (g > OAI_LIMIT).any() and (u.abs() > OAI_LIMIT).any()  # the clamps are taken
        want_hidden = clamped_unit(g, u).reshape(n * k, ffn)
        hq = qdot.quantize_rows(hidden)
        out = moe_qdot.down_weighted(hq, ids, weights, down, x.dtype, bias=biases.down)
        want_out = reference_down(hq, ids, weights.cpu(), down_dense) + torch.einsum(
            "tk,tkd->td", weights.double().cpu(), biases.down.double().cpu()[chosen])
        whole = gathered(x, weights, ids, (gate, up), down, clamped_swiglu, biases)
        exact = x.double().cpu()
        g = torch.einsum("tkfd,td->tkf", gate_dense[chosen], exact) + bias_gate[chosen]
        u = torch.einsum("tkfd,td->tkf", up_dense[chosen], exact) + bias_up[chosen]
        float_out = torch.einsum("tkdf,tkf,tk->td", down_dense[chosen], clamped_unit(g, u), weights.double().cpu()) \
            + torch.einsum("tk,tkd->td", weights.double().cpu(), biases.down.double().cpu()[chosen])
        errors = [relative(hidden, want_hidden), relative(out, want_out), relative(whole, float_out)]
        worst = [max(a, b) for a, b in zip(worst, errors)]
    return worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_gpt_oss_experts_in_the_grouped_kernels_under_the_interpreter():
    hidden, down, whole = interpret("import json; from tests.test_moe_qdot import check_oss; "
                                    "print(json.dumps(check_oss('cpu')))")
    assert hidden < 1e-5 and down < 1e-5, (hidden, down)
    assert whole < 5e-2, whole


@NEEDS_CUDA
def test_gpt_oss_experts_in_the_grouped_kernels_on_the_gpu():
    hidden, down, whole = check_oss("cuda", dim=2880, ffn=2880)  # gpt-oss-20b's widths
    assert hidden < 1e-5 and down < 2e-2 and whole < 5e-2, (hidden, down, whole)


def check_top_experts(cases) -> list:
    """(ids equal, largest weight difference) of the kernel against the reference per case."""
    out = []
    for n, count, k, normalize in cases:
        logits = torch.randn(n, count, generator=torch.Generator().manual_seed(count + k)) * 3
        weights, experts = top_experts(logits, k, normalize, torch.float32)
        want_weights, want_experts = top_experts_reference(logits, k, normalize, torch.float32)
        out.append([torch.equal(experts, want_experts), (weights - want_weights).abs().max().item()])
    return out


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_top_experts_kernel_under_the_interpreter():
    cases = [(3, 8, 2, True), (2, 128, 8, True), (2, 128, 8, False), (1, 12, 3, False), (4, 32, 4, True)]
    results = interpret(f"import json; from tests.test_moe_qdot import check_top_experts; "
                        f"print(json.dumps(check_top_experts({cases!r})))")
    for case, (same_ids, difference) in zip(cases, results):
        assert same_ids and difference < 1e-6, (case, difference)


@NEEDS_CUDA
def test_the_grouped_kernels_on_the_gpu():
    # Qwen3-30B-A3B's widths (dim 2048, expert ffn 768), the kernels' own configs and dot products
    cases = [("Q4_K", "Q4_K", "Q6_K", 2048, 768), ("Q8_0", "Q8_0", "Q8_0", 2048, 768),
             ("Q5_K", "Q4_K", "Q4_K", 2048, 768), ("Q4_0", "Q4_0", "Q4_0", 1024, 96)]
    routes = ROUTES + [[[e % EXPERTS for e in range(8 * t, 8 * t + 8)] for t in range(8)]]  # 8 tokens, top 8
    worst = check_grouped("cuda", cases, routes)
    for case, (hidden, down, whole) in worst.items():
        assert hidden < 1e-5 and down < 2e-2 and whole < 5e-2, (case, hidden, down, whole)  # bf16 output rows


@NEEDS_CUDA
def test_the_top_experts_kernel_on_the_gpu():
    logits = torch.randn(64, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for normalize in (True, False):
        weights, experts = top_experts(logits, 8, normalize, torch.bfloat16)
        want_weights, want_experts = top_experts_reference(logits, 8, normalize, torch.bfloat16)
        assert torch.equal(experts, want_experts) and torch.allclose(weights.float(), want_weights.float(), rtol=1e-2)
