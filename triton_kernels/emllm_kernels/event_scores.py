"""Event scoring: every stored event's representative key against the chunk's mean query.

score[e] = sum over query heads h of <query[h], reprs[e, kv(h)]>, with reprs (E, Hkv*D) one representative
per event (KV heads side by side) and query (Hq, D) the mean query rotated to the memory distance.

Selection stays in torch: the budgeted similarity + contiguity choice is a greedy walk down the ranking
(a sort of E scores, then a short sequential pass), not a fixed top-k a kernel could fuse, and sorting
E <= 1e5 scores costs microseconds next to a layer's attention (benchmarks/gpu_bench.py times both).

`event_scores_reference` and the Triton launcher `event_scores` share one signature.
"""

from __future__ import annotations

import math

import torch

from .backend import check_launchable, next_power_of_2

EVENTS_PER_PROGRAM = 64  # BLOCK_E: events one program scores


def _check_shapes(reprs: torch.Tensor, query: torch.Tensor, num_kv_heads: int) -> None:
    hq, d = query.shape
    if reprs.dim() != 2 or reprs.shape[1] != num_kv_heads * d or hq % num_kv_heads:
        msg = f"reprs {tuple(reprs.shape)} and query {tuple(query.shape)} do not fit {num_kv_heads} KV heads"
        raise ValueError(msg)


def event_scores_reference(reprs: torch.Tensor, query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """reprs (E, Hkv*D), query (Hq, D) -> scores (E,) fp32."""
    _check_shapes(reprs, query, num_kv_heads)
    hq, d = query.shape
    grouped = query.float().reshape(num_kv_heads, hq // num_kv_heads, d).sum(dim=1).reshape(-1)
    return reprs.float() @ grouped


def event_scores(reprs: torch.Tensor, query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The Triton kernel; same contract as `event_scores_reference`."""
    _check_shapes(reprs, query, num_kv_heads)
    from ._event_scores_jit import event_scores_kernel

    reprs = reprs if reprs.stride(-1) == 1 else reprs.contiguous()
    query = query if query.stride(-1) == 1 else query.contiguous()
    check_launchable(event_scores_kernel, reprs, query)
    num_events, (hq, d) = reprs.shape[0], query.shape
    scores = torch.empty(num_events, dtype=torch.float32, device=reprs.device)
    if num_events == 0:
        return scores
    event_scores_kernel[(math.ceil(num_events / EVENTS_PER_PROGRAM),)](
        reprs, query, scores, reprs.stride(0), query.stride(0), num_events, num_kv_heads, d,
        GROUP=hq // num_kv_heads, BLOCK_E=EVENTS_PER_PROGRAM, BLOCK_D=max(16, next_power_of_2(d)),
        num_warps=4,
    )  # fmt: skip
    return scores


__all__ = ["event_scores", "event_scores_reference"]
