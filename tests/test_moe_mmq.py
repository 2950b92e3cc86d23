"""A mixture of experts' feed-forward for many tokens through the grouped tensor-core kernel
(shardrt.kernels.moe_mmq): the layout of slots in tiles by expert, then the whole feed-forward
against the decode kernels of moe_qdot (the same integer products, slot by slot) and against the
float product from the `gguf` package's own dequantization. Under Triton's interpreter on the CPU
and, on a GPU, as built and inside a captured CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardrt.kernels import moe_mmq, moe_qdot
from shardrt.kernels.quant import Q

from .test_moe_qdot import EXPERTS, random_experts, relative
from .triton_interpreter import interpret

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA GPU")

# (gate, up, down types, dim, ffn): Q4_K_M's experts, Q6_K alone, and the 32-element types at widths
# that are no multiple of a program's rows
CASES = [("Q4_K", "Q4_K", "Q6_K", 256, 256), ("Q6_K", "Q6_K", "Q6_K", 256, 256), ("Q8_0", "Q8_0", "Q8_0", 160, 96),
         ("Q4_1", "Q5_0", "Q4_0", 160, 96)]


def test_the_tiles_hold_each_experts_slots_in_order_and_padding_only_at_their_ends():
    experts = torch.tensor([[3, 1], [1, 5], [3, 0], [1, 3], [5, 1]])  # experts 2 and 4: nobody's
    layout = moe_mmq.tiles(experts, 6, 2)
    assert layout.capacity % 2 == 0 and layout.capacity >= 10 + 4 * 1
    assert layout.count.item() == 1 + 2 + 2 + 1  # tiles of experts 0, 1, 3, 5: 1, 4, 3, 2 slots
    used = layout.count.item() * 2
    rows = layout.src[:used].tolist()
    tile_experts = layout.tile_expert[: layout.count.item()].tolist()
    assert tile_experts == [0, 1, 1, 3, 3, 5]
    # every slot sits in a tile of its expert, reading its token's row; slots of one expert in order
    flat = experts.reshape(-1).tolist()
    for slot, row in enumerate(layout.position.tolist()):
        assert tile_experts[row // 2] == flat[slot] and rows[row] == slot // 2
    assert sorted(layout.position.tolist()) == [r for r, src in enumerate(rows) if src >= 0]
    assert rows.count(-1) == used - 10 and (layout.src[used:] == -1).all()


def check_moe(device: str, cases=CASES, tokens: int = 40, k: int = 4, block_m: int = 16) -> dict:
    """Per case: the relative error of moe_mmq's feed-forward against moe_qdot's decode kernels on
    the same routing, and against the float product without activation quantization."""
    worst = {}
    for gate_type, up_type, down_type, dim, ffn in cases:
        rng = np.random.default_rng(dim + ffn + tokens)
        gate, gate_dense = random_experts(Q[gate_type], ffn, dim, device, rng)
        up, up_dense = random_experts(Q[up_type], ffn, dim, device, rng)
        down, down_dense = random_experts(Q[down_type], dim, ffn, device, rng)
        # top k of EXPERTS - 1 (the last expert chosen by nobody), some experts far more often than others
        logits = rng.standard_normal((tokens, EXPERTS - 1)) + np.linspace(0, 2, EXPERTS - 1)
        ids = torch.from_numpy(np.argsort(-logits, axis=1)[:, :k].copy()).to(device)
        weights = torch.from_numpy(rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)).to(device)
        x = torch.from_numpy(rng.standard_normal((tokens, dim)).astype(np.float32)).to(device)
        x = x if device == "cpu" else x.bfloat16()  # the interpreter computes in numpy: no bf16
        got = moe_mmq.moe_experts(x, weights, ids, (gate, up), down, block_m)
        assert got.shape == (tokens, dim) and got.dtype == x.dtype
        by_slot = moe_qdot.moe_experts(x, weights, ids, (gate, up), down)
        exact, chosen = x.double().cpu(), ids.cpu()
        g = torch.einsum("tkfd,td->tkf", gate_dense[chosen], exact)
        u = torch.einsum("tkfd,td->tkf", up_dense[chosen], exact)
        float_out = torch.einsum("tkdf,tkf,tk->td", down_dense[chosen], g * torch.sigmoid(g) * u,
                                 weights.double().cpu())
        worst[f"{gate_type}/{up_type}/{down_type}"] = [relative(got, by_slot.double().cpu()), relative(got, float_out)]
    return worst


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_the_grouped_feed_forward_under_the_interpreter():
    # 12 tokens' top 2 of 5 experts in tiles of 16: every expert's slots in one padded tile
    worst = interpret("import json; from tests.test_moe_mmq import CASES, check_moe; "
                      "print(json.dumps(check_moe('cpu', CASES[::3], tokens=12, k=2)))")
    assert set(worst) == {f"{g}/{u}/{d}" for g, u, d, _, _ in CASES[::3]}
    for case, (by_slot, whole) in worst.items():
        assert by_slot < 2e-3, (case, by_slot)  # the same integer products; hidden rows rounded apart
        assert whole < 5e-2, (case, whole)  # what quantizing x and the hidden rows to int8 costs


@NEEDS_CUDA
@pytest.mark.parametrize("tokens,block_m", [(300, 64), (16, 16), (9, None)])
def test_the_grouped_feed_forward_on_the_gpu(tokens, block_m):
    worst = check_moe("cuda", tokens=tokens, k=4, block_m=block_m)
    for case, (by_slot, whole) in worst.items():
        assert by_slot < 1e-2 and whole < 5e-2, (case, by_slot, whole)  # bf16 activations


@NEEDS_CUDA
def test_the_grouped_feed_forward_is_captured_in_a_graph_and_follows_new_routes():
    rng = np.random.default_rng(3)
    gate, _ = random_experts(Q.Q4_K, 256, 256, "cuda", rng)
    up, _ = random_experts(Q.Q4_K, 256, 256, "cuda", rng)
    down, _ = random_experts(Q.Q6_K, 256, 256, "cuda", rng)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(32, 2, device="cuda")
    ids = torch.randint(0, EXPERTS, (32, 2), device="cuda")
    moe_mmq.moe_experts(x, weights, ids, (gate, up), down)  # compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_mmq.moe_experts(x, weights, ids, (gate, up), down)
    for seed in range(3):  # new routes in the same buffers: the replay reads them
        ids.copy_(torch.randint(0, EXPERTS, (32, 2), device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, moe_mmq.moe_experts(x, weights, ids, (gate, up), down))
