"""The launch configuration: a YAML placement file and command-line flags, merged (flags win).

Parsed at the edge into a frozen `LaunchConfig`; unknown keys, wrong types and malformed
values are refused with the field and the value named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, PlacementError
from .ipc.protocol import MAX_BATCH
from .placement import BACKENDS, DeviceSpec, parse_device, parse_devices, parse_layer_split

MIN_SHARED_BYTES = 64 * 1024
SHARED_BYTES_ENV = "SHARDRT_IPC_SHARED_BYTES"
TOP_KEYS = {"model", "max_ctx", "max_seqs", "dtype", "graphs", "weights", "reserve", "backends", "target", "draft", "ipc"}
WEIGHTS = ("quantized", "dequantized")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGET_KEYS = {"devices", "layer_split", "isolate_gpus", "all_daemons", "allow_cpu_overflow"}
IPC_KEYS = {"shared_bytes"}
DRAFT_KEYS = {"kind", "model", "device", "tokens", "capture_layers"}
DRAFT_KINDS = ("ngram", "model", "capture")
MAX_DRAFT_TOKENS = 32
BACKEND_KEYS = {"python"}


@dataclass(frozen=True)
class DraftConfig:
    """Speculative decoding: which drafter, and for `model` its GGUF and device."""

    kind: str
    model: Path | None = None
    device: DeviceSpec | None = None  # the draft daemon's device; default cpu:0
    tokens: int = 4  # draft tokens verified per target forward
    capture_layers: tuple[int, ...] = ()  # default: two thirds of the way up

    def __post_init__(self):
        if self.kind not in DRAFT_KINDS:
            raise ConfigError(f"draft.kind: {self.kind!r} is not one of {', '.join(DRAFT_KINDS)}")
        if self.kind == "model" and self.model is None:
            raise ConfigError("draft.model: the model drafter needs a draft GGUF (--draft-model PATH)")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 1 <= self.tokens <= MAX_DRAFT_TOKENS:
            raise ConfigError(f"draft.tokens: {self.tokens!r} is not a whole number in 1..{MAX_DRAFT_TOKENS}")


def parse_capture_layers(value: Any, where: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{where}: {value!r} is not a list of layer ids such as 10,20")
    layers = []
    for item in items:
        try:
            layer = int(item) if not isinstance(item, bool) else -1
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {item!r} is not a layer id") from None
        if layer < 0:
            raise ConfigError(f"{where}: {item!r} is not a layer id >= 0")
        layers.append(layer)
    return tuple(layers)


@dataclass(frozen=True)
class LaunchConfig:
    model: Path | None = None  # None: the demo model
    max_ctx: int = 4096
    max_ctx_auto: bool = False  # the largest context that fits every device (memory.py)
    devices: tuple[DeviceSpec, ...] = ()  # empty: the first GPU torch sees, else cpu:0
    layer_split: tuple[float, ...] | str | None = None  # None: even by layer count; "auto": by free memory
    allow_cpu_overflow: bool = False  # with "auto": layers no GPU holds go to a cpu:0 stage at the end
    reserve: int | None = None  # bytes left free on each GPU (None: memory.py's defaults)
    isolate_gpus: bool = True
    all_daemons: bool = False
    pythons: dict[str, str] = field(default_factory=dict)  # backend -> interpreter for its daemons
    shared_bytes: int | None = None  # None: auto
    dtype: str = "auto"  # compute dtype; auto: float32 on CPU, bf16 (else fp16) on GPUs
    graphs: bool = True  # GPU stages replay captured graphs for decode and verify steps
    weights: str = "dequantized"  # or "quantized": GPU stages keep GGUF blocks of the types with a kernel
    draft: DraftConfig | None = None
    prefix_cache_slots: int = 16
    max_seqs: int | None = None  # sequence slots in each stage's KV cache; None: 1 (serve: cli.SERVE_MAX_SEQS)

    @property
    def seqs(self) -> int:
        return self.max_seqs or 1

    @property
    def kv_tokens(self) -> int:
        """Tokens every stage's KV cache holds: max_ctx for each of its sequences."""
        return self.max_ctx * self.seqs

    def with_defaults(self) -> "LaunchConfig":
        from .placement import default_device

        devices = self.devices or (default_device(),)
        if isinstance(self.layer_split, tuple) and len(self.layer_split) != len(devices):
            raise PlacementError(f"layer_split: {len(self.layer_split)} weights for {len(devices)} devices")
        return replace(self, devices=devices)


def _max_seqs(value: Any, where: str) -> int:
    """1..MAX_BATCH: every running sequence may go in one forward_batch."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH:
        raise PlacementError(f"{where}: {value!r} is not a number of sequences in 1..{MAX_BATCH}")
    return value


def _check_keys(section: Any, allowed: set[str], where: str) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise PlacementError(f"{where}: expected a mapping, got {type(section).__name__} {section!r}")
    unknown = sorted(str(k) for k in section if k not in allowed)
    if unknown:
        raise PlacementError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(allowed))}")
    return section


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PlacementError(f"{where}: {value!r} is not true or false")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {value!r} is not a positive integer")
    return value


def parse_bytes(value: Any, where: str, alternative: str = "") -> int:
    """A byte count >= 0: an integer, or digits with a K/M/G suffix (binary)."""
    if isinstance(value, str):
        text = value.strip().lower()
        scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if scale > 1 else text
        if not (digits.isascii() and digits.isdigit()):  # '²'.isdigit() is True, but int() refuses it
            raise ConfigError(f"{where}: {value!r} is not a byte count (e.g. 8M, 1048576){alternative}")
        value = int(digits) * scale
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {value!r} is not a byte count (e.g. 8M, 1048576){alternative}")
    return value


def parse_shared_bytes(value: Any, where: str) -> int | None:
    """'auto' (None) or a byte count of at least MIN_SHARED_BYTES; accepts K/M/G suffixes."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    value = parse_bytes(value, where, " or 'auto'")
    if value < MIN_SHARED_BYTES:
        raise ConfigError(f"{where}: {value} bytes is too small; at least {MIN_SHARED_BYTES} (64K)")
    return value


def parse_weights(value: Any, where: str) -> str:
    if value not in WEIGHTS:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(WEIGHTS)}")
    return value


def parse_dtype(value: Any, where: str) -> str:
    if value not in DTYPES:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(DTYPES)}")
    return value


def load_yaml(path: str | Path) -> LaunchConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PlacementError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PlacementError(f"--config: {path.name!r} is not valid YAML{where}") from None
    doc = _check_keys(raw, TOP_KEYS, path.name)
    target = _check_keys(doc.get("target"), TARGET_KEYS, "target")
    ipc = _check_keys(doc.get("ipc"), IPC_KEYS, "ipc")
    backends = _check_keys(doc.get("backends"), set(BACKENDS) | {"rocm"}, "backends")
    draft = None
    if doc.get("draft") is not None:
        section = _check_keys(doc["draft"], DRAFT_KEYS, "draft")
        if not isinstance(section.get("kind"), str):
            raise ConfigError(f"draft.kind: {section.get('kind')!r}; give one of {', '.join(DRAFT_KINDS)}")
        draft_model = section.get("model")
        if draft_model is not None and (not isinstance(draft_model, str) or not draft_model.strip()):
            raise ConfigError(f"draft.model: {draft_model!r} is not a path to a GGUF file")
        draft = DraftConfig(
            kind=section["kind"],
            model=(path.parent / Path(draft_model).expanduser()) if draft_model else None,
            device=parse_device(section["device"], "draft.device") if "device" in section else None,
            tokens=section.get("tokens", DraftConfig.tokens),
            capture_layers=parse_capture_layers(section["capture_layers"], "draft.capture_layers")
            if "capture_layers" in section else (),
        )

    pythons = {}
    for name, section in backends.items():
        section = _check_keys(section, BACKEND_KEYS, f"backends.{name}")
        if "python" in section:
            if not isinstance(section["python"], str) or not section["python"].strip():
                raise PlacementError(f"backends.{name}.python: {section['python']!r} is not a path to an interpreter")
            pythons["hip" if name == "rocm" else name] = section["python"]

    devices = parse_devices(target["devices"], "target.devices") if "devices" in target else ()
    split = target.get("layer_split")
    if split is None or split == "auto":
        pass
    else:
        if not devices:
            raise PlacementError("target.layer_split: given without target.devices")
        split = parse_layer_split(split, len(devices), "target.layer_split")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise PlacementError(f"model: {model!r} is not a path to a GGUF file")
    return LaunchConfig(
        model=(path.parent / Path(model).expanduser()) if model else None,
        max_ctx=LaunchConfig.max_ctx if doc.get("max_ctx", "auto") == "auto" else _positive_int(doc["max_ctx"], "max_ctx"),
        max_ctx_auto=doc.get("max_ctx") == "auto",
        max_seqs=_max_seqs(doc["max_seqs"], "max_seqs") if "max_seqs" in doc else None,
        reserve=parse_bytes(doc["reserve"], "reserve") if "reserve" in doc else None,
        allow_cpu_overflow=_bool(target.get("allow_cpu_overflow", False), "target.allow_cpu_overflow"),
        dtype=parse_dtype(doc.get("dtype", "auto"), "dtype"),
        graphs=_bool(doc.get("graphs", True), "graphs"),
        weights=parse_weights(doc.get("weights", "dequantized"), "weights"),
        devices=devices,
        layer_split=split,
        isolate_gpus=_bool(target.get("isolate_gpus", True), "target.isolate_gpus"),
        all_daemons=_bool(target.get("all_daemons", False), "target.all_daemons"),
        pythons=pythons,
        shared_bytes=parse_shared_bytes(ipc.get("shared_bytes", "auto"), "ipc.shared_bytes"),
        draft=draft,
    )


def from_args(args) -> LaunchConfig:
    """The YAML file (if any) overridden by the flags that were given."""
    config = load_yaml(args.config) if getattr(args, "config", None) else LaunchConfig()
    updates: dict[str, Any] = {}
    model = args.model_opt or args.model_pos
    if args.model_pos and args.model_opt and args.model_pos != args.model_opt:
        raise ConfigError(f"--model: given twice ({args.model_pos!r} and {args.model_opt!r})")
    if model:
        updates["model"] = Path(model).expanduser()
    if args.max_ctx is not None:
        if args.max_ctx == "auto":
            updates["max_ctx_auto"] = True
        else:
            try:
                value = int(args.max_ctx)
            except ValueError:
                raise ConfigError(f"--max-ctx: {args.max_ctx!r} is not a number of tokens or 'auto'") from None
            updates["max_ctx"], updates["max_ctx_auto"] = _positive_int(value, "--max-ctx"), False
    if args.target_gpus is not None:
        updates["devices"] = parse_devices(args.target_gpus, "--target-gpus")
        updates["layer_split"] = None  # a split for the file's devices does not carry over
    devices = updates.get("devices", config.devices)
    if args.layer_split is not None:
        if not devices:
            raise PlacementError("--layer-split: given without --target-gpus")
        updates["layer_split"] = "auto" if args.layer_split == "auto" else parse_layer_split(args.layer_split, len(devices))
    if args.dtype is not None:
        updates["dtype"] = parse_dtype(args.dtype, "--dtype")
    if args.isolate_gpus is not None:
        updates["isolate_gpus"] = args.isolate_gpus
    if getattr(args, "no_graphs", False):
        updates["graphs"] = False
    if getattr(args, "vram_reserve", None) is not None:
        updates["reserve"] = parse_bytes(args.vram_reserve, "--vram-reserve")
    if getattr(args, "allow_cpu_overflow", False):
        updates["allow_cpu_overflow"] = True
    if getattr(args, "weights", None) is not None:
        updates["weights"] = parse_weights(args.weights, "--weights")
    if args.all_daemons:
        updates["all_daemons"] = True
    updates["draft"] = _draft_from_args(args, config.draft)
    if getattr(args, "max_seqs", None) is not None:
        updates["max_seqs"] = _max_seqs(args.max_seqs, "--max-seqs")
    if getattr(args, "prefix_cache_slots", None) is not None:
        if args.prefix_cache_slots < 0:
            raise ConfigError(f"--prefix-cache-slots: {args.prefix_cache_slots} is not a whole number >= 0")
        updates["prefix_cache_slots"] = args.prefix_cache_slots
    env_bytes = os.environ.get(SHARED_BYTES_ENV)
    if env_bytes is not None:
        updates["shared_bytes"] = parse_shared_bytes(env_bytes, SHARED_BYTES_ENV)
    config = replace(config, **updates)
    if config.model is not None and not config.model.is_file():
        raise ConfigError(f"model: {str(config.model)!r} is not a file")
    if config.draft is not None and config.draft.model is not None and not config.draft.model.is_file():
        raise ConfigError(f"--draft-model: {str(config.draft.model)!r} is not a file")
    return config.with_defaults()


def _draft_from_args(args, draft: DraftConfig | None) -> DraftConfig | None:
    """The file's draft section with the draft flags laid over it."""
    fields: dict[str, Any] = {}
    if draft is not None:
        fields = {"kind": draft.kind, "model": draft.model, "device": draft.device, "tokens": draft.tokens,
                  "capture_layers": draft.capture_layers}
    if getattr(args, "draft", None) is not None:
        fields["kind"] = args.draft
    if getattr(args, "draft_model", None) is not None:
        fields["model"] = Path(args.draft_model).expanduser()
        fields.setdefault("kind", "model")
    if getattr(args, "draft_gpu", None) is not None:
        fields["device"] = parse_device(args.draft_gpu, "--draft-gpu")
    if getattr(args, "draft_tokens", None) is not None:
        fields["tokens"] = args.draft_tokens
    if getattr(args, "capture_layers", None) is not None:
        fields["capture_layers"] = parse_capture_layers(args.capture_layers, "--capture-layers")
    if not fields:
        return None
    if "kind" not in fields:
        raise ConfigError("--draft: draft options given without a drafter; add --draft ngram|model|capture")
    if fields["kind"] == "none":
        return None
    return DraftConfig(**fields)
