"""storage/queue.py: every transition of a job, leases and the reaper, and atomic claims."""
from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from storage import open_db
from storage import queue as q

RECIPE = {"task": "digits", "steps": [{"method": "quantize.dynamic", "params": {}}], "recovery": {"objective": "none"}}


def _compress(db, run_id: str | None = None, **kwargs) -> str:
    return q.enqueue(db, "compress", "digits-cnn", {"recipe": RECIPE, "run_id": run_id or q.new_id()}, **kwargs)


def _run_row(job: dict) -> dict:
    return {"id": job["run_id"], "job_id": job["id"], "model_id": job["model_id"], "recipe": json.dumps(RECIPE),
            "metrics": json.dumps({"size_bytes": 123}), "baseline": json.dumps({"size_bytes": 456}),
            "runner": json.dumps({"executor": "local", "node": "test"}),
            "artifact": f"artifacts/runs/{job['run_id']}/model.onnx", "created_at": "2026-01-01T00:00:00"}


def _runs_for(db, job_id: str) -> list[dict]:
    return list(db.query("SELECT * FROM runs WHERE job_id = ?", [job_id]))


def test_enqueue_writes_a_queued_job(db):
    job_id = _compress(db, run_id="r1")
    assert len(job_id) == 32 and int(job_id, 16) >= 0  # 128 random bits, hex
    job = q.get_job(db, job_id)
    assert job["status"] == "queued"
    assert job["kind"] == "compress"
    assert job["model_id"] == "digits-cnn"
    assert job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["payload"] == {"recipe": RECIPE, "run_id": "r1"}
    assert job["run_id"] == "r1"
    assert job["cancel_requested"] is False
    assert job["worker_id"] is None and job["lease_until"] is None
    assert q.get_job(db, "no-such-job") is None


def test_new_ids_are_unique_128_bit_hex():
    ids = {q.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_claim_heartbeat_progress_succeed(db):
    job_id = _compress(db)
    before = time.time()
    job = q.claim(db, "w1", lease_s=30)
    assert job["id"] == job_id
    assert job["status"] == "running"
    assert job["worker_id"] == "w1"
    assert job["attempts"] == 1
    assert before + 29 <= job["lease_until"] <= time.time() + 30
    assert job["started_at"] and job["message"] == "starting"
    assert q.claim(db, "w2") is None  # nothing else is queued

    old_lease = job["lease_until"]
    assert q.heartbeat(db, job_id, "w1", lease_s=300) is True
    assert q.get_job(db, job_id)["lease_until"] > old_lease + 200
    assert q.heartbeat(db, job_id, "someone-else", lease_s=300) is False

    q.report_progress(db, job_id, "w1", 0.25, "step 1/2: quantize.dynamic")
    job = q.get_job(db, job_id)
    assert (job["progress"], job["message"]) == (0.25, "step 1/2: quantize.dynamic")
    q.report_progress(db, job_id, "w1", 7.0, "x" * 900)  # clamped to [0, 1], message cut to 500 characters
    job = q.get_job(db, job_id)
    assert job["progress"] == 1.0 and len(job["message"]) == 500
    q.report_progress(db, job_id, "w1", -3, "back")
    assert q.get_job(db, job_id)["progress"] == 0.0
    q.report_progress(db, job_id, "intruder", 0.9, "not mine")  # ignored: w1 holds the job
    assert q.get_job(db, job_id)["message"] == "back"

    claimed = q.get_job(db, job_id)
    assert q.succeed(db, job_id, "w1", run=_run_row(claimed), runner={"executor": "local", "node": "n"}) is True
    job = q.get_job(db, job_id)
    assert job["status"] == "succeeded"
    assert job["progress"] == 1.0 and job["message"] == "done"
    assert job["finished_at"] and job["lease_until"] is None
    assert job["runner"] == {"executor": "local", "node": "n"}
    runs = _runs_for(db, job_id)
    assert len(runs) == 1
    assert runs[0]["id"] == claimed["run_id"]
    assert json.loads(runs[0]["metrics"]) == {"size_bytes": 123}

    # A second succeed (a duplicate delivery) changes nothing and adds no run.
    assert q.succeed(db, job_id, "w1", run=_run_row(claimed)) is False
    assert len(_runs_for(db, job_id)) == 1
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert q.heartbeat(db, job_id, "w1") is False  # a finished job holds no lease


def test_succeed_with_model_update_updates_the_model_in_the_same_transaction(db):
    job_id = q.enqueue(db, "prepare", "digits-cnn", {"model_id": "digits-cnn"})
    q.claim(db, "w1")
    card = {"params": 21546, "score": 0.97}
    assert q.succeed(db, job_id, "w1", model_update={"status": "ready", "card": json.dumps(card),
                                                     "artifact": "artifacts/models/digits-cnn/model.onnx"})
    model = next(db.query("SELECT * FROM models WHERE id = 'digits-cnn'"))
    assert model["status"] == "ready"
    assert json.loads(model["card"]) == card
    assert model["artifact"] == "artifacts/models/digits-cnn/model.onnx"
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_claim_takes_the_oldest_job_first_and_a_named_one_on_request(db):
    ids = [_compress(db) for _ in range(3)]
    named = q.claim(db, "w1", job_id=ids[2])
    assert named["id"] == ids[2]
    assert q.claim(db, "w1", job_id=ids[2]) is None  # no longer queued
    assert q.claim(db, "w1")["id"] == ids[0]
    assert q.claim(db, "w1")["id"] == ids[1]
    assert q.claim(db, "w1") is None


def test_fail_stores_the_reason(db):
    job_id = _compress(db)
    q.claim(db, "w1")
    assert q.fail(db, job_id, "w1", "The stored weights of digits-cnn are missing.") is True
    job = q.get_job(db, job_id)
    assert job["status"] == "failed"
    assert job["error"] == "The stored weights of digits-cnn are missing."
    assert job["message"] == "failed" and job["finished_at"]
    assert q.fail(db, job_id, "w1", "again") is False
    assert q.get_job(db, job_id)["error"] == "The stored weights of digits-cnn are missing."
    assert _runs_for(db, job_id) == []


def test_cancel_a_queued_job(db):
    job_id = _compress(db)
    assert q.request_cancel(db, job_id) == "cancelled"
    job = q.get_job(db, job_id)
    assert job["status"] == "cancelled" and job["finished_at"]
    assert q.claim(db, "w1") is None  # a cancelled job is never delivered
    assert q.request_cancel(db, job_id) == "cancelled"  # cancelling again is harmless
    assert q.request_cancel(db, "no-such-job") is None


def test_cancel_a_running_job_is_a_request_the_worker_completes(db):
    job_id = _compress(db)
    q.claim(db, "w1")
    assert q.cancel_requested(db, job_id) is False
    assert q.request_cancel(db, job_id) == "cancelling"
    job = q.get_job(db, job_id)
    assert job["status"] == "running"  # the worker still has to stop the child
    assert job["cancel_requested"] is True and job["message"] == "stopping…"
    assert q.cancel_requested(db, job_id) is True
    assert q.mark_cancelled(db, job_id, "other-worker") is False
    assert q.mark_cancelled(db, job_id, "w1") is True
    job = q.get_job(db, job_id)
    assert job["status"] == "cancelled" and job["lease_until"] is None and job["finished_at"]
    assert q.request_cancel(db, job_id) == "cancelled"


def test_a_search_stops_a_trial_early_and_the_reason_stays(db):
    queued, running = _compress(db), _compress(db)
    q.claim(db, "w1", job_id=running)
    with q.immediate(db):  # inside the search's own transaction
        q.stop_early(db, queued, "amount 0.6 already lost 4.0 points")
        q.stop_early(db, running, "amount 0.6 already lost 4.0 points")
    job = q.get_job(db, queued)
    assert job["status"] == "cancelled" and job["error"] == "stopped early: amount 0.6 already lost 4.0 points"
    job = q.get_job(db, running)
    assert job["status"] == "running" and job["cancel_requested"] is True  # the worker stops the child
    assert q.mark_cancelled(db, running, "w1") is True
    job = q.get_job(db, running)
    assert job["status"] == "cancelled" and job["message"].startswith("stopped early: amount 0.6")


def test_cancelling_a_finished_job_changes_nothing(db):
    job_id = _compress(db)
    job = q.claim(db, "w1")
    q.succeed(db, job_id, "w1", run=_run_row(job))
    assert q.request_cancel(db, job_id) == "succeeded"
    assert q.get_job(db, job_id)["status"] == "succeeded"
    assert q.get_job(db, job_id)["cancel_requested"] is False


def test_expired_leases_are_requeued_until_the_last_attempt_then_failed(db):
    job_id = _compress(db, max_attempts=2)
    q.claim(db, "w1", lease_s=30)
    assert q.reap_expired(db) == []  # the lease still runs
    assert q.reap_expired(db, now=time.time() + 10_000) == [job_id]
    job = q.get_job(db, job_id)
    assert job["status"] == "queued"
    assert job["worker_id"] is None and job["lease_until"] is None
    assert job["attempts"] == 1
    assert "requeued" in job["message"] and "attempt 1 of 2" in job["message"]

    job = q.claim(db, "w2", lease_s=30)
    assert job["attempts"] == 2 and job["worker_id"] == "w2"
    assert q.reap_expired(db, now=time.time() + 10_000) == [job_id]
    job = q.get_job(db, job_id)
    assert job["status"] == "failed"
    assert job["finished_at"] and job["lease_until"] is None
    assert job["error"] == ("The worker running this job stopped responding on each of its 2 attempts, "
                            "so it was given up.")
    assert "Traceback" not in job["error"]
    assert q.claim(db, "w3") is None
    assert q.reap_expired(db, now=time.time() + 20_000) == []  # nothing running any more


def test_reaping_a_job_whose_cancel_was_requested_cancels_it(db):
    job_id = _compress(db)
    q.claim(db, "w1")
    q.request_cancel(db, job_id)
    assert q.reap_expired(db, now=time.time() + 10_000) == [job_id]
    assert q.get_job(db, job_id)["status"] == "cancelled"
    assert q.claim(db, "w2") is None


def test_a_worker_that_lost_its_lease_cannot_finish_the_job(db):
    job_id = _compress(db)
    first = q.claim(db, "w1", lease_s=30)
    q.reap_expired(db, now=time.time() + 10_000)  # w1 stopped heartbeating (paused, network, ...)
    second = q.claim(db, "w2", lease_s=30)
    assert second["attempts"] == 2

    assert q.heartbeat(db, job_id, "w1") is False
    assert q.succeed(db, job_id, "w1", run=_run_row(first)) is False
    assert q.fail(db, job_id, "w1", "late failure") is False
    assert q.mark_cancelled(db, job_id, "w1") is False
    assert q.release(db, job_id, "w1") is False
    job = q.get_job(db, job_id)
    assert job["status"] == "running" and job["worker_id"] == "w2" and job["error"] is None
    assert _runs_for(db, job_id) == []

    # The retry, by the worker that holds it now, leaves exactly one run keyed by the job.
    assert q.succeed(db, job_id, "w2", run=_run_row(second)) is True
    runs = _runs_for(db, job_id)
    assert len(runs) == 1 and runs[0]["id"] == first["run_id"] == second["run_id"]
    assert q.get_job(db, job_id)["attempts"] == 2


def test_a_stored_run_is_replaced_not_duplicated_when_its_job_is_stored_again(db):
    # Should a job's result ever be written twice (at-least-once delivery), the runs table keeps one row.
    job_id = _compress(db)
    job = q.claim(db, "w1")
    assert q.succeed(db, job_id, "w1", run=_run_row(job))
    db.execute("UPDATE jobs SET status = 'running', worker_id = 'w2' WHERE id = ?", [job_id])
    newer = {**_run_row(job), "metrics": json.dumps({"size_bytes": 99})}
    assert q.succeed(db, job_id, "w2", run=newer)
    runs = _runs_for(db, job_id)
    assert len(runs) == 1
    assert json.loads(runs[0]["metrics"]) == {"size_bytes": 99}


def test_release_gives_the_job_back_without_counting_the_attempt(db):
    job_id = _compress(db)
    q.claim(db, "w1")
    assert q.release(db, job_id, "w1") is True
    job = q.get_job(db, job_id)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["worker_id"] is None
    assert "requeued" in job["message"]
    assert q.claim(db, "w2")["attempts"] == 1


def test_list_jobs_filters_and_pages(db):
    ids = [_compress(db) for _ in range(5)]
    q.claim(db, "w1")  # ids[0] is running now
    newest_first = [job["id"] for job in q.list_jobs(db)]
    assert newest_first == ids[::-1]
    assert [job["id"] for job in q.list_jobs(db, status="running")] == [ids[0]]
    assert [job["id"] for job in q.list_jobs(db, status="queued", limit=2)] == [ids[4], ids[3]]
    assert [job["id"] for job in q.list_jobs(db, limit=2, offset=3)] == [ids[1], ids[0]]
    assert q.list_jobs(db, model_id="digits-cnn-x2") == []
    assert all(isinstance(job["payload"], dict) for job in q.list_jobs(db))


def test_workers_register_heartbeat_and_leave(db):
    q.register_worker(db, "w1", 1234, "host-a")
    assert [w["id"] for w in q.live_workers(db)] == ["w1"]
    db.execute("UPDATE workers SET last_seen = ? WHERE id = 'w1'", [time.time() - 3600])
    assert q.live_workers(db) == []
    q.touch_worker(db, "w1")
    assert [w["pid"] for w in q.live_workers(db)] == [1234]
    q.unregister_worker(db, "w1")
    assert q.live_workers(db) == []
    assert db.execute("SELECT count(*) FROM workers").fetchone()[0] == 0


def test_live_slots_count_the_jobs_every_live_worker_runs_at_once(db):
    assert q.live_slots(db) == 0
    q.register_worker(db, "w1", 1, "host-a")  # one job at a time (the default)
    q.register_worker(db, "w2", 2, "host-b", slots=2)  # EXPLORER_JOBS_IN_FLIGHT=2
    assert q.live_slots(db) == 3
    db.execute("UPDATE workers SET last_seen = ? WHERE id = 'w2'", [time.time() - 3600])
    assert q.live_slots(db) == 1


# ---- claims from several processes at once ---------------------------------------------------

def _claim_until_empty(home: str, worker_id: str, barrier, results) -> None:
    """In a child process: claim jobs until none is left; report what was claimed and any error."""
    claimed, errors = [], []
    try:
        db = open_db(home)
        barrier.wait(timeout=60)
        while True:
            job = q.claim(db, worker_id, lease_s=600)
            if job is None:
                break
            claimed.append(job["id"])
            # Work a little and write as a worker does, so claims and other writes interleave.
            q.heartbeat(db, job["id"], worker_id, lease_s=600)
            q.report_progress(db, job["id"], worker_id, 0.5, f"claimed by {worker_id}")
            time.sleep(0.02)  # give the other processes their turn, so claims really contend
    except BaseException as error:
        errors.append(f"{type(error).__name__}: {error}")
    results.put((worker_id, claimed, errors))


@pytest.mark.slow
def test_concurrent_claims_take_each_job_exactly_once(db):
    job_ids = [_compress(db) for _ in range(40)]
    context = multiprocessing.get_context("spawn")
    count = 4
    barrier = context.Barrier(count)
    results = context.Queue()
    procs = [context.Process(target=_claim_until_empty, args=(str(db.home), f"w{i}", barrier, results))
             for i in range(count)]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0

    assert [error for _, _, errors in reports for error in errors] == []  # no 'database is locked'
    claimed = [job_id for _, ids, _ in reports for job_id in ids]
    assert sorted(claimed) == sorted(job_ids)  # every job once, none twice
    assert len(set(claimed)) == 40
    by_worker = {worker_id: set(ids) for worker_id, ids, _ in reports}
    assert sum(1 for ids in by_worker.values() if ids) >= 2  # the claims did overlap in time
    for job in q.list_jobs(db, limit=100):
        assert job["status"] == "running"
        assert job["attempts"] == 1
        assert job["id"] in by_worker[job["worker_id"]]
        assert job["message"] == f"claimed by {job['worker_id']}"
