"""EpisodicMemoryBlock: a `llama_index.core.memory.Memory` block whose long-term memory is an episodic
session: chat history flushed out of Memory's FIFO queue is read by the model and cut into events where
the model is surprised, not into fixed chunks.

Two ways to use it:
- with `engine=emllm.EMLLM(...)`, for any chat LLM (OpenAI, Ollama, ...): flushed messages are read into
  a session of that engine, and `aget` returns the events the model's own keys find most relevant to the
  latest messages (plus the flushed text that has not become an event yet), as text to paste;
- with `llm=EMLLM(...)` when that EMLLM is also the chat LLM: flushed messages are archived into the
  LLM's session, where they already are (the LLM renders them after its system messages on every turn), so
  the model attends to them through episodic memory and nothing is pasted (`aget` returns "").
Either way the state persists with the engine's session store.
"""

from __future__ import annotations

import asyncio
from typing import Any

import emllm
from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock
from llama_index.core.bridge.pydantic import Field, model_validator
from llama_index.core.memory.memory import BaseMemoryBlock

from . import _persist
from .llm import EMLLM

DEFAULT_NAME = "episodic_memory"
PASSAGE_SEPARATOR = "\n...\n"


class EpisodicMemoryBlock(BaseMemoryBlock[str]):
    """Long-term chat memory as EM-LLM events.

    .. code-block:: python

        from llama_index.core.memory import Memory

        # any chat LLM: the block pastes the relevant events into the prompt
        block = EpisodicMemoryBlock(engine=emllm.EMLLM.from_pretrained())
        # our EMLLM as the chat LLM: history stays in its session, nothing is pasted
        block = EpisodicMemoryBlock(llm=llm)
        memory = Memory.from_defaults(token_limit=4000, memory_blocks=[block])
    """

    name: str = Field(default=DEFAULT_NAME, description="The name of the memory block.")
    llm: EMLLM | None = Field(
        default=None,
        description="The chat LLM, when it is an EMLLM: flushed history is archived into its session.",
    )
    engine: Any = Field(
        default=None,
        exclude=True,
        description="An emllm.EMLLM that reads the history for another chat LLM (ignored with `llm`).",
    )
    session_id: str | None = Field(
        default=None,
        description="The episodic session; None: the LLM's session (with `llm`), else 'memory-<Memory's "
        "session id>'.",
    )
    top_k: int = Field(default=3, ge=1, description="Events returned by `aget` (without `llm`).")
    query_messages: int = Field(
        default=2, ge=1, description="How many of the latest messages make the retrieval query."
    )
    include_recent: bool = Field(
        default=True,
        description="Also return flushed text that has not left the local window yet (not an event yet).",
    )

    @model_validator(mode="after")
    def _check_source(self) -> EpisodicMemoryBlock:
        if self.llm is None and self.engine is None:
            raise ValueError("EpisodicMemoryBlock needs llm=EMLLM(...) or engine=emllm.EMLLM(...)")
        if self.llm is None and not isinstance(self.engine, emllm.EMLLM):
            raise TypeError(f"engine must be an emllm.EMLLM, got {type(self.engine).__name__}")
        if self.llm is not None and self.session_id is None and self.llm.session_id is None:
            raise ValueError("with llm=..., the LLM needs a session_id (or give the block one)")
        return self

    @property
    def archives_into_llm(self) -> bool:
        """True when flushed history goes into the chat LLM's own session (nothing to paste)."""
        return self.llm is not None

    def session(self, memory_session_id: str | None = None) -> emllm.Session:
        """The episodic session this block reads history into."""
        if self.llm is not None:
            return self.llm.session(self.session_id)
        return self.engine.session(self._session_id(memory_session_id))

    def _session_id(self, memory_session_id: str | None) -> str:
        return self.session_id or f"memory-{memory_session_id or 'default'}"

    # -- Memory's interface -----------------------------------------------------------------------
    async def _aput(self, messages: list[ChatMessage]) -> None:
        if not messages:
            return
        if self.llm is not None:
            await asyncio.to_thread(self.llm.archive, messages, self.session_id)
            return
        memory_session = messages[0].additional_kwargs.get("session_id")
        await asyncio.to_thread(self._read, messages, memory_session)

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        if self.llm is not None or not messages:
            return ""
        query = "\n".join(filter(None, (message_text(m) for m in messages[-self.query_messages :])))
        if not query.strip():
            return ""
        return await asyncio.to_thread(self._recall, query, block_kwargs.get("session_id"))

    # -- reading and recalling --------------------------------------------------------------------
    def _read(self, messages: list[ChatMessage], memory_session_id: str | None) -> None:
        """Feed a flush of messages as one transcript (one pass, full chunks), then save the session."""
        transcript = "".join(
            f"{message.role.value}: {text}\n\n" for message in messages if (text := message_text(message))
        )
        if transcript:
            session = self.session(memory_session_id)
            session.feed(transcript, source_id=memory_session_id, progress=False)
            _persist.save_if_stored(session)

    def _recall(self, query: str, memory_session_id: str | None) -> str:
        """The most relevant events in time order, neighbours merged, then the recent text; as one string."""
        session = self.session(memory_session_id)
        hits = sorted(session.retrieve(query, k=self.top_k), key=lambda hit: hit.event_id)
        passages: list[str] = []
        for i, hit in enumerate(hits):
            if i and hit.event_id == hits[i - 1].event_id + 1:
                passages[-1] += hit.text
            else:
                passages.append(hit.text)
        if self.include_recent:
            events = session.events()
            passages.append(session.text[events[-1].char_end if events else 0 :])
        return PASSAGE_SEPARATOR.join(passage.strip() for passage in passages if passage.strip())


def message_text(message: ChatMessage) -> str:
    """A message as plain text: its text blocks, then its tool calls."""
    parts = [block.text for block in message.blocks if isinstance(block, TextBlock) and block.text]
    parts += [
        f"[called {block.tool_name}({block.tool_kwargs})]"
        for block in message.blocks
        if isinstance(block, ToolCallBlock)
    ]
    return "\n".join(parts)


__all__ = ["DEFAULT_NAME", "EpisodicMemoryBlock", "message_text"]
