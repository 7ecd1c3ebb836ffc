"""The store never loses or leaks a session: no deletion on guesses (a store opened beside a writer, a
missing or stale index), one writer after fork(), saves in the middle of a feed that agree with themselves,
session files and index rows treated as untrusted input, and failures as typed errors."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time

import emllm
import pytest
import torch
from conftest import tiny_model
from emllm import SessionStore
from emllm.store_layout import folder_name
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_session import prose
from test_store import open_engine

CHILD_TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def save_session(model, path, session_id: str, text: str, saves: int = 1) -> list[int]:
    engine = open_engine(model, path)
    session = engine.session(session_id)
    for i in range(saves):
        session.feed(text if i == 0 else f" and then {i}: " + prose(150, seed=i, ascii_only=True))
        session.save()
    ids = session.token_ids
    engine.close()
    engine.store.close()
    return ids


def store_files(path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in (path / "sessions").rglob("*.safetensors")}


def tokens_of(model, path, session_id: str) -> list[int]:
    engine = open_engine(model, path)
    try:
        return engine.session(session_id, create=False).token_ids
    finally:
        engine.close()
        engine.store.close()


def run_child(target, *args) -> tuple[int, str]:
    """fork() and run target(*args, write) in the child; returns (exit status, what it wrote)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            target(*args, lambda line: os.write(write_fd, f"{line}\n".encode()))
        except BaseException as exc:  # report, never unwind into pytest inside the child
            os.write(write_fd, f"error {type(exc).__name__}: {exc}\n".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        output = reader.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


# ------------------------------------------------------------------------------------------ item 1: opening


def _writer(model, path, seconds: float, write) -> None:
    """Keep creating sessions: session(new id); feed; save; drop; announce each committed one."""
    engine = open_engine(model, path, lock_timeout=10)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        session = engine.session(f"n{i}")
        session.feed(f"note {i}: " + prose(40, seed=i, ascii_only=True))
        session.save()
        write(f"done n{i} {len(session.token_ids)}")
        engine.drop_session(f"n{i}")
        i += 1


def _opener(path, seconds: float, write) -> None:
    """What `emllm sessions` does beside a running app, plus the explicit garbage collection, in a loop."""
    deadline = time.monotonic() + seconds
    opened = 0
    while time.monotonic() < deadline:
        store = SessionStore(path)
        if opened % 2:
            store.remove_orphans()
        store.close()
        opened += 1
    write(f"opened {opened}")


def test_opening_a_store_beside_a_writer_loses_no_session(model, tmp_path) -> None:
    """Before: every open removed the folders of sessions committed after it read the index (1,733 of 3,292
    sessions in 40 s). Now opening removes nothing, and collection removes only what a lock holder proves
    is garbage."""
    read_fd, write_fd = os.pipe()
    opener = os.fork()
    if opener == 0:
        try:
            os.close(read_fd)
            _opener(tmp_path, 6.0, lambda line: os.write(write_fd, f"{line}\n".encode()))
        finally:
            os._exit(0)
    os.close(write_fd)
    status, output = run_child(_writer, model, tmp_path, 6.0)
    with os.fdopen(read_fd) as reader:
        opened = int(reader.read().split()[1])
    os.waitpid(opener, 0)
    assert status == 0, output
    committed = dict(line.split()[1:] for line in output.splitlines() if line.startswith("done"))
    assert len(committed) > 20 and opened > 20, (len(committed), opened)
    engine = open_engine(model, tmp_path)
    lost = [sid for sid, n in committed.items() if sid not in engine.store]
    assert not lost, f"{len(lost)} of {len(committed)} committed sessions lost: {lost[:5]}"
    for sid, n in committed.items():
        assert len(engine.session(sid).token_ids) == int(n)
        engine.drop_session(sid)
    print(f"\n{len(committed)} sessions committed beside {opened} opens of the store: none lost")


# ------------------------------------------------------------------------------------------ item 2: the index


def _damage(path, how: str) -> None:
    index = path / "index.sqlite"
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            (path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    elif how == "truncated":
        index.write_bytes(b"")
        for suffix in ("-wal", "-shm"):
            (path / f"index.sqlite{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_missing_or_emptied_index_is_rebuilt_from_the_files(model, tmp_path, how) -> None:
    """Before: the next open created an empty index and deleted every session folder."""
    alice = save_session(model, tmp_path, "alice", prose(700, seed=1), saves=3)
    bob = save_session(model, tmp_path, "bob", prose(300, seed=2))
    files = store_files(tmp_path)
    _damage(tmp_path, how)
    store = SessionStore(tmp_path)
    assert sorted(s.id for s in store.list()) == ["alice", "bob"]
    store.close()
    assert store_files(tmp_path) == files
    assert tokens_of(model, tmp_path, "alice") == alice
    assert tokens_of(model, tmp_path, "bob") == bob


def test_a_stale_copy_of_the_index_loses_nothing(model, tmp_path) -> None:
    """Before: `cp index.sqlite` of a store in WAL mode (without its -wal) put back later made the next
    open delete the sessions and saves it did not list."""
    engine = open_engine(model, tmp_path)
    alice = engine.session("alice")
    alice.feed(prose(500, seed=3))
    alice.save()
    stale = (tmp_path / "index.sqlite").read_bytes()  # the WAL holds the commits: this copy lacks them
    alice.feed(prose(400, seed=4))
    alice.save()
    bob = engine.session("bob")
    bob.feed(prose(300, seed=5))
    bob.save()
    expected = {"alice": alice.token_ids, "bob": bob.token_ids}
    engine.close()
    engine.store.close()
    files = store_files(tmp_path)
    (tmp_path / "index.sqlite").write_bytes(stale)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    store = SessionStore(tmp_path)
    assert sorted(s.id for s in store.list()) == ["alice", "bob"]
    assert {s.id: s.tokens for s in store.list()} == {k: len(v) for k, v in expected.items()}
    store.close()
    assert store_files(tmp_path) == files
    for session_id, ids in expected.items():
        assert tokens_of(model, tmp_path, session_id) == ids


def test_a_damaged_index_is_a_typed_error_and_recover_rebuilds_it(model, tmp_path) -> None:
    alice = save_session(model, tmp_path, "alice", prose(600, seed=6), saves=2)
    files = store_files(tmp_path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(emllm.StoreIndexError, match="sessions recover"):
        SessionStore(tmp_path)
    store = SessionStore.recover(tmp_path)
    assert [s.id for s in store.list()] == ["alice"]
    store.close()
    assert list(tmp_path.glob("index.sqlite.damaged-*"))  # moved aside, not deleted
    assert store_files(tmp_path) == files
    assert tokens_of(model, tmp_path, "alice") == alice


def test_backup_copies_a_store_in_use(model, tmp_path) -> None:
    source = tmp_path / "store"
    ids = save_session(model, source, "alice", prose(600, seed=7), saves=2)
    engine = open_engine(model, source)
    engine.session("alice")  # held open by this engine while the backup runs
    assert engine.store.backup(tmp_path / "copy") == []
    assert tokens_of(model, tmp_path / "copy", "alice") == ids
    SessionStore(tmp_path / "copy").verify("alice")
    with pytest.raises(emllm.StoreError, match="not empty"):
        engine.store.backup(tmp_path / "copy")


# ------------------------------------------------------------------------------------------ item 3: fork


def test_a_forked_child_cannot_write_its_parents_session(model, tmp_path) -> None:
    """Before: the flock is inherited through fork(), both processes saved, the last writer won."""
    engine = open_engine(model, tmp_path)
    session = engine.session("s")
    session.feed(prose(300, seed=8))
    session.save()

    def child(write) -> None:
        session.feed(" written by the child")
        try:
            session.save()
            write("saved")
        except emllm.ForkedStoreError as exc:
            write(f"refused {exc}")
        engine.close()  # must not release the parent's lock
        engine.store.close()

    status, output = run_child(child)
    assert status == 0 and output.startswith("refused"), output
    assert "gunicorn" in output
    session.feed(" written by the parent")
    session.save()
    with pytest.raises(emllm.SessionLockedError):  # the parent still holds its session
        open_engine(model, tmp_path).session("s")
    expected = session.token_ids
    engine.close()
    engine.store.close()
    assert tokens_of(model, tmp_path, "s") == expected


# ------------------------------------------------------------------------------------------ item 4: mid-feed

FEED_KILLS = 10


def _feeder(model, path, text: str, write) -> None:
    engine = open_engine(model, path, max_ram_bytes=40_000)
    session = engine.session("big")
    write("start")
    session.feed(text)
    write("done")


def test_kill_during_a_feed_with_a_ram_budget_leaves_text_tokens_and_events_that_agree(
    model, tmp_path
) -> None:
    """Before: an autosave inside `feed` saved the whole input's text with only the tokens read so far, and
    `verify` passed (9 of 10 random kills left that state)."""
    text = prose(6000, seed=9, ascii_only=True)
    rng = random.Random(1)
    states = {"nothing saved": 0, "part read": 0, "all read": 0}
    for attempt in range(FEED_KILLS):
        folder = tmp_path / f"kill-{attempt}"
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                torch.set_num_threads(1)
                _feeder(model, folder, text, lambda line, fd=write_fd: os.write(fd, f"{line}\n".encode()))
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as reader:
            assert reader.readline().strip() == "start"
            time.sleep(rng.uniform(0.2, 2.5))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        engine = open_engine(model, folder)
        if "big" not in engine.store:
            states["nothing saved"] += 1
            continue
        engine.store.verify("big")
        session = engine.session("big")
        held = session.text
        assert text.startswith(held), "the saved text is not what was read"
        assert session.token_ids == list(held.encode()), "text and tokens disagree"
        assert len(held) > 0
        states["part read" if len(held) < len(text) else "all read"] += 1
        engine.close()
        engine.store.close()
    print(f"\n{FEED_KILLS} kills during a feed: {states}")
    assert states["part read"] >= 1, states


def _format1_name(path: str) -> str | None:
    """The name a format-1 file (before 0.2) gave a tensor now at `path`; None: format 1 had none."""
    parts = path.split(".")
    if parts[0] in ("timeline", "ledger", "session"):
        return parts[1]
    if parts[0] == "layers":
        renamed = {"reprs": "r", "lengths": None}.get(parts[2], parts[2])
        return f"{renamed}.{parts[1]}" if renamed else None
    return path


def _rewrite_as_format1(path, *, state: bool) -> None:
    """Rewrite a file of the current format the way format 1 wrote it (names, metadata, no event rows in
    the state, the retrieval counts as tensors, window_k_rot kept)."""
    header, data = _read_safetensors(path)
    meta = json.loads(header.pop("__metadata__")["emllm"])
    values, renamed, blobs = meta["values"], {}, []
    layer_values = values.get("layers", {})
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        old = _format1_name(name)
        if old is None or (
            state and name.startswith("layers.") and name.split(".")[2] in ("k", "v", "reprs")
        ):
            continue
        if state and name == "timeline.events":
            continue
        begin, end = entry["data_offsets"]
        blobs.append((old, entry["dtype"], entry["shape"], data[begin:end]))
        if name.endswith(".window_k"):
            blobs.append(
                (old.replace("window_k", "window_k_rot"), entry["dtype"], entry["shape"], data[begin:end])
            )
    if state:
        for i, layer in layer_values.items():
            count = struct.pack("<q", layer["corpus_query_count"])
            blobs.append((f"corpus_query_count.{i}", "I64", [1], count))
            if layer.get("selection") is not None:
                selection = struct.pack(f"<{len(layer['selection'])}q", *layer["selection"])
                blobs.append((f"selection.{i}", "I64", [len(layer["selection"])], selection))
        since = meta["since"]
        old_meta = dict(
            format=1,
            session_id=meta["session_id"],
            init_len=values["timeline"]["init_len"],
            window_start=values["timeline"]["window_start"],
            events=meta["row"]["events"],
            token_start=since["computed"],
            char_start=since["chars"],
            query_counts=[layer_values[str(i)]["query_count"] for i in range(len(layer_values))],
            sources=values["ledger"]["sources"],
            **{
                k: values["session"][k]
                for k in ("tokens_computed", "tokens_reused", "max_local_distance", "decode_steps")
            },
        )
    else:
        old_meta = meta["segment"]
    offset, new_data = 0, b""
    for old, dtype, shape, blob in blobs:
        renamed[old] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        new_data += blob
    renamed["__metadata__"] = {"emllm": json.dumps(old_meta)}
    _write_safetensors(path, renamed, new_data)


def _as_format1(store_path, session_id: str, extra_text: bytes = b"") -> None:
    """Turn a saved session into the files format 1 wrote (extra_text: text after the last token, as format
    1 saved it in the middle of a feed), and the index rows to match."""
    store = SessionStore(store_path)
    row, records = store._row(session_id), store._index.segments(session_id)
    store.close()
    folder = store_path / "sessions" / row.folder
    for record in records:
        _rewrite_as_format1(folder / record.file, state=False)
    state = folder / row.state_file
    _rewrite_as_format1(state, state=True)
    if extra_text:
        header, data = _read_safetensors(state)
        end = header["text"]["data_offsets"][1]
        _shift_after(header, end, len(extra_text), "text")
        _write_safetensors(state, header, data[:end] + extra_text + data[end:])
    legacy = folder.with_name(folder.name[: -len("-") - 64] + "-" + folder.name[-64:][:12])
    folder.rename(legacy)
    os.rename(legacy / state.name, legacy / f"state-{row.state_file.split('-')[-1]}")
    db = sqlite3.connect(store_path / "index.sqlite")
    db.execute(
        "UPDATE sessions SET folder = ?, state_file = ?, state_checksums = '{}', state_bytes = ?, "
        "generation = 0",
        (
            legacy.name,
            f"state-{row.state_file.split('-')[-1]}",
            (legacy / f"state-{row.state_file.split('-')[-1]}").stat().st_size,
        ),
    )
    for record in records:
        db.execute(
            "UPDATE segments SET checksums = '{}', bytes = ? WHERE file = ?",
            ((legacy / record.file).stat().st_size, record.file),
        )
    db.commit()
    db.close()


def test_a_session_saved_by_format_1_opens_and_continues_exactly(model, tmp_path) -> None:
    """Sessions saved before 0.2 (fixed tensor names, no generation, 12-digit folders) still open."""
    engine = open_engine(model, tmp_path)
    session = engine.session("old")
    session.feed(prose(900, seed=31, ascii_only=True), source_id="doc")
    session.generate("Q: ", max_new_tokens=4)
    session.save()
    twin = engine.session()
    twin.load_state_dict(session.state_dict())
    expected = twin.generate(max_new_tokens=10)
    ids, events = session.token_ids, [e.text for e in session.events()]
    engine.close()
    engine.store.close()
    _as_format1(tmp_path, "old")
    engine = open_engine(model, tmp_path)
    engine.store.verify("old")
    reopened = engine.session("old")
    assert reopened.token_ids == ids and [e.text for e in reopened.events()] == events
    assert reopened.generate(max_new_tokens=10) == expected
    reopened.save()  # saved again in the current format
    engine.close()
    engine.store.close()
    assert tokens_of(model, tmp_path, "old")[: len(ids)] == ids


def test_verify_finds_a_half_read_feed_saved_by_format_1(model, tmp_path) -> None:
    """Format 1 saved the whole input's text with only the tokens read so far when it saved in the middle
    of a feed; verify now says so, where it said every file matches."""
    save_session(model, tmp_path, "s", prose(400, seed=10, ascii_only=True))
    _as_format1(tmp_path, "s", extra_text=b" and the rest of a long input that was never read")
    store = SessionStore(tmp_path)
    with pytest.raises(emllm.CorruptSessionError, match="text and tokens disagree"):
        store.verify("s")


# ------------------------------------------------------------------------------------------ item 5: shapes


def _read_safetensors(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_safetensors(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _shift_after(header: dict, position: int, by: int, grown: str) -> None:
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if name == grown:
            entry["data_offsets"] = [begin, end + by]
            entry["shape"] = [entry["shape"][0] + by]
        elif begin >= position:
            entry["data_offsets"] = [begin + by, end + by]


def _update_index(path, sql: str, *values) -> None:
    db = sqlite3.connect(path / "index.sqlite")
    db.execute(sql, values)
    db.commit()
    db.close()


def _state_path(model, path):
    save_session(model, path, "s", prose(500, seed=11))
    store = SessionStore(path)
    row = store._row("s")
    store.close()
    return path / "sessions" / row.folder / row.state_file


@pytest.mark.parametrize("shape", [[20_000_000], [10**12], [-1], [2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_a_header_whose_shape_disagrees_with_its_bytes_is_corrupt(model, tmp_path, shape) -> None:
    """Before: [20000000] with no data opened (304 MB, 20,000,400 tokens claimed) and verify passed;
    [10**12] and [-1] gave raw RuntimeErrors."""
    path = _state_path(model, tmp_path)
    header, data = _read_safetensors(path)
    header["session.pending"]["shape"] = shape
    _write_safetensors(path, header, data)
    _update_index(tmp_path, "UPDATE sessions SET state_bytes = ?", path.stat().st_size)
    engine = open_engine(model, tmp_path)
    with pytest.raises(emllm.CorruptSessionError):
        engine.store.verify("s")
    with pytest.raises(emllm.CorruptSessionError):
        engine.session("s")


def test_crafted_events_are_corrupt_not_an_index_error(model, tmp_path) -> None:
    engine = open_engine(model, tmp_path)
    session = engine.session("s")
    session.feed(prose(700, seed=12))
    session.save()
    record = session._saved.segments[0]
    path = engine.store._folder("s") / record.file
    engine.close()
    engine.store.close()
    header, data = _read_safetensors(path)
    begin, end = header["timeline.events"]["data_offsets"]
    events = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.int64).clone()
    events[1] = 10**9  # the first event now ends far past the session
    data = data[:begin] + events.numpy().tobytes() + data[end:]
    _write_safetensors(path, header, data)
    _update_index(tmp_path, "UPDATE segments SET checksums = '{}', bytes = ?", path.stat().st_size)
    engine = open_engine(model, tmp_path)
    with pytest.raises(emllm.CorruptSessionError, match="event"):
        engine.session("s")


# ------------------------------------------------------------------------------------------ item 6: names


@pytest.mark.parametrize(
    "column, value",
    [
        ("state_file", "../../other/sessions/x/state-0000000001-aaaaaaaa.safetensors"),
        ("state_file", "/etc/passwd"),
        ("folder", ".."),
        ("folder", "../other"),
        ("folder", "/tmp"),
    ],
)
def test_file_and_folder_names_from_the_index_cannot_leave_the_store(model, tmp_path, column, value) -> None:
    """Before: `folder / row["state_file"]` followed absolute and ../ paths: a crafted index loaded another
    store's session, and the next save unlinked that store's files."""
    other = tmp_path / "other"
    save_session(model, other, "x", prose(400, seed=13))
    before = store_files(other)
    store_path = tmp_path / "store"
    own = save_session(model, store_path, "s", prose(300, seed=14))
    _update_index(store_path, f"UPDATE sessions SET {column} = ?", value)
    engine = open_engine(model, store_path)
    opened = []
    audit = _opens_outside(tmp_path, store_path, opened)
    sys.addaudithook(audit)
    try:
        with pytest.raises(emllm.CorruptSessionError, match="never writes"):
            engine.store.verify("s")
        if column == "folder":
            with pytest.raises(emllm.CorruptSessionError, match="never writes"):
                engine.session("s")
        else:  # a damaged row: the session's own newest complete save replaces it
            assert engine.session("s").token_ids == own
            engine.session("s").feed(" more")
            engine.session("s").save()
        engine.store.remove_orphans()
    finally:
        audit.active = False
    engine.close()
    engine.store.close()
    assert store_files(other) == before
    assert not opened, f"opened outside the store: {opened}"


def _opens_outside(tmp_path, store_path, opened: list):
    """An audit hook recording every file opened under tmp_path but outside store_path."""
    inside, top = str(store_path.resolve()), str(tmp_path.resolve())

    def hook(event: str, args) -> None:
        if not hook.active or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(top) and not path.startswith(inside):
            opened.append(path)

    hook.active = True
    return hook


def test_a_session_folder_replaced_by_a_link_is_refused_and_its_target_untouched(model, tmp_path) -> None:
    """Before: opening deleted `*.safetensors` in the link's target."""
    save_session(model, tmp_path / "store", "s", prose(300, seed=15))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "seg-00000000-00000000.safetensors").write_bytes(b"someone's data")
    (victim / "state-0000000001-00000000.safetensors").write_bytes(b"someone's data")
    folder = tmp_path / "store" / "sessions" / folder_name("s")
    shutil.rmtree(folder)
    folder.symlink_to(victim, target_is_directory=True)
    engine = open_engine(model, tmp_path / "store")
    with pytest.raises(emllm.CorruptSessionError, match="not a folder"):
        engine.session("s")
    engine.store.remove_orphans()
    assert sorted(p.name for p in victim.iterdir()) == [
        "seg-00000000-00000000.safetensors",
        "state-0000000001-00000000.safetensors",
    ]


# ------------------------------------------------------------------------------------------ item 7: errors


def test_a_row_with_unreadable_checksums_spoils_that_session_only(model, tmp_path) -> None:
    """Before: one row with non-JSON checksums made the whole store unopenable."""
    save_session(model, tmp_path, "bad", prose(300, seed=16))
    good = save_session(model, tmp_path, "good", prose(300, seed=17))
    _update_index(tmp_path, "UPDATE sessions SET state_checksums = 'not json' WHERE id = 'bad'")
    engine = open_engine(model, tmp_path)
    assert sorted(s.id for s in engine.store.list()) == ["bad", "good"]
    assert engine.session("good").token_ids == good
    with pytest.raises(emllm.CorruptSessionError):
        engine.store.verify("bad")


def test_a_damaged_row_is_replaced_by_its_newest_complete_save(model, tmp_path) -> None:
    ids = save_session(model, tmp_path, "s", prose(300, seed=18), saves=2)
    _update_index(tmp_path, "UPDATE sessions SET tokens = 'many' WHERE id = 's'")
    assert tokens_of(model, tmp_path, "s") == ids


def _read_only_view(store_path) -> list[str] | None:
    """A command prefix that runs a process which cannot write the store: as root (which ignores file
    modes), a private mount namespace with the store bind-mounted read-only; otherwise the store's modes
    made read-only. None when neither can be had here."""
    if os.geteuid() != 0:
        for path in [store_path, *store_path.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        return None
    where = shlex.quote(str(store_path))
    mount = f'mount --bind -o ro {where} {where} && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]


def _run_python(prefix: list[str], code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CHILD_TIMEOUT,
    )


def test_a_read_only_store_can_be_listed_and_refuses_writes_with_a_typed_error(model, tmp_path) -> None:
    """Before: `emllm sessions list` on a read-only store failed with a raw sqlite3.OperationalError."""
    store_path = tmp_path / "store"
    save_session(model, store_path, "alice", prose(300, seed=19))
    explicit = SessionStore(store_path, read_only=True)
    assert explicit.read_only and [s.id for s in explicit.list()] == ["alice"]
    with pytest.raises(emllm.ReadOnlyStoreError):
        explicit.lock("alice")
    explicit.close()
    prefix = _read_only_view(store_path)
    if prefix is None:
        pytest.skip("no read-only view of a folder here (root without mount namespaces)")
    try:
        listing = _run_python(
            prefix,
            "import sys; from emllm.cli import main; sys.exit(main(['sessions', '--store', sys.argv[1]]))",
            str(store_path),
        )
        assert listing.returncode == 0, listing.stderr
        assert "alice" in listing.stdout
        write = _run_python(
            prefix,
            "import sys, emllm\n"
            "store = emllm.SessionStore(sys.argv[1])\n"
            "assert store.read_only\n"
            "try:\n"
            "    store.lock('alice')\n"
            "except emllm.ReadOnlyStoreError as exc:\n"
            "    print('refused', exc)\n",
            str(store_path),
        )
        assert write.returncode == 0, write.stderr
        assert write.stdout.startswith("refused"), write.stdout
    finally:
        for path in [store_path, *store_path.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def _save_under_a_file_size_limit(model, path, limit: int, write) -> None:
    import resource

    engine = open_engine(model, path)
    session = engine.session("s")
    before = session.token_ids
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    session.feed(prose(3000, seed=20))
    try:
        session.save()
        write("saved")
    except emllm.StoreWriteError as exc:
        write(f"refused {isinstance(exc, OSError)} {exc}")
    assert session.token_ids[: len(before)] == before


def test_a_full_disk_during_a_save_is_a_typed_error_and_keeps_the_last_save(model, tmp_path) -> None:
    """Before: SafetensorError (neither OSError nor the package's error)."""
    ids = save_session(model, tmp_path, "s", prose(200, seed=21))
    files = store_files(tmp_path)
    status, output = run_child(_save_under_a_file_size_limit, model, tmp_path, 20_000)
    assert status == 0 and output.startswith("refused True"), output
    assert store_files(tmp_path) == files
    assert tokens_of(model, tmp_path, "s") == ids


class _CommitFails:
    """An index connection whose COMMIT fails as SQLite's does when the disk fills: rolled back, raised."""

    def __init__(self, db):
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)


def test_a_full_disk_at_commit_says_so_and_keeps_the_last_save(model, tmp_path) -> None:
    """Before: 'cannot rollback - no transaction is active' hid why the save failed."""
    ids = save_session(model, tmp_path, "s", prose(200, seed=22))
    files = store_files(tmp_path)
    engine = open_engine(model, tmp_path)
    session = engine.session("s")
    session.feed(prose(900, seed=23))
    engine.store._index._db = _CommitFails(engine.store._index._db)
    with pytest.raises(emllm.StoreWriteError, match="disk is full"):
        session.save()
    engine.store._index._db = engine.store._index._db._db
    assert store_files(tmp_path) == files
    engine.close()
    engine.store.close()
    assert tokens_of(model, tmp_path, "s") == ids


# ------------------------------------------------------------------------------------------ item 8 and 11.2


@pytest.mark.parametrize(
    "options",
    [
        {"max_ram_bytes": float("nan")},
        {"max_disk_bytes": float("nan")},
        {"max_ram_bytes": float("inf")},
        {"max_disk_bytes": True},
        {"max_ram_bytes": "1GB"},
        {"lock_timeout": float("nan")},
        {"lock_timeout": -1},
        {"lock_timeout": float("inf")},
    ],
)
def test_store_settings_are_checked(tmp_path, options) -> None:
    """Before: nan budgets disabled the budgets silently and lock_timeout=nan waited forever."""
    with pytest.raises(emllm.ConfigError):
        SessionStore(tmp_path, **options)


@pytest.mark.parametrize("bad", ["", "x" * 513, "a\x00b", "\ud800", 7, None, b"bytes"])
def test_session_ids_that_cannot_name_a_session_are_refused(model, tmp_path, bad) -> None:
    engine = open_engine(model, tmp_path)
    with pytest.raises(emllm.InvalidSessionIdError):
        engine.session(bad) if bad is not None else engine.store.lock(bad)
    assert not list((tmp_path / "sessions").iterdir())


def test_ids_sharing_a_readable_prefix_get_their_own_folders(model, tmp_path) -> None:
    """Before: 40 readable characters and 12 hex digits: ids sharing the 40 collided after ~2^24 tries, and
    a save of one removed the other's files as unreferenced."""
    prefix = "thread/" + "x" * 40
    first, second = prefix + "-a", prefix + "-b"
    assert folder_name(first)[:41] == folder_name(second)[:41]
    assert folder_name(first) != folder_name(second)
    assert len(folder_name(first)) == 41 + 64
    a = save_session(model, tmp_path, first, prose(300, seed=24))
    b = save_session(model, tmp_path, second, prose(300, seed=25), saves=2)
    assert tokens_of(model, tmp_path, first) == a
    assert tokens_of(model, tmp_path, second) == b


def test_two_rows_naming_one_folder_are_refused_and_nothing_removed(model, tmp_path) -> None:
    """Stores written before the full digest may hold two sessions in one folder (a 12-digit collision):
    opening either must not take the other's files for garbage."""
    save_session(model, tmp_path, "a", prose(300, seed=26))
    save_session(model, tmp_path, "b", prose(300, seed=27))
    _update_index(tmp_path, "UPDATE sessions SET folder = ? WHERE id = 'b'", folder_name("a"))
    db = sqlite3.connect(tmp_path / "index.sqlite")
    state_b = db.execute("SELECT state_file FROM sessions WHERE id = 'b'").fetchone()[0]
    db.close()
    shutil.copy(tmp_path / "sessions" / folder_name("b") / state_b, tmp_path / "sessions" / folder_name("a"))
    files = store_files(tmp_path)
    engine = open_engine(model, tmp_path)
    for session_id in ("a", "b"):
        with pytest.raises(emllm.CorruptSessionError, match="share the folder"):
            engine.session(session_id)
    engine.store.remove_orphans()
    assert store_files(tmp_path) == files


# ------------------------------------------------------------------------------------------ fuzz


FUZZ_EXAMPLES = int(os.environ.get("EMLLM_FUZZ_EXAMPLES", "40"))
FUZZ_RSS_BOUND_MB = 200

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_sizes = st.integers(-3, 10**13) | st.integers(0, 4096)
_headers = st.fixed_dictionaries(
    {
        "file": st.sampled_from(["state", "segment"]),
        "tensor": st.integers(0, 10**6),
        "field": st.sampled_from(["shape", "data_offsets", "dtype", "drop"]),
        "shape": st.lists(_sizes, max_size=5),
        "offsets": st.lists(_sizes, max_size=3),
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "x", ""]) | _json_values,
        "fix_size": st.booleans(),
    }
)
_meta = st.fixed_dictionaries(
    {
        "key": st.sampled_from(
            [
                ("format",),
                ("session_id",),
                ("generation",),
                ("since", "computed"),
                ("since", "chars"),
                ("row", "tokens"),
                ("row", "events"),
                ("segments",),
                ("values", "mark", "tokens"),
                ("values", "mark", "events"),
                ("values", "timeline", "init_len"),
                ("values", "timeline", "window_start"),
                ("values", "ledger", "sources"),
                ("values", "session", "decode_steps"),
                ("values", "layers", "0", "query_count"),
                ("values", "layers", "1", "selection"),
                ("values", "layers"),
                ("values",),
            ]
        ),
        "value": _json_values | st.integers(-5, 10**7),
        "drop_index": st.booleans(),
    }
)
_columns = {
    "sessions": [
        "folder",
        "model_name",
        "fingerprint",
        "created",
        "tokens",
        "events",
        "bytes",
        "state_file",
        "state_checksums",
        "state_bytes",
        "config",
        "generation",
    ],
    "segments": [
        "first_event",
        "n_events",
        "token_start",
        "token_end",
        "char_start",
        "char_end",
        "file",
        "checksums",
        "bytes",
    ],
}
_rows = st.sampled_from(sorted(_columns)).flatmap(
    lambda table: st.tuples(
        st.just(table),
        st.sampled_from(_columns[table]),
        st.none()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=True)
        | st.sampled_from(
            ["../x", "/etc/passwd", "..", "state-0000000009-aaaaaaaa.safetensors", "{}", "[1]", '{"a": 1.5}']
        )
        | st.text(max_size=30)
        | st.binary(max_size=16),
    )
)


@pytest.fixture(scope="module")
def fuzz_template(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-template")
    ids = save_session(model, path, "s", prose(700, seed=30))
    store = SessionStore(path)
    row, (segment,) = store._row("s"), store._index.segments("s")
    store.close()
    return path, ids, row, segment


def _fresh_copy(template, base):
    target = base / f"case-{time.monotonic_ns()}"
    shutil.copytree(template, target, symlinks=True)
    return target


def _mutate_header(path, folder, case, row, segment) -> None:
    file = row.state_file if case["file"] == "state" else segment.file
    target = path / "sessions" / folder / file
    header, data = _read_safetensors(target)
    names = sorted(n for n in header if n != "__metadata__")
    entry = header[names[case["tensor"] % len(names)]]
    if case["field"] == "drop":
        del header[names[case["tensor"] % len(names)]]
    elif case["field"] == "shape":
        entry["shape"] = case["shape"]
    elif case["field"] == "data_offsets":
        entry["data_offsets"] = case["offsets"]
    else:
        entry["dtype"] = case["dtype"]
    _write_safetensors(target, header, data)
    if case["fix_size"]:
        size = target.stat().st_size
        if case["file"] == "state":
            _update_index(path, "UPDATE sessions SET state_bytes = ?", size)
        else:
            _update_index(path, "UPDATE segments SET bytes = ?", size)


def _mutate_meta(path, folder, case, row) -> None:
    target = path / "sessions" / folder / row.state_file
    header, data = _read_safetensors(target)
    meta = json.loads(header["__metadata__"]["emllm"])
    *keys, leaf = case["key"]
    node = meta
    for key in keys:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[leaf] = case["value"]
    header["__metadata__"]["emllm"] = json.dumps(meta)
    _write_safetensors(target, header, data)
    if case["drop_index"]:  # the store must rebuild its index from this file
        for suffix in ("", "-wal", "-shm"):
            (path / f"index.sqlite{suffix}").unlink(missing_ok=True)
    else:
        _update_index(path, "UPDATE sessions SET state_bytes = ?", target.stat().st_size)


def _open_and_use(model, path, ids) -> str:
    """Open the mutated store and use the session; only the package's errors may come out."""
    try:
        engine = open_engine(model, path)
    except emllm.EMLLMError:
        return "refused at open"
    try:
        with contextlib.suppress(emllm.EMLLMError):
            engine.store.verify("s")
        session = engine.session("s")
    except emllm.EMLLMError:
        return "refused"
    try:
        session.stats()
        session.events()
        session.retrieve("the cat", k=2)
        session.generate(max_new_tokens=2)
        session.save()
    except emllm.EMLLMError:
        return "refused in use"
    finally:
        engine.close()
        engine.store.close()
    return "opened intact" if session.token_ids[: len(ids)] == ids else "opened changed"


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="EMLLM_FUZZ_EXAMPLES" not in os.environ,
)
@given(
    case=st.one_of(
        _headers.map(lambda c: ("header", c)),
        _meta.map(lambda c: ("meta", c)),
        _rows.map(lambda c: ("row", c)),
    )
)
def test_fuzzed_session_files_and_index_rows_are_refused_or_opened_never_a_crash(
    model, fuzz_template, tmp_path_factory, case
) -> None:
    template, ids, row, segment = fuzz_template
    path = _fresh_copy(template, tmp_path_factory.getbasetemp())
    kind, detail = case
    if kind == "header":
        _mutate_header(path, row.folder, detail, row, segment)
    elif kind == "meta":
        _mutate_meta(path, row.folder, detail, row)
    else:
        table, column, value = detail
        try:
            _update_index(path, f"UPDATE {table} SET {column} = ?", value)
        except sqlite3.IntegrityError:  # SQLite itself refuses it (NULL in a NOT NULL column)
            assume(False)
    opened: list[str] = []
    audit = _opens_outside(path.parent, path, opened)
    sys.addaudithook(audit)
    baseline = _reset_peak_rss_mb()
    try:
        outcome = _open_and_use(model, path, ids)
    finally:
        audit.active = False
    grown = _peak_rss_mb() - baseline
    assert not opened, f"{case}: opened outside the store: {opened}"
    assert outcome in ("refused at open", "refused", "refused in use", "opened intact"), (case, outcome)
    assert grown < FUZZ_RSS_BOUND_MB, f"{case}: resident memory peaked {grown:.0f} MB above where it was"
    shutil.rmtree(path)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def _reset_peak_rss_mb() -> float:
    """Reset the process's peak resident memory to what it holds now (Linux: clear_refs 5); returns it."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")
