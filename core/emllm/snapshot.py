"""The file format of a saved session: its state (see emllm.state) as safetensors files, and back.

A saved session is a run of *segments* plus one *state*. A segment holds the rows of a run of
consecutive events: their token records, text and spans, and per layer their keys, values and
representatives. Segments never change once written, so saving again writes only new events. The state
file holds the session's `state_dict(since=end of the last segment)`: everything that still moves (init
block, local window, retrieval state, pending tokens, the last logits) and the rows after the last event.

A part's state `{"timeline": {"token_ids": t, "init_len": 3}, "layers": {"0": {"k": t}}}` is written as
tensors named by their path (`timeline.token_ids`, `layers.0.k`) and the other values as JSON in the
metadata. This module knows the layout, not the fields: a part that adds a field is saved with it.
A state file also describes itself: its session, its generation (one more than the save before it), the
segments it stands on and the mark its rows start at, so the index can be rebuilt from the files.
Format 1 files (before 0.2: fixed tensor names) are read through a translation.

Files are untrusted: what a file holds is checked where it is used (the parts check their own state;
`check_saved` checks a session's tokens, text and events without a model), and every disagreement is a
CorruptSessionError.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

import torch

from .episodes import Timeline
from .errors import CorruptSessionError
from .ledger import TextLedger
from .state import Mark, Piece, State, check_counts
from .tensorfiles import TensorFile

FORMAT_VERSION = 2  # 2: tensors named by their state path; state files describe their save
READABLE_FORMATS = (1, 2)
FORMAT1_TEXT_SLACK = 16


class SavesEvents(Protocol):
    """What of a session the saved-state bookkeeping needs (no import of the session)."""

    timeline: Timeline

    def event_mark(self, events: int, floor: Mark) -> Mark: ...


@dataclass(frozen=True)
class SegmentRecord:
    """Where one segment sits in the session and on disk (one row of the store's index)."""

    first_event: int
    n_events: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    file: str
    checksums: dict[str, int]
    nbytes: int

    @property
    def start(self) -> Mark:
        return Mark(self.token_start, self.token_start, self.first_event, self.char_start)

    @property
    def stop(self) -> Mark:
        return Mark(self.token_end, self.token_end, self.first_event + self.n_events, self.char_end)

    @classmethod
    def between(cls, start: Mark, stop: Mark, file: str, checksums: dict[str, int], nbytes: int):
        return cls(
            first_event=start.events,
            n_events=stop.events - start.events,
            token_start=start.computed,
            token_end=stop.computed,
            char_start=start.chars,
            char_end=stop.chars,
            file=file,
            checksums=checksums,
            nbytes=nbytes,
        )

    def as_meta(self) -> dict:
        """The record as a state file lists it (checksums live in the segment file itself)."""
        record = asdict(self)
        del record["checksums"]
        return record

    @classmethod
    def from_meta(cls, record, checksums: dict[str, int]) -> SegmentRecord:
        names = [f.name for f in fields(cls) if f.name != "checksums"]
        if not isinstance(record, dict) or sorted(record) != sorted(names):
            raise CorruptSessionError(f"a state file lists a segment it cannot describe: {record!r}")
        if not isinstance(record["file"], str) or not all(_is_int(record[n]) for n in names if n != "file"):
            raise CorruptSessionError(f"a state file lists a segment with invalid fields: {record!r}")
        return cls(checksums=checksums, **record)


@dataclass
class SavedState:
    """What of a session is on disk, and how much of it still matches the session in memory."""

    segments: list[SegmentRecord]
    state_file: str | None
    valid_tokens: int  # tokens [0, valid_tokens) unchanged since the last save
    valid_chars: int
    state_bytes: int = 0
    generation: int = 0  # of the saved state; the next save writes generation + 1
    created: float = 0.0  # when the session was first saved (0: not yet)

    @property
    def disk_bytes(self) -> int:
        return self.state_bytes + sum(record.nbytes for record in self.segments)

    def valid_segments(self) -> list[SegmentRecord]:
        kept = []
        for record in self.segments:
            if record.token_end > self.valid_tokens or record.char_end > self.valid_chars:
                break
            kept.append(record)
        return kept

    def reusable_segments(self, session: SavesEvents) -> list[SegmentRecord]:
        """The valid segments, then the first changed one cut to the events it still holds unchanged (the
        same file, fewer events), so a cut deep into a large segment does not rewrite all of it."""
        kept = self.valid_segments()
        if len(kept) == len(self.segments):
            return kept
        record = self.segments[len(kept)]
        events = session.timeline.events[record.first_event : record.first_event + record.n_events]
        count = sum(1 for _, stop in events if stop <= self.valid_tokens)  # a prefix: events are ordered
        if count == 0:
            return kept
        stop = session.event_mark(record.first_event + count, record.start)
        if stop.chars > self.valid_chars:
            return kept
        trimmed = replace(record, n_events=count, token_end=stop.computed, char_end=stop.chars)
        return [*kept, trimmed]

    def invalidate_after(self, n_tokens: int | None = None, n_chars: int | None = None) -> None:
        if n_tokens is not None:
            self.valid_tokens = min(self.valid_tokens, n_tokens)
        if n_chars is not None:
            self.valid_chars = min(self.valid_chars, n_chars)


# -- writing -------------------------------------------------------------------------------------------


def flatten(state: State) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by path, the other values as a JSON tree) of a nested state."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: dict, prefix: str) -> dict:
        values = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                tensors[path] = value
            elif isinstance(value, dict):
                values[key] = walk(value, path + ".")
            else:
                values[key] = value
        return values

    return tensors, walk(state, "")


def segment_metadata(record: dict, values: dict) -> dict[str, str]:
    return {"emllm": json.dumps({"format": FORMAT_VERSION, "segment": record, "values": values})}


def state_metadata(about: dict, since: Mark, values: dict) -> dict[str, str]:
    """`about`: what the store records of the save (session, generation, index row, segments)."""
    meta = {"format": FORMAT_VERSION, **about, "since": since.as_dict(), "values": values}
    return {"emllm": json.dumps(meta)}


# -- reading -------------------------------------------------------------------------------------------


def file_meta(part: TensorFile) -> dict:
    """The metadata a file of the store carries (format checked)."""
    try:
        meta = json.loads(part.metadata["emllm"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptSessionError(f"{part.path}: no readable session metadata ({exc})") from exc
    if isinstance(meta, dict) and "format" not in meta and "first_event" in meta:
        meta = {"format": 1, "segment": meta}  # a format-1 segment: its metadata was its record alone
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CorruptSessionError(f"{part.path}: unknown session format {found!r}")
    return meta


def read_pieces(segments: list[tuple[SegmentRecord, TensorFile]]) -> list[Piece]:
    """The rows of each saved segment (tensors not read yet), checked to follow each other."""
    pieces, expected = [], Mark()
    for record, part in segments:
        start, stop = record.start, record.stop
        chained = start == expected and stop.computed >= start.computed and stop.chars >= start.chars
        _expect(chained and record.n_events >= 0, part, f"does not follow the segment before it ({record})")
        meta = file_meta(part)
        rows = _format1_rows(part) if meta["format"] == 1 else unflatten(part, meta.get("values"))
        pieces.append((rows, start, stop))
        expected = stop
    return pieces


def read_state(state: TensorFile, since: Mark) -> State:
    """The state a state file holds, its rows starting at `since` (the end of its segments)."""
    meta = file_meta(state)
    if meta["format"] == 1:
        return _format1_state(state, meta, since)
    try:
        starts = Mark.from_dict(meta.get("since"))
    except ValueError as exc:
        raise CorruptSessionError(f"{state.path}: {exc}") from exc
    _expect(starts == since, state, f"starts at {starts}; its segments end at {since}")
    return unflatten(state, meta.get("values"))


def unflatten(part: TensorFile, values) -> State:
    """The nested state of a file: its JSON values, with every tensor (not read yet) at its path."""
    _expect(isinstance(values, dict), part, "its values are not a JSON object")
    state = json.loads(json.dumps(values))  # a copy
    for name in part.names():
        *path, leaf = name.split(".")
        node = state
        for key in path:
            node = node.setdefault(key, {})
            _expect(isinstance(node, dict), part, f"tensor {name!r} sits under a value")
        _expect(leaf not in node, part, f"tensor {name!r} also has a value")
        node[leaf] = part.ref(name)
    return state


def check_saved(pieces: list[Piece], state: State, since: Mark, tokens: int, events: int) -> None:
    """Without a model: the saved tokens, text and events agree with each other and with the index."""
    timeline, ledger = Timeline(), TextLedger()
    timeline.load_rows([(rows["timeline"], a, b) for rows, a, b in pieces])
    ledger.load_rows([(rows["ledger"], a, b) for rows, a, b in pieces])
    timeline.load_state_dict(state["timeline"], since)
    ledger.load_state_dict(state["ledger"], since)
    mark = Mark.from_dict(state.get("mark"))
    pending = state["session"]["pending"].shape
    check_counts(
        mark,
        computed=timeline.num_tokens,
        tokens=timeline.num_tokens + pending[0],
        spans=ledger.tokens,
        events=len(timeline.events),
        chars=ledger.chars,
    )
    if (mark.tokens, mark.events) != (tokens, events):
        raise ValueError(
            f"holds {mark.tokens} tokens and {mark.events} events, the index {tokens} and {events}"
        )


# -- format 1 (before 0.2) -------------------------------------------------------------------------------


def _format1_rows(part: TensorFile) -> State:
    """A format-1 segment's tensors at their paths; event lengths from its spans."""
    spans = part.get("events").to(torch.int64).reshape(-1, 2)
    lengths = spans[:, 1] - spans[:, 0]
    layers = sorted({int(n.split(".")[1]) for n in part.names() if n.startswith("k.")})
    return {
        "timeline": {n: part.ref(n) for n in ("token_ids", "surprise", "boundary", "events")},
        "ledger": {n: part.ref(n) for n in ("text", "char_start", "char_end")},
        "layers": {
            str(i): {
                "k": part.ref(f"k.{i}"),
                "v": part.ref(f"v.{i}"),
                "reprs": part.ref(f"r.{i}"),
                "lengths": lengths,
            }
            for i in layers
        },
    }


def _format1_state(part: TensorFile, meta: dict, since: Mark) -> State:
    """A format-1 state file as a format-2 state (its rows start at its segments' end)."""
    for name in ("token_start", "char_start", "init_len", "window_start", "events", "decode_steps"):
        _expect(_is_int(meta.get(name)), part, f"metadata {name!r} is not a count")
    _expect(
        (meta["token_start"], meta["char_start"]) == (since.computed, since.chars), part, "starts elsewhere"
    )
    counts = meta.get("query_counts")
    _expect(isinstance(counts, list), part, "bad query_counts")
    computed = since.computed + part.shape("token_ids")[0]
    pending = part.shape("pending")[0]
    text = part.get("text").numpy().tobytes().decode("utf-8", errors="replace")
    mark = Mark(computed, computed + pending, meta["events"], since.chars + len(text))
    session = {
        n: meta.get(n) for n in ("decode_steps", "tokens_computed", "tokens_reused", "max_local_distance")
    }
    session["pending"] = part.ref("pending")
    if "last_logprobs" in part:
        session["last_logprobs"] = part.ref("last_logprobs")
    timeline = {n: part.ref(n) for n in ("token_ids", "surprise", "boundary")}
    timeline.update(events=torch.empty(0, 2, dtype=torch.int64), init_len=meta["init_len"])
    timeline["window_start"] = meta["window_start"]
    ledger = {n: part.ref(n) for n in ("text", "char_start", "char_end")}
    ledger["sources"] = meta.get("sources")
    layers = {}
    for i, count in enumerate(counts):
        init = part.shape(f"init_k.{i}")
        layer = {
            name: part.ref(f"{old}.{i}")
            for name, old in (("init_k", "init_k"), ("init_v", "init_v"), ("window_k", "window_k"))
        }
        layer.update(window_v=part.ref(f"window_v.{i}"), mass=part.ref(f"mass.{i}"), query_count=count)
        layer.update(
            k=torch.empty(1, init[1], 0, init[3]),
            v=torch.empty(1, init[1], 0, init[3]),
            lengths=torch.empty(0, dtype=torch.int64),
            reprs=torch.empty(0, init[1] * init[3]),
            corpus_query_count=int(part.get(f"corpus_query_count.{i}")[0])
            if f"corpus_query_count.{i}" in part
            else 0,
            selection=part.get(f"selection.{i}").tolist() if f"selection.{i}" in part else None,
        )
        for name in ("query_sum", "corpus_query_sum"):
            if f"{name}.{i}" in part:
                layer[name] = part.ref(f"{name}.{i}")
        layers[str(i)] = layer
    return {
        "mark": mark.as_dict(),
        "session": session,
        "timeline": timeline,
        "ledger": ledger,
        "layers": layers,
    }


def check_format1_text(pieces: list[Piece], state: State, part: TensorFile) -> None:
    """Format 1 saved the whole input's text when it saved in the middle of a feed (for the RAM budget)
    with only the tokens read so far. A few characters may trail generated text legitimately (when a
    tokenizer's pieces do not decode back to the whole); the rest of an input does not."""
    ends = [_read(rows["ledger"]["char_end"]) for rows, _, _ in pieces] + [_read(state["ledger"]["char_end"])]
    ends = torch.cat(ends) if ends else torch.empty(0)
    last = int(ends.max()) if ends.numel() else 0
    chars = Mark.from_dict(state["mark"]).chars
    tail = chars - last
    _expect(
        tail <= FORMAT1_TEXT_SLACK,
        part,
        f"holds {tail:,} chars of text after its last token: text and tokens disagree (a save in the "
        "middle of a feed, by an earlier version)",
    )


def _read(value: Any) -> torch.Tensor:
    return value.read() if hasattr(value, "read") else value


def _expect(condition: bool, part: TensorFile, why: str) -> None:
    if not condition:
        raise CorruptSessionError(f"{part.path}: {why}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "FORMAT_VERSION",
    "SavedState",
    "SegmentRecord",
    "check_format1_text",
    "check_saved",
    "file_meta",
    "flatten",
    "read_pieces",
    "read_state",
    "segment_metadata",
    "state_metadata",
    "unflatten",
]
