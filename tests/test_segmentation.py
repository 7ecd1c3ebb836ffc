"""Tests for emllm.segmentation against brute-force definitions and hand-made cases."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from emllm import segmentation as seg
from emllm.segmentation import (
    events_from_boundaries,
    key_similarity_graph,
    refine_boundaries,
    split_scores,
    surprise_boundaries,
    token_surprise,
)
from hypothesis import given, settings
from hypothesis import strategies as st

NAN = float("nan")


# ---------------------------------------------------------------- token_surprise


def _naive_surprise(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)  # (T, V)
    return -logp.gather(1, targets[:, None]).squeeze(1)


def test_token_surprise_matches_naive() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 13, generator=g) * 4
    targets = torch.randint(0, 13, (9,), generator=g)
    out = token_surprise(logits, targets)
    assert out.dtype == torch.float32 and out.shape == (9,)
    torch.testing.assert_close(out.double(), _naive_surprise(logits, targets), atol=1e-5, rtol=1e-5)


def test_token_surprise_bf16() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 50, generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 50, (6,), generator=g)
    out = token_surprise(logits, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_surprise(logits.float(), targets), atol=1e-5, rtol=1e-5)


def test_token_surprise_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg, "_SURPRISE_CHUNK_ELEMS", 20)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(11, 7, generator=g)
    targets = torch.randint(0, 7, (11,), generator=g)
    torch.testing.assert_close(
        token_surprise(logits, targets).double(), _naive_surprise(logits, targets), atol=1e-5, rtol=1e-5
    )


def test_token_surprise_empty() -> None:
    assert token_surprise(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ---------------------------------------------------------------- surprise_boundaries


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _where(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_boundaries_single_spike() -> None:
    s = _t([1.0] * 10 + [5.0] + [1.0] * 9)
    out = surprise_boundaries(s, _t([]), gamma=1.0, window=5)
    assert out.dtype == torch.bool and out.shape == (20,)
    assert _where(out) == [10]


def test_boundaries_flat_sequence_has_none() -> None:
    for v in (0.1, 1.0 / 3.0, 7.77):
        s = _t([v] * 50)
        assert not surprise_boundaries(s, _t([v] * 8), gamma=0.0, window=8).any()


def test_boundaries_gamma_raises_threshold() -> None:
    history = _t([1.0, 2.0] * 10)
    s = _t([1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0])  # windows of 4 alternate: mu 1.5, sigma 0.5
    assert _where(surprise_boundaries(s, history, gamma=1.0, window=4)) == [4]
    assert _where(surprise_boundaries(s, history, gamma=4.0, window=4)) == []


def test_boundaries_use_history() -> None:
    s = _t([5.0, 1.0, 1.0])
    assert _where(surprise_boundaries(s, _t([1.0] * 4), gamma=1.0, window=4)) == [0]
    assert _where(surprise_boundaries(s, _t([]), gamma=1.0, window=4)) == []
    assert _where(surprise_boundaries(s, _t([1.0]), gamma=1.0, window=4)) == []  # one preceding value only


def test_boundaries_population_std() -> None:
    # window [0, 2]: mu 1, population sigma 1 (the unbiased estimate would be sqrt(2))
    s = _t([0.0, 2.0, 2.2])
    assert _where(surprise_boundaries(s, _t([]), gamma=1.0, window=2)) == [2]
    assert _where(surprise_boundaries(_t([2.5]), _t([0.0, 2.0]), gamma=1.5, window=2)) == []


def test_boundaries_floor() -> None:
    s = _t([0.1] * 8 + [0.5] + [0.1] * 3)
    assert _where(surprise_boundaries(s, _t([]), gamma=1.0, window=4, floor=1.0)) == []
    assert _where(surprise_boundaries(s, _t([]), gamma=1.0, window=4, floor=0.4)) == [8]


def test_boundaries_nan() -> None:
    s = _t([1.0, 1.0, 1.0, NAN, 1.0, 1.0, 10.0, NAN])
    assert _where(surprise_boundaries(s, _t([]), gamma=1.0, window=3)) == [6]
    # NaN in the window is skipped: the window reaches further back for known values
    s = _t([0.0, 10.0, NAN, 9.9])
    assert _where(surprise_boundaries(s, _t([]), gamma=0.5, window=2)) == [3]
    # NaN history does not count towards the 2 required preceding values
    assert _where(surprise_boundaries(_t([3.0, 9.0]), _t([NAN, NAN, 3.0]), gamma=1.0, window=4)) == [1]
    assert not surprise_boundaries(_t([NAN] * 5), _t([1.0, 2.0]), gamma=0.0, window=3).any()


def test_boundaries_empty_and_tiny_window() -> None:
    assert surprise_boundaries(_t([]), _t([1.0, 2.0]), gamma=1.0, window=4).shape == (0,)
    assert not surprise_boundaries(_t([1.0, 1.0, 9.0]), _t([]), gamma=0.0, window=1).any()


def _brute_boundaries(
    s: list[float], h: list[float], gamma: float, window: int, floor: float
) -> list[tuple[bool, float]]:
    out = []
    full = h + s
    for t, x in enumerate(s):
        known = [v for v in full[: len(h) + t] if not math.isnan(v)][-window:]
        if math.isnan(x) or len(known) < 2:
            out.append((False, math.inf))
            continue
        mu = sum(known) / len(known)
        sigma = math.sqrt(sum((v - mu) ** 2 for v in known) / len(known))
        thr = max(mu + gamma * sigma, floor)
        out.append((x > thr, abs(x - thr)))
    return out


_surprise_value = st.one_of(
    st.floats(0.0, 20.0, width=32), st.sampled_from([0.0, 1.0, 2.0, 5.0]), st.just(NAN)
)


@settings(max_examples=30, deadline=None)
@given(
    s=st.lists(_surprise_value, max_size=40),
    h=st.lists(_surprise_value, max_size=12),
    gamma=st.floats(0.0, 3.0),
    window=st.integers(1, 10),
    floor=st.floats(0.0, 6.0),
)
def test_boundaries_match_brute_force(
    s: list[float], h: list[float], gamma: float, window: int, floor: float
) -> None:
    out = surprise_boundaries(_t(s), _t(h), gamma=gamma, window=window, floor=floor).tolist()
    s32 = _t(s).double().tolist()
    h32 = _t(h).double().tolist()
    for got, (want, margin) in zip(out, _brute_boundaries(s32, h32, gamma, window, floor), strict=True):
        if margin > 1e-9:
            assert got == want


# ---------------------------------------------------------------- events_from_boundaries


def _flags(n: int, positions: list[int]) -> torch.Tensor:
    b = torch.zeros(n, dtype=torch.bool)
    b[positions] = True
    return b


def test_events_hand_made() -> None:
    b = _flags(10, [3, 5, 8])
    assert events_from_boundaries(b, 1, 10) == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert events_from_boundaries(b, 3, 10) == [(0, 3), (3, 8), (8, 10)]
    assert events_from_boundaries(_flags(10, []), 1, 4) == [(0, 4), (4, 8), (8, 10)]
    assert events_from_boundaries(_flags(12, [6]), 3, 4) == [(0, 4), (4, 8), (8, 12)]
    assert events_from_boundaries(_flags(10, [0, 9]), 2, 10) == [(0, 9), (9, 10)]  # short tail allowed
    assert events_from_boundaries(_flags(1, [0]), 1, 1) == [(0, 1)]
    assert events_from_boundaries(_flags(0, []), 1, 1) == []


def test_events_bad_sizes() -> None:
    with pytest.raises(ValueError):
        events_from_boundaries(_flags(5, []), 0, 3)
    with pytest.raises(ValueError):
        events_from_boundaries(_flags(5, []), 4, 3)


@settings(max_examples=30, deadline=None)
@given(
    flags=st.lists(st.booleans(), max_size=60),
    min_size=st.integers(1, 6),
    extra=st.integers(0, 6),
)
def test_events_properties(flags: list[bool], min_size: int, extra: int) -> None:
    max_size = min_size + extra
    b = torch.tensor(flags, dtype=torch.bool)
    events = events_from_boundaries(b, min_size, max_size)
    n = len(flags)
    assert [p for s, e in events for p in range(s, e)] == list(range(n))
    assert all(e > s for s, e in events)
    for k, (s, e) in enumerate(events):
        assert e - s <= max_size
        if k < len(events) - 1:
            assert e - s >= min_size
        if k > 0:
            assert flags[s] or s == events[k - 1][0] + max_size
    starts = {s for s, _ in events}
    for p, flag in enumerate(flags):
        if flag and p not in starts:
            owner = max(s for s in starts if s <= p)
            assert p - owner < min_size


# ---------------------------------------------------------------- split_scores


def _brute_modularity(a: list[list[float]], s: int) -> float:
    n = len(a)
    k = [sum(row) for row in a]
    two_m = sum(k)
    if two_m == 0:
        return 0.0
    c = [0 if i < s else 1 for i in range(n)]
    q = 0.0
    for i in range(n):
        for j in range(n):
            if c[i] == c[j]:
                q += a[i][j] - k[i] * k[j] / two_m
    return q / two_m


def _brute_conductance(a: list[list[float]], s: int) -> float:
    n = len(a)
    k = [sum(row) for row in a]
    cut = sum(a[i][j] for i in range(s) for j in range(s, n))
    small = min(sum(k[:s]), sum(k[s:]))
    if small == 0:
        return 0.0 if cut == 0 else math.inf
    return cut / small


_BRUTE = {"modularity": _brute_modularity, "conductance": _brute_conductance}


@st.composite
def _graphs(draw: st.DrawFn, min_n: int = 2, max_n: int = 12) -> torch.Tensor:
    n = draw(st.integers(min_n, max_n))
    weight = st.one_of(st.sampled_from([0.0, 0.0, 1.0, 2.0]), st.floats(0.0, 5.0, width=32))
    vals = draw(st.lists(weight, min_size=n * n, max_size=n * n))
    a = torch.tensor(vals, dtype=torch.float32).reshape(n, n)
    return torch.triu(a) + torch.triu(a, 1).T


def _assert_scores_close(got: list[float], want: list[float]) -> None:
    for x, y in zip(got, want, strict=True):
        if math.isinf(y):
            assert x == y
        else:
            assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(a=_graphs(), metric=st.sampled_from(["modularity", "conductance"]))
def test_split_scores_match_brute_force(a: torch.Tensor, metric: str) -> None:
    n = a.shape[0]
    got = split_scores(a, metric)
    assert got.shape == (n - 1,)
    rows = a.double().tolist()
    _assert_scores_close(got.tolist(), [_BRUTE[metric](rows, s) for s in range(1, n)])


def test_split_scores_edge_cases() -> None:
    assert split_scores(torch.ones(1, 1), "modularity").shape == (0,)
    assert split_scores(torch.zeros(4, 4), "modularity").tolist() == [0.0] * 3
    assert split_scores(torch.zeros(4, 4), "conductance").tolist() == [0.0] * 3
    a = torch.zeros(3, 3)
    a[0, 1] = a[1, 0] = 1.0  # node 2 isolated: vol C2 = 0 for s = 2, cut 0; s = 1 cuts the edge
    assert split_scores(a, "conductance").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        split_scores(a, "bogus")


# ---------------------------------------------------------------- refine_boundaries


def _brute_refine(a: torch.Tensor, starts: list[int], metric: str, min_size: int) -> list[int]:
    rows = a.double().tolist()
    n = len(rows)
    new = [0]
    for i in range(1, len(starts)):
        lo, hi = new[-1], (starts[i + 1] if i + 1 < len(starts) else n)
        sub = [r[lo:hi] for r in rows[lo:hi]]
        span = hi - lo
        margin = min_size if span >= 2 * min_size else 1
        cands = list(range(margin, span - margin + 1))
        scores = {s: _BRUTE[metric](sub, s) for s in cands}
        sign = -1.0 if metric == "modularity" else 1.0
        best = min(sign * v for v in scores.values())
        tol = 1e-9 * max(1.0, abs(best))
        ties = [s for s in cands if sign * scores[s] <= best + tol]
        orig = starts[i] - lo
        new.append(lo + min(ties, key=lambda s: (abs(s - orig), s)))
    return new


@st.composite
def _graph_and_starts(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    a = draw(_graphs(min_n=2, max_n=12))
    n = a.shape[0]
    inner = draw(st.lists(st.integers(1, n - 1), unique=True, max_size=n - 1))
    return a, [0, *sorted(inner)]


@settings(max_examples=30, deadline=None)
@given(
    gs=_graph_and_starts(),
    metric=st.sampled_from(["modularity", "conductance"]),
    min_size=st.integers(1, 4),
)
def test_refine_matches_brute_force(gs: tuple[torch.Tensor, list[int]], metric: str, min_size: int) -> None:
    a, starts = gs
    got = refine_boundaries(a, starts, metric, min_size=min_size)
    assert got == _brute_refine(a, starts, metric, min_size)
    assert len(got) == len(starts) and got[0] == 0
    assert all(x < y for x, y in pairwise(got))
    assert refine_boundaries(a, starts, "none", min_size=min_size) == starts


def _planted(sizes: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    a = 0.05 * torch.rand(n, n, generator=g)
    start = 0
    for size in sizes:
        a[start : start + size, start : start + size] += 1.0 + 0.2 * torch.rand(size, size, generator=g)
        start += size
    a = 0.5 * (a + a.T)
    a.fill_diagonal_(0.0)
    return a


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refine_planted_blocks(metric: str) -> None:
    a = _planted([10, 10])
    assert refine_boundaries(a, [0, 13], metric) == [0, 10]
    assert refine_boundaries(a, [0, 7], metric) == [0, 10]
    assert refine_boundaries(a, [0, 10], metric) == [0, 10]
    a3 = _planted([8, 12, 10], seed=1)
    assert refine_boundaries(a3, [0, 5, 23], metric) == [0, 8, 20]
    assert refine_boundaries(a3, [0, 11, 17], metric, min_size=3) == [0, 8, 20]


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refine_ties(metric: str) -> None:
    assert refine_boundaries(torch.zeros(8, 8), [0, 3, 6], metric) == [0, 3, 6]
    # three mirror-symmetric blocks of 2: splits 2 and 4 tie, both beat 3 -> equidistant, the left one wins
    a = torch.zeros(6, 6)
    for b in range(3):
        a[2 * b : 2 * b + 2, 2 * b : 2 * b + 2] = 1.0
    a[1, 2] = a[2, 1] = a[3, 4] = a[4, 3] = 0.1
    a.fill_diagonal_(0.0)
    scores = split_scores(a, metric)
    assert math.isclose(scores[1].item(), scores[3].item(), rel_tol=1e-12)
    assert refine_boundaries(a, [0, 3], metric) == [0, 2]


def test_refine_respects_min_size() -> None:
    a = _planted([2, 18])
    assert refine_boundaries(a, [0, 6], "modularity", min_size=4) == [0, 4]
    assert refine_boundaries(a, [0, 6], "modularity", min_size=1) == [0, 2]


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refine_respects_max_size(metric: str) -> None:
    """A planted block edge beyond max_size must not pull an event past it."""
    a = _planted([28, 4])
    assert refine_boundaries(a, [0, 16], metric, min_size=1) == [0, 28]
    assert refine_boundaries(a, [0, 16], metric, min_size=1, max_size=16) == [0, 16]


def test_refine_none_and_errors() -> None:
    a = _planted([5, 5])
    assert refine_boundaries(a, [0, 3, 7], "none") == [0, 3, 7]
    assert refine_boundaries(a, [0], "modularity") == [0]
    with pytest.raises(ValueError):
        refine_boundaries(a, [1, 4], "modularity")
    with pytest.raises(ValueError):
        refine_boundaries(a, [0, 4], "bogus")


# ---------------------------------------------------------------- key_similarity_graph


def test_key_similarity_graph() -> None:
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 6, 4, generator=g)
    adj = key_similarity_graph(keys)
    assert adj.shape == (6, 6) and adj.dtype == torch.float32
    assert torch.equal(adj, adj.T)
    assert (adj >= 0).all()
    assert (adj.diagonal() == 0).all()
    want = torch.zeros(6, 6, dtype=torch.float64)
    for layer in range(2):
        for head in range(3):
            k = keys[layer, head].double()
            for i in range(6):
                for j in range(6):
                    want[i, j] += (k[i] * k[j]).sum()
    want = want.clamp(min=0)
    want.fill_diagonal_(0.0)
    torch.testing.assert_close(adj.double(), want, atol=1e-5, rtol=1e-5)


def test_key_similarity_graph_bf16() -> None:
    keys = torch.randn(1, 2, 5, 8).to(torch.bfloat16)
    adj = key_similarity_graph(keys)
    assert adj.dtype == torch.float32 and adj.shape == (5, 5)
