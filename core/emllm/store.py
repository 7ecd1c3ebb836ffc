"""SessionStore: sessions on disk, saved incrementally and atomically, reopened without reading events whole.

Layout of a store folder:
    index.sqlite                 one row per session (model fingerprint, counts, bytes, current state file)
                                 and one row per segment (event range, token/char range, file, checksums)
    sessions/<name>-<hash>/      seg-*.safetensors (immutable runs of events), state-*.safetensors, .lock

A save writes new files first (fsynced, never overwriting), then publishes them in one SQLite transaction,
then deletes what that transaction made unreachable. A crash at any point leaves the last committed
state intact plus, at worst, unreferenced files, which the next open of that session removes. Each
session has one writer: an exclusive file lock held while an engine has it open.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    ConfigMismatchError,
    CorruptSessionError,
    DiskBudgetError,
    ModelMismatchError,
    SessionLockedError,
    SessionNotFoundError,
    StoreError,
)
from .models import emllm_home
from .snapshot import SavedState, SegmentRecord, restore, segment_payload, serve_from_disk, state_payload
from .tensorfiles import TensorFile, fsync_dir, write_tensors

if TYPE_CHECKING:
    from .session import Session

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, folder TEXT NOT NULL, model_name TEXT, fingerprint TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens INTEGER NOT NULL, events INTEGER NOT NULL,
    bytes INTEGER NOT NULL, state_file TEXT NOT NULL, state_checksums TEXT NOT NULL,
    state_bytes INTEGER NOT NULL, config TEXT
);
CREATE TABLE IF NOT EXISTS segments (
    session_id TEXT NOT NULL, first_event INTEGER NOT NULL, n_events INTEGER NOT NULL,
    token_start INTEGER NOT NULL, token_end INTEGER NOT NULL, char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL, file TEXT NOT NULL, checksums TEXT NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (session_id, first_event)
);
"""


@dataclass(frozen=True)
class StoredSession:
    """A session as the index describes it (no file is opened to list sessions)."""

    id: str
    model_name: str | None
    fingerprint: str
    created: float
    updated: float
    tokens: int
    events: int
    bytes: int


class SessionStore:
    """A folder of saved sessions. Attach it to an engine: `EMLLM.from_pretrained(..., store=store)`.

    max_ram_bytes: when set, a session saves its events whenever those in RAM pass half of it (a save
        briefly holds a second copy of what it writes) and serves them from the disk tier
        from then on: resident memory for events stays within the budget while the session grows.
    max_disk_bytes: a save that would take the store past this is refused with DiskBudgetError.
    lock_timeout: seconds to wait for a session another process holds open (0 = fail at once).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_ram_bytes: int | None = None,
        max_disk_bytes: int | None = None,
        lock_timeout: float = 0.0,
    ):
        for name, value in (("max_ram_bytes", max_ram_bytes), ("max_disk_bytes", max_disk_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.root = Path(path).expanduser() if path is not None else emllm_home() / "sessions"
        self.max_ram_bytes = max_ram_bytes
        self.max_disk_bytes = max_disk_bytes
        self.lock_timeout = lock_timeout
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._mutex = threading.RLock()
        self._locks: dict[str, int] = {}  # session id -> fd holding its flock
        self.remove_orphans()

    def __repr__(self) -> str:
        return f"SessionStore({str(self.root)!r})"

    # -- listing ----------------------------------------------------------------------------------
    def __contains__(self, session_id: str) -> bool:
        with self._mutex:
            row = self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row is not None

    def list(self) -> list[StoredSession]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT id, model_name, fingerprint, created, updated, tokens, events, bytes "
                "FROM sessions ORDER BY id"
            ).fetchall()
        return [StoredSession(*row) for row in rows]

    def info(self, session_id: str) -> StoredSession:
        for stored in self.list():
            if stored.id == session_id:
                return stored
        raise self._not_found(session_id)

    def total_bytes(self) -> int:
        with self._mutex:
            (total,) = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()
        return int(total)

    def delete(self, session_id: str) -> None:
        """Remove a stored session and its files (refused while another engine holds it open)."""
        if session_id not in self:
            raise self._not_found(session_id)
        held = session_id in self._locks
        if not held:
            self.lock(session_id)
        try:
            with self._mutex:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM segments WHERE session_id = ?", (session_id,))
                self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                self._db.execute("COMMIT")
            for path in self._folder(session_id).glob("*.safetensors"):
                path.unlink(missing_ok=True)
        finally:
            self.unlock(session_id)

    def verify(self, session_id: str) -> None:
        """Read every file of a stored session and check every checksum (CorruptSessionError if one fails)."""
        row = self._row(session_id)
        if row is None:
            raise self._not_found(session_id)
        folder = self._folder(session_id)
        files = [self._map(folder, r) for r in self._segment_records(session_id)]
        files.append(
            TensorFile(
                folder / row["state_file"],
                json.loads(row["state_checksums"]),
                expected_bytes=row["state_bytes"],
            )
        )
        for mapped in files:
            for name in mapped.names():
                mapped.get(name)

    # -- locks ------------------------------------------------------------------------------------
    def lock(self, session_id: str) -> None:
        """Take the session's writer lock (waiting up to lock_timeout)."""
        with self._mutex:
            if session_id in self._locks:
                raise SessionLockedError(f"session {session_id!r} is already open in this store")
            folder = self._folder(session_id)
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        msg = (
                            f"session {session_id!r} is open for writing elsewhere (lock {folder / '.lock'})"
                        )
                        raise SessionLockedError(msg) from None
                    time.sleep(0.05)
            self._locks[session_id] = fd

    def unlock(self, session_id: str) -> None:
        with self._mutex:
            fd = self._locks.pop(session_id, None)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def close(self) -> None:
        """Release every lock and the index."""
        with self._mutex:
            for session_id in list(self._locks):
                self.unlock(session_id)
            self._db.close()

    # -- attach / save ----------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        """Lock the session for this engine and, if it was saved before, rebuild it from disk."""
        self.lock(session.id)
        try:
            self._remove_unreferenced(session.id, self._folder(session.id))
            row = self._row(session.id)
            if row is None:
                session._saved = SavedState([], None, 0, 0)
                return
            fingerprint = session.engine.fingerprint
            if row["fingerprint"] != fingerprint:
                raise ModelMismatchError(
                    f"session {session.id!r} was saved with model {row['model_name']!r} (fingerprint "
                    f"{row['fingerprint']}); this engine runs {session.engine.name!r} ({fingerprint}). "
                    "Keys and values of one model mean nothing to another: open it with the model that "
                    "wrote it, or use another session id."
                )
            _check_window(session, row["config"])
            self._restore(session, row)
        except BaseException:
            self.unlock(session.id)
            raise

    def _restore(self, session: Session, row: dict) -> None:
        folder = self._folder(session.id)
        records = self._segment_records(session.id)
        try:
            segments = [(r, self._map(folder, r)) for r in records]
            state = TensorFile(
                folder / row["state_file"],
                json.loads(row["state_checksums"]),
                expected_bytes=row["state_bytes"],
            )
            restore(session, segments, state)
        except CorruptSessionError:
            session.reset()
            raise
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            session.reset()
            raise CorruptSessionError(f"session {session.id!r} in {folder} cannot be read: {exc}") from exc
        session._saved = SavedState(
            records, row["state_file"], len(session.token_ids), len(session.text), row["state_bytes"]
        )

    def save(self, session: Session) -> None:
        """Write what changed since the last save; atomic (all or nothing)."""
        saved = session._saved
        if saved is None or session.id not in self._locks:
            raise StoreError(f"session {session.id!r} is not attached to {self}")
        folder = self._folder(session.id)
        kept = saved.reusable_segments(session)
        first_event = sum(r.n_events for r in kept)
        token_start = kept[-1].token_end if kept else 0
        char_start = kept[-1].char_end if kept else 0
        n_events = len(session.timeline.events)
        payloads = []
        if n_events > first_event:
            tensors, info = segment_payload(session, first_event, token_start, char_start)
            payloads.append(("seg", tensors, info))
            token_start, char_start = info["token_end"], info["char_end"]
        state_tensors, state_meta = state_payload(session, token_start, char_start)
        self._check_disk_budget(saved, kept, [p[1] for p in payloads] + [state_tensors])

        new_records, written = [], []
        try:
            for _, tensors, info in payloads:
                name = f"seg-{info['first_event']:08d}-{uuid.uuid4().hex[:8]}.safetensors"
                checksums = write_tensors(folder / name, tensors, {"emllm": json.dumps(info)})
                written.append(folder / name)
                new_records.append(
                    SegmentRecord(
                        file=name, checksums=checksums, nbytes=(folder / name).stat().st_size, **info
                    )
                )
            state_name = f"state-{uuid.uuid4().hex[:8]}.safetensors"
            state_checksums = write_tensors(
                folder / state_name, state_tensors, {"emllm": json.dumps(state_meta)}
            )
            written.append(folder / state_name)
            state_bytes = (folder / state_name).stat().st_size
            fsync_dir(folder)
            records = kept + new_records
            self._publish(session, records, state_name, state_checksums, state_bytes)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        kept_files = {r.file for r in kept}
        dropped = [r.file for r in saved.segments if r.file not in kept_files]
        if saved.state_file:
            dropped.append(saved.state_file)
        for name in dropped:
            (folder / name).unlink(missing_ok=True)
        serve_from_disk(session, [(r, self._map(folder, r)) for r in records])
        session._saved = SavedState(
            records, state_name, len(session.token_ids), len(session.text), state_bytes
        )

    def _publish(self, session: Session, records, state_name: str, checksums: dict, state_bytes: int) -> None:
        now = time.time()
        total = state_bytes + sum(r.nbytes for r in records)
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM segments WHERE session_id = ?", (session.id,))
                self._db.executemany(
                    "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            session.id,
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
                self._db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET model_name=excluded.model_name, "
                    "fingerprint=excluded.fingerprint, updated=excluded.updated, tokens=excluded.tokens, "
                    "events=excluded.events, bytes=excluded.bytes, state_file=excluded.state_file, "
                    "state_checksums=excluded.state_checksums, state_bytes=excluded.state_bytes, "
                    "config=excluded.config",
                    (
                        session.id,
                        self._folder(session.id).name,
                        session.engine.name,
                        session.engine.fingerprint,
                        now,
                        now,
                        len(session.token_ids),
                        len(session.timeline.events),
                        total,
                        state_name,
                        json.dumps(checksums),
                        state_bytes,
                        session.engine.config.model_dump_json(),
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _check_disk_budget(self, saved: SavedState, kept: list[SegmentRecord], payloads) -> None:
        if self.max_disk_bytes is None:
            return
        kept_files = {r.file for r in kept}
        freed = saved.state_bytes + sum(r.nbytes for r in saved.segments if r.file not in kept_files)
        new = sum(t.numel() * t.element_size() for tensors in payloads for t in tensors.values())
        projected = self.total_bytes() - freed + new
        if projected > self.max_disk_bytes:
            raise DiskBudgetError(
                f"saving {new / 2**20:.1f} MiB would take the store to {projected / 2**20:.1f} MiB, "
                f"past its max_disk_bytes of {self.max_disk_bytes / 2**20:.1f} MiB; nothing was written"
            )

    @staticmethod
    def _map(folder: Path, record: SegmentRecord) -> TensorFile:
        return TensorFile(folder / record.file, record.checksums, expected_bytes=record.nbytes)

    # -- index and folders ------------------------------------------------------------------------
    def _folder(self, session_id: str) -> Path:
        digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
        return self.root / "sessions" / f"{readable}-{digest}"

    def _row(self, session_id: str) -> dict | None:
        with self._mutex:
            cursor = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return dict(zip(names, row, strict=True)) if row else None

    def _segment_records(self, session_id: str) -> list[SegmentRecord]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT first_event, n_events, token_start, token_end, char_start, char_end, file, "
                "checksums, bytes FROM segments WHERE session_id = ? ORDER BY first_event",
                (session_id,),
            ).fetchall()
        return [
            SegmentRecord(
                *row[:7], checksums={k: int(v) for k, v in json.loads(row[7]).items()}, nbytes=row[8]
            )
            for row in rows
        ]

    def remove_orphans(self) -> int:
        """Delete files no committed state refers to (left by a crash), in every session nobody holds
        open; returns how many files went."""
        removed = 0
        with self._mutex:
            ids = [row[0] for row in self._db.execute("SELECT id FROM sessions")]
        known = {self._folder(i).name: i for i in ids}
        for folder in (self.root / "sessions").iterdir():
            if not folder.is_dir():
                continue
            session_id = known.get(folder.name)
            fd = (
                os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                if (folder / ".lock").exists()
                else None
            )
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # someone is writing it right now
                if session_id is None:
                    removed += len(list(folder.glob("*.safetensors")))
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    removed += self._remove_unreferenced(session_id, folder)
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    def _not_found(self, session_id: str) -> SessionNotFoundError:
        return SessionNotFoundError(f"no stored session {session_id!r} in {self.root}")

    def _remove_unreferenced(self, session_id: str, folder: Path) -> int:
        row = self._row(session_id)
        referenced = {r.file for r in self._segment_records(session_id)}
        if row is not None:
            referenced.add(row["state_file"])
        removed = 0
        for path in folder.glob("*.safetensors"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


# The saved window and init block have these shapes; every other field may change between runs (retrieval
# settings apply at once, segmentation settings to text read from then on).
WINDOW_FIELDS = ("n_init", "n_local", "chunk_size")


def _check_window(session: Session, saved_config: str | None) -> None:
    if saved_config is None:
        return
    saved = json.loads(saved_config)
    config = session.engine.config
    differ = [
        f"{name} {saved[name]} (now {getattr(config, name)})"
        for name in WINDOW_FIELDS
        if name in saved and saved[name] != getattr(config, name)
    ]
    if differ:
        msg = (
            f"session {session.id!r} was saved with {', '.join(differ)}: its window and initial tokens "
            "have that shape. Open it with the same n_init, n_local and chunk_size (n_mem, question_recall "
            "and the other retrieval settings may change), or use another session id."
        )
        raise ConfigMismatchError(msg)


__all__ = ["SessionStore", "StoredSession"]
