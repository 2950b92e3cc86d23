"""A mixture of experts' decode on one GPU, kernel by kernel, against the memory's rate.

Qwen3-30B-A3B's experts (dim 2048, expert ffn 768, top 8; Q4_K gate and up, down in Q6_K or
Q4_K as Q4_K_M's layers have it) for 1 to 8 tokens: the grouped gate/up kernel and the down
kernel (kernels/moe_qdot.py) over a sweep of their configs (rows per program, units per step,
warps) beside the one `moe_qdot.config` picks, and the whole routed feed-forward of a layer
(router, top k, both quantizations, both kernels) as `kernels.moe` runs it. Each is timed as
replays of a CUDA graph over enough layers' experts that none stays in L2, and reported as µs
and GB/s of the chosen experts' bytes. Each config is checked against the default one first.
One JSON line on stdout, a table on stderr.

    python scripts/bench_moe.py [--tokens 1,2,4,8] [--down q6_k,q4_k] [--experts 128] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_matvec import graph_time, random_weight  # noqa: E402

from shardrt import kernels  # noqa: E402
from shardrt.kernels import moe_qdot, qdot  # noqa: E402
from shardrt.kernels.experts import QuantizedExperts  # noqa: E402
from shardrt.kernels.quant import Q  # noqa: E402

SWEEP = ((1, 16, 1), (1, 32, 2), (2, 16, 2), (2, 32, 4), (4, 32, 4), (4, 16, 4), (1, 16, 4), (2, 16, 8), (8, 32, 8),
         (4, 32, 8), (1, 32, 8))
DIM, FFN, TOP_K = 2048, 768, 8


def random_experts(qtype: Q, count: int, rows: int, cols: int, seed: int) -> QuantizedExperts:
    return QuantizedExperts(random_weight(qtype, count * rows, cols, seed, "cuda"), count)


def chosen_bytes(w: QuantizedExperts, slots: int) -> int:
    """What the kernels read of `w` for `slots` slots: an expert's matrix each."""
    return w.nbytes // w.count * slots


def sweep(name: str, run, layers: list, moved: int, log) -> dict:
    """µs per layer of `run(layer, config)` for the default config (None) and each of SWEEP that
    gives what the default gives."""
    want = run(layers[0], None).float()
    times = {}
    for config in (None,) + SWEEP:
        got = run(layers[0], config).float()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()):
            times[str(config)] = "wrong"
            continue
        times["default" if config is None else ",".join(map(str, config))] = graph_time(
            [lambda layer=layer, c=config: run(layer, c) for layer in layers])
    ranked = sorted((k for k, v in times.items() if v != "wrong"), key=times.get)
    log(f"  {name}: default {times['default']:7.1f}us ({moved / times['default'] / 1e3:5.0f} GB/s), best {ranked[0]} "
        f"{times[ranked[0]]:7.1f}us ({moved / times[ranked[0]] / 1e3:5.0f} GB/s)")
    rate = {f"gb_s_{which}": round(moved / times[key] / 1e3, 1) for which, key in (("default", "default"),
                                                                                    ("best", ranked[0]))}
    return {"us": {k: (round(v, 2) if v != "wrong" else v) for k, v in times.items()}, "best": ranked[0], **rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--down", default="q6_k,q4_k", help="types of the down experts to time")
    parser.add_argument("--experts", type=int, default=128, help="experts per layer")
    parser.add_argument("--layers", type=int, default=12, help="layers of experts each timing cycles through")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    gen = torch.Generator("cuda").manual_seed(0)
    report: dict = {"bench": "moe", "device": torch.cuda.get_device_name(0), "experts": args.experts, "top_k": TOP_K,
                    "dim": DIM, "expert_ffn": FFN, "tokens": {}}
    layers = [tuple(random_experts(Q.Q4_K, args.experts, FFN, DIM, 2 * i + j) for j in range(2))
              for i in range(args.layers)]
    downs = {t: [random_experts(Q[t.upper()], args.experts, DIM, FFN, 100 + i) for i in range(args.layers)]
             for t in args.down.split(",")}
    router = torch.randn(args.experts, DIM, device="cuda", generator=gen).bfloat16()
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, DIM, device="cuda", generator=gen).bfloat16()
        ids = torch.rand(n, args.experts, device="cuda", generator=gen).topk(TOP_K, dim=1).indices
        weights = torch.rand(n, TOP_K, device="cuda", generator=gen).bfloat16()
        xq = qdot.quantize_rows(x)
        hq = qdot.quantize_rows(moe_qdot.gate_up_silu(xq, ids, *layers[0]))
        entry: dict = {"gate_up_config": moe_qdot.config((Q.Q4_K, Q.Q4_K), FFN, DIM, n * TOP_K)}  # the default
        log(f"{n} token(s), {n * TOP_K} slots")
        entry["gate_up"] = sweep("gate_up Q4_K", lambda layer, c: moe_qdot.gate_up_silu(xq, ids, *layer, c), layers,
                                 2 * chosen_bytes(layers[0][0], n * TOP_K), log)
        for t, down in downs.items():
            entry[f"down_{t}"] = sweep(f"down {t.upper()}", lambda layer, c: moe_qdot.down_weighted(
                hq, ids, weights, layer, torch.bfloat16, c), down, chosen_bytes(down[0], n * TOP_K), log)
            entry[f"down_{t}_config"] = moe_qdot.config((Q[t.upper()],), DIM, FFN, n, TOP_K)
            feed_forward = graph_time([lambda g=g, d=d: kernels.moe(x, router, g, d, TOP_K)
                                       for g, d in zip(layers, down)])
            entry[f"moe_layer_{t}_us"] = round(feed_forward, 2)
            log(f"  the whole routed feed-forward, down {t.upper()}: {feed_forward:7.1f}us per layer")
        report["tokens"][n] = entry
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
