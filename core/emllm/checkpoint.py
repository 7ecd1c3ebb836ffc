"""A session's state at one moment, to return to exactly (`Session.checkpoint` / `Session.rewind`).

`truncate` cuts a session back to a length, but not to the state it had at that length: the events that
later tokens pushed out of the local window stay events, and the retrieval state keeps what later queries
added. So the same question asked twice after cutting back can get two answers. A checkpoint is the
session's `state_dict(since=window start)` (see emllm.state): what changes in place is copied with the
window's rows; the rows before it (tokens, text, events) only grow and are shared. It goes stale when a
cut removes any of those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import Mark, State


@dataclass(eq=False)
class SessionCheckpoint:
    """Opaque to callers: pass it back to `Session.rewind` of the session that made it."""

    session_id: str
    since: Mark  # where its rows start: the local window's start (the rows before are shared)
    mark: Mark  # where they end
    state: State

    @property
    def tokens(self) -> int:
        """Every token the session held, pending ones included."""
        return self.mark.tokens

    @property
    def events(self) -> int:
        return self.mark.events

    @property
    def window_start(self) -> int:
        return self.state["timeline"]["window_start"]

    @property
    def nbytes(self) -> int:
        """Memory the checkpoint holds of its own (the copied local windows)."""
        copied = ("window_k", "window_v", "mass")
        return sum(
            layer[name].numel() * layer[name].element_size()
            for layer in self.state["layers"].values()
            for name in copied
            if isinstance(layer.get(name), torch.Tensor)
        )


__all__ = ["SessionCheckpoint"]
