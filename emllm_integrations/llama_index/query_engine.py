"""EpisodicQueryEngine: whole documents read once into an episodic session, questions answered from it.

No chunking, no embeddings: the documents are fed in order through the model, cut into events by surprise,
and every answer attends to the events its question retrieves. The session is laid out as one chat turn
that is never closed: [prompt frame][doc 1][doc 2]...; each question is appended after the documents (the
previous question and answer are cut away first), so the documents are read once per session, not per
question. Source nodes are the retrieved events, mapped back onto document spans.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import emllm
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle
from llama_index.core.settings import Settings
from tqdm.auto import tqdm

from .._async import iterate_in_thread
from . import _chat, _manifest, _persist
from ._budget import check_fits
from ._documents import DocumentSpan, attended_nodes, check_documents, fingerprint, hit_nodes, text_pieces
from ._manifest import Manifest
from .llm import EMLLM

logger = logging.getLogger(__name__)

DEFAULT_QUESTION_TEMPLATE = "\n\n{query_str}"
DOCUMENT_SEPARATOR = "\n\n"
PIECE_TOKENS = 2048  # documents are fed in pieces of about this many tokens (one progress-bar step each)

_LOCKS: weakref.WeakKeyDictionary[emllm.Session, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _query_lock(session: emllm.Session) -> threading.Lock:
    """One lock per document session: a question's cut-back, retrieval and answer do not interleave."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(session, threading.Lock())


class EpisodicQueryEngine(CustomQueryEngine):
    """Answers questions over whole documents held in EM-LLM episodic memory.

    Build one with `from_documents` (reads the documents once, with a progress bar, and saves the session
    when the engine has a session store) or reopen a saved one with `from_session` (reads nothing).

    .. code-block:: python

        llm = EMLLM(engine=emllm.EMLLM.from_pretrained(store="~/.cache/emllm/sessions"))
        engine = EpisodicQueryEngine.from_documents(SimpleDirectoryReader("novels").load_data(), llm=llm)
        response = engine.query("Who does Elizabeth marry?")
        response.source_nodes[0].node.ref_doc_id, response.source_nodes[0].node.start_char_idx

    Source nodes: the retrieved events (``metadata["memory"] == "event"``, ranked by the upper layers'
    episodic retrieval, `Session.retrieve`), each cut to the document it lies in, with character offsets
    into that document; with `include_attended_nodes`, also the documents' text that every answer attends
    whole (the initial tokens and the local window: ``memory`` "initial" / "window", score None).
    """

    llm: EMLLM = Field(description="The EMLLM whose engine holds the document session.")
    session_id: str = Field(description="The episodic session holding the documents.")
    similarity_top_k: int = Field(default=4, ge=1, description="Events returned as source nodes.")
    include_attended_nodes: bool = Field(
        default=True,
        description="Also return the document text outside any event (initial tokens, local window).",
    )
    attend_source_events: bool = Field(
        default=True,
        description="Every layer attends the source events while answering, ahead of the events it "
        "retrieves itself (False: the attention's own retrieval alone, as in the paper).",
    )
    quote_source_events: bool = Field(
        default=False,
        description="Also quote the source events (with their neighbours in time) as text right before "
        "the question, so the model reads them in order inside its local window.",
    )
    streaming: bool = Field(default=False, description="Answer with a StreamingResponse.")
    question_template: str = Field(
        default=DEFAULT_QUESTION_TEMPLATE, description="How a question follows the documents ({query_str})."
    )
    answer_prefix: str = Field(
        default="",
        description="Text the answer starts with, written on the model's behalf (e.g. 'The answer is'); "
        "returned as the start of the answer.",
    )
    max_new_tokens: int | None = Field(default=None, gt=0, description="Answer length; None: the LLM's.")

    _session: emllm.Session = PrivateAttr()
    _manifest: Manifest = PrivateAttr()
    _documents_state: emllm.SessionCheckpoint | None = PrivateAttr(default=None)

    def __init__(self, *, session: emllm.Session, manifest: Manifest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session = session
        self._manifest = manifest

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_documents(
        cls,
        documents: Sequence[BaseNode],
        llm: EMLLM | None = None,
        *,
        session_id: str | None = None,
        system_prompt: str | None = None,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> EpisodicQueryEngine:
        """Read `documents` into an episodic session (once: a session already holding exactly these
        documents is reused) and return an engine answering from it.

        Raises emllm.EmptyInputError for no documents or an empty one, emllm.DiskBudgetError when the
        documents cannot fit the session store's disk budget (checked before reading anything), and
        emllm.ModelMismatchError when the stored session was written by another model.
        """
        llm = _resolve_llm(llm)
        docs = check_documents(documents)
        before, after = _chat.user_turn_frame(llm.engine, system_prompt)
        digest = fingerprint(docs, before, after)
        session_id = session_id or f"docs-{digest[:16]}"
        session = llm.engine.session(session_id)
        manifest = _manifest.read(session)
        if manifest is None or manifest.fingerprint != digest:
            manifest = _ingest(llm.engine, session, docs, before, after, digest, show_progress)
            _persist.save_if_stored(session)  # the tokens first: a record never describes unsaved tokens
            _manifest.write(session, manifest)
        else:
            logger.info("session %r already holds these documents: not reading them again", session_id)
        return cls(llm=llm, session_id=session_id, session=session, manifest=manifest, **kwargs)

    @classmethod
    def from_session(cls, session_id: str, llm: EMLLM | None = None, **kwargs: Any) -> EpisodicQueryEngine:
        """Reopen a session that documents were read into (saved in the engine's store, or live in it).

        Raises emllm.SessionNotFoundError when no such session holds documents.
        """
        llm = _resolve_llm(llm)
        session = llm.engine.session(session_id, create=False)
        manifest = _manifest.read(session)
        if manifest is None:
            msg = f"session {session_id!r} holds no documents read by EpisodicQueryEngine.from_documents"
            raise emllm.SessionNotFoundError(msg)
        return cls(llm=llm, session_id=session_id, session=session, manifest=manifest, **kwargs)

    @property
    def documents(self) -> list[DocumentSpan]:
        """The documents in the session and where each sits in its text."""
        return list(self._manifest.documents)

    # -- querying ---------------------------------------------------------------------------------
    def retrieve(self, query_bundle: QueryBundle | str) -> list[NodeWithScore]:
        """The source nodes a question would get: retrieved events first (best first), then attended text."""
        query = query_bundle.query_str if isinstance(query_bundle, QueryBundle) else query_bundle
        _check_query(query)
        with _query_lock(self._session):
            self._rewind()
            return self._source_nodes(query)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        nodes = self.retrieve(query_str)
        if self.streaming:
            answer = self._answer(query_str, nodes)
            return StreamingResponse(answer, source_nodes=nodes, metadata=self._metadata())
        computed = self._session.stats().tokens_computed
        answer = "".join(self._answer(query_str, nodes))
        metadata = self._metadata(tokens_computed=self._session.stats().tokens_computed - computed)
        return Response(answer, source_nodes=nodes, metadata=metadata)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        if not self.streaming:
            return await asyncio.to_thread(self.custom_query, query_str)
        nodes = await asyncio.to_thread(self.retrieve, query_str)
        answer = iterate_in_thread(lambda: self._answer(query_str, nodes))
        return AsyncStreamingResponse(answer, source_nodes=nodes, metadata=self._metadata())

    def _prompt(self, query: str, quoted: str = "") -> str:
        """What follows the documents: quoted passages, the question, the end of the user turn, the
        answer's start."""
        question = self.question_template.format(query_str=query)
        return quoted + question + self._manifest.question_suffix + self.answer_prefix

    def _answer(self, query: str, sources: list[NodeWithScore]) -> Iterator[str]:
        options = self.llm.generation_options()
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        events = [n.node.metadata["event_id"] for n in sources if n.node.metadata["memory"] == "event"]
        # the source events are this engine's question recall (found with the question alone): the
        # engine's own probe of the templated prompt would only add events ranked by template tokens
        options["question_recall"] = 0
        if self.attend_source_events:
            options["recall"] = events
        with _query_lock(self._session):
            self._rewind()
            quoted = self._session.quote(events) if self.quote_source_events else ""
            if self.answer_prefix:
                yield self.answer_prefix
            yield from self._session.stream(self._prompt(query, quoted), **options)

    def _rewind(self) -> None:
        """Return the session to the documents alone, in the state the first question found them, so a
        question gets the same answer and sources whatever was asked before it. A cut could not do that:
        the tokens a question and its answer pushed out of the local window would stay events."""
        session, checkpoint = self._session, self._documents_state
        if checkpoint is not None:
            try:
                session.rewind(checkpoint)
                return
            except emllm.StaleCheckpointError:  # the session was cut below the documents' end or reset
                logger.info("session %r changed under the query engine: cutting back", session.id)
        if len(session.token_ids) > self._manifest.n_tokens:
            session.truncate(self._manifest.n_tokens)
        self._documents_state = session.checkpoint()

    def _source_nodes(self, query: str) -> list[NodeWithScore]:
        """Events retrieved with the question alone: with the template around it (paragraph breaks, chat
        markers) the ranking followed those tokens, putting paragraph breaks first (measured on Austen)."""
        session, manifest = self._session, self._manifest
        hits = session.retrieve(query, k=self.similarity_top_k)
        text = session.text
        docs = manifest.documents
        nodes = hit_nodes(hits, docs, text, self.session_id)
        if self.include_attended_nodes:
            nodes += attended_nodes(session.events(), manifest.n_chars, docs, text, self.session_id)
        return nodes

    def _metadata(self, **extra: Any) -> dict:
        return {"session_id": self.session_id, "document_tokens": self._manifest.n_tokens, **extra}


def _resolve_llm(llm: EMLLM | None) -> EMLLM:
    if llm is None:  # Settings.llm itself would build the default OpenAI LLM when none is set
        llm = Settings._llm
    if not isinstance(llm, EMLLM):
        msg = (
            "EpisodicQueryEngine reads documents into episodic memory, so it needs "
            f"emllm_integrations.llama_index.EMLLM as its llm, got {type(llm).__name__}"
        )
        raise TypeError(msg)
    return llm


def _check_query(query: str) -> None:
    if not query or not query.strip():
        raise emllm.EmptyInputError("the question is empty")


def _ingest(
    engine: emllm.EMLLM,
    session: emllm.Session,
    docs: list[BaseNode],
    before: str,
    after: str,
    digest: str,
    show_progress: bool,
) -> Manifest:
    """Read the documents into a fresh session (one progress bar over all of them); -> its manifest."""
    texts = [doc.get_content() for doc in docs]
    counts = [len(engine.encode(text)) for text in texts]
    overhead = len(engine.encode(before + after)) + len(docs) * 2
    what = f"the document set ({len(docs)} documents)"
    check_fits(engine, sum(counts) + overhead, what, session_id=session.id)
    session.reset()
    _manifest.clear(session)
    chars_per_piece = max(256, int(PIECE_TOKENS * sum(len(t) for t in texts) / max(sum(counts), 1)))
    spans = []
    desc = f"reading {len(docs)} document{'s' if len(docs) > 1 else ''}"
    with tqdm(total=sum(counts), unit="tok", desc=desc, disable=not show_progress) as bar:
        if before:
            session.feed(before, progress=False)
        for i, (doc, text) in enumerate(zip(docs, texts, strict=True)):
            if i:
                session.feed(DOCUMENT_SEPARATOR, progress=False)
            start = len(session.text)
            for piece in text_pieces(text, chars_per_piece):
                bar.update(session.feed(piece, source_id=doc.node_id, progress=False))
            spans.append(DocumentSpan(doc.node_id, start, len(session.text), _json_safe(doc.metadata)))
    ids = session.token_ids
    manifest = Manifest(
        model=engine.name,
        fingerprint=digest,
        n_tokens=len(ids),
        prefix_digest=_persist.prefix_digest(ids),
        n_chars=len(session.text),
        question_suffix=after,
        documents=spans,
    )
    return manifest


def _json_safe(metadata: dict) -> dict:
    return json.loads(json.dumps(metadata, default=str))


__all__ = ["DEFAULT_QUESTION_TEMPLATE", "EpisodicQueryEngine"]
