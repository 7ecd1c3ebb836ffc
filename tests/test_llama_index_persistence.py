"""The LlamaIndex adapters over a session store: what survives a restart (documents read once, chat
sessions, memory), and the clear errors for a store written by another model or too small a disk budget.
A "restart" is a second engine over the same store folder after the first one closed."""

from __future__ import annotations

import emllm
import pytest
from conftest import tiny_smol_model
from emllm.tasks import demo_text
from llama_index.core import Document
from llama_index.core.base.llms.types import ChatMessage

from emllm_integrations.llama_index import EMLLM, EpisodicMemoryBlock, EpisodicQueryEngine
from emllm_integrations.llama_index._budget import estimate_bytes

TEXT = demo_text()
DOCS = [Document(text=TEXT[:2400], id_="chapter-1"), Document(text=TEXT[2400:4000], id_="chapter-2")]
QUESTION = "Who is Mr. Bingley?"


@pytest.fixture
def open_engine(smol_tokenizer, tmp_path):
    """open_engine(seed=0, **store_options): a tiny engine over the test's store folder (seed = weights)."""
    engines = []

    def build(seed: int = 0, **store_options) -> emllm.EMLLM:
        config = emllm.EMLLMConfig(
            n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16
        )
        store = emllm.SessionStore(tmp_path / "store", **store_options)
        model = tiny_smol_model(smol_tokenizer, seed=seed)
        engine = emllm.EMLLM(model, smol_tokenizer, config, name=f"tiny-smollm2-{seed}", store=store)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def test_a_reopened_query_engine_answers_without_reading_again(open_engine):
    first = open_engine()
    engine = EpisodicQueryEngine.from_documents(
        DOCS, llm=EMLLM(engine=first, max_new_tokens=6), session_id="novel"
    )
    before = engine.query(QUESTION)
    held = len(first.session("novel").token_ids)
    saved = first.store.info("novel")
    assert 0.9 < estimate_bytes(first, saved.tokens) / saved.bytes < 1.1  # the budget check's estimate
    first.close()

    second = open_engine()
    llm = EMLLM(engine=second, max_new_tokens=6)
    reopened = EpisodicQueryEngine.from_session("novel", llm=llm)
    session = second.session("novel")
    restored = session.stats().tokens_computed  # the counter is restored with the session
    assert len(session.token_ids) <= held  # what was saved: the documents (the question came after)
    after = reopened.query(QUESTION)
    assert after.response == before.response  # the same state before the question, the same answer
    assert [n.node.node_id for n in after.source_nodes] == [n.node.node_id for n in before.source_nodes]
    assert session.stats().tokens_computed - restored < 40  # the question and its answer only

    again = EpisodicQueryEngine.from_documents(DOCS, llm=llm, session_id="novel", show_progress=False)
    assert again.documents == reopened.documents and session.stats().tokens_computed - restored < 40


def test_a_store_written_by_another_model_is_refused(open_engine):
    first = open_engine(seed=0)
    EpisodicQueryEngine.from_documents(DOCS, llm=EMLLM(engine=first), session_id="novel", show_progress=False)
    first.close()

    other = EMLLM(engine=open_engine(seed=1))
    with pytest.raises(emllm.ModelMismatchError, match="was saved with model 'tiny-smollm2-0'"):
        EpisodicQueryEngine.from_session("novel", llm=other)
    with pytest.raises(emllm.ModelMismatchError):
        EpisodicQueryEngine.from_documents(DOCS, llm=other, session_id="novel", show_progress=False)


def test_documents_larger_than_the_disk_budget_are_refused_before_reading(open_engine, smol_tokenizer):
    probe = open_engine()
    budget = estimate_bytes(probe, 300)  # room for about 300 tokens; the documents are ~1100
    probe.close()
    engine = open_engine(max_disk_bytes=budget)
    with pytest.raises(emllm.DiskBudgetError, match="room for about 300 tokens"):
        EpisodicQueryEngine.from_documents(
            DOCS, llm=EMLLM(engine=engine), session_id="big", show_progress=False
        )
    assert engine.session("big").stats().tokens_computed == 0  # refused before reading anything
    EpisodicQueryEngine.from_documents([Document(text="A short note.")], llm=EMLLM(engine=engine))


def test_chat_sessions_and_archived_history_survive_a_restart(open_engine):
    first = open_engine()
    llm = EMLLM(engine=first, max_new_tokens=4)
    history = [
        ChatMessage(role="user", content="Remember: the code is 73914."),
        ChatMessage(role="assistant", content="OK."),
    ]
    llm.archive(history)
    messages = [ChatMessage(role="user", content="What is the code?")]
    reply = llm.chat(messages)
    held = len(llm.session().token_ids)
    first.close()

    llm = EMLLM(engine=open_engine(), max_new_tokens=4)
    assert [m.content for m in llm.archived()] == [m.content for m in history]
    again = llm.chat(messages)
    assert again.message.content == reply.message.content
    assert again.raw["usage"]["cached_tokens"] == again.raw["usage"]["prompt_tokens"] < held


async def test_the_memory_block_recalls_after_a_restart(open_engine):
    first = open_engine()
    block = EpisodicMemoryBlock(engine=first, top_k=50)
    messages = [
        ChatMessage(role="user", content=f"Fact {i}: the shed number {i} is painted blue.") for i in range(8)
    ]
    messages.insert(2, ChatMessage(role="user", content="The secret code of the library is 73914."))
    await block.aput(messages, session_id="alice")  # as Memory flushes them
    text = block.session("alice").text
    first.close()

    reopened = EpisodicMemoryBlock(engine=open_engine(), top_k=50)
    session = reopened.session("alice")
    assert session.text == text  # restored, not read again: nothing was fed to this engine
    computed = session.stats().tokens_computed
    assert "73914" in await reopened.aget(messages[-1:], session_id="alice")
    assert session.stats().tokens_computed == computed  # recalling reads nothing into the session
