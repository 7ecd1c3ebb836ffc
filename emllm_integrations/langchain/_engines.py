"""One loaded `emllm.EMLLM` engine per (model, config, store), shared by every LangChain object that names it.

Loading a model takes seconds and memory, so `ChatEMLLM(model="x")` and `EMLLM(model="x")` instances
share an engine. `register_engine` makes an engine built elsewhere (your own model object, a test
model) available under its name.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import emllm

_ENGINES: dict[tuple, emllm.EMLLM] = {}
_NAMED: dict[str, emllm.EMLLM] = {}
_LOCK = threading.Lock()


def register_engine(engine: emllm.EMLLM, name: str | None = None) -> str:
    """Make `engine` the one used for `model=name` (default: the engine's own name); returns the name."""
    key = name or engine.name
    with _LOCK:
        _NAMED[key] = engine
    return key


def get_engine(model: str, config: emllm.EMLLMConfig | None = None, store: Any = None) -> emllm.EMLLM:
    """The shared engine for `model` (a registered name, a HF id or path, or the bundled default)."""
    with _LOCK:
        if model in _NAMED:
            if config is not None or store is not None:
                msg = f"engine {model!r} was registered ready-made: give it its config and store when built"
                raise ValueError(msg)
            return _NAMED[model]
        key = (model, config.model_dump_json() if config is not None else None, _store_key(store))
        engine = _ENGINES.get(key)
        if engine is None:
            kwargs = {"store": store} if store is not None else {}
            engine = emllm.EMLLM.from_pretrained(model, config, **kwargs)
            _ENGINES[key] = engine
        return engine


def _store_key(store: Any) -> str | None:
    if store is None:
        return None
    if isinstance(store, (str, Path)):
        return str(Path(store).expanduser().resolve())
    return f"store-{id(store)}"


__all__ = ["get_engine", "register_engine"]
