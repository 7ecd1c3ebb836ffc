"""ChatSession: a conversation over one episodic Session. Each turn the caller re-sends the whole history
(as agents do); it is rendered with the chat template, only the suffix the session does not hold yet is
computed, and the reply comes back as content plus tool calls.

Forced tool calls (`tool_choice="any"` or a tool name) and structured output (`response_schema`) are
decoded under a JSON schema, so they parse even from a small model. The token budget never shapes them:
a forced call that `max_new_tokens` cuts short comes back as an InvalidToolCall saying so, never as a
call with made-up arguments. Framework-free: the LangChain and LlamaIndex adapters convert their
messages to `emllm.chat.ChatMessage` and call this.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .chat import (
    TOOL_SYNTAX,
    ChatFormatError,
    ChatMessage,
    InvalidToolCall,
    ToolCall,
    ToolFormat,
    ToolSpec,
    as_tools,
    detect_tool_format,
    parse_tool_calls,
    render_chat,
    tool_call_schema,
)
from .json_schema import JsonSchemaLogitsProcessor
from .session_lock import SessionLock

if TYPE_CHECKING:
    from .session import Session


@dataclass(frozen=True)
class ChatUsage:
    """Token counts of one turn; `cached_tokens`: prompt tokens already held in episodic memory."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class ChatReply:
    """One assistant turn: content, tool calls, the raw generated text, why it ended, token usage."""

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]
    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: ChatUsage


@dataclass
class _Turn:
    prompt_ids: list[int]
    prefill: str  # text the prompt ends with on the assistant's behalf (a forced call's opener)
    processor: JsonSchemaLogitsProcessor | None
    parse_tools: bool
    tool_names: list[str]
    cached_tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    forced: bool = False  # a tool call is forced (decoded under the tools' schema)
    closer: str = ""  # text the forced call's format writes after its JSON


def normalize_tool_choice(choice: Any, tools: Sequence[ToolSpec]) -> str | None:
    """None (the model decides), "none" (no calls), "any" (some call), or the name of the forced tool.

    Accepts LangChain/OpenAI spellings: "auto", "required", True, a tool name, and
    `{"type": "function", "function": {"name": ...}}`.
    """
    if choice in (None, "auto", False):
        return None
    if choice == "none":
        return "none"
    if choice in ("any", "required", True):
        return "any"
    if isinstance(choice, Mapping):
        choice = choice.get("function", choice).get("name")
    names = [t.name for t in tools]
    if isinstance(choice, str) and choice in names:
        return choice
    raise ChatFormatError(f"tool_choice {choice!r} names no bound tool; tools: {names}")


def encode_with_prefix(tokenizer, text: str, held_ids: Sequence[int]) -> list[int]:
    """Token ids of `text`, keeping `held_ids` as they are when `text` starts with their text.

    A reply's tokens are the model's own choice and need not be how the tokenizer would split the same
    text; re-tokenizing the whole history would then diverge inside the reply. Reusing the held ids
    keeps the session's prefix (only the new suffix is computed); otherwise the whole text is encoded
    and `Session.sync` reuses the longest common token prefix.
    """
    if held_ids:
        held_text = tokenizer.decode(list(held_ids))
        if held_text and "\ufffd" not in held_text[-1:] and text.startswith(held_text):
            rest = text[len(held_text) :]
            return list(held_ids) + (tokenizer.encode(rest, add_special_tokens=False) if rest else [])
    return tokenizer.encode(text, add_special_tokens=False)


class ChatSession:
    """Chat turns over one `Session` (get one with `ChatSession.of(session)`; calls on it queue).

    >>> chat = ChatSession.of(engine.session("thread-1"))
    >>> reply = chat.reply([ChatMessage("user", "Hi!")], max_new_tokens=40)
    >>> reply.content, reply.usage.cached_tokens
    """

    _by_session: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, session: Session, *, tool_format: ToolFormat | None = None):
        self.session = session
        self.tokenizer = session.engine.tokenizer
        self.tool_format: ToolFormat = tool_format or detect_tool_format(self.tokenizer)
        self._lock = SessionLock()  # a chat stream holds it across its yields, released from any thread

    @classmethod
    def of(cls, session: Session, *, tool_format: ToolFormat | None = None) -> ChatSession:
        """The ChatSession of this session (one per session, so concurrent turns on it queue)."""
        with cls._registry_lock:
            chat = cls._by_session.get(session)
            if chat is None:
                chat = cls._by_session[session] = cls(session, tool_format=tool_format)
            elif tool_format is not None:
                chat.tool_format = tool_format
            return chat

    def render(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        tools: Sequence[ToolSpec | Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text this session would compute for these messages (with the generation prompt)."""
        return render_chat(self.tokenizer, messages, tools, tool_format=self.tool_format)

    def reply(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec | Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        response_schema: dict[str, Any] | bool | None = None,
        **generation: Any,
    ) -> ChatReply:
        """Generate the next assistant turn. `generation`: GenerationConfig fields (max_new_tokens, ...)."""
        stream = self.stream(
            messages, tools=tools, tool_choice=tool_choice, response_schema=response_schema, **generation
        )
        for _ in stream:
            pass
        assert stream.reply is not None
        return stream.reply

    def stream(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec | Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        response_schema: dict[str, Any] | bool | None = None,
        **generation: Any,
    ) -> ChatStream:
        """Like reply, yielding content pieces as they are decoded; `.reply` is set once it is exhausted.

        Text that may be a tool call is held back (it comes back in `reply.tool_calls`).
        """
        return ChatStream(self, messages, tools, tool_choice, response_schema, generation)

    # -- one turn ------------------------------------------------------------------------------------------
    def _plan(self, messages, tools, tool_choice, response_schema, generation: dict[str, Any]) -> _Turn:
        specs = as_tools(tools)
        choice = normalize_tool_choice(tool_choice, specs) if specs else None
        if tool_choice not in (None, "auto", "none", False) and not specs:
            raise ChatFormatError(f"tool_choice={tool_choice!r} needs tools to choose from")
        if choice is not None and choice != "none" and response_schema is not None:
            raise ChatFormatError("a forced tool call and a response schema cannot be combined")
        rendered = render_chat(
            self.tokenizer, messages, specs if choice != "none" else None, tool_format=self.tool_format
        )
        options = dict(generation)
        max_new = options.setdefault("max_new_tokens", 256)
        eos = self.session.engine.eos_token_ids
        prefill, closer, processor = "", "", None
        if choice not in (None, "none"):
            syntax = TOOL_SYNTAX[self.tool_format]
            closer = syntax.closer
            chosen = specs if choice == "any" else [t for t in specs if t.name == choice]
            prefill = syntax.opener
            schema = tool_call_schema(chosen, self.tool_format)
            processor = JsonSchemaLogitsProcessor(
                self.tokenizer, schema, max_new_tokens=max_new, eos_token_ids=eos, suffix=syntax.closer
            )
        elif response_schema is not None:
            processor = JsonSchemaLogitsProcessor(
                self.tokenizer, response_schema, max_new_tokens=max_new, eos_token_ids=eos
            )
        if processor is not None:
            options.pop("stop", None)  # a stop string inside the JSON would cut the document
        ids = encode_with_prefix(self.tokenizer, rendered + prefill, self.session.token_ids)
        return _Turn(
            prompt_ids=ids,
            prefill=prefill,
            processor=processor,
            parse_tools=bool(specs) and choice != "none",
            tool_names=[t.name for t in specs],
            cached_tokens=0,
            options=options,
            forced=choice not in (None, "none"),
            closer=closer,
        )

    def _sync(self, turn: _Turn) -> None:
        stats = self.session.stats()
        computed = stats.tokens - stats.pending_tokens
        reused = self.session.sync(turn.prompt_ids)
        turn.cached_tokens = min(reused, computed)

    def _finish(self, turn: _Turn, text: str) -> ChatReply:
        output_ids = self.session.token_ids[len(turn.prompt_ids) :]
        usage = ChatUsage(len(turn.prompt_ids), len(output_ids), turn.cached_tokens)
        if turn.parse_tools:
            written = _with_closer(text, turn.closer) if turn.forced else text
            parsed = parse_tool_calls(turn.prefill + written, tool_names=turn.tool_names)
            content, calls, invalid = parsed.content, parsed.tool_calls, parsed.invalid_tool_calls
            if turn.forced and not calls:  # the grammar ends a call only once complete: the budget ran out
                content, invalid = "", [_unfinished_call(turn, text)]
        else:
            content, calls, invalid = text, [], []
        eos = self.session.engine.eos_token_ids
        ended = bool(output_ids) and output_ids[-1] in eos
        if calls:
            reason = "tool_calls"
        elif len(output_ids) >= turn.options["max_new_tokens"] and not ended:
            reason = "length"
        else:
            reason = "stop"
        return ChatReply(content, calls, invalid, text, reason, usage)


_CALL_NAME = re.compile(r'"name": "([^"\\]*)"')


def _with_closer(text: str, closer: str) -> str:
    """A forced call's text, its closer completed where the budget cut only the closer (the call's JSON
    is whole then, and the closer is fixed text that carries nothing)."""
    try:
        end = json.JSONDecoder().raw_decode(text)[1]
    except json.JSONDecodeError:
        return text
    return text[:end] + closer if closer.startswith(text[end:]) else text


def _unfinished_call(turn: _Turn, text: str) -> InvalidToolCall:
    """A forced call whose JSON the token budget cut short: reported as invalid, its raw text kept."""
    limit = turn.options["max_new_tokens"]
    error = (
        f"the token budget ran out (max_new_tokens={limit}) before the tool call was complete: its "
        "arguments are unfinished, so no call was made; raise max_new_tokens (max_tokens) to let the "
        "model finish it"
    )
    match = _CALL_NAME.search(text)
    name = match.group(1) if match and match.group(1) in turn.tool_names else None
    return InvalidToolCall(name, text, error)


class ChatStream:
    """Iterator over the content pieces of one turn; `reply` holds the ChatReply once it is exhausted."""

    def __init__(self, chat: ChatSession, messages, tools, tool_choice, response_schema, generation):
        self.chat = chat
        self.reply: ChatReply | None = None
        self._turn = chat._plan(messages, tools, tool_choice, response_schema, generation)
        self._iterator = self._run()

    @property
    def usage_so_far(self) -> tuple[int, int]:
        """(input_tokens, cached_tokens) of the prompt, known once the first piece is out."""
        return len(self._turn.prompt_ids), self._turn.cached_tokens

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        """Stop generating now (the session keeps what was generated); releases the session's turn lock."""
        self._iterator.close()

    def _run(self) -> Iterator[str]:
        turn, session = self._turn, self.chat.session
        holdback = _ToolTextHoldback(self.chat.tool_format) if turn.parse_tools else None
        with self.chat._lock.stream() as hold:
            self.chat._sync(turn)
            pieces: list[str] = []
            sent = ""
            for piece in session.stream(logits_processor=turn.processor, **turn.options):
                pieces.append(piece)
                if turn.prefill:
                    continue  # a forced call: nothing to show until it is parsed
                safe = holdback.push(piece) if holdback else piece
                if safe:
                    sent += safe
                    yield safe
                    hold.resumed()
            reply = self.chat._finish(turn, "".join(pieces))
        if holdback is not None and not turn.prefill:
            tail = reply.content[len(sent) :] if reply.content.startswith(sent) else ""
            if tail:
                yield tail
            reply = ChatReply(sent + tail, *_fields_after_content(reply))
        self.reply = reply


def _fields_after_content(reply: ChatReply) -> tuple:
    return reply.tool_calls, reply.invalid_tool_calls, reply.text, reply.finish_reason, reply.usage


class _ToolTextHoldback:
    """Passes text through while it cannot be part of a tool call; holds the rest back."""

    def __init__(self, tool_format: ToolFormat):
        self.opener = TOOL_SYNTAX[tool_format].opener.strip() or "{"
        self.bare_json = tool_format != "hermes"
        self.text = ""
        self.sent = 0
        self.holding = False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        if self.bare_json:
            head = self.text.lstrip()
            if not head or head[0] in "{[" or "<|python_tag|>".startswith(head[:14]):
                self.holding = True  # a bare JSON reply may be a call: decide at the end
                return ""
            return self._emit(len(self.text))
        at = self.text.find(self.opener)
        if at != -1:
            self.holding = True
            return self._emit(at)
        return self._emit(len(self.text) - _partial_suffix(self.text, self.opener))

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


__all__ = [
    "ChatReply",
    "ChatSession",
    "ChatStream",
    "ChatUsage",
    "encode_with_prefix",
    "normalize_tool_choice",
]
