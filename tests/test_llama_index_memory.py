"""EpisodicMemoryBlock inside llama_index.core.memory.Memory, on a tiny random model over SmolLM2's
tokenizer: flushed history becomes events, recall returns them, and with our EMLLM as the chat LLM the
history stays in its session (nothing pasted, nothing read twice)."""

from __future__ import annotations

import itertools

import emllm
import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import Memory
from llama_index.core.storage.chat_store.sql import MessageStatus

from emllm_integrations.llama_index import EMLLM, EpisodicMemoryBlock
from emllm_integrations.llama_index.memory_block import PASSAGE_SEPARATOR

PLANTED = "Remember this: the secret code of the Longbourn library is 73914."


def small_memory(engine: emllm.EMLLM, block: EpisodicMemoryBlock, session_id: str = "alice") -> Memory:
    """A Memory whose FIFO holds ~80 tokens and flushes ~40 at a time (counted with the model's tokenizer)."""
    return Memory.from_defaults(
        session_id=session_id,
        token_limit=160,
        token_flush_size=40,
        chat_history_token_ratio=0.5,
        memory_blocks=[block],
        tokenizer_fn=engine.encode,
    )


def chat_turns(n: int) -> list[ChatMessage]:
    messages = []
    for i in range(n):
        user = PLANTED if i == 1 else f"Turn {i}: the weather in town number {i} is mild today."
        messages += [
            ChatMessage(role="user", content=user),
            ChatMessage(role="assistant", content=f"Noted {i}."),
        ]
    return messages


@pytest.fixture
def engine(make_smol_engine):
    return make_smol_engine()


def test_flushed_history_becomes_events(engine):
    block = EpisodicMemoryBlock(engine=engine)
    memory = small_memory(engine, block)
    memory.put_messages(chat_turns(12))

    flushed = memory.get_all(status=MessageStatus.ARCHIVED)
    assert 4 <= len(flushed) < 24 and len(memory.get_all(status=MessageStatus.ACTIVE)) + len(flushed) == 24
    session = block.session("alice")
    assert session.id == "memory-alice"  # one episodic session per Memory session
    assert session.text == "".join(f"{m.role.value}: {m.content}\n\n" for m in flushed)  # in order, once
    events = session.events()
    assert len(events) > 3 and session.stats().tokens == len(session.token_ids)
    for before, after in itertools.pairwise(events):  # events tile the text left of the window
        assert before.char_end == after.char_start
    planted = session.text.index(PLANTED)
    assert any(e.char_start <= planted < e.char_end for e in events)  # the planted message left the window
    assert len({e.size for e in events}) > 1  # surprise boundaries, not fixed blocks


def test_recall_returns_events_in_time_order(engine):
    block = EpisodicMemoryBlock(engine=engine, top_k=2)
    memory = small_memory(engine, block)
    memory.put_messages(chat_turns(12))
    session = block.session("alice")

    recalled = memory.get("What is the secret code of the library?")
    system = recalled[0]
    assert system.role.value == "system" and "<episodic_memory>" in system.content
    passages = block._recall("What is the secret code of the library?", "alice").split(PASSAGE_SEPARATOR)
    assert 1 <= len(passages) <= 3  # at most top_k events (neighbours merged) + the recent text
    positions = [session.text.index(p) for p in passages]
    assert positions == sorted(positions)  # in time order, each a real span of the flushed history
    events = session.events()
    assert passages[-1] == session.text[events[-1].char_end :].strip()  # recent text, not an event yet

    everything = EpisodicMemoryBlock(engine=engine, top_k=len(events))
    assert PLANTED in everything._recall("secret code", "alice")  # all events: the planted one among them


def test_with_our_llm_history_stays_in_its_session(make_smol_engine):
    llm = EMLLM(engine=make_smol_engine(), max_new_tokens=4)
    block = EpisodicMemoryBlock(llm=llm)
    memory = small_memory(llm.engine, block)
    usages = []
    for message in chat_turns(10)[::2]:
        memory.put(message)
        prompt = memory.get()
        assert not any("<memory>" in (m.content or "") for m in prompt)  # nothing pasted
        response = llm.chat(prompt)
        usages.append(response.raw["usage"])
        memory.put(response.message)

    flushed = memory.get_all(status=MessageStatus.ARCHIVED)
    assert flushed and [m.content for m in llm.archived()] == [m.content for m in flushed]
    session = llm.session()
    assert PLANTED in session.text and session.stats().events > 0
    for previous, usage in itertools.pairwise(usages):  # flushes cost nothing: all reused
        assert usage["cached_tokens"] >= previous["prompt_tokens"]


def test_block_needs_an_engine_or_our_llm(engine):
    with pytest.raises(ValueError, match="needs llm=EMLLM"):
        EpisodicMemoryBlock()
    with pytest.raises(TypeError, match=r"must be an emllm\.EMLLM"):
        EpisodicMemoryBlock(engine="smollm2")
    with pytest.raises(ValueError, match="needs a session_id"):
        EpisodicMemoryBlock(llm=EMLLM(engine=engine, session_id=None))
    assert EpisodicMemoryBlock(llm=EMLLM(engine=engine, session_id=None), session_id="s").archives_into_llm
