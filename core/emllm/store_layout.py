"""The names and locks of a store folder: which folder holds a session, which file names the store writes,
and the per-session writer lock. Knows nothing about the index or what the files hold.

Everything here treats the folder as untrusted: a name the index or a directory listing hands over is
used only if it is one the store itself would write, and a link put in place of a folder or file is
refused, so no path can reach outside the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
import time
import uuid
from pathlib import Path

from .errors import (
    CorruptSessionError,
    InvalidSessionIdError,
    ReadOnlyStoreError,
    SessionLockedError,
    StoreWriteError,
)
from .tensorfiles import fsync_dir

MAX_SESSION_ID_CHARS = 512
LOCK_FILE = ".lock"
DELETING_MARKER = "deleting"  # a delete in progress: its files are garbage, whatever the index says

_SEGMENT_FILE = re.compile(r"seg-\d{8}-[0-9a-f]{8}\.safetensors")
_STATE_FILE = re.compile(r"state-(?:(\d{10})-)?[0-9a-f]{8}\.safetensors")  # no generation: format 1
# readable part, then the id's SHA-256: in full since 0.2 (collision-free), 12 digits before
_FOLDER = re.compile(r"[A-Za-z0-9_.-]{0,40}-(?:[0-9a-f]{64}|[0-9a-f]{12})")


def check_session_id(session_id) -> str:
    """A stored session's id: any text of 1-512 characters that UTF-8 can encode, without NUL."""
    if not isinstance(session_id, str):
        raise InvalidSessionIdError(f"a session id is a str, not {type(session_id).__name__}")
    if not 1 <= len(session_id) <= MAX_SESSION_ID_CHARS or "\x00" in session_id:
        raise InvalidSessionIdError(
            f"a session id has 1-{MAX_SESSION_ID_CHARS} characters and no NUL (got {len(session_id)})"
        )
    try:
        session_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidSessionIdError(f"a session id must be valid Unicode text: {exc}") from None
    return session_id


def folder_name(session_id: str) -> str:
    """The folder of a new session: readable, and unique to its id (the full SHA-256 of the id)."""
    digest = hashlib.sha256(check_session_id(session_id).encode("utf-8")).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', session_id)[:40]}-{digest}"


def names_session(folder: str, session_id: str) -> bool:
    """Whether a folder's name is the one the store gives this id (now or, 12 digits, before 0.2)."""
    digest = hashlib.sha256(session_id.encode("utf-8")).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
    return folder in (f"{readable}-{digest}", f"{readable}-{digest[:12]}")


def segment_file(first_event: int) -> str:
    return f"seg-{first_event:08d}-{uuid.uuid4().hex[:8]}.safetensors"


def state_file(generation: int) -> str:
    return f"state-{generation:010d}-{uuid.uuid4().hex[:8]}.safetensors"


def state_generation(name: str) -> int | None:
    """The generation in a state file's name (0 for format 1 names); None if it is not a state file."""
    match = _STATE_FILE.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1) or 0)


def is_store_file(name: str) -> bool:
    return bool(_SEGMENT_FILE.fullmatch(name) or _STATE_FILE.fullmatch(name))


def check_file_name(name, where: str) -> str:
    """A file name read from the index or a state file: only names the store writes (no paths)."""
    if not isinstance(name, str) or not is_store_file(name):
        raise CorruptSessionError(f"{where} names a file the store never writes: {name!r}")
    return name


class SessionFolder:
    """One session's folder under `<store>/sessions`; refuses names the store does not write and links."""

    def __init__(self, sessions_root: Path, name) -> None:
        if not isinstance(name, str) or not _FOLDER.fullmatch(name):
            raise CorruptSessionError(f"the index names a session folder the store never writes: {name!r}")
        self.root = sessions_root
        self.name = name
        self.path = sessions_root / name

    def __repr__(self) -> str:
        return f"SessionFolder({str(self.path)!r})"

    def exists(self) -> bool:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            raise CorruptSessionError(
                f"{self.path} is not a folder (a link or a file); the store never puts one there"
            )
        return True

    def create(self) -> None:
        if self.exists():
            return
        try:
            self.path.mkdir()
        except FileExistsError:
            self.exists()  # made by another process meanwhile: check what it is
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def store_files(self) -> list[str]:
        """Names of the regular files the store wrote here (links and anything else are left alone)."""
        if not self.exists():
            return []
        names = []
        for entry in os.scandir(self.path):
            if is_store_file(entry.name) and entry.is_file(follow_symlinks=False):
                names.append(entry.name)
        return sorted(names)

    def remove(self, names) -> int:
        """Unlink these store files (names are checked again: nothing else is ever removed)."""
        removed = 0
        for name in names:
            if is_store_file(name):
                try:
                    os.unlink(self.path / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            fsync_dir(self.path)
        return removed

    # -- a delete in progress ------------------------------------------------------------------------
    def mark_deleting(self) -> None:
        marker = self.path / DELETING_MARKER
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path)

    def is_deleting(self) -> bool:
        return os.path.lexists(self.path / DELETING_MARKER)

    def clear_deleting(self) -> None:
        try:
            os.unlink(self.path / DELETING_MARKER)
        except FileNotFoundError:
            return
        fsync_dir(self.path)


class WriterLock:
    """The exclusive flock on a session folder's `.lock`: one writer per session, across processes.

    It belongs to the process that took it: a flock is shared with children through fork(), so a child
    must never release it (that would release the parent's) and the store refuses to write from one.
    """

    def __init__(self, fd: int, folder: SessionFolder) -> None:
        self.fd = fd
        self.folder = folder
        self.pid = os.getpid()

    @classmethod
    def acquire(cls, folder: SessionFolder, timeout: float, what: str) -> WriterLock:
        """Wait up to `timeout` seconds; SessionLockedError after that."""
        lock = cls.try_acquire(folder)
        deadline = time.monotonic() + timeout
        while lock is None:
            if time.monotonic() >= deadline:
                msg = f"{what} is open for writing elsewhere (lock {folder.path / LOCK_FILE})"
                raise SessionLockedError(msg)
            time.sleep(0.05)
            lock = cls.try_acquire(folder)
        return lock

    @classmethod
    def try_acquire(cls, folder: SessionFolder) -> WriterLock | None:
        """The lock if nobody holds it now, else None."""
        folder.create()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(folder.path / LOCK_FILE, flags, 0o644)
        except OSError as exc:
            raise _write_error(folder.path / LOCK_FILE, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd, folder)

    def release(self) -> None:
        if self.fd < 0:
            return
        if os.getpid() == self.pid:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)  # in a forked child: only its copy of the descriptor; the parent keeps the lock
        self.fd = -1


def _write_error(path: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ReadOnlyStoreError(f"cannot write {path}: {exc.strerror} (the store is read-only here)")
    if exc.errno == errno.ELOOP:
        return CorruptSessionError(f"{path} is a link; the store never puts one there")
    return StoreWriteError(f"cannot write {path}: {exc}")


__all__ = [
    "DELETING_MARKER",
    "LOCK_FILE",
    "MAX_SESSION_ID_CHARS",
    "SessionFolder",
    "WriterLock",
    "check_file_name",
    "check_session_id",
    "folder_name",
    "is_store_file",
    "names_session",
    "segment_file",
    "state_file",
    "state_generation",
]
