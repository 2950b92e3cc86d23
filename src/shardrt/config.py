"""The launch configuration: a YAML placement file and command-line flags, merged (flags win).

Devices on other hosts need a Ray cluster (`--cluster`, YAML `cluster: {ray: ADDRESS}`); the YAML
`hosts:` section says where each host keeps its copy of the model and which interpreter runs
each backend's daemons there.

Parsed at the edge into a frozen `LaunchConfig`; unknown keys, wrong types and malformed
values are refused with the field and the value named.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, PlacementError
from .ipc.protocol import MAX_BATCH_SEQS
from .placement import BACKENDS, DeviceSpec, parse_device, parse_devices, parse_host, parse_layer_split

MIN_SHARED_BYTES = 64 * 1024
SHARED_BYTES_ENV = "SHARDRT_IPC_SHARED_BYTES"
TOP_KEYS = {"model", "max_ctx", "max_seqs", "dtype", "graphs", "weights", "reserve", "backends", "target", "draft",
            "ipc", "cluster", "hosts", "pflash"}
WEIGHTS = ("auto", "quantized", "dequantized")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGET_KEYS = {"devices", "layer_split", "isolate_gpus", "all_daemons", "allow_cpu_overflow"}
IPC_KEYS = {"shared_bytes"}
DRAFT_KEYS = {"kind", "model", "device", "tokens", "capture_layers"}
DRAFT_KINDS = ("ngram", "model", "capture")
MAX_DRAFT_TOKENS = 32
PFLASH_KEYS = {"model", "device", "keep", "min_prompt"}
BACKEND_KEYS = {"python"}
CLUSTER_KEYS = {"ray"}
HOST_KEYS = {"model", "backends"}
CLUSTER_FORMS = "ray://HOST:PORT, HOST:PORT or auto"
_CLUSTER_RE = re.compile(r"^(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")


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


@dataclass(frozen=True)
class PflashConfig:
    """Speculative prefill (PFlash, pflash.py): a drafter GGUF in its own daemon scores each long
    prompt's tokens; the target prefills only the `keep` fraction that matters."""

    model: Path
    device: DeviceSpec | None = None  # the drafter daemon's device; default cpu:0
    keep: float = 0.05  # fraction of the prompt's tokens kept, in (0, 1]
    min_prompt: int = 2048  # prompts of at most this many (target) tokens pass through unchanged

    def __post_init__(self):
        parse_keep(self.keep, "pflash.keep")
        parse_min_prompt(self.min_prompt, "pflash.min_prompt")


def parse_keep(value: Any, where: str) -> float:
    """A fraction of tokens in (0, 1]."""
    try:
        keep = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        keep = math.nan
    if not 0.0 < keep <= 1.0:  # also refuses nan
        raise ConfigError(f"{where}: {value!r} is not a fraction of the prompt in (0, 1], such as 0.05")
    return keep


def parse_min_prompt(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {value!r} is not a whole number of tokens >= 0")
    return value


@dataclass(frozen=True)
class HostConfig:
    """What one other host runs its daemons with: its copy of the GGUF and its interpreters."""

    name: str
    model: Path | None = None  # that host's copy of the GGUF; None: the coordinator's path
    pythons: tuple[tuple[str, str], ...] = ()  # (backend, interpreter) pairs, sorted by backend

    def python(self, backend: str) -> str | None:
        """The interpreter for this backend's daemons on this host; None: not configured."""
        return dict(self.pythons).get(backend)


def parse_cluster(value: Any, where: str) -> str:
    """A Ray address: ray://HOST:PORT (Ray Client), HOST:PORT (the cluster's GCS) or auto."""
    text = value.strip() if isinstance(value, str) else ""
    if text.lower() == "auto":
        return "auto"
    match = _CLUSTER_RE.match(text)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not a Ray address ({CLUSTER_FORMS})")
    return text


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
    pythons: dict[str, str] = field(default_factory=dict)  # backend -> interpreter for its daemons on this host
    cluster: str | None = None  # the Ray address (parse_cluster) that devices on other hosts need
    hosts: tuple[HostConfig, ...] = ()  # per-host settings from YAML `hosts:`, sorted by name
    shared_bytes: int | None = None  # None: auto
    dtype: str = "auto"  # compute dtype; auto: float32 on CPU, bf16 (else fp16) on GPUs
    graphs: bool = True  # GPU stages replay captured graphs for decode and verify steps
    weights: str = "auto"  # GPU stages keep GGUF blocks of the types with a kernel where the kernels run;
    # "quantized": on every GPU; "dequantized": every weight in the compute dtype
    draft: DraftConfig | None = None
    prefix_cache_slots: int = 16
    max_seqs: int | None = None  # sequence slots in each stage's KV cache; None: 1 (serve: cli.SERVE_MAX_SEQS)
    pflash: PflashConfig | None = None  # speculative prefill: a drafter compresses long prompts

    @property
    def seqs(self) -> int:
        return self.max_seqs or 1

    @property
    def kv_tokens(self) -> int:
        """Tokens every stage's KV cache holds: max_ctx for each of its sequences."""
        return self.max_ctx * self.seqs

    @property
    def remote_hosts(self) -> tuple[str, ...]:
        """The other hosts the devices name, in pipeline order."""
        return tuple(dict.fromkeys(d.host for d in self.devices if d.remote))

    def host(self, name: str) -> HostConfig:
        """The settings for host `name`: its `hosts:` entry, else the defaults."""
        return next((h for h in self.hosts if h.name == name), HostConfig(name))

    def with_defaults(self) -> "LaunchConfig":
        from .placement import default_device

        devices = self.devices or (default_device(),)
        if isinstance(self.layer_split, tuple) and len(self.layer_split) != len(devices):
            raise PlacementError(f"layer_split: {len(self.layer_split)} weights for {len(devices)} devices")
        return replace(self, devices=devices)


def _max_seqs(value: Any, where: str) -> int:
    """1..MAX_BATCH_SEQS: every running sequence may go in one forward_batch."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH_SEQS:
        raise PlacementError(f"{where}: {value!r} is not a number of sequences in 1..{MAX_BATCH_SEQS}")
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
            device=_local_device(section["device"], "draft.device") if "device" in section else None,
            tokens=section.get("tokens", DraftConfig.tokens),
            capture_layers=parse_capture_layers(section["capture_layers"], "draft.capture_layers")
            if "capture_layers" in section else (),
        )

    pflash = _pflash_section(doc.get("pflash"), path) if doc.get("pflash") is not None else None
    pythons = _pythons(backends, "backends")
    cluster = None
    if doc.get("cluster") is not None:
        section = _check_keys(doc["cluster"], CLUSTER_KEYS, "cluster")
        if "ray" not in section:
            raise ConfigError(f"cluster.ray: missing; give the Ray cluster's address ({CLUSTER_FORMS})")
        cluster = parse_cluster(section["ray"], "cluster.ray")
    hosts = _hosts(doc.get("hosts"))
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
        weights=parse_weights(doc.get("weights", "auto"), "weights"),
        devices=devices,
        layer_split=split,
        isolate_gpus=_bool(target.get("isolate_gpus", True), "target.isolate_gpus"),
        all_daemons=_bool(target.get("all_daemons", False), "target.all_daemons"),
        pythons=pythons,
        cluster=cluster,
        hosts=hosts,
        shared_bytes=parse_shared_bytes(ipc.get("shared_bytes", "auto"), "ipc.shared_bytes"),
        draft=draft,
        pflash=pflash,
    )


def _pflash_section(raw: Any, path: Path) -> PflashConfig:
    """YAML `pflash: {model, device, keep, min_prompt}`; the model's path is relative to the file."""
    section = _check_keys(raw, PFLASH_KEYS, "pflash")
    model = section.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"pflash.model: {model!r} is not a path to a drafter GGUF file")
    return PflashConfig(
        model=path.parent / Path(model).expanduser(),
        device=_local_device(section["device"], "pflash.device", "PFlash drafter") if "device" in section else None,
        keep=parse_keep(section.get("keep", PflashConfig.keep), "pflash.keep"),
        min_prompt=parse_min_prompt(section.get("min_prompt", PflashConfig.min_prompt), "pflash.min_prompt"),
    )


def _pythons(backends: dict, where: str) -> dict[str, str]:
    """backend -> interpreter, from a `backends:` section ({BACKEND: {python: PATH}})."""
    pythons = {}
    for name, section in backends.items():
        section = _check_keys(section, BACKEND_KEYS, f"{where}.{name}")
        if "python" in section:
            if not isinstance(section["python"], str) or not section["python"].strip():
                raise PlacementError(f"{where}.{name}.python: {section['python']!r} is not a path to an interpreter")
            pythons["hip" if name == "rocm" else name] = section["python"]
    return pythons


def _hosts(raw: Any) -> tuple[HostConfig, ...]:
    """The `hosts:` section: {HOST: {model: PATH, backends: {BACKEND: {python: PATH}}}}. Its paths are
    on that host, so they are taken as written: absolute, and not expanded here."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise PlacementError(f"hosts: expected a mapping of host names, got {type(raw).__name__} {raw!r}")
    hosts: dict[str, HostConfig] = {}
    for key, section in raw.items():
        name = parse_host(key, "hosts") if isinstance(key, str) else None
        if name is None:
            raise PlacementError(f"hosts: {key!r} is not a host name")
        if name in hosts:
            raise PlacementError(f"hosts: host {name!r} appears twice")
        where = f"hosts.{name}"
        section = _check_keys(section, HOST_KEYS, where)
        model = section.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip().startswith("/")):
            raise PlacementError(f"{where}.model: {model!r} is not an absolute path to a GGUF file on host {name}")
        backends = _check_keys(section.get("backends"), set(BACKENDS) | {"rocm"}, f"{where}.backends")
        pythons = _pythons(backends, f"{where}.backends")
        hosts[name] = HostConfig(name, Path(model.strip()) if model else None, tuple(sorted(pythons.items())))
    return tuple(hosts[name] for name in sorted(hosts))


def check_hosts(config: LaunchConfig, fields: dict[str, str] | None = None) -> None:
    """Refuse what devices on other hosts cannot have: no Ray cluster to start them on, a `hosts:`
    entry no device uses, and the `auto` choices, which need every device's free memory.
    fields: how the user named devices, layer_split and max_ctx (flags or YAML keys)."""
    name = {"devices": "--target-gpus", "layer_split": "--layer-split", "max_ctx": "--max-ctx", **(fields or {})}
    remote = [d for d in config.devices if d.remote]
    if remote and config.cluster is None:
        d = remote[0]
        raise PlacementError(f"{name['devices']}: {d} is on host {d.host}; devices on other hosts need "
                             "--cluster ADDRESS (cluster: {ray: ADDRESS} in YAML)")
    used = set(config.remote_hosts)
    for host in config.hosts:
        if host.name not in used:
            devices = ", ".join(map(str, config.devices)) or "none"
            raise PlacementError(f"hosts.{host.name}: no device is on host {host.name} (devices: {devices})")
    if remote and config.layer_split == "auto":
        raise PlacementError(f"{name['layer_split']}: auto needs the free memory of every device; {remote[0]} is on "
                             "another host; give the split by hand")
    if remote and config.max_ctx_auto:
        raise PlacementError(f"{name['max_ctx']}: auto needs the free memory of every device; {remote[0]} is on "
                             "another host; give a number of tokens")


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
    if getattr(args, "cluster", None) is not None:
        updates["cluster"] = parse_cluster(args.cluster, "--cluster")
    updates["draft"] = _draft_from_args(args, config.draft)
    updates["pflash"] = _pflash_from_args(args, config.pflash)
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
    check_hosts(config, {"devices": "--target-gpus" if args.target_gpus is not None else "target.devices",
                         "layer_split": "--layer-split" if args.layer_split is not None else "target.layer_split",
                         "max_ctx": "--max-ctx" if args.max_ctx is not None else "max_ctx"})
    if config.model is not None and not config.model.is_file():
        raise ConfigError(f"model: {str(config.model)!r} is not a file")
    if config.draft is not None and config.draft.model is not None and not config.draft.model.is_file():
        raise ConfigError(f"--draft-model: {str(config.draft.model)!r} is not a file")
    if config.pflash is not None and not config.pflash.model.is_file():
        raise ConfigError(f"--pflash-model: {str(config.pflash.model)!r} is not a file")
    return config.with_defaults()


def _local_device(text: Any, field: str, what: str = "draft") -> DeviceSpec:
    """A device on the coordinator's host: the draft (or PFlash drafter) daemon is started there."""
    device = parse_device(text, field)
    if device.remote:
        raise PlacementError(f"{field}: {device} is on host {device.host}; the {what} daemon runs on the "
                             f"coordinator's host ({what}s on other hosts: not yet)")
    return device


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
        fields["device"] = _local_device(args.draft_gpu, "--draft-gpu")
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


def _pflash_from_args(args, pflash: PflashConfig | None) -> PflashConfig | None:
    """The file's pflash section with the --pflash-* flags laid over it."""
    fields: dict[str, Any] = {}
    if pflash is not None:
        fields = {"model": pflash.model, "device": pflash.device, "keep": pflash.keep, "min_prompt": pflash.min_prompt}
    if getattr(args, "pflash_model", None) is not None:
        fields["model"] = Path(args.pflash_model).expanduser()
    if getattr(args, "pflash_gpu", None) is not None:
        fields["device"] = _local_device(args.pflash_gpu, "--pflash-gpu", "PFlash drafter")
    if getattr(args, "pflash_keep", None) is not None:
        fields["keep"] = parse_keep(args.pflash_keep, "--pflash-keep")
    if getattr(args, "pflash_min_prompt", None) is not None:
        fields["min_prompt"] = parse_min_prompt(args.pflash_min_prompt, "--pflash-min-prompt")
    if not fields:
        return None
    if "model" not in fields:
        raise ConfigError("--pflash-model: PFlash options given without a drafter; add --pflash-model PATH")
    return PflashConfig(**fields)
