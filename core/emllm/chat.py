"""Chat messages, tools and tool calls, framework-free: render a conversation with the model's chat
template (tools included) and parse tool calls back out of generated text.

Used by the CLI and by the LangChain and LlamaIndex adapters, which convert their own message types to
`ChatMessage` and back. Knows nothing about models, sessions or frameworks: it sees a tokenizer's chat
template and text.

Tool-call formats (`ToolFormat`):
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Hermes, Qwen 2/2.5/3).
  Also the default for templates without tool support, with the prompt in `DEFAULT_TOOL_PROMPT`.
- "llama3": a bare `{"name": ..., "parameters": {...}}` object, optionally after `<|python_tag|>`.
- "json": a bare `{"name": ..., "arguments": {...}}` object (or a list of them).
The parser accepts all three whatever the format; the format picks how forced calls are written.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import EMLLMError

Role = Literal["system", "user", "assistant", "tool"]
ToolFormat = Literal["hermes", "llama3", "json"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
TOOL_FORMATS: tuple[str, ...] = ("hermes", "llama3", "json")


class ChatFormatError(EMLLMError, ValueError):
    """Messages or tools that cannot be rendered: empty history, unknown role, invalid tool schema."""


# -- data -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made: tool name, parsed JSON arguments, and an id tying it to its result."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())


@dataclass(frozen=True)
class InvalidToolCall:
    """Text that looked like a tool call but did not parse: kept raw, with the reason."""

    name: str | None
    arguments: str | None
    error: str
    id: str = field(default_factory=lambda: new_call_id())


@dataclass(frozen=True)
class ChatMessage:
    """One turn. `tool_calls` only on assistant turns; `tool_call_id` (and `name`) on tool results."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ChatFormatError(f"unknown message role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise ChatFormatError(f"message content must be text, got {type(self.content).__name__}")
        if self.tool_calls and self.role != "assistant":
            raise ChatFormatError(f"only assistant messages carry tool calls, not {self.role!r} messages")


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: name, description and a JSON schema (type object) of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", self.name):
            raise ChatFormatError(f"invalid tool name {self.name!r}: use letters, digits, _ . - (max 128)")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ChatFormatError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolSpec:
        """From OpenAI's `{"type": "function", "function": {...}}` or a bare name/description/parameters."""
        if not isinstance(data, Mapping):
            raise ChatFormatError(f"a tool must be a mapping, got {type(data).__name__}")
        spec = data.get("function", data)
        if "name" not in spec:
            raise ChatFormatError(f"tool definition without a name: {json.dumps(dict(spec))[:200]}")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description") or "", dict(parameters))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI function-tool dict that Hugging Face chat templates expect."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ParsedReply:
    """Generated text split into plain content and tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def as_message(message: ChatMessage | Mapping[str, Any]) -> ChatMessage:
    """A ChatMessage from itself or an OpenAI-style dict (role, content, tool_calls, tool_call_id, name)."""
    if isinstance(message, ChatMessage):
        return message
    if not isinstance(message, Mapping) or "role" not in message:
        raise ChatFormatError(f"a message needs a role: {message!r}"[:200])
    calls = tuple(_as_tool_call(c) for c in message.get("tool_calls") or ())
    content = message.get("content")
    return ChatMessage(
        role=message["role"],
        content="" if content is None else content,
        tool_calls=calls,
        tool_call_id=message.get("tool_call_id"),
        name=message.get("name"),
    )


def _as_tool_call(call: ToolCall | Mapping[str, Any]) -> ToolCall:
    if isinstance(call, ToolCall):
        return call
    spec = call.get("function", call)
    arguments = spec.get("arguments", spec.get("args", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ChatFormatError(f"tool call arguments are not JSON: {arguments[:200]!r}") from exc
    return ToolCall(spec["name"], dict(arguments), call.get("id") or new_call_id())


# -- template capabilities ----------------------------------------------------------------------------------
def chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list itself."""
    template = chat_template(tokenizer)
    return bool(template) and re.search(r"\btools\b", template) is not None


def detect_tool_format(tokenizer) -> ToolFormat:
    """The tool-call format the model was trained on, read off its chat template (hermes by default)."""
    template = chat_template(tokenizer) or ""
    if not template_supports_tools(tokenizer) or "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "parameters" in template:
        return "llama3"
    return "json"


@dataclass(frozen=True)
class ToolCallSyntax:
    """How one format writes a call: text before the JSON, the arguments key, text after it."""

    opener: str
    arguments_key: str
    closer: str


TOOL_SYNTAX: dict[str, ToolCallSyntax] = {
    "hermes": ToolCallSyntax("<tool_call>\n", "arguments", "\n</tool_call>"),
    "llama3": ToolCallSyntax("", "parameters", ""),
    "json": ToolCallSyntax("", "arguments", ""),
}


def format_tool_call(call: ToolCall, tool_format: ToolFormat = "hermes") -> str:
    """A call as the model writes it (canonical JSON: what constrained decoding generates too)."""
    syntax = TOOL_SYNTAX[tool_format]
    body = json.dumps({"name": call.name, syntax.arguments_key: call.arguments}, ensure_ascii=False)
    return syntax.opener + body + syntax.closer


def tool_call_schema(tools: Sequence[ToolSpec], tool_format: ToolFormat = "hermes") -> dict[str, Any]:
    """JSON schema of one call to any of `tools` (for constrained decoding of forced calls)."""
    if not tools:
        raise ChatFormatError("a forced tool call needs at least one tool")
    key = TOOL_SYNTAX[tool_format].arguments_key
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, key: tool.parameters},
            "required": ["name", key],
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


# -- rendering --------------------------------------------------------------------------------------------
DEFAULT_TOOL_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions, as JSON schemas:
<tools>
{tools}
</tools>

To call a function, reply with one block per call, each holding a JSON object with the function's name \
and its arguments:
<tool_call>
{{"name": "<function-name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>
The results come back in <tool_response></tool_response> blocks."""


def default_tool_prompt(tools: Sequence[ToolSpec]) -> str:
    """The system-prompt section that describes tools to a model whose template has no tool support."""
    listing = "\n".join(json.dumps(tool.to_openai(), ensure_ascii=False) for tool in tools)
    return DEFAULT_TOOL_PROMPT.format(tools=listing)


def as_tools(tools: Iterable[ToolSpec | Mapping[str, Any]] | None) -> list[ToolSpec]:
    specs = [t if isinstance(t, ToolSpec) else ToolSpec.from_dict(t) for t in tools or ()]
    names = [t.name for t in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ChatFormatError(f"tool names must be unique; repeated: {duplicates}")
    return specs


def render_chat(
    tokenizer,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    tools: Sequence[ToolSpec | Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    tool_format: ToolFormat | None = None,
) -> str:
    """The prompt text for `messages` (and `tools`), through the tokenizer's chat template.

    Templates that render tools get them (and tool calls / tool results) natively. Otherwise tools
    are described in the system prompt (`DEFAULT_TOOL_PROMPT`), assistant tool calls are written in
    `tool_format` (hermes by default) and tool results become a user turn of `<tool_response>`
    blocks. Tokenizers without a chat template get a plain "role: content" transcript.
    """
    chat = [as_message(m) for m in messages]
    if not chat:
        raise ChatFormatError("cannot render an empty conversation: give at least one message")
    specs = as_tools(tools)
    if chat_template(tokenizer) is None:
        plain = _without_tool_turns(chat, specs, tool_format)
        return _plain_transcript(plain, add_generation_prompt)
    if template_supports_tools(tokenizer):
        dicts = [_native_dict(m) for m in chat]
        openai_tools = [t.to_openai() for t in specs] or None
        return _apply_template(tokenizer, dicts, openai_tools, add_generation_prompt)
    dicts = [{"role": m.role, "content": m.content} for m in _without_tool_turns(chat, specs, tool_format)]
    return _apply_template(tokenizer, dicts, None, add_generation_prompt)


def _native_dict(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        data["tool_call_id"] = message.tool_call_id
        if message.name:
            data["name"] = message.name
    return data


def _without_tool_turns(
    chat: list[ChatMessage], tools: list[ToolSpec], tool_format: ToolFormat | None
) -> list[ChatMessage]:
    """Rewrite tools, tool calls and tool results as plain system / assistant / user text."""
    fmt = tool_format or "hermes"
    out: list[ChatMessage] = []
    if tools:
        prompt = default_tool_prompt(tools)
        if chat[0].role == "system":
            out.append(ChatMessage("system", f"{chat[0].content}\n\n{prompt}" if chat[0].content else prompt))
            chat = chat[1:]
        else:
            out.append(ChatMessage("system", prompt))
    for message in chat:
        if message.role == "assistant" and message.tool_calls:
            calls = "\n".join(format_tool_call(c, fmt) for c in message.tool_calls)
            out.append(ChatMessage("assistant", f"{message.content}\n{calls}" if message.content else calls))
        elif message.role == "tool":
            block = _tool_response(message)
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{block}")
            else:
                out.append(ChatMessage("user", block))
        else:
            out.append(message)
    return out


def _tool_response(message: ChatMessage) -> str:
    body: dict[str, Any] = {"name": message.name} if message.name else {}
    try:
        body["content"] = json.loads(message.content)
    except (json.JSONDecodeError, TypeError):
        body["content"] = message.content
    return f"<tool_response>\n{json.dumps(body, ensure_ascii=False)}\n</tool_response>"


def _apply_template(
    tokenizer, dicts: list[dict], tools: list[dict] | None, add_generation_prompt: bool
) -> str:
    from jinja2 import TemplateError  # transformers' own dependency for chat templates

    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(dicts, **kwargs)
    except TemplateError as first:  # strict templates (role alternation): merge same-role neighbours
        merged = _merge_neighbours(dicts)
        if merged == dicts:
            raise ChatFormatError(f"the chat template rejected the conversation: {first}") from first
        try:
            return tokenizer.apply_chat_template(merged, **kwargs)
        except TemplateError as exc:
            raise ChatFormatError(f"the chat template rejected the conversation: {exc}") from exc


def _merge_neighbours(dicts: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for d in dicts:
        plain = set(d) == {"role", "content"}
        if merged and plain and set(merged[-1]) == {"role", "content"} and merged[-1]["role"] == d["role"]:
            merged[-1] = {"role": d["role"], "content": f"{merged[-1]['content']}\n\n{d['content']}"}
        else:
            merged.append(dict(d))
    return merged


def _plain_transcript(chat: list[ChatMessage], add_generation_prompt: bool) -> str:
    text = "".join(f"{m.role}: {m.content}\n\n" for m in chat)
    return text + ("assistant:" if add_generation_prompt else "")


# -- parsing ----------------------------------------------------------------------------------------------
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)


def parse_tool_calls(text: str, *, tool_names: Iterable[str] | None = None) -> ParsedReply:
    """Split generated text into content and tool calls; never raises on malformed calls.

    Recognises Hermes/Qwen `<tool_call>` blocks anywhere in the text, and a reply that is only a
    Llama-3.1 / plain JSON call (`{"name", "parameters" | "arguments"}`, a list of them, `;`-separated,
    after `<|python_tag|>` or in a ```json fence). A `<tool_call>` block that does not parse becomes an
    InvalidToolCall; a bare JSON reply counts as a call only if its name is one of `tool_names`
    (when given), so a JSON answer is not mistaken for a call.
    """
    names = set(tool_names) if tool_names is not None else None
    if "<tool_call>" in text:
        return _parse_hermes(text, names)
    stripped = text.strip()
    body = stripped.removeprefix("<|python_tag|>").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if body[:1] in "{[":
        calls = _parse_bare_json(body, names)
        if calls is not None:
            return ParsedReply("", calls)
    return ParsedReply(text)


def _parse_hermes(text: str, names: set[str] | None) -> ParsedReply:
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for match in _HERMES_BLOCK.finditer(text):
        raw = match.group(1)
        call = _call_from_json_text(raw, names)
        if isinstance(call, ToolCall):
            calls.append(call)
        else:
            invalid.append(call)
    content = _HERMES_BLOCK.sub("", text).strip()
    return ParsedReply(content, calls, invalid)


def _parse_bare_json(body: str, names: set[str] | None) -> list[ToolCall] | None:
    pieces = [body]
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        pieces = [p for p in body.split(";") if p.strip()]
        try:
            data = [json.loads(p) for p in pieces]
        except json.JSONDecodeError:
            return None
    items = data if isinstance(data, list) else [data]
    calls = [_call_from_data(item, names) for item in items]
    if not calls or not all(isinstance(c, ToolCall) for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _call_from_json_text(raw: str, names: set[str] | None) -> ToolCall | InvalidToolCall:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        name = re.search(r'"name"\s*:\s*"([^"]*)"', raw)
        return InvalidToolCall(name.group(1) if name else None, raw, f"tool call is not valid JSON: {exc}")
    call = _call_from_data(data, names)
    if isinstance(call, InvalidToolCall):
        return InvalidToolCall(call.name, raw, call.error, call.id)
    return call


def _call_from_data(data: Any, names: set[str] | None) -> ToolCall | InvalidToolCall:
    raw = json.dumps(data, ensure_ascii=False)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return InvalidToolCall(None, raw, "a tool call must be a JSON object with a string 'name'")
    name = data["name"]
    if names is not None and name not in names:
        return InvalidToolCall(name, raw, f"unknown tool {name!r}; available: {sorted(names)}")
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return InvalidToolCall(name, raw, "tool call arguments are a string that is not JSON")
    if not isinstance(arguments, dict):
        return InvalidToolCall(name, raw, "tool call arguments must be a JSON object")
    call_id = data.get("id") if isinstance(data.get("id"), str) else new_call_id()
    return ToolCall(name, arguments, call_id)


__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "ROLES",
    "TOOL_FORMATS",
    "TOOL_SYNTAX",
    "ChatFormatError",
    "ChatMessage",
    "InvalidToolCall",
    "ParsedReply",
    "Role",
    "ToolCall",
    "ToolCallSyntax",
    "ToolFormat",
    "ToolSpec",
    "as_message",
    "as_tools",
    "chat_template",
    "default_tool_prompt",
    "detect_tool_format",
    "format_tool_call",
    "new_call_id",
    "parse_tool_calls",
    "render_chat",
    "template_supports_tools",
    "tool_call_schema",
]
