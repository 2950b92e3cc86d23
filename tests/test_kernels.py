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

from . import triton_targets
from .triton_interpreter import interpret

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["interleaved", "neox"])
def test_rope_kv_write_into_sequence_slots(device, dtype, style, gen):
    """A batch: token i goes to sequence slots[i]; the padding row (position -1) writes nothing."""
    heads, kv_heads, head_dim, ctx, seqs, base = 4, 2, 64, 40, 4, 10000.0
    slots, positions = torch.tensor([2, 0, 3, 1, 0]), torch.tensor([5, 39, 0, -1, 7])
    n = slots.shape[0]
    qkv = rand(n, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype, generator=gen)
    cos, sin = kernels.rope_tables(base, head_dim, ctx, device)
    k_cache = torch.full((seqs, kv_heads, ctx, head_dim), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    q = kernels.rope_kv_write(qkv, cos, sin, positions.to(device), k_cache, v_cache, heads, style,
                              slots=slots.to(device))

    q_in, k_in, v_in = qkv.double().cpu().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q_in, k_in, v_in = (t.reshape(n, -1, head_dim) for t in (q_in, k_in, v_in))
    assert rel_error(q, naive_rope(q_in, positions.clamp(min=0), base, head_dim, style)) < TOLERANCE[dtype]
    real = positions >= 0
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    want_k = naive_rope(k_in, positions.clamp(min=0), base, head_dim, style)
    assert rel_error(k_cache[slots[real], :, positions[real]], want_k[real]) < TOLERANCE[dtype]
    assert rel_error(v_cache[slots[real], :, positions[real]], v_in[real]) < TOLERANCE[dtype] / 4
    untouched = torch.ones(seqs, ctx, dtype=torch.bool)
    untouched[slots[real], positions[real]] = False
    assert torch.isnan(k_cache.transpose(1, 2)[untouched]).all() and torch.isnan(v_cache.transpose(1, 2)[untouched]).all()


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
    (8, 2, 64, 300, list(range(200, 240))),  # a prompt chunk of 40 (a graph's): programs of 16 queries
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,ctx,slots,positions", [
    (32, 8, 128, 2048, [3, 0, 2, 1], [1249, 0, 64, 700]),  # llama 3 8B's grouping, sequences of all lengths
    (9, 3, 64, 300, [1, 0, 2], [16, 299, 63]),  # the demo model's heads, the last place
    (4, 4, 80, 200, [0, 2, 1, 3, 0], [10, 199, -1, 5, -1]),  # no grouping, padding rows (position -1)
    (8, 2, 64, 128, list(range(20)), [i * 6 for i in range(20)]),  # more queries than a verify's 16
])
def test_cached_attention_over_sequence_slots(device, dtype, heads, kv_heads, head_dim, ctx, slots, positions, gen):
    """A batch: query i reads only sequence slots[i], keys 0..positions[i]; a padding row gives zeros."""
    slot, pos = torch.tensor(slots), torch.tensor(positions)
    n, seqs = len(slots), max(slots) + 1
    q = rand(n, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k_cache = rand(seqs, kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=gen)
    v_cache = rand(seqs, kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=gen)
    if use_triton(q):  # the kernel reads no sequence past its query's position: poison the rest
        for s in range(seqs):
            last = max((p for i, p in zip(slots, positions) if i == s), default=-1)
            k_cache[s, :, last + 1 :] = float("nan")
            v_cache[s, :, last + 1 :] = float("nan")
    scale = 1 / math.sqrt(head_dim)
    got = kernels.cached_attention(q, k_cache, v_cache, pos.to(device), scale, slot.to(device), batch=True)
    assert got.shape == q.shape and got.dtype == dtype
    real = pos >= 0
    assert (got[~real.to(device)] == 0).all()
    want = torch.cat([naive_attention(q[i : i + 1], k_cache[s], v_cache[s], pos[i : i + 1], scale)
                      for i, s in enumerate(slots) if positions[i] >= 0])
    assert rel_error(got[real.to(device)], want) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 37])
def test_cached_attention_of_one_sequence_among_slots(device, dtype, n, gen):
    """Tokens of one sequence (a graph's step in slot 2) read that sequence's cache alone."""
    heads, kv_heads, head_dim, ctx, seqs, slot = 8, 2, 64, 200, 4, 2
    pos = torch.arange(150 - n, 150)
    q = rand(n, heads, head_dim, device=device, dtype=dtype, generator=gen)
    k_cache = torch.full((seqs, kv_heads, ctx, head_dim), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[slot, :, :150] = rand(kv_heads, 150, head_dim, device=device, dtype=dtype, generator=gen)
    v_cache[slot, :, :150] = rand(kv_heads, 150, head_dim, device=device, dtype=dtype, generator=gen)
    scale = 1 / math.sqrt(head_dim)
    got = kernels.cached_attention(q, k_cache, v_cache, pos.to(device), scale, torch.full((n,), slot, device=device))
    assert rel_error(got, naive_attention(q, k_cache[slot], v_cache[slot], pos, scale)) < TOLERANCE[dtype]


# a mixed step: (slot, first position, rows) of each run, in row order; slot None: a padding row
MIXED_STEP = [(2, 40, 1), (0, 30, 20), (None, -1, 1), (3, 0, 5), (1, 10, 140), (4, 77, 16)]


def check_ragged(device: str, dtype: torch.dtype, window: int, sinks: bool = False) -> float:
    """ragged_attention over MIXED_STEP (a decode row, chunks of 20, 5 and 16 rows in tiles of the
    split-KV kernel, one of 140 through scaled_dot_product_attention, a padding row) against
    each row alone in float64; the relative error of the real rows (padding must give zeros).
    `sinks`: with gpt-oss's sink logit per head (the long run left out: the kernel takes all)."""
    from shardrt.kernels.attention import Runs, ragged_attention

    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, ctx, seqs = 8, 2, 64, 160, 5
    step = [run for run in MIXED_STEP if not (sinks and run[2] > 128)]
    slots = [s if s is not None else 0 for s, _, n in step for _ in range(n)]
    positions = [p + i if s is not None else -1 for s, p, n in step for i in range(n)]
    q = rand(len(slots), heads, head_dim, device=device, dtype=dtype, generator=g)
    k_cache = rand(seqs, kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=g)
    v_cache = rand(seqs, kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=g)
    sink = torch.randn(heads, generator=g) * 2 if sinks else None
    for s, p, n in step:  # nothing past a sequence's last row may be read: poison it
        if s is not None:
            k_cache[s, :, p + n :] = float("nan")
            v_cache[s, :, p + n :] = float("nan")
    scale = 1 / math.sqrt(head_dim)
    pos, slot = torch.tensor(positions, device=device), torch.tensor(slots, device=device)
    runs = Runs.of(slots, positions, pos)
    got = ragged_attention(q, k_cache, v_cache, pos, slot, runs, scale, window,
                           None if sink is None else sink.to(device)).double().cpu()
    real = torch.tensor(positions) >= 0
    assert (got[~real] == 0).all()
    want = torch.empty_like(got)
    qd, kd, vd = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    for t, (s, p) in enumerate(zip(slots, positions)):
        if p < 0:
            continue
        first = max(0, p - window + 1) if window else 0
        for h in range(heads):
            logits = kd[s, h // (heads // kv_heads), first : p + 1] @ qd[t, h] * scale
            if sink is not None:  # one more logit, with a zero value
                logits = torch.cat([logits, sink[h : h + 1].double()])
            weights = torch.softmax(logits, dim=0)[: p + 1 - first]
            want[t, h] = weights @ vd[s, h // (heads // kv_heads), first : p + 1]
    return rel_error(got[real], want[real])


def check_prefill_with_sinks(device: str, dtype: torch.dtype, window: int) -> float:
    """A prefill of 100 rows of one sequence through cached_attention with sinks (gpt-oss's, in
    programs of 16 rows and few splits), against float64."""
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, ctx, n = 8, 2, 64, 4096, 100
    q = rand(n, heads, head_dim, device=device, dtype=dtype, generator=g)
    k_cache = rand(kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=g)
    v_cache = rand(kv_heads, ctx, head_dim, device=device, dtype=dtype, generator=g)
    if use_triton(q):  # the kernel reads nothing past the last position (the reference masks the whole cache)
        k_cache[:, n:], v_cache[:, n:] = float("nan"), float("nan")
    sink = torch.randn(heads, generator=g) * 2
    scale = 1 / math.sqrt(head_dim)
    got = kernels.cached_attention(q, k_cache, v_cache, torch.arange(n, device=device), scale, window=window,
                                   sinks=sink.to(device)).double().cpu()
    qd, kd, vd = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    want = torch.empty_like(got)
    for t in range(n):
        first = max(0, t - window + 1) if window else 0
        for h in range(heads):
            logits = torch.cat([kd[h // (heads // kv_heads), first : t + 1] @ qd[t, h] * scale, sink[h : h + 1].double()])
            want[t, h] = torch.softmax(logits, dim=0)[:-1] @ vd[h // (heads // kv_heads), first : t + 1]
    return rel_error(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 24])
def test_a_prefill_with_sinks(device, dtype, window):
    assert check_prefill_with_sinks(device, dtype, window) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 24])
@pytest.mark.parametrize("sinks", [False, True])
def test_ragged_attention_of_a_mixed_step(device, dtype, window, sinks):
    assert check_ragged(device, dtype, window, sinks) < TOLERANCE[dtype]


@pytest.mark.skipif(kernels._triton.triton is None, reason="Triton is not installed")
def test_ragged_attention_tiles_under_the_interpreter():
    """The tiled split-KV kernel's source (and a sinks prefill), run by Triton's interpreter on the CPU."""
    errors = interpret("import json, torch; from tests.test_kernels import check_ragged; "
                       "from tests.test_kernels import check_prefill_with_sinks; "
                       "print(json.dumps([check_ragged('cpu', torch.float32, w, s) for w in (0, 24) for s in (0, 1)] "
                       "+ [check_prefill_with_sinks('cpu', torch.float32, w) for w in (0, 24)]))")
    assert all(e < TOLERANCE[torch.float32] for e in errors), errors


def check_delta_rule(device: str) -> dict:
    """qwen35's gated delta rule from a carried state: the one-token-at-a-time recurrence (the
    Triton kernel where it runs) and the chunked form against the reference in float64 (relative
    errors of the outputs and the final state), and whether the recurrence over t rows leaves the
    very state that m rows and then the rest do (what rollback by replay relies on); and the
    in-place form over slots named by an index, which must leave every other slot as it was."""
    from shardrt.kernels import deltanet as rule

    g = torch.Generator().manual_seed(5)
    b, t, key_heads, heads, k_dim, v_dim = 2, 70, 2, 4, 32, 24  # v_dim 24: a masked block; t > one chunk
    q = rule.l2_normalise(torch.randn(b, t, key_heads, k_dim, generator=g)) * k_dim ** -0.5
    k = rule.l2_normalise(torch.randn(b, t, key_heads, k_dim, generator=g))
    v = torch.randn(b, t, heads, v_dim, generator=g)
    decay, beta = -torch.rand(b, t, heads, generator=g), torch.rand(b, t, heads, generator=g)
    state = torch.randn(b, heads, k_dim, v_dim, generator=g)
    want_out, want_state = rule.recurrent_reference(*(x.double() for x in (q, k, v, decay, beta, state)))
    args = [x.to(device) for x in (q, k, v, decay, beta, state)]
    errors = {}
    for name, run in (("recurrent", rule.recurrent), ("chunked", rule.chunked)):
        out, after = run(*args)
        errors[name] = max(rel_error(out, want_out), rel_error(after, want_state))
    _, whole = rule.recurrent(*args)
    _, half = rule.recurrent(*(x[:, :30] for x in args[:5]), args[5])
    _, rest = rule.recurrent(*(x[:, 30:] for x in args[:5]), half)
    errors["split_equal"] = bool(torch.equal(whole, rest))
    slots = torch.randn(5, *state.shape[1:], generator=g).to(device)
    seqs = torch.tensor([3, 1], device=device)
    slots[seqs] = args[5]
    before = slots.clone()
    out = rule.recurrent_in_place(*args[:5], slots, seqs)
    errors["in_place"] = max(rel_error(out, want_out), rel_error(slots[seqs], want_state))
    errors["others_equal"] = bool(torch.equal(slots[[0, 2, 4]], before[[0, 2, 4]]))
    return errors


@pytest.mark.parametrize("device", DEVICES)
def test_the_delta_rule_recurrent_and_chunked(device):
    errors = check_delta_rule(device)
    assert errors.pop("split_equal") and errors.pop("others_equal") and max(errors.values()) < TOLERANCE[torch.float32], errors


@pytest.mark.skipif(kernels._triton.triton is None, reason="Triton is not installed")
def test_the_delta_rule_kernel_under_the_interpreter():
    """The recurrence's Triton source, run by Triton's interpreter on the CPU."""
    errors = interpret("import json; from tests.test_kernels import check_delta_rule; "
                       "print(json.dumps(check_delta_rule('cpu')))")
    assert errors.pop("split_equal") and errors.pop("others_equal") and max(errors.values()) < TOLERANCE[torch.float32], errors


def check_decode_step(device: str, dtype: torch.dtype) -> dict:
    """A DeltaNet decode step (one token of each of three sequences, one a padding row in the
    scratch slot, in a projection's strided views) against decode_step_reference, which runs the
    torch ops a layer ran before: relative errors of the outputs, the states and the kept row,
    whether the other slots and kept rows stayed as they were; and the gated norm. On the CPU
    without the interpreter both sides are the reference (errors 0)."""
    from shardrt.kernels import deltanet as rule

    g = torch.Generator().manual_seed(7)
    shape, width, slots = rule.Shape(key_heads=2, k_dim=32, heads=4, v_dim=24), 4, 6
    n, heads = 3, shape.heads
    proj = torch.randn(n, shape.conv_dim + heads * shape.v_dim + 2 * heads, generator=g).to(dtype).to(device)
    mixed, z, b, a = proj.split([shape.conv_dim, heads * shape.v_dim, heads, heads], dim=1)
    weight = (torch.randn(shape.conv_dim, width, generator=g) / 2).to(device)
    ssm_a, ssm_dt = -torch.rand(heads, generator=g).to(device) * 4, torch.randn(heads, generator=g).to(device)
    conv = torch.randn(slots, shape.conv_dim, width - 1, generator=g).to(dtype).to(device)
    ssm = torch.randn(slots, heads, shape.k_dim, shape.v_dim, generator=g).to(device)
    seqs = torch.tensor([3, 1, slots - 1], device=device)  # the last: a padding row's scratch slot
    kept_at = torch.tensor([2], device=device)
    kept_shapes = ((shape.conv_dim,), (2, 32), (2, 32), (heads, shape.v_dim), (heads,), (heads,))
    kept = [torch.randn(5, *s, generator=g).to(device) for s in kept_shapes]
    kept[0] = kept[0].to(dtype)
    runs = {}
    for name, step in (("kernel", rule.decode_step), ("reference", rule.decode_step_reference)):
        states, rows = (conv.clone(), ssm.clone()), [r.clone() for r in kept]
        out = step(mixed, a, b, *states, seqs, weight, ssm_a, ssm_dt, shape, tuple(rows), kept_at)
        runs[name] = out, states, rows
    (out, (c, s), rows), (want, (wc, ws), wrows) = runs["kernel"], runs["reference"]
    live = seqs[:2]
    others = [i for i in range(slots) if i not in (1, 3, slots - 1)]
    gated = rule.gated_rms_norm(out, z.view(n, heads, shape.v_dim), weight.flatten()[:shape.v_dim].to(dtype), 1e-6, dtype)
    gated_want = rule.gated_rms_norm_reference(out.to(dtype), z.view(n, heads, shape.v_dim),
                                               weight.flatten()[:shape.v_dim].to(dtype), 1e-6)
    return {"out": rel_error(out[:2], want[:2].double().cpu()),
            "conv": rel_error(c[live], wc[live].double().cpu()), "ssm": rel_error(s[live], ws[live].double().cpu()),
            "kept": max(rel_error(r[2], w[2].double().cpu()) for r, w in zip(rows, wrows)),
            "gated": rel_error(gated, gated_want.double().cpu()),
            "others_equal": bool(torch.equal(c[others], conv[others]) and torch.equal(s[others], ssm[others])
                                 and all(torch.equal(r[[0, 1, 3, 4]], k[[0, 1, 3, 4]]) for r, k in zip(rows, kept)))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_deltanet_decode_step(device, dtype):
    errors = check_decode_step(device, dtype)
    assert errors.pop("others_equal") and max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.skipif(kernels._triton.triton is None, reason="Triton is not installed")
def test_the_deltanet_decode_kernels_under_the_interpreter():
    """The decode step's two kernels and the gated norm's, run by Triton's interpreter on the CPU."""
    errors = interpret("import json, torch; from tests.test_kernels import check_decode_step; "
                       "print(json.dumps([check_decode_step('cpu', torch.float32), check_decode_step('cpu', torch.bfloat16)]))")
    for each, dtype in zip(errors, DTYPES):
        assert each.pop("others_equal") and max(each.values()) < TOLERANCE[dtype], (dtype, each)


@pytest.mark.skipif(not triton_targets.HAVE_PTXAS, reason="needs Triton with its ptxas")
@pytest.mark.parametrize("keep", [False, True])
def test_the_deltanet_decode_kernels_build_for_hopper(keep):
    """The decode step's kernels through Triton's compiler and ptxas for sm_90 (an H100/H200) on
    this machine, at Qwen3.6-27B's shapes: what the interpreter cannot show (a construct the
    compiler refuses, shared memory past the limit) shows here, before any GPU runs them."""
    from shardrt.kernels import deltanet as rule

    bf16, f32, i64 = (torch.empty(1, dtype=t) for t in (torch.bfloat16, torch.float32, torch.int64))
    proj = 10240 + 6144 + 2 * 48  # conv_dim + inner + beta and decay inputs
    conv = triton_targets.build(rule._conv_step_kernel, dict(
        mixed_ptr=bf16, mixed_stride=proj, state_ptr=bf16, weight_ptr=f32, seqs_ptr=i64, out_ptr=bf16, kept_ptr=bf16,
        kept_at_ptr=i64, C=10240), dict(WIDTH=4, BLOCK_W=4, BLOCK_C=256, KEEP=keep), 90, 4)
    step = triton_targets.build(rule._decode_rule_kernel, dict(
        qkv_ptr=bf16, a_ptr=bf16, b_ptr=bf16, a_stride=proj, b_stride=proj, ssm_a_ptr=f32, ssm_dt_ptr=f32,
        state_ptr=f32, out_ptr=f32, seqs_ptr=i64, kept_q_ptr=f32, kept_k_ptr=f32, kept_v_ptr=f32, kept_g_ptr=f32,
        kept_beta_ptr=f32, kept_at_ptr=i64, H=48, HK=16, DK=128, DV=128, scale=128 ** -0.5, eps=1e-6),
        dict(BLOCK_K=128, BLOCK_V=64, KEEP=keep), 90, 4)
    norm = triton_targets.build(rule._gated_rms_norm_kernel, dict(
        x_ptr=f32, gate_ptr=bf16, gate_stride=proj, weight_ptr=f32, out_ptr=bf16, H=48, D=128, eps=1e-6),
        dict(BLOCK=128, ROUND=False), 90, 4)
    for kernel in (conv, step, norm):
        assert kernel.asm["cubin"] and kernel.metadata.shared <= triton_targets.SHARED_LIMIT[90]


def test_kernel_choice_is_checked(monkeypatch):
    from shardrt.errors import ConfigError

    monkeypatch.setenv("SHARDRT_KERNELS", "cuda-graphs")
    with pytest.raises(ConfigError, match="SHARDRT_KERNELS: 'cuda-graphs' is not one of triton, torch"):
        kernels.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)
