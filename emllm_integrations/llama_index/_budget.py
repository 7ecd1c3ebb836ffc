"""How many tokens an engine's episodic memory can hold: the context window the adapters report, and the
check that refuses a document set larger than the session store's disk budget before reading any of it.
Sizes follow what `emllm.SessionStore` writes per session (estimates, within a few percent).

Episodic memory has no architectural limit; what bounds it is where the events live. Without a disk
budget the adapters report `UNBOUNDED_CONTEXT`. Knows nothing about LlamaIndex.
"""

from __future__ import annotations

import emllm
import torch

# What "unbounded" is reported as (LlamaIndex needs a number): 1M tokens, about 23 GB of SmolLM2-135M
# events in bf16; a store's max_disk_bytes lowers it.
UNBOUNDED_CONTEXT = 1 << 20


RECORD_BYTES = 33  # per token on disk: id (8), surprise (4), boundary (1), char span (16), ~4 bytes of text


def _kv_width(engine: emllm.EMLLM) -> int:
    """Key (or value) elements one token stores across all layers."""
    return engine.num_layers * engine.num_kv_heads * engine.head_dim


def event_bytes_per_token(engine: emllm.EMLLM) -> int:
    """Saved bytes per token that has become part of an event: keys and values in the offload dtype,
    its share of the events' representative keys (fp32, one per event of at least min_event_size), and
    its token records."""
    offload = torch.empty(0, dtype=getattr(torch, engine.config.offload_dtype)).element_size()
    representatives = -(-_kv_width(engine) * 4 // engine.config.min_event_size)
    return 2 * _kv_width(engine) * offload + representatives + RECORD_BYTES


def _attended_bytes_per_token(engine: emllm.EMLLM) -> int:
    """Saved bytes per initial or local-window token: raw and rotated keys and values in the compute
    dtype, the attention mass each layer gave it, and its token records."""
    return 3 * _kv_width(engine) * engine.dtype.itemsize + 4 * engine.num_layers + RECORD_BYTES


def estimate_bytes(engine: emllm.EMLLM, n_tokens: int) -> int:
    """About what a saved session of n_tokens takes on disk: the next-token log-probabilities (fp32, one
    vocabulary), the initial tokens and the local window, and the events."""
    vocabulary = engine.model.get_input_embeddings().num_embeddings
    attended = min(n_tokens, engine.config.n_init + engine.config.n_local)
    return (
        4 * vocabulary
        + attended * _attended_bytes_per_token(engine)
        + (n_tokens - attended) * event_bytes_per_token(engine)
    )


def tokens_within(engine: emllm.EMLLM, n_bytes: int) -> int:
    """About how many tokens one saved session can hold in n_bytes (inverse of estimate_bytes)."""
    full_window = engine.config.n_init + engine.config.n_local
    base = estimate_bytes(engine, full_window)
    if n_bytes >= base:
        return full_window + (n_bytes - base) // event_bytes_per_token(engine)
    low, high = 0, full_window  # the window is not full: search
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if estimate_bytes(engine, mid) <= n_bytes else (low, mid - 1)
    return low


def disk_budget(engine: emllm.EMLLM) -> int | None:
    """The store's max_disk_bytes, or None when the engine has no store or the store no budget."""
    store = getattr(engine, "store", None)
    return getattr(store, "max_disk_bytes", None) if store is not None else None


def context_window(engine: emllm.EMLLM) -> int:
    """Tokens one session can hold: the disk budget's worth, else UNBOUNDED_CONTEXT."""
    budget = disk_budget(engine)
    if budget is None:
        return UNBOUNDED_CONTEXT
    return max(1, min(UNBOUNDED_CONTEXT, tokens_within(engine, budget)))


def check_fits(engine: emllm.EMLLM, n_tokens: int, what: str, session_id: str | None = None) -> None:
    """Raise emllm.DiskBudgetError when a session of n_tokens cannot fit what is left of the store's disk
    budget (the store's other sessions stay; `session_id`'s own saved bytes would be replaced)."""
    budget = disk_budget(engine)
    if budget is None:
        return
    store = engine.store
    used = store.total_bytes()
    if session_id is not None and session_id in store:
        used -= store.info(session_id).bytes
    need, free = estimate_bytes(engine, n_tokens), max(budget - used, 0)
    if need > free:
        msg = (
            f"{what} is {n_tokens:,} tokens, about {need / 2**20:,.2f} MiB of episodic memory for "
            f"{engine.name}; the session store ({store.root}) has {free / 2**20:,.2f} MiB left of its "
            f"max_disk_bytes ({budget / 2**20:,.2f} MiB), room for about {tokens_within(engine, free):,} "
            "tokens. Raise max_disk_bytes, free space in the store, or read fewer documents."
        )
        raise emllm.DiskBudgetError(msg)


__all__ = [
    "UNBOUNDED_CONTEXT",
    "check_fits",
    "context_window",
    "disk_budget",
    "estimate_bytes",
    "event_bytes_per_token",
    "tokens_within",
]
