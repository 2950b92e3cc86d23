"""The `shardrt` command line. Turns every shardrt error into one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import replace

from . import __version__
from .errors import ConfigError, PlacementError, ShardrtError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SERVE_MAX_SEQS = 8  # sequences `serve` decodes together by default


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file (default: the SmolLM2-135M demo model)")
    p.add_argument("--model", "-m", dest="model_opt", metavar="PATH", help="GGUF file (same as MODEL)")
    p.add_argument("--config", "-c", metavar="FILE", help="YAML placement file; flags override it")
    p.add_argument("--target-gpus", metavar="LIST",
                   help="devices as [HOST/]BACKEND:INDEX, e.g. cuda:0,hip:0,hip:1, cpu:0, or cuda:0,nodeb/hip:0 with a "
                        "device on host nodeb (default: first GPU, else cpu:0)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="the Ray cluster that starts the daemons of devices on other hosts: ray://HOST:PORT, "
                        "HOST:PORT or auto (needs pip install 'shardrt[cluster]')")
    p.add_argument("--layer-split", metavar="W,W,...",
                   help="positive weights, one per device, or auto: by each device's free memory (default: even by layers)")
    p.add_argument("--vram-reserve", metavar="BYTES", default=None,
                   help="memory to leave free on each GPU, e.g. 2G (default 512M, 2.5G on a GPU driving a display)")
    p.add_argument("--allow-cpu-overflow", action="store_true",
                   help="with --layer-split auto: layers the GPUs cannot hold go to a cpu:0 stage at the end")
    p.add_argument("--isolate-gpus", dest="isolate_gpus", action="store_true", default=None,
                   help="one daemon per device beyond the first (default)")
    p.add_argument("--no-isolate-gpus", dest="isolate_gpus", action="store_false",
                   help="one daemon per backend group; the first device's group stays in-process")
    p.add_argument("--all-daemons", action="store_true", help="run every stage in a daemon; the coordinator holds no device")
    p.add_argument("--max-ctx", default=None, metavar="N",
                   help="KV cache length in tokens (default 4096), or auto: the largest that fits every device")
    p.add_argument("--max-seqs", type=int, default=None, metavar="N",
                   help="sequences each stage's KV cache holds, decoded together under serve (default 1; "
                        "serve: 8)")
    p.add_argument("--dtype", default=None, metavar="T",
                   help="compute dtype: auto (default: float32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--no-graphs", action="store_true",
                   help="run GPU stages eagerly, without captured graphs (for debugging and comparison)")
    p.add_argument("--weights", default=None, metavar="HOW",
                   help="auto (default: GPU stages keep GGUF blocks of Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS and MXFP4 where "
                        "the quantized kernels run, CPU stages dequantize), quantized (blocks on every GPU) or "
                        "dequantized (every weight in the compute dtype)")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding and prefix cache")
    g.add_argument("--draft", choices=("none", "ngram", "model", "capture"), default=None,
                   help="drafter: prompt lookup, a draft model in its own daemon, or capture slices (early exit)")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="draft tokens per target forward (default 4)")
    g.add_argument("--draft-model", metavar="PATH", help="draft GGUF with the target's vocabulary (implies --draft model)")
    g.add_argument("--draft-gpu", metavar="DEVICE", help="the draft daemon's device, e.g. hip:1 (default cpu:0)")
    g.add_argument("--capture-layers", metavar="L,L", help="layers whose hidden states feed the capture drafter")
    g.add_argument("--prefix-cache-slots", type=int, default=None, metavar="N",
                   help="KV snapshots kept for prefix reuse (default 16, 0 disables)")


def _add_pflash_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative prefill (PFlash)")
    g.add_argument("--pflash-model", metavar="PATH",
                   help="a small drafter GGUF (any vocabulary) that reads long prompts in its own daemon and keeps the "
                        "tokens that matter; the target prefills only those")
    g.add_argument("--pflash-gpu", metavar="DEVICE", help="the drafter daemon's device, e.g. hip:1 (default cpu:0)")
    g.add_argument("--pflash-keep", metavar="F", default=None,
                   help="fraction of a long prompt's tokens kept, in (0, 1] (default 0.05)")
    g.add_argument("--pflash-min-prompt", type=int, default=None, metavar="N",
                   help="prompts of at most N tokens pass through unchanged (default 2048)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser = argparse.ArgumentParser(prog="shardrt", description="Run one GGUF model across the devices of a mixed box.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"shardrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="generate text from a prompt", parents=[common])
    _add_placement_args(launch)
    launch.add_argument("-p", "--prompt", help="prompt text (with --chat and no prompt: interactive chat)")
    launch.add_argument("-n", "--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    launch.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    launch.add_argument("--top-k", type=int, default=0)
    launch.add_argument("--top-p", type=float, default=1.0)
    launch.add_argument("--seed", type=int, default=None)
    launch.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    launch.add_argument("--ignore-eos", action="store_true", help="generate all N tokens even past end-of-sequence")
    launch.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    launch.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    _add_spec_args(launch)
    _add_pflash_args(launch)

    plan = sub.add_parser("plan", help="print the shard table without loading weights", parents=[common])
    _add_placement_args(plan)
    plan.add_argument("--json", action="store_true", help="print the table as JSON")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server", parents=[common])
    _add_placement_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--max-queue", type=int, default=None, metavar="N",
                       help="requests that may wait beyond the free sequence slots; more get 503 with Retry-After "
                            "(default: 4 x --max-seqs, at least 16)")
    serve.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                       help="rows of one batched step: every running sequence's token, then chunks of waiting "
                            "prompts while there is room (default 512)")
    serve.add_argument("--step-log", metavar="FILE",
                       help="append a JSON line per batched step and per request to FILE (where a request's time goes)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (the API has no authentication)")
    serve.add_argument("--served-model-name", metavar="NAME", help="the model name clients give (default: the GGUF file name)")
    _add_spec_args(serve)
    _add_pflash_args(serve)  # a request opts in with "pflash": true

    devices = sub.add_parser("devices", help="list the GPUs of every backend and the CPU", parents=[common])
    devices.add_argument("--json", action="store_true", help="one JSON list")
    return parser


def _resolve(args):
    """The launch configuration and the model file it names (the demo model by default)."""
    from .config import from_args
    from .demo_model import demo_model_path

    config = from_args(args)
    model = config.model or demo_model_path(progress=not getattr(args, "json", False))
    return config, model


def cmd_launch(args) -> int:
    from .launch import Cluster
    from .pflash import PromptText
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.prompt is None and not args.chat:
        raise ConfigError("--prompt: missing; give -p TEXT (or --chat for an interactive chat)")
    config, model = _resolve(args)
    tokenizer = Tokenizer(model)
    with Cluster(config, model) as cluster:
        pipeline = cluster.pipeline
        for stage in pipeline.stages:
            logging.getLogger(__name__).info("%s", stage.describe())
        if args.chat and args.prompt is None:
            return _interactive_chat(cluster, tokenizer, params)
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = tokenizer.encode_chat(messages) if args.chat else tokenizer.encode(args.prompt)
        prompt = None  # its text, for PFlash
        if config.pflash is not None:
            prompt = PromptText.from_chat(tokenizer, messages) if args.chat else PromptText.plain(args.prompt)
        if args.json:
            result = cluster.generate(tokenizer, prompt_ids, params, prompt=prompt)
            out = result.to_json()
            out["stages"] = [stage.describe() for stage in pipeline.stages]
            print(json.dumps(out))
            return 0
        if not args.chat:
            print(args.prompt, end="", flush=True)
        result = cluster.generate(tokenizer, prompt_ids, params, on_text=lambda s: print(s, end="", flush=True),
                                  prompt=prompt)
        print()
        print(f"[{len(result.prompt_tokens)} prompt tokens, {result.prefill_tokens_per_s:.1f} tok/s prefill; "
              f"{len(result.tokens)} generated, {result.decode_tokens_per_s:.1f} tok/s decode; "
              f"{len(pipeline.stages)} stage(s)" + _spec_line(result.spec) + _pflash_line(result.pflash) + "]",
              file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from .devices import discover, missing
    from .gguf_file import GGUFFile
    from .launch import plan_placement
    from .memory import holds_blocks, planned_kernels, remote_pools
    from .model import ModelConfig
    from .placement import LOCAL_HOST_WORD

    config, model = _resolve(args)
    found = discover(config.pythons)
    with GGUFFile(model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        placement = plan_placement(config, gguf, cfg, found)
    config, rows = placement.config, placement.rows
    absent = [d for d in missing(config.devices, found) if not d.remote]  # discovery sees this machine only
    table = [{
        "host": r.process.host or LOCAL_HOST_WORD,
        "backend": r.shard.device.backend, "device": str(r.shard.device), "process": r.process.label,
        "where": r.process.where,
        "local_device": r.process.local_index(r.shard.device) if r.shard.device.is_gpu else None,
        "pinned_env": r.process.child_env(), "layers": str(r.span), "weight_bytes": r.weight_bytes,
        "device_weight_bytes": r.device_bytes, "kv_bytes": r.need.kv, "state_bytes": r.need.state,
        "working_bytes": r.need.scratch + r.need.runtime,
        "need_bytes": r.need.total, "memory_pool": placement.pools[r.shard.device], "cover": r.cover,
        "python": _python_of(config, r.process), "kernels": planned_kernels(r.shard.device).describe(),
        "weights_held": "blocks" if holds_blocks(r.shard.device, config.weights) else "dense",
    } for r in rows]
    pools = {name: {"device": str(m.spec), "name": m.name, "free_bytes": m.free, "total_bytes": m.total,
                    "reserve_bytes": m.reserve, "usable_bytes": m.usable} for name, m in placement.memory.items()}
    unchecked = remote_pools(placement.pools)
    refused = placement.refusal()
    if args.json:
        print(json.dumps({"model": str(model), "layers": cfg.n_layers, "max_ctx": config.max_ctx,
                          "max_seqs": config.seqs,
                          "layer_split": list(config.layer_split) if config.layer_split else None,
                          "shards": table, "memory": pools, "unchecked_memory": unchecked, "fits": refused is None,
                          "missing": [str(d) for d in absent]}))
    else:
        _print_plan(model, cfg, config, table, pools, unchecked, absent)
    if refused:
        raise PlacementError(refused)
    return 0


def _python_of(config, process) -> str:
    """The interpreter that runs this process, as `plan` reports it."""
    if process.in_process:
        return "coordinator"
    if process.remote:
        return config.host(process.host).python(process.backend) or f"{sys.executable} on {process.host}"
    return config.pythons.get(process.backend, "this interpreter")


def _print_plan(model, cfg, config, table: list[dict], pools: dict, unchecked: dict, absent: list) -> None:
    gib = 1 << 30
    seqs = f" x {config.seqs} sequences" if config.seqs > 1 else ""
    print(f"model {model.name}: {cfg.arch}, {cfg.n_layers} layers, max_ctx {config.max_ctx}{seqs}")
    # the KV cache column holds the DeltaNet layers' recurrent state too (qwen35): both are per sequence
    headers = ("host", "backend", "device", "process", "pinned env", "layers", "weights", "KV cache", "needs",
               "kernels", "span cover")
    cells = [(t["host"], t["backend"], t["device"] + (f" (local {t['local_device']})" if t["local_device"] is not None
                                                       and t["process"] != "coordinator" else ""),
              " ".join(filter(None, (t["process"], t["where"]))),
              " ".join(f"{k}={v}" for k, v in t["pinned_env"].items()) or "-", t["layers"],
              f"{t['device_weight_bytes'] / (1 << 20):.1f} MiB {t['weights_held']}",
              f"{(t['kv_bytes'] + t['state_bytes']) / (1 << 20):.1f} MiB",
              f"{t['need_bytes'] / gib:.2f} GiB", t["kernels"], t["cover"]) for t in table]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *cells)]
    for line in (headers, *cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    for name, m in pools.items():
        need = sum(t["need_bytes"] for t in table if t["memory_pool"] == name)
        print(f"memory {name} ({m['name']}): needs {need / gib:.2f} GiB of {m['usable_bytes'] / gib:.2f} GiB usable "
              f"({m['free_bytes'] / gib:.2f} free of {m['total_bytes'] / gib:.2f}, {m['reserve_bytes'] / gib:.2f} reserved)")
    for name, host in unchecked.items():
        print(f"memory {name}: not checked here (on host {host})")
    if absent:
        print(f"missing on this machine: {', '.join(str(d) for d in absent)} (the plan stands; launch needs them)")


def cmd_serve(args) -> int:
    from .server.batch import MAX_BATCH_TOKENS
    from .server.serve import ServeOptions, check_address, serve

    options = ServeOptions(host=args.host, port=args.port, max_queue=args.max_queue, allow_remote=args.allow_remote,
                           model_name=args.served_model_name, step_log=args.step_log,
                           max_batch_tokens=MAX_BATCH_TOKENS if args.max_batch_tokens is None else args.max_batch_tokens)
    check_address(options)  # before the model is fetched or loaded
    config, model = _resolve(args)
    if config.max_seqs is None:  # decode requests together (a drafter drafts for a request alone)
        config = replace(config, max_seqs=SERVE_MAX_SEQS)
    code = serve(config, model, options)
    # Everything is shut down and cleaned up by now (stages closed, segments unlinked, HTTP threads
    # joined, each join bounded). Leave without the interpreter's finalization: a daemon thread
    # still unwinding past its bounded join can abort it there (CPython's fatal error on the
    # stderr lock at shutdown), turning a clean stop into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_devices(args) -> int:
    from .devices import discover

    if args.json:
        print(json.dumps([info.to_json() for info in discover()]))
        return 0
    for info in discover():
        kind = "host" if not info.spec.is_gpu else "integrated" if info.integrated else "discrete"
        print(f"{str(info.spec):8} {info.name:40} {info.free_bytes / (1 << 30):7.1f} GiB free of "
              f"{info.total_bytes / (1 << 30):7.1f} GiB  {kind}" + ("  (drives a display)" if info.display else ""))
    return 0


def _spec_line(spec: dict | None) -> str:
    if not spec:
        return ""
    return (f"; {spec['drafter']} draft: {spec['accepted']}/{spec['drafted']} accepted, "
            f"{spec['acceptance_length']} tokens per target forward")


def _pflash_line(pflash: dict | None) -> str:
    if not pflash:
        return ""
    if pflash["passed_through"]:
        return f"; pflash passed the prompt through ({pflash['passed_through']})"
    return (f"; pflash kept {pflash['kept_tokens']} of {pflash['prompt_tokens']} prompt tokens "
            f"({100 * pflash['keep_ratio']:.1f}%) in {pflash['drafter_ms']:.0f} ms")


def _interactive_chat(cluster, tokenizer, params) -> int:
    from .pflash import PromptText

    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = PromptText.from_chat(tokenizer, messages) if cluster.pflash is not None else None
        result = cluster.generate(tokenizer, tokenizer.encode_chat(messages), params,
                                  on_text=lambda s: print(s, end="", flush=True), prompt=prompt)
        print()
        messages.append({"role": "assistant", "content": result.text})


COMMANDS = {"launch": cmd_launch, "plan": cmd_plan, "devices": cmd_devices, "serve": cmd_serve}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="shardrt: %(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so every daemon, socket and segment is cleaned up
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return COMMANDS[args.command](args)
    except ShardrtError as exc:
        print(f"shardrt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shardrt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `shardrt plan | head`: the reader has gone, and so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
