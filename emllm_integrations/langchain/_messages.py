"""Conversions between LangChain messages / tools and `emllm.chat` types, and replies back to AIMessages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from emllm.chat import ChatFormatError, ChatMessage, ToolCall, ToolSpec
from emllm.chat_session import ChatReply
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import (
    ChatMessage as LCChatMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.utils.function_calling import convert_to_openai_tool

_ROLE_ALIASES = {"human": "user", "ai": "assistant", "developer": "system"}
_SKIPPED_BLOCKS = {"tool_use", "tool_call", "tool_call_chunk", "reasoning", "thinking", "invalid_tool_call"}


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages -> emllm chat messages (text only; tool calls and results kept)."""
    if not messages:
        raise ChatFormatError("cannot answer an empty list of messages")
    return [_to_chat_message(m) for m in messages]


def _to_chat_message(message: BaseMessage) -> ChatMessage:
    text = content_text(message.content)
    if isinstance(message, SystemMessage):
        return ChatMessage("system", text)
    if isinstance(message, HumanMessage):
        return ChatMessage("user", text)
    if isinstance(message, AIMessage):
        calls = tuple(ToolCall(c["name"], dict(c["args"]), c.get("id") or "") for c in message.tool_calls)
        return ChatMessage("assistant", text, tool_calls=calls)
    if isinstance(message, ToolMessage):
        return ChatMessage("tool", text, tool_call_id=message.tool_call_id, name=message.name)
    if isinstance(message, LCChatMessage):
        return ChatMessage(_ROLE_ALIASES.get(message.role, message.role), text)  # type: ignore[arg-type]
    raise ChatFormatError(f"unsupported message type {type(message).__name__}")


def content_text(content: str | list) -> str:
    """The text of a message's content (a string, or a list of blocks: text kept, tool blocks skipped)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") not in _SKIPPED_BLOCKS:
            msg = f"EMLLM models read text only; got a {block.get('type')!r} content block"
            raise ChatFormatError(msg)
    return "".join(parts)


def to_tool_specs(tools: Sequence[Any] | None) -> list[ToolSpec]:
    """LangChain tools (BaseTool, functions, pydantic models, dicts) -> emllm tool specs."""
    specs = []
    for tool in tools or ():
        try:
            spec = ToolSpec.from_dict(convert_to_openai_tool(tool))
        except (ValueError, TypeError, KeyError) as exc:
            raise ChatFormatError(f"cannot use {tool!r} as a tool: {exc}") from exc
        specs.append(spec)
    return specs


def usage_metadata(reply: ChatReply) -> UsageMetadata:
    usage = reply.usage
    return UsageMetadata(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def response_metadata(reply: ChatReply, model_name: str) -> dict[str, Any]:
    return {"model_name": model_name, "model_provider": "emllm", "finish_reason": reply.finish_reason}


def tool_call_dicts(reply: ChatReply) -> tuple[list[dict], list[dict]]:
    calls = [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in reply.tool_calls]
    invalid = [
        {"name": c.name, "args": c.arguments, "id": c.id, "error": c.error, "type": "invalid_tool_call"}
        for c in reply.invalid_tool_calls
    ]
    return calls, invalid


def to_ai_message(reply: ChatReply, model_name: str) -> AIMessage:
    calls, invalid = tool_call_dicts(reply)
    return AIMessage(
        content=reply.content,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=usage_metadata(reply),
        response_metadata=response_metadata(reply, model_name),
    )


def last_chunk(reply: ChatReply, model_name: str, content: str = "") -> AIMessageChunk:
    """The closing stream chunk: leftover content, tool calls, usage and metadata.

    An invalid call's raw text goes out as a JSON string: LangChain reads chunk args as partial JSON and
    would otherwise close a cut-short `{"a": 6` into a valid-looking call `{"a": 6}`.
    """
    calls, invalid = tool_call_dicts(reply)
    chunks = [
        {"name": c["name"], "args": json.dumps(c["args"], ensure_ascii=False), "id": c["id"], "index": i}
        for i, c in enumerate(calls)
    ]
    chunks += [
        {
            "name": c["name"],
            "args": json.dumps(c["args"], ensure_ascii=False),
            "id": c["id"],
            "index": len(calls) + i,
        }
        for i, c in enumerate(invalid)
    ]
    return AIMessageChunk(
        content=content,
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(reply),
        response_metadata=response_metadata(reply, model_name),
        chunk_position="last",
    )


__all__ = [
    "content_text",
    "last_chunk",
    "to_ai_message",
    "to_chat_messages",
    "to_tool_specs",
    "usage_metadata",
]
