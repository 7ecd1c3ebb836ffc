"""Which episodic session a call belongs to: an explicit `session_id`, else the LangGraph thread."""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig, ensure_config


def with_session_id(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs plus `session_id` taken from the run config (configurable `session_id` or `thread_id`,
    or LangGraph's `thread_id` metadata), unless the call names one itself."""
    if kwargs.get("session_id") is not None:
        return kwargs
    config = ensure_config(config)  # merges the config of the graph node we may be running in
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    for value in (configurable.get("session_id"), configurable.get("thread_id"), metadata.get("thread_id")):
        if value is not None:
            return {**kwargs, "session_id": str(value)}
    return kwargs


__all__ = ["with_session_id"]
