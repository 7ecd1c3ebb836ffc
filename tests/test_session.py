"""The Session API as a caller sees it: input validation and typed errors, independent sessions,
generation invariants (max_new_tokens, greedy determinism, seeds, stop strings, streaming), char spans and
sources of events, truncation, threads, and stats."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import emllm
import pytest
import torch
import transformers
from conftest import EOS, ByteTokenizer, tiny_model
from test_episodes import assert_memory_consistent

PROMPT = "Once upon a time, "


@pytest.fixture(scope="module")
def engine():
    """One shared engine (sessions are independent); tests that need other settings build their own."""
    from emllm import EMLLM, EMLLMConfig

    config = EMLLMConfig(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)
    return EMLLM(tiny_model(), ByteTokenizer(), config)


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prose(n_chars: int, seed: int = 0, *, ascii_only: bool = False) -> str:
    """Deterministic text with a few multi-byte characters (unless ascii_only)."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "quiet", "engines", "hummed"]
    words += ["under", "grey", "café", "skies", "—", "nobody", "spoke"]
    rng = random.Random(seed)
    text = ""
    while len(text) < n_chars:
        text += rng.choice(words) + " "
    if ascii_only:
        text = text.replace("é", "e").replace("—", "-")
    return text[:n_chars]


# ------------------------------------------------------------------------------------------ bad input


def test_empty_input_is_refused(engine) -> None:
    session = engine.session()
    session.feed("hello")
    before = (session.token_ids, session.text)
    for empty in ("", []):
        with pytest.raises(emllm.EmptyInputError):
            session.feed(empty)
        with pytest.raises(emllm.EmptyInputError):
            session.forward(empty)
        with pytest.raises(emllm.EmptyInputError):
            session.generate(empty, max_new_tokens=2)
    assert (session.token_ids, session.text) == before


@pytest.mark.parametrize("bad", [[300], [-1], [65, 260], [65, 10**6]])
def test_out_of_vocabulary_ids_are_refused(engine, bad) -> None:
    session = engine.session()
    session.feed("hi")
    with pytest.raises(ValueError, match="vocabulary"):
        session.feed(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        session.generate(bad, max_new_tokens=2)
    assert session.token_ids == list(b"hi") and session.text == "hi"
    session.feed(" there")  # still usable
    assert session.text == "hi there"


@pytest.mark.parametrize("bad", [Path("notes.txt"), b"notes", 7])
def test_a_source_id_that_is_not_text_is_refused_before_anything_changes(engine, bad) -> None:
    """Accepted, it broke every later save of the session; now refused where it comes in."""
    session = engine.session()
    session.feed("hello there", source_id="greeting")
    before = (session.token_ids, session.text, session.stats(), list(session.ledger.sources))
    with pytest.raises(
        emllm.InvalidInputError, match=r"source_id must be a str or None, got (PosixPath|bytes|int)"
    ):
        session.feed(" again", source_id=bad)
    with pytest.raises(TypeError, match="source_id"):  # a diverged history: refused before the cut
        session.sync(list(b"hello world"), source_id=bad)
    assert (session.token_ids, session.text, session.stats(), session.ledger.sources) == before
    session.feed(" again", source_id="more")  # still usable
    assert session.text == "hello there again"


def test_generate_needs_something_to_continue(engine) -> None:
    with pytest.raises(emllm.EmptyInputError):
        engine.session().generate()
    with pytest.raises(emllm.EmptyInputError):
        list(engine.session().stream(max_new_tokens=3))


def test_retrieve_argument_errors(engine) -> None:
    session = engine.session()
    session.feed(random_ids(300))
    with pytest.raises(emllm.EmptyInputError):
        session.retrieve("")
    with pytest.raises(ValueError):
        session.retrieve("cat", k=0)
    assert engine.session().retrieve("cat") == []  # nothing stored yet: no hits, no error


def test_truncate_bounds(engine) -> None:
    session = engine.session()
    session.feed("abcdef")
    for n in (-1, 7):
        with pytest.raises(ValueError, match=r"0\.\.6"):
            session.truncate(n)
    assert session.token_ids == list(b"abcdef")


def test_unsupported_model_is_named(tokenizer) -> None:
    config = transformers.GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(emllm.UnsupportedModelError, match="gpt2") as info:
        emllm.EMLLM(model, tokenizer)
    assert "GPT2LMHeadModel" in str(info.value)
    assert isinstance(info.value, emllm.EMLLMError)


def test_unknown_session_ids(engine) -> None:
    with pytest.raises(emllm.SessionNotFoundError, match="nope") as info:
        engine.session("nope", create=False)
    assert "nope" in str(info.value) and isinstance(info.value, KeyError)
    with pytest.raises(emllm.SessionNotFoundError, match="ghost"):
        engine.drop_session("ghost")
    assert "nope" not in engine.session_ids()


def test_missing_model_path() -> None:
    with pytest.raises(emllm.ModelLoadError, match="nonexistent"):
        emllm.EMLLM.from_pretrained("/nonexistent/dir")


# ------------------------------------------------------------------------------------------ sessions


def test_sessions_are_independent(engine) -> None:
    a, b = engine.session("ind-a"), engine.session("ind-b")
    a.feed(prose(300, seed=1))
    b.feed("a much shorter text")
    assert a.token_ids != b.token_ids
    assert a.stats() != b.stats()
    assert a.stats().tokens == len(prose(300, seed=1).encode())
    assert b.stats().tokens == len("a much shorter text") and b.stats().events == 0
    assert engine.session("ind-a") is a
    assert {"ind-a", "ind-b"} <= set(engine.session_ids())
    engine.drop_session("ind-b")
    assert "ind-b" not in engine.session_ids()
    assert engine.session("ind-a", create=False) is a


def test_throwaway_sessions(engine) -> None:
    known = engine.session_ids()
    one, two = engine.session(), engine.session()
    assert one is not two and one.id != two.id
    one.feed("only in one")
    assert two.token_ids == []
    assert engine.session_ids() == known


def test_reset_empties_a_session(engine) -> None:
    session = engine.session()
    session.feed(random_ids(400))
    session.generate(max_new_tokens=3)
    session.reset()
    stats = session.stats()
    assert session.token_ids == [] and session.text == "" and session.events() == []
    assert (stats.tokens, stats.tokens_computed, stats.events, stats.window_tokens) == (0, 0, 0, 0)
    assert all(layer.length == 0 and not layer.events_k for layer in session.layers)
    with pytest.raises(emllm.EmptyInputError):
        session.generate()
    session.feed("again")
    assert session.text == "again"


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("max_new_tokens", [1, 3, 9])
def test_max_new_tokens_is_respected(engine, max_new_tokens) -> None:
    session = engine.session()
    prompt_len = session.feed(PROMPT)
    session.generate(max_new_tokens=max_new_tokens)
    generated = session.token_ids[prompt_len:]
    assert 1 <= len(generated) <= max_new_tokens
    assert len(generated) == max_new_tokens or generated[-1] == EOS


def test_greedy_is_deterministic(engine) -> None:
    runs = []
    for _ in range(2):
        session = engine.session()
        text = session.generate(PROMPT, max_new_tokens=12, temperature=0.0)
        runs.append((text, session.token_ids))
    assert runs[0] == runs[1]


def test_seeded_sampling_is_reproducible(engine) -> None:
    def sample(seed: int) -> list[int]:
        session = engine.session()
        session.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=seed)
        return session.token_ids

    assert sample(7) == sample(7)
    outputs = [sample(seed) for seed in range(4)]
    assert len({tuple(ids) for ids in outputs}) > 1, "different seeds all gave the same sample"


def _pick_stop(text: str) -> str:
    """A substring of text (no replacement chars) whose first occurrence is not at the start."""
    for length in (3, 2, 1):
        for i in range(len(text) // 2, len(text) - length + 1):
            candidate = text[i : i + length]
            if "\ufffd" not in candidate and text.find(candidate) > 0:
                return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", [PROMPT, "The quick brown fox"])
def test_stop_string_ends_the_output_before_it(engine, prompt) -> None:
    free = engine.session().generate(prompt, max_new_tokens=40)
    stop = _pick_stop(free)
    pieces = list(engine.session().stream(prompt, max_new_tokens=40, stop=[stop, "never-there"]))
    out = "".join(pieces)
    assert stop not in out
    assert out == free[: free.find(stop)]


def test_an_empty_stop_string_is_refused_before_anything_changes(engine) -> None:
    """ "" occurs everywhere: it used to end generation at once with "" after appending a token."""
    session = engine.session()
    session.feed("hello")
    before = (session.token_ids, session.text, session.stats())
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        session.generate(" there", stop=[""], max_new_tokens=3)
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        session.stream(max_new_tokens=3, stop=["x", ""])  # checked when called, not when first iterated
    assert (session.token_ids, session.text, session.stats()) == before


def test_stream_joins_to_generate(engine) -> None:
    a, b = engine.session(), engine.session()
    for session in (a, b):
        session.feed(prose(200, seed=2))
    streamed = list(a.stream(PROMPT, max_new_tokens=20))
    assert "".join(streamed) == b.generate(PROMPT, max_new_tokens=20)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_generated_tokens_join_the_session(engine) -> None:
    session = engine.session()
    fed = session.feed(PROMPT)
    session.generate(max_new_tokens=5)
    generated = session.token_ids[fed:]
    stats = session.stats()
    assert stats.tokens == fed + len(generated)
    assert stats.pending_tokens == 1 and stats.tokens_computed == stats.tokens - 1
    more = session.feed(" and then")
    assert session.token_ids == list(PROMPT.encode()) + generated + list(b" and then")
    assert session.text == PROMPT + ByteTokenizer().decode(generated) + " and then"
    stats = session.stats()
    assert stats.tokens == fed + len(generated) + more
    assert stats.pending_tokens == 0 and stats.tokens_computed == stats.tokens


def test_generate_continues_after_feed(engine) -> None:
    """generate() without a prompt continues the fed text, like generate(prompt) on a fresh session."""
    a, b = engine.session(), engine.session()
    a.feed(PROMPT)
    assert a.generate(max_new_tokens=6) == b.generate(PROMPT, max_new_tokens=6)
    assert a.token_ids == b.token_ids


# ------------------------------------------------------------------------------------------ spans and sources


def _expected_source(token: int, bounds: list[tuple[int, str | None]]) -> str | None:
    source = None
    for start, name in bounds:
        if token >= start:
            source = name
    return source


@pytest.fixture(scope="module")
def sourced(engine):
    """A session fed three documents: source "doc-a", source "doc-b", then no source."""
    session = engine.session("sourced")
    docs = [(prose(400, seed=3), "doc-a"), (prose(350, seed=4), "doc-b"), (prose(300, seed=5), None)]
    bounds, start = [], 0
    for text, source in docs:
        bounds.append((start, source))
        start += session.feed(text, source_id=source)
    return session, bounds


def test_events_report_char_spans_and_sources(sourced) -> None:
    session, bounds = sourced
    offsets = ByteTokenizer()(session.text).offset_mapping  # one (char, char + 1) per byte token
    events = session.events()
    assert len(events) == session.stats().events > 20
    assert {e.source_id for e in events} == {"doc-a", "doc-b", None}
    for i, event in enumerate(events):
        assert event.event_id == i
        assert event.size == event.token_end - event.token_start > 0
        assert (event.char_start, event.char_end) == (
            offsets[event.token_start][0],
            offsets[event.token_end - 1][1],
        )
        assert event.text == session.text[event.char_start : event.char_end]
        assert event.source_id == _expected_source(event.token_start, bounds)
        raw = bytes(session.token_ids[event.token_start : event.token_end])
        if raw.isascii():
            assert event.text == raw.decode()


def test_retrieve_reports_the_same_spans_as_events(sourced) -> None:
    session, bounds = sourced
    events = session.events()
    hits = session.retrieve("grey café skies", k=4)
    assert len(hits) == 4
    assert len({h.event_id for h in hits}) == 4
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for hit in hits:
        event = events[hit.event_id]
        assert (hit.token_start, hit.token_end, hit.char_start, hit.char_end) == (
            event.token_start,
            event.token_end,
            event.char_start,
            event.char_end,
        )
        assert hit.text == event.text == session.text[hit.char_start : hit.char_end]
        assert hit.source_id == event.source_id == _expected_source(hit.token_start, bounds)
    assert len(session.retrieve("cat", k=10_000)) == len(events)


def test_retrieve_changes_nothing(engine) -> None:
    """Retrieval is a probe: a twin session that never retrieved computes the same logits afterwards."""
    ids, more = random_ids(500, seed=6), random_ids(40, seed=7)
    probed, twin = engine.session(), engine.session()
    for session in (probed, twin):
        session.feed(ids)
    before = probed.stats()
    probed.retrieve("the cat", k=3)
    after = probed.stats()
    fields = ("tokens", "tokens_computed", "events", "window_tokens", "pending_tokens", "cpu_bytes")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    assert probed.token_ids == twin.token_ids
    torch.testing.assert_close(probed.forward(more), twin.forward(more), rtol=0, atol=0)


def test_token_id_input_with_source(engine) -> None:
    session = engine.session()
    session.feed("header ", source_id="h")
    session.feed(list(b"plain ascii ids " * 20), source_id="ids")
    assert session.text == "header " + "plain ascii ids " * 20
    for event in session.events():
        assert event.text == session.text[event.char_start : event.char_end]
        assert event.source_id == ("h" if event.token_start < 7 else "ids")


# ------------------------------------------------------------------------------------------ truncate


def test_truncate_inside_the_window(engine) -> None:
    session = engine.session()
    text = prose(300, seed=8)
    session.feed(text)
    original = session.token_ids
    n = len(original) - 10
    assert n > session.timeline.window_start
    session.truncate(n)
    assert session.token_ids == original[:n]
    assert session.text == ByteTokenizer().decode(original[:n])
    assert_memory_consistent(session)
    session.feed(" more text")
    assert session.token_ids == original[:n] + list(b" more text")
    session.generate(max_new_tokens=4)
    assert_memory_consistent(session)


def test_generate_right_after_truncate_continues_from_the_cut(make_engine) -> None:
    """truncate() is for a history that diverged: generating from the cut must work, and (nothing evicted)
    match a session that only ever saw the kept prefix."""
    engine = make_engine(n_local=128)
    ids = random_ids(80, seed=9)
    cut, fresh = engine.session(), engine.session()
    cut.feed(ids)
    cut.truncate(50)
    fresh.feed(ids[:50])
    assert cut.generate(max_new_tokens=6) == fresh.generate(max_new_tokens=6)
    assert cut.token_ids == fresh.token_ids


def _truncation_points(session) -> list[int]:
    """Inside the init block, mid-event, on an event boundary (all before the window)."""
    events = session.timeline.events
    middle = events[len(events) // 2]
    assert middle[1] - middle[0] >= 2
    return [2, middle[0] + 1, middle[0]]


@pytest.mark.parametrize("where", ["init", "mid-event", "boundary"])
def test_truncate_into_evicted_events(engine, where) -> None:
    text = prose(600, seed=10, ascii_only=True)
    ids = list(text.encode())
    session = engine.session()
    session.feed(text)
    n = dict(zip(["init", "mid-event", "boundary"], _truncation_points(session), strict=True))[where]
    assert n < session.timeline.window_start
    session.truncate(n)
    assert session.token_ids == ids[:n]
    assert session.text == text[:n]
    assert all(stop <= n for _, stop in session.timeline.events)
    assert session.stats().tokens == n
    assert_memory_consistent(session)
    session.feed(text[n:])
    assert session.token_ids == ids and session.text == text
    assert_memory_consistent(session)
    assert session.timeline.init_len == engine.config.n_init
    session.generate(max_new_tokens=3)
    assert_memory_consistent(session)


def test_cut_to_at_most_n_local_tokens_continues_like_a_session_that_read_only_them(make_engine) -> None:
    """When the kept tokens fit in n_local, init and every event go back into the window: the session is
    then the one that only read the kept prefix (event K/V kept in fp32 here, so exactly that one)."""
    engine = make_engine(n_local=64, offload_dtype="float32")
    ids = random_ids(300, seed=11)
    cut, fresh = engine.session(), engine.session()
    cut.feed(ids)
    assert cut.timeline.events and cut.timeline.init_len
    cut.truncate(48)
    assert (cut.timeline.init_len, cut.timeline.events, cut.timeline.window_start) == (0, [], 0)
    assert_memory_consistent(cut)
    fresh.feed(ids[:48])
    assert cut.generate(max_new_tokens=6) == fresh.generate(max_new_tokens=6)
    assert cut.token_ids == fresh.token_ids


def test_cut_deep_into_memory_refills_the_window_with_the_last_events(make_engine) -> None:
    """A cut far behind the window does not leave it empty: the last whole events that fit in n_local
    return to it, keys and values unchanged, and the session reads on from there."""
    engine = make_engine(n_local=64, offload_dtype="float32")
    session = engine.session()
    session.feed(random_ids(600, seed=12))
    events = list(session.timeline.events)
    last = len(events) // 2
    end = events[last][1]
    first = min(i for i in range(last + 1) if end - events[i][0] <= 64)
    assert first > 0  # some events stay in memory
    returned = [
        (
            torch.cat(list(layer.events_k)[first : last + 1], dim=2),
            torch.cat(list(layer.events_v)[first : last + 1], dim=2),
        )
        for layer in session.layers
    ]
    session.truncate(end + 1)  # memory keeps `end` tokens; the last one is recomputed when reading on
    assert session.timeline.events == events[:first]
    assert session.timeline.window_start == events[first][0]
    for layer, (keys, values) in zip(session.layers, returned, strict=True):
        assert layer.length == end - events[first][0]
        assert torch.equal(layer.k_raw[:, :, : layer.length], keys)
        assert torch.equal(layer.v[:, :, : layer.length], values)
    assert_memory_consistent(session)
    session.feed(random_ids(200, seed=13))
    assert_memory_consistent(session)


def test_a_cut_keeps_the_device_copies_of_the_events_it_leaves_unchanged(make_engine) -> None:
    engine = make_engine(device_cache_events=64)
    session = engine.session()
    session.feed(random_ids(600, seed=14))
    events = session.timeline.events
    session.truncate(events[len(events) // 2][0] + 2)  # mid-event: that event is cut short
    kept = len(session.timeline.events)
    for layer in session.layers:
        assert layer._cache, "the cut dropped the device copies of events it did not change"
        for event, (keys, values) in layer._cache.items():
            assert event < kept
            assert torch.equal(keys, layer.events_k[event].to(keys.dtype))
            assert torch.equal(values, layer.events_v[event].to(values.dtype))
    session.feed(random_ids(100, seed=15))
    assert_memory_consistent(session)


def test_truncate_inside_generated_tokens(engine) -> None:
    session = engine.session()
    fed = session.feed(PROMPT)
    session.generate(max_new_tokens=6)
    total = len(session.token_ids)
    session.truncate(total - 1)  # drops only the pending token
    assert session.stats().pending_tokens == 0
    assert session.token_ids == session.timeline.token_ids
    session.truncate(fed)
    assert session.token_ids == list(PROMPT.encode()) and session.text == PROMPT
    session.feed("x")
    assert session.text == PROMPT + "x"


# ------------------------------------------------------------------------------------------ checkpoints


def _state(session) -> tuple:
    """Everything that decides what a session does next, as comparable values."""
    timeline = session.timeline
    layers = [
        (
            layer.init_k.clone(),
            layer.k_raw[:, :, : layer.length].clone(),
            layer.k_rot[:, :, : layer.length].clone(),
            layer.v[:, :, : layer.length].clone(),
            layer.mass[: layer.length].clone(),
            layer._selection,
            None if layer._query_sum is None else layer._query_sum.clone(),
            None if layer.corpus_query_sum is None else layer.corpus_query_sum.clone(),
        )
        for layer in session.layers
    ]
    scalars = (session.token_ids, session.text, timeline.events, timeline.init_len, timeline.window_start)
    return scalars, timeline.surprise.clone(), timeline.boundary.clone(), layers


def _assert_same_state(got: tuple, expected: tuple) -> None:
    def same(a, b) -> bool:  # bitwise, NaN (unknown surprise) equal to NaN
        if not isinstance(a, torch.Tensor):
            return a == b
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=0, atol=0, equal_nan=True)

    assert got[0] == expected[0]
    assert same(got[1], expected[1]) and same(got[2], expected[2])
    for layer_got, layer_expected in zip(got[3], expected[3], strict=True):
        assert all(same(a, b) for a, b in zip(layer_got, layer_expected, strict=True))


def test_rewind_returns_exactly_to_the_checkpoint_and_answers_the_same_again(engine) -> None:
    """The same question after rewinding gets the same greedy answer and the same retrieval, although
    question and answer pushed part of the checkpoint's window out as events (a truncate back to the
    same length would keep those as events)."""
    session = engine.session()
    session.feed(prose(400, seed=20))
    before = _state(session)
    checkpoint = session.checkpoint()
    first = session.generate("What did the cat do? " * 3, max_new_tokens=40)
    assert len(session.timeline.events) > checkpoint.events  # the question pushed events out
    hits = session.retrieve("the quiet engines", k=3)
    session.rewind(checkpoint)
    _assert_same_state(_state(session), before)
    assert_memory_consistent(session)
    assert session.generate("What did the cat do? " * 3, max_new_tokens=40) == first
    assert session.retrieve("the quiet engines", k=3) == hits
    session.rewind(checkpoint)  # a checkpoint serves any number of rewinds
    _assert_same_state(_state(session), before)


def test_rewind_restores_pending_tokens_and_drops_later_checkpoints(engine) -> None:
    session = engine.session()
    session.generate(PROMPT, max_new_tokens=5)
    assert session.stats().pending_tokens == 1
    checkpoint = session.checkpoint()
    before = _state(session)
    session.feed(" and more")
    later = session.checkpoint()
    session.generate(max_new_tokens=5)
    session.rewind(checkpoint)
    _assert_same_state(_state(session), before)
    assert session.stats().pending_tokens == 1
    with pytest.raises(emllm.StaleCheckpointError):
        session.rewind(later)  # its tokens were cut away by the rewind


def test_a_cut_below_a_checkpoint_makes_it_stale(engine) -> None:
    session, other = engine.session(), engine.session()
    session.feed(prose(300, seed=21))
    checkpoint = session.checkpoint()
    with pytest.raises(emllm.StaleCheckpointError, match="another session"):
        other.rewind(checkpoint)
    session.feed(" more")
    session.truncate(checkpoint.tokens)  # a cut down to its length keeps it
    session.rewind(checkpoint)
    session.truncate(checkpoint.tokens - 1)
    with pytest.raises(emllm.StaleCheckpointError):
        session.rewind(checkpoint)
    assert session.token_ids == list(prose(300, seed=21).encode())[:-1]  # the failed rewind changed nothing
    fresh = session.checkpoint()
    session.reset()
    with pytest.raises(emllm.StaleCheckpointError):
        session.rewind(fresh)


def test_a_cut_whose_window_refill_takes_checkpointed_events_makes_it_stale(make_engine) -> None:
    """A cut at the checkpoint's length but behind the window refills the window with events, some of
    which the checkpoint shares with the session: it can no longer return to them."""
    engine = make_engine(n_local=64)
    session = engine.session()
    session.feed(random_ids(300, seed=22))
    checkpoint = session.checkpoint()
    session.feed(random_ids(200, seed=23))
    session.truncate(checkpoint.tokens + 1)
    assert len(session.timeline.events) < checkpoint.events
    with pytest.raises(emllm.StaleCheckpointError):
        session.rewind(checkpoint)


# ------------------------------------------------------------------------------------------ threads


def _feed_and_generate(session, text: str) -> tuple[str, list[int]]:
    session.feed(text)
    return session.generate(max_new_tokens=8), session.token_ids


def test_threads_on_different_sessions_match_sequential(engine) -> None:
    texts = [prose(250, seed=11), prose(250, seed=12)]
    sequential = [_feed_and_generate(engine.session(), t) for t in texts]
    sessions = [engine.session(), engine.session()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(_feed_and_generate, sessions, texts))
    assert threaded == sequential


def test_threads_on_one_session_queue_up(engine) -> None:
    session = engine.session()
    texts = [prose(150, seed=13), prose(170, seed=14)]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(text: str) -> None:
        try:
            start.wait()
            session.feed(text)
            session.generate(max_new_tokens=5)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    ids = session.token_ids
    fed = sum(len(t.encode()) for t in texts)
    generated = len(ids) - fed
    assert 2 <= generated <= 10 and (generated == 10 or EOS in ids)
    assert session.stats().tokens == len(ids)
    for text in texts:  # each feed ran whole, under the session lock
        encoded = text.encode()
        assert any(bytes(ids[i : i + len(encoded)]) == encoded for i in range(len(ids) - len(encoded) + 1))
    assert_memory_consistent(session)


def _letters_only(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Every generated token is a lowercase letter, so every token is a piece of its own."""
    masked = torch.full_like(logits, float("-inf"))
    masked[97:123] = logits[97:123]
    return masked


def _in_thread(function, *args):
    """function(*args) on a new daemon thread: a call that never returns fails the test, not pytest."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # re-raised here
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"{function} did not return within 30 s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _feed_in_background(session, text: str) -> threading.Event:
    done = threading.Event()

    def feed() -> None:
        session.feed(text)
        done.set()

    threading.Thread(target=feed, daemon=True).start()  # daemon: a session left locked must not hang pytest
    return done


def test_a_stream_closed_from_another_thread_releases_the_session(engine) -> None:
    """A stream holds the session across its yields; closing it elsewhere (a worker thread, the garbage
    collector) used to raise 'cannot release un-acquired lock' and leave the session locked for good."""
    session = engine.session()
    session.feed(prose(100, seed=21, ascii_only=True))
    stream = session.stream(PROMPT, max_new_tokens=20, logits_processor=_letters_only)
    first = next(stream)
    _in_thread(stream.close)  # raised RuntimeError before
    assert _feed_in_background(session, " after").wait(timeout=30), "the session stayed locked"
    assert session.text == prose(100, seed=21, ascii_only=True) + PROMPT + first + " after"
    assert session.text == ByteTokenizer().decode(session.token_ids)
    assert_memory_consistent(session)


def test_a_stream_resumed_on_other_threads_keeps_others_waiting_until_it_ends(engine) -> None:
    session = engine.session()
    session.feed(prose(100, seed=22, ascii_only=True))
    stream = session.stream(PROMPT, max_new_tokens=8, logits_processor=_letters_only)
    pieces = [next(stream)]
    fed = _feed_in_background(session, " after")
    assert not fed.wait(timeout=0.5), "a feed from another thread ran inside an open stream"
    pieces.append(_in_thread(next, stream))
    pieces += _in_thread(list, stream)  # ends on a third thread
    assert fed.wait(timeout=30), "the session stayed locked"
    assert len(pieces) == 8
    assert session.text == prose(100, seed=22, ascii_only=True) + PROMPT + "".join(pieces) + " after"
    assert_memory_consistent(session)


def test_a_logits_processor_may_call_the_session_while_it_streams(engine) -> None:
    """The thread running a stream's step holds the session, so it may re-enter it (here: stats())."""
    session = engine.session()
    seen: list[int] = []

    def count_tokens(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(session.stats().tokens)
        return _letters_only(generated, logits)

    stream = session.stream(PROMPT, max_new_tokens=4, logits_processor=count_tokens)
    pieces = [next(stream), _in_thread(next, stream)]  # the second step runs on another thread
    pieces += list(stream)
    assert len(pieces) == 4 and seen == [len(PROMPT) + i for i in range(4)]


# ------------------------------------------------------------------------------------------ stats


def test_stats_fields(engine) -> None:
    session = engine.session()
    session.feed(random_ids(300, seed=15))
    session.generate(max_new_tokens=5)
    generated = len(session.token_ids) - 300
    stats = session.stats()
    assert stats.tokens_computed == 300 + generated - 1 and stats.pending_tokens == 1
    session.feed(random_ids(20, seed=16))
    stats = session.stats()
    timeline = session.timeline
    sizes = [stop - start for start, stop in timeline.events]
    assert stats.session_id == session.id
    assert stats.tokens == stats.tokens_computed == len(session.token_ids) == 320 + generated
    assert stats.events == len(session.events()) == len(sizes)
    assert stats.init_tokens == 4 and stats.window_tokens == timeline.window_len
    assert stats.mean_event_size == pytest.approx(sum(sizes) / len(sizes))
    assert stats.memory_distance == 64 + 16 and stats.max_local_distance < stats.memory_distance
    assert stats.cpu_bytes > 0 and stats.device_bytes > 0 and stats.disk_bytes == 0
    assert set(stats.as_dict()) >= {"tokens", "tokens_computed", "events", "device_bytes", "cpu_bytes"}
    session.truncate(100)
    assert session.stats().tokens_computed == stats.tokens_computed  # work done stays counted
    session.feed(random_ids(10, seed=17))
    # truncating below the computed tokens recomputes the new last token (its next-token logits were
    # not kept), then the 10 new ones
    assert session.stats().tokens_computed == stats.tokens_computed + 11


# ------------------------------------------------------------------------------------------ history sync


def test_sync_reuses_the_prefix_and_computes_only_the_suffix(engine) -> None:
    history = random_ids(150, seed=11)
    session = engine.session()
    assert session.sync(history[:100]) == 0
    first = session.generate(max_new_tokens=3)
    assert first
    grown = session.token_ids + history[100:150]
    computed_before = session.stats().tokens_computed
    reused = session.sync(grown)
    assert reused == len(grown) - 50
    assert session.token_ids == grown
    session.generate(max_new_tokens=1)
    # the 50 new tokens plus the lazily computed last generated token; nothing before it again
    assert session.stats().tokens_computed - computed_before == 51
    assert session.stats().tokens_reused == reused


def test_sync_to_a_diverged_history_keeps_memory_consistent(engine) -> None:
    base, other = random_ids(120, seed=12), random_ids(40, seed=13)
    session = engine.session()
    session.feed(base)
    session.generate(max_new_tokens=4)
    diverged = base[:50] + other  # cuts into evicted events
    assert session.sync(diverged) == 50
    assert session.token_ids == diverged
    assert len(session.generate(max_new_tokens=6)) > 0
    assert_memory_consistent(session)


def test_sync_to_a_diverged_history_matches_a_fresh_session(make_engine) -> None:
    """Nothing evicted (window larger than the text): the synced session equals one that saw only the
    new history."""
    engine = make_engine(n_local=256)
    base, other = random_ids(120, seed=12), random_ids(40, seed=13)
    session = engine.session()
    session.feed(base)
    session.generate(max_new_tokens=4)
    diverged = base[:90] + other
    assert session.sync(diverged) == 90
    assert session.token_ids == diverged
    fresh = engine.session()
    fresh.feed(diverged)
    assert session.generate(max_new_tokens=6) == fresh.generate(max_new_tokens=6)


def test_sync_refuses_empty_and_bad_ids_without_losing_anything(engine) -> None:
    session = engine.session()
    session.feed("hello there")
    before = (session.token_ids, session.text)
    with pytest.raises(emllm.EmptyInputError):
        session.sync([])
    with pytest.raises(ValueError, match="vocabulary"):
        session.sync([*session.token_ids, 10_000])
    assert (session.token_ids, session.text) == before


def test_logits_processor_constrains_every_step(engine) -> None:
    allowed = torch.tensor([ord(c) for c in "ab"])
    seen_lengths = []

    def only_a_or_b(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen_lengths.append(len(generated))
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    session = engine.session()
    out = session.generate(PROMPT, max_new_tokens=8, logits_processor=only_a_or_b)
    assert len(out) == 8 and set(out) <= {"a", "b"}
    assert seen_lengths == list(range(8))


def test_passages_and_quote_give_events_with_their_neighbours_in_time_order(engine) -> None:
    session = engine.session("passages")
    session.feed(prose(900, seed=7))
    events = session.events()
    assert len(events) >= 8

    def text(first: int, last: int) -> str:
        return " ".join(session.text[events[first].char_start : events[last].char_end].split())

    assert session.passages([5]) == [text(4, 6)]
    assert session.passages([6, 2], neighbours=0) == [text(2, 2), text(6, 6)]  # time order
    assert session.passages([2, 4]) == [text(1, 5)]  # overlapping neighbourhoods merge
    assert session.passages([0, len(events) - 1]) == [text(0, 1), text(len(events) - 2, len(events) - 1)]
    assert session.quote([5]) == "\n\nPassages:\n- " + text(4, 6)
    assert session.quote([]) == ""


def _same_state(a, b, path: str = "") -> list[str]:
    """Where two states differ (tensors compared exactly, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _same_state(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = (
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))
        )
        return [] if same else [path]
    return [] if a == b else [path]


def test_a_state_dict_loaded_into_fresh_sessions_continues_exactly(engine) -> None:
    """state_dict / load_state_dict round trip: each fresh session holds the same state and continues as
    the original (the first load once left its representatives uninitialised)."""
    session = engine.session()
    session.feed(prose(900, seed=40))
    session.generate(PROMPT, max_new_tokens=3)
    state = session.state_dict()
    twins = [engine.session() for _ in range(2)]
    for twin in twins:
        twin.load_state_dict(state)
        assert _same_state(twin.state_dict(), state) == []
        assert torch.equal(twin.layers[0].reprs, session.layers[0].reprs)
    expected = session.generate(max_new_tokens=8)
    assert [twin.generate(max_new_tokens=8) for twin in twins] == [expected, expected]
