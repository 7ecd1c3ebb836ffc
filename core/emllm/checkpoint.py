"""A session's state at one moment, to return to exactly (`Session.checkpoint` / `Session.rewind`).

`truncate` cuts a session back to a length, but not to the state it had at that length: the events that
later tokens pushed out of the local window stay events, and the retrieval state keeps what later queries
added. So the same question asked twice after cutting back can get two answers. A checkpoint copies
what changes as tokens are read (each layer's local window, its init block and retrieval state, the
window's token records, the last logits) and records how many events there were. Events only ever
grow, so they are not copied; a checkpoint goes stale when a cut removes any of them or its text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import LayerCheckpoint


@dataclass(eq=False)
class SessionCheckpoint:
    """Opaque to callers: pass it back to `Session.rewind` of the session that made it."""

    session_id: str
    tokens: int  # every token, pending ones included
    init_len: int
    events: int
    window_start: int
    window_ids: list[int]  # computed tokens [window_start, computed)
    window_surprise: torch.Tensor
    window_boundary: torch.Tensor
    pending: list[int]
    last_logprobs: torch.Tensor | None
    decode_steps: int
    layers: list[LayerCheckpoint]

    @property
    def nbytes(self) -> int:
        """Memory the checkpoint holds of its own (the copied local windows)."""
        return sum(layer.nbytes for layer in self.layers)


__all__ = ["SessionCheckpoint"]
