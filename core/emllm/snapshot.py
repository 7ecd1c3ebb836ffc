"""A session as tensors: what the store writes, how it is checked, and how a session is rebuilt from it.

A saved session is a run of *segments* plus one *state*. A segment freezes consecutive events: their
token-level records (ids, surprise, boundaries, char spans, the text they cover) and, per layer, their
keys, values and representatives. Segments never change once written, so saving again writes only new
events. The state holds everything that still moves: the init block, the local window, the tokens after
the last saved event, pending tokens, the last logits and the retrieval state, so that a reopened session
continues exactly as the original would have.

A state file also describes itself: its session, its generation (one more than the save before it) and
the segments it stands on. The store's index is a cache of that, and can be rebuilt from the files.

Files are untrusted: `read_snapshot` checks that what they hold agrees with itself and with what the index
expects (token and event counts, spans, text) before anything of it reaches a session, and every
disagreement is a CorruptSessionError.
"""

from __future__ import annotations

import itertools
import json
from array import array
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

from .errors import CorruptSessionError
from .tensorfiles import TensorFile
from .tiers import DiskRun

if TYPE_CHECKING:
    from .session import Session

FORMAT_VERSION = 2  # 2: state files carry their generation, session row and segment list
READABLE_FORMATS = (1, 2)
FORMAT1_TEXT_SLACK = 16


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

    def reusable_segments(self, session: Session) -> list[SegmentRecord]:
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
        token_end = events[count - 1][1]
        char_end = _segment_char_end(session, token_end, record.char_start)
        if char_end > self.valid_chars:
            return kept
        trimmed = replace(record, n_events=count, token_end=token_end, char_end=char_end)
        return [*kept, trimmed]

    def invalidate_after(self, n_tokens: int | None = None, n_chars: int | None = None) -> None:
        if n_tokens is not None:
            self.valid_tokens = min(self.valid_tokens, n_tokens)
        if n_chars is not None:
            self.valid_chars = min(self.valid_chars, n_chars)


# -- writing -------------------------------------------------------------------------------------------


def _token_records(session: Session, start: int, stop: int, computed_stop: int) -> dict[str, torch.Tensor]:
    """Token-level arrays: ids/surprise/boundary for computed tokens, char spans for every token."""
    timeline = session.timeline
    return {
        "token_ids": torch.tensor(timeline.token_ids[start:computed_stop], dtype=torch.int64),
        "surprise": timeline.surprise[start:computed_stop].float(),
        "boundary": timeline.boundary[start:computed_stop].to(torch.uint8),
        "char_start": torch.tensor(session._char_start[start:stop], dtype=torch.int64),
        "char_end": torch.tensor(session._char_end[start:stop], dtype=torch.int64),
    }


def _int64_array(values: torch.Tensor) -> array:
    packed = array("q")
    packed.frombytes(values.to(torch.int64).contiguous().numpy().tobytes())
    return packed


def _text_bytes(text: str, start: int, stop: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(text[start:stop].encode("utf-8")), dtype=torch.uint8)


def segment_payload(
    session: Session, first_event: int, token_start: int, char_start: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of events [first_event, E) and the tokens [token_start, end of the last event)."""
    timeline = session.timeline
    events = timeline.events[first_event:]
    token_end = events[-1][1]
    char_end = _segment_char_end(session, token_end, char_start)
    tensors = _token_records(session, token_start, token_end, token_end)
    tensors["text"] = _text_bytes(session.text, char_start, char_end)
    tensors["events"] = torch.tensor(events, dtype=torch.int64).reshape(-1, 2)
    for i, layer in enumerate(session.layers):
        tensors[f"k.{i}"] = torch.cat([layer.events_k[e] for e in range(first_event, len(layer.events_k))], 2)
        tensors[f"v.{i}"] = torch.cat([layer.events_v[e] for e in range(first_event, len(layer.events_v))], 2)
        tensors[f"r.{i}"] = layer.reprs[first_event:].float().cpu()
    info = dict(
        first_event=first_event,
        n_events=len(events),
        token_start=token_start,
        token_end=token_end,
        char_start=char_start,
        char_end=char_end,
    )
    return tensors, info


def _segment_char_end(session: Session, token_end: int, char_start: int) -> int:
    """Where the text of tokens [.., token_end) stops: where the next token's text starts."""
    text_len = session._char_len
    char_end = session._char_start[token_end] if token_end < len(session._char_start) else text_len
    return max(min(char_end, text_len), char_start)


def saved_extent(session: Session) -> tuple[int, int]:
    """(tokens, chars) a save holds now. In the middle of a `feed` (a save for the RAM budget) the session
    already holds the whole input's text and char spans but has read only part of its tokens: a save
    keeps the text of the tokens read, so text, tokens and events always agree on disk."""
    tokens = len(session.token_ids)
    return tokens, _segment_char_end(session, tokens, 0)


def state_payload(
    session: Session, token_start: int, char_start: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of everything after the saved events (the store adds to the metadata what it
    records of the save: generation, index row, segments, so the file describes itself)."""
    timeline = session.timeline
    all_tokens, all_chars = saved_extent(session)
    tensors = _token_records(session, token_start, all_tokens, timeline.num_tokens)
    tensors["text"] = _text_bytes(session.text, char_start, all_chars)
    tensors["pending"] = torch.tensor(session._pending, dtype=torch.int64)
    if session._last_logprobs is not None:
        tensors["last_logprobs"] = session._last_logprobs.float()
    query_counts = []
    for i, layer in enumerate(session.layers):
        length = layer.length
        tensors[f"init_k.{i}"] = layer.init_k
        tensors[f"init_v.{i}"] = layer.init_v
        tensors[f"window_k.{i}"] = layer.k_raw[:, :, :length]
        tensors[f"window_k_rot.{i}"] = layer.k_rot[:, :, :length]
        tensors[f"window_v.{i}"] = layer.v[:, :, :length]
        tensors[f"mass.{i}"] = layer.mass[:length]
        if layer._query_sum is not None:
            tensors[f"query_sum.{i}"] = layer._query_sum
        if layer.corpus_query_sum is not None:
            tensors[f"corpus_query_sum.{i}"] = layer.corpus_query_sum
            tensors[f"corpus_query_count.{i}"] = torch.tensor([layer.corpus_query_count], dtype=torch.int64)
        if layer._selection is not None:
            tensors[f"selection.{i}"] = torch.tensor(layer._selection, dtype=torch.int64)
        query_counts.append(layer._query_count)
    meta = dict(
        format=FORMAT_VERSION,
        session_id=session.id,
        init_len=timeline.init_len,
        window_start=timeline.window_start,
        events=len(timeline.events),
        token_start=token_start,
        char_start=char_start,
        tokens=all_tokens,
        chars=all_chars,
        tokens_computed=session._tokens_computed,
        tokens_reused=session._tokens_reused,
        max_local_distance=session._max_local_distance,
        decode_steps=session._decode_steps,
        query_counts=query_counts,
        sources=[[start, source] for start, source in session._sources if start < all_tokens],
    )
    return tensors, meta


# -- reading and checking ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What a session's files hold, read and checked, before any of it reaches a session."""

    meta: dict
    token_ids: torch.Tensor  # (computed,) int64
    surprise: torch.Tensor  # (computed,) fp32
    boundary: torch.Tensor  # (computed,) bool
    events: list[tuple[int, int]]
    char_start: torch.Tensor  # (tokens,) int64, pending tokens included
    char_end: torch.Tensor
    text: str
    pending: list[int]
    sources: list[tuple[int, str | None]]

    @property
    def tokens(self) -> int:
        return self.token_ids.numel() + len(self.pending)


_META_INTS = (
    "init_len",
    "window_start",
    "events",
    "token_start",
    "char_start",
    "tokens_computed",
    "tokens_reused",
    "max_local_distance",
    "decode_steps",
)


def state_meta(state: TensorFile) -> dict:
    """The state file's metadata, with the types every reader relies on checked."""
    try:
        meta = json.loads(state.metadata["emllm"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptSessionError(f"{state.path}: no readable session metadata ({exc})") from exc
    _expect(isinstance(meta, dict), state, "its metadata is not a JSON object")
    _expect(meta.get("format") in READABLE_FORMATS, state, f"unknown session format {meta.get('format')!r}")
    for name in _META_INTS:
        _expect(_is_int(meta.get(name)) and meta[name] >= 0, state, f"metadata {name!r} is not a count")
    counts = meta.get("query_counts")
    _expect(isinstance(counts, list) and all(_is_int(c) for c in counts), state, "bad query_counts")
    sources = meta.get("sources")
    _expect(
        isinstance(sources, list)
        and all(
            isinstance(s, list) and len(s) == 2 and _is_int(s[0]) and (s[1] is None or isinstance(s[1], str))
            for s in sources
        ),
        state,
        "bad sources",
    )
    return meta


def read_snapshot(
    segments: list[tuple[SegmentRecord, TensorFile]], state: TensorFile, tokens: int, events: int
) -> Snapshot:
    """Read the token records, events and text of a saved session and check that they agree with each
    other and with the index (`tokens`, `events`); keys and values stay on disk."""
    meta = state_meta(state)
    _check_records(segments, meta, state)
    parts = [(mapped, r.token_end - r.token_start, r.char_end - r.char_start) for r, mapped in segments]
    computed_in_state = _length(state, "token_ids", 1)
    pending = _vector(state, "pending", None).tolist()
    all_in_state = computed_in_state + len(pending)
    parts.append((state, None, None))

    def joined(name: str, counts: list[int | None]) -> torch.Tensor:
        held = [_vector(mapped, name, count) for (mapped, _, _), count in zip(parts, counts, strict=True)]
        return torch.cat(held) if held else torch.empty(0)

    token_counts = [count for _, count, _ in parts[:-1]]
    token_ids = joined("token_ids", [*token_counts, computed_in_state]).to(torch.int64)
    surprise = joined("surprise", [*token_counts, computed_in_state]).float()
    boundary = joined("boundary", [*token_counts, computed_in_state]).bool()
    char_start = joined("char_start", [*token_counts, all_in_state]).to(torch.int64)
    char_end = joined("char_end", [*token_counts, all_in_state]).to(torch.int64)
    texts = [_text(mapped, chars) for mapped, _, chars in parts]
    spans = [_events(mapped, record) for record, mapped in segments]
    snapshot = Snapshot(
        meta=meta,
        token_ids=token_ids,
        surprise=surprise,
        boundary=boundary,
        events=[span for part in spans for span in part],
        char_start=char_start,
        char_end=char_end,
        text="".join(texts),
        pending=pending,
        sources=[(start, source) for start, source in meta["sources"]],
    )
    _check_agreement(snapshot, state, tokens, events)
    return snapshot


def _check_records(segments: list[tuple[SegmentRecord, TensorFile]], meta: dict, state: TensorFile) -> None:
    """Segments follow each other without gaps in events, tokens and text, up to where the state starts."""
    event, token, char = 0, 0, 0
    for record, mapped in segments:
        _expect(
            (record.first_event, record.token_start, record.char_start) == (event, token, char)
            and record.n_events >= 0
            and record.token_end >= record.token_start
            and record.char_end >= record.char_start,
            mapped,
            f"its index row does not follow the segment before it ({record})",
        )
        event, token, char = event + record.n_events, record.token_end, record.char_end
    _expect(
        (meta["token_start"], meta["char_start"]) == (token, char),
        state,
        f"starts at token {meta['token_start']}, char {meta['char_start']}; "
        f"its segments end at {token}, {char}",
    )


def _check_agreement(snapshot: Snapshot, state: TensorFile, tokens: int, events: int) -> None:
    meta, computed = snapshot.meta, snapshot.token_ids.numel()
    _expect(snapshot.tokens == tokens, state, f"holds {snapshot.tokens} tokens, the index {tokens}")
    _expect(
        len(snapshot.events) == events == meta["events"],
        state,
        f"holds {len(snapshot.events)} events, its metadata {meta['events']}, the index {events}",
    )
    _expect(meta["init_len"] <= meta["window_start"] <= computed, state, "init block or window out of range")
    edge = meta["init_len"]  # init block, then events back to back, then the window
    for start, stop in snapshot.events:
        _expect(start == edge and stop > start, state, f"event ({start}, {stop}) does not follow {edge}")
        edge = stop
    _expect(edge == meta["window_start"], state, f"the window starts at {meta['window_start']}, not {edge}")
    text_len, high = len(snapshot.text), 0
    if snapshot.char_end.numel():
        low = int(torch.minimum(snapshot.char_start, snapshot.char_end).min())
        high = int(torch.maximum(snapshot.char_start, snapshot.char_end).max())
        _expect(
            low >= 0 and high <= text_len, state, f"char spans {low}..{high} outside its {text_len} chars"
        )
    if meta["format"] >= 2:
        _expect(
            (meta.get("tokens"), meta.get("chars")) == (snapshot.tokens, text_len),
            state,
            f"holds {snapshot.tokens} tokens and {text_len} chars, its metadata says "
            f"{meta.get('tokens')} and {meta.get('chars')}",
        )
    else:
        # Format 1 saved the whole input's text when it saved in the middle of a feed (for the RAM budget)
        # with only the tokens read so far. A few characters may trail generated text legitimately (when a
        # tokenizer's pieces do not decode back to the whole); the rest of an input does not.
        tail = snapshot.text[high:]
        _expect(
            len(tail.strip()) <= FORMAT1_TEXT_SLACK,
            state,
            f"holds {len(tail):,} chars of text after its last token: text and tokens disagree (a save in "
            "the middle of a feed, by an earlier version)",
        )
    for (first, _), (second, _) in itertools.pairwise(snapshot.sources):
        _expect(first < second, state, "sources out of order")
    _expect(all(0 <= start < max(tokens, 1) for start, _ in snapshot.sources), state, "a source outside it")


def _events(mapped: TensorFile, record: SegmentRecord) -> list[tuple[int, int]]:
    _expect(
        len(mapped.shape("events")) == 2 and mapped.shape("events")[1] == 2, mapped, "events is not (n, 2)"
    )
    spans = mapped.get("events").to(torch.int64)[: record.n_events]
    _expect(spans.shape[0] == record.n_events, mapped, f"holds fewer than {record.n_events} events")
    listed = [(int(a), int(b)) for a, b in spans.tolist()]
    _expect(
        all(record.token_start <= a < b <= record.token_end for a, b in listed),
        mapped,
        f"an event outside its tokens {record.token_start}..{record.token_end}",
    )
    return listed


def _length(part: TensorFile, name: str, dims: int) -> int:
    shape = part.shape(name)
    _expect(len(shape) == dims, part, f"{name} has shape {list(shape)}")
    return shape[0]


def _vector(part: TensorFile, name: str, count: int | None) -> torch.Tensor:
    """A 1-D tensor of a part, cut to `count` (a segment file may hold more tokens than its record keeps;
    the state holds exactly what it says)."""
    held = _length(part, name, 1)
    _expect(held >= (count or 0), part, f"{name} holds {held} values, fewer than {count}")
    return part.get(name)[:count] if count is not None else part.get(name)


def _text(part: TensorFile, chars: int | None) -> str:
    _length(part, "text", 1)
    try:
        text = part.get("text").numpy().tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptSessionError(f"{part.path}: its text is not UTF-8 ({exc})") from exc
    _expect(chars is None or len(text) >= chars, part, f"holds less than its {chars} chars of text")
    return text[:chars] if chars is not None else text


# -- restoring -----------------------------------------------------------------------------------------


def restore(
    session: Session, snapshot: Snapshot, segments: list[tuple[SegmentRecord, TensorFile]], state: TensorFile
) -> None:
    """Rebuild a freshly reset session from a checked snapshot. Segment keys and values stay on disk (read
    when retrieved); token records and representatives are read now. Tensors that do not fit this
    engine's layers are a CorruptSessionError."""
    meta, timeline = snapshot.meta, session.timeline
    vocab = session.engine.model.get_input_embeddings().num_embeddings
    ids = torch.cat((snapshot.token_ids, torch.tensor(snapshot.pending, dtype=torch.int64)))
    _expect(
        not ids.numel() or 0 <= int(ids.min()) <= int(ids.max()) < vocab,
        state,
        "token ids past the vocabulary",
    )
    _expect(len(meta["query_counts"]) == len(session.layers), state, "per-layer state for another model")
    timeline.token_ids = snapshot.token_ids.tolist()
    timeline.surprise = snapshot.surprise.clone()
    timeline.boundary = snapshot.boundary.clone()
    timeline.events = list(snapshot.events)
    timeline.init_len, timeline.window_start = meta["init_len"], meta["window_start"]
    session._char_start = _int64_array(snapshot.char_start)
    session._char_end = _int64_array(snapshot.char_end)
    session._text_parts, session._char_len = [snapshot.text], len(snapshot.text)
    session._sources = list(snapshot.sources)
    session._pending = list(snapshot.pending)
    session._last_logprobs = _last_logprobs(state)
    session._tokens_computed = meta["tokens_computed"]
    session._tokens_reused = meta["tokens_reused"]
    session._max_local_distance = meta["max_local_distance"]
    session._decode_steps = meta["decode_steps"]
    session._event_sizes = timeline.event_sizes()
    serve_from_disk(session, segments)
    window = timeline.num_tokens - timeline.window_start
    for i, layer in enumerate(session.layers):
        _restore_layer(layer, i, segments, state, meta["query_counts"][i], timeline.init_len, window)


def _last_logprobs(state: TensorFile) -> torch.Tensor | None:
    if "last_logprobs" not in state:
        return None
    _length(state, "last_logprobs", 1)
    return state.get("last_logprobs").float().clone()


def serve_from_disk(session: Session, segments: list[tuple[SegmentRecord, TensorFile]]) -> None:
    """Every layer reads the events these segments hold from disk (dropping RAM copies of them)."""
    offsets = []
    for record, mapped in segments:
        spans = mapped.get("events")[: record.n_events]
        sizes = (spans[:, 1] - spans[:, 0]).tolist()
        offsets.append([0, *itertools.accumulate(sizes)])
    for i, layer in enumerate(session.layers):
        expected = (1, layer.init_k.shape[1], None, layer.init_k.shape[3])
        for events, name in ((layer.events_k, f"k.{i}"), (layer.events_v, f"v.{i}")):
            for (_, mapped), offs in zip(segments, offsets, strict=True):
                _expect_shape(mapped, name, expected, at_least=offs[-1])
            runs = [
                DiskRun(record.first_event, offs, mapped, name)
                for (record, mapped), offs in zip(segments, offsets, strict=True)
            ]
            events.set_disk(runs)


def _restore_layer(layer, i: int, segments, state: TensorFile, query_count: int, init_len: int, window: int):
    device, dtype = layer.device, layer.dtype
    heads, head_dim = layer.init_k.shape[1], layer.init_k.shape[3]
    for name, length in (
        (f"init_k.{i}", init_len),
        (f"init_v.{i}", init_len),
        (f"window_k.{i}", window),
        (f"window_k_rot.{i}", window),
        (f"window_v.{i}", window),
    ):
        _expect_shape(state, name, (1, heads, length, head_dim))
    _expect_shape(state, f"mass.{i}", (window,))
    layer.init_k = state.get(f"init_k.{i}").to(device, dtype)
    layer.init_v = state.get(f"init_v.{i}").to(device, dtype)
    layer._ensure_capacity(window)
    layer.k_raw[:, :, :window] = state.get(f"window_k.{i}").to(device, dtype)
    layer.k_rot[:, :, :window] = state.get(f"window_k_rot.{i}").to(device, dtype)
    layer.v[:, :, :window] = state.get(f"window_v.{i}").to(device, dtype)
    layer.mass[:window] = state.get(f"mass.{i}").to(device)
    layer.length = window
    reprs = []
    for record, mapped in segments:
        _expect_shape(mapped, f"r.{i}", (None, heads * head_dim), at_least=record.n_events)
        reprs.append(mapped.get(f"r.{i}")[: record.n_events])
    layer.load_reprs(torch.cat(reprs) if reprs else None)
    if f"query_sum.{i}" in state:
        _expect_shape(state, f"query_sum.{i}", (1, None, head_dim))
        layer._query_sum = state.get(f"query_sum.{i}").to(device).float().clone()
        layer._query_count = query_count
    if f"corpus_query_sum.{i}" in state:
        _expect_shape(state, f"corpus_query_sum.{i}", (1, None, head_dim))
        _expect_shape(state, f"corpus_query_count.{i}", (1,))
        layer.corpus_query_sum = state.get(f"corpus_query_sum.{i}").to(device).float().clone()
        layer.corpus_query_count = int(state.get(f"corpus_query_count.{i}")[0])
    if f"selection.{i}" in state:
        _length(state, f"selection.{i}", 1)
        selection = tuple(int(e) for e in state.get(f"selection.{i}").tolist())
        events = len(layer.events_k)
        _expect(
            all(0 <= e < events for e in selection), state, f"selection.{i} names events it does not hold"
        )
        layer._selection, layer._global = selection, None  # read back when first needed


def _expect_shape(part: TensorFile, name: str, shape: tuple, at_least: int | None = None) -> None:
    """`name` has this shape (None = any size; with at_least, the None dimension holds at least that)."""
    if name not in part:
        raise CorruptSessionError(f"{part.path} has no tensor {name!r}")
    held = part.shape(name)
    fits = len(held) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, held, strict=True)
    )
    if fits and at_least is not None:
        fits = all(got >= at_least for want, got in zip(shape, held, strict=True) if want is None)
    _expect(fits, part, f"tensor {name!r} has shape {list(held)}, this model's layers need {list(shape)}")


def _expect(condition: bool, part: TensorFile, why: str) -> None:
    if not condition:
        raise CorruptSessionError(f"{part.path}: {why}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "FORMAT_VERSION",
    "SavedState",
    "SegmentRecord",
    "Snapshot",
    "read_snapshot",
    "restore",
    "saved_extent",
    "segment_payload",
    "serve_from_disk",
    "state_meta",
    "state_payload",
]
