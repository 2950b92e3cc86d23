"""Which kernels a device runs: the Triton kernels where Triton builds for the GPU, the torch
references everywhere else.

Triton does not target every GPU that torch runs on: CUDA GPUs of compute capability below 7.0
(Pascal and older), and ROCm architectures outside the ones its AMD backend lists (gfx906, the
Radeon VII / MI50, among them). Such a GPU runs the torch reference of every op, dense weights
(`weights: auto` dequantizes there) and float16 where bf16 is not native; `plan`, `stats` and
`--json` say which path a device runs and why. The choice is a plain function of what torch
reports about the device (`kernel_path`), so it is tested without the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ._triton import kernels_choice, triton

MIN_CUDA_CAPABILITY = (7, 0)
# ROCm architectures Triton's AMD backend builds for (the CDNA and RDNA generations it lists)
TRITON_HIP_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950", "gfx1030", "gfx1100", "gfx1101",
                    "gfx1102", "gfx1150", "gfx1151", "gfx1200", "gfx1201")


@dataclass(frozen=True)
class KernelPath:
    path: str  # "triton" or "torch"
    reason: str  # why the torch path ("" for triton)

    def describe(self) -> str:
        return f"torch ({self.reason})" if self.reason else self.path


def kernel_path(backend: str, capability: tuple[int, int] | None = None, arch: str | None = None,
                have_triton: bool = True, choice: str = "triton") -> KernelPath:
    """The path for a device of `backend` ('cuda', 'hip' or 'cpu'), its CUDA compute capability
    or ROCm architecture (gcnArchName, e.g. 'gfx90a:sramecc+:xnack-')."""
    if backend == "cpu":
        return KernelPath("torch", "")  # the CPU's own path, nothing to explain
    if choice == "torch":
        return KernelPath("torch", "SHARDRT_KERNELS=torch")
    if not have_triton:
        return KernelPath("torch", "Triton is not installed beside this torch")
    if backend == "cuda" and capability is not None and tuple(capability) < MIN_CUDA_CAPABILITY:
        major, minor = capability
        return KernelPath("torch", f"compute capability {major}.{minor} is below 7.0, the oldest Triton builds for")
    if backend == "hip" and arch is not None:
        base = arch.split(":")[0]
        if base not in TRITON_HIP_ARCHS:
            return KernelPath("torch", f"{base} is not an architecture Triton builds for")
    return KernelPath("triton", "")


def device_kernel_path(device: torch.device) -> KernelPath:
    """kernel_path for a torch device this process sees."""
    if device.type != "cuda":
        return kernel_path("cpu")
    backend, capability, arch = _describe(device)
    return kernel_path(backend, capability, arch, have_triton=triton is not None, choice=kernels_choice())


@lru_cache(maxsize=None)
def _describe(device: torch.device) -> tuple[str, tuple[int, int], str | None]:
    props = torch.cuda.get_device_properties(device)
    backend = "hip" if torch.version.hip is not None else "cuda"
    return backend, (props.major, props.minor), getattr(props, "gcnArchName", None)


def bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively (else a stage on it defaults to float16)."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no including_emulation
            return torch.cuda.is_bf16_supported()
