"""emllm: EM-LLM episodic memory for Hugging Face decoders (Fountas et al., ICLR 2025).

The engine is framework-free: `emllm.EMLLM` loads a model, `EMLLM.session(id)` gives a `Session`
that reads unbounded text into events and generates from it.
"""

from .config import PRESETS, EMLLMConfig
from .engine import EMLLM
from .errors import (
    ConfigError,
    CorruptSessionError,
    DiskBudgetError,
    EMLLMError,
    EmptyInputError,
    ModelLoadError,
    ModelMismatchError,
    SessionLockedError,
    SessionNotFoundError,
    StoreError,
    UnsupportedModelError,
)
from .generation import GenerationConfig
from .models import DEFAULT_MODEL, SUPPORTED_MODEL_TYPES
from .session import EventInfo, RetrievalHit, Session, SessionStats
from .store import SessionStore, StoredSession

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "EMLLM",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "CorruptSessionError",
    "DiskBudgetError",
    "EMLLMConfig",
    "EMLLMError",
    "EmptyInputError",
    "EventInfo",
    "GenerationConfig",
    "ModelLoadError",
    "ModelMismatchError",
    "RetrievalHit",
    "Session",
    "SessionLockedError",
    "SessionNotFoundError",
    "SessionStats",
    "SessionStore",
    "StoreError",
    "StoredSession",
    "UnsupportedModelError",
    "__version__",
]
