"""Placement: which devices hold the target model, on which hosts, and how its layers are split
among them.

A device is `[HOST/]BACKEND:INDEX`: no host means the coordinator's own; a host means a daemon
started on that node of the Ray cluster (`--cluster`), even when the node is this machine.
Parsed at the edge (flags, YAML) into frozen values; every malformed entry is refused with
the field and the value named.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import PlacementError

BACKENDS = ("cpu", "cuda", "hip")
BACKEND_ALIASES = {"rocm": "hip"}
HOST_PATTERN = r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?"
LOCAL_HOST_WORD = "local"  # what `shardrt plan` shows for the coordinator's host, so no host may be named so
_DEVICE_RE = re.compile(r"^([a-z]+):(\d+)$")
_HOST_RE = re.compile(f"^{HOST_PATTERN}$")


@dataclass(frozen=True, order=True)
class DeviceSpec:
    backend: str
    index: int  # as that host numbers its devices of this backend
    host: str = ""  # "": the coordinator's host (last, and a str, so that order=True still compares)

    def __str__(self) -> str:
        return f"{self.host}/{self.backend}:{self.index}" if self.host else f"{self.backend}:{self.index}"

    @property
    def remote(self) -> bool:
        return bool(self.host)

    @property
    def is_gpu(self) -> bool:
        return self.backend != "cpu"

    def torch_device(self, local_index: int | None = None) -> torch.device:
        """The torch device in a process whose visible GPUs are remapped (`local_index`)."""
        if self.backend == "cpu":
            return torch.device("cpu")
        # ROCm builds of torch expose HIP devices through the torch.cuda API
        return torch.device("cuda", self.index if local_index is None else local_index)


def parse_device(text: str, field: str = "--target-gpus") -> DeviceSpec:
    """`[HOST/]BACKEND:INDEX`, case-insensitive: cuda:0, rocm:1 (= hip:1), nodeb/hip:0."""
    entry = text.strip().lower()
    host, slash, device = entry.rpartition("/")
    match = _DEVICE_RE.match(device)
    if not match or (slash and not host):
        raise PlacementError(f"{field}: {text!r} is not [HOST/]BACKEND:INDEX (e.g. cuda:0, nodeb/hip:1)")
    if slash:
        parse_host(host, f"{field}: {text!r}")
    backend = BACKEND_ALIASES.get(match.group(1), match.group(1))
    if backend not in BACKENDS:
        raise PlacementError(f"{field}: {text!r} names unknown backend {match.group(1)!r}; accepted: cpu, cuda, hip (or rocm)")
    return DeviceSpec(backend, int(match.group(2)), host)


def parse_host(text: str, where: str) -> str:
    """A host name as devices name it: lowercase letters, digits, '.', '_' and '-', at most 63."""
    host = text.strip().lower()
    if host == LOCAL_HOST_WORD:
        raise PlacementError(f"{where}: host {LOCAL_HOST_WORD!r} is reserved for the coordinator's host; "
                             "leave the host out for a device there")
    if not _HOST_RE.match(host):
        raise PlacementError(f"{where}: {text!r} is not a host name (letters, digits, '.', '_', '-'; at most 63, "
                             "starting and ending with a letter or digit)")
    return host


def parse_devices(items: str | list, field: str = "--target-gpus") -> tuple[DeviceSpec, ...]:
    if isinstance(items, str):
        items = items.split(",")
    if not isinstance(items, list) or not items:
        raise PlacementError(f"{field}: {items!r} is not a list of devices such as cuda:0,hip:0")
    devices = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise PlacementError(f"{field}: entry {item!r} is not a device such as cuda:0")
        device = parse_device(item, field)
        if device in devices:
            raise PlacementError(f"{field}: {device} appears twice")
        devices.append(device)
    return tuple(devices)


def parse_layer_split(items: str | list, n_devices: int, field: str = "--layer-split") -> tuple[float, ...]:
    if isinstance(items, str):
        items = items.split(",")
    if not isinstance(items, list):
        raise PlacementError(f"{field}: {items!r} is not a list of weights such as 0.2,0.8")
    weights = []
    for item in items:
        try:
            value = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            raise PlacementError(f"{field}: {item!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise PlacementError(f"{field}: {item!r} is not a positive finite weight")
        weights.append(value)
    if len(weights) != n_devices:
        raise PlacementError(f"{field}: {len(weights)} weights for {n_devices} devices; give one weight per device")
    largest = max(weights)  # scale first: the sum of large finite weights can overflow to inf
    total = sum(w / largest for w in weights)
    return tuple(w / largest / total for w in weights)


def split_layers(n_layers: int, weights: tuple[float, ...]) -> list[tuple[int, int]]:
    """Layer ranges from rounded cumulative fractions, each shard at least one layer."""
    n = len(weights)
    if n > n_layers:
        raise PlacementError(f"--target-gpus: {n} shards for a model of {n_layers} layers; at most one shard per layer")
    bounds, cumulative = [0], 0.0
    for i, w in enumerate(weights[:-1]):
        cumulative += w
        cut = round(cumulative * n_layers)
        # leave at least one layer for this shard and for every shard after it
        cut = min(max(cut, bounds[-1] + 1), n_layers - (n - 1 - i))
        bounds.append(cut)
    bounds.append(n_layers)
    return list(zip(bounds, bounds[1:]))


def default_device() -> DeviceSpec:
    """The first GPU torch sees, else cpu:0."""
    if torch.cuda.is_available():
        return DeviceSpec("hip" if torch.version.hip else "cuda", 0)
    return DeviceSpec("cpu", 0)


@dataclass(frozen=True)
class Shard:
    """One device's contiguous layer range; `process` 0 is the coordinator, k > 0 daemon k."""

    device: DeviceSpec
    start: int
    stop: int
    process: int


@dataclass(frozen=True)
class ProcessPlan:
    """One process and the shards it holds; daemons see their GPUs remapped to 0..n-1."""

    index: int  # 0: the coordinator itself
    backend: str
    devices: tuple[DeviceSpec, ...]
    host: str = ""  # "": the coordinator's host; else the node its daemon runs on

    @property
    def in_process(self) -> bool:
        return self.index == 0

    @property
    def remote(self) -> bool:
        return bool(self.host)

    @property
    def label(self) -> str:
        return "coordinator" if self.in_process else f"daemon {self.index}"

    @property
    def where(self) -> str:
        """"" on the coordinator's host, "@nodeb" on another."""
        return f"@{self.host}" if self.host else ""

    def child_env(self) -> dict[str, str]:
        """Environment a daemon adds to its parent's: GPU visibility pinned to its own devices."""
        if self.in_process or self.backend == "cpu":
            return {}
        ids = ",".join(str(d.index) for d in self.devices)
        if self.backend == "cuda":
            return {"CUDA_VISIBLE_DEVICES": ids}
        return {"HIP_VISIBLE_DEVICES": ids, "ROCR_VISIBLE_DEVICES": ids}

    def local_index(self, device: DeviceSpec) -> int:
        """The device's id inside this process (0-based in a daemon's pinned view)."""
        if self.in_process or device.backend == "cpu":
            return device.index
        return self.devices.index(device)


def plan_processes(devices: tuple[DeviceSpec, ...], isolate_gpus: bool = True,
                   all_daemons: bool = False) -> tuple[ProcessPlan, ...]:
    """Which process holds each device.

    isolate_gpus: every device but the first gets its own daemon. Otherwise the first device's
    backend group stays in-process and every other backend group shares one daemon, as long
    as its devices are consecutive in the pipeline; a group interleaved with another backend
    (cuda:0,hip:0,cuda:1,hip:1) gets one daemon per consecutive run, since a daemon runs its
    stages as one chain.
    all_daemons: the coordinator holds no device; every group above becomes a daemon.
    Hosts: a process never spans hosts, and a device on another host is never in-process, so
    a placement that starts on another host leaves the coordinator without a device.
    """
    coordinator_holds = not all_daemons and not devices[0].remote
    groups: list[list[DeviceSpec]] = []
    if isolate_gpus:
        groups = [[d] for d in devices]
    else:
        in_process = devices[0].backend if coordinator_holds else None
        in_process_group: list[DeviceSpec] = []
        for i, d in enumerate(devices):
            if d.backend == in_process and not d.remote:
                in_process_group.append(d)
            elif groups and groups[-1][-1] == devices[i - 1] and _same_kind(devices[i - 1], d):
                groups[-1].append(d)  # continues the previous device's run
            else:
                groups.append([d])
        if in_process_group:
            groups.insert(0, in_process_group)
    first = 0 if coordinator_holds else 1
    return tuple(ProcessPlan(i + first, g[0].backend, tuple(g), g[0].host) for i, g in enumerate(groups))


def _same_kind(a: DeviceSpec, b: DeviceSpec) -> bool:
    """Whether one daemon can hold both: the same backend on the same host."""
    return a.backend == b.backend and a.host == b.host


def plan_shards(devices: tuple[DeviceSpec, ...], n_layers: int, weights: tuple[float, ...] | None = None,
                isolate_gpus: bool = True, all_daemons: bool = False) -> tuple[tuple[Shard, ...], tuple[ProcessPlan, ...]]:
    weights = weights or tuple(1.0 / len(devices) for _ in devices)
    ranges = split_layers(n_layers, weights)
    processes = plan_processes(devices, isolate_gpus, all_daemons)
    owner = {d: p.index for p in processes for d in p.devices}
    shards = tuple(Shard(d, a, b, owner[d]) for d, (a, b) in zip(devices, ranges))
    return shards, processes
