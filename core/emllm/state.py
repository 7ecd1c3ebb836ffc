"""How the parts of a session describe their state: one protocol for checkpoints (in memory) and saves.

A session is made of parts: its timeline, its text ledger, one memory per layer, and its own few fields.
Each part alone knows its fields, and its state has two halves:

- **rows**: what is only ever appended and, once there, never changes (one row per token, per char of
  text, per event). `rows(start, stop)` takes the rows between two Marks out (a saved segment) and
  `load_rows(pieces)` puts a session's rows back from such pieces.
- **the rest**: what changes in place as tokens are read (a local window, a retrieval state, counters).

`state_dict(since, until)` returns the rest plus the rows from `since` to `until`, and
`load_state_dict(state, since)` returns the part to that state, keeping the rows it holds before `since`.
A checkpoint is `state_dict(now, now)` (the rows are shared: they never change); a saved session is its
rows in segments plus one state file of `state_dict(last segment, now)`. Adding a field to a part is an
edit in that part alone: the checkpoint, the file format and the store carry whatever it returns.

State values are tensors, or JSON values (ints, strings, lists). A part loading saved state may get a
`TensorRef` instead of a tensor (a tensor still on disk): `materialize` reads it; a part that serves
its rows from disk (the layers' keys and values) keeps the reference.
Knows nothing about sessions, files or models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Mark:
    """How far a session's rows reach: computed tokens, all tokens (pending ones too), events, chars."""

    computed: int = 0
    tokens: int = 0
    events: int = 0
    chars: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"computed": self.computed, "tokens": self.tokens, "events": self.events, "chars": self.chars}

    @classmethod
    def from_dict(cls, values) -> Mark:
        if not isinstance(values, dict) or sorted(values) != ["chars", "computed", "events", "tokens"]:
            raise ValueError(f"not a mark: {values!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
            raise ValueError(f"a mark holds counts: {values!r}")
        return cls(**values)


class TensorRef(Protocol):
    """A tensor not read yet (in a saved file): its shape, and the tensor when asked for."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self) -> torch.Tensor: ...


State = dict[str, Any]
Piece = tuple[State, Mark, Mark]  # rows of a saved segment, and the marks they run between


def materialize(value: Any) -> Any:
    """The tensor itself: a TensorRef is read; anything else is returned as it is."""
    return value.read() if hasattr(value, "read") and hasattr(value, "shape") else value


def expect(condition: bool, why: str) -> None:
    """State from a file is untrusted: a part that finds it disagreeing says why (ValueError)."""
    if not condition:
        raise ValueError(why)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def vector(
    value: Any, name: str, length: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A 1-D tensor of state (length checked when given), as dtype."""
    tensor = materialize(value)
    expect(isinstance(tensor, torch.Tensor) and tensor.dim() == 1, f"{name} is not a vector")
    expect(
        length is None or tensor.shape[0] == length, f"{name} holds {tensor.shape[0]} values, not {length}"
    )
    return tensor.to(dtype) if dtype is not None else tensor


def check_counts(mark: Mark, *, computed: int, tokens: int, spans: int, events: int, chars: int) -> None:
    """The parts of a loaded session agree with the mark it was saved at (and so with each other)."""
    held = Mark(computed, tokens, events, chars)
    expect(held == mark, f"the parts hold {held}, the state says {mark}")
    expect(spans == tokens, f"{spans} text spans for {tokens} tokens")


__all__ = [
    "Mark",
    "Piece",
    "State",
    "TensorRef",
    "check_counts",
    "expect",
    "is_count",
    "materialize",
    "vector",
]
