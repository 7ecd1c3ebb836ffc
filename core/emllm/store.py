"""SessionStore: sessions on disk, saved incrementally and atomically, reopened without reading events whole.

Layout of a store folder:
    index.sqlite                 one row per session (model fingerprint, counts, bytes, current state file)
                                 and one row per segment (event range, token/char range, file, checksums)
    sessions/<name>-<sha256>/    seg-*.safetensors (immutable runs of events),
                                 state-<generation>-*.safetensors, .lock (the writer's flock)

A save writes new files first (fsynced, never overwriting), then publishes them in one SQLite transaction,
then deletes what that transaction made unreachable. Each state file records its generation (one more
than the save before), its session and the segments it stands on, so the files say what the session is
and the index is a cache of them: an index that is missing, emptied or older than the files is rebuilt
from the files, never a reason to delete one.

Files are removed only by the process holding the session's writer lock, after it has brought the index
up to date with the newest complete state in the folder: files of a save that crashed before it was
complete, and files a committed save made unreachable. Opening a store removes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import (
    ConfigError,
    ConfigMismatchError,
    CorruptSessionError,
    DiskBudgetError,
    ModelMismatchError,
    ReadOnlyStoreError,
    SessionLockedError,
    SessionNotFoundError,
    StoreError,
    StoreIndexError,
    StoreWriteError,
)
from .models import emllm_home
from .snapshot import (
    SavedState,
    SegmentRecord,
    check_format1_text,
    check_saved,
    file_meta,
    flatten,
    read_pieces,
    read_state,
    segment_metadata,
    state_metadata,
)
from .state import Mark, Piece, State
from .store_index import INDEX_FILE, SessionIndex, SessionRow
from .store_layout import (
    SessionFolder,
    WriterLock,
    check_file_name,
    check_session_id,
    folder_name,
    names_session,
    segment_file,
    state_file,
    state_generation,
)
from .tensorfiles import TensorFile, fsync_dir, regular_file_size, write_tensors


class StoredSessionState(Protocol):
    """What the store needs of a session (the store never imports Session): its id, its engine's model
    identity, and its state (emllm.state)."""

    id: str
    engine: Any  # .name, .fingerprint, .config
    saved: SavedState | None
    timeline: Any

    def mark(self) -> Mark: ...
    def event_mark(self, events: int, floor: Mark) -> Mark: ...
    def rows(self, start: Mark, stop: Mark) -> State: ...
    def state_dict(
        self, since: Mark | None = None, until: Mark | None = None, *, copy: bool = True
    ) -> State: ...
    def load_rows(self, pieces: list[Piece]) -> None: ...
    def load_state_dict(self, state: State, since: Mark | None = None) -> None: ...
    def serve_from_disk(self, pieces: list[Piece]) -> None: ...
    def reset(self) -> None: ...


log = logging.getLogger(__name__)


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
    read_only: open for listing and reading only; None (default) = read-only when the folder or its index
        cannot be written.

    One process owns a store object: after fork(), open a new one in the child (ForkedStoreError otherwise).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_ram_bytes: int | None = None,
        max_disk_bytes: int | None = None,
        lock_timeout: float = 0.0,
        read_only: bool | None = None,
    ):
        self.max_ram_bytes = _budget("max_ram_bytes", max_ram_bytes)
        self.max_disk_bytes = _budget("max_disk_bytes", max_disk_bytes)
        self.lock_timeout = _seconds("lock_timeout", lock_timeout)
        self.root = Path(path).expanduser() if path is not None else emllm_home() / "sessions"
        self.sessions_root = self.root / "sessions"
        if not read_only:
            try:
                self.sessions_root.mkdir(parents=True, exist_ok=True)
            except OSError:
                if not self.root.is_dir():
                    raise StoreError(f"cannot create the store folder {self.root}") from None
        self._index = SessionIndex(self.root, read_only=bool(read_only))
        self._mutex = threading.RLock()
        self._locks: dict[str, WriterLock] = {}  # session id -> its writer lock, held by this store
        if not self.read_only:
            self._bring_index_up_to_date()

    def __repr__(self) -> str:
        return f"SessionStore({str(self.root)!r})"

    @property
    def read_only(self) -> bool:
        return self._index.read_only

    # -- listing ----------------------------------------------------------------------------------
    def __contains__(self, session_id: str) -> bool:
        return self._index.contains(check_session_id(session_id))

    def list(self) -> list[StoredSession]:
        return [StoredSession(*row) for row in self._index.listing()]

    def info(self, session_id: str) -> StoredSession:
        for stored in self.list():
            if stored.id == session_id:
                return stored
        raise self._not_found(session_id)

    def total_bytes(self) -> int:
        return self._index.total_bytes()

    def delete(self, session_id: str) -> None:
        """Remove a stored session and its files (refused while another engine holds it open)."""
        if session_id not in self:
            raise self._not_found(session_id)
        held = session_id in self._locks
        if not held:
            self.lock(session_id)
        try:
            folder = self._locks[session_id].folder
            # the marker first: a crash after it finishes the delete, never brings the session back
            folder.mark_deleting()
            self._finish_delete(session_id, folder)
        finally:
            self.unlock(session_id)

    def _finish_delete(self, session_id: str | None, folder: SessionFolder) -> None:
        if session_id is not None:
            self._index.remove(session_id)
        folder.remove(folder.store_files())
        folder.clear_deleting()

    def verify(self, session_id: str) -> None:
        """Read every file of a stored session, check every checksum, and check that its files agree with
        each other and with the index (tokens, events, text); CorruptSessionError if anything fails."""
        row = self._index.row(session_id)
        if row is None:
            raise self._not_found(session_id)
        folder = SessionFolder(self.sessions_root, row.folder)
        records = self._index.segments(session_id)
        segments = [(r, _open_segment(folder, r)) for r in records]
        state_file_ = TensorFile(
            folder.path / row.state_file, row.state_checksums, expected_bytes=row.state_bytes
        )
        pieces, state, since = _read_saved(segments, state_file_)
        try:
            check_saved(pieces, state, since, row.tokens, row.events)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise CorruptSessionError(f"session {session_id!r} in {folder.path}: {exc}") from exc
        for mapped in [mapped for _, mapped in segments] + [state_file_]:
            for name in mapped.names():
                mapped.get(name)

    # -- locks ------------------------------------------------------------------------------------
    def lock(self, session_id: str) -> None:
        """Take the session's writer lock (waiting up to lock_timeout)."""
        check_session_id(session_id)
        self._check_writable(f"open session {session_id!r} for writing")
        with self._mutex:
            if session_id in self._locks:
                raise SessionLockedError(f"session {session_id!r} is already open in this store")
            for _ in range(3):
                folder = self._session_folder(session_id)
                lock = WriterLock.acquire(folder, self.lock_timeout, f"session {session_id!r}")
                # the folder of an id changes only when a session saved before 0.2 is deleted and made
                # again; if that happened while we waited, take the new folder's lock instead
                if self._session_folder(session_id).name == folder.name:
                    self._locks[session_id] = lock
                    return
                lock.release()
            raise SessionLockedError(f"session {session_id!r} keeps moving folders; try again")

    def _check_writable(self, action: str) -> None:
        self._index.check_process()
        if self.read_only:
            raise ReadOnlyStoreError(f"cannot {action}: the store {self.root} is read-only here")

    def unlock(self, session_id: str) -> None:
        with self._mutex:
            lock = self._locks.pop(session_id, None)
            if lock is not None:
                lock.release()

    def close(self) -> None:
        """Release every lock and the index."""
        with self._mutex:
            for session_id in list(self._locks):
                self.unlock(session_id)
            self._index.close()

    # -- attach / save ----------------------------------------------------------------------------
    def attach(self, session: StoredSessionState) -> None:
        """Lock the session for this engine and, if it was saved before, rebuild it from disk."""
        self.lock(session.id)
        try:
            row = self._recover(session.id, self._locks[session.id].folder, collect=True)
            if row is None:
                session.saved = SavedState([], None, 0, 0)
                return
            fingerprint = session.engine.fingerprint
            if row.fingerprint != fingerprint:
                raise ModelMismatchError(
                    f"session {session.id!r} was saved with model {row.model_name!r} (fingerprint "
                    f"{row.fingerprint}); this engine runs {session.engine.name!r} ({fingerprint}). "
                    "Keys and values of one model mean nothing to another: open it with the model that "
                    "wrote it, or use another session id."
                )
            _check_window(session, row.config)
            self._restore(session, row)
        except BaseException:
            self.unlock(session.id)
            raise

    def _restore(self, session: StoredSessionState, row: SessionRow) -> None:
        folder = SessionFolder(self.sessions_root, row.folder)
        records = self._index.segments(session.id)
        try:
            segments = [(r, _open_segment(folder, r)) for r in records]
            state_file_ = TensorFile(
                folder.path / row.state_file, row.state_checksums, expected_bytes=row.state_bytes
            )
            pieces, state, since = _read_saved(segments, state_file_)
            session.load_rows(pieces)
            session.load_state_dict(state, since)
            if (row.tokens, row.events) != (len(session.token_ids), len(session.timeline.events)):
                raise ValueError(
                    f"it holds other tokens or events than its index row ({row.tokens}, {row.events})"
                )
        except CorruptSessionError:
            session.reset()
            raise
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, UnicodeDecodeError) as exc:
            session.reset()
            raise CorruptSessionError(
                f"session {session.id!r} in {folder.path} cannot be read: {exc}"
            ) from exc
        mark = session.mark()
        session.saved = SavedState(
            records, row.state_file, mark.tokens, mark.chars, row.state_bytes, row.generation, row.created
        )

    def save(self, session: StoredSessionState) -> None:
        """Write what changed since the last save; atomic (all or nothing)."""
        saved = session.saved
        lock = self._locks.get(session.id)
        if saved is None or lock is None:
            raise StoreError(f"session {session.id!r} is not attached to {self}")
        self._index.check_process()
        folder = lock.folder
        kept = saved.reusable_segments(session)
        start, now = kept[-1].stop if kept else Mark(), session.mark()
        segments = []
        if now.events > start.events:  # one new segment: every event since the kept ones
            stop = session.event_mark(now.events, start)
            segments.append((start, stop, *flatten(session.rows(start, stop))))
            start = stop
        state_tensors, state_values = flatten(session.state_dict(start, now, copy=False))
        self._check_disk_budget(saved, kept, [tensors for *_, tensors, _ in segments] + [state_tensors])

        generation = saved.generation + 1
        name = state_file(generation)
        new_records, written = [], []
        try:
            for first, last, tensors, values in segments:
                segment = segment_file(first.events)
                written.append(segment)
                info = SegmentRecord.between(first, last, segment, {}, 0).as_meta()
                checksums = write_tensors(folder.path / segment, tensors, segment_metadata(info, values))
                nbytes = (folder.path / segment).stat().st_size
                new_records.append(SegmentRecord.between(first, last, segment, checksums, nbytes))
            records = kept + new_records
            row_fields = self._row_fields(session, now, generation)
            about = dict(
                session_id=session.id,
                generation=generation,
                row=row_fields,
                segments=[r.as_meta() for r in records],
            )
            written.append(name)
            metadata = state_metadata(about, start, state_values)
            state_checksums = write_tensors(folder.path / name, state_tensors, metadata)
            state_bytes = (folder.path / name).stat().st_size
            fsync_dir(folder.path)
            row = _row(session.id, folder.name, row_fields, records, name, state_checksums, state_bytes)
            self._publish(row, records)
        except BaseException:
            if not self._index_holds(session.id, name):  # never remove what a commit may refer to
                folder.remove(written)
            raise
        kept_files = {r.file for r in kept}
        dropped = [r.file for r in saved.segments if r.file not in kept_files]
        if saved.state_file:
            dropped.append(saved.state_file)
        folder.remove(dropped)
        session.serve_from_disk(read_pieces([(r, _open_segment(folder, r)) for r in records]))
        session.saved = SavedState(records, name, now.tokens, now.chars, state_bytes, generation, row.created)

    def _publish(self, row: SessionRow, records: list[SegmentRecord]) -> None:
        try:
            self._index.publish(row, records)
        except StoreError:
            # a commit can fail after it reached the disk (an I/O error reported late): then it holds
            if not self._index_holds(row.id, row.state_file):
                raise
            log.warning("session %r: the index reported an error but holds the save", row.id)

    def _index_holds(self, session_id: str, state_name: str) -> bool:
        """Whether the index's committed row of the session names this state file (unsure: True)."""
        try:
            held = self._index.row(session_id)
        except BaseException:
            return True
        return held is not None and held.state_file == state_name

    @staticmethod
    def _row_fields(session: StoredSessionState, mark: Mark, generation: int) -> dict:
        """What a state file records of its session's index row (to rebuild it from the file)."""
        now = time.time()
        return dict(
            model_name=session.engine.name,
            fingerprint=session.engine.fingerprint,
            created=session.saved.created or now,
            updated=now,
            tokens=mark.tokens,
            events=mark.events,
            config=session.engine.config.model_dump_json(),
            generation=generation,
        )

    def _check_disk_budget(self, saved: SavedState, kept: list[SegmentRecord], payloads) -> None:
        if self.max_disk_bytes is None:
            return
        kept_files = {r.file for r in kept}
        freed = saved.state_bytes + sum(r.nbytes for r in saved.segments if r.file not in kept_files)
        new = sum(t.numel() * t.element_size() for tensors in payloads for t in tensors.values())
        projected = self.total_bytes() - freed + new
        if projected > self.max_disk_bytes:
            raise DiskBudgetError(
                f"saving {new / 2**20:.1f} MiB would take the store past its max_disk_bytes of "
                f"{self.max_disk_bytes / 2**20:.1f} MiB ({projected / 2**20:.1f} MiB); nothing was written"
            )

    # -- folders, recovery, garbage ---------------------------------------------------------------
    def _session_folder(self, session_id: str) -> SessionFolder:
        """Where the session lives: the folder its index row names, else the one a new session gets."""
        name = self._index.folder_of(check_session_id(session_id)) or folder_name(session_id)
        return SessionFolder(self.sessions_root, name)

    def _folder(self, session_id: str) -> Path:
        return self._session_folder(session_id).path

    def _row(self, session_id: str) -> SessionRow | None:
        return self._index.row(session_id)

    def _recover(self, session_id: str | None, folder: SessionFolder, *, collect: bool) -> SessionRow | None:
        """With the folder's writer lock held: bring the session's index row up to the newest complete
        save in its folder (one the index does not know of: a lost, emptied or stale index, or a crash
        between writing and publishing), then, with collect, remove the files of saves that were cut short
        and of saves a later one replaced. `session_id` None: a folder the index has no row for.

        A save that is complete but cannot be read (it disagrees with itself, or was written before 0.2
        and its row is lost) is never removed: without a row to open instead, that is a
        CorruptSessionError. Returns the session's row, if any."""
        sharing = self._index.ids_in_folder(folder.name)
        if len(sharing) > 1:  # two ids whose folder names collided (12 hex digits, before 0.2)
            raise CorruptSessionError(
                f"sessions {sorted(sharing)} share the folder {folder.path}: nothing in it was changed. "
                "Back the folder up and delete one of them, or open them with the version that saved them"
            )
        if folder.is_deleting():
            if collect:
                self._finish_delete(session_id, folder)
            return None
        damaged = None
        try:
            row = self._index.row(session_id) if session_id is not None else None
        except CorruptSessionError as exc:
            row, damaged = None, exc
        newer, kept = self._roll_forward(session_id, folder, row, replace=damaged is not None)
        row = newer or row
        if row is None:
            if kept:
                raise CorruptSessionError(
                    f"{folder.path} holds a save that cannot be read ({kept.reason}) and the index has "
                    "no other: nothing was changed. Move the folder away to start the session anew"
                )
            if damaged is not None:
                raise damaged
            if collect:
                folder.remove(folder.store_files())  # a first save that was cut short
            return None
        referenced = self._check_referenced(row, folder)
        if collect:
            folder.remove([n for n in folder.store_files() if n not in referenced and n not in kept.files])
        return row

    def _roll_forward(
        self, session_id: str | None, folder: SessionFolder, row: SessionRow | None, *, replace: bool = False
    ) -> tuple[SessionRow | None, _Kept]:
        """Publish the newest complete save of a later generation than the row's (with replace: in place of
        a damaged row). Returns (the row published or None, the files to keep that no row names: complete
        saves that cannot be read)."""
        generation = row.generation if row is not None else -1
        kept = _Kept()
        candidates = []
        for name in folder.store_files():
            found = state_generation(name)
            if found is None or found <= generation or (row is not None and name == row.state_file):
                continue
            if found == 0:  # written before 0.2: it does not list its segments, so keep them all
                kept.add(folder.store_files(), f"{name} was saved before 0.2 and its index row is lost")
                return None, kept
            candidates.append((found, name))
        for found, name in sorted(candidates, reverse=True):
            try:
                newer, records = self._read_complete_state(folder, name, found, session_id)
            except _CutShort as exc:
                log.info("%s: %s was cut short (%s)", folder.path, name, exc)
                continue
            except CorruptSessionError as exc:
                log.warning("%s: %s is complete but cannot be read (%s); kept", folder.path, name, exc)
                kept.add([name, *getattr(exc, "listed", [])], str(exc))
                continue
            if row is None and newer.id != session_id and self._index.contains(newer.id):
                kept.add(
                    folder.store_files(), f"an old folder of session {newer.id!r}, which lives elsewhere"
                )
                return None, kept
            if self._index.publish(newer, records, newer_than=None if replace else generation):
                log.warning("session %r: the index did not know its save %s; it does now", newer.id, name)
            return self._index.row(newer.id), kept
        return None, kept

    def _read_complete_state(
        self, folder: SessionFolder, name: str, generation: int, session_id: str | None
    ) -> tuple[SessionRow, list[SegmentRecord]]:
        """A state file and the segments it lists, as an index row. _CutShort when a file is missing, short
        or fails its checksums (a save that crashed); CorruptSessionError when it is whole but disagrees."""
        try:
            state = TensorFile(folder.path / name)
            for tensor in state.names():
                state.get(tensor)  # every checksum: a save cut short never counts
        except CorruptSessionError as exc:
            raise _CutShort(str(exc)) from exc
        meta = file_meta(state)
        about, listed, owner = meta.get("row"), meta.get("segments"), meta.get("session_id")
        if (
            meta.get("generation") != generation
            or not isinstance(about, dict)
            or not isinstance(listed, list)
        ):
            raise CorruptSessionError(f"{state.path} does not describe its save")
        if not isinstance(owner, str) or not names_session(folder.name, owner):
            raise CorruptSessionError(f"{state.path} names session {owner!r}, not the one of its folder")
        if session_id is not None and owner != session_id:
            raise CorruptSessionError(f"{state.path} belongs to session {owner!r}")
        files = [
            check_file_name(e.get("file") if isinstance(e, dict) else None, str(state.path)) for e in listed
        ]
        records = []
        for entry, file in zip(listed, files, strict=True):
            try:
                segment = TensorFile(folder.path / file, None, expected_bytes=entry.get("nbytes"))
            except CorruptSessionError as exc:  # not yet durable when the save crashed
                raise _CutShort(str(exc)) from exc
            records.append(SegmentRecord.from_meta(entry, segment.own_checksums()))
        try:
            segments = [(r, _open_segment(folder, r)) for r in records]
            _read_saved(segments, state)
            fields = dict(
                about, state_file=name, state_checksums=state.own_checksums(), state_bytes=state.size
            )
            fields["bytes"] = state.size + sum(r.nbytes for r in records)
            row = SessionRow.parse(SessionRow(id=owner, folder=folder.name, **fields).as_values())
        except (CorruptSessionError, TypeError) as exc:
            raise _Unreadable(f"{state.path} does not describe its session ({exc})", files) from exc
        return row, records

    def _check_referenced(self, row: SessionRow, folder: SessionFolder) -> set[str]:
        """The files the row refers to; CorruptSessionError (and nothing removed) if one is missing."""
        sizes = {row.state_file: row.state_bytes}
        sizes.update({r.file: r.nbytes for r in self._index.segments(row.id)})
        for name, size in sizes.items():
            held = regular_file_size(folder.path / name)
            if held != size:
                raise CorruptSessionError(
                    f"{folder.path / name} has {held} bytes, the index recorded {size}: truncated or replaced"
                )
        return set(sizes)

    def _bring_index_up_to_date(self, every_folder: bool = False) -> int:
        """Publish the saves the index does not know of (a missing, emptied or stale index), in folders
        nobody holds; nothing is removed. At open, only folders without a row or whose row names a state
        file that is gone are looked at; `every_folder` looks at all. Returns how many sessions changed."""
        known = self._index.folders()
        stale = set()
        for _, folder, state in self._index.state_files():
            try:
                path = SessionFolder(self.sessions_root, folder).path / check_file_name(state, "the index")
            except CorruptSessionError:
                continue  # a damaged row: that session's error when it is opened
            if not _is_file(path):
                stale.add(folder)
        changed = 0
        for entry in _scan(self.sessions_root):
            if entry in known and entry not in stale and not every_folder:
                continue
            try:
                folder = SessionFolder(self.sessions_root, entry)
                if entry not in known and not any(state_generation(n) for n in folder.store_files()):
                    continue
                lock = WriterLock.try_acquire(folder)
            except (CorruptSessionError, StoreError):
                continue
            if lock is None:
                continue  # its writer is alive: it publishes its own saves
            try:
                before = self._index.row(known[entry]) if entry in known else None
                after = self._recover(self._index.folders().get(entry), folder, collect=False)
                changed += after is not None and after != before
            except (CorruptSessionError, StoreError) as exc:
                log.warning("%s: %s", folder.path, exc)
            finally:
                lock.release()
        return changed

    def remove_orphans(self) -> int:
        """Remove files no committed state refers to (left by crashed saves and deletes), in every session
        nobody holds open; returns how many files went. A save the index does not know of is published,
        never removed."""
        self._check_writable("remove stray files")
        removed = 0
        for entry in _scan(self.sessions_root):
            try:
                folder = SessionFolder(self.sessions_root, entry)
                before = set(folder.store_files())
                if not before and not folder.is_deleting():
                    continue
                lock = WriterLock.try_acquire(folder)
            except (CorruptSessionError, StoreError):
                continue
            if lock is None:
                continue
            try:
                self._recover(self._index.folders().get(entry), folder, collect=True)
            except (CorruptSessionError, StoreError) as exc:
                log.warning("%s: %s", folder.path, exc)
            finally:
                lock.release()
            removed += len(before - set(folder.store_files()))
        return removed

    # -- backup and recovery ----------------------------------------------------------------------
    @classmethod
    def recover(cls, path: str | os.PathLike | None = None, **options) -> SessionStore:
        """Open a store whose index is damaged, lost or stale, rebuilding it from the session files.

        A damaged index is moved aside (`index.sqlite.damaged-<time>`), never deleted; every session folder
        is then read and its newest complete save published. Sessions saved before 0.2 whose index row is
        lost cannot be rebuilt (their state files do not list their segments): their files stay untouched.
        """
        root = Path(path).expanduser() if path is not None else emllm_home() / "sessions"
        try:
            store = cls(root, **options)
        except StoreIndexError:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                damaged = root / f"{INDEX_FILE}{suffix}"
                if damaged.exists():
                    damaged.rename(root / f"{INDEX_FILE}{suffix}.damaged-{stamp}")
            store = cls(root, **options)
        store._bring_index_up_to_date(every_folder=True)
        return store

    def backup(self, destination: str | os.PathLike) -> list[str]:
        """Copy every stored session into a new store folder, consistently, while the store is in use;
        returns the ids of sessions that could not be copied (damaged ones), after copying the rest.

        Session files never change once written, so each session's committed files are copied as its row
        names them; if a save replaces one meanwhile, the row is read again.
        """
        target_root = Path(destination).expanduser()
        if target_root.exists() and any(target_root.iterdir()):
            raise StoreError(f"the backup folder {target_root} is not empty")
        target = SessionStore(target_root)
        failed = []
        try:
            for stored in self.list():
                try:
                    self._copy_session(stored.id, target)
                except (CorruptSessionError, StoreError) as exc:
                    log.warning("session %r not backed up: %s", stored.id, exc)
                    failed.append(stored.id)
        finally:
            target.close()
        return failed

    def _copy_session(self, session_id: str, target: SessionStore) -> None:
        for _ in range(10):
            row = self._index.row(session_id)
            if row is None:
                return  # deleted meanwhile
            records = self._index.segments(session_id)
            source = SessionFolder(self.sessions_root, row.folder)
            copy = SessionFolder(target.sessions_root, row.folder)
            copy.create()
            try:
                for name in [r.file for r in records] + [row.state_file]:
                    if not (copy.path / name).exists():
                        _copy_file(source.path / name, copy.path / name)
            except FileNotFoundError:
                continue  # a save replaced it meanwhile: read the row again
            fsync_dir(copy.path)
            target._index.publish(row, records)
            return
        raise StoreError(f"session {session_id!r} changed on every try to copy it")

    def _not_found(self, session_id: str) -> SessionNotFoundError:
        return SessionNotFoundError(f"no stored session {session_id!r} in {self.root}")


class _CutShort(Exception):
    """A save whose files are missing, short or fail their checksums: it crashed before it was complete."""


class _Unreadable(CorruptSessionError):
    """A complete save (its files whole) that disagrees with itself; `listed`: the segment files it names."""

    def __init__(self, message: str, listed: list[str]):
        super().__init__(message)
        self.listed = listed


@dataclass
class _Kept:
    """Files a recovery must not remove although no row names them, and why."""

    files: set[str] = field(default_factory=set)
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.files)

    def add(self, names, reason: str) -> None:
        self.files.update(names)
        self.reason = self.reason or reason


def _read_saved(segments: list[tuple[SegmentRecord, TensorFile]], state_file_: TensorFile) -> tuple:
    """(pieces, state, the mark the state's rows start at) of a saved session; nothing read yet but what
    the layout needs."""
    pieces = read_pieces(segments)
    since = segments[-1][0].stop if segments else Mark()
    state = read_state(state_file_, since)
    if file_meta(state_file_)["format"] == 1:
        check_format1_text(pieces, state, state_file_)
    return pieces, state, since


def _open_segment(folder: SessionFolder, record: SegmentRecord) -> TensorFile:
    check_file_name(record.file, f"session folder {folder.path}")
    return TensorFile(folder.path / record.file, record.checksums, expected_bytes=record.nbytes)


def _row(
    session_id: str, folder: str, fields: dict, records, state_name: str, checksums: dict, state_bytes: int
) -> SessionRow:
    total = state_bytes + sum(r.nbytes for r in records)
    return SessionRow(
        id=session_id,
        folder=folder,
        state_file=state_name,
        state_checksums=checksums,
        state_bytes=state_bytes,
        bytes=total,
        **fields,
    )


def _is_file(path: Path) -> bool:
    try:
        regular_file_size(path)
    except CorruptSessionError:
        return False
    return True


def _copy_file(source: Path, target: Path) -> None:
    regular_file_size(source)  # never follow a link out of the store
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source, partial, follow_symlinks=False)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreWriteError(f"cannot copy {source} to {target}: {exc}") from exc


def _scan(root: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(root))
    except FileNotFoundError:
        return []


def _budget(name: str, value) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of bytes or None, got {value!r}")
    return int(value)


def _seconds(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


# The saved window and init block have these shapes; every other field may change between runs (retrieval
# settings apply at once, segmentation settings to text read from then on).
WINDOW_FIELDS = ("n_init", "n_local", "chunk_size")


def _check_window(session: StoredSessionState, saved_config: str | None) -> None:
    if saved_config is None:
        return
    try:
        saved = json.loads(saved_config)
    except ValueError as exc:
        raise CorruptSessionError(f"session {session.id!r}: its saved configuration is unreadable") from exc
    config = session.engine.config
    differ = [
        f"{name} {saved[name]} (now {getattr(config, name)})"
        for name in WINDOW_FIELDS
        if isinstance(saved, dict) and name in saved and saved[name] != getattr(config, name)
    ]
    if differ:
        msg = (
            f"session {session.id!r} was saved with {', '.join(differ)}: its window and initial tokens "
            "have that shape. Open it with the same n_init, n_local and chunk_size (n_mem, question_recall "
            "and the other retrieval settings may change), or use another session id."
        )
        raise ConfigMismatchError(msg)


__all__ = ["SessionStore", "StoredSession"]
