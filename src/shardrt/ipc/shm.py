"""One shared-memory segment per daemon: a control block, two message mailboxes, and an
inbound and an outbound tensor slot.

The control block holds the daemon's heartbeat, the doorbell counters (the id of the request in
the request mailbox, the id the daemon last took, the id of the reply in the reply mailbox) and a
flag per side saying it sleeps on ZeroMQ rather than spinning. A mailbox holds one msgpack
message. Each slot holds tensors, each a 64-byte header (sequence number, byte count, dtype
code, rank, shape) and its payload. The coordinator creates the segment (mode 0600, named
`shardrt-<pid>-...` so an operator can tell whose it is) and unlinks it when done; a daemon
whose coordinator died unlinks it too. Every header and length read is validated before its
bytes are trusted. A process that drives a GPU registers the segment with the runtime (`pin`),
so device copies into and out of its slots are direct DMA.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import IpcError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
HEADER = struct.Struct("<QQII4Q")  # seq, nbytes, dtype code, ndim, shape[4]
HEADER_SIZE = 64
U64, U32 = struct.Struct("<Q"), struct.Struct("<I")
CONTROL_SIZE = 64
COUNTERS = {"heartbeat": 0, "request": 8, "taken": 16, "reply": 24}  # u64 each
WAITING = {"daemon": 32, "coordinator": 36}  # u32 each: 1 while that side sleeps on ZeroMQ
MAILBOX_SIZE = 4096  # a u32 length, then a msgpack message
MAILBOX_BYTES = MAILBOX_SIZE - U32.size
SLOTS_BASE = CONTROL_SIZE + 2 * MAILBOX_SIZE
MAX_RANK = 4

# wire dtype codes; anything else on the wire is refused
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.int64, 5: torch.int32}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {str(v).removeprefix("torch."): v for v in DTYPES.values()}
ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPES.values()}
NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16,
              torch.int64: np.int64, torch.int32: np.int32}  # numpy's view of each dtype's bytes
# From this many elements torch splits a CPU copy over its thread pool, whose spinning workers
# fight a spinning doorbell for the cores; such copies go through numpy, one memcpy.
PARALLEL_COPY_ELEMENTS = 32768
MAX_VIEWS = 256  # payload views kept per segment; decode repeats a few shapes, so they are made once


ALIGN = 64


def packed_size(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes in a slot: its header and its payload, rounded up to ALIGN."""
    nbytes = HEADER_SIZE + tensor.numel() * tensor.element_size()
    return -(-nbytes // ALIGN) * ALIGN


def cpu_bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a numpy array (bfloat16 as int16 bits), without a copy when contiguous."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def large(shape: tuple[int, ...]) -> bool:
    return math.prod(shape) >= PARALLEL_COPY_ELEMENTS


def new_segment_name(tag: str) -> str:
    return f"shardrt-{os.getpid()}-{tag}-{secrets.token_hex(4)}"


class SharedSegment:
    """A named POSIX shared-memory segment: mailboxes REQUEST and REPLY, slots IN (to the daemon)
    and OUT (from it)."""

    IN, OUT = 0, 1
    REQUEST, REPLY = 0, 1

    def __init__(self, name: str, size: int | None = None):
        """Create the segment with `size` bytes, or attach to an existing one when size is None."""
        if not name.startswith("shardrt-") or "/" in name:
            raise IpcError(f"shm name: {name!r} is not a shardrt segment name")
        self.name, self.path, self.owner = name, SHM_DIR / name, size is not None
        self._pinned = False
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if self.owner else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise IpcError(f"shm: cannot {'create' if self.owner else 'open'} {name!r}: {exc.strerror}") from None
        try:
            self.size = size if self.owner else os.fstat(fd).st_size
            if self.size < SLOTS_BASE + 2 * (HEADER_SIZE + ALIGN):
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
        self.slot_size = (self.size - SLOTS_BASE) // 2 // ALIGN * ALIGN
        self.capacity = self.slot_size - HEADER_SIZE
        self._array = np.frombuffer(self._map, dtype=np.uint8)  # the whole segment
        self._views: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}

    # -- control block: heartbeat, doorbell counters, waiting flags ------------------------

    def counter(self, name: str) -> int:
        return U64.unpack_from(self._map, COUNTERS[name])[0]

    def set_counter(self, name: str, value: int) -> None:
        U64.pack_into(self._map, COUNTERS[name], value)

    def beat(self) -> None:
        """Advance the heartbeat (the daemon's liveness thread calls this)."""
        self.set_counter("heartbeat", self.heartbeat() + 1)

    def heartbeat(self) -> int:
        return self.counter("heartbeat")

    def waiting(self, side: str) -> bool:
        return U32.unpack_from(self._map, WAITING[side])[0] == 1

    def set_waiting(self, side: str, flag: bool) -> None:
        U32.pack_into(self._map, WAITING[side], int(flag))

    # -- mailboxes ---------------------------------------------------------------------------

    def post(self, box: int, seq: int, message: bytes) -> bool:
        """Put `message` in a mailbox, then ring: set its counter to `seq`. False (nothing
        written) when the message does not fit; it then goes over ZeroMQ."""
        if len(message) > MAILBOX_BYTES:
            return False
        base = CONTROL_SIZE + box * MAILBOX_SIZE
        U32.pack_into(self._map, base, len(message))
        self._map[base + U32.size : base + U32.size + len(message)] = message
        self.set_counter("request" if box == self.REQUEST else "reply", seq)  # after the bytes: x86 keeps store order
        return True

    def message(self, box: int) -> bytes:
        base = CONTROL_SIZE + box * MAILBOX_SIZE
        length = U32.unpack_from(self._map, base)[0]
        if length > MAILBOX_BYTES:
            raise IpcError(f"shm: mailbox message of {length} bytes exceeds {MAILBOX_BYTES}")
        return self._map[base + U32.size : base + U32.size + length]

    # -- tensor slots ---------------------------------------------------------------------------

    def _slot_base(self, slot: int) -> int:
        return SLOTS_BASE + slot * self.slot_size

    def fits(self, *tensors: torch.Tensor) -> bool:
        """Whether these tensors, packed one after another, fit one slot."""
        return sum(packed_size(t) for t in tensors) <= self.slot_size

    def write(self, slot: int, seq: int, tensor: torch.Tensor, offset: int = 0) -> int:
        """Put `tensor` (header + bytes) at `offset` in the slot; returns the offset after it. A GPU
        tensor is copied straight in. A slot may hold several tensors back to back (an output and
        its capture slices)."""
        dtype, shape = tensor.dtype, tuple(tensor.shape)
        if dtype not in DTYPE_CODES or len(shape) > MAX_RANK:
            raise IpcError(f"shm: cannot carry a {dtype} tensor of rank {len(shape)}")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        end = offset + -(-(HEADER_SIZE + nbytes) // ALIGN) * ALIGN
        if offset < 0 or offset % ALIGN or end > self.slot_size:
            raise IpcError(f"shm: {nbytes} bytes at offset {offset} do not fit the {self.slot_size}-byte slot")
        base = self._slot_base(slot) + offset
        if nbytes:
            array, view = self._payload(base, dtype, shape)
            if tensor.is_cpu and large(shape):
                array[...] = cpu_bits(tensor)
            else:  # a small CPU copy, or device -> segment (by DMA where the segment is pinned)
                view.copy_(tensor)
        HEADER.pack_into(self._map, base, seq, nbytes, DTYPE_CODES[dtype], len(shape), *shape, *(0,) * (MAX_RANK - len(shape)))
        return end

    def read(self, slot: int, seq: int, offset: int = 0, copy: bool = True) -> torch.Tensor:
        """The tensor at `offset` in `slot`, checked against the expected sequence number: a copy,
        or with copy=False a view of the segment, valid until the peer writes the slot again."""
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
        dtype, shape = DTYPES[code], tuple(shape[:ndim])
        # math.prod: exact, where an int64 product of hostile sizes could wrap around to match nbytes
        if nbytes > capacity or math.prod(shape) * ITEMSIZE[dtype] != nbytes:
            raise IpcError(f"shm: header says {nbytes} bytes for shape {list(shape)} of {dtype}; slot holds {capacity}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        array, view = self._payload(base, dtype, shape)
        if not copy:
            return view
        if large(shape):
            copied = torch.from_numpy(array.copy())
            return copied.view(torch.bfloat16) if dtype == torch.bfloat16 else copied
        return view.clone()

    def _payload(self, base: int, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
        """numpy and torch views of the payload after the header at `base`, made once per place and shape."""
        key = (base, dtype, shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            start = base + HEADER_SIZE
            array = self._array[start : start + math.prod(shape) * ITEMSIZE[dtype]].view(NUMPY_BITS[dtype]).reshape(shape)
            view = torch.from_numpy(array)
            views = self._views[key] = (array, view.view(torch.bfloat16) if dtype == torch.bfloat16 else view)
        return views

    # -- lifetime ---------------------------------------------------------------------------------

    def pin(self) -> bool:
        """Register the segment with the CUDA (or HIP) runtime as page-locked memory; False where
        that is not possible, and copies then stage through the runtime's own buffers."""
        if self._pinned:
            return True
        if not torch.cuda.is_available():
            return False
        try:
            err = torch.cuda.cudart().cudaHostRegister(self._array.ctypes.data, self.size, 0)
        except (AttributeError, RuntimeError) as exc:
            log.info("shm %s: not pinned (%s)", self.name, exc)
            return False
        self._pinned = int(err) == 0
        if not self._pinned:
            log.info("shm %s: cudaHostRegister answered %s; not pinned", self.name, err)
        return self._pinned

    def close(self) -> None:
        if getattr(self, "_map", None) is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._array.ctypes.data)
            self._pinned = False
        self._array, self._views = None, {}
        try:
            self._map.close()
        except BufferError:
            pass  # a view handed out by read(copy=False) is still alive; the map goes with it
        self._map = None

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
