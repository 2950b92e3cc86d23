"""Quantized matrix products on one GPU, kernel by kernel, against the memory's rate.

For each GGUF type and each matrix of a model's shape: the integer-dot kernel (kernels/qdot.py)
and the int8 tensor-core kernel (kernels/mmq.py), each over a sweep of its configs, the float
kernels of kernels/quant.py, dequantize + cuBLAS, and cuBLAS on the same matrix in bf16, for 1
to 64 activation rows. Each is timed as replays of a
CUDA graph over enough copies of the matrix that none stays in L2, and reported as GB/s of
weights read, beside the device's copy bandwidth (bytes read plus written by a 1 GiB copy).
The qdot kernel is checked against dequantize(W) @ dequantize(quantize(x)) before it is timed.
One JSON line on stdout, a table on stderr.

    python scripts/bench_matvec.py [--shape llama3-8b,llama3-70b] [--types q4_k,q6_k,q8_0] [--rows 1,2,4,8,16,64]
    python scripts/bench_matvec.py --write-config qdot.json   # fastest qdot config per matrix: SHARDRT_QDOT_CONFIG
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_gguf  # noqa: E402

from gguf import GGML_QUANT_SIZES  # noqa: E402
from shardrt.kernels import mmq, qdot, quant  # noqa: E402
from shardrt.kernels.quant import Q  # noqa: E402

MMQ_SWEEP = ((64, 4), (128, 4), (128, 8), (256, 8))  # (rows per program, warps)
SWEEP = ((1, 32, 1), (1, 64, 2), (2, 32, 2), (1, 128, 4), (2, 64, 4), (4, 32, 4), (2, 128, 8), (4, 64, 8))
MIN_BYTES = 256 << 20  # copies of a matrix per timing: at least this many bytes, well past the L2


def matrices(shape_name: str, vocab: int) -> dict[str, tuple[int, int]]:
    """The distinct (rows, cols) of one layer and the head, named."""
    s = make_gguf.SHAPES[shape_name]
    q, kv = s.heads * s.head_width, s.kv_heads * s.head_width  # head_width: its own head size where it has one
    return {"attn_qk": (q + kv, s.dim), "attn_v": (kv, s.dim), "attn_output": (s.dim, q),
            "ffn_gate_up": (2 * s.ffn, s.dim), "ffn_down": (s.dim, s.ffn), "output": (vocab, s.dim)}


def random_weight(qtype: Q, rows: int, cols: int, seed: int, device) -> quant.QuantizedWeight:
    """Random blocks with every f16 field a random sign times 1e-3..2e-3."""
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, block_bytes)
    for at in quant.F16_FIELDS[qtype]:
        values = (1e-3 * rng.uniform(1, 2, blocks.shape[:2]) * rng.choice((-1, 1), blocks.shape[:2])).astype(np.float16)
        blocks[..., at:at + 2] = values.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return quant.quantized_weight(raw, qtype, cols, torch.device(device))


def graph_time(ops, replays: int = 10) -> float:
    """Microseconds per op: the ops captured in one CUDA graph, replayed (after warm-up runs)."""
    for op in ops:
        op()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    for _ in range(3):
        graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1000 / (replays * len(ops))


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB, counting bytes read and written (eager: a copy
    captured in a graph becomes a copy-engine node, slower than torch's copy kernel)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    stop.record()
    stop.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(stop) * 1e6)


def check(qtype: Q, rows: int, cols: int) -> float:
    """Largest relative error of qdot against dequantize(W) @ dequantize(quantize(x)), 1 and 3 rows."""
    w = random_weight(qtype, rows, cols, 1, "cuda")
    dense = quant.dequantize(w, torch.float32).double()
    worst = 0.0
    for m in (1, 3):
        x = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
        xq = qdot.quantize_rows(x)
        want = xq.dequantize().double() @ dense.T
        out = torch.full((m, rows), float("nan"), device="cuda", dtype=torch.float32)
        qdot.linear(xq, w, out)
        worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
    return worst


def _compile(jobs: list[tuple]) -> int:
    """In a worker process: run each (kernel, qtype, cols, m, config) once on a small matrix, so
    that Triton's cache holds the kernel when the timing process asks for it."""
    for kernel, qtype, cols, m, config in jobs:
        w = random_weight(Q(qtype), 64, cols, 0, "cuda")
        xq = qdot.quantize_rows(torch.randn(m, cols, device="cuda", dtype=torch.bfloat16))
        (qdot if kernel == "qdot" else mmq).linear(xq, w, torch.empty(m, 64, device="cuda", dtype=torch.bfloat16),
                                                     tuple(config))
    torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs: list[tuple], workers: int) -> None:
    if workers <= 1 or not jobs:
        _compile(jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile, [jobs[i::workers] for i in range(workers)])


def bench_matrix(qtype: Q, rows: int, cols: int, row_counts: list[int], sweep: bool, log) -> dict:
    w0 = random_weight(qtype, rows, cols, 0, "cuda")
    copies = max(1, min(64, -(-MIN_BYTES // w0.nbytes)))
    weights = [w0] + [random_weight(qtype, rows, cols, 1 + i, "cuda") for i in range(copies - 1)]
    dense_copies = max(1, min(64, -(-MIN_BYTES // (rows * cols * 2))))
    dense = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(dense_copies)]
    entry: dict = {"rows": rows, "cols": cols, "block_mib": round(w0.nbytes / 2**20, 2), "copies": copies, "us": {}}
    configs: dict[int, list] = {}
    for m in row_counts:
        x = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, rows, device="cuda", dtype=torch.bfloat16)
        times: dict[str, float] = {}
        if m <= qdot.MAX_ROWS:
            xq = qdot.quantize_rows(x)
            tried = SWEEP if sweep and m == 1 else (tuple(configs.get(1, [])[:3]) or (qdot.config(qtype, rows, cols, m),))
            qdot_times = {}
            for config in tried:
                qdot_times[config] = graph_time([lambda w=w, c=config: qdot.linear(xq, w, out, c) for w in weights])
            ranked = sorted(qdot_times, key=qdot_times.get)
            configs[m] = ranked
            best = ranked[0]
            times["qdot"] = qdot_times[best]
            times["quantize"] = graph_time([lambda: qdot.quantize_rows(x)] * 8)
            entry.setdefault("qdot_config", {})[m] = list(best)
            if m == 1 and sweep:
                entry["sweep_us"] = {",".join(map(str, c)): round(t, 2) for c, t in qdot_times.items()}
        if m > 1 and qtype in mmq.MMQ_TYPES:
            xq = qdot.quantize_rows(x)
            block = mmq.BLOCKS.get(qtype, mmq.DEFAULT_BLOCK)
            mmq_times = {c: graph_time([lambda w=w, c=c: mmq.linear(xq, w, out, c) for w in weights])
                         for c in dict.fromkeys((block,) + (MMQ_SWEEP if sweep else ()))}
            times["mmq"] = mmq_times[block]
            entry.setdefault("mmq_sweep_us", {})[m] = {",".join(map(str, c)): round(t, 2) for c, t in mmq_times.items()}
        if m == 1 and qtype in quant.MATVEC_CONFIG:
            times["matvec"] = graph_time([lambda w=w: quant._matvec(x, w, out) for w in weights])
        if m <= quant.MAX_TILE_ROWS:
            times["tile"] = graph_time([lambda w=w: quant._fused_linear(x, w, out) for w in weights])
        times["dequantized"] = graph_time([lambda w=w: quant._dequantized_product(x, w, out) for w in weights[:4]])
        times["bf16_cublas"] = graph_time([lambda d=d: torch.mm(x, d.T, out=out) for d in dense])
        entry["us"][m] = {k: round(v, 2) for k, v in times.items()}
        log(f"  {qtype.name:7s} {rows:6d}x{cols:<6d} m={m:<3d} " + " ".join(
            f"{k} {v:8.1f}us ({w0.nbytes / v / 1e3:6.0f} GB/s)" if k != "bf16_cublas" else
            f"{k} {v:8.1f}us ({rows * cols * 2 / v / 1e3:6.0f} GB/s)" for k, v in times.items() if k != "quantize"))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", help="comma-separated shapes of scripts/make_gguf.py")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--types", default="q4_k,q6_k,q8_0")
    parser.add_argument("--rows", default="1,2,4,8,16,64", help="activation rows to time")
    parser.add_argument("--matrices", help="only these matrices (names as in the JSON)")
    parser.add_argument("--no-sweep", action="store_true", help="time the configured qdot config alone")
    parser.add_argument("--workers", type=int, default=8, help="processes compiling kernels ahead of the timing")
    parser.add_argument("--write-config", type=Path, help="write the fastest qdot configs (SHARDRT_QDOT_CONFIG)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    types = [Q[t.upper()] for t in args.types.split(",")]
    row_counts = sorted(int(m) for m in args.rows.split(","))
    shapes = {name: matrices(name, args.vocab) for name in args.shape.split(",")}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = {"bench": "matvec", "device": torch.cuda.get_device_name(0), "copy_gb_s": round(copy_bandwidth(), 1),
              "types": {}}
    log(f"copy bandwidth {report['copy_gb_s']} GB/s")
    wanted = [(t, shape, name, rc) for t in types for shape, mats in shapes.items() for name, rc in mats.items()
              if not args.matrices or name in args.matrices.split(",")]
    widths = sorted({(int(t), rc[1]) for t, _, _, rc in wanted})
    jobs = [("qdot", qt, cols, 1, c) for qt, cols in widths for c in (SWEEP if not args.no_sweep else ())]
    jobs += [("mmq", qt, cols, m, c) for qt, cols in widths if Q(qt) in mmq.MMQ_TYPES for m in row_counts if m > 1
             for c in (MMQ_SWEEP if not args.no_sweep else ())]
    precompile(jobs, args.workers)
    found: dict[str, list] = {}
    for qtype, shape, name, (rows, cols) in wanted:
        key = f"{qtype.name} {rows}x{cols}"
        if key in found:
            report["types"][qtype.name][f"{shape}/{name}"] = {"same_as": key}
            continue
        error = check(qtype, rows, cols)
        log(f"{key} ({shape} {name}): qdot relative error {error:.2e}")
        if not error < 1e-5:
            report["types"].setdefault(qtype.name, {})[f"{shape}/{name}"] = {"error": error}
            continue
        entry = bench_matrix(qtype, rows, cols, row_counts, not args.no_sweep, log)
        entry["qdot_error"] = error
        report["types"].setdefault(qtype.name, {})[f"{shape}/{name}"] = entry
        found[key] = entry.get("qdot_config")
    if args.write_config:
        args.write_config.write_text(json.dumps({key: cfg for key, cfg in found.items() if cfg}, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
