"""Device discovery across backends, without creating a GPU context in this process.

NVIDIA GPUs come from NVML (`pynvml`), AMD GPUs from `amdsmi` when installed, else from the
kernel's KFD topology in sysfs. CPU is always there. Where this interpreter finds none of a
backend's GPUs but the placement names another interpreter for that backend (a ROCm venv with
amdsmi, say), a short-lived probe asks that interpreter: `python -m shardrt.devices --json`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import ShardrtError
from .placement import DeviceSpec, parse_device

log = logging.getLogger(__name__)
KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
PROBE_TIMEOUT_S = 30


@dataclass(frozen=True)
class DeviceInfo:
    spec: DeviceSpec
    name: str
    total_bytes: int
    free_bytes: int
    integrated: bool
    display: bool = False  # drives a monitor: leave room for the desktop
    arch: str = ""  # CUDA compute capability ("9.0") or ROCm architecture ("gfx90a"); "" unknown

    def to_json(self) -> dict:
        kind = "host" if not self.spec.is_gpu else "integrated" if self.integrated else "discrete"
        return {"device": str(self.spec), "name": self.name, "total_bytes": self.total_bytes,
                "free_bytes": self.free_bytes, "kind": kind, "display": self.display, "arch": self.arch}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceInfo":
        return cls(parse_device(d["device"], "probe"), str(d["name"]), int(d["total_bytes"]), int(d["free_bytes"]),
                   d["kind"] == "integrated", bool(d.get("display", False)), str(d.get("arch", "")))


def nvidia_devices() -> list[DeviceInfo]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no NVIDIA GPUs to report
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                display = bool(pynvml.nvmlDeviceGetDisplayActive(handle))
            except Exception:  # not supported on this board: assume no desktop
                display = False
            try:
                arch = "%d.%d" % pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            except Exception:
                arch = ""
            found.append(DeviceInfo(DeviceSpec("cuda", i), name if isinstance(name, str) else name.decode(),
                                    int(mem.total), int(mem.free), integrated=False, display=display, arch=arch))
        return found
    finally:
        pynvml.nvmlShutdown()


def amd_devices() -> list[DeviceInfo]:
    try:
        import amdsmi

        amdsmi.amdsmi_init()
    except Exception:
        return _kfd_devices()
    try:
        found = []
        for i, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            info = amdsmi.amdsmi_get_gpu_asic_info(handle)
            total = amdsmi.amdsmi_get_gpu_memory_total(handle, amdsmi.AmdSmiMemoryType.VRAM)
            used = amdsmi.amdsmi_get_gpu_memory_usage(handle, amdsmi.AmdSmiMemoryType.VRAM)
            arch = str(info.get("target_graphics_version", "") or "")
            found.append(DeviceInfo(DeviceSpec("hip", i), str(info.get("market_name", "AMD GPU")), int(total),
                                    int(total - used), integrated=False, arch=arch if arch.startswith("gfx") else ""))
        return found
    except Exception as exc:
        log.warning("amdsmi failed (%s); reading the KFD topology instead", exc)
        return _kfd_devices()
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception:
            pass


def _kfd_devices() -> list[DeviceInfo]:
    """GPU nodes of the KFD topology (those with SIMD units), numbered as HIP numbers them."""
    found = []
    if not KFD_NODES.is_dir():
        return found
    for node in sorted(KFD_NODES.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        try:
            props = dict(line.split()[:2] for line in (node / "properties").read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            continue
        if int(props.get("simd_count", 0)) == 0:
            continue
        total = 0
        for bank in (node / "mem_banks").glob("*/properties"):
            bank_props = dict(line.split()[:2] for line in bank.read_text().splitlines() if line.strip())
            total += int(bank_props.get("size_in_bytes", 0))
        integrated = int(props.get("cpu_cores_count", 0)) > 0
        arch = gfx_name(int(props.get("gfx_target_version", 0) or 0))
        found.append(DeviceInfo(DeviceSpec("hip", len(found)), f"AMD {arch or 'GPU'}", total, total, integrated,
                                arch=arch))
    return found


def gfx_name(version: int) -> str:
    """KFD's gfx_target_version (major * 10000 + minor * 100 + stepping) -> 'gfx90a'; '' for 0."""
    if version <= 0:
        return ""
    return f"gfx{version // 10000}{(version // 100) % 100:x}{version % 100:x}"


_ARCHS: dict[DeviceSpec, str] = {}


def gpu_arch(spec: DeviceSpec) -> str:
    """This machine's arch string for a GPU (DeviceInfo.arch), asked of NVML, amdsmi or KFD once;
    no GPU context is created."""
    if spec not in _ARCHS:
        found = nvidia_devices() if spec.backend == "cuda" else amd_devices() if spec.backend == "hip" else []
        for info in found:
            _ARCHS.setdefault(info.spec, info.arch)
        _ARCHS.setdefault(spec, "")
    return _ARCHS[spec]


def cpu_device() -> DeviceInfo:
    mem = psutil.virtual_memory()
    return DeviceInfo(DeviceSpec("cpu", 0), f"CPU ({psutil.cpu_count()} threads)", mem.total, mem.available, True)


def discover(pythons: dict[str, str] | None = None) -> list[DeviceInfo]:
    """Every device this machine has; a backend this interpreter sees no GPU of is asked of the
    interpreter `pythons` names for it."""
    found = [*nvidia_devices(), *amd_devices(), cpu_device()]
    for backend, python in (pythons or {}).items():
        if backend != "cpu" and python != sys.executable and not any(d.spec.backend == backend for d in found):
            found[-1:-1] = [d for d in probe(python) if d.spec.backend == backend]
    return found


def probe(python: str) -> list[DeviceInfo]:
    """The devices another interpreter finds; none when it cannot run shardrt (logged)."""
    try:
        done = subprocess.run([python, "-m", "shardrt.devices", "--json"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        return [DeviceInfo.from_json(d) for d in json.loads(done.stdout)]
    except (OSError, subprocess.TimeoutExpired, RuntimeError, ValueError, KeyError, ShardrtError) as exc:
        log.warning("device probe with %s failed: %s", python, exc)
        return []


def main() -> int:
    print(json.dumps([d.to_json() for d in discover()]))
    return 0


def missing(devices: tuple[DeviceSpec, ...], present: list[DeviceInfo]) -> list[DeviceSpec]:
    """The GPUs named in a placement that this machine does not have (any cpu:N is present)."""
    have = {d.spec for d in present}
    return [d for d in devices if d.is_gpu and d not in have]


if __name__ == "__main__":
    sys.exit(main())
