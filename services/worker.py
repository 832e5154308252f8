"""The background service: claim a job, run it in a child process, heartbeat, store the result.

Crash safety comes from the queue (storage/queue.py): a job's lease is renewed here while its
child runs; if this process dies, the lease runs out and any worker's reaper requeues the job
(or fails it after its last attempt). The child dies with us (PR_SET_PDEATHSIG), so a dead
worker leaves no orphan computing a result nobody will store.
"""
from __future__ import annotations

import logging
import os
import platform
import secrets
import signal
import sys
import time

from storage import open_db
from storage import queue as q
from services.executors import make_executor

log = logging.getLogger("explorer.worker")

LEASE_S = float(os.environ.get("EXPLORER_LEASE_SECONDS", q.DEFAULT_LEASE_S))
HEARTBEAT_S = max(0.2, LEASE_S / 5)
POLL_S = float(os.environ.get("EXPLORER_POLL_SECONDS", "0.5"))


class Worker:
    def __init__(self, db=None, executor=None, worker_id: str | None = None):
        self.db = db or open_db()
        self.executor = executor or make_executor(self.db.home)
        self.id = worker_id or f"{platform.node()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stopping = False
        self.max_in_flight = max(1, int(os.environ.get("EXPLORER_JOBS_IN_FLIGHT", "1")))
        self.in_flight: dict[str, tuple[dict, object]] = {}  # job id -> (job, executor handle)

    def serve(self, once: bool = False) -> int:
        """Work until stopped (or, with once=True, until the queue is empty). Returns jobs handled.

        Up to `max_in_flight` jobs run at once (EXPLORER_JOBS_IN_FLIGHT, default 1): each is claimed,
        heartbeated and stored by this process alone, whichever executor runs it."""
        q.register_worker(self.db, self.id, os.getpid(), platform.node(), self.max_in_flight)
        handled = 0
        next_reap = next_beat = 0.0
        in_flight = self.in_flight
        try:
            while not self.stopping or in_flight:
                if time.monotonic() >= next_reap:  # a write lock: no need to take it on every poll
                    q.reap_expired(self.db)
                    # a search whose trials all ended without us (a cancelled trial, a restart) moves on
                    self._advance_searches()
                    next_reap = time.monotonic() + min(LEASE_S / 2, 5.0)
                while len(in_flight) < self.max_in_flight and not self.stopping:
                    job = q.claim(self.db, self.id, LEASE_S)
                    if job is None:
                        break
                    log.info("job %s (%s) attempt %s", job["id"], job["kind"], job["attempts"])
                    in_flight[job["id"]] = (job, self.executor.start(job))
                if not in_flight:
                    if once:
                        break
                    q.touch_worker(self.db, self.id)
                    time.sleep(POLL_S)
                    continue
                beat = time.monotonic() >= next_beat
                if beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    q.touch_worker(self.db, self.id)
                for job_id, (job, handle) in list(in_flight.items()):
                    status = self._step(job, handle, beat)
                    if status is not None:
                        del in_flight[job_id]
                        handled += 1
                        if job.get("search_id") and status in q.FINISHED:
                            self._advance_searches(job["search_id"])  # its next trial, queued at once
                time.sleep(0.1)
        finally:
            for job, handle in in_flight.values():  # an exception above: stop the work, give the jobs back
                handle.cancel()
                q.release(self.db, job["id"], self.id)
            q.unregister_worker(self.db, self.id)
        return handled

    def run_claimed(self, job: dict) -> str:
        """Run one job this worker holds to its end (`--wait` working inline); returns its final status."""
        log.info("job %s (%s) attempt %s", job["id"], job["kind"], job["attempts"])
        handle = self.executor.start(job)
        try:
            status = self._supervise(job, handle)
            if job.get("search_id") and status in q.FINISHED:
                self._advance_searches(job["search_id"])  # its next trial, queued at once
            return status
        except KeyboardInterrupt:
            # Ctrl-C on `compress --wait` working inline: stop the work and give the job back.
            handle.cancel()
            q.release(self.db, job["id"], self.id)
            print(f"interrupted: job {job['id']} is back in the queue "
                  f"(`python -m services jobs cancel {job['id']}` cancels it)", file=sys.stderr)
            raise

    def _advance_searches(self, search_id: str | None = None) -> None:
        from services import search

        try:
            if search_id:
                search.advance(self.db, search_id)
            else:
                search.advance_all(self.db)
        except Exception:  # noqa: BLE001 - a search's bookkeeping must never stop the worker
            log.exception("advancing search %s", search_id or "(all)")

    def _supervise(self, job: dict, handle) -> str:
        next_beat = 0.0
        while True:
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + HEARTBEAT_S
                q.touch_worker(self.db, self.id)
            status = self._step(job, handle, beat)
            if status is not None:
                return status
            time.sleep(0.1)

    def _step(self, job: dict, handle, beat: bool) -> str | None:
        """Look after one running job once: its progress, its lease, a cancel, its end. Returns its
        final status when it ended (or was given up), else None."""
        self._forward_progress(job, handle)
        if beat and not q.heartbeat(self.db, job["id"], self.id, LEASE_S):
            handle.cancel()  # the job was taken from us (lease lost): stop the duplicate work
            return "lost"
        if q.cancel_requested(self.db, job["id"]):
            handle.cancel()
            q.mark_cancelled(self.db, job["id"], self.id)
            return "cancelled"
        if self.stopping:
            handle.cancel()
            q.release(self.db, job["id"], self.id)
            return "queued"
        if not handle.finished():
            return None
        self._forward_progress(job, handle)
        outcome = handle.outcome()
        if outcome.reason is not None and outcome.retry:
            # the process or node running it died (a Ray worker): another attempt, if any are left
            return q.retry(self.db, job["id"], self.id, outcome.reason)
        if outcome.reason is not None:
            if q.fail(self.db, job["id"], self.id, outcome.reason):
                if outcome.model_update:
                    self.db.execute("UPDATE models SET status = ?, updated_at = ? WHERE id = ?",
                                    [outcome.model_update["status"], q.utcnow(), job["model_id"]])
                elif job["kind"] == "prepare":
                    self.db.execute("UPDATE models SET status = 'failed', error = ?, updated_at = ? WHERE id = ?",
                                    [outcome.reason, q.utcnow(), job["model_id"]])
            return "failed"
        self._store_result(job, outcome.result)
        return "succeeded"

    def _forward_progress(self, job: dict, handle) -> None:
        events = handle.poll_events()
        if events:
            last = events[-1]
            q.report_progress(self.db, job["id"], self.id, last["progress"], last["message"])

    def _store_result(self, job: dict, result: dict) -> None:
        run = None
        if "run" in result:
            payload = job["payload"]
            produced = result["run"]
            run = {
                "id": payload["run_id"],
                "job_id": job["id"],
                "model_id": job["model_id"],
                "recipe": _json(payload["recipe"]),
                "metrics": _json(produced["metrics"]),
                "baseline": _json(produced["baseline"]),
                "runner": _json(produced["runner"]),
                "artifact": produced["artifact"],
                "created_at": q.utcnow(),
            }
        model_update = result.get("model_update")
        if model_update and "card" in model_update:
            model_update = {**model_update, "card": _json(model_update["card"])}
        scan = None
        if "scan" in result:
            produced = result["scan"]
            scan = {"job_id": job["id"], "model_id": job["model_id"], "method": job["payload"]["method"],
                    "task": job["payload"]["task"], "params": _json(job["payload"]["params"]),
                    "layers": _json(produced["layers"]), "summary": _json(produced["summary"]),
                    "created_at": q.utcnow()}
        runner = result.get("run", {}).get("runner") or {"executor": self.executor.name, "node": platform.node()}
        q.succeed(self.db, job["id"], self.id, run=run, runner=runner, model_update=model_update, scan=scan)


def _json(value) -> str:
    import json
    return json.dumps(value)


def main(once: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    worker = Worker()

    def stop(signum, frame):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s serving %s (executor: %s)", worker.id, worker.db.home, worker.executor.name)
    worker.serve(once=once)
    return 0
