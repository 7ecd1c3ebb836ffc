"""The LlamaIndex adapters with the real default model (SmolLM2-135M-Instruct): a planted fact answered
from a document several times the model's ~2.1k-token attention, and a real chat held by the memory block
as events. Marked slow; together under two minutes on 2 cores.

The >50k-token version of the query-engine run is `examples/llamaindex_query_long_doc.py --tokens 60000
--plant`, too long for CI (about 7 minutes of reading); its recorded output is in docs/llama_index.md.
"""

from __future__ import annotations

import pytest
from emllm.tasks import demo_text, fill_to_tokens
from llama_index.core import Document
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import Memory

from emllm_integrations.llama_index import EMLLM, EpisodicMemoryBlock, EpisodicQueryEngine
from emllm_integrations.llama_index.memory_block import PASSAGE_SEPARATOR

pytestmark = pytest.mark.slow

FACT = "\n\nThe secret code of the Longbourn library is 73914. Remember it. 73914 is the secret code.\n\n"
QUESTION = "What is the secret code of the Longbourn library?"
DOCUMENT_TOKENS = 6000  # 3x the attended tokens (64 initial + 1024 retrieved + 1024 local)


@pytest.fixture(scope="module")
def planted_document(smollm2):
    text = fill_to_tokens(smollm2.tokenizer, demo_text(), DOCUMENT_TOKENS)
    at = text.find("\n\n", int(len(text) * 0.4))
    return Document(text=text[:at] + FACT + text[at:], id_="pride-and-prejudice"), at


def test_query_engine_answers_a_planted_fact_far_outside_the_window(smollm2, planted_document):
    document, fact_at = planted_document
    llm = EMLLM(engine=smollm2, session_id=None, max_new_tokens=20)
    engine = EpisodicQueryEngine.from_documents([document], llm=llm, similarity_top_k=4, show_progress=False)
    session = smollm2.session(engine.session_id)
    stats = session.stats()
    assert stats.tokens > 0.95 * DOCUMENT_TOKENS and stats.events > 100
    retrieved = engine.retrieve(QUESTION)
    window = [n.node for n in retrieved if n.node.metadata["memory"] == "window"]
    assert window[0].start_char_idx > fact_at + len(FACT)  # the fact left the local window long ago
    events = [n.node.text for n in retrieved if n.node.metadata["memory"] == "event"]
    assert any("Longbourn library" in text or "73914" in text for text in events), events

    response = engine.query(QUESTION)
    assert "73914" in response.response, response.response
    for source in response.source_nodes:  # every source is a real span of the document
        node = source.node
        assert document.text[node.start_char_idx : node.end_char_idx] == node.text


def _reading_club(memory: Memory, turns: int = 24) -> None:
    """A chat where the user mentions a code early, then shares ~100-token novel passages."""
    text = demo_text()
    for i in range(turns):
        passage = "My locker code at the library is 73914." if i == 2 else text[i * 400 : (i + 1) * 400]
        memory.put(ChatMessage(role="user", content=passage))
        memory.put(ChatMessage(role="assistant", content="I see."))


def test_memory_block_holds_a_real_chat_as_events(smollm2):
    """Mechanics on the real model, and relevance: the planted message is among the 3 recalled."""
    block = EpisodicMemoryBlock(engine=smollm2, session_id="slow-memory", top_k=3, include_recent=False)
    memory = Memory.from_defaults(
        session_id="slow", token_limit=600, memory_blocks=[block], tokenizer_fn=smollm2.encode
    )
    _reading_club(memory)
    session = block.session()
    events = session.events()
    assert session.text.index("73914") < events[-1].char_end  # an event, far behind the local window
    assert 8 <= sum(e.size for e in events) / len(events) <= 128  # surprise events of the reference sizes
    passages = block._recall("What is my locker code at the library?", None).split(PASSAGE_SEPARATOR)
    assert 1 <= len(passages) <= 3
    positions = [session.text.index(p) for p in passages]  # real spans of the history, in time order
    assert positions == sorted(positions)
    assert any("73914" in p for p in passages), passages  # the planted message is recalled
