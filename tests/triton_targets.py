"""Triton kernels built for a CUDA GPU that this machine does not have: Triton's own compiler and
the ptxas it ships, for a named compute capability, with the specialisation a launch gives
(pointers and integers divisible by 16; Triton pipelines such loads through shared memory). The
kernel's shared memory is then known as it would be on that GPU, before any launch there."""

from __future__ import annotations

import os

import torch

from shardrt.kernels._triton import OutOfResources

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    HAVE_PTXAS = os.access(PTXAS, os.X_OK)
except ImportError:
    HAVE_PTXAS = False

# What one block may opt in to, per SM (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {90: 232448,  # H100, H200
                86: 101376}  # GeForce RTX 30 (and RTX 40, sm_89, the same)
TYPE_NAMES = {torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.uint16: "u16", torch.int32: "i32",
              torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def build(kernel, args: dict, constexprs: dict, arch: int, warps: int):
    """`kernel` compiled for sm_`arch` (PTX, then ptxas): args, name -> a tensor (a pointer to its
    dtype), an int (the value itself is not specialised on, only its divisibility by 16) or a
    float (a float32 scalar)."""
    signature, attrs = {}, {}
    for i, (name, value) in enumerate(args.items()):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def shared_bytes(kernel, args: dict, constexprs: dict, arch: int, warps: int) -> int:
    """Shared memory of `kernel` built for sm_`arch` (`build`'s arguments)."""
    return build(kernel, args, constexprs, arch, warps).metadata.shared


def builds_within(arch: int, build_shared):
    """A build for `mmq.fit_rows` that fails as a launch on sm_`arch` does: rows -> its shared bytes,
    or OutOfResources past the GPU's limit."""
    def build(rows: int) -> int:
        shared = build_shared(rows)
        if shared > SHARED_LIMIT[arch]:
            raise OutOfResources(shared, SHARED_LIMIT[arch], "shared memory")
        return shared
    return build
