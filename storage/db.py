"""Opening the database: where it lives, connection settings, and the migrations."""
from __future__ import annotations

import datetime as _dt
import os
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from storage.migrations import apply_migrations

BUSY_TIMEOUT_MS = 30_000


def explorer_home() -> Path:
    """The data folder: database, uploads and artifacts. Nothing is written outside it."""
    home = Path(os.environ.get("EXPLORER_HOME", "./data")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting for other processes doing the same on a fresh file: this pragma
    answers "database is locked" at once, without honouring the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def open_db(home: Path | str | None = None) -> sqlite_utils.Database:
    """A connection to the project's database with WAL, a busy timeout and the schema up to date.

    isolation_level=None puts the connection in autocommit mode so that the queue can open its
    own `BEGIN IMMEDIATE` transactions (a deferred read-then-write transaction gets
    "database is locked" under WAL even with a busy timeout).
    """
    home = Path(home).resolve() if home else explorer_home()
    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        home / "explorer.db",
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    db.home = home  # type: ignore[attr-defined]  (the artifact store and queries need it)
    apply_migrations(db)
    return db
