"""Documents in one episodic session: checking them, cutting them into feedable pieces, and mapping the
session's events back onto document spans as LlamaIndex source nodes.

A session's text is the documents' text laid end to end (with a prompt frame and separators around them);
`DocumentSpan` records where each document sits in it. Knows nothing about models or prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from emllm import EmptyInputError, EventInfo, RetrievalHit
from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode


@dataclass(frozen=True)
class DocumentSpan:
    """Where one document's text sits in the session's text: chars [char_start, char_end)."""

    doc_id: str
    char_start: int
    char_end: int
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check_documents(documents: Iterable[BaseNode] | None) -> list[BaseNode]:
    """The documents as a list; EmptyInputError when there are none or one has no text."""
    docs = list(documents or [])
    if not docs:
        raise EmptyInputError("no documents given: pass at least one Document with text")
    empty = [doc.node_id for doc in docs if not doc.get_content().strip()]
    if empty:
        msg = f"{len(empty)} of {len(docs)} documents have no text (ids: {', '.join(empty[:5])})"
        raise EmptyInputError(msg)
    ids = [doc.node_id for doc in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique: each source node names the document it came from")
    return docs


def fingerprint(documents: Sequence[BaseNode], *extra: str) -> str:
    """A stable hash of the documents' ids and texts (and any extra strings, such as the prompt frame)."""
    digest = hashlib.sha256()
    for part in (*extra, *(f"{doc.node_id}\x00{doc.get_content()}" for doc in documents)):
        digest.update(hashlib.sha256(part.encode("utf-8")).digest())
    return digest.hexdigest()


def text_pieces(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most ~max_chars, each ending at a line break or before a space, so that
    tokenizing the pieces one by one gives the same tokens as tokenizing the whole (for BPE tokenizers
    that split words before their leading space)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        stop = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, stop)
        if cut != -1:
            cut += 1  # keep the line break with the piece before it
        else:
            cut = text.rfind(" ", start + max_chars // 2, stop)
            if cut == -1:
                cut = stop
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def _best_document(char_start: int, char_end: int, spans: Sequence[DocumentSpan]) -> DocumentSpan | None:
    """The document that overlaps [char_start, char_end) the most (None if none does)."""
    best, best_overlap = None, 0
    for span in spans:
        overlap = min(char_end, span.char_end) - max(char_start, span.char_start)
        if overlap > best_overlap:
            best, best_overlap = span, overlap
    return best


def span_node(
    session_text: str,
    char_start: int,
    char_end: int,
    span: DocumentSpan,
    *,
    node_id: str,
    score: float | None,
    memory: str,
    extra: dict | None = None,
) -> NodeWithScore:
    """A source node for the part of [char_start, char_end) inside one document, in its own offsets."""
    start, end = max(char_start, span.char_start), min(char_end, span.char_end)
    node = TextNode(
        id_=node_id,
        text=session_text[start:end],
        start_char_idx=start - span.char_start,
        end_char_idx=end - span.char_start,
        metadata={**span.metadata, "document_id": span.doc_id, "memory": memory, **(extra or {})},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=span.doc_id)},
    )
    return NodeWithScore(node=node, score=score)


def hit_nodes(
    hits: Sequence[RetrievalHit], spans: Sequence[DocumentSpan], session_text: str, session_id: str
) -> list[NodeWithScore]:
    """Source nodes for retrieved events (best first); events outside every document are left out."""
    nodes = []
    for hit in hits:
        span = _best_document(hit.char_start, hit.char_end, spans)
        if span is None:
            continue
        extra = {"event_id": hit.event_id, "token_start": hit.token_start, "token_end": hit.token_end}
        node_id = f"{session_id}/event-{hit.event_id}"
        nodes.append(
            span_node(
                session_text, hit.char_start, hit.char_end, span,
                node_id=node_id, score=hit.score, memory="event", extra=extra,
            )
        )  # fmt: skip
    return nodes


def attended_nodes(
    events: Sequence[EventInfo],
    text_end: int,
    spans: Sequence[DocumentSpan],
    session_text: str,
    session_id: str,
) -> list[NodeWithScore]:
    """Source nodes for document text outside every event: the initial tokens and the local window, which
    every query attends whole (score None)."""
    if events:
        parts = [("initial", 0, events[0].char_start), ("window", events[-1].char_end, text_end)]
    else:
        parts = [("window", 0, text_end)]
    nodes = []
    for memory, start, end in parts:
        for span in spans:
            if span.char_end > start and span.char_start < end:
                node_id = f"{session_id}/{memory}/{span.doc_id}"
                nodes.append(
                    span_node(session_text, start, end, span, node_id=node_id, score=None, memory=memory)
                )
    return nodes


__all__ = [
    "DocumentSpan",
    "attended_nodes",
    "check_documents",
    "fingerprint",
    "hit_nodes",
    "text_pieces",
]
