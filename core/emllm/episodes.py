"""The timeline of one session: which token is init, in which event, or still in the local window.

Tokens enter the window as chunks are computed. When the window grows past n_local, whole events leave
it from the front: the first n_init tokens of a session become the init block, the rest are cut into
events at surprise boundaries (or fixed blocks), boundaries refined on the key-similarity graph. The
timeline decides the spans; each LayerMemory moves its own keys and values. Knows nothing about text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import EMLLMConfig
from .memory import LayerMemory
from .positions import RotaryTable
from .segmentation import (
    events_from_boundaries,
    key_similarity_graph,
    refine_boundaries,
    surprise_boundaries,
)


@dataclass
class Timeline:
    """Token-level bookkeeping shared by every layer of a session."""

    token_ids: list[int] = field(default_factory=list)
    surprise: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (N,) fp32, NaN = unknown
    boundary: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))  # (N,)
    init_len: int = 0
    events: list[tuple[int, int]] = field(default_factory=list)  # absolute [start, stop)
    window_start: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def window_len(self) -> int:
        return self.num_tokens - self.window_start

    def event_sizes(self) -> torch.Tensor:
        return torch.tensor([stop - start for start, stop in self.events], dtype=torch.long)

    def append(self, token_ids: list[int], surprise: torch.Tensor, config: EMLLMConfig) -> None:
        """Record computed tokens with their surprise and mark event boundaries."""
        history = self.surprise[-config.effective_surprise_window :]
        flags = surprise_boundaries(
            surprise, history, config.gamma, config.effective_surprise_window, config.surprise_floor
        )
        self.token_ids.extend(token_ids)
        self.surprise = torch.cat((self.surprise, surprise.float()))
        self.boundary = torch.cat((self.boundary, flags))

    def truncate(self, n_tokens: int) -> tuple[int, int | None]:
        """Cut to the first n_tokens. Returns (events kept, new length of the last kept event or None)."""
        del self.token_ids[n_tokens:]
        self.surprise = self.surprise[:n_tokens]
        self.boundary = self.boundary[:n_tokens]
        if n_tokens >= self.window_start:
            return len(self.events), None
        self.window_start = n_tokens
        self.init_len = min(self.init_len, n_tokens)
        kept = [(a, b) for a, b in self.events if a < n_tokens]
        last_len = None
        if kept and kept[-1][1] > n_tokens:
            kept[-1] = (kept[-1][0], n_tokens)
            last_len = n_tokens - kept[-1][0]
        self.events = kept
        return len(kept), last_len

    def rewind(
        self,
        init_len: int,
        events: int,
        window_start: int,
        window_ids: list[int],
        window_surprise: torch.Tensor,
        window_boundary: torch.Tensor,
    ) -> None:
        """Back to an earlier state whose first `events` events and tokens before window_start this
        timeline still holds: the window's token records are put back from a copy."""
        del self.token_ids[window_start:]
        self.token_ids.extend(window_ids)
        self.surprise = torch.cat((self.surprise[:window_start], window_surprise))
        self.boundary = torch.cat((self.boundary[:window_start], window_boundary))
        del self.events[events:]
        self.init_len, self.window_start = init_len, window_start

    def reopen_window(self, n_local: int) -> tuple[int, int]:
        """After a cut: move the last events back into the window while it holds at most n_local tokens,
        and the init block too once everything fits, as in a session that only read the kept tokens.

        Without this a cut into memory leaves an empty window, so the next tokens would see their recent
        past only through retrieval. Returns (events returned, init tokens returned).
        """
        count = 0
        while count < len(self.events) and self.num_tokens - self.events[-1 - count][0] <= n_local:
            count += 1
        if count:
            self.window_start = self.events[-count][0]
            del self.events[-count:]
        init_back = self.init_len if not self.events and self.num_tokens <= n_local else 0
        if init_back:
            self.window_start, self.init_len = 0, 0
        return count, init_back


def plan_eviction(timeline: Timeline, config: EMLLMConfig) -> tuple[int, list[tuple[int, int]]]:
    """Which window tokens leave: (tokens joining init, event spans as window offsets), unrefined."""
    excess = timeline.window_len - config.n_local
    if excess <= 0:
        return 0, []
    init_take = min(max(config.n_init - timeline.window_start, 0), excess)
    excess -= init_take
    if excess <= 0:
        return init_take, []
    region_start = timeline.window_start + init_take
    if config.segmentation == "fixed":
        flags = torch.zeros(timeline.num_tokens - region_start, dtype=torch.bool)
        min_size = max_size = config.block_size
    else:
        flags = timeline.boundary[region_start:]
        min_size, max_size = config.min_event_size, config.max_event_size
    spans, covered = [], 0
    for start, stop in events_from_boundaries(flags, min_size, max_size):
        spans.append((init_take + start, init_take + stop))
        covered = stop
        if covered >= excess:
            break
    return init_take, spans


def refine_spans(
    spans: list[tuple[int, int]], layers: list[LayerMemory], config: EMLLMConfig
) -> list[tuple[int, int]]:
    """Move the internal boundaries of consecutive spans on the key-similarity graph of the upper layers."""
    if config.refinement == "none" or config.segmentation == "fixed" or len(spans) < 2:
        return spans
    first, last = spans[0][0], spans[-1][1]
    band = config.refinement_band(len(layers))
    keys = torch.stack([layers[i].window_keys(first, last) for i in band])  # (L, Hkv, n, D)
    adjacency = key_similarity_graph(keys)
    starts = [start - first for start, _ in spans]
    refined = refine_boundaries(
        adjacency, starts, config.refinement, config.min_event_size, config.max_event_size
    )
    ends = [*refined[1:], last - first]
    return [(first + a, first + b) for a, b in zip(refined, ends, strict=True)]


def evict(timeline: Timeline, layers: list[LayerMemory], config: EMLLMConfig, rotary: RotaryTable) -> int:
    """Move tokens out of an over-full window; returns the number of new events."""
    init_take, spans = plan_eviction(timeline, config)
    if not init_take and not spans:
        return 0
    spans = refine_spans(spans, layers, config)
    for layer in layers:
        layer.evict(init_take, spans, rotary)
    base = timeline.window_start
    timeline.init_len += init_take
    timeline.events.extend((base + a, base + b) for a, b in spans)
    timeline.window_start = base + (spans[-1][1] if spans else init_take)
    return len(spans)


__all__ = ["Timeline", "evict", "plan_eviction", "refine_spans"]
