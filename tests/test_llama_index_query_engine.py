"""EpisodicQueryEngine on a tiny random model over SmolLM2's tokenizer: ingestion, source nodes that point at
real document spans, reuse without re-reading, streaming and async, bad input."""

from __future__ import annotations

import emllm
import pytest
from emllm.tasks import demo_text
from llama_index.core import Document
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.llms import MockLLM

from emllm_integrations.llama_index import EMLLM, EpisodicQueryEngine

TEXT = demo_text()


@pytest.fixture
def docs():
    """Two documents of real prose, ~900 tokens in all: well past the tiny engine's 64-token window."""
    return [
        Document(text=TEXT[:2400], id_="chapter-1", metadata={"title": "Chapter 1"}),
        Document(text=TEXT[2400:4000], id_="chapter-2", metadata={"title": "Chapter 2"}),
    ]


@pytest.fixture
def llm(make_smol_engine):
    return EMLLM(engine=make_smol_engine(), max_new_tokens=6)


def _document_text(docs, node):
    return {doc.doc_id: doc.text for doc in docs}[node.ref_doc_id]


def test_source_nodes_are_real_document_spans(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, similarity_top_k=5, show_progress=False)
    response = engine.query("What did Mrs. Bennet say about Netherfield?")

    assert isinstance(response, Response) and response.response
    events = [n for n in response.source_nodes if n.node.metadata["memory"] == "event"]
    assert len(events) == 5
    assert [n.score for n in events] == sorted((n.score for n in events), reverse=True)
    for item in response.source_nodes:
        node = item.node
        assert node.ref_doc_id in {"chapter-1", "chapter-2"}
        assert node.text and _document_text(docs, node)[node.start_char_idx : node.end_char_idx] == node.text
        assert node.metadata["title"] in {"Chapter 1", "Chapter 2"}
    for item in events:  # an event's tokens lie in the session's timeline
        assert item.node.metadata["token_start"] < item.node.metadata["token_end"]
    # the text every answer attends whole: the end of the last document is in the local window
    window = [n.node for n in response.source_nodes if n.node.metadata["memory"] == "window"]
    assert window and window[-1].ref_doc_id == "chapter-2" and window[-1].end_char_idx == len(docs[1].text)
    assert response.metadata["tokens_computed"] < 64  # the question and the answer, not the documents


def test_every_layer_attends_the_source_events_while_answering(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, similarity_top_k=2, show_progress=False)
    session = llm.engine.session(engine.session_id)
    response = engine.query("What did Mrs. Bennet say about Netherfield?")
    sources = {
        n.node.metadata["event_id"] for n in response.source_nodes if n.node.metadata["memory"] == "event"
    }
    assert len(sources) == 2
    assert all(sources <= set(layer._selection) for layer in session.layers)

    engine.attend_source_events = False  # the attention's own retrieval alone
    engine.query("What did Mrs. Bennet say about Netherfield?")
    assert not all(sources <= set(layer._selection) for layer in session.layers)


def test_the_source_events_are_the_only_question_recall(llm, docs):
    """One probe per query (the question alone, for the source nodes): the engine's own question recall,
    which would probe the templated prompt, is off while the query engine answers."""
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, similarity_top_k=2, show_progress=False)
    session = llm.engine.session(engine.session_id)
    assert llm.engine.config.question_recall > 0
    probes = []
    rank_events = session._rank_events
    session._rank_events = lambda ids: probes.append(ids) or rank_events(ids)
    engine.query("What did Mrs. Bennet say about Netherfield?")
    assert probes == [llm.engine.encode("What did Mrs. Bennet say about Netherfield?")]


def test_quoted_source_events_are_read_before_the_question(llm, docs):
    engine = EpisodicQueryEngine.from_documents(
        docs, llm=llm, similarity_top_k=2, quote_source_events=True, show_progress=False
    )
    session = llm.engine.session(engine.session_id)
    documents_end = len(session.text)
    response = engine.query("What did Mrs. Bennet say about Netherfield?")
    after = session.text[documents_end:]
    _, quoted = after.split("What did Mrs. Bennet say about Netherfield?")[0].split("Passages:")
    for source in response.source_nodes:
        if source.node.metadata["memory"] == "event":
            assert " ".join(source.node.text.split()) in " ".join(quoted.split())
    assert engine.query("What did Mrs. Bennet say about Netherfield?").response == response.response


def test_documents_are_read_once_per_session(llm, docs):
    first = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    session = llm.engine.session(first.session_id)
    read = session.stats().tokens_computed
    assert read >= sum(len(llm.engine.encode(doc.text)) for doc in docs)

    again = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    reopened = EpisodicQueryEngine.from_session(first.session_id, llm=llm)
    assert again.session_id == reopened.session_id == first.session_id
    assert session.stats().tokens_computed == read  # nothing read again
    assert [d.doc_id for d in reopened.documents] == ["chapter-1", "chapter-2"]

    reopened.query("Who is Mr. Bingley?")
    first.query("Who is Mr. Bingley?")
    assert session.stats().tokens_computed - read < 2 * 40  # two questions and answers, nothing more

    other = EpisodicQueryEngine.from_documents(docs[:1], llm=llm, show_progress=False)
    assert other.session_id != first.session_id


def test_new_documents_under_the_same_session_id_are_read_afresh(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, session_id="library", show_progress=False)
    engine = EpisodicQueryEngine.from_documents(docs[1:], llm=llm, session_id="library", show_progress=False)
    assert [d.doc_id for d in engine.documents] == ["chapter-2"]
    nodes = engine.retrieve("Netherfield")
    assert nodes and {n.node.ref_doc_id for n in nodes} == {"chapter-2"}


def test_a_question_gets_the_same_answer_and_sources_whatever_was_asked_before(make_smol_engine, docs):
    """Answers long enough to push the documents' end out of the 64-token window: the engine still
    returns to the documents exactly as the first question found them."""
    llm = EMLLM(engine=make_smol_engine(), max_new_tokens=48)
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    session = llm.engine.session(engine.session_id)
    documents_events = len(session.timeline.events)
    first = engine.query("Who is Mr. Bingley?")
    assert len(session.timeline.events) > documents_events  # the question and answer pushed events out
    engine.query("What did Mrs. Bennet say about Netherfield?")
    again = engine.query("Who is Mr. Bingley?")
    assert again.response == first.response
    assert [(n.node.node_id, n.score) for n in again.source_nodes] == [
        (n.node.node_id, n.score) for n in first.source_nodes
    ]


def test_streaming_answer_matches_the_plain_one(make_smol_engine, docs):
    def build(streaming):  # fresh engines with the same weights: the same state before the question
        llm = EMLLM(engine=make_smol_engine(), max_new_tokens=6)
        return EpisodicQueryEngine.from_documents(docs, llm=llm, streaming=streaming, show_progress=False)

    plain = build(False).query("Who is Mr. Bingley?")
    streamed = build(True).query("Who is Mr. Bingley?")
    assert isinstance(streamed, StreamingResponse)
    pieces = list(streamed.response_gen)
    assert len(pieces) > 1 and "".join(pieces) == plain.response
    assert [n.node.node_id for n in streamed.source_nodes] == [n.node.node_id for n in plain.source_nodes]


def test_an_answer_prefix_is_written_for_the_model_and_returned(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    plain = engine.query("Who is Mr. Bingley?")
    engine.answer_prefix = " Mr. Bingley is"
    prefixed = engine.query("Who is Mr. Bingley?")
    assert prefixed.response.startswith(" Mr. Bingley is") and prefixed.response != plain.response
    engine.streaming = True
    assert next(iter(engine.query("Who is Mr. Bingley?").response_gen)) == " Mr. Bingley is"


async def test_async_query_and_async_streaming(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    response = await engine.aquery("Who is Mr. Bingley?")
    assert isinstance(response, Response) and response.response and response.source_nodes

    engine.streaming = True
    streamed = await engine.aquery("Who is Mr. Bingley?")
    assert isinstance(streamed, AsyncStreamingResponse)
    pieces = [piece async for piece in streamed.async_response_gen()]
    assert "".join(pieces) == response.response  # the same state before each question: same greedy answer


def test_progress_bar_counts_every_document_token(llm, docs, capsys):
    EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=True)
    err = capsys.readouterr().err
    total = sum(len(llm.engine.encode(doc.text)) for doc in docs)
    assert "reading 2 documents" in err and f"{total}/{total}" in err


@pytest.mark.parametrize(
    "documents",
    [[], [Document(text="")], [Document(text="Some text.", id_="a"), Document(text="  \n ", id_="b")]],
    ids=["none", "empty", "one-blank"],
)
def test_empty_documents_are_refused(llm, documents):
    with pytest.raises(emllm.EmptyInputError, match=r"no documents|have no text"):
        EpisodicQueryEngine.from_documents(documents, llm=llm, show_progress=False)


def test_bad_queries_and_llms_are_refused(llm, docs):
    engine = EpisodicQueryEngine.from_documents(docs, llm=llm, show_progress=False)
    with pytest.raises(emllm.EmptyInputError, match="question is empty"):
        engine.query("  ")
    with pytest.raises(TypeError, match=r"needs emllm_integrations\.llama_index\.EMLLM"):
        EpisodicQueryEngine.from_documents(docs, llm=MockLLM(), show_progress=False)
    with pytest.raises(emllm.SessionNotFoundError, match="no session"):
        EpisodicQueryEngine.from_session("never-made", llm=llm)
    with pytest.raises(ValueError, match="ids must be unique"):
        EpisodicQueryEngine.from_documents([docs[0], docs[0]], llm=llm, show_progress=False)
