"""What a document session holds beside its tokens: which documents, where each sits, how long the read
prefix is, and how a question closes it. Kept with the session (see `_persist`) so a reopened session
answers without reading anything again. Knows nothing about prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import emllm

from . import _persist
from ._documents import DocumentSpan

KEY = "documents"


@dataclass(frozen=True)
class Manifest:
    """The documents read into a session: its first n_tokens tokens (n_chars characters)."""

    model: str
    fingerprint: str  # of the documents and the prompt frame
    n_tokens: int
    n_chars: int
    prefix_digest: str  # of those n_tokens token ids
    question_suffix: str  # what closes the user turn and opens the answer, after each question
    documents: list[DocumentSpan] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        docs = [DocumentSpan(**doc) for doc in data.get("documents", [])]
        return cls(**{**data, "documents": docs})


def write(session: emllm.Session, manifest: Manifest) -> None:
    _persist.write(session, KEY, manifest.as_dict())


def read(session: emllm.Session) -> Manifest | None:
    """The session's manifest; None if it holds no documents, or no longer the tokens the manifest
    describes (the session was cut back or rewritten since)."""
    data = _persist.read(session, KEY)
    if not isinstance(data, dict):
        return None
    manifest = Manifest.from_dict(data)
    ids = session.token_ids[: manifest.n_tokens]
    if len(ids) < manifest.n_tokens or _persist.prefix_digest(ids) != manifest.prefix_digest:
        return None
    return manifest


def clear(session: emllm.Session) -> None:
    _persist.write(session, KEY, None)


__all__ = ["KEY", "Manifest", "clear", "read", "write"]
