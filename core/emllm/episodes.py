"""The timeline of one session: which token is init, in which event, or still in the local window.

Tokens enter the window as chunks are computed. When the window grows past n_local, whole events leave
it from the front: the first n_init tokens of a session become the init block, the rest are cut into
events at surprise boundaries (or fixed blocks), boundaries refined on the key-similarity graph. The
timeline decides the spans; each LayerMemory moves its own keys and values. Knows nothing about text.
"""

from __future__ import annotations

import bisect

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
from .state import Mark, Piece, State, expect, is_count, materialize, vector


class _Column:
    """A 1-D tensor that grows by doubling its capacity: appending c values copies c values (amortised),
    where rebuilding it with torch.cat on every chunk copied the whole history each time (quadratic in the
    text, and the freed copies stayed in the process's heap)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._buffer = torch.empty(0, dtype=dtype)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def values(self) -> torch.Tensor:
        """The valid prefix, a view: later appends after a truncate may write into it (clone to keep)."""
        return self._buffer[: self._len]

    def assign(self, values: torch.Tensor) -> None:
        self._buffer = values.detach().to("cpu", self.dtype, copy=True).reshape(-1)
        self._len = self._buffer.shape[0]

    def extend(self, values: torch.Tensor) -> None:
        needed = self._len + values.shape[0]
        if needed > self._buffer.shape[0]:
            grown = torch.empty(max(needed, 2 * self._buffer.shape[0], 1024), dtype=self.dtype)
            grown[: self._len] = self.values
            self._buffer = grown
        self._buffer[self._len : needed] = values
        self._len = needed

    def truncate(self, n: int) -> None:
        self._len = min(self._len, n)


class Timeline:
    """Token-level bookkeeping shared by every layer of a session.

    `token_ids` (a list), `surprise` (N,) fp32 (NaN = unknown) and `boundary` (N,) bool hold one entry
    per computed token; `events` the absolute [start, stop) spans of the stored events. `surprise` and
    `boundary` are views of buffers grown by doubling (assigning a tensor copies it in).
    """

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self._surprise = _Column(torch.float32)
        self._boundary = _Column(torch.bool)
        self.init_len = 0
        self._events: list[tuple[int, int]] = []  # absolute [start, stop)
        self._sizes = _Column(torch.long)  # sizes of the first len(self._sizes) events, filled lazily
        self.window_start = 0

    @property
    def surprise(self) -> torch.Tensor:
        return self._surprise.values

    @surprise.setter
    def surprise(self, values: torch.Tensor) -> None:
        self._surprise.assign(values)

    @property
    def boundary(self) -> torch.Tensor:
        return self._boundary.values

    @boundary.setter
    def boundary(self, values: torch.Tensor) -> None:
        self._boundary.assign(values)

    @property
    def events(self) -> list[tuple[int, int]]:
        return self._events

    @events.setter
    def events(self, spans: list[tuple[int, int]]) -> None:
        self._events = list(spans)
        self._sizes.truncate(0)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def window_len(self) -> int:
        return self.num_tokens - self.window_start

    def event_sizes(self) -> torch.Tensor:
        """(E,) long, tokens per event: a view, extended by the events added since the last call."""
        known = len(self._sizes)
        if known < len(self._events):
            new = [stop - start for start, stop in self._events[known:]]
            self._sizes.extend(torch.tensor(new, dtype=torch.long))
        return self._sizes.values

    def _events_changed_from(self, index: int) -> None:
        """Events from `index` on were removed or edited: their cached sizes are recomputed when asked."""
        self._sizes.truncate(index)

    def append(self, token_ids: list[int], surprise: torch.Tensor, config: EMLLMConfig) -> None:
        """Record computed tokens with their surprise and mark event boundaries."""
        history = self.surprise[-config.effective_surprise_window :]
        flags = surprise_boundaries(
            surprise, history, config.gamma, config.effective_surprise_window, config.surprise_floor
        )
        self.token_ids.extend(token_ids)
        self._surprise.extend(surprise.float())
        self._boundary.extend(flags)

    def truncate(self, n_tokens: int) -> tuple[int, int | None]:
        """Cut to the first n_tokens. Returns (events kept, new length of the last kept event or None)."""
        del self.token_ids[n_tokens:]
        self._surprise.truncate(n_tokens)
        self._boundary.truncate(n_tokens)
        if n_tokens >= self.window_start:
            return len(self.events), None
        self.window_start = n_tokens
        self.init_len = min(self.init_len, n_tokens)
        kept = bisect.bisect_left(self._events, (n_tokens,))  # the events starting before the cut
        del self._events[kept:]
        self._events_changed_from(kept)
        last_len = None
        if kept and self._events[-1][1] > n_tokens:
            self._events[-1] = (self._events[-1][0], n_tokens)
            self._events_changed_from(kept - 1)
            last_len = n_tokens - self._events[-1][0]
        return kept, last_len

    def add_events(self, spans: list[tuple[int, int]]) -> None:
        """Append events (absolute [start, stop), after every stored one)."""
        self._events.extend(spans)

    # -- state ------------------------------------------------------------------------------------
    def rows(self, start: Mark, stop: Mark) -> State:
        """Token records of computed tokens [start, stop) and the spans of events [start, stop)."""
        events = self._events[start.events : stop.events]
        return {
            "token_ids": torch.tensor(self.token_ids[start.computed : stop.computed], dtype=torch.int64),
            "surprise": self.surprise[start.computed : stop.computed].clone(),
            "boundary": self.boundary[start.computed : stop.computed].clone(),
            "events": torch.tensor(events, dtype=torch.int64).reshape(-1, 2),
        }

    def state_dict(self, since: Mark, until: Mark) -> State:
        return {**self.rows(since, until), "init_len": self.init_len, "window_start": self.window_start}

    def load_rows(self, pieces: list[Piece]) -> None:
        """Replace every record with the rows of saved segments (in order)."""
        self._cut(Mark())
        for rows, start, stop in pieces:
            self._append_rows(rows, stop.computed - start.computed, stop.events - start.events)

    def load_state_dict(self, state: State, since: Mark) -> None:
        """Back to `state`, keeping the records before `since`; checks that the records agree."""
        self._cut(since)
        self._append_rows(state, None, None)
        init_len, window_start = state.get("init_len"), state.get("window_start")
        expect(is_count(init_len) and is_count(window_start), "timeline: init_len / window_start")
        expect(init_len <= window_start <= self.num_tokens, "timeline: init block or window out of range")
        self.init_len, self.window_start = init_len, window_start
        # init block, then events back to back, then the window (the events before `since` were checked)
        edge = self._events[since.events - 1][1] if since.events else init_len
        for start, stop in self._events[since.events :]:
            expect(start == edge and stop > start, f"event ({start}, {stop}) does not follow {edge}")
            edge = stop
        expect(edge == window_start, f"the window starts at {window_start}, not {edge}")

    def _cut(self, mark: Mark) -> None:
        del self.token_ids[mark.computed :]
        self._surprise.truncate(mark.computed)
        self._boundary.truncate(mark.computed)
        del self._events[mark.events :]
        self._events_changed_from(mark.events)

    def _append_rows(self, rows: State, tokens: int | None, events: int | None) -> None:
        ids = vector(rows["token_ids"], "token_ids", dtype=torch.int64)
        surprise = vector(rows["surprise"], "surprise", ids.shape[0], dtype=torch.float32)
        boundary = vector(rows["boundary"], "boundary", ids.shape[0], dtype=torch.bool)
        spans = materialize(rows["events"])
        expect(
            isinstance(spans, torch.Tensor) and spans.dim() == 2 and spans.shape[1] == 2, "events not (n, 2)"
        )
        if tokens is not None:  # a segment file may hold more than its record keeps
            expect(
                ids.shape[0] >= tokens and spans.shape[0] >= events,
                "a segment holds fewer rows than its record",
            )
            ids, surprise, boundary, spans = (
                ids[:tokens],
                surprise[:tokens],
                boundary[:tokens],
                spans[:events],
            )
        self.token_ids.extend(ids.tolist())
        self._surprise.extend(surprise)
        self._boundary.extend(boundary)
        self._events.extend((int(a), int(b)) for a, b in spans.to(torch.int64).tolist())

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
            del self._events[-count:]
            self._events_changed_from(len(self._events))
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
    timeline.add_events([(base + a, base + b) for a, b in spans])
    timeline.window_start = base + (spans[-1][1] if spans else init_take)
    return len(spans)


__all__ = ["Timeline", "evict", "plan_eviction", "refine_spans"]
