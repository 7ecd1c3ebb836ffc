"""What a document session holds, beside its tokens: which documents, where each sits, how long the
ingested prefix is, and which model read it. Kept with the session so a reopened session answers without
re-reading anything.

Stored in the session's `metadata` dict when the engine offers one (it is saved with the session);
otherwise kept in this process only, attached to the live session object. Knows nothing about prompts.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field

import emllm

from ._documents import DocumentSpan

KEY = "llama_index.documents"
_LOCAL: weakref.WeakKeyDictionary[emllm.Session, dict] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Manifest:
    """The ingested prefix of a document session."""

    model: str
    fingerprint: str
    n_tokens: int
    n_chars: int
    question_suffix: str  # what closes the user turn and opens the answer, after each question
    documents: list[DocumentSpan] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        docs = [DocumentSpan(**doc) for doc in data.get("documents", [])]
        return cls(**{**data, "documents": docs})


def _metadata(session: emllm.Session) -> dict:
    metadata = getattr(session, "metadata", None)
    if isinstance(metadata, dict):
        return metadata
    return _LOCAL.setdefault(session, {})


def write(session: emllm.Session, manifest: Manifest) -> None:
    _metadata(session)[KEY] = manifest.as_dict()


def read(session: emllm.Session) -> Manifest | None:
    """The session's manifest, or None if it holds no ingested documents (or they were cut away)."""
    data = _metadata(session).get(KEY)
    if data is None:
        return None
    manifest = Manifest.from_dict(data)
    if len(session.token_ids) < manifest.n_tokens:
        return None
    return manifest


def clear(session: emllm.Session) -> None:
    _metadata(session).pop(KEY, None)


__all__ = ["KEY", "Manifest", "clear", "read", "write"]
