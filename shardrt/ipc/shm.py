"""One shared-memory segment per daemon, split into an inbound and an outbound slot.

A 64-byte control block (the daemon's heartbeat) comes first. Each slot is a 64-byte header (sequence number, byte count, dtype code, rank, shape) and a
payload area. The coordinator creates the segment (mode 0600, named `shardrt-<pid>-...` so an
operator can tell whose it is) and unlinks it when done; a daemon whose coordinator died
unlinks it too. Every header read is validated before its bytes are trusted.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import IpcError

SHM_DIR = Path("/dev/shm")
HEADER = struct.Struct("<QQII4Q")  # seq, nbytes, dtype code, ndim, shape[4]
HEADER_SIZE = 64
CONTROL = struct.Struct("<Q")  # the daemon's heartbeat counter, in the segment's first 64 bytes
CONTROL_SIZE = 64
MAX_RANK = 4

# wire dtype codes; anything else on the wire is refused
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.int64, 5: torch.int32}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {str(v).removeprefix("torch."): v for v in DTYPES.values()}


ALIGN = 64


def packed_size(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes in a slot: its header and its payload, rounded up to ALIGN."""
    nbytes = HEADER_SIZE + tensor.numel() * tensor.element_size()
    return -(-nbytes // ALIGN) * ALIGN


def new_segment_name(tag: str) -> str:
    return f"shardrt-{os.getpid()}-{tag}-{secrets.token_hex(4)}"


class SharedSegment:
    """A named POSIX shared-memory segment with two slots: IN (to the daemon), OUT (from it)."""

    IN, OUT = 0, 1

    def __init__(self, name: str, size: int | None = None):
        """Create the segment with `size` bytes, or attach to an existing one when size is None."""
        if not name.startswith("shardrt-") or "/" in name:
            raise IpcError(f"shm name: {name!r} is not a shardrt segment name")
        self.name, self.path, self.owner = name, SHM_DIR / name, size is not None
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if self.owner else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise IpcError(f"shm: cannot {'create' if self.owner else 'open'} {name!r}: {exc.strerror}") from None
        try:
            self.size = size if self.owner else os.fstat(fd).st_size
            if self.size < CONTROL_SIZE + 2 * (HEADER_SIZE + 8):
                raise IpcError(f"shm: segment {name!r} is {self.size} bytes, too small")
            try:
                if self.owner:
                    os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, self.size)
            except OSError as exc:  # e.g. shared_bytes larger than the address space or /dev/shm allows
                raise IpcError(f"shm: cannot map {name!r} of {self.size} bytes: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            if self.owner:
                self.unlink()
            raise
        os.close(fd)
        self.slot_size = (self.size - CONTROL_SIZE) // 2
        self.capacity = self.slot_size - HEADER_SIZE
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)

    def _slot_base(self, slot: int) -> int:
        return CONTROL_SIZE + slot * self.slot_size

    def beat(self) -> None:
        """Advance the heartbeat (the daemon's liveness thread calls this)."""
        CONTROL.pack_into(self._map, 0, self.heartbeat() + 1)

    def heartbeat(self) -> int:
        return CONTROL.unpack_from(self._map, 0)[0]

    def fits(self, *tensors: torch.Tensor) -> bool:
        """Whether these tensors, packed one after another, fit one slot."""
        return sum(packed_size(t) for t in tensors) <= self.slot_size

    def write(self, slot: int, seq: int, tensor: torch.Tensor, offset: int = 0) -> int:
        """Put `tensor` (header + bytes) at `offset` in the slot; returns the offset after it.

        A slot may hold several tensors back to back (an output and its capture slices)."""
        tensor = tensor.detach()
        if tensor.dtype not in DTYPE_CODES or tensor.dim() > MAX_RANK:
            raise IpcError(f"shm: cannot carry a {tensor.dtype} tensor of rank {tensor.dim()}")
        nbytes = tensor.numel() * tensor.element_size()
        if offset < 0 or offset % ALIGN or offset + packed_size(tensor) > self.slot_size:
            raise IpcError(f"shm: {nbytes} bytes at offset {offset} do not fit the {self.slot_size}-byte slot")
        base = self._slot_base(slot) + offset
        payload = self._buffer[base + HEADER_SIZE : base + HEADER_SIZE + nbytes]
        payload[:] = tensor.contiguous().cpu().view(-1).view(torch.uint8).numpy()
        shape = list(tensor.shape) + [0] * (MAX_RANK - tensor.dim())
        HEADER.pack_into(self._map, base, seq, nbytes, DTYPE_CODES[tensor.dtype], tensor.dim(), *shape)
        return offset + packed_size(tensor)

    def read(self, slot: int, seq: int, offset: int = 0) -> torch.Tensor:
        """The tensor at `offset` in `slot`, checked against the expected sequence number; a copy."""
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % ALIGN \
                or offset + HEADER_SIZE > self.slot_size:
            raise IpcError(f"shm: offset {offset!r} is not an aligned place in the {self.slot_size}-byte slot")
        capacity = self.slot_size - offset - HEADER_SIZE
        base = self._slot_base(slot) + offset
        got_seq, nbytes, code, ndim, *shape = HEADER.unpack_from(self._map, base)
        if got_seq != seq:
            raise IpcError(f"shm: slot holds sequence {got_seq}, expected {seq}")
        if code not in DTYPES:
            raise IpcError(f"shm: dtype code {code} is not one of {sorted(DTYPES)}")
        if ndim > MAX_RANK:
            raise IpcError(f"shm: rank {ndim} exceeds {MAX_RANK}")
        dtype, shape = DTYPES[code], shape[:ndim]
        itemsize = torch.empty((), dtype=dtype).element_size()
        # math.prod: exact, where an int64 product of hostile sizes could wrap around to match nbytes
        if nbytes > capacity or math.prod(shape) * itemsize != nbytes:
            raise IpcError(f"shm: header says {nbytes} bytes for shape {shape} of {dtype}; slot holds {capacity}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = self._buffer[base + HEADER_SIZE : base + HEADER_SIZE + nbytes]
        return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._buffer = None
            self._map.close()
            self._map = None

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
