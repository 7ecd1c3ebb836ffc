"""What ChatEMLLM and EMLLM share: which engine serves them, which session a call runs in, how to sample,
and the run-config thread id passed on to every call."""

from __future__ import annotations

from typing import Any

import emllm
from langchain_core.language_models import LanguageModelInput
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ._threads import with_session_id


class EpisodicModelFields(BaseModel):
    """Fields and thread handling common to both LangChain models (mixed in before the LangChain base)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(default=emllm.DEFAULT_MODEL)
    """Model to load: the bundled default, a Hugging Face id or path, or a registered engine's name."""
    engine: Any = Field(default=None, exclude=True)
    """An `emllm.EMLLM` engine to use instead of loading `model` (shared, not copied)."""
    config: emllm.EMLLMConfig | None = None
    """Episodic memory settings; None picks the preset for the model."""
    store: Any = Field(default=None, exclude=True)
    """Session store (folder path or `emllm.SessionStore`): sessions persist across restarts."""
    autosave: bool = True
    """Save the session after every call when the engine has a store."""
    session_id: str | None = None
    """Fixed episodic session id; None uses the run's LangGraph thread_id, else a throwaway session."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    max_tokens: int = Field(default=256, ge=1)
    """Maximum number of tokens to generate per call."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = all)."""
    seed: int | None = None
    """Random seed for sampling."""
    stop: list[str] | None = None
    """Stop sequences (generation ends before the first one)."""
    timeout: float | None = None
    """Seconds a call may take before TimeoutError (checked between generated tokens)."""
    max_retries: int = 0
    """Accepted for compatibility with hosted models; a local model has no transient failures to retry."""
    api_key: SecretStr | None = Field(default=None, exclude=True)
    """Ignored: a local model needs no key (accepted so code written for hosted models runs)."""

    @model_validator(mode="before")
    @classmethod
    def _model_from_engine(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("engine") is not None and "model" not in values:
            values = {**values, "model": values["engine"].name}
        return values

    # -- thread ids from the run config ----------------------------------------------------------------
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return super().invoke(input, config, **with_session_id(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return await super().ainvoke(input, config, **with_session_id(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return super().stream(input, config, **with_session_id(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return super().astream(input, config, **with_session_id(config, kwargs))


__all__ = ["EpisodicModelFields"]
