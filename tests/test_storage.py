"""storage/: opening the database (migrations, WAL, busy timeout) and the artifact store."""
from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time

import pytest

from storage import ArtifactStore, open_db
from storage.db import BUSY_TIMEOUT_MS
from storage.migrations import MIGRATIONS, apply_migrations, schema_version

TABLES = {"models", "jobs", "runs", "workers"}


def _tables(db) -> set[str]:
    return {row["name"] for row in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _schema(db) -> list[tuple]:
    return [tuple(row.values()) for row in db.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")]


def test_fresh_database_is_migrated_with_wal_and_busy_timeout(home):
    db = open_db(home)
    assert (home / "explorer.db").is_file()
    assert schema_version(db) == len(MIGRATIONS) >= 1
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert TABLES <= _tables(db)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS > 0
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.home == home.resolve()
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    plain = sqlite3.connect(home / "explorer.db")
    assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plain.close()


def test_open_db_uses_explorer_home_by_default(home):
    db = open_db()
    assert db.home == home.resolve()
    assert (home / "explorer.db").is_file()


def test_applying_migrations_again_changes_nothing(home):
    db = open_db(home)
    db.execute("INSERT INTO models (id, name, source, format, task, created_at, updated_at) "
               "VALUES ('m', 'M', 'upload', 'onnx', 'fidelity', 'now', 'now')")
    before = _schema(db)
    assert apply_migrations(db) == len(MIGRATIONS)
    assert apply_migrations(db) == len(MIGRATIONS)
    assert _schema(db) == before
    assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 1
    # Reopening (which migrates again) keeps schema and rows as they were.
    db.conn.close()
    again = open_db(home)
    assert _schema(again) == before
    assert schema_version(again) == len(MIGRATIONS)
    assert [r["id"] for r in again.query("SELECT id FROM models")] == ["m"]


def _open_many_after_barrier(homes: list[str], barrier, results) -> None:
    """In a child process: for each fresh home, wait for the others, then open it at the same moment."""
    outcomes = []
    for home in homes:
        try:
            barrier.wait(timeout=60)
        except BaseException as error:
            outcomes.append(("error", f"barrier: {error!r}"))
            break
        try:
            db = open_db(home)
            outcomes.append(("ok", schema_version(db)))
            db.conn.close()
        except BaseException as error:  # report any failure (e.g. 'database is locked') to the test
            outcomes.append(("error", f"{type(error).__name__}: {error}"))
    results.put(outcomes)


@pytest.mark.slow
def test_processes_opening_fresh_databases_at_once_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")  # no state inherited from the test process
    count, rounds = 4, 40  # the race shows only now and then: many fresh databases, four openers each
    homes = [str(tmp_path / f"home{i}") for i in range(rounds)]
    barrier = context.Barrier(count)
    results = context.Queue()
    procs = [context.Process(target=_open_many_after_barrier, args=(homes, barrier, results))
             for _ in range(count)]
    for proc in procs:
        proc.start()
    outcomes = [outcome for _ in procs for outcome in results.get(timeout=120)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert len(outcomes) == count * rounds
    for home in homes:  # whatever happened, every database ended up complete
        db = open_db(home)
        assert schema_version(db) == len(MIGRATIONS)
        assert TABLES <= _tables(db)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.conn.close()
    assert [o for o in outcomes if o[0] != "ok"] == []
    assert {o[1] for o in outcomes} == {len(MIGRATIONS)}


def test_open_db_waits_while_another_process_converts_a_fresh_database(home):
    # Stand in for a second process caught half-way through its own open_db: it holds the write
    # (RESERVED) lock of the brand-new file for half a second, then lets go.
    other = sqlite3.connect(home / "explorer.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        started = time.monotonic()
        db = open_db(home)  # must wait for the lock (busy timeout 30 s), not fail
        assert time.monotonic() - started >= 0.3
        assert schema_version(db) == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        release.join()
        other.close()


def test_open_db_waits_for_a_reader_of_a_fresh_database(home):
    other = sqlite3.connect(home / "explorer.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN")
    other.execute("SELECT count(*) FROM sqlite_master").fetchall()
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        db = open_db(home)
        assert schema_version(db) == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        release.join()
        other.close()


# ---- artifact store --------------------------------------------------------------------------

def _temp_leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_write_bytes_is_atomic_and_leaves_no_temp_files(home):
    store = ArtifactStore(home)
    target = store.write_bytes(b"x" * 1000, "runs", "r1", "model.onnx")
    assert target == home.resolve() / "artifacts" / "runs" / "r1" / "model.onnx"
    assert target.read_bytes() == b"x" * 1000
    store.write_bytes(b"second", "runs", "r1", "model.onnx")  # replace in place
    assert target.read_bytes() == b"second"
    assert _temp_leftovers(home) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(home):
    store = ArtifactStore(home)
    target = store.write_bytes(b"good", "models", "m", "weights.pt")
    with pytest.raises(TypeError):
        store.write_bytes("not bytes", "models", "m", "weights.pt")  # fails half-way through the write
    assert target.read_bytes() == b"good"
    assert _temp_leftovers(home) == []


def test_put_file_copies_into_place(home, tmp_path):
    store = ArtifactStore(home)
    source = tmp_path / "made.onnx"
    source.write_bytes(bytes(range(256)) * 10)
    target = store.put_file(source, "runs", "abc", "model.onnx")
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_size == 2560
    assert source.exists()
    assert _temp_leftovers(home) == []
    relative = store.relative(target)
    assert relative == "artifacts/runs/abc/model.onnx"
    assert store.resolve(relative) == target


@pytest.mark.parametrize("parts", [("..", "x"), ("..", "..", "etc", "passwd"), ("runs", "..", "..", "x"),
                                   ("/etc/passwd",)])
def test_paths_escaping_the_artifact_folder_are_refused(home, parts):
    store = ArtifactStore(home)
    with pytest.raises(ValueError, match="escapes"):
        store.path(*parts)
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes(b"evil", *parts)
    assert not (home / "x").exists()
    assert not (home.parent / "x").exists()


@pytest.mark.parametrize("relative", ["../x", "../../etc/passwd", "/etc/passwd", "artifacts/../../x"])
def test_resolve_refuses_paths_outside_the_home(home, relative):
    with pytest.raises(ValueError, match="escapes"):
        ArtifactStore(home).resolve(relative)


def test_scratch_dir_is_inside_the_home(home):
    store = ArtifactStore(home)
    scratch = store.scratch_dir("runs", "r9", "tmp")
    assert scratch.is_dir()
    assert scratch == home.resolve() / "artifacts" / "runs" / "r9" / "tmp"
    with pytest.raises(ValueError):
        store.scratch_dir("..", "..", "outside")


def test_a_symlink_out_of_the_artifact_folder_is_refused(home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = ArtifactStore(home)
    (store.root / "runs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes(b"data", "runs", "model.onnx")
    assert list(outside.iterdir()) == []
