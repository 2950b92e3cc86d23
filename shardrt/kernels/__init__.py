"""Compute kernels under the model: each op is a Triton kernel (one source for CUDA and ROCm)
beside the torch reference it is tested against.

`model.py` calls the ops here and never knows which implementation ran: the Triton kernel on a
GPU tensor when Triton is importable, the torch reference otherwise (CPU, or
`SHARDRT_KERNELS=torch` to compare). Every op is graph-safe: no host sync, no shape that
depends on tensor values, positions as device tensors.
"""

from .activation import silu_mul
from .attention import cached_attention
from .norm import add_rms_norm, rms_norm
from .rope import apply_rope, rope_kv_write, rope_tables

__all__ = ["add_rms_norm", "apply_rope", "cached_attention", "rms_norm", "rope_kv_write", "rope_tables", "silu_mul"]
