"""Surprise-based event segmentation and graph-theoretic boundary refinement (EM-LLM).

Tokens whose surprise (-log p of the actual next token) spikes above a running local threshold start new
events; events are then clamped to a size range, and their boundaries can be moved to the split that best
separates the two neighbouring events in a key-similarity graph (max modularity or min conductance).

Pure tensor functions; knows nothing about models, layers or memory.
"""

from __future__ import annotations

from itertools import pairwise

import torch

_METRICS = ("modularity", "conductance")
_TIE_RTOL = 1e-9
_SURPRISE_CHUNK_ELEMS = 1 << 24


def token_surprise(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """-log p(target_ids[t] | logits[t]) for each t.

    logits (T, V) of any float dtype, target_ids (T,) long. Returns float32 (T,). Rows are upcast to float32
    in chunks, so at most a bounded slice of the logits is ever materialised in float32.
    """
    if logits.dim() != 2 or target_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (T, V) and target_ids (T,), got {logits.shape} and {target_ids.shape}"
        )
    t, v = logits.shape
    out = torch.empty(t, dtype=torch.float32, device=logits.device)  # (T,)
    rows = max(1, _SURPRISE_CHUNK_ELEMS // max(v, 1))
    targets = target_ids.to(device=logits.device, dtype=torch.long)
    for a in range(0, t, rows):
        chunk = logits[a : a + rows].float()  # (c, V)
        picked = chunk.gather(1, targets[a : a + rows, None]).squeeze(1)  # (c,)
        out[a : a + rows] = torch.logsumexp(chunk, dim=-1) - picked
    return out


def surprise_boundaries(
    surprise: torch.Tensor, history: torch.Tensor, gamma: float, window: int, floor: float = 0.0
) -> torch.Tensor:
    """Bool (N,): token t starts an event when surprise[t] > max(mu_t + gamma * sigma_t, floor).

    mu_t and sigma_t (population std) are taken over the `window` known surprise values immediately
    preceding t in history ++ surprise; NaN values are unknown: they are skipped (the window reaches further
    back instead) and are never boundaries themselves. Tokens with fewer than 2 preceding known values are
    never boundaries. Statistics are computed per window in float64, so a flat sequence never yields a
    boundary.
    """
    threshold, count = surprise_threshold(surprise, history, gamma, window, floor)
    cur = surprise.detach().to(torch.float64)
    return (cur > threshold) & (count >= 2) & ~torch.isnan(cur)


def surprise_threshold(
    surprise: torch.Tensor, history: torch.Tensor, gamma: float, window: int, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary threshold of each token (N,) float64, and how many known values it was taken over."""
    n = surprise.shape[0]
    device = surprise.device
    if n == 0 or window < 2:
        return torch.full((n,), float("inf"), dtype=torch.float64, device=device), torch.zeros(
            n, dtype=torch.long, device=device
        )
    cur = surprise.detach().to(torch.float64)  # (N,)
    full = torch.cat([history.detach().to(device=device, dtype=torch.float64), cur])  # (H+N,)
    known = ~torch.isnan(full)  # (H+N,)
    values = torch.cat([full.new_zeros(1), full[known]])  # (1+M,), slot 0 is padding
    n_before = (torch.cumsum(known.long(), 0) - known.long())[-n:]  # (N,) known values strictly before t
    offsets = torch.arange(-window, 0, device=device)  # (W,)
    idx = n_before[:, None] + offsets[None, :]  # (N, W) index into the known values
    mask = idx >= 0  # (N, W)
    win = values[(idx + 1).clamp(min=0)]  # (N, W)
    count = mask.sum(1)  # (N,)
    denom = count.clamp(min=1).to(torch.float64)
    mu = (win * mask).sum(1) / denom  # (N,)
    sigma = ((((win - mu[:, None]) * mask) ** 2).sum(1) / denom).sqrt()  # (N,)
    return torch.clamp(mu + gamma * sigma, min=floor), count


def events_from_boundaries(is_boundary: torch.Tensor, min_size: int, max_size: int) -> list[tuple[int, int]]:
    """Cut positions 0..N-1 into contiguous events [start, end) covering all positions in order.

    Position 0 always starts an event. Scanning left to right, a flagged boundary closer than min_size to the
    current event start is ignored (the short event merges into the next one), and an event reaching max_size
    is cut there (a forced boundary), so over-long events become max_size pieces with the remainder carried
    on. Every event except the last lies in [min_size, max_size]; the last (the tail) may be shorter than
    min_size.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    n = is_boundary.shape[0]
    flagged = torch.nonzero(is_boundary.detach().bool().cpu()).flatten().tolist()
    events: list[tuple[int, int]] = []
    start = 0
    for pos in [p for p in flagged if p > 0] + [n]:
        while pos - start > max_size:
            events.append((start, start + max_size))
            start += max_size
        if pos == n:
            break
        if pos - start >= min_size:
            events.append((start, pos))
            start = pos
    if start < n:
        events.append((start, n))
    return events


def split_scores(adjacency: torch.Tensor, metric: str) -> torch.Tensor:
    """Score of every two-community split C1 = [0, s), C2 = [s, n) for s in 1..n-1; float64 (n-1,).

    adjacency (n, n) symmetric non-negative. Entry s-1 is for split s.
    "modularity": Q = (1/2m) sum_ij (A_ij - k_i k_j / 2m) delta(c_i, c_j), 0 when 2m == 0.
    "conductance": cut(C1, C2) / min(vol C1, vol C2), with 0/0 -> 0 and x/0 -> +inf.
    Uses prefix sums, O(n^2) total.
    """
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    n = adjacency.shape[0]
    if n < 2:
        return torch.zeros(0, dtype=torch.float64, device=adjacency.device)
    a = adjacency.detach().to(torch.float64)  # (n, n)
    deg = a.sum(1)  # (n,)
    vol1 = torch.cumsum(deg, 0)[:-1]  # (n-1,)
    vol2 = torch.flip(torch.cumsum(torch.flip(deg, [0]), 0), [0])[1:]  # (n-1,)
    col_prefix = torch.cumsum(a, 0)  # (n, n): [i, j] = sum_{i' <= i} A[i', j]
    row_suffix = torch.flip(torch.cumsum(torch.flip(col_prefix, [1]), 1), [1])  # [i, j] = sum_{j' >= j}
    s = torch.arange(1, n, device=a.device)  # (n-1,)
    cut = row_suffix[s - 1, s].clamp(min=0)  # (n-1,)
    if metric == "conductance":
        small = torch.minimum(vol1, vol2)
        out = cut / small
        out = torch.where(small == 0, torch.where(cut == 0, 0.0, torch.inf), out)
        return out.to(torch.float64)
    two_m = deg.sum()
    if two_m <= 0:
        return torch.zeros(n - 1, dtype=torch.float64, device=a.device)
    inside = vol1 + vol2 - 2 * cut  # (n-1,) sum of A over same-community pairs
    return (inside - (vol1**2 + vol2**2) / two_m) / two_m


def _pick_split(scores: torch.Tensor, lo: int, hi: int, original: int, metric: str) -> int:
    """Best split in [lo, hi] (split s is scores[s - 1]); ties -> closest to original, then the left one."""
    cand = scores[lo - 1 : hi]  # (hi-lo+1,)
    if metric == "modularity":
        best = cand.max()
        good = cand >= best - _TIE_RTOL * torch.clamp(best.abs(), min=1.0)
    else:
        best = cand.min()
        good = cand <= best + _TIE_RTOL * torch.clamp(best.abs(), min=1.0)
    positions = torch.arange(lo, hi + 1)[good.cpu()].tolist()
    return min(positions, key=lambda p: (abs(p - original), p))


def refine_boundaries(
    adjacency: torch.Tensor, starts: list[int], metric: str, min_size: int = 1, max_size: int | None = None
) -> list[int]:
    """Move each internal event boundary to the best two-community split of its two neighbouring events.

    adjacency (n, n) over the tokens of a run of consecutive events; starts are sorted event starts within
    the run, starts[0] == 0 (the run ends at n). Left to right, boundary i moves within (new[i-1], next),
    next being starts[i+1] or n, to the split of adjacency[new[i-1]:next, new[i-1]:next] maximising
    modularity or minimising conductance. Both events keep >= min_size tokens when the span allows
    (span >= 2 * min_size), else just non-empty; with max_size, neither event grows past it (the original
    position always satisfies that, since each step keeps its right event within max_size). Ties go to the
    candidate closest to the original position (then the left one). The number of events is unchanged;
    metric "none" returns starts unchanged.
    """
    if metric == "none":
        return list(starts)
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    n = adjacency.shape[0]
    if not starts or starts[0] != 0:
        raise ValueError(f"starts must begin with 0, got {starts}")
    if any(b <= a for a, b in pairwise(starts)) or starts[-1] >= n:
        raise ValueError(f"starts must be strictly increasing and < n={n}, got {starts}")
    new = [0]
    for i in range(1, len(starts)):
        lo = new[-1]
        hi = starts[i + 1] if i + 1 < len(starts) else n
        span = hi - lo
        scores = split_scores(adjacency[lo:hi, lo:hi], metric)  # (span-1,)
        margin = min_size if span >= 2 * min_size else 1
        first, last = margin, span - margin
        if max_size is not None and max(first, span - max_size) <= min(last, max_size):
            first, last = max(first, span - max_size), min(last, max_size)
        new.append(lo + _pick_split(scores, first, last, starts[i] - lo, metric))
    return new


def key_similarity_graph(keys: torch.Tensor) -> torch.Tensor:
    """Adjacency (n, n) float32 = sum over layers and heads of K K^T, clamped >= 0, zero diagonal.

    keys (L, H, n, D) are raw keys of n tokens. Summing K K^T over (L, H) equals one product of the keys
    flattened to (n, L*H*D).
    """
    if keys.dim() != 4:
        raise ValueError(f"expected keys (L, H, n, D), got {tuple(keys.shape)}")
    n = keys.shape[2]
    flat = keys.detach().float().permute(2, 0, 1, 3).reshape(n, -1)  # (n, L*H*D)
    adj = flat @ flat.T  # (n, n)
    adj = (0.5 * (adj + adj.T)).clamp_(min=0)
    adj.fill_diagonal_(0.0)
    return adj
