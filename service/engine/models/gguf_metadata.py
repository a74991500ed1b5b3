"""Read a GGUF file's metadata and tensor directory, fast, without touching the tensor data.

``gguf.GGUFReader`` builds a numpy view per array element, which takes tens of seconds on a
262,144-token vocabulary; tokenizing a line or inspecting a file should not. This reads the
header with ``struct`` from a memory map: strings are decoded once, numeric arrays become lists
through one ``numpy.frombuffer`` each. Layout (little-endian, versions 2 and 3): magic ``GGUF``,
version, tensor count, key-value count, the key-values, then one (name, dims, type, offset)
entry per tensor.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as GGUF lists it: the fastest-varying dimension first
    type_id: int  # a ggml type (gguf.GGMLQuantizationType value)

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True, slots=True)
class GGUFMetadata:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Cursor:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        except struct.error as exc:
            raise GGUFFormatError("the file ends inside its metadata") from exc
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        end = self.pos + size
        if end > len(self.buffer):
            raise GGUFFormatError("the file ends inside a metadata string")
        raw = self.buffer[self.pos : end]
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            return self.array()
        fmt = _SCALARS.get(type_id)
        if fmt is None:
            raise GGUFFormatError(f"unknown metadata value type {type_id}")
        return self.scalar(fmt)

    def array(self) -> list[Any]:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        if item_type == _ARRAY:
            return [self.array() for _ in range(count)]
        fmt = _SCALARS.get(item_type)
        if fmt is None:
            raise GGUFFormatError(f"unknown metadata array type {item_type}")
        size = struct.calcsize(fmt) * count
        if self.pos + size > len(self.buffer):
            raise GGUFFormatError("the file ends inside a metadata array")
        values = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.pos)
        self.pos += size
        return list(values.tolist())


def read_metadata(path: Path) -> GGUFMetadata:
    """Metadata key-values and tensor directory of ``path``; raises ``GGUFFormatError``."""
    with path.open("rb") as fh:
        try:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise GGUFFormatError(f"{path} is empty") from exc
    with buffer:
        if buffer[:4] != _MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (no GGUF magic)")
        cursor = _Cursor(buffer)
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        tensor_count = cursor.scalar("<Q")
        kv_count = cursor.scalar("<Q")
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            fields[key] = cursor.value(cursor.scalar("<I"))
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = cursor.scalar("<I")
            shape = tuple(cursor.scalar("<Q") for _ in range(dims))
            type_id = cursor.scalar("<I")
            cursor.scalar("<Q")  # offset into the data section
            tensors.append(TensorInfo(name, shape, type_id))
    return GGUFMetadata(version, fields, tensors)
