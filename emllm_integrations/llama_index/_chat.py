"""LlamaIndex chat messages and tools <-> `emllm.chat`, the framework-free layer that renders chats with
the model's template and parses tool calls (`emllm.chat_session.ChatSession` runs the turns).

Knows nothing about sessions: it converts messages, tools and replies between the two vocabularies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import emllm
from emllm import TokenBudgetError, chat
from emllm.chat_session import ChatReply
from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection

_MARKER = "\x00EMLLM-USER-CONTENT\x00"
_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def tool_specs(tools: Sequence[Any]) -> list[chat.ToolSpec]:
    """emllm tool specs from LlamaIndex tools (anything with `.metadata.to_openai_tool()`) or dicts."""
    dicts = []
    for tool in tools:
        metadata = getattr(tool, "metadata", None)
        dicts.append(metadata.to_openai_tool(skip_length_check=True) if metadata is not None else tool)
    return chat.as_tools(dicts)


def to_emllm_messages(messages: Sequence[ChatMessage]) -> list[chat.ChatMessage]:
    """emllm chat messages; tool results get the name of the call they answer."""
    names: dict[str, str] = {}
    out = []
    for message in messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise chat.ChatFormatError(f"cannot render a message with role {message.role!r}")
        calls = tuple(_tool_calls(message)) if role == "assistant" else ()
        names.update((call.id, call.name) for call in calls)
        call_id = message.additional_kwargs.get("tool_call_id") if role == "tool" else None
        name = message.additional_kwargs.get("name") or names.get(call_id or "")
        out.append(chat.ChatMessage(role, _text(message), calls, call_id, name if role == "tool" else None))
    return out


def _text(message: ChatMessage) -> str:
    return "\n".join(block.text for block in message.blocks if isinstance(block, TextBlock))


def _tool_calls(message: ChatMessage) -> list[chat.ToolCall]:
    calls = [
        chat.ToolCall(b.tool_name, _arguments(b.tool_kwargs), b.tool_call_id or chat.new_call_id())
        for b in message.blocks
        if isinstance(b, ToolCallBlock)
    ]
    for legacy in message.additional_kwargs.get("tool_calls") or []:  # OpenAI-style dicts
        if isinstance(legacy, dict):
            calls.extend(chat.as_message({"role": "assistant", "tool_calls": [legacy]}).tool_calls)
    return calls


def _arguments(kwargs: dict | str) -> dict:
    if isinstance(kwargs, dict):
        return kwargs
    try:
        parsed = json.loads(kwargs or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def assistant_message(reply: ChatReply) -> ChatMessage:
    """A finished turn as a LlamaIndex message: its text, then one ToolCallBlock per tool call. Calls that
    did not parse are kept in additional_kwargs["invalid_tool_calls"], with the finish reason."""
    blocks: list[Any] = [TextBlock(text=reply.content)] if reply.content or not reply.tool_calls else []
    blocks += [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in reply.tool_calls
    ]
    extra: dict[str, Any] = {"finish_reason": reply.finish_reason}
    if reply.invalid_tool_calls:
        extra["invalid_tool_calls"] = [vars(call) for call in reply.invalid_tool_calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def tool_selections(message: ChatMessage) -> list[ToolSelection]:
    calls = [block for block in message.blocks if isinstance(block, ToolCallBlock)]
    return [
        ToolSelection(
            tool_id=c.tool_call_id or "",
            tool_name=c.tool_name,
            tool_kwargs=_arguments(c.tool_kwargs),
        )
        for c in calls
    ]


def no_tool_call_error(message: ChatMessage) -> ValueError:
    """Why a reply that should hold a tool call holds none: TokenBudgetError when `max_new_tokens` cut the
    call short, else a ValueError naming the invalid calls' errors or quoting the reply."""
    extra = message.additional_kwargs
    errors = [call.get("error") or "" for call in extra.get("invalid_tool_calls") or []]
    if not errors:
        return ValueError(f"expected at least one tool call, got: {message.content!r}")
    msg = "expected at least one tool call; the reply's call is invalid: " + "; ".join(errors)
    return TokenBudgetError(msg) if extra.get("finish_reason") == "length" else ValueError(msg)


def keep_first_tool_call(message: ChatMessage) -> None:
    """Drop every tool call after the first (when parallel calls are not allowed)."""
    calls = [block for block in message.blocks if isinstance(block, ToolCallBlock)]
    for extra in calls[1:]:
        message.blocks.remove(extra)


def user_turn_frame(engine: emllm.EMLLM, system_prompt: str | None = None) -> tuple[str, str]:
    """(before, after): the rendered prompt of one user turn is before + content + after, `after` ending
    with the assistant's turn opened (the generation prompt)."""
    messages = [chat.ChatMessage("user", _MARKER)]
    if system_prompt:
        messages.insert(0, chat.ChatMessage("system", system_prompt))
    before, after = chat.render_chat(engine.tokenizer, messages).split(_MARKER)
    return before, after


__all__ = [
    "assistant_message",
    "keep_first_tool_call",
    "no_tool_call_error",
    "to_emllm_messages",
    "tool_selections",
    "tool_specs",
    "user_turn_frame",
]
