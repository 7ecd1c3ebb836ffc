"""Typed errors of the engine: every failure a caller can act on has its own class."""

from __future__ import annotations


class EMLLMError(Exception):
    """Base class of every error raised by emllm."""


class ConfigError(EMLLMError, ValueError):
    """A configuration that cannot work (for this model)."""


class UnsupportedModelError(EMLLMError, ValueError):
    """The model's architecture cannot be driven by episodic attention."""


class ModelLoadError(EMLLMError, OSError):
    """A model could not be found or loaded."""


class EmptyInputError(EMLLMError, ValueError):
    """Text or token ids with nothing in them."""


class SessionNotFoundError(EMLLMError, KeyError):
    """A session id that this engine does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the args
        return str(self.args[0]) if self.args else "session not found"


class StaleCheckpointError(EMLLMError, ValueError):
    """A checkpoint the session can no longer return to (a cut removed what it held), or another's."""


class StoreError(EMLLMError):
    """Base class of session-store failures."""


class ModelMismatchError(StoreError, ValueError):
    """A stored session was written by another model (architecture, weights or tokenizer differ)."""


class ConfigMismatchError(StoreError, ValueError):
    """A stored session was written under another window (n_init, n_local or chunk_size differ)."""


class CorruptSessionError(StoreError, OSError):
    """A stored file is missing, truncated or fails its checksum; nothing of it was used."""


class SessionLockedError(StoreError, RuntimeError):
    """Another process (or engine) holds the session open for writing."""


class DiskBudgetError(StoreError, OSError):
    """Saving would take the store past its max_disk_bytes."""


__all__ = [
    "ConfigError",
    "ConfigMismatchError",
    "CorruptSessionError",
    "DiskBudgetError",
    "EMLLMError",
    "EmptyInputError",
    "ModelLoadError",
    "ModelMismatchError",
    "SessionLockedError",
    "SessionNotFoundError",
    "StaleCheckpointError",
    "StoreError",
    "UnsupportedModelError",
]
