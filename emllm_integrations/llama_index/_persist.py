"""Persistence beside the session store: saving a session when its engine has a store, and small JSON
records the adapters keep with a session (which documents it holds, archived chat history).

With a session store, each session's records live in one JSON file under `<store root>/llama_index/`,
replaced atomically on every write, so they survive a restart together with the session. Without a store
they live in this process only, attached to the live session object. The session store knows nothing of
these files; a record says which token prefix it describes so readers can tell when it no longer applies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import weakref
from array import array
from pathlib import Path

import emllm
from emllm.store_layout import folder_name

FOLDER = "llama_index"

_LOCAL: weakref.WeakKeyDictionary[emllm.Session, dict] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def _path(session: emllm.Session) -> Path | None:
    store = getattr(session.engine, "store", None)
    root = getattr(store, "root", None)
    if root is None or session.id.startswith("tmp-"):
        return None
    path = Path(root) / FOLDER / f"{folder_name(session.id)}.json"
    legacy = path.with_name(f"{_legacy_name(session.id)}.json")  # 12 hex digits could collide (before 0.2)
    if not path.exists() and legacy.exists():
        os.replace(legacy, path)
    return path


def _legacy_name(session_id: str) -> str:
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', session_id)[:40]}-{digest}"


def _records(session: emllm.Session) -> dict:
    path = _path(session)
    if path is None:
        return _LOCAL.setdefault(session, {})
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def read(session: emllm.Session, key: str) -> dict | list | None:
    with _GUARD:
        return _records(session).get(key)


def write(session: emllm.Session, key: str, value: dict | list | None) -> None:
    """Set (or, with None, remove) one record of the session; atomic on disk."""
    with _GUARD:
        records = _records(session)
        if value is None:
            records.pop(key, None)
        else:
            records[key] = value
        path = _path(session)
        if path is not None:
            _write_atomically(path, json.dumps(records))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_if_stored(session: emllm.Session) -> bool:
    """Save a named session when its engine has a session store; returns whether it did."""
    if getattr(session.engine, "store", None) is None or _path(session) is None:
        return False
    session.save()
    return True


def prefix_digest(token_ids: list[int]) -> str:
    """A hash of a token prefix, to check that a record still describes the session it sits beside."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()


__all__ = ["FOLDER", "prefix_digest", "read", "save_if_stored", "write"]
