"""The GGUF container: header, metadata and tensor directory, read strictly from a memory map.

Nothing here dequantizes or touches tensor bytes; it only says where each tensor lies. Every
count, length and offset read from the file is checked against the file's size before use, so
a truncated or corrupt file gets a `ModelFormatError` that names what is wrong.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Arrays longer than this are not decoded up front (tokenizer vocabularies); they are read on demand.
EAGER_ARRAY_LIMIT = 1024

# GGUF value types (gguf.GGUFValueType): struct format and size of each scalar type.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the fastest-varying (row length)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LazyArray:
    """A long metadata array (e.g. a vocabulary) left undecoded until asked for."""

    item_type: int
    count: int
    offset: int


class GGUFFile:
    """An opened GGUF file: `metadata`, `tensors` by name, and a read-only memory map."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise ModelFormatError(f"model: cannot open {str(self.path)!r}: {exc.strerror}") from None
        try:
            self.file_size = os.fstat(self._fd).st_size
            if self.file_size < 24:
                raise ModelFormatError(f"model: {self.path.name!r} is {self.file_size} bytes, too small to be GGUF")
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            # No read-around: a stage asks for its own spans (prefetch) and nothing beside them.
            self._map.madvise(mmap.MADV_RANDOM)
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- public ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        return self.read_array(value) if isinstance(value, LazyArray) else value

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFormatError(f"model: {self.path.name!r} lacks metadata key {key!r}")
        return self.get(key)

    def tensor_bytes(self, info: TensorInfo) -> memoryview:
        """The raw bytes of one tensor, straight from the map (no copy)."""
        return memoryview(self._map)[info.offset : info.offset + info.n_bytes]

    def prefetch(self, start: int, end: int) -> None:
        """Ask the kernel to read bytes [start, end) ahead of use."""
        page = mmap.PAGESIZE
        aligned = start - start % page
        self._map.madvise(mmap.MADV_WILLNEED, aligned, min(end, self.file_size) - aligned)

    def read_array(self, lazy: LazyArray) -> list:
        values, _ = self._read_array_items(lazy.item_type, lazy.count, lazy.offset)
        return values

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def header_sha256(self) -> str:
        """SHA-256 of everything before the tensor data: header, metadata and tensor table."""
        data_start = min((info.offset for info in self.tensors.values()), default=self.file_size)
        return hashlib.sha256(memoryview(self._map)[:data_start]).hexdigest()

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views of the map are still alive; the map goes with them
            self._map = None
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- parsing --------------------------------------------------------------------------

    def _need(self, offset: int, size: int, what: str) -> None:
        if size < 0 or offset + size > self.file_size:
            raise ModelFormatError(
                f"model: {self.path.name!r} is truncated or corrupt: {what} needs bytes "
                f"{offset}..{offset + size} but the file has {self.file_size}"
            )

    def _unpack(self, fmt: str, size: int, offset: int, what: str) -> tuple[Any, int]:
        self._need(offset, size, what)
        return struct.unpack_from(fmt, self._map, offset)[0], offset + size

    def _read_string(self, offset: int, what: str) -> tuple[str, int]:
        length, offset = self._unpack("<Q", 8, offset, what)
        self._need(offset, length, what)
        raw = self._map[offset : offset + length]
        try:
            return raw.decode("utf-8"), offset + length
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), offset + length

    def _read_value(self, vtype: int, offset: int, what: str) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self._unpack(fmt, size, offset, what)
        if vtype == _STRING:
            return self._read_string(offset, what)
        if vtype == _ARRAY:
            item_type, offset = self._unpack("<I", 4, offset, what)
            count, offset = self._unpack("<Q", 8, offset, what)
            if count > self.file_size:
                raise ModelFormatError(f"model: {what} claims {count} items, more than the file could hold")
            if count > EAGER_ARRAY_LIMIT:
                return LazyArray(item_type, count, offset), self._skip_array(item_type, count, offset, what)
            return self._read_array_items(item_type, count, offset, what)
        raise ModelFormatError(f"model: {what} has unknown GGUF value type {vtype}")

    def _skip_array(self, item_type: int, count: int, offset: int, what: str) -> int:
        if item_type in _SCALARS:
            size = _SCALARS[item_type][1] * count
            self._need(offset, size, what)
            return offset + size
        if item_type == _STRING:
            for _ in range(count):
                length, offset = self._unpack("<Q", 8, offset, what)
                self._need(offset, length, what)
                offset += length
            return offset
        raise ModelFormatError(f"model: {what} is an array of unsupported item type {item_type}")

    def _read_array_items(self, item_type: int, count: int, offset: int, what: str = "array") -> tuple[list, int]:
        if item_type in _SCALARS:
            fmt, size = _SCALARS[item_type]
            self._need(offset, size * count, what)
            values = np.frombuffer(self._map, dtype=np.dtype(fmt), count=count, offset=offset).tolist()
            return values, offset + size * count
        values = []
        for _ in range(count):
            value, offset = self._read_value(item_type, offset, what)
            values.append(value)
        return values, offset

    def _parse(self) -> None:
        if self._map[:4] != GGUF_MAGIC:
            raise ModelFormatError(f"model: {self.path.name!r} is not a GGUF file (magic {bytes(self._map[:4])!r})")
        version, offset = self._unpack("<I", 4, 4, "version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(f"model: {self.path.name!r} has GGUF version {version}; supported: {SUPPORTED_VERSIONS}")
        n_tensors, offset = self._unpack("<Q", 8, offset, "tensor count")
        n_kv, offset = self._unpack("<Q", 8, offset, "metadata count")
        if n_tensors > self.file_size // 24 or n_kv > self.file_size // 12:
            raise ModelFormatError(f"model: {self.path.name!r} claims {n_tensors} tensors and {n_kv} keys; corrupt header")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = self._read_string(offset, "metadata key")
            vtype, offset = self._unpack("<I", 4, offset, f"type of {key!r}")
            self.metadata[key], offset = self._read_value(vtype, offset, f"metadata {key!r}")

        raw_infos = []
        for _ in range(n_tensors):
            name, offset = self._read_string(offset, "tensor name")
            n_dims, offset = self._unpack("<I", 4, offset, f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFormatError(f"model: tensor {name!r} has {n_dims} dimensions; 1..{MAX_DIMS} accepted")
            self._need(offset, 8 * n_dims + 12, f"tensor {name!r}")
            shape = struct.unpack_from(f"<{n_dims}Q", self._map, offset)
            offset += 8 * n_dims
            qtype_id, rel_offset = struct.unpack_from("<IQ", self._map, offset)
            offset += 12
            raw_infos.append((name, tuple(int(d) for d in shape), qtype_id, rel_offset))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"model: general.alignment = {alignment!r}; a power of two is accepted")
        self.alignment = alignment
        self.data_offset = offset + (-offset % alignment)

        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype_id, rel_offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(qtype_id)
            except ValueError:
                raise ModelFormatError(f"model: tensor {name!r} has unknown tensor type id {qtype_id}") from None
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = math.prod(shape)
            if shape[0] % block_elems:
                raise ModelFormatError(
                    f"model: tensor {name!r} row length {shape[0]} is not a multiple of {qtype.name}'s block {block_elems}"
                )
            info = TensorInfo(name, shape, qtype, self.data_offset + rel_offset, n_elements // block_elems * block_bytes)
            self._need(info.offset, info.n_bytes, f"tensor {name!r}")
            self.tensors[name] = info


def model_identity(path: Path) -> dict:
    """What tells two copies of a model file apart, on any host: its size and header digest
    (with its name, for messages)."""
    with GGUFFile(path) as gguf:
        return {"file": Path(path).name, "bytes": gguf.file_size, "header_sha256": gguf.header_sha256()}
