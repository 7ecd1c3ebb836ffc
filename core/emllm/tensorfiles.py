"""Safetensors files written durably and read back piece by piece, with per-tensor CRC32 checksums.

Writing goes through `safetensors.torch.save_file` (the standard format, readable by any tool). Reading
parses the header ourselves, so opening a file reads nothing but its header, and an event's rows are read
only when retrieval asks for them. Checksums are kept by the caller (in the store's index) and also in
the file's own metadata (so a file can be checked without the index); they are checked per tensor on
first use, so a large file opens fast and a corrupted one is never used silently.

Files are untrusted input: a header whose shapes, dtypes or offsets disagree with each other or with the
file's size, or a path that is not a regular file, is a CorruptSessionError before anything is allocated;
every tensor read is bounded by the bytes the file really holds. Knows nothing about sessions.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import CorruptSessionError, StoreWriteError

CHECKSUMS_KEY = "crc32"  # metadata entry holding {tensor name: CRC32} of the file's own tensors
MAX_HEADER_BYTES = 64 << 20  # a header past this is not one the store wrote
MAX_DIMS = 8

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
    """Write a safetensors file and fsync it; returns the CRC32 of each tensor (also kept in the file's
    metadata). The caller publishes the file (in its index) only after this returns, so a crash leaves at
    most an unreferenced file. A failed write (disk full, permission denied) removes what it wrote and
    raises StoreWriteError."""
    if path.exists():
        raise FileExistsError(f"{path} exists; tensor files are never overwritten")
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    checksums = {name: tensor_crc(t) for name, t in contiguous.items()}
    try:
        # streams tensor by tensor: no second copy in memory
        save_file(contiguous, path, metadata={**metadata, CHECKSUMS_KEY: json.dumps(checksums)})
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    except (OSError, SafetensorError) as exc:
        path.unlink(missing_ok=True)
        raise StoreWriteError(f"cannot write {path}: {exc}") from exc
    return checksums


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

    def __init__(
        self, path: Path, checksums: dict[str, int] | None = None, expected_bytes: int | None = None
    ):
        """checksums: the CRC32s recorded elsewhere (the store's index); None = the file's own."""
        self._fd: int | None = None
        self.path = Path(path)
        size = regular_file_size(self.path)
        if expected_bytes is not None and size != expected_bytes:
            raise CorruptSessionError(
                f"{self.path} has {size} bytes, the index recorded {expected_bytes}: truncated or replaced"
            )
        self.size = size
        self._header, self._data_start = _read_header(self.path, size)
        self.metadata: dict[str, str] = self._header.pop("__metadata__", None) or {}
        self.checksums = checksums if checksums is not None else self.own_checksums()
        self._verified: set[str] = set()

    def own_checksums(self) -> dict[str, int]:
        """The CRC32s the file's metadata records ({} for files written before they were recorded)."""
        raw = self.metadata.get(CHECKSUMS_KEY)
        if raw is None:
            return {}
        return parse_checksums(raw, str(self.path))

    def ref(self, name: str) -> FileTensor:
        """One tensor of the file, not read yet."""
        self._entry(name)
        return FileTensor(self, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]][1]

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
        if len(entry["shape"]) != 4:
            raise CorruptSessionError(f"{self.path}: tensor {name!r} has shape {entry['shape']}, not 4-D")
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
            self._fd = _open_regular(self.path)
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


class FileTensor:
    """A tensor of a TensorFile, read when asked for (whole, or rows of a (B, H, T, D) tensor)."""

    __slots__ = ("file", "name")

    def __init__(self, file: TensorFile, name: str) -> None:
        self.file, self.name = file, name

    def __repr__(self) -> str:
        return f"FileTensor({str(self.file.path)!r}, {self.name!r}, shape={list(self.shape)})"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.name)

    def read(self) -> torch.Tensor:
        return self.file.get(self.name)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.file.read_rows(self.name, start, stop)

    def nbytes(self) -> int:
        return self.file.nbytes(self.name)


def _as_tensor(data: bytes, entry: dict, shape: tuple[int, ...]) -> torch.Tensor:
    np_dtype, torch_dtype = _DTYPES[entry["dtype"]]
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    tensor = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np_dtype).reshape(shape))
    return tensor.view(torch_dtype) if torch_dtype != tensor.dtype else tensor


def parse_checksums(raw: str, where: str) -> dict[str, int]:
    """{tensor name: CRC32} from its JSON text; anything else is a CorruptSessionError."""
    try:
        checksums = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise CorruptSessionError(f"{where}: unreadable checksums ({exc})") from exc
    if not isinstance(checksums, dict) or not all(
        isinstance(k, str) and _is_int(v) and 0 <= v < 2**32 for k, v in checksums.items()
    ):
        raise CorruptSessionError(f"{where}: checksums are not a map of tensor names to CRC32 values")
    return checksums


def regular_file_size(path: Path) -> int:
    """The size of a regular file; a missing path, a symbolic link or anything else is CorruptSessionError."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CorruptSessionError(f"{path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptSessionError(
            f"{path} is not a regular file (a link or a folder); the store never writes one"
        )
    return info.st_size


def _open_regular(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CorruptSessionError(f"{path} is missing") from None
    except OSError as exc:  # ELOOP: a symbolic link put in its place
        raise CorruptSessionError(f"{path} cannot be opened as a regular file: {exc}") from exc


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    fd = _open_regular(path)
    try:
        raw_len = os.pread(fd, 8, 0)
        if len(raw_len) < 8:
            raise CorruptSessionError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise CorruptSessionError(f"{path}: header length {header_len} exceeds the file")
        raw = os.pread(fd, header_len, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptSessionError(f"{path}: unreadable header ({exc})") from exc
    data_start = 8 + header_len
    _check_header(path, header, size - data_start)
    return header, data_start


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(path: Path, header, data_bytes: int) -> None:
    """Every tensor's dtype, shape and offsets agree with each other and with the bytes the file holds, and
    no two tensors share bytes: what a header claims can never make a read allocate more than the file."""
    if not isinstance(header, dict):
        raise CorruptSessionError(f"{path}: the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptSessionError(f"{path}: metadata is not a map of strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_tensor_span(path, name, entry, data_bytes), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise CorruptSessionError(f"{path}: tensor {name!r} overlaps another tensor's bytes")
        end = stop


def _tensor_span(path: Path, name: str, entry, data_bytes: int) -> tuple[int, int]:
    def bad(why: str) -> CorruptSessionError:
        return CorruptSessionError(f"{path}: tensor {name!r} {why}")

    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("dtype"), str)
        or entry["dtype"] not in _DTYPES
    ):
        raise bad(f"has an unsupported dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        raise bad(f"has invalid data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"has invalid data offsets {offsets!r}")
    if end > data_bytes:
        raise bad("lies past the end of the file (truncated)")
    itemsize = np.dtype(_DTYPES[entry["dtype"]][0]).itemsize
    if math.prod(shape) * itemsize != end - begin:
        raise bad(f"claims shape {shape} ({entry['dtype']}) but holds {end - begin} bytes")
    return begin, end


__all__ = [
    "FileTensor",
    "TensorFile",
    "fsync_dir",
    "parse_checksums",
    "regular_file_size",
    "tensor_crc",
    "write_tensors",
]
