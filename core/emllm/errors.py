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


class InvalidSessionIdError(EMLLMError, ValueError):
    """A session id that cannot name a stored session (not text, empty, too long, NUL, invalid Unicode)."""


class TokenBudgetError(EMLLMError, ValueError):
    """The token budget (max_new_tokens) cannot hold, or did not hold, a complete constrained output."""


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


class StoreWriteError(StoreError, OSError):
    """A write to the store failed (disk full, permission denied, I/O error); the last committed state
    of every session is intact."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """The store's folder or index cannot be written: it can be listed and read, not changed."""


class StoreIndexError(StoreError, OSError):
    """The store's index (index.sqlite) is damaged or unreadable; the session files are untouched."""


class ForkedStoreError(StoreError, RuntimeError):
    """A SessionStore (or its engine) used in a child process after fork(): its locks belong to the parent."""


class InvalidInputError(EMLLMError, TypeError):
    """An argument of a type the engine does not take (e.g. a source_id that is not text)."""


__all__ = [
    "ConfigError",
    "ConfigMismatchError",
    "CorruptSessionError",
    "DiskBudgetError",
    "EMLLMError",
    "EmptyInputError",
    "ForkedStoreError",
    "InvalidInputError",
    "InvalidSessionIdError",
    "ModelLoadError",
    "ModelMismatchError",
    "ReadOnlyStoreError",
    "SessionLockedError",
    "SessionNotFoundError",
    "StaleCheckpointError",
    "StoreError",
    "StoreIndexError",
    "StoreWriteError",
    "TokenBudgetError",
    "UnsupportedModelError",
]
