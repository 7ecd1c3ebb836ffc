"""LlamaIndex chat messages and tools <-> `emllm.chat` (the framework-free renderer and tool-call parser).

Knows nothing about sessions: it turns messages into prompt tokens and generated text back into messages.
"""

from __future__ import annotations

import emllm

_MARKER = "\x00EMLLM-USER-CONTENT\x00"


def user_turn_frame(engine: emllm.EMLLM, system_prompt: str | None = None) -> tuple[str, str]:
    """(before, after): the chat-rendered prompt of one user turn is before + content + after, `after`
    ending with the assistant's turn opened (the generation prompt)."""
    messages = [{"role": "user", "content": _MARKER}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        system = f"{system_prompt}\n\n" if system_prompt else ""
        rendered = f"{system}User: {_MARKER}\nAssistant:"
    before, after = rendered.split(_MARKER)
    return before, after


__all__ = ["user_turn_frame"]
