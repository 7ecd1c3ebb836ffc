"""Session: one episodic memory over a token stream — feed text, generate, retrieve, inspect, truncate.

A session is made of parts, each the only owner of its state: the timeline (tokens, surprise, events),
the text ledger (text, spans, sources), one LayerMemory per layer (keys and values), and a few fields of
its own (pending tokens, the last logits, counters). The engine lends it the model. Generated tokens join
the session: the last one is computed lazily, at the start of the next call. Every public method holds
the session's lock, so threads sharing a session queue up. `state_dict` / `load_state_dict` (see
emllm.state) carry the parts' states for checkpoints and for the store.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import SessionCheckpoint
from .config import EMLLMConfig
from .episodes import Timeline, evict
from .errors import EmptyInputError, InvalidInputError, StaleCheckpointError, StoreError
from .generation import GenerationConfig, TextAccumulator, choose_token
from .ledger import TextLedger
from .memory import ChunkContext, LayerMemory
from .positions import RotaryTable
from .segmentation import token_surprise
from .session_lock import SessionLock
from .snapshot import SavedState
from .state import Mark, Piece, State, check_counts, expect, is_count, vector


class ModelHost(Protocol):
    """What a session uses of the engine that holds it (emllm.EMLLM): the engine creates sessions, so a
    session knows it only by this shape."""

    name: str
    config: EMLLMConfig
    tokenizer: Any
    model: Any
    rotary: RotaryTable
    store: Any  # a SessionStore or None
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: set[int]

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def run_model(self, token_ids: list[int], context: ChunkContext, all_logits: bool) -> torch.Tensor: ...


LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

PROGRESS_MIN_TOKENS = 4096  # inputs at least this long show a progress bar unless told otherwise


@dataclass(frozen=True)
class RetrievalHit:
    """An event that matches a query, with where its text sits in the session."""

    event_id: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    source_id: str | None
    text: str
    score: float


@dataclass(frozen=True)
class EventInfo:
    """One stored event: its span, size and surprise."""

    event_id: int
    token_start: int
    token_end: int
    size: int
    char_start: int
    char_end: int
    mean_surprise: float
    max_surprise: float
    source_id: str | None
    text: str


@dataclass(frozen=True)
class SessionStats:
    session_id: str
    tokens: int
    tokens_computed: int
    tokens_reused: int
    events: int
    init_tokens: int
    window_tokens: int
    pending_tokens: int
    mean_event_size: float
    device_bytes: int
    cpu_bytes: int
    disk_bytes: int
    max_local_distance: int
    memory_distance: int

    def as_dict(self) -> dict:
        return asdict(self)


class Session:
    """An episodic memory over one token stream. Create it with `EMLLM.session(id)`."""

    def __init__(self, engine: ModelHost, session_id: str):
        self.engine = engine
        self.id = session_id
        self._lock = SessionLock()  # a stream holds it across its yields, released from any thread
        self._saved: SavedState | None = None  # what of it is on disk: set by the store that holds it
        self._checkpoints: weakref.WeakSet[SessionCheckpoint] = weakref.WeakSet()  # the ones still valid
        self.reset()

    def reset(self) -> None:
        """Forget everything this session holds."""
        engine = self.engine
        with self._lock:
            self.layers = [
                LayerMemory(
                    i,
                    engine.num_kv_heads,
                    engine.head_dim,
                    engine.config,
                    engine.device,
                    engine.dtype,
                    engine.rotary,
                )
                for i in range(engine.num_layers)
            ]
            self.timeline = Timeline()
            self.ledger = TextLedger()
            self._pending: list[int] = []
            self._last_logprobs: torch.Tensor | None = None
            self._recall: tuple[int, ...] = ()  # events every layer attends first, during one call
            self._event_sizes = torch.empty(0, dtype=torch.long)
            self._tokens_computed = 0
            self._tokens_reused = 0
            self._max_local_distance = 0
            self._decode_steps = 0
            self._checkpoints.clear()
            if self._saved is not None:
                self._saved.invalidate_after(n_tokens=0, n_chars=0)

    # -- reading ------------------------------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        """Every token of the session, fed and generated, in order."""
        return self.timeline.token_ids + self._pending

    @property
    def text(self) -> str:
        """The session's text: everything fed and generated."""
        return self.ledger.text

    @property
    def saved(self) -> SavedState | None:
        """What of this session is on disk (None without a store); kept by the store that holds it."""
        return self._saved

    @saved.setter
    def saved(self, saved: SavedState | None) -> None:
        self._saved = saved

    def feed(
        self, data: str | Sequence[int], source_id: str | None = None, *, progress: bool | None = None
    ) -> int:
        """Read text (or token ids) into memory; returns the number of tokens added."""
        _check_source_id(source_id)
        with self._lock, self._rollback_on_error():
            ids = self._add_input(data, source_id)
            self._compute(self._take_pending() + ids, progress=progress)
            return len(ids)

    def sync(self, token_ids: Sequence[int], source_id: str | None = None) -> int:
        """Make the session hold exactly `token_ids`, reusing the longest prefix it already holds.

        For callers that re-send a whole history each turn (chat adapters): tokens after the common
        prefix are dropped (the history diverged) and the new suffix is queued, to be computed by the
        next generate/stream/feed call. Returns the number of tokens reused.
        """
        _check_source_id(source_id)
        ids = [int(t) for t in token_ids]
        if not ids:
            raise EmptyInputError("cannot sync to an empty token list")
        with self._lock:
            held = self.token_ids
            common = _common_prefix_len(held, ids)
            if common < len(held):
                self.truncate(common)
            if common < len(ids):
                with self._rollback_on_error():
                    suffix = self._add_input(ids[common:], source_id)
                    self._pending.extend(suffix)
            self._tokens_reused += common
            return common

    def forward(self, data: str | Sequence[int], *, progress: bool | None = None) -> torch.Tensor:
        """Like feed, but return the logits of every new token (T, V): for scoring and tests."""
        with self._lock, self._rollback_on_error():
            ids = self._add_input(data, None)
            pending = self._take_pending()
            logits = self._compute(pending + ids, progress=progress, keep_logits=True)
            return logits[len(pending) :]

    def _add_input(self, data: str | Sequence[int], source_id: str | None) -> list[int]:
        if isinstance(data, str):
            if not data:
                raise EmptyInputError("cannot feed empty text")
            encoded = self.engine.tokenizer(data, add_special_tokens=False, return_offsets_mapping=True)
            ids, text, offsets = list(encoded.input_ids), data, list(encoded.offset_mapping)
        else:
            ids = [int(t) for t in data]
            if not ids:
                raise EmptyInputError("cannot feed an empty token list")
            self._check_vocab(ids)
            text, offsets = self._text_with_offsets(ids)
        if not ids:
            raise EmptyInputError("the text produced no tokens")
        self.ledger.record(len(self.token_ids), text, offsets, source_id)
        return ids

    def _check_vocab(self, ids: list[int]) -> None:
        vocab = self.engine.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of the vocabulary (0..{vocab - 1}): {bad[:5]}")

    def _text_with_offsets(self, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """Decoded text and per-token char spans (exact when re-encoding gives the same ids)."""
        tokenizer = self.engine.tokenizer
        text = tokenizer.decode(ids)
        try:
            again = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(again.input_ids) == ids:
                return text, list(again.offset_mapping)
        except (NotImplementedError, ValueError):
            pass
        offsets, pos = [], 0
        for token in ids:
            piece = len(tokenizer.decode([token]))
            offsets.append((pos, min(pos + piece, len(text))))
            pos = min(pos + piece, len(text))
        return text, offsets

    @contextmanager
    def _rollback_on_error(self):
        """If reading input fails or is interrupted, return to the state before it: nothing half-read."""
        base, old_pending, first = self.timeline.num_tokens, list(self._pending), len(self.token_ids)
        try:
            yield
        except BaseException:
            if self.timeline.num_tokens > base:
                kept = self.timeline.token_ids[:base]
                self._truncate_memory(max(base - 1, 0))
                self._pending = kept[base - 1 : base] + old_pending
            else:
                self._pending = old_pending
            self._truncate_text(first)
            raise

    def _take_pending(self) -> list[int]:
        pending, self._pending = self._pending, []
        return pending

    # -- computing ----------------------------------------------------------------------------------
    def _compute(
        self, ids: list[int], *, progress: bool | None = None, query_tail: int = 0, keep_logits: bool = False
    ) -> torch.Tensor:
        """Run ids through the model chunk by chunk; returns the last logits (V,) or all (T, V)."""
        chunks = _split_chunks(ids, self.engine.config.chunk_size, query_tail)
        show = progress if progress is not None else len(ids) >= PROGRESS_MIN_TOKENS
        kept = []
        with tqdm(
            total=len(ids), unit="tok", desc=f"reading ({self.id})", disable=not show, leave=False
        ) as bar:
            for chunk in chunks:
                logits = self._step(chunk, retrieve=True, all_logits=keep_logits)
                if keep_logits:
                    kept.append(logits)
                bar.update(len(chunk))
        self._decode_steps = 0
        return torch.cat(kept) if keep_logits else logits[-1]

    def _step(self, chunk: list[int], *, retrieve: bool, all_logits: bool = False) -> torch.Tensor:
        config = self.engine.config
        context = ChunkContext(
            self.layers, self.engine.rotary, config, self._event_sizes, retrieve=retrieve, recall=self._recall
        )
        want_surprise = config.segmentation == "surprise" and len(chunk) > 1
        logits = self.engine.run_model(chunk, context, all_logits=all_logits or want_surprise)
        surprise = torch.full((len(chunk),), float("nan"))
        if self._last_logprobs is not None:
            surprise[0] = -self._last_logprobs[chunk[0]]
        if want_surprise:
            surprise[1:] = token_surprise(logits[:-1], torch.tensor(chunk[1:], device=logits.device)).cpu()
        self.timeline.append(chunk, surprise, config)
        if evict(self.timeline, self.layers, config, self.engine.rotary):
            self._event_sizes = self.timeline.event_sizes()
            self._save_if_over_ram_budget()
        self._last_logprobs = torch.log_softmax(logits[-1].float(), dim=-1).cpu()
        self._tokens_computed += len(chunk)
        self._max_local_distance = max(self._max_local_distance, context.max_local_distance)
        return logits

    # -- generating ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
        recall: Sequence[int] = (),
        question_recall: int | None = None,
        **options,
    ) -> str:
        """Continue the session (after reading `prompt`, if given); returns the generated text.

        Options are GenerationConfig fields: max_new_tokens, temperature, top_k, top_p, stop, seed,
        ignore_eos. `logits_processor(generated_ids, logits) -> logits` may reshape each step's
        next-token scores (constrained decoding); set a score to -inf to forbid that token.
        `recall`: event ids that every layer attends, ahead of the events it retrieves itself, while
        this call reads the prompt and generates (e.g. the hits of `retrieve(question)`; with their
        temporal neighbours, within the n_mem budget).
        `question_recall`: events the end of the prompt recalls in every layer, after `recall`
        (None = the config's `question_recall`; 0 = none, each layer retrieves alone as in the paper).
        """
        return "".join(
            self.stream(
                prompt,
                logits_processor=logits_processor,
                recall=recall,
                question_recall=question_recall,
                **options,
            )
        )

    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
        recall: Sequence[int] = (),
        question_recall: int | None = None,
        **options,
    ) -> Iterator[str]:
        """Like generate, yielding text pieces as they are decoded.

        Options are checked now; the session is taken when the first piece is asked for, and held until
        the stream ends or is closed (`close()` from any thread, or garbage collection), so calls from
        other threads queue behind it.
        """
        generation = GenerationConfig(**options)
        if question_recall is None:
            question_recall = self.engine.config.question_recall
        elif question_recall < 0:
            raise ValueError(f"question_recall must be >= 0, got {question_recall}")
        return self._stream(prompt, logits_processor, recall, question_recall, generation)

    def _stream(
        self,
        prompt: str | Sequence[int] | None,
        logits_processor: LogitsProcessor | None,
        recall: Sequence[int],
        question_recall: int,
        generation: GenerationConfig,
    ) -> Iterator[str]:
        with self._lock.stream() as hold, self._recalling(recall):
            with self._rollback_on_error():
                logits = self._prepare(prompt, question_recall)
            acc = TextAccumulator(self.engine.tokenizer, generation.stop, self.token_ids)
            generator = None
            if generation.seed is not None:
                generator = torch.Generator().manual_seed(generation.seed)
            new_ids: list[int] = []
            try:
                for step in range(generation.max_new_tokens):
                    if step:
                        logits = self._decode_pending()
                    if logits_processor is not None:
                        logits = logits_processor(list(new_ids), logits)
                    token = choose_token(logits, generation, generator)
                    new_ids.append(token)
                    self._pending.append(token)
                    if token in self.engine.eos_token_ids and not generation.ignore_eos:
                        break
                    piece = acc.add(token)
                    if piece:
                        yield piece
                        hold.resumed()
                    if acc.stopped:
                        break
                tail = acc.flush()
                if tail:
                    yield tail
            finally:
                text, offsets = self._text_with_offsets(new_ids) if new_ids else ("", [])
                self.ledger.record(len(self.token_ids) - len(new_ids), text, offsets, None)

    @contextmanager
    def _recalling(self, recall: Sequence[int]):
        """Make `recall` the events every layer attends first, for the duration of one call."""
        events = tuple(int(e) for e in recall)
        held = len(self.timeline.events)
        bad = [e for e in events if not 0 <= e < held]
        if bad:
            raise ValueError(f"recall: no events {bad} in this session (it holds {held})")
        self._recall = events
        try:
            yield
        finally:
            self._recall = ()

    def _prepare(self, prompt: str | Sequence[int] | None, question_recall: int) -> torch.Tensor:
        """Compute the prompt (its last tokens as their own chunk) and any pending tokens; -> next logits.

        With question_recall, the question (the last chunk_size tokens at most) is first run as a probe
        against memory, once everything before it is read, and its top events join this call's recall.
        """
        ids = self._add_input(prompt, None) if prompt is not None else []
        todo = self._take_pending() + ids
        if not todo:
            if self._last_logprobs is None:
                raise EmptyInputError("nothing to continue from: give a prompt or feed text first")
            return self._last_logprobs
        config = self.engine.config
        query_tail = min(config.query_chunk, config.chunk_size)
        # one token is a continuation, not a question; with n_mem 0 nothing is recalled at all
        if question_recall == 0 or len(todo) == 1 or config.n_mem == 0:
            return self._compute(todo, query_tail=query_tail)
        question = todo[-config.chunk_size :]
        if len(question) < len(todo):
            self._compute(todo[: -len(question)])
        if self.timeline.events:
            ranking = self._rank_events(question)
            top = torch.topk(ranking, min(question_recall, ranking.numel())).indices.tolist()
            self._recall = tuple(dict.fromkeys((*self._recall, *top)))
        return self._compute(question, query_tail=query_tail)

    def _decode_pending(self) -> torch.Tensor:
        interval = self.engine.config.decode_retrieval_interval
        retrieve = self._decode_steps % interval == 0
        self._decode_steps += 1
        return self._step(self._take_pending(), retrieve=retrieve)[-1]

    # -- memory access ------------------------------------------------------------------------------
    def retrieve(self, query: str, k: int = 5) -> list[RetrievalHit]:
        """The k stored events most relevant to `query`, as the layers of `recall_layers` score them.

        Runs the query through the model without storing it; see `_rank_events` for the score.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        with self._lock:
            ids = self.engine.encode(query)[-self.engine.config.chunk_size :]
            if not ids:
                raise EmptyInputError("cannot retrieve with an empty query")
            if not self.timeline.events:
                return []
            combined = self._rank_events(ids)
            top = torch.topk(combined, min(k, combined.shape[0]))
            return [
                RetrievalHit(score=float(s), **self._span_fields(int(i)))
                for s, i in zip(top.values, top.indices, strict=True)
            ]

    def _rank_events(self, ids: list[int]) -> torch.Tensor:
        """(E,) how strongly a probe of `ids` recalls each stored event: every layer of the config's
        recall band scores the events (retrieval.relevance_scores), the scores are standardised per layer,
        then averaged. The probe runs the model without storing anything.

        Why a band: on SmolLM2-135M the lower layers rank a RULER needle's event in the hundreds while most
        upper layers rank it first; all 30 layers averaged missed needles that the upper half found.
        """
        context = ChunkContext(
            self.layers, self.engine.rotary, self.engine.config, self._event_sizes, probe=True
        )
        self.engine.run_model(ids, context, all_logits=False)
        band = self.engine.config.recall_band(len(self.layers)) or range(len(self.layers))
        scores = torch.stack([context.probe_scores[i] for i in band]).float()  # (layers, E)
        std = scores.std(dim=1, keepdim=True).clamp_min(1e-6) if scores.shape[1] > 1 else 1.0
        return ((scores - scores.mean(dim=1, keepdim=True)) / std).mean(dim=0)

    def events(self) -> list[EventInfo]:
        """Every stored event, oldest first."""
        with self._lock:
            infos = []
            for i, (start, stop) in enumerate(self.timeline.events):
                surprise = self.timeline.surprise[start:stop]
                known = surprise[~torch.isnan(surprise)]
                infos.append(
                    EventInfo(
                        size=stop - start,
                        mean_surprise=float(known.mean()) if known.numel() else float("nan"),
                        max_surprise=float(known.max()) if known.numel() else float("nan"),
                        **self._span_fields(i),
                    )
                )
            return infos

    def passages(self, event_ids: Sequence[int], neighbours: int = 1) -> list[str]:
        """The text of these events, each widened by `neighbours` events either side, adjacent ones merged,
        in time order, whitespace collapsed: retrieved memory to quote in a prompt."""
        count = len(self.timeline.events)
        chosen = sorted(
            {e + d for e in event_ids for d in range(-neighbours, neighbours + 1) if 0 <= e + d < count}
        )
        runs: list[list[int]] = []
        for event in chosen:
            if runs and event == runs[-1][-1] + 1:
                runs[-1].append(event)
            else:
                runs.append([event])
        spans = [(self.event_span(run[0])[0], self.event_span(run[-1])[1]) for run in runs]
        return [" ".join(self.text[start:end].split()) for start, end in spans]

    def quote(self, event_ids: Sequence[int], neighbours: int = 1) -> str:
        """`passages` as prompt text ("\\n\\nPassages:" then one "- passage" line each); "" for no events."""
        passages = self.passages(event_ids, neighbours)
        return "\n\nPassages:" + "".join(f"\n- {passage}" for passage in passages) if passages else ""

    def event_span(self, event_id: int) -> tuple[int, int]:
        """(char_start, char_end) of one event in `text`."""
        return self.ledger.span(*self.timeline.events[event_id])

    def _span_fields(self, event_id: int) -> dict:
        start, stop = self.timeline.events[event_id]
        char_start, char_end = self.event_span(event_id)
        return dict(
            event_id=event_id,
            token_start=start,
            token_end=stop,
            char_start=char_start,
            char_end=char_end,
            source_id=self.ledger.source_of(start),
            text=self.text[char_start:char_end],
        )

    def truncate(self, n_tokens: int) -> None:
        """Cut the session back to its first n_tokens (for a history that diverged).

        A cut behind the local window puts the last events back into it (as many as fit in n_local), so
        what follows the cut sees its recent past locally, as in a session that only read the kept tokens.
        """
        with self._lock:
            total = len(self.token_ids)
            if not 0 <= n_tokens <= total:
                raise ValueError(f"n_tokens must be within 0..{total}, got {n_tokens}")
            ids = self.token_ids
            computed = self.timeline.num_tokens
            if n_tokens >= computed:
                del self._pending[n_tokens - computed :]
            else:
                # the logits after the new last token were never kept: recompute that token lazily
                self._truncate_memory(max(n_tokens - 1, 0))
                self._pending = ids[n_tokens - 1 : n_tokens]
            self._truncate_text(n_tokens)

    def _truncate_memory(self, n_tokens: int) -> None:
        if self._saved is not None:
            self._saved.invalidate_after(n_tokens=n_tokens)
        window_start = self.timeline.window_start
        kept_events, last_len = self.timeline.truncate(n_tokens)
        if n_tokens >= window_start:
            for layer in self.layers:
                layer.truncate_window(n_tokens - window_start)
        else:
            for layer in self.layers:
                layer.truncate_window(0)
                layer.truncate_events(kept_events, last_len)
                layer.truncate_init(self.timeline.init_len)
            self._refill_window()
        self._event_sizes = self.timeline.event_sizes()
        self._last_logprobs = None
        events = len(self.timeline.events)
        self._drop_checkpoints(lambda cp: cp.window_start > n_tokens or cp.mark.events > events)

    def _refill_window(self) -> None:
        """A cut behind the window emptied it: the last events that fit in n_local go back into it."""
        returned = self.timeline.reopen_window(self.engine.config.n_local)
        if not any(returned):
            return
        for layer in self.layers:
            layer.reopen_window(*returned, self.engine.rotary)
        if self._saved is not None:
            self._saved.invalidate_after(n_tokens=self.timeline.window_start)

    def _truncate_text(self, n_tokens: int) -> None:
        chars = self.ledger.truncate(n_tokens)
        if self._saved is not None:
            self._saved.invalidate_after(n_chars=chars)
        self._drop_checkpoints(lambda cp: cp.mark.tokens > n_tokens)

    def _drop_checkpoints(self, stale: Callable[[SessionCheckpoint], bool]) -> None:
        for checkpoint in [cp for cp in self._checkpoints if stale(cp)]:
            self._checkpoints.discard(checkpoint)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> SessionCheckpoint:
        """The session's state now, to return to exactly with `rewind`.

        It is `state_dict(since=window start)`: what changes in place is copied (each layer's local
        window, n_local tokens of keys and values: `.nbytes`) with the window's rows (a cut to exactly
        the checkpoint's length recomputes its last token); the rows before it are shared. A cut that
        removes tokens it holds makes it stale.
        """
        with self._lock:
            mark, start = self.mark(), self.timeline.window_start
            since = Mark(start, start, mark.events, self.ledger.text_end(start))
            checkpoint = SessionCheckpoint(self.id, since, mark, self.state_dict(since, mark))
            self._checkpoints.add(checkpoint)
            return checkpoint

    def rewind(self, checkpoint: SessionCheckpoint) -> None:
        """Return to the state `checkpoint` was taken in: what was read or generated since is dropped,
        and what follows behaves exactly as it did then (the same question, the same greedy answer).

        Raises StaleCheckpointError when a cut since then removed tokens the checkpoint holds, or when it
        belongs to another session (or to this one before a reset).
        """
        with self._lock:
            if checkpoint not in self._checkpoints:
                raise StaleCheckpointError(
                    f"session {self.id!r} cannot rewind to this checkpoint (taken in session "
                    f"{checkpoint.session_id!r}): a cut since then removed tokens it holds, or it is "
                    "another session's"
                )
            self.load_state_dict(checkpoint.state, checkpoint.since, counters=False)
            self._drop_checkpoints(lambda cp: cp.mark.tokens > checkpoint.mark.tokens)
            if self._saved is not None:
                self._saved.invalidate_after(n_tokens=checkpoint.window_start, n_chars=checkpoint.mark.chars)

    # -- state --------------------------------------------------------------------------------------
    def mark(self) -> Mark:
        """How far the session's rows reach now. In the middle of a `feed` (a save for the RAM budget) the
        ledger already holds the whole input's text and spans, but only part of it was read: the mark
        stops at the tokens read and their text, so what a save holds always agrees with itself."""
        tokens = len(self.token_ids)
        events = len(self.timeline.events)
        return Mark(self.timeline.num_tokens, tokens, events, self.ledger.text_end(tokens))

    def event_mark(self, events: int, floor: Mark) -> Mark:
        """The mark right after the first `events` events (a saved segment ends there)."""
        end = self.timeline.events[events - 1][1] if events else 0
        return Mark(end, end, events, self.ledger.text_end(end, floor.chars))

    def rows(self, start: Mark, stop: Mark) -> State:
        """Every part's rows between two marks (a saved segment)."""
        with self._lock:
            return {
                "timeline": self.timeline.rows(start, stop),
                "ledger": self.ledger.rows(start, stop),
                "layers": {str(i): layer.rows(start, stop) for i, layer in enumerate(self.layers)},
            }

    def state_dict(self, since: Mark | None = None, until: Mark | None = None, *, copy: bool = True) -> State:
        """The session's state: each part's, with its rows from `since` (default: all) to `until` (default:
        now). With copy=False, what changes in place is not copied (the store writes it at once)."""
        with self._lock:
            since, until = since or Mark(), until or self.mark()
            return {
                "mark": until.as_dict(),
                "session": self._own_state(),
                "timeline": self.timeline.state_dict(since, until),
                "ledger": self.ledger.state_dict(since, until),
                "layers": {
                    str(i): layer.state_dict(since, until, copy=copy) for i, layer in enumerate(self.layers)
                },
            }

    def _own_state(self) -> State:
        state = {
            "pending": torch.tensor(self._pending, dtype=torch.int64),
            "decode_steps": self._decode_steps,
            "tokens_computed": self._tokens_computed,
            "tokens_reused": self._tokens_reused,
            "max_local_distance": self._max_local_distance,
        }
        if self._last_logprobs is not None:
            state["last_logprobs"] = self._last_logprobs.clone()  # a logits_processor may write into it
        return state

    def load_rows(self, pieces: list[Piece]) -> None:
        """Put back the rows of saved segments (in order from the first), replacing every row held; the
        keys and values of their events stay on disk, read when retrieved."""
        with self._lock:
            self.timeline.load_rows([(rows["timeline"], a, b) for rows, a, b in pieces])
            self._check_vocabulary(self.timeline.token_ids)
            self.ledger.load_rows([(rows["ledger"], a, b) for rows, a, b in pieces])
            for i, layer in enumerate(self.layers):
                layer_pieces = [(_layer_state(rows, i), a, b) for rows, a, b in pieces]
                self._check_event_lengths(layer_pieces)
                layer.load_rows(layer_pieces)

    def serve_from_disk(self, pieces: list[Piece]) -> None:
        """After a save: the events of these saved segments are read from disk (RAM copies dropped)."""
        for i, layer in enumerate(self.layers):
            layer.serve_from_disk([(_layer_state(rows, i), a, b) for rows, a, b in pieces])

    def _check_vocabulary(self, ids: list[int]) -> None:
        vocab = self.engine.model.get_input_embeddings().num_embeddings
        expect(not ids or 0 <= min(ids) <= max(ids) < vocab, "token ids outside the model's vocabulary")

    def _check_event_lengths(self, pieces: list[Piece]) -> None:
        sizes = self.timeline.event_sizes()
        for rows, start, stop in pieces:
            lengths = vector(rows["lengths"], "lengths", dtype=torch.long)[: stop.events - start.events]
            expect(
                torch.equal(lengths, sizes[start.events : stop.events]), "event lengths disagree with spans"
            )

    def load_state_dict(self, state: State, since: Mark | None = None, *, counters: bool = True) -> None:
        """Return to `state` (from state_dict), keeping the rows held before `since` (a checkpoint's, or
        those load_rows put back). State that disagrees with itself raises ValueError (after which the
        session must be reset); counters=False keeps this session's counters (a rewind)."""
        with self._lock:
            since = since or Mark()
            mark = Mark.from_dict(state.get("mark"))
            layers = state.get("layers")
            expect(
                isinstance(layers, dict)
                and sorted(layers) == sorted(str(i) for i in range(len(self.layers))),
                f"per-layer state that does not fit this model's {len(self.layers)} layers",
            )
            self.timeline.load_state_dict(state["timeline"], since)
            self.ledger.load_state_dict(state["ledger"], since)
            for i, layer in enumerate(self.layers):
                layer.load_state_dict(layers[str(i)], since)
            self._load_own_state(state["session"], since, counters)
            self._event_sizes = self.timeline.event_sizes()
            check_counts(
                mark,
                computed=self.timeline.num_tokens,
                tokens=len(self.token_ids),
                spans=self.ledger.tokens,
                events=len(self.timeline.events),
                chars=self.ledger.chars,
            )
            expect(
                all(len(layer.events_k) == mark.events for layer in self.layers), "layers hold other events"
            )

    def _load_own_state(self, state: State, since: Mark, counters: bool) -> None:
        pending = vector(state["pending"], "pending", dtype=torch.int64).tolist()
        self._check_vocabulary(self.timeline.token_ids[since.computed :] + pending)  # earlier ones: checked
        last = state.get("last_logprobs")
        self._pending = pending
        self._last_logprobs = vector(last, "last_logprobs").float().clone() if last is not None else None
        fields = ("decode_steps", "tokens_computed", "tokens_reused", "max_local_distance")
        expect(all(is_count(state.get(name)) for name in fields), "session counters")
        self._decode_steps = state["decode_steps"]
        if counters:
            self._tokens_computed = state["tokens_computed"]
            self._tokens_reused = state["tokens_reused"]
            self._max_local_distance = state["max_local_distance"]

    # -- persistence --------------------------------------------------------------------------------
    def save(self) -> None:
        """Write this session to the engine's SessionStore: only what changed since the last save, atomically.

        Saved events are read from disk when retrieved afterwards (their RAM copies are dropped).
        """
        store = self.engine.store
        if store is None or self._saved is None:
            where = (
                "this engine has no store" if store is None else "throwaway sessions (no id) are not stored"
            )
            raise StoreError(f"cannot save session {self.id!r}: {where}; pass store=... to EMLLM")
        with self._lock:
            store.save(self)

    def _save_if_over_ram_budget(self) -> None:
        store = self.engine.store
        if store is None or self._saved is None or store.max_ram_bytes is None:
            return
        # half the budget: a save briefly holds a second copy of the events it writes
        if sum(layer.cpu_bytes() for layer in self.layers) > store.max_ram_bytes // 2:
            store.save(self)

    def stats(self) -> SessionStats:
        with self._lock:
            timeline = self.timeline
            sizes = self._event_sizes
            return SessionStats(
                session_id=self.id,
                tokens=len(self.token_ids),
                tokens_computed=self._tokens_computed,
                tokens_reused=self._tokens_reused,
                events=len(timeline.events),
                init_tokens=timeline.init_len,
                window_tokens=timeline.window_len,
                pending_tokens=len(self._pending),
                mean_event_size=float(sizes.float().mean()) if sizes.numel() else 0.0,
                device_bytes=sum(layer.device_bytes() for layer in self.layers),
                cpu_bytes=sum(layer.cpu_bytes() for layer in self.layers),
                disk_bytes=self._saved.disk_bytes if self._saved is not None else 0,
                max_local_distance=self._max_local_distance,
                memory_distance=self.engine.config.memory_distance,
            )


def _check_source_id(source_id: object) -> None:
    if source_id is not None and not isinstance(source_id, str):
        msg = f"source_id must be a str or None, got {type(source_id).__name__}: {source_id!r}"
        raise InvalidInputError(msg + (" (pass str(path))" if isinstance(source_id, PathLike) else ""))


def _layer_state(rows: State, i: int) -> State:
    layers = rows.get("layers")
    expect(isinstance(layers, dict) and str(i) in layers, f"no state of layer {i}")
    return layers[str(i)]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _split_chunks(ids: list[int], chunk_size: int, query_tail: int) -> list[list[int]]:
    """Chunks of chunk_size; with query_tail, the last query_tail tokens form a chunk of their own."""
    body, tail = ids, []
    if 0 < query_tail < len(ids):
        body, tail = ids[:-query_tail], ids[-query_tail:]
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    if tail:
        chunks.append(tail)
    return chunks


__all__ = ["EventInfo", "RetrievalHit", "Session", "SessionStats"]
