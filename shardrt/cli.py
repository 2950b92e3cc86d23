"""The `shardrt` command line. Turns every shardrt error into one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, ShardrtError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="GGUF file (default: the SmolLM2-135M demo model)")
    p.add_argument("--model", "-m", dest="model_opt", metavar="PATH", help="GGUF file (same as MODEL)")
    p.add_argument("--target-gpus", metavar="LIST", help="devices, e.g. cuda:0,hip:0 or cpu:0 (default: first GPU, else cpu:0)")
    p.add_argument("--max-ctx", type=int, default=4096, metavar="N", help="KV cache length in tokens (default 4096)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardrt", description="Run one GGUF model across the devices of a mixed box.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="generate text from a prompt")
    _add_model_args(launch)
    launch.add_argument("-p", "--prompt", help="prompt text (with --chat and no prompt: interactive chat)")
    launch.add_argument("-n", "--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    launch.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    launch.add_argument("--top-k", type=int, default=0)
    launch.add_argument("--top-p", type=float, default=1.0)
    launch.add_argument("--seed", type=int, default=None)
    launch.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    launch.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    launch.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return parser


def _model_path(args) -> Path:
    from .demo_model import demo_model_path

    if args.model_pos and args.model_opt and args.model_pos != args.model_opt:
        raise ConfigError(f"--model: given twice ({args.model_pos!r} and {args.model_opt!r})")
    chosen = args.model_opt or args.model_pos
    if chosen is None:
        return demo_model_path(progress=not args.json)
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise ConfigError(f"--model: {chosen!r} is not a file")
    return path


def cmd_launch(args) -> int:
    from .generate import generate
    from .pipeline import Pipeline
    from .placement import default_device, parse_devices
    from .sampling import SamplingParams
    from .stage import Stage
    from .tokenizer import Tokenizer

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    devices = parse_devices(args.target_gpus) if args.target_gpus else (default_device(),)
    if len(devices) > 1:
        raise ConfigError(f"--target-gpus: {args.target_gpus!r} names several devices; this build runs one")
    if args.prompt is None and not args.chat:
        raise ConfigError("--prompt: missing; give -p TEXT (or --chat for an interactive chat)")
    model = _model_path(args)
    tokenizer = Tokenizer(model)
    from .gguf_file import GGUFFile
    from .model import ModelConfig

    with GGUFFile(model) as gguf:
        n_layers = ModelConfig.from_gguf(gguf).n_layers
    stage = Stage(model, 0, n_layers, devices[0].torch_device(), max_ctx=args.max_ctx)
    pipeline = Pipeline([stage])
    logging.getLogger(__name__).info("%s", stage.describe())

    if args.chat and args.prompt is None:
        return _interactive_chat(pipeline, tokenizer, params)
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat \
        else tokenizer.encode(args.prompt)
    if args.json:
        result = generate(pipeline, tokenizer, prompt_ids, params)
        print(json.dumps(result.to_json()))
        return 0
    if not args.chat:
        print(args.prompt, end="", flush=True)
    result = generate(pipeline, tokenizer, prompt_ids, params, on_text=lambda s: print(s, end="", flush=True))
    print()
    print(f"[{len(prompt_ids)} prompt tokens, {result.prefill_tokens_per_s:.1f} tok/s prefill; "
          f"{len(result.tokens)} generated, {result.decode_tokens_per_s:.1f} tok/s decode; {stage.describe()}]",
          file=sys.stderr)
    return 0


def _interactive_chat(pipeline, tokenizer, params) -> int:
    from .generate import generate

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
        result = generate(pipeline, tokenizer, tokenizer.encode_chat(messages), params,
                          on_text=lambda s: print(s, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": result.text})


COMMANDS = {"launch": cmd_launch}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="shardrt: %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ShardrtError as exc:
        print(f"shardrt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shardrt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
