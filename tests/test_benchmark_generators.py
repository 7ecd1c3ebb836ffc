"""The generated inputs of the QA and conversation-memory benchmarks, the RAG baseline's retriever, and
how results are written into docs/benchmarks.md.

Tokenizer-level and with a toy embedding: no model weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from llama_index.core.base.embeddings.base import BaseEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import baselines
import conversation_memory
import qa_rag
from report import replace_section


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


def test_planted_novel_holds_every_fact_once_at_its_depth(tokenizer) -> None:
    text = qa_rag.planted_novel(tokenizer, 20_000)
    positions = []
    for fact, _, _ in qa_rag.PLANTED:
        assert text.count(fact) == 1
        positions.append(text.index(fact) / len(text))
    assert positions == sorted(positions)
    for at, depth in zip(positions, qa_rag.PLANT_DEPTHS, strict=True):
        assert abs(at - depth) < 0.03
    assert 19_000 < len(tokenizer.encode(text)) < 21_000


def test_every_question_has_its_expected_word_and_planted_answers_are_only_in_the_facts(tokenizer) -> None:
    novel = qa_rag.NOVEL.read_text(encoding="utf-8").lower()
    for task, question, expected in qa_rag.questions():
        assert question.endswith("?") and expected
        if task == "qa_planted":
            assert expected.lower() not in novel, f"{expected!r} is already in the novel"
        else:
            assert expected.lower() in novel, f"{expected!r} never occurs in the novel"


def test_conversation_states_the_facts_first_then_reaches_the_length(tokenizer) -> None:
    turns = conversation_memory.conversation(tokenizer, 5_000)
    assert turns[0][0] == "system"
    facts = [fact for fact, _, _ in conversation_memory.FACTS]
    assert [text for role, text in turns[1 : 2 * len(facts) : 2]] == facts
    assert [role for role, _ in turns[1:]] == ["user", "assistant"] * ((len(turns) - 1) // 2)
    body = sum(len(tokenizer.encode(text)) for _, text in turns[2 * len(facts) + 1 :])
    assert body >= 5_000 * 0.9
    later = " ".join(text for _, text in turns[2 * len(facts) + 1 :]).lower()
    for _, _, expected in conversation_memory.FACTS:
        assert expected.lower() not in later  # the facts are only where they were told


def test_truncated_baseline_keeps_only_the_latest_turns_that_fit(tokenizer) -> None:
    turns = conversation_memory.conversation(tokenizer, 8_000)
    messages = conversation_memory._fit([turns[0]], turns[1:], "What is my dog's name?", tokenizer)
    assert messages[0] == turns[0] and messages[-1] == ("user", "What is my dog's name?")
    kept = messages[1:-1]
    assert kept == turns[len(turns) - len(kept) :]  # a suffix of the conversation, whole exchanges
    assert kept[0][0] == "user"
    assert sum(len(tokenizer.encode(text)) for _, text in messages) <= conversation_memory.BUDGET_TOKENS


class _WordEmbedding(BaseEmbedding):
    """A toy embedding: one dimension per word of a small vocabulary."""

    def _vector(self, text: str) -> list[float]:
        words = ["cat", "dog", "fish", "bird"]
        return [float(text.lower().count(word)) + 1e-3 for word in words]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def test_chunk_retriever_returns_the_most_similar_chunks_in_text_order(tokenizer) -> None:
    texts = ["the cat sat", "a dog ran", "one fish swam", "the dog barked at the cat", "a bird sang"]
    retriever = baselines.ChunkRetriever(texts, tokenizer, 64, 2, _WordEmbedding())
    assert retriever.chunks("where is the dog?") == ["a dog ran", "the dog barked at the cat"]
    assert retriever.chunks("a cat and a bird") == ["the cat sat", "a bird sang"]


def test_replace_section_rewrites_one_section_and_keeps_the_blank_line_before_the_next(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nold b\n")
    replace_section(doc, "## A", "## A\n\n| new | a |\n")  # as the scripts pass it: one final newline
    assert doc.read_text() == "# Benchmarks\n\n## A\n\n| new | a |\n\n## B\n\nold b\n"
    replace_section(doc, "## B", "## B\n\nnew b\n")  # the last section
    replace_section(doc, "## C", "## C\n\nc\n")  # absent: appended
    assert doc.read_text().endswith("| new | a |\n\n## B\n\nnew b\n\n## C\n\nc\n")
