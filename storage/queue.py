"""The job queue: a few states and one function per transition (as huey and rq do it).

    queued ──claim──> running ──succeed──> succeeded
       │                 │ ────fail─────> failed
       │                 │ ──cancelled──> cancelled
       │                 └─lease expired─> queued (attempts left) | failed (none left)
       └──────────cancel────────────────> cancelled

A job is delivered at least once: `claim` takes it inside `BEGIN IMMEDIATE` and sets a lease,
the worker renews the lease with `heartbeat`, and `reap_expired` hands a job whose lease ran
out (its worker died) back to the queue until its attempts are spent. Every write that ends a
job checks that the caller still holds it, so a worker that lost its lease cannot overwrite
what another worker did since.
"""
from __future__ import annotations

import json
import secrets
import time
from contextlib import contextmanager
from typing import Iterator

import sqlite_utils

from storage.db import utcnow

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
DEFAULT_LEASE_S = 30.0
STOPPED_EARLY = "stopped early: "


@contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the lock up front, so it never dies half-way on 'locked'."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def new_id() -> str:
    """128 random bits from `secrets`: job and run ids double as unguessable share links."""
    return secrets.token_hex(16)


def enqueue(db, kind: str, model_id: str, payload: dict, max_attempts: int = 3, search_id: str | None = None) -> str:
    # Raw SQL, so that a caller's transaction (a search placing its next trial) is not committed early.
    job_id = new_id()
    db.execute(
        """INSERT INTO jobs (id, kind, model_id, payload, status, attempts, max_attempts, run_id, created_at, search_id)
           VALUES (?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?)""",
        [job_id, kind, model_id, json.dumps(payload), max_attempts, payload.get("run_id"), utcnow(), search_id],
    )
    return job_id


def get_job(db, job_id: str) -> dict | None:
    rows = list(db.query("SELECT * FROM jobs WHERE id = ?", [job_id]))
    return _decode(rows[0]) if rows else None


def _decode(row: dict) -> dict:
    row = dict(row)
    for key in ("payload", "runner"):
        if row.get(key):
            row[key] = json.loads(row[key])
    row["cancel_requested"] = bool(row.get("cancel_requested"))
    return row


def claim(db, worker_id: str, lease_s: float = DEFAULT_LEASE_S, job_id: str | None = None) -> dict | None:
    """Take the oldest queued job (or the named one) for this worker, atomically."""
    with immediate(db):
        if job_id:
            rows = list(db.query("SELECT id FROM jobs WHERE id = ? AND status = 'queued'", [job_id]))
        else:
            rows = list(db.query("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1"))
        if not rows:
            return None
        claimed = rows[0]["id"]
        db.execute(
            """UPDATE jobs SET status = 'running', worker_id = ?, lease_until = ?, attempts = attempts + 1,
                   started_at = ?, progress = 0, message = 'starting', error = NULL
               WHERE id = ? AND status = 'queued'""",
            [worker_id, time.time() + lease_s, utcnow(), claimed],
        )
    return get_job(db, claimed)


def heartbeat(db, job_id: str, worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Renew the lease; returns False when this worker no longer holds the job."""
    cursor = db.execute(
        "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker_id = ? AND status = 'running'",
        [time.time() + lease_s, job_id, worker_id],
    )
    return cursor.rowcount == 1


def report_progress(db, job_id: str, worker_id: str, progress: float, message: str) -> None:
    db.execute(
        "UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND worker_id = ? AND status = 'running'",
        [max(0.0, min(1.0, float(progress))), message[:500], job_id, worker_id],
    )


def _finish(db, job_id: str, worker_id: str, status: str, **fields) -> bool:
    sets = ", ".join(f"{key} = ?" for key in fields)
    cursor = db.execute(
        f"""UPDATE jobs SET status = ?, finished_at = ?, lease_until = NULL{', ' + sets if sets else ''}
            WHERE id = ? AND worker_id = ? AND status = 'running'""",
        [status, utcnow(), *fields.values(), job_id, worker_id],
    )
    return cursor.rowcount == 1


def succeed(db, job_id: str, worker_id: str, run: dict | None = None, runner: dict | None = None,
            model_update: dict | None = None, scan: dict | None = None) -> bool:
    """Mark the job succeeded and store what it made in the same transaction (keyed by job id)."""
    with immediate(db):
        done = _finish(db, job_id, worker_id, "succeeded", progress=1.0, message="done",
                       runner=json.dumps(runner or {}))
        if done and model_update:
            update = {**model_update, "updated_at": utcnow()}
            sets = ", ".join(f"{key} = ?" for key in update)
            job = get_job(db, job_id)
            db.execute(f"UPDATE models SET {sets} WHERE id = ?", [*update.values(), job["model_id"]])
        if done and run is not None:
            # Raw SQL: sqlite-utils' insert would commit this transaction early. OR REPLACE on the
            # unique job_id keeps one run per job however often the job was attempted.
            columns = ", ".join(run)
            marks = ", ".join("?" for _ in run)
            db.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", list(run.values()))
        if done and scan is not None:
            columns = ", ".join(scan)
            marks = ", ".join("?" for _ in scan)
            db.execute(f"INSERT OR REPLACE INTO scans ({columns}) VALUES ({marks})", list(scan.values()))
    return done


def fail(db, job_id: str, worker_id: str, reason: str) -> bool:
    return _finish(db, job_id, worker_id, "failed", error=reason, message="failed")


def mark_cancelled(db, job_id: str, worker_id: str) -> bool:
    error = (get_job(db, job_id) or {}).get("error") or ""
    early = error if error.startswith(STOPPED_EARLY) else None  # a search's reason (stop_early), kept
    return _finish(db, job_id, worker_id, "cancelled", message=early or "cancelled by the user")


def retry(db, job_id: str, worker_id: str, reason: str) -> str:
    """The process or node running the job died: queue it again if attempts are left (this one
    counted), else fail it with the reason. Returns the job's new status."""
    cursor = db.execute(
        """UPDATE jobs SET status = 'queued', worker_id = NULL, lease_until = NULL, message = ?
           WHERE id = ? AND worker_id = ? AND status = 'running' AND attempts < max_attempts""",
        [f"retrying: {reason}"[:500], job_id, worker_id])
    if cursor.rowcount == 1:
        return "queued"
    return "failed" if fail(db, job_id, worker_id, reason) else "lost"


def release(db, job_id: str, worker_id: str) -> bool:
    """Give a job back to the queue (the worker is shutting down); the attempt is not counted."""
    cursor = db.execute(
        """UPDATE jobs SET status = 'queued', worker_id = NULL, lease_until = NULL, attempts = attempts - 1,
               message = 'requeued: its worker shut down' WHERE id = ? AND worker_id = ? AND status = 'running'""",
        [job_id, worker_id])
    return cursor.rowcount == 1


def request_cancel(db, job_id: str) -> str | None:
    """Cancel a queued job now; ask the worker to stop a running one. Returns the new status."""
    with immediate(db):
        job = get_job(db, job_id)
        if job is None:
            return None
        if job["status"] == "queued":
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, message = 'cancelled by the user' WHERE id = ?",
                [utcnow(), job_id],
            )
            return "cancelled"
        if job["status"] == "running":
            db.execute("UPDATE jobs SET cancel_requested = 1, message = 'stopping…' WHERE id = ?", [job_id])
            return "cancelling"
        return job["status"]


def stop_early(db, job_id: str, reason: str) -> None:
    """A search stops one of its trials that another trial has already ruled out: cancelled now if
    queued, asked to stop if running, the reason ("stopped early: …") kept in `error`. Runs in the
    caller's transaction."""
    reason = f"{STOPPED_EARLY}{reason}"
    db.execute("""UPDATE jobs SET status = 'cancelled', finished_at = ?, message = ?, error = ?
                  WHERE id = ? AND status = 'queued'""", [utcnow(), reason, reason, job_id])
    db.execute("""UPDATE jobs SET cancel_requested = 1, message = ?, error = ?
                  WHERE id = ? AND status = 'running'""", [reason, reason, job_id])


def cancel_requested(db, job_id: str) -> bool:
    rows = list(db.query("SELECT cancel_requested FROM jobs WHERE id = ?", [job_id]))
    return bool(rows and rows[0]["cancel_requested"])


def reap_expired(db, now: float | None = None) -> list[str]:
    """Jobs whose worker stopped heartbeating: back to the queue, or failed after the last attempt."""
    now = time.time() if now is None else now
    reaped = []
    with immediate(db):
        expired = list(db.query("SELECT * FROM jobs WHERE status = 'running' AND lease_until < ?", [now]))
        for job in expired:
            if job["cancel_requested"]:
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_until = NULL, "
                    "message = 'cancelled by the user' WHERE id = ?", [utcnow(), job["id"]])
            elif job["attempts"] < job["max_attempts"]:
                db.execute(
                    "UPDATE jobs SET status = 'queued', worker_id = NULL, lease_until = NULL, "
                    "message = ? WHERE id = ?",
                    [f"requeued: its worker stopped responding (attempt {job['attempts']} of {job['max_attempts']})",
                     job["id"]])
            else:
                db.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, lease_until = NULL, message = 'failed', "
                    "error = ? WHERE id = ?",
                    [utcnow(), f"The worker running this job stopped responding on each of its "
                               f"{job['max_attempts']} attempts, so it was given up.", job["id"]])
            reaped.append(job["id"])
    return reaped


def list_jobs(db, status: str | None = None, limit: int = 100, offset: int = 0, model_id: str | None = None) -> list[dict]:
    where, args = [], []
    if status:
        where.append("status = ?")
        args.append(status)
    if model_id:
        where.append("model_id = ?")
        args.append(model_id)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
    return [_decode(row) for row in db.query(sql, [*args, limit, offset])]


# Workers register themselves so the UI can say whether anyone is serving the queue.
def register_worker(db, worker_id: str, pid: int, host: str, slots: int = 1) -> None:
    db["workers"].insert(
        {"id": worker_id, "pid": pid, "host": host, "started_at": utcnow(), "last_seen": time.time(), "slots": slots},
        pk="id", replace=True)


def touch_worker(db, worker_id: str) -> None:
    db.execute("UPDATE workers SET last_seen = ? WHERE id = ?", [time.time(), worker_id])


def unregister_worker(db, worker_id: str) -> None:
    db.execute("DELETE FROM workers WHERE id = ?", [worker_id])


def live_workers(db, within_s: float = DEFAULT_LEASE_S) -> list[dict]:
    return list(db.query("SELECT * FROM workers WHERE last_seen > ?", [time.time() - within_s]))


def live_slots(db, within_s: float = DEFAULT_LEASE_S) -> int:
    """How many jobs the live workers run at once, all together (each worker's EXPLORER_JOBS_IN_FLIGHT)."""
    return sum(max(1, int(w.get("slots") or 1)) for w in live_workers(db, within_s))
