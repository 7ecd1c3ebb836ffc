"""A session as tensors: what the store writes and how a session is rebuilt from it.

A saved session is a run of *segments* plus one *state*. A segment freezes consecutive events: their
token-level records (ids, surprise, boundaries, char spans, the text they cover) and, per layer, their
keys, values and representatives. Segments never change once written, so saving again writes only new
events. The state holds everything that still moves: the init block, the local window, the tokens after
the last saved event, pending tokens, the last logits and the retrieval state, so that a reopened session
continues exactly as the original would have.
"""

from __future__ import annotations

import itertools
import json
from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .tensorfiles import TensorFile
from .tiers import DiskRun

if TYPE_CHECKING:
    from .session import Session

FORMAT_VERSION = 1


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


@dataclass
class SavedState:
    """What of a session is on disk, and how much of it still matches the session in memory."""

    segments: list[SegmentRecord]
    state_file: str | None
    valid_tokens: int  # tokens [0, valid_tokens) unchanged since the last save
    valid_chars: int
    state_bytes: int = 0

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
    """Where the text of a segment ending at token_end stops: where the next token's text starts."""
    text_len = session._char_len
    char_end = session._char_start[token_end] if token_end < len(session._char_start) else text_len
    return max(min(char_end, text_len), char_start)


def state_payload(
    session: Session, token_start: int, char_start: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of everything after the saved events."""
    timeline = session.timeline
    all_tokens = len(session.token_ids)
    tensors = _token_records(session, token_start, all_tokens, timeline.num_tokens)
    tensors["text"] = _text_bytes(session.text, char_start, len(session.text))
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
        tokens_computed=session._tokens_computed,
        tokens_reused=session._tokens_reused,
        max_local_distance=session._max_local_distance,
        decode_steps=session._decode_steps,
        query_counts=query_counts,
        sources=session._sources,
    )
    return tensors, meta


def restore(session: Session, segments: list[tuple[SegmentRecord, TensorFile]], state: TensorFile) -> None:
    """Rebuild a freshly reset session from its saved segments and state. Segment keys and values stay
    on disk (read when retrieved); token records and representatives are read now."""
    meta = json.loads(state.metadata["emllm"])
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown session format {meta.get('format')!r}")
    timeline = session.timeline

    def records(name: str) -> torch.Tensor:  # a segment file may hold more tokens than its record keeps
        held = [mapped.get(name)[: r.token_end - r.token_start] for r, mapped in segments]
        return torch.cat([*held, state.get(name)])

    timeline.token_ids = records("token_ids").tolist()
    timeline.surprise = records("surprise").clone()
    timeline.boundary = records("boundary").bool()
    spans = [mapped.get("events")[: record.n_events] for record, mapped in segments]
    timeline.events = [tuple(span) for part in spans for span in part.tolist()]
    timeline.init_len, timeline.window_start = meta["init_len"], meta["window_start"]
    session._char_start = _int64_array(records("char_start"))
    session._char_end = _int64_array(records("char_end"))
    texts = [_text(mapped)[: r.char_end - r.char_start] for r, mapped in segments]
    text = "".join([*texts, _text(state)])
    session._text_parts, session._char_len = [text], len(text)
    session._sources = [(int(start), source) for start, source in meta["sources"]]
    session._pending = state.get("pending").tolist()
    session._last_logprobs = state.get("last_logprobs").clone() if "last_logprobs" in state else None
    session._tokens_computed = meta["tokens_computed"]
    session._tokens_reused = meta["tokens_reused"]
    session._max_local_distance = meta["max_local_distance"]
    session._decode_steps = meta["decode_steps"]
    session._event_sizes = timeline.event_sizes()
    serve_from_disk(session, segments)
    for i, layer in enumerate(session.layers):
        _restore_layer(layer, i, segments, state, meta["query_counts"][i])


def _text(part: TensorFile) -> str:
    return part.get("text").numpy().tobytes().decode("utf-8")


def serve_from_disk(session: Session, segments: list[tuple[SegmentRecord, TensorFile]]) -> None:
    """Every layer reads the events these segments hold from disk (dropping RAM copies of them)."""
    offsets = []
    for record, mapped in segments:
        spans = mapped.get("events")[: record.n_events]
        sizes = (spans[:, 1] - spans[:, 0]).tolist()
        offsets.append([0, *itertools.accumulate(sizes)])
    for i, layer in enumerate(session.layers):
        for events, name in ((layer.events_k, f"k.{i}"), (layer.events_v, f"v.{i}")):
            runs = [
                DiskRun(record.first_event, offs, mapped, name)
                for (record, mapped), offs in zip(segments, offsets, strict=True)
            ]
            events.set_disk(runs)


def _restore_layer(layer, i: int, segments, state: TensorFile, query_count: int) -> None:
    device, dtype = layer.device, layer.dtype
    layer.init_k = state.get(f"init_k.{i}").to(device, dtype)
    layer.init_v = state.get(f"init_v.{i}").to(device, dtype)
    window_k = state.get(f"window_k.{i}")
    length = window_k.shape[2]
    layer._ensure_capacity(length)
    layer.k_raw[:, :, :length] = window_k.to(device, dtype)
    layer.k_rot[:, :, :length] = state.get(f"window_k_rot.{i}").to(device, dtype)
    layer.v[:, :, :length] = state.get(f"window_v.{i}").to(device, dtype)
    layer.mass[:length] = state.get(f"mass.{i}").to(device)
    layer.length = length
    reprs = [mapped.get(f"r.{i}")[: record.n_events] for record, mapped in segments]
    layer.load_reprs(torch.cat(reprs) if reprs else None)
    if f"query_sum.{i}" in state:
        layer._query_sum = state.get(f"query_sum.{i}").to(device).clone()
        layer._query_count = query_count
    if f"corpus_query_sum.{i}" in state:
        layer.corpus_query_sum = state.get(f"corpus_query_sum.{i}").to(device).clone()
        layer.corpus_query_count = int(state.get(f"corpus_query_count.{i}")[0])
    if f"selection.{i}" in state:
        selection = tuple(state.get(f"selection.{i}").tolist())
        layer._selection, layer._global = selection, None  # read back when first needed


__all__ = [
    "FORMAT_VERSION",
    "SavedState",
    "SegmentRecord",
    "restore",
    "segment_payload",
    "serve_from_disk",
    "state_payload",
]
