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
from .placement import BACKENDS, DeviceSpec, parse_devices, parse_layer_split

MIN_SHARED_BYTES = 64 * 1024
SHARED_BYTES_ENV = "SHARDRT_IPC_SHARED_BYTES"
TOP_KEYS = {"model", "max_ctx", "dtype", "backends", "target", "draft", "ipc"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGET_KEYS = {"devices", "layer_split", "isolate_gpus", "all_daemons"}
IPC_KEYS = {"shared_bytes"}
BACKEND_KEYS = {"python"}


@dataclass(frozen=True)
class LaunchConfig:
    model: Path | None = None  # None: the demo model
    max_ctx: int = 4096
    devices: tuple[DeviceSpec, ...] = ()  # empty: the first GPU torch sees, else cpu:0
    layer_split: tuple[float, ...] | None = None  # None: even by layer count
    isolate_gpus: bool = True
    all_daemons: bool = False
    pythons: dict[str, str] = field(default_factory=dict)  # backend -> interpreter for its daemons
    shared_bytes: int | None = None  # None: auto
    dtype: str = "auto"  # compute dtype; auto: float32 on CPU, bf16 (else fp16) on GPUs

    def with_defaults(self) -> "LaunchConfig":
        from .placement import default_device

        devices = self.devices or (default_device(),)
        if self.layer_split is not None and len(self.layer_split) != len(devices):
            raise PlacementError(f"layer_split: {len(self.layer_split)} weights for {len(devices)} devices")
        return replace(self, devices=devices)


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


def parse_shared_bytes(value: Any, where: str) -> int | None:
    """'auto' (None) or a byte count of at least MIN_SHARED_BYTES; accepts K/M/G suffixes."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return None
        scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if scale > 1 else text
        if not (digits.isascii() and digits.isdigit()):  # '²'.isdigit() is True, but int() refuses it
            raise ConfigError(f"{where}: {value!r} is not a byte count (e.g. 8M, 1048576) or 'auto'")
        value = int(digits) * scale
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {value!r} is not a byte count (e.g. 8M, 1048576) or 'auto'")
    if value < MIN_SHARED_BYTES:
        raise ConfigError(f"{where}: {value} bytes is too small; at least {MIN_SHARED_BYTES} (64K)")
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
    if doc.get("draft") is not None:
        raise PlacementError("draft: speculative decoding is not available in this build; remove the draft section")

    pythons = {}
    for name, section in backends.items():
        section = _check_keys(section, BACKEND_KEYS, f"backends.{name}")
        if "python" in section:
            if not isinstance(section["python"], str) or not section["python"].strip():
                raise PlacementError(f"backends.{name}.python: {section['python']!r} is not a path to an interpreter")
            pythons["hip" if name == "rocm" else name] = section["python"]

    devices = parse_devices(target["devices"], "target.devices") if "devices" in target else ()
    split = target.get("layer_split")
    if split == "auto" or split is None:
        split = None
    else:
        if not devices:
            raise PlacementError("target.layer_split: given without target.devices")
        split = parse_layer_split(split, len(devices), "target.layer_split")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise PlacementError(f"model: {model!r} is not a path to a GGUF file")
    return LaunchConfig(
        model=(path.parent / Path(model).expanduser()) if model else None,
        max_ctx=_positive_int(doc["max_ctx"], "max_ctx") if "max_ctx" in doc else LaunchConfig.max_ctx,
        dtype=parse_dtype(doc.get("dtype", "auto"), "dtype"),
        devices=devices,
        layer_split=split,
        isolate_gpus=_bool(target.get("isolate_gpus", True), "target.isolate_gpus"),
        all_daemons=_bool(target.get("all_daemons", False), "target.all_daemons"),
        pythons=pythons,
        shared_bytes=parse_shared_bytes(ipc.get("shared_bytes", "auto"), "ipc.shared_bytes"),
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
        updates["max_ctx"] = _positive_int(args.max_ctx, "--max-ctx")
    if args.target_gpus is not None:
        updates["devices"] = parse_devices(args.target_gpus, "--target-gpus")
        updates["layer_split"] = None  # a split for the file's devices does not carry over
    devices = updates.get("devices", config.devices)
    if args.layer_split is not None:
        if not devices:
            raise PlacementError("--layer-split: given without --target-gpus")
        updates["layer_split"] = parse_layer_split(args.layer_split, len(devices))
    if args.dtype is not None:
        updates["dtype"] = parse_dtype(args.dtype, "--dtype")
    if args.isolate_gpus is not None:
        updates["isolate_gpus"] = args.isolate_gpus
    if args.all_daemons:
        updates["all_daemons"] = True
    env_bytes = os.environ.get(SHARED_BYTES_ENV)
    if env_bytes is not None:
        updates["shared_bytes"] = parse_shared_bytes(env_bytes, SHARED_BYTES_ENV)
    config = replace(config, **updates)
    if config.model is not None and not config.model.is_file():
        raise ConfigError(f"model: {str(config.model)!r} is not a file")
    return config.with_defaults()
