"""Each op in shardrt.kernels against an independent float64 formulation written here, on random
inputs of odd shapes: on the CPU that is the torch reference path, on a GPU the Triton kernel
(the same tests run there through the device). Outputs the kernels must not touch are poisoned
with NaN and checked afterwards."""

from __future__ import annotations

import math

import pytest
import torch

from shardrt import kernels
from shardrt.kernels._triton import use_triton

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative error of the whole output


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double().cpu()
    assert not torch.isnan(got).any(), "NaN in the output"
    return ((got - want).norm() / want.norm()).item()


def rand(*shape, device, dtype, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def naive_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double().cpu(), w.double().cpu()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 300), (17, 4096), (5, 8192)])
def test_rms_norm_and_fused_residual_add(device, dtype, rows, dim, gen):
    x, delta = rand(rows, dim, device=device, dtype=dtype, generator=gen), rand(rows, dim, device=device, dtype=dtype, generator=gen)
    w = rand(dim, device=device, dtype=dtype, generator=gen)
    assert rel_error(kernels.rms_norm(x, w, 1e-5), naive_rms(x, w, 1e-5)) < TOLERANCE[dtype]
    total, normed = kernels.add_rms_norm(x, delta, w, 1e-6)
    want_total = x.double().cpu() + delta.double().cpu()
    assert rel_error(total, want_total) < TOLERANCE[dtype] / 4
    assert rel_error(normed, naive_rms(want_total, w, 1e-6)) < TOLERANCE[dtype]
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,ffn", [(1, 64), (3, 1000), (16, 14336)])
def test_silu_mul(device, dtype, rows, ffn, gen):
    gate_up = rand(rows, 2 * ffn, device=device, dtype=dtype, generator=gen)
    g, u = gate_up.double().cpu().chunk(2, -1)
    got = kernels.silu_mul(gate_up)
    assert got.shape == (rows, ffn)
    assert rel_error(got, g / (1 + torch.exp(-g)) * u) < TOLERANCE[dtype]


def naive_rope(x: torch.Tensor, pos: torch.Tensor, base: float, rot: int, style: str) -> torch.Tensor:
    """x [n, heads, d] float64; rotate the first `rot` dims of each head by its token's position."""
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(rot // 2):
            angle = int(pos[t]) * base ** (-2 * i / rot)
            c, s = math.cos(angle), math.sin(angle)
            a, b = (2 * i, 2 * i + 1) if style == "interleaved" else (i, i + rot // 2)
            out[t, :, a] = x[t, :, a] * c - x[t, :, b] * s
            out[t, :, b] = x[t, :, a] * s + x[t, :, b] * c
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["interleaved", "neox"])
@pytest.mark.parametrize("head_dim,rot,qk_norm", [(64, 64, False), (128, 128, False), (80, 80, True), (128, 64, True)])
def test_rope_kv_write(device, dtype, style, head_dim, rot, qk_norm, gen):
    heads, kv_heads, ctx, base, eps = 6, 2, 97, 10000.0, 1e-6
    positions = torch.tensor([3, 4, 5, 96, 50])
    n = positions.shape[0]
    qkv = rand(n, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype, generator=gen)
    q_norm = rand(head_dim, device=device, dtype=dtype, generator=gen) if qk_norm else None
    k_norm = rand(head_dim, device=device, dtype=dtype, generator=gen) if qk_norm else None
    cos, sin = kernels.rope_tables(base, rot, ctx, device)
    k_cache = torch.full((kv_heads, ctx, head_dim), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    q = kernels.rope_kv_write(qkv, cos, sin, positions.to(device), k_cache, v_cache, heads, style, q_norm, k_norm, eps)

    q_in, k_in, v_in = qkv.double().cpu().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q_in, k_in, v_in = (t.reshape(n, -1, head_dim) for t in (q_in, k_in, v_in))
    if qk_norm:
        q_in, k_in = naive_rms(q_in, q_norm, eps), naive_rms(k_in, k_norm, eps)
    assert q.shape == (n, heads, head_dim)
    assert rel_error(q, naive_rope(q_in, positions, base, rot, style)) < TOLERANCE[dtype]
    written = k_cache[:, positions].transpose(0, 1)
    assert rel_error(written, naive_rope(k_in, positions, base, rot, style)) < TOLERANCE[dtype]
    assert rel_error(v_cache[:, positions].transpose(0, 1), v_in) < TOLERANCE[dtype] / 4
    untouched = torch.ones(ctx, dtype=torch.bool)
    untouched[positions] = False
    assert torch.isnan(k_cache[:, untouched.to(device)]).all() and torch.isnan(v_cache[:, untouched.to(device)]).all()


def naive_attention(q, k_cache, v_cache, positions, scale):
    q, k, v = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    n, heads, _ = q.shape
    group = heads // k.shape[0]
    out = torch.empty_like(q)
    for t in range(n):
        seen = int(positions[t]) + 1
        for h in range(heads):
            weights = torch.softmax(k[h // group, :seen] @ q[t, h] * scale, dim=0)
            out[t, h] = weights @ v[h // group, :seen]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,ctx,positions", [
    (8, 2, 64, 256, [0]),  # the first token sees only itself
    (8, 2, 64, 256, [63]), (8, 2, 64, 256, [64]), (8, 2, 64, 256, [255]),  # chunk edges, the last place
    (32, 8, 128, 4096, [1249]),  # llama 3 8B's grouping, a long prompt
    (6, 2, 80, 200, [100, 101, 102]),  # a head size that is no power of two, a verify of 3
    (4, 4, 128, 1000, list(range(900, 916))),  # no grouping, 16 queries
    (9, 3, 64, 300, [10, 11, 12, 13, 14, 15, 16]),  # the demo model's heads
])
def test_cached_attention(device, dtype, heads, kv_heads, head_dim, ctx, positions, gen):
    pos = torch.tensor(positions)
    n, last = len(positions), max(positions)
    q = rand(n, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k_cache = rand(kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=gen)
    v_cache = rand(kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=gen)
    if use_triton(q):  # the kernel reads nothing past the furthest position: poison it
        k_cache[:, last + 1 :] = float("nan")
        v_cache[:, last + 1 :] = float("nan")
    scale = 1 / math.sqrt(head_dim)
    got = kernels.cached_attention(q, k_cache, v_cache, pos.to(device), scale)
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_error(got, naive_attention(q, k_cache, v_cache, pos, scale)) < TOLERANCE[dtype]


def test_kernel_choice_is_checked(monkeypatch):
    from shardrt.errors import ConfigError

    monkeypatch.setenv("SHARDRT_KERNELS", "cuda-graphs")
    with pytest.raises(ConfigError, match="SHARDRT_KERNELS: 'cuda-graphs' is not one of triton, torch"):
        kernels.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)
