"""The CPU and disk tiers of one layer's events: a list that reads the same whichever tier an event is in.

The newest events live in RAM as tensors; saved ones are read from segment files when asked for (one
file holds a run of consecutive events for every layer, concatenated along the token axis). Memory grows
with the text on disk, not in RAM: after a save, the RAM copies are dropped.
Knows nothing about sessions or the index: a run reads through a tensor reference (`read_rows`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class RowSource(Protocol):
    """A (B, H, T, D) tensor on disk: rows along T read on demand."""

    def read_rows(self, start: int, stop: int) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class DiskRun:
    """Consecutive events [first, first + len(offsets) - 1) of one tensor name in a segment file (the run
    covers that whole tensor)."""

    first: int
    offsets: list[int]  # token offsets of each event inside the segment tensor, plus the end
    source: RowSource

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def event(self, j: int) -> torch.Tensor:
        return self.source.read_rows(self.offsets[j], self.offsets[j + 1])

    def nbytes(self) -> int:
        return self.source.nbytes()


class EventList:
    """Event tensors (1, Hkv, len, D) of one layer, for keys or for values: disk runs first, then RAM."""

    def __init__(self) -> None:
        self._runs: list[DiskRun] = []
        self._starts: list[int] = []
        self._on_disk = 0
        self._ram: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self._on_disk + len(self._ram)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"event {i} out of range ({len(self)} events)")
        if i >= self._on_disk:
            return self._ram[i - self._on_disk]
        run = self._runs[bisect.bisect_right(self._starts, i) - 1]
        return run.event(i - run.first)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def append(self, tensor: torch.Tensor) -> None:
        self._ram.append(tensor)

    def __setitem__(self, i: int, tensor: torch.Tensor) -> None:
        if i < self._on_disk:
            self._load_into_ram(i)
        self._ram[i - self._on_disk] = tensor

    def __delitem__(self, key: slice) -> None:
        if not isinstance(key, slice) or key.step is not None or key.stop is not None:
            raise TypeError("only a tail can be removed: del events[n:]")
        self.truncate(key.start or 0)

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` events."""
        if keep < self._on_disk:
            self._load_into_ram(keep)
        del self._ram[keep - self._on_disk :]

    def _load_into_ram(self, i: int) -> None:
        """Copy the events from the run holding event i onward into RAM and forget those runs (a cut into
        saved events: the next save rewrites them)."""
        r = bisect.bisect_right(self._starts, i) - 1
        first = self._runs[r].first
        copies = [self[j] for j in range(first, self._on_disk)]  # reads give fresh tensors
        del self._runs[r:], self._starts[r:]
        self._on_disk = first
        self._ram[:0] = copies

    # -- tiers ------------------------------------------------------------------------------------
    @property
    def on_disk(self) -> int:
        """How many leading events are served from disk."""
        return self._on_disk

    def ram_tensors(self) -> list[torch.Tensor]:
        return list(self._ram)

    def set_disk(self, runs: list[DiskRun]) -> None:
        """Serve events [0, n) from these saved runs (consecutive from event 0) and keep any later ones as
        they are: after a save this drops the RAM copies of everything just written; on reopening, it fills
        an empty list."""
        expected = 0
        for run in runs:
            if run.first != expected:
                raise ValueError(f"disk run starts at event {run.first}, expected {expected}")
            expected += run.count
        rest = [self[i] for i in range(expected, len(self))]
        self._runs = list(runs)
        self._starts = [run.first for run in runs]
        self._on_disk = expected
        self._ram = rest

    def ram_bytes(self) -> int:
        return sum(_nbytes(t) for t in self._ram)

    def disk_bytes(self) -> int:
        return sum(run.nbytes() for run in self._runs)


__all__ = ["DiskRun", "EventList"]
