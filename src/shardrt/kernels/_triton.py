"""Whether a tensor goes to a Triton kernel: Triton must import, and the tensor must be on a GPU
(or Triton's interpreter must be on, `TRITON_INTERPRET=1`, which runs kernels on the CPU for
tests). `SHARDRT_KERNELS=torch` sends every op to its torch reference."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # a CPU-only torch build ships no Triton: the references run instead
    triton, tl = None, None

    class OutOfResources(Exception):
        """Stands for Triton's (a kernel that needs more of an SM than the GPU has), which nothing
        raises where Triton is not installed."""

KERNELS_ENV = "SHARDRT_KERNELS"
CHOICES = ("triton", "torch")


def kernels_choice() -> str:
    value = os.environ.get(KERNELS_ENV, "triton")
    if value not in CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"{KERNELS_ENV}: {value!r} is not one of {', '.join(CHOICES)}")
    return value


def use_triton(x: torch.Tensor) -> bool:
    if kernels_choice() == "torch" or triton is None:
        return False
    if x.is_cuda:  # a GPU Triton does not build for runs the references (support.py)
        from .support import device_kernel_path

        return device_kernel_path(x.device).path == "triton"
    return os.environ.get("TRITON_INTERPRET") == "1"


def pointers(tensors: tuple[torch.Tensor, ...], count: int = 4) -> tuple[torch.Tensor, ...]:
    """`tensors` padded to a kernel's `count` pointer arguments (the pointers it does not read get the first)."""
    return tuple(tensors) + (tensors[0],) * (count - len(tensors))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision (tf32 would part ways with the CPU path); others as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"
