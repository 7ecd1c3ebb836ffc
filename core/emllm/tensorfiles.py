"""Safetensors files written durably and read back memory-mapped, with per-tensor CRC32 checksums.

Writing goes through `safetensors.torch.save_file` (the standard format, readable by any tool). Reading parses
the header ourselves and maps each tensor with numpy, so opening a file reads nothing but its header and a
tensor's pages are read only when touched. Checksums are kept by the caller (in the store's index) and
checked per tensor on first use, so a large file opens fast and a corrupted one is never used silently.
Knows nothing about sessions.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import CorruptSessionError

# safetensors dtype name -> (numpy dtype used for the mapping, torch dtype it is viewed as)
_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),  # numpy has no bfloat16: map the bits, view them in torch
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (as stored: contiguous, native byte order)."""
    data = tensor.detach().contiguous().cpu().reshape(-1)
    return zlib.crc32(data.view(torch.uint8).numpy()) if data.numel() else 0


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, int]:
    """Write a safetensors file and fsync it; returns the CRC32 of each tensor. The caller publishes the
    file (in its index) only after this returns, so a crash leaves at most an unreferenced file."""
    if path.exists():
        raise FileExistsError(f"{path} exists; tensor files are never overwritten")
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(contiguous, path, metadata=metadata)  # streams tensor by tensor: no second copy in memory
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {name: tensor_crc(t) for name, t in contiguous.items()}


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new or removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MappedTensors:
    """The tensors of one safetensors file, memory-mapped on demand and checked against their CRC32 once."""

    def __init__(self, path: Path, checksums: dict[str, int], expected_bytes: int | None = None):
        self.path = Path(path)
        self.checksums = checksums
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CorruptSessionError(f"{self.path} is missing") from None
        if expected_bytes is not None and size != expected_bytes:
            raise CorruptSessionError(
                f"{self.path} has {size} bytes, the index recorded {expected_bytes}: truncated or replaced"
            )
        self._header, self._data_start = _read_header(self.path, size)
        self.metadata: dict[str, str] = self._header.pop("__metadata__", None) or {}
        self._cache: dict[str, torch.Tensor] = {}

    def names(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor, from the header (maps nothing)."""
        begin, end = self._header[name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped (copy-on-write: writing to it never changes the file)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        entry = self._header.get(name)
        if entry is None:
            raise CorruptSessionError(f"{self.path} has no tensor {name!r}")
        np_dtype, torch_dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            tensor = torch.empty(shape, dtype=torch_dtype)
        else:
            array = np.memmap(
                self.path, dtype=np_dtype, mode="c", offset=self._data_start + begin, shape=shape
            )
            tensor = torch.from_numpy(array)
            if torch_dtype != tensor.dtype:
                tensor = tensor.view(torch_dtype)
        expected = self.checksums.get(name)
        if expected is not None and tensor_crc(tensor) != expected:
            raise CorruptSessionError(f"{self.path}: tensor {name!r} fails its checksum (corrupted file)")
        self._cache[name] = tensor
        return tensor


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CorruptSessionError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CorruptSessionError(f"{path}: header length {header_len} exceeds the file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptSessionError(f"{path}: unreadable header ({exc})") from exc
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise CorruptSessionError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')}")
        if data_start + entry["data_offsets"][1] > size:
            raise CorruptSessionError(f"{path}: tensor {name!r} lies past the end of the file (truncated)")
    return header, data_start


__all__ = ["MappedTensors", "fsync_dir", "tensor_crc", "write_tensors"]
