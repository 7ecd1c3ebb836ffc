"""Safetensors files written durably and read back piece by piece, with per-tensor CRC32 checksums.

Writing goes through `safetensors.torch.save_file` (the standard format, readable by any tool). Reading
parses the header ourselves, so opening a file reads nothing but its header, and an event's rows are read
only when retrieval asks for them. Checksums are kept by the caller (in the store's index) and checked per
tensor on first use, so a large file opens fast and a corrupted one is never used silently.
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


class TensorFile:
    """The tensors of one safetensors file, read on demand with pread and checked against their CRC32.

    Nothing is memory-mapped: a mapping keeps every page it ever touched in the process's resident set,
    so a session that retrieves across a million tokens would grow its RSS with the file. Reads go
    through the page cache instead, which the kernel can reclaim.
    """

    def __init__(self, path: Path, checksums: dict[str, int], expected_bytes: int | None = None):
        self._fd: int | None = None
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
        self._verified: set[str] = set()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def names(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor, from the header (reads nothing)."""
        begin, end = self._entry(name)["data_offsets"]
        return end - begin

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, read into memory and checked."""
        entry = self._entry(name)
        begin, end = entry["data_offsets"]
        data = self._read(self._data_start + begin, end - begin)
        self._check(name, zlib.crc32(data) if data else 0)
        return _as_tensor(data, entry, tuple(entry["shape"]))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 2 of a (B, H, T, D) tensor, read alone (the whole tensor is checked
        once, on its first read)."""
        entry = self._entry(name)
        b, h, t, d = entry["shape"]
        if not 0 <= start <= stop <= t:
            raise IndexError(f"rows {start}:{stop} outside {t} in {self.path}:{name}")
        if name not in self._verified:
            self._verify(name)
        itemsize = np.dtype(_DTYPES[entry["dtype"]][0]).itemsize
        row_bytes = d * itemsize
        base = self._data_start + entry["data_offsets"][0]
        pieces = [
            self._read(base + ((bh * t) + start) * row_bytes, (stop - start) * row_bytes)
            for bh in range(b * h)
        ]
        return _as_tensor(b"".join(pieces), entry, (b, h, stop - start, d))

    def _entry(self, name: str) -> dict:
        entry = self._header.get(name)
        if entry is None:
            raise CorruptSessionError(f"{self.path} has no tensor {name!r}")
        return entry

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptSessionError(f"{self.path} is missing") from None
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CorruptSessionError(f"{self.path}: short read at {offset} (truncated)")
        return data

    def _verify(self, name: str) -> None:
        begin, end = self._entry(name)["data_offsets"]
        crc, position, block = 0, self._data_start + begin, 16 << 20
        while position < self._data_start + end:
            length = min(block, self._data_start + end - position)
            crc = zlib.crc32(self._read(position, length), crc)
            position += length
        self._check(name, crc)

    def _check(self, name: str, crc: int) -> None:
        expected = self.checksums.get(name)
        if expected is not None and crc != expected:
            raise CorruptSessionError(f"{self.path}: tensor {name!r} fails its checksum (corrupted file)")
        self._verified.add(name)


def _as_tensor(data: bytes, entry: dict, shape: tuple[int, ...]) -> torch.Tensor:
    np_dtype, torch_dtype = _DTYPES[entry["dtype"]]
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    tensor = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np_dtype).reshape(shape))
    return tensor.view(torch_dtype) if torch_dtype != tensor.dtype else tensor


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


__all__ = ["TensorFile", "fsync_dir", "tensor_crc", "write_tensors"]
