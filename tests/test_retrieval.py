"""Tests for emllm.retrieval: the similarity + contiguity selection under a token budget, the grouped query
used for scoring, and retrieval of a planted event through a layer's memory."""

from __future__ import annotations

import pytest
import torch
from emllm.memory import ChunkContext
from emllm.positions import apply_rotary
from emllm.retrieval import group_query_for_scoring, relevance_scores, select_events
from hypothesis import given, settings
from hypothesis import strategies as st


def _check_valid(chosen: torch.Tensor, sizes: torch.Tensor, budget: int) -> list[int]:
    assert chosen.dtype == torch.long and chosen.dim() == 1
    ids = chosen.tolist()
    assert ids == sorted(set(ids)), f"not sorted and unique: {ids}"
    assert all(0 <= i < len(sizes) for i in ids), f"out of range: {ids}"
    used = int(sizes[chosen].sum()) if ids else 0
    assert used <= budget, f"selected {used} tokens > budget {budget}: {ids}"
    return ids


# ---------------------------------------------------------------- select_events


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    num_events=st.integers(min_value=0, max_value=20),
    budget=st.integers(min_value=0, max_value=120),
    ratio=st.floats(min_value=0.0, max_value=0.95),
)
def test_select_events_invariants(data, num_events, budget, ratio) -> None:
    """Within budget, sorted, unique; the best event is in whenever it fits; nothing left out that fits."""
    sizes = torch.tensor(data.draw(st.lists(st.integers(1, 24), min_size=num_events, max_size=num_events)))
    finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    scores = torch.tensor(data.draw(st.lists(finite, min_size=num_events, max_size=num_events, unique=True)))
    chosen = select_events(scores, sizes.long(), budget, ratio)
    ids = _check_valid(chosen, sizes, budget)
    if num_events == 0 or budget == 0:
        assert ids == []
        return
    best = int(scores.argmax())
    if sizes[best] <= budget:
        assert best in ids, f"best event {best} (size {int(sizes[best])}) left out of {ids}"
    left = budget - int(sizes[chosen].sum())
    unfit = [i for i in range(num_events) if i not in ids and sizes[i] <= left]
    assert not unfit, f"events {unfit} still fit in the {left} tokens left over"


def test_select_events_planted_event() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(30, generator=g)
    sizes = torch.randint(4, 17, (30,), generator=g)
    scores[17] = 50.0
    chosen = select_events(scores, sizes, budget=40, contiguity_ratio=0.3)
    assert 17 in chosen.tolist()
    _check_valid(chosen, sizes, 40)


def test_select_events_similarity_buffer_is_top_by_score() -> None:
    """The best events that fit budget * (1 - ratio) are all taken, whatever their neighbours."""
    scores = torch.tensor([0.0, 9.0, 0.1, 0.2, 8.0, 0.3, 0.4, 7.0, 0.5, 0.6])
    sizes = torch.full((10,), 4)
    chosen = select_events(scores, sizes, budget=20, contiguity_ratio=0.4).tolist()  # 12 tokens: 3 events
    assert {1, 4, 7} <= set(chosen)
    assert len(chosen) == 5


def test_select_events_contiguity_includes_neighbours_of_top() -> None:
    scores = torch.tensor([5.0, 1.0, 9.0, 0.5, 4.0, 3.0, 6.0])
    sizes = torch.tensor([4, 4, 4, 4, 4, 4, 4])
    # similarity budget int(16 * 0.5) = 8 tokens: events 2 and 6; neighbours 1, 3 (of 2) fill the rest.
    chosen = select_events(scores, sizes, budget=16, contiguity_ratio=0.5).tolist()
    assert chosen == [1, 2, 3, 6]
    # Without a contiguity share the budget goes by score: 2, 6, 0, 4.
    assert select_events(scores, sizes, budget=16, contiguity_ratio=0.0).tolist() == [0, 2, 4, 6]


def test_select_events_contiguity_skips_neighbours_that_do_not_fit() -> None:
    scores = torch.tensor([0.0, 1.0, 9.0, 2.0, 0.0])
    sizes = torch.tensor([2, 20, 3, 2, 2])
    chosen = select_events(scores, sizes, budget=8, contiguity_ratio=0.5).tolist()
    assert 2 in chosen and 3 in chosen and 1 not in chosen
    _check_valid(torch.tensor(chosen), sizes, 8)


def test_select_events_recalled_events_rank_first() -> None:
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 0.0])
    sizes = torch.full((8,), 10)
    plain = select_events(scores, sizes, 20, 0.0).tolist()
    assert plain == [0, 1]
    assert select_events(scores, sizes, 20, 0.0, recall=(7,)).tolist() == [0, 7]
    assert select_events(scores, sizes, 20, 0.0, recall=(7, 5, 7)).tolist() == [5, 7]  # order, no repeats
    # with a contiguity share the recalled event brings its neighbours, like a top-scored one
    assert select_events(scores, sizes, 30, 0.5, recall=(4,)).tolist() == [3, 4, 5]


def test_select_events_edge_of_the_table() -> None:
    """Top event at index 0 or E-1: only the neighbour that exists is added."""
    sizes = torch.full((5,), 3)
    first = select_events(torch.tensor([9.0, 0.0, 1.0, 2.0, 3.0]), sizes, budget=6, contiguity_ratio=0.5)
    assert first.tolist() == [0, 1]
    last = select_events(torch.tensor([3.0, 2.0, 1.0, 0.0, 9.0]), sizes, budget=6, contiguity_ratio=0.5)
    assert last.tolist() == [3, 4]


@pytest.mark.parametrize("budget", [4, 9, 20, 1000])
def test_select_events_ratio_zero_fills_by_score(budget) -> None:
    g = torch.Generator().manual_seed(budget)
    scores = torch.randn(12, generator=g)
    sizes = torch.full((12,), 4)
    chosen = select_events(scores, sizes, budget, contiguity_ratio=0.0)
    k = min(budget // 4, 12)
    expected = sorted(torch.argsort(scores, descending=True)[:k].tolist())
    assert chosen.tolist() == expected


@pytest.mark.parametrize(
    ("scores", "sizes", "budget"),
    [
        (torch.empty(0), torch.empty(0, dtype=torch.long), 10),
        (torch.tensor([1.0, 2.0]), torch.tensor([3, 3]), 0),
        (torch.tensor([1.0, 2.0]), torch.tensor([3, 3]), -5),
        (torch.tensor([1.0, 2.0]), torch.tensor([8, 9]), 7),
    ],
)
def test_select_events_nothing_to_select(scores, sizes, budget) -> None:
    chosen = select_events(scores, sizes, budget, contiguity_ratio=0.3)
    assert chosen.dtype == torch.long and chosen.shape == (0,)


def test_select_events_accepts_low_precision_scores() -> None:
    scores = torch.tensor([0.5, 3.0, 1.0], dtype=torch.bfloat16)
    assert select_events(scores, torch.tensor([2, 2, 2]), 2, 0.0).tolist() == [1]


# ---------------------------------------------------------------- group_query_for_scoring


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_query_for_scoring_equals_sum_over_heads(groups) -> None:
    hkv, d, num_events = 2, 8, 6
    g = torch.Generator().manual_seed(groups)
    q_mean = torch.randn(1, hkv * groups, d, generator=g)
    reprs = torch.randn(num_events, hkv * d, generator=g)
    got = reprs @ group_query_for_scoring(q_mean, hkv)
    expected = torch.zeros(num_events, dtype=torch.float64)
    for e in range(num_events):
        per_kv = reprs[e].double().reshape(hkv, d)
        for h in range(hkv * groups):
            expected[e] += q_mean[0, h].double() @ per_kv[h // groups]
    diff = (got.double() - expected).abs()
    assert diff.max() < 1e-5, f"max diff {diff.max():.3e} (mean {diff.mean():.3e})"


def test_group_query_for_scoring_dtype_and_shape() -> None:
    out = group_query_for_scoring(torch.randn(1, 6, 4, dtype=torch.bfloat16), 3)
    assert out.dtype == torch.float32 and out.shape == (12,)


# ---------------------------------------------------------------- planted representative, end to end


def _query_scoring_as(direction: torch.Tensor, engine, c: int) -> torch.Tensor:
    """Raw queries (1,Hq,c,D) whose mean, rotated to memory_distance, puts each head on its KV head's slice
    of `direction` (Hkv*D,)."""
    hkv, d = engine.num_kv_heads, engine.head_dim
    hq = engine.model.config.num_attention_heads
    target = direction.reshape(hkv, d).repeat_interleave(hq // hkv, dim=0)  # (Hq, D)
    p = engine.config.memory_distance
    raw = apply_rotary(target, engine.rotary.cos[p], -engine.rotary.sin[p])  # inverse rotation
    assert torch.allclose(engine.rotary.rotate_at(raw, p), target, atol=1e-5)
    return raw[None, :, None, :].expand(1, hq, c, d).contiguous()


def test_relevance_scores_ignore_shared_components_and_key_length() -> None:
    """A component every representative shares does not change a score, and no representative's length
    can outweigh its direction: each score is the query's projection on a unit vector."""
    gen = torch.Generator().manual_seed(0)
    num_events, width = 12, 16
    reprs = torch.randn(num_events, width, generator=gen)
    own = reprs[7] - reprs.mean(dim=0)
    query = (own / own.norm()).reshape(1, 1, width)  # 1 query head over 1 KV head
    scores = relevance_scores(reprs, query, 1)
    assert int(scores.argmax()) == 7
    assert float(scores.max()) == pytest.approx(1.0)  # the query is exactly event 7's centred direction
    shifted = relevance_scores(reprs + 5.0 * torch.randn(width, generator=gen), query, 1)
    assert torch.allclose(shifted, scores, atol=1e-5)
    longer = reprs.clone()
    longer[3] = longer[3] * 100.0
    assert relevance_scores(longer, query, 1).abs().max() <= 1.0 + 1e-5
    assert relevance_scores(reprs[:1], query, 1).isfinite().all()  # one event: no direction, no NaN


def test_relevance_scores_over_many_slices_match_whole_centring() -> None:
    """Scores are centred slice by slice; across slice edges and under a large shared key offset (where
    expanding |r - m|^2 in fp32 loses digits) they equal centring all events at once in float64."""
    gen = torch.Generator().manual_seed(1)
    num_events, width = 2 * 1024 + 37, 24
    reprs = torch.randn(num_events, width, generator=gen) * 3 + 1000.0 * torch.randn(width, generator=gen)
    query = torch.randn(1, 2, width // 2, generator=gen)  # 2 query heads over 2 KV heads
    centred = reprs.double() - reprs.double().mean(dim=0)
    expected = centred @ group_query_for_scoring(query, 2).double() / centred.norm(dim=1)
    assert torch.allclose(relevance_scores(reprs, query, 2).double(), expected, atol=1e-4)


def test_planted_representative_is_retrieved(make_engine) -> None:
    engine = make_engine(n_init=4, n_local=64, n_mem=24, chunk_size=16, min_event_size=4, max_event_size=8)
    session = engine.session("plant")
    session.feed(torch.randint(0, 256, (224,), generator=torch.Generator().manual_seed(0)).tolist())
    sizes = session.timeline.event_sizes()
    num_events = len(sizes)
    assert num_events >= 8, f"too few events to test retrieval: {num_events}"
    planted = num_events // 2
    direction = torch.randn(engine.num_kv_heads * engine.head_dim, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    for layer in session.layers:
        assert layer.reprs.shape == (num_events, direction.numel())
        layer.reprs[planted] = 50.0 * direction

    for sign, check in ((1.0, "argmax"), (-1.0, "argmin")):
        q = _query_scoring_as(sign * direction, engine, c=4)
        context = ChunkContext(session.layers, engine.rotary, engine.config, sizes, probe=True)
        for layer in session.layers:
            keys, _ = layer._global_kv(q.to(engine.dtype), context)
            scores = context.probe_scores[layer.layer_idx]
            assert int(getattr(scores, check)()) == planted, f"layer {layer.layer_idx}: {check} {scores}"
            if sign < 0:
                continue
            config = engine.config
            chosen = select_events(scores, sizes, config.n_mem, config.contiguity_ratio).tolist()
            assert planted in chosen
            start = layer.init_k.shape[2] + int(sizes[[e for e in chosen if e < planted]].sum())
            block = layer.events_k[planted].to(keys.dtype)
            assert torch.equal(keys[:, :, start : start + block.shape[2]], block), "planted keys not gathered"


def test_no_event_fits_the_budget(make_engine) -> None:
    """n_mem below every event's size and no init tokens: memory attention has zero keys, reading goes on."""
    engine = make_engine(
        n_init=0, n_local=64, n_mem=4, chunk_size=16, min_event_size=4, segmentation="fixed", block_size=8
    )
    session = engine.session("empty-memory")
    ids = torch.randint(0, 256, (112,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = session.forward(ids)
    assert len(session.timeline.events) > 0
    assert all(layer._selection == () for layer in session.layers)
    assert bool(torch.isfinite(logits).all())


def test_decoding_retrieves_with_the_question_and_the_tokens_generated_since(make_engine) -> None:
    """A multi-token chunk resets the retrieval query to its own queries; single decoded tokens add to it;
    retrieve() (a probe) leaves it alone."""
    engine = make_engine(decode_retrieval_interval=1)
    session = engine.session("decode-query")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    session.feed(ids[:180])
    layer = session.layers[-1]
    question = ids[180:196]
    session.generate(question, max_new_tokens=4)
    # the question (16 tokens = chunk_size: one chunk) then 3 decoded tokens were computed; the 4th is pending
    assert layer._query_count == len(question) + 3
    before = layer._query_sum.clone()
    session.retrieve("probe text")
    assert torch.equal(layer._query_sum, before)
    session.feed(ids[:50])  # pending token + 50 new ones: the last multi-token chunk resets the query
    assert layer._query_count == 51 % engine.config.chunk_size


def test_recalled_events_are_attended_by_every_layer_for_one_call(make_engine) -> None:
    engine = make_engine(n_mem=16, contiguity_ratio=0.0)
    session = engine.session("recall")
    ids = torch.randint(0, 256, (220,), generator=torch.Generator().manual_seed(6)).tolist()
    session.feed(ids[:200])
    events = len(session.timeline.events)
    assert events >= 4
    session.generate(ids[200:216], max_new_tokens=2)
    target = next(e for e in range(events) if all(e not in layer._selection for layer in session.layers))
    session.generate(ids[200:216], max_new_tokens=2, recall=[target])
    assert all(target in layer._selection for layer in session.layers)
    assert session._recall == ()  # for that call only

    tokens = list(session.token_ids)
    with pytest.raises(ValueError, match="no events"):
        session.generate("more", recall=[events + 100])
    assert session.token_ids == tokens  # refused before reading anything


# ---------------------------------------------------------------- question recall


def _session_with_events(make_engine, **fields):
    engine = make_engine(**{"n_mem": 64, "contiguity_ratio": 0.0, **fields})
    session = engine.session("question-recall")
    ids = torch.randint(0, 256, (240,), generator=torch.Generator().manual_seed(7)).tolist()
    session.feed(ids[:200])
    assert len(session.timeline.events) >= 6
    return session, ids[200:216]  # one chunk: nothing is read between the probe and the question


def test_question_recall_makes_every_layer_attend_the_questions_top_events(make_engine) -> None:
    session, question = _session_with_events(make_engine, question_recall=3)
    expected = torch.topk(session._rank_events(question), 3).indices.tolist()  # a probe: stores nothing
    computed = session.stats().tokens_computed
    session.generate(question, max_new_tokens=1)
    for layer in session.layers:
        assert set(expected) <= set(layer._selection), f"layer {layer.layer_idx}: {layer._selection}"
    assert session.stats().tokens_computed == computed + len(question)  # the probe computed no token
    assert session._recall == ()  # for that call only


def test_question_recall_zero_is_each_layers_own_retrieval(make_engine) -> None:
    """Off (config or per call), the question's probe never runs and layers keep their own selections."""
    session, question = _session_with_events(make_engine, question_recall=0)
    twin, _ = _session_with_events(make_engine, question_recall=3)
    probes = []
    twin._rank_events = lambda ids: probes.append(ids) or torch.zeros(len(twin.timeline.events))
    assert session.generate(question, max_new_tokens=3) == twin.generate(
        question, max_new_tokens=3, question_recall=0
    )
    assert probes == []
    assert [layer._selection for layer in session.layers] == [layer._selection for layer in twin.layers]


def test_question_recall_refuses_a_negative_count_without_reading(make_engine) -> None:
    session, question = _session_with_events(make_engine)
    tokens = list(session.token_ids)
    with pytest.raises(ValueError, match="question_recall"):
        session.generate(question, question_recall=-1)
    assert session.token_ids == tokens


def test_without_a_memory_budget_retrieve_still_ranks_and_generate_reads(make_engine) -> None:
    """n_mem 0 (a sliding window with sinks): nothing is attended from memory, question recall is skipped,
    and retrieve still explains what a query would recall."""
    session, question = _session_with_events(make_engine, n_mem=0)
    session.generate(question, max_new_tokens=2)
    assert all(layer._selection is None for layer in session.layers)
    assert len(session.retrieve("a query", k=3)) == 3


def test_question_recall_without_events_reads_as_usual(make_engine) -> None:
    engine = make_engine(question_recall=4)
    session = engine.session("short")
    session.generate(list(range(40, 60)), max_new_tokens=2)
    assert session.timeline.events == [] and session._recall == ()


def test_event_ranking_standardises_and_averages_the_recall_band(make_engine) -> None:
    """_rank_events averages per-layer standardised scores over recall_layers only (the layers' scores
    are fixed here, so the combination is what is tested)."""
    session, question = _session_with_events(make_engine)
    count = len(session.timeline.events)
    gen = torch.Generator().manual_seed(8)
    fixed = {0: torch.randn(count, generator=gen) * 50 + 7, 1: torch.randn(count, generator=gen)}

    def fake_run_model(ids, context, all_logits):
        assert context.probe
        context.probe_scores.update(fixed)

    engine = session.engine
    engine.run_model = fake_run_model

    def standardised(x):
        return (x - x.mean()) / x.std()

    for band, want in (
        ((1, 2), standardised(fixed[1])),
        ((0, 1), standardised(fixed[0])),
        ((0, 2), (standardised(fixed[0]) + standardised(fixed[1])) / 2),
        ((5, 9), (standardised(fixed[0]) + standardised(fixed[1])) / 2),  # past the model: every layer
    ):
        engine.config = engine.config.model_copy(update={"recall_layers": band})
        assert torch.allclose(session._rank_events(question), want, atol=1e-5), band
    engine.config = engine.config.model_copy(update={"recall_layers": None})  # the upper half
    assert torch.allclose(session._rank_events(question), standardised(fixed[1]), atol=1e-5)
