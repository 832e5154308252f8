"""Versioned schema migrations, tracked in SQLite's `PRAGMA user_version`.

Each migration is a function numbered by its position; a database at version N gets
migrations N+1.. applied in one `BEGIN IMMEDIATE` transaction each, so two processes that
open a fresh database at once cannot both apply the same step. Never edit a released
migration: add a new one.
"""
from __future__ import annotations

import sqlite_utils


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE models (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            source TEXT NOT NULL,          -- 'builtin' or 'upload'
            format TEXT NOT NULL,          -- 'torch' (has a PyTorch module) or 'onnx'
            task TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'new',   -- new | ready | failed
            card TEXT,                     -- JSON: params, size, baseline metrics
            artifact TEXT,                 -- ONNX file of the original model, relative to home
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,            -- prepare | compress
            model_id TEXT NOT NULL REFERENCES models(id),
            payload TEXT NOT NULL,         -- JSON: the recipe and the run id it will write
            status TEXT NOT NULL,          -- queued | running | succeeded | failed | cancelled
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 3,
            worker_id TEXT,
            lease_until REAL,              -- unix time; a running job past it has lost its worker
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            progress REAL NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT '',
            error TEXT,
            run_id TEXT,
            runner TEXT,                   -- JSON: where it ran
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        )"""
    )
    db.execute("CREATE INDEX jobs_status_created ON jobs(status, created_at)")
    db.execute(
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,           -- >= 128-bit share id from `secrets`
            job_id TEXT NOT NULL UNIQUE REFERENCES jobs(id),  -- a retried job never leaves two runs
            model_id TEXT NOT NULL REFERENCES models(id),
            recipe TEXT NOT NULL,
            metrics TEXT NOT NULL,
            baseline TEXT NOT NULL,
            runner TEXT NOT NULL,
            artifact TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX runs_model_created ON runs(model_id, created_at)")
    db.execute(
        """
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            started_at TEXT NOT NULL,
            last_seen REAL NOT NULL        -- unix time of the last heartbeat
        )"""
    )


def _m2_uploads_and_datasets(db: sqlite_utils.Database) -> None:
    """The user's own models and data."""
    db.execute("ALTER TABLE models ADD COLUMN meta TEXT")  # JSON: how it was imported (files, input shapes)
    db.execute("ALTER TABLE models ADD COLUMN dataset_id TEXT")  # the user's data it is scored on, if any
    db.execute(
        """
        CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,            -- 'csv' | 'npz' | 'wav'
            has_labels INTEGER NOT NULL,
            n_samples INTEGER NOT NULL,
            summary TEXT NOT NULL,         -- JSON: classes and counts, shapes, sample rate, ...
            path TEXT NOT NULL,            -- the normalized data folder, relative to the home
            created_at TEXT NOT NULL
        )"""
    )


def _m3_sensitivity_scans(db: sqlite_utils.Database) -> None:
    """Per-layer sensitivity scans: which layers a method hurts most when compressed alone."""
    db.execute(
        """
        CREATE TABLE scans (
            job_id TEXT PRIMARY KEY REFERENCES jobs(id),  -- one scan per job, however often attempted
            model_id TEXT NOT NULL REFERENCES models(id),
            method TEXT NOT NULL,
            task TEXT NOT NULL,
            params TEXT NOT NULL,          -- JSON: the setting each layer was compressed at
            layers TEXT NOT NULL,          -- JSON: [{layer, fidelity, fidelity_worst, drop}], most sensitive first
            summary TEXT NOT NULL,         -- JSON: data it was measured on, baseline, seconds
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX scans_model_method ON scans(model_id, method, created_at)")


def _m4_searches(db: sqlite_utils.Database) -> None:
    """Rate searches: a goal and a range; their trials are ordinary compress jobs tagged with the search."""
    db.execute(
        """
        CREATE TABLE searches (
            id TEXT PRIMARY KEY,           -- also the share link: /search?id=...
            model_id TEXT NOT NULL REFERENCES models(id),
            spec TEXT NOT NULL,            -- JSON: base recipe, rate (method.param), range, max_drop, budget
            status TEXT NOT NULL,          -- running | succeeded | failed
            outcome TEXT,                  -- JSON: sentence, best trial, when it ended
            created_at TEXT NOT NULL,
            finished_at TEXT
        )"""
    )
    db.execute("ALTER TABLE jobs ADD COLUMN search_id TEXT REFERENCES searches(id)")
    db.execute("CREATE INDEX jobs_search ON jobs(search_id, created_at)")


def _m5_worker_slots(db: sqlite_utils.Database) -> None:
    """How many jobs each worker runs at once (EXPLORER_JOBS_IN_FLIGHT): a search keeps that many trials in flight."""
    db.execute("ALTER TABLE workers ADD COLUMN slots INTEGER NOT NULL DEFAULT 1")


def _m6_shares(db: sqlite_utils.Database) -> None:
    """Share links: one result, comparison or search, read-only, revocable, optionally expiring."""
    db.execute(
        """
        CREATE TABLE shares (
            id TEXT PRIMARY KEY,           -- 128 random bits: /share?id=...
            kind TEXT NOT NULL,            -- run | search | comparison
            target TEXT NOT NULL,          -- JSON: {"run": id} | {"search": id} | {"model", "task", "runs": [ids]}
            created_at TEXT NOT NULL,
            expires_at TEXT,               -- ISO time, or NULL: never
            revoked_at TEXT
        )"""
    )


MIGRATIONS = [_m1_initial, _m2_uploads_and_datasets, _m3_sensitivity_scans, _m4_searches, _m5_worker_slots,
              _m6_shares]


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def apply_migrations(db: sqlite_utils.Database) -> int:
    """Bring the schema up to the latest version; returns the version reached."""
    while True:
        if schema_version(db) >= len(MIGRATIONS):
            return schema_version(db)
        db.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(db)  # re-read inside the lock: another process may have won
            if version < len(MIGRATIONS):
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
