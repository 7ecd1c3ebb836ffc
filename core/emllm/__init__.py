"""emllm: EM-LLM episodic memory for Hugging Face decoders (Fountas et al., ICLR 2025).

The engine is framework-free: `emllm.EMLLM` loads a model, `EMLLM.session(id)` gives a `Session`
that reads unbounded text into events and generates from it.
"""

from typing import TYPE_CHECKING

from .config import DEFAULT_MODEL, PRESETS, EMLLMConfig
from .errors import (
    ConfigError,
    ConfigMismatchError,
    CorruptSessionError,
    DiskBudgetError,
    EMLLMError,
    EmptyInputError,
    ForkedStoreError,
    InvalidInputError,
    InvalidSessionIdError,
    ModelLoadError,
    ModelMismatchError,
    ReadOnlyStoreError,
    SessionLockedError,
    SessionNotFoundError,
    StaleCheckpointError,
    StoreError,
    StoreIndexError,
    StoreWriteError,
    TokenBudgetError,
    UnsupportedModelError,
)

# Names that need torch/transformers are imported on first use, so `emllm --help` or listing sessions
# does not pay for loading them.
_LAZY = {
    "EMLLM": "engine",
    "GenerationConfig": "generation",
    "SUPPORTED_MODEL_TYPES": "models",
    "EventInfo": "session",
    "RetrievalHit": "session",
    "Session": "session",
    "SessionStats": "session",
    "SessionCheckpoint": "checkpoint",
    "SessionStore": "store",
    "StoredSession": "store",
}

if TYPE_CHECKING:
    from .checkpoint import SessionCheckpoint
    from .engine import EMLLM
    from .generation import GenerationConfig
    from .models import SUPPORTED_MODEL_TYPES
    from .session import EventInfo, RetrievalHit, Session, SessionStats
    from .store import SessionStore, StoredSession


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "EMLLM",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "ConfigMismatchError",
    "CorruptSessionError",
    "DiskBudgetError",
    "EMLLMConfig",
    "EMLLMError",
    "EmptyInputError",
    "EventInfo",
    "ForkedStoreError",
    "GenerationConfig",
    "InvalidInputError",
    "InvalidSessionIdError",
    "ModelLoadError",
    "ModelMismatchError",
    "ReadOnlyStoreError",
    "RetrievalHit",
    "Session",
    "SessionCheckpoint",
    "SessionLockedError",
    "SessionNotFoundError",
    "SessionStats",
    "SessionStore",
    "StaleCheckpointError",
    "StoreError",
    "StoreIndexError",
    "StoreWriteError",
    "StoredSession",
    "TokenBudgetError",
    "UnsupportedModelError",
    "__version__",
]
