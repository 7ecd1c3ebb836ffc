"""The store's index: one SQLite file listing each saved session and the segments its state stands on.

The index is a cache of what the session files say (each state file records its own row and segment
list), so it can be rebuilt from them and is never a reason to delete one. Its rows are untrusted input
like the files: a row that does not parse makes that session unreadable (CorruptSessionError), never the
store. SQLite failures come out as the package's typed errors. Knows nothing about sessions or tensors.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import (
    CorruptSessionError,
    ForkedStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreIndexError,
    StoreWriteError,
)
from .snapshot import SegmentRecord
from .store_layout import check_file_name
from .tensorfiles import parse_checksums

INDEX_FILE = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, folder TEXT NOT NULL, model_name TEXT, fingerprint TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens INTEGER NOT NULL, events INTEGER NOT NULL,
    bytes INTEGER NOT NULL, state_file TEXT NOT NULL, state_checksums TEXT NOT NULL,
    state_bytes INTEGER NOT NULL, config TEXT, generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS segments (
    session_id TEXT NOT NULL, first_event INTEGER NOT NULL, n_events INTEGER NOT NULL,
    token_start INTEGER NOT NULL, token_end INTEGER NOT NULL, char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL, file TEXT NOT NULL, checksums TEXT NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (session_id, first_event)
);
"""

_ROW_COLUMNS = (
    "id, folder, model_name, fingerprint, created, updated, tokens, events, bytes, state_file, "
    "state_checksums, state_bytes, config, generation"
)


@dataclass(frozen=True)
class SessionRow:
    """One session as the index (or, rebuilding it, its newest state file) describes it."""

    id: str
    folder: str
    model_name: str | None
    fingerprint: str
    created: float
    updated: float
    tokens: int
    events: int
    bytes: int
    state_file: str
    state_checksums: dict[str, int]
    state_bytes: int
    config: str | None
    generation: int

    @classmethod
    def parse(cls, values: tuple) -> SessionRow:
        """From an index row or a state file's record of it; any field of the wrong kind is corruption."""
        raw = dict(zip([f.strip() for f in _ROW_COLUMNS.split(",")], values, strict=True))
        where = f"the index row of session {raw['id']!r}"
        checksums = raw["state_checksums"]
        if not isinstance(checksums, dict):
            checksums = parse_checksums(checksums, where)
        ints = ("tokens", "events", "bytes", "state_bytes", "generation")
        if not all(isinstance(raw[n], int) and not isinstance(raw[n], bool) and raw[n] >= 0 for n in ints):
            raise CorruptSessionError(f"{where} holds a count that is not a non-negative integer")
        if not all(
            isinstance(raw[n], (int, float)) and math.isfinite(raw[n]) for n in ("created", "updated")
        ):
            raise CorruptSessionError(f"{where} holds a time that is not a number")
        text_or_none = ("model_name", "config")
        if not all(isinstance(raw[n], str) for n in ("id", "folder", "fingerprint")) or not all(
            raw[n] is None or isinstance(raw[n], str) for n in text_or_none
        ):
            raise CorruptSessionError(f"{where} holds a field of the wrong type")
        check_file_name(raw["state_file"], where)
        return cls(**{**raw, "state_checksums": checksums})

    def as_values(self) -> tuple:
        values = asdict(self)
        values["state_checksums"] = json.dumps(self.state_checksums)
        return tuple(values.values())


class SessionIndex:
    """The SQLite index of one store. Opened read-only when the store cannot be written."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.path = root / INDEX_FILE
        self.pid = os.getpid()
        self._mutex = threading.RLock()
        # access(2) also reports a read-only mount, which file modes alone (and root) would not
        writable = os.access(root, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))
        self.read_only = read_only or not writable
        self._db = self._connect_read_only() if self.read_only else self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            with self._errors("open"):
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
                self._migrate(db)
        except ReadOnlyStoreError:
            self.read_only = True
            return self._connect_read_only()
        except sqlite3.OperationalError as exc:
            if "unable to open" not in str(exc):
                raise
            self.read_only = True
            return self._connect_read_only()
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        quoted = urllib.parse.quote(str(self.path))
        last: Exception | None = None
        # mode=ro still needs the -shm of a WAL index; immutable=1 reads a folder nobody can write to
        for options in ("mode=ro", "mode=ro&immutable=1"):
            if not self.path.exists():
                break
            try:
                db = sqlite3.connect(
                    f"file:{quoted}?{options}", uri=True, check_same_thread=False, isolation_level=None
                )
                with self._errors("open"):
                    db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return db
            except (sqlite3.OperationalError, StoreError) as exc:
                last = exc
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        db.executescript(_SCHEMA)  # an empty store that cannot be written: nothing to list
        if last is not None and self.path.exists():
            raise StoreIndexError(f"cannot read {self.path}: {last}")
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        if "generation" not in columns:  # stores written before 0.2
            db.execute("ALTER TABLE sessions ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._mutex:
            if os.getpid() == self.pid:  # a forked child must not touch the parent's connection
                self._db.close()

    # -- errors ----------------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """SQLite's exceptions as the package's: read-only, disk full, damaged."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "readonly" in text or "read-only" in text:
                raise ReadOnlyStoreError(f"cannot {action} {self.path}: the store is read-only here") from exc
            if "disk is full" in text or "disk i/o" in text:
                raise StoreWriteError(f"cannot {action} {self.path}: {exc}") from exc
            if "unable to open" in text:
                raise
            raise StoreError(f"cannot {action} {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, malformed image
            msg = (
                f"{self.path} is damaged ({exc}); the session files are untouched. Rebuild the index from "
                f"them with `emllm sessions recover --store {self.path.parent}` (or SessionStore.recover)"
            )
            raise StoreIndexError(msg) from exc

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        self.check_process()
        with self._mutex, self._errors("read"):
            yield self._db

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        self.check_process()
        if self.read_only:
            raise ReadOnlyStoreError(f"cannot {action} in {self.path.parent}: the store is read-only here")
        with self._mutex:
            try:
                with self._errors(action):
                    self._db.execute("BEGIN IMMEDIATE")
                    yield self._db
                    self._db.execute("COMMIT")
            except BaseException:
                # a failed COMMIT (disk full) may have rolled back already: never mask why it failed
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def check_process(self) -> None:
        if os.getpid() != self.pid:
            raise ForkedStoreError(
                f"this SessionStore ({self.path.parent}) was opened in process {self.pid} and is used in "
                f"process {os.getpid()} after a fork: open the store (and the engine) in each worker "
                "process, after it starts (gunicorn: without --preload; multiprocessing: the 'spawn' or "
                "'forkserver' start method, or open it in the worker's initializer)"
            )

    # -- reading ---------------------------------------------------------------------------------------
    def listing(self) -> list[tuple]:
        """(id, model_name, fingerprint, created, updated, tokens, events, bytes) of every session."""
        with self._reading() as db:
            return db.execute(
                "SELECT id, model_name, fingerprint, created, updated, tokens, events, bytes "
                "FROM sessions ORDER BY id"
            ).fetchall()

    def contains(self, session_id: str) -> bool:
        with self._reading() as db:
            return db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def folder_of(self, session_id: str) -> str | None:
        with self._reading() as db:
            row = db.execute("SELECT folder FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def folders(self) -> dict:
        """{folder: session id} of every row (folders are whatever the rows say: checked by the caller)."""
        with self._reading() as db:
            return {
                folder: session_id for session_id, folder in db.execute("SELECT id, folder FROM sessions")
            }

    def ids_in_folder(self, folder: str) -> list[str]:
        """Sessions whose rows name this folder (more than one: folders named before 0.2 that collided)."""
        with self._reading() as db:
            return [row[0] for row in db.execute("SELECT id FROM sessions WHERE folder = ?", (folder,))]

    def state_files(self) -> list[tuple]:
        """(id, folder, state_file) of every row."""
        with self._reading() as db:
            return db.execute("SELECT id, folder, state_file FROM sessions").fetchall()

    def row(self, session_id: str) -> SessionRow | None:
        with self._reading() as db:
            values = db.execute(f"SELECT {_ROW_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return SessionRow.parse(values) if values else None

    def segments(self, session_id: str) -> list[SegmentRecord]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT first_event, n_events, token_start, token_end, char_start, char_end, file, "
                "checksums, bytes FROM segments WHERE session_id = ? ORDER BY first_event",
                (session_id,),
            ).fetchall()
        where = f"the index's segments of session {session_id!r}"
        records = []
        for row in rows:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*row[:6], row[8])):
                raise CorruptSessionError(f"{where} hold a count that is not a non-negative integer")
            records.append(
                SegmentRecord(
                    *row[:6],
                    file=check_file_name(row[6], where),
                    checksums=parse_checksums(row[7], where),
                    nbytes=row[8],
                )
            )
        return records

    def total_bytes(self) -> int:
        with self._reading() as db:
            (total,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()
        return int(total) if isinstance(total, (int, float)) else 0

    # -- writing ---------------------------------------------------------------------------------------
    def publish(
        self, row: SessionRow, records: list[SegmentRecord], *, newer_than: int | None = None
    ) -> bool:
        """Make `row` and its segments the session's committed state, in one transaction. With newer_than,
        only if the index holds the session at that generation at most (-1: not at all), so rolling forward
        never goes back; returns whether it wrote."""
        with self._transaction("save") as db:
            if newer_than is not None:
                held = db.execute("SELECT generation FROM sessions WHERE id = ?", (row.id,)).fetchone()
                if held is not None and (
                    newer_than < 0 or not isinstance(held[0], int) or held[0] > newer_than
                ):
                    return False
            db.execute("DELETE FROM segments WHERE session_id = ?", (row.id,))
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row.id,
                        r.first_event,
                        r.n_events,
                        r.token_start,
                        r.token_end,
                        r.char_start,
                        r.char_end,
                        r.file,
                        json.dumps(r.checksums),
                        r.nbytes,
                    )
                    for r in records
                ],
            )
            db.execute(
                f"INSERT OR REPLACE INTO sessions ({_ROW_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                row.as_values(),
            )
        return True

    def remove(self, session_id: str) -> None:
        with self._transaction("delete a session") as db:
            db.execute("DELETE FROM segments WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


__all__ = ["INDEX_FILE", "SessionIndex", "SessionRow"]
