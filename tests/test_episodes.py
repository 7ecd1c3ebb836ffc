"""Episode bookkeeping of a session: init / events / window partition the token stream, every layer agrees
with the timeline, event sizes obey the config, positions stay inside the model's trained range, and the
device tier stays flat while the CPU tier grows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from emllm import EMLLMConfig
from emllm.episodes import Timeline, refine_spans

SMALL = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_memory_consistent(session) -> None:
    """Every computed token is in exactly one of init, an event, the window; every layer agrees."""
    timeline = session.timeline
    n = timeline.num_tokens
    init_len, events, window_start = timeline.init_len, timeline.events, timeline.window_start
    owners = torch.zeros(n, dtype=torch.long)
    owners[:init_len] += 1
    for start, stop in events:
        assert 0 <= start < stop <= n, f"bad event span {(start, stop)} in {n} tokens"
        owners[start:stop] += 1
    owners[window_start:] += 1
    assert bool((owners == 1).all()), f"tokens not covered exactly once: {torch.nonzero(owners != 1)[:5]}"
    # contiguous and ordered: init, then each event right after the previous, then the window
    edge = init_len
    for start, stop in events:
        assert start == edge, f"event {(start, stop)} does not start where the previous part ended ({edge})"
        edge = stop
    assert window_start == edge
    assert timeline.window_len == n - window_start
    assert len(timeline.surprise) == n and len(timeline.boundary) == n
    for layer in session.layers:
        assert len(layer.events_k) == len(layer.events_v) == layer.reprs.shape[0] == len(events)
        for (start, stop), k, v in zip(events, layer.events_k, layer.events_v, strict=True):
            assert k.shape[2] == v.shape[2] == stop - start
        assert layer.init_k.shape[2] == layer.init_v.shape[2] == init_len
        assert layer.length == timeline.window_len
    assert session.stats().events == len(events)


# ------------------------------------------------------------------------------------------ partition


def test_partition_holds_after_every_feed(make_engine) -> None:
    engine = make_engine()
    config = engine.config
    session = engine.session("s")
    ids = random_ids(2000)
    sizes = torch.randint(1, 41, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    pos = 0
    for size in sizes:
        if pos >= len(ids):
            break
        session.feed(ids[pos : pos + size])
        pos = min(pos + size, len(ids))
        assert_memory_consistent(session)
        assert session.timeline.window_len <= config.n_local  # eviction runs after every chunk
        assert session.timeline.window_len <= config.n_local + config.chunk_size
    assert session.token_ids == ids[:pos]
    assert session.timeline.init_len == config.n_init
    assert len(session.timeline.events) > 50
    assert session.stats().tokens == pos


def test_no_eviction_while_window_has_room(make_engine) -> None:
    session = make_engine().session("s")
    session.feed(random_ids(64))
    assert session.timeline.init_len == 0 and session.timeline.events == []
    assert session.timeline.window_len == 64
    session.feed(random_ids(1, seed=5))  # one past n_local: the oldest token joins the init block
    assert session.timeline.init_len == 1 and session.timeline.events == []
    assert session.timeline.window_len == 64
    session.feed(random_ids(3, seed=6))
    assert session.timeline.init_len == 4 and session.timeline.events == []
    session.feed(random_ids(1, seed=7))  # init is full: now an event leaves
    assert session.timeline.init_len == 4 and len(session.timeline.events) >= 1
    assert_memory_consistent(session)


@pytest.mark.parametrize("refinement", ["none", "modularity", "conductance"])
def test_event_sizes_stay_within_min_and_max(make_engine, refinement) -> None:
    """Refinement only moves boundaries between complete events: each keeps min_event_size..max_event_size."""
    engine = make_engine(refinement=refinement)
    session = engine.session("s")
    session.feed(random_ids(1000, seed=2))
    assert_memory_consistent(session)
    sizes = [stop - start for start, stop in session.timeline.events]
    assert len(sizes) > 20
    too_big = [s for s in sizes if s > engine.config.max_event_size]
    assert not too_big, f"{refinement}: events larger than max_event_size=16: {too_big}"
    too_small = [s for s in sizes if s < engine.config.min_event_size]
    assert not too_small, f"{refinement}: events smaller than min_event_size=4: {too_small}"


class _KeyStub:
    """Stands in for a LayerMemory: refine_spans only reads window keys."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys  # (Hkv, n, D)

    def window_keys(self, start: int, stop: int) -> torch.Tensor:
        return self.keys[:, start:stop]


@pytest.mark.parametrize("refinement", ["modularity", "conductance"])
def test_refine_spans_never_exceeds_max_event_size(refinement) -> None:
    """Two max-size events whose keys say 'the first 28 tokens belong together': the refined boundary
    may move, but neither event may grow past max_event_size."""
    config = EMLLMConfig(**SMALL, refinement=refinement)
    keys = torch.zeros(1, 32, 4)
    keys[0, :28, 0] = 1.0
    keys[0, 28:, 1] = 1.0
    layers = [_KeyStub(keys), _KeyStub(keys)]
    refined = refine_spans([(0, 16), (16, 32)], layers, config)
    assert refined[0][0] == 0 and refined[-1][1] == 32 and len(refined) == 2
    assert refined[0][1] == refined[1][0]
    sizes = [stop - start for start, stop in refined]
    assert max(sizes) <= config.max_event_size, f"refined spans {refined} exceed max_event_size=16"
    assert min(sizes) >= config.min_event_size


def test_fixed_segmentation_gives_exact_blocks(make_engine) -> None:
    engine = make_engine(segmentation="fixed", block_size=16, refinement="modularity")
    session = engine.session("s")
    session.feed(random_ids(1000, seed=4))
    assert_memory_consistent(session)
    events = session.timeline.events
    assert len(events) == (1000 - 4 - session.timeline.window_len) // 16
    assert all(stop - start == 16 for start, stop in events)


def test_events_store_the_window_keys_they_left_with(make_engine) -> None:
    """An event's stored keys are the raw keys the layer computed for those tokens (fp32 offload: exact)."""
    engine = make_engine(offload_dtype="float32")
    ids = random_ids(200, seed=6)
    whole = engine.session("whole")
    whole.feed(ids)
    start, stop = whole.timeline.events[0]
    reference = engine.session("ref")
    reference.feed(ids[:stop])  # the same tokens, still in its window
    for layer_whole, layer_ref in zip(whole.layers, reference.layers, strict=True):
        offset = start - reference.timeline.window_start
        expected = layer_ref.k_raw[:, :, offset : offset + stop - start]
        torch.testing.assert_close(layer_whole.events_k[0], expected)


# ------------------------------------------------------------------------------------------ token records


def test_token_records_grow_in_place_not_by_copying_the_history(make_engine) -> None:
    """Each chunk used to rebuild the surprise and boundary records with torch.cat (the whole history
    copied per chunk: quadratic, and RSS far above stats() on long texts); they now grow by doubling."""
    session = make_engine().session()
    session.feed(random_ids(64))
    moves, chunks = 0, 200
    for i in range(chunks):
        held = session.timeline.surprise, session.timeline.boundary  # views of the records so far
        session.feed(random_ids(16, seed=i))
        now = session.timeline.surprise, session.timeline.boundary
        moves += sum(a.data_ptr() != b.data_ptr() for a, b in zip(held, now, strict=True))
        for before, after in zip(held, now, strict=True):
            torch.testing.assert_close(after[: len(before)], before, rtol=0, atol=0, equal_nan=True)
    assert moves <= 2 * 4, f"the records moved {moves} times in {chunks} chunks"  # 1024 -> 2048 -> 4096
    assert_memory_consistent(session)


def test_event_sizes_follow_every_change_of_the_events(make_engine) -> None:
    """The sizes are kept incrementally (a rebuild per eviction was quadratic): cuts, refills and rewinds
    must leave them equal to the events' spans."""
    session = make_engine().session()

    def check() -> None:
        want = torch.tensor([b - a for a, b in session.timeline.events], dtype=torch.long)
        assert torch.equal(session.timeline.event_sizes(), want)
        assert torch.equal(session._event_sizes, want)

    session.feed(random_ids(600))
    check()
    checkpoint = session.checkpoint()
    session.feed(random_ids(300, seed=1))
    check()
    session.rewind(checkpoint)
    check()
    cut = session.timeline.events[10][0] + 3  # inside an event: it is shortened, the window refilled
    session.truncate(cut)
    check()
    session.feed(random_ids(200, seed=2))
    check()
    session.truncate(5)
    check()
    assert_memory_consistent(session)


def test_assigned_token_records_are_copied_and_grow_after_a_cut() -> None:
    """What a restore assigns is copied in: later appends never write into the caller's tensors."""
    config = EMLLMConfig(**SMALL)
    timeline = Timeline()
    surprise, boundary = torch.arange(10.0), torch.zeros(10, dtype=torch.bool)
    timeline.token_ids, timeline.surprise, timeline.boundary = list(range(10)), surprise, boundary
    timeline.events = [(0, 4), (4, 6)]
    assert timeline.event_sizes().tolist() == [4, 2]
    timeline.window_start = 6
    assert timeline.truncate(5) == (2, 1)
    assert timeline.event_sizes().tolist() == [4, 1]
    timeline.append([1, 2, 3], torch.tensor([7.0, 8.0, 9.0]), config)
    assert timeline.surprise.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 9.0]
    assert len(timeline.boundary) == timeline.num_tokens == 8
    assert surprise.tolist() == [float(i) for i in range(10)] and not boundary.any()


# ------------------------------------------------------------------------------------------ positions


def test_positions_stay_inside_a_small_trained_context(make_engine) -> None:
    engine = make_engine(model=tiny_model(max_positions=128))
    assert engine.rotary.length == engine.config.memory_distance + 1
    with pytest.raises(IndexError):  # the table refuses positions it does not hold
        engine.rotary.rotate(torch.zeros(1, 2, 2, 16), engine.config.memory_distance)
    session = engine.session("s")
    session.feed(random_ids(2000, seed=7))
    stats = session.stats()
    assert stats.events > 100
    assert stats.max_local_distance < stats.memory_distance < 128
    session.generate(max_new_tokens=60)  # decode steps, 1-token chunks, after many evictions
    stats = session.stats()
    assert stats.max_local_distance < stats.memory_distance < 128
    assert_memory_consistent(session)


def test_long_prompt_after_eviction_stays_inside_rotary_table(make_engine) -> None:
    """A prompt's query tail (query_chunk=32 by default) runs as its own chunk; with chunk_size=16 that chunk
    must still keep every local distance below memory_distance."""
    engine = make_engine(model=tiny_model(max_positions=128))
    session = engine.session("s")
    session.feed(random_ids(500, seed=8))
    session.generate(random_ids(100, seed=9), max_new_tokens=4)
    stats = session.stats()
    assert stats.max_local_distance < stats.memory_distance < 128
    assert_memory_consistent(session)


# ------------------------------------------------------------------------------------------ memory tiers


def _repr_bytes(session) -> int:
    return sum(layer.reprs.numel() * layer.reprs.element_size() for layer in session.layers)


def _event_bytes(stats, engine, element_size: int = 2) -> int:
    """Bytes of the keys and values of every evicted event token, all layers (from the stats alone)."""
    tokens = stats.tokens - stats.init_tokens - stats.window_tokens - stats.pending_tokens
    return 2 * tokens * engine.num_kv_heads * engine.head_dim * element_size * engine.num_layers


def test_device_tier_flat_cpu_tier_grows(make_engine) -> None:
    engine = make_engine(device_cache_events=0)
    session = engine.session("s")
    ids = random_ids(4000, seed=10)
    session.feed(ids[:1000])
    first = session.stats()
    first_reprs = _repr_bytes(session)
    session.feed(ids[1000:])
    last = session.stats()
    # everything on the device but the one fp32 representative key per event is exactly flat
    assert last.device_bytes - _repr_bytes(session) == first.device_bytes - first_reprs
    per_event = 4 * engine.num_kv_heads * engine.head_dim * engine.num_layers
    assert _repr_bytes(session) == last.events * per_event
    # the CPU tier holds every evicted token's keys and values in bf16, so it grows with the stream
    assert first.cpu_bytes == _event_bytes(first, engine)
    assert last.cpu_bytes == _event_bytes(last, engine)
    ratio = last.cpu_bytes / first.cpu_bytes
    evicted_ratio = (4000 - 4 - last.window_tokens) / (1000 - 4 - first.window_tokens)
    assert ratio == pytest.approx(evicted_ratio, rel=1e-9)
    assert 3.5 < ratio < 4.5


def test_device_cache_is_bounded(make_engine) -> None:
    engine = make_engine(device_cache_events=4)
    session = engine.session("s")
    ids = random_ids(2000, seed=11)
    session.feed(ids[:500])
    first = session.stats().device_bytes - _repr_bytes(session)
    session.feed(ids[500:])
    last = session.stats().device_bytes - _repr_bytes(session)
    config = engine.config
    largest = max(stop - start for start, stop in session.timeline.events)
    block = 2 * largest * engine.num_kv_heads * engine.head_dim * 4  # fp32 k+v of the largest event
    assert last <= first + config.device_cache_events * block * engine.num_layers
    assert all(len(layer._cache) <= config.device_cache_events for layer in session.layers)


@pytest.mark.parametrize(
    ("offload_dtype", "dtype"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)]
)
def test_offload_dtype(make_engine, offload_dtype, dtype) -> None:
    session = make_engine(offload_dtype=offload_dtype).session("s")
    session.feed(random_ids(300, seed=12))
    layer = session.layers[0]
    assert layer.events_k, "no events were stored"
    for tensor in (layer.events_k[0], layer.events_v[0], layer.events_k[-1]):
        assert tensor.dtype == dtype and tensor.device.type == "cpu"
    assert layer.k_raw.dtype == torch.float32  # the window stays in the compute dtype
