"""A picture of a session's segmentation: surprise per token, the boundary threshold, where events begin,
and how large they are. Needs matplotlib (`pip install emllm-integrations[plot]`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .segmentation import surprise_threshold

if TYPE_CHECKING:
    from .session import Session

BLOCK = 4096  # tokens per threshold computation (its cost is tokens x window)


def segmentation_threshold(session: Session) -> torch.Tensor:
    """The threshold every computed token was compared with (N,), recomputed from the stored surprise."""
    config = session.engine.config
    window = config.effective_surprise_window
    surprise = session.timeline.surprise
    parts = []
    for start in range(0, surprise.shape[0], BLOCK):
        history = surprise[max(0, start - window) : start]
        threshold, _ = surprise_threshold(
            surprise[start : start + BLOCK], history, config.gamma, window, config.surprise_floor
        )
        parts.append(threshold)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def plot_segmentation(session: Session, path: str | Path, *, last_tokens: int | None = None) -> Path:
    """Write a PNG: surprise and threshold over tokens with event starts marked, and event sizes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'emllm-integrations[plot]'") from exc
    surprise = session.timeline.surprise.double()
    threshold = segmentation_threshold(session)
    first = 0 if last_tokens is None else max(0, surprise.shape[0] - last_tokens)
    positions = torch.arange(first, surprise.shape[0])
    events = session.timeline.events
    sizes = [stop - start for start, stop in events]

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), gridspec_kw={"height_ratios": [3, 1.4]})
    top.plot(positions, surprise[first:], lw=0.6, color="tab:blue", label="surprise (nats)")
    top.plot(positions, threshold[first:].clamp(max=50), lw=0.9, color="tab:red", label="threshold")
    for start, _ in events:
        if start >= first:
            top.axvline(start, color="0.6", lw=0.4, zorder=0)
    if session.timeline.init_len > first:
        top.axvspan(first, session.timeline.init_len, color="tab:green", alpha=0.15, label="initial tokens")
    top.axvspan(
        session.timeline.window_start, surprise.shape[0], color="tab:orange", alpha=0.12, label="window"
    )
    top.set_xlabel("token")
    top.set_ylabel("surprise")
    top.set_title(f"session {session.id!r}: {len(events)} events over {surprise.shape[0]:,} tokens")
    top.legend(loc="upper right", fontsize=8)
    if sizes:
        bottom.hist(sizes, bins=min(50, max(5, len(set(sizes)))), color="tab:purple")
    bottom.set_xlabel("event size (tokens)")
    bottom.set_ylabel("events")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["plot_segmentation", "segmentation_threshold"]
