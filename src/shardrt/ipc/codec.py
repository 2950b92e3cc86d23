"""All wire encoding: msgpack maps, with tensors as separate zero-copy ZeroMQ frames.

A message is one msgpack frame followed by zero or more payload frames. A tensor inside the
map is a reference `{"dtype", "shape", "frame": i}` (payload frame i) or `{"dtype", "shape",
"shm": seq}` (the sender's shared-memory slot). No pickle, ever. Decoding checks every size,
count and dtype before it touches memory.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import torch

from ..errors import IpcError
from .protocol import MAX_CAPTURE_LAYERS
from .shm import DTYPE_NAMES, MAX_RANK

MAX_MESSAGE_BYTES = 1 << 20  # the msgpack part; payloads ride in their own frames
MAX_FRAMES = 2 + MAX_CAPTURE_LAYERS  # the map, then a reply's output and one frame per capture slice


_packer = msgpack.Packer(use_bin_type=True)  # reused: packb would build one per message
DTYPE_NAME = {dtype: name for name, dtype in DTYPE_NAMES.items()}


def encode(message: dict, payloads: list[torch.Tensor] = ()) -> list:
    """Frames for `message`; each tensor in `payloads` becomes one raw frame (no copy on CPU)."""
    frames: list = [_packer.pack(message)]
    for tensor in payloads:
        frames.append(memoryview(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))
    return frames


def tensor_ref(tensor: torch.Tensor, **where: int) -> dict:
    return {"dtype": DTYPE_NAME[tensor.dtype], "shape": list(tensor.shape), **where}


def decode(frames: list) -> dict:
    if not frames or len(frames) > MAX_FRAMES:
        raise IpcError(f"wire: {len(frames)} frames; 1..{MAX_FRAMES} accepted")
    head = frames[0]
    if len(head) > MAX_MESSAGE_BYTES:
        raise IpcError(f"wire: message of {len(head)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(bytes(head), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise IpcError(f"wire: message is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise IpcError(f"wire: message is a {type(message).__name__}, not a map")
    return message


def frame_tensor(ref: Any, frames: list, field: str) -> torch.Tensor:
    """The tensor that `ref` (a validated reference) names among the payload frames."""
    dtype, shape = check_ref(ref, field)
    index = ref.get("frame")
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index < len(frames):
        raise IpcError(f"{field}.frame: {index!r} is not a payload frame of this message")
    buf = frames[index]
    raw = buf.buffer if hasattr(buf, "buffer") else buf
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize  # exact: an int64 product of [65536] * 4 wraps to 0
    if len(raw) != expected:
        raise IpcError(f"{field}: frame has {len(raw)} bytes, shape {shape} of {dtype} needs {expected}")
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if expected else torch.empty(shape, dtype=dtype)


def ref_tensor(ref: Any, frames: list, field: str, segment, slot: int, copy: bool = True) -> torch.Tensor:
    """The tensor a reference names: in `segment`'s `slot` (a copy, or a view of the slot), where
    the header must agree with the reference, or among the payload frames."""
    if not isinstance(ref, dict) or "shm" not in ref:
        return frame_tensor(ref, frames, field)
    dtype, shape = check_ref(ref, field)
    x = segment.read(slot, ref["shm"], ref.get("offset", 0), copy=copy)
    if x.dtype != dtype or list(x.shape) != shape:
        raise IpcError(f"{field}: shared memory holds {x.dtype} {list(x.shape)}, the message says {dtype} {shape}")
    return x


def check_ref(ref: Any, field: str) -> tuple[torch.dtype, list[int]]:
    if not isinstance(ref, dict):
        raise IpcError(f"{field}: {ref!r} is not a tensor reference")
    name = ref.get("dtype")
    dtype = DTYPE_NAMES.get(name) if type(name) is str else None
    if dtype is None:
        raise IpcError(f"{field}.dtype: {ref.get('dtype')!r}; accepted: {', '.join(DTYPE_NAMES)}")
    shape = ref.get("shape")
    if type(shape) is not list or len(shape) > MAX_RANK or not all(type(d) is int and 0 <= d < 1 << 31 for d in shape):
        raise IpcError(f"{field}.shape: {shape!r} is not a list of at most {MAX_RANK} sizes")
    return dtype, shape
