"""TextLedger: a session's text, the span of it each token covers, and where each run of tokens came from.

Spans are packed int64 arrays (8 bytes a value, not a Python int each: a million tokens fit in 16 MB).
Its rows (text, spans) only grow; `sources` changes as a whole. Knows nothing about models or files.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable

import torch

from .state import Mark, Piece, State, expect, is_count, materialize, vector


class TextLedger:
    """Text and per-token char spans of one session (see the module docstring)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._chars = 0
        self.char_start = array("q")
        self.char_end = array("q")
        self.sources: list[tuple[int, str | None]] = []  # (first token, source id) of each run
        self._loaded_spans = (0, 0)  # lowest and highest char of spans loaded, not yet checked

    # -- reading ----------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def chars(self) -> int:
        return self._chars

    @property
    def tokens(self) -> int:
        return len(self.char_start)

    def span(self, token_start: int, token_stop: int) -> tuple[int, int]:
        """(char_start, char_end) of the text tokens [token_start, token_stop) cover."""
        return self.char_start[token_start], self.char_end[token_stop - 1]

    def text_end(self, tokens: int, floor: int = 0) -> int:
        """Where the text of tokens [0, tokens) stops: where the next token's text starts (at least floor)."""
        end = self.char_start[tokens] if tokens < len(self.char_start) else self._chars
        return max(min(end, self._chars), floor)

    def source_of(self, token: int) -> str | None:
        starts = [start for start, _ in self.sources]
        i = bisect.bisect_right(starts, token) - 1
        return self.sources[i][1] if i >= 0 else None

    # -- writing ----------------------------------------------------------------------------------
    def record(
        self, first_token: int, text: str, offsets: Iterable[tuple[int, int]], source_id: str | None
    ) -> None:
        """Append text and the spans of its tokens (offsets relative to `text`)."""
        base = self._chars
        offsets = list(offsets)
        self._parts.append(text)
        self._chars += len(text)
        self.char_start.extend(base + a for a, _ in offsets)
        self.char_end.extend(base + b for _, b in offsets)
        if not self.sources or self.sources[-1][1] != source_id:
            self.sources.append((first_token, source_id))

    def truncate(self, n_tokens: int) -> int:
        """Keep the first n_tokens and their text; returns the chars kept."""
        chars = self.char_end[n_tokens - 1] if n_tokens else 0
        self._cut(n_tokens, chars)
        return chars

    def _cut(self, tokens: int, chars: int) -> None:
        del self.char_start[tokens:], self.char_end[tokens:]
        text = self.text[:chars]
        self._parts, self._chars = [text], len(text)
        self.sources = [(start, source) for start, source in self.sources if start < tokens]

    # -- state ------------------------------------------------------------------------------------
    def rows(self, start: Mark, stop: Mark) -> State:
        text = self.text[start.chars : stop.chars].encode("utf-8")
        return {
            "text": torch.frombuffer(bytearray(text), dtype=torch.uint8)
            if text
            else torch.empty(0, dtype=torch.uint8),
            "char_start": torch.tensor(self.char_start[start.tokens : stop.tokens], dtype=torch.int64),
            "char_end": torch.tensor(self.char_end[start.tokens : stop.tokens], dtype=torch.int64),
        }

    def state_dict(self, since: Mark, until: Mark) -> State:
        sources = [[start, source] for start, source in self.sources if start < until.tokens]
        return {**self.rows(since, until), "sources": sources}

    def load_rows(self, pieces: list[Piece]) -> None:
        """Replace the text and spans with the rows of saved segments (in order)."""
        self._cut(0, 0)
        for rows, start, stop in pieces:
            self._append_rows(rows, stop.tokens - start.tokens, stop.chars - start.chars)

    def load_state_dict(self, state: State, since: Mark) -> None:
        self._cut(since.tokens, since.chars)
        self._append_rows(state, None, None)
        sources = state.get("sources")
        expect(isinstance(sources, list), "ledger sources are not a list")
        runs = []
        for entry in sources:
            expect(isinstance(entry, (list, tuple)) and len(entry) == 2, f"a source entry {entry!r}")
            start, source = entry
            expect(is_count(start) and (source is None or isinstance(source, str)), f"a source {entry!r}")
            expect(start < max(self.tokens, 1) and (not runs or runs[-1][0] < start), "sources out of order")
            runs.append((start, source))
        self.sources = runs
        low, high = self._loaded_spans
        self._loaded_spans = (0, 0)
        expect(low >= 0 and high <= self._chars, f"char spans {low}..{high} outside {self._chars} chars")

    def _append_rows(self, rows: State, tokens: int | None, chars: int | None) -> None:
        """Rows of a segment hold at least `tokens` and `chars` (a file may hold more than its record
        keeps); a state's rows hold exactly what they say (None)."""
        raw = vector(rows["text"], "ledger text", dtype=torch.uint8)
        try:
            text = raw.numpy().tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"ledger text is not UTF-8 ({exc})") from exc
        starts = vector(rows["char_start"], "char_start", dtype=torch.int64)
        ends = vector(rows["char_end"], "char_end", starts.shape[0], dtype=torch.int64)
        if tokens is not None:
            expect(
                starts.shape[0] >= tokens and len(text) >= chars, "a segment holds fewer rows than its record"
            )
            starts, ends, text = starts[:tokens], ends[:tokens], text[:chars]
        self._parts.append(text)
        self._chars += len(text)
        if starts.numel():  # checked against the whole text once the load is over
            low, high = int(torch.minimum(starts, ends).min()), int(torch.maximum(starts, ends).max())
            self._loaded_spans = (min(low, self._loaded_spans[0]), max(high, self._loaded_spans[1]))
        self.char_start.frombytes(materialize(starts).contiguous().numpy().tobytes())
        self.char_end.frombytes(materialize(ends).contiguous().numpy().tobytes())


__all__ = ["TextLedger"]
