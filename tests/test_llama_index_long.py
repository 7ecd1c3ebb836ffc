"""The query engine over a >50k-token document with the real default model: a planted fact, asked after
the whole document was read. Marked `long` (about 6 minutes of reading on 2 cores): DESIGN keeps all
slow tests under 10 minutes, so `make test` leaves it out; run it with `pytest -m long`. It fails with the
bundled 135M model (strict xfail, reason below): the issue's target, kept as the check a better default
model or better retrieval has to pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from emllm.tasks import fill_to_tokens
from llama_index.core import Document

from emllm_integrations.llama_index import EMLLM, EpisodicQueryEngine

pytestmark = [
    pytest.mark.slow,  # so that -m "not slow" (which replaces the configured -m "not long") leaves it out too
    pytest.mark.long,
    pytest.mark.xfail(
        strict=True,
        reason="measured 2026-11-27 with SmolLM2-135M: at 50k tokens the planted fact was not among the 8 "
        "source events (at 168k it was, and quoted it was answered); the default model is too small for this",
    ),
]

NOVEL = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
NOVEL_TOKENS = 56_000  # fill_to_tokens estimates from the opening pages; the session must hold > 50k
FACT = "\n\nThe secret code of the Longbourn library is 73914. Remember it. 73914 is the secret code.\n\n"
QUESTION = "What is the secret code of the Longbourn library?"


def test_query_engine_answers_a_planted_fact_from_a_50k_token_document(smollm2) -> None:
    text = fill_to_tokens(smollm2.tokenizer, NOVEL.read_text(encoding="utf-8"), NOVEL_TOKENS)
    at = text.find("\n\n", int(len(text) * 0.4))
    document = Document(text=text[:at] + FACT + text[at:], id_="pride-and-prejudice")
    llm = EMLLM(engine=smollm2, session_id=None, max_new_tokens=20)
    engine = EpisodicQueryEngine.from_documents(
        [document], llm=llm, similarity_top_k=8, quote_source_events=True, show_progress=False
    )
    session = smollm2.session(engine.session_id)
    assert session.stats().tokens > 50_000
    response = engine.query(QUESTION)
    events = [n.node.text for n in response.source_nodes if n.node.metadata["memory"] == "event"]
    assert any("73914" in text for text in events), events  # the fact is among the source events
    assert "73914" in response.response, response.response
