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


__all__ = [
    "ConfigError",
    "EMLLMError",
    "EmptyInputError",
    "ModelLoadError",
    "SessionNotFoundError",
    "UnsupportedModelError",
]
