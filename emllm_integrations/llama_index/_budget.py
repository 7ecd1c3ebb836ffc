"""How many tokens an engine's episodic memory can hold: the context window the adapters report, and the
check that refuses a document set larger than the session store's disk budget before reading any of it.

Episodic memory has no architectural limit; what bounds it is where the events live. Without a disk
budget the adapters report `UNBOUNDED_CONTEXT`. Knows nothing about LlamaIndex.
"""

from __future__ import annotations

import emllm
import torch

# What "unbounded" is reported as (LlamaIndex needs a number): 1M tokens, about 23 GB of SmolLM2-135M
# events in bf16; a store's max_disk_bytes lowers it.
UNBOUNDED_CONTEXT = 1 << 20


def bytes_per_token(engine: emllm.EMLLM) -> int:
    """Stored bytes per token: keys and values of every layer, in the config's offload dtype."""
    itemsize = torch.empty(0, dtype=getattr(torch, engine.config.offload_dtype)).element_size()
    return 2 * engine.num_layers * engine.num_kv_heads * engine.head_dim * itemsize


def disk_budget(engine: emllm.EMLLM) -> int | None:
    """The store's max_disk_bytes, or None when the engine has no store or the store no budget."""
    store = getattr(engine, "store", None)
    return getattr(store, "max_disk_bytes", None) if store is not None else None


def context_window(engine: emllm.EMLLM) -> int:
    """Tokens one session can hold: the disk budget's worth, else UNBOUNDED_CONTEXT."""
    budget = disk_budget(engine)
    if budget is None:
        return UNBOUNDED_CONTEXT
    return max(1, min(UNBOUNDED_CONTEXT, budget // bytes_per_token(engine)))


def check_fits(engine: emllm.EMLLM, n_tokens: int, what: str, session_id: str | None = None) -> None:
    """Raise emllm.DiskBudgetError when n_tokens of events cannot fit what is left of the store's disk
    budget (the store's other sessions stay; `session_id`'s own saved bytes would be replaced)."""
    budget = disk_budget(engine)
    if budget is None:
        return
    store = engine.store
    used = store.total_bytes()
    if session_id is not None and session_id in store:
        used -= store.info(session_id).bytes
    per_token = bytes_per_token(engine)
    need, free = n_tokens * per_token, max(budget - used, 0)
    if need > free:
        msg = (
            f"{what} is {n_tokens:,} tokens, about {need / 2**20:,.1f} MiB of episodic memory for "
            f"{engine.name}; the session store ({store.root}) has {free / 2**20:,.1f} MiB left of its "
            f"max_disk_bytes ({budget / 2**20:,.1f} MiB), room for about {free // per_token:,} tokens. "
            "Raise max_disk_bytes, free space in the store, or read fewer documents."
        )
        raise emllm.DiskBudgetError(msg)


__all__ = ["UNBOUNDED_CONTEXT", "bytes_per_token", "check_fits", "context_window", "disk_budget"]
