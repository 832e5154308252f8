"""services/worker.py with real processes: `python -m services worker` runs each job in a child
(`python -m services.engine.runner JOB_ID`); we watch the database, cancel, and kill things.

Jobs are made slow enough to be caught mid-run by giving the worker a huge
EXPLORER_BENCH_REPEATS: the child then spends its time in the ONNX Runtime timing loop.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, PRUNE_80, QUANTIZE, process_gone, run_cli_json, runner_processes, wait_until
from services import api
from storage import queue as q

pytestmark = pytest.mark.slow

LONG_TIMING = {"EXPLORER_BENCH_REPEATS": "5000000", "EXPLORER_BENCH_SECONDS": "600"}  # minutes of timing: the job is still running when we act


def _job(db, job_id):
    return api.get_job(db, job_id)


def _wait_finished(db, job_id, timeout=120):
    return wait_until(lambda: (job := _job(db, job_id))["status"] in q.FINISHED and job,
                      timeout=timeout, interval=0.05, what=f"job {job_id} to finish")


def _wait_child(db, job_id, timeout=60):
    """The running job's child process, once it is in the timing phase (so surely mid-run)."""
    def child_in_timing():
        job = _job(db, job_id)
        assert job["status"] in ("queued", "running"), job
        found = runner_processes(job_id)
        return job["status"] == "running" and job["message"].startswith("timing") and found and found[0]

    return wait_until(child_in_timing, timeout=timeout, interval=0.05, what="the job's child process")


def _runs_of(db, job_id):
    return list(db.query("SELECT * FROM runs WHERE job_id = ?", [job_id]))


def test_a_compress_job_goes_queued_running_succeeded(prepared_db, prepared_home, workers):
    db = prepared_db
    submitted = api.submit_compress(db, "digits-cnn", QUANTIZE)
    job_id = submitted["job_id"]
    seen = [(lambda j: (j["status"], j["progress"], j["message"]))(_job(db, job_id))]
    assert seen[0][0] == "queued"

    worker = workers.start(prepared_home)

    def observe():
        job = _job(db, job_id)
        seen.append((job["status"], job["progress"], job["message"]))
        return job["status"] in q.FINISHED and job

    job = wait_until(observe, timeout=120, interval=0.02, what="the compress job")
    assert job["status"] == "succeeded", job.get("error")

    statuses = [status for status, _, _ in seen]
    order = {"queued": 0, "running": 1, "succeeded": 2}
    assert "running" in statuses
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)  # never went back
    running = [(progress, message) for status, progress, message in seen if status == "running"]
    assert all(0.0 <= progress <= 1.0 for progress, _ in running)
    assert all(message for _, message in running)
    progresses = [progress for progress, _ in running]
    assert progresses == sorted(progresses)
    assert any(0.0 < progress < 1.0 for progress in progresses), running  # intermediate progress was shown
    assert len({message for _, message in running}) >= 2

    assert job["progress"] == 1.0 and job["message"] == "done"
    assert job["attempts"] == 1
    assert job["worker_id"] and str(worker.pid) in job["worker_id"]
    assert job["runner"]["executor"] == "local"
    assert job["error"] is None

    runs = _runs_of(db, job_id)
    assert len(runs) == 1 and runs[0]["id"] == submitted["run_id"]
    run = api.get_run(db, submitted["run_id"])
    artifact = prepared_home / run["artifact"]
    assert artifact.is_file() and artifact.stat().st_size == run["metrics"]["size_bytes"]
    assert run["metrics"]["size_bytes"] < run["baseline"]["size_bytes"] / 2
    assert 0.0 <= run["metrics"]["score"] <= 1.0
    assert (prepared_home / "artifacts" / "jobs" / job_id / "attempt-1.log").is_file()
    assert not (prepared_home / "artifacts" / "runs" / submitted["run_id"] / "tmp").exists()
    assert [w["pid"] for w in q.live_workers(db)] == [worker.pid]  # the worker says it is serving
    assert worker.poll() is None


def test_cancelling_a_running_job_stops_its_child(prepared_db, prepared_home, workers):
    db = prepared_db
    submitted = api.submit_compress(db, "digits-cnn", QUANTIZE)
    job_id = submitted["job_id"]
    worker = workers.start(prepared_home, **LONG_TIMING)
    child = _wait_child(db, job_id)

    asked = api.cancel_job(db, job_id)
    assert asked["cancel_requested"] is True or asked["status"] == "cancelled"
    job = _wait_finished(db, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert job["message"] == "cancelled by the user"
    assert job["finished_at"] and job["lease_until"] is None
    wait_until(lambda: process_gone(child.pid), timeout=15, what="the cancelled job's child to exit")
    assert runner_processes(job_id) == []
    assert _runs_of(db, job_id) == []
    assert api.get_run(db, submitted["run_id"])["status"] == "cancelled"
    assert worker.poll() is None  # the worker itself carries on


def test_a_failing_job_is_failed_with_a_reason_and_the_worker_serves_the_next(prepared_db, prepared_home,
                                                                             workers):
    db = prepared_db
    weights = prepared_home / "artifacts" / "models" / "digits-cnn" / "weights.pt"
    assert weights.stat().st_size > 10_000
    weights.write_bytes(b"\x00garbage, not a state dict\xff" * 200)
    broken = api.submit_compress(db, "digits-cnn", PRUNE_80)  # prune is a torch step: loads the weights
    fine = api.submit_compress(db, "digits-cnn", QUANTIZE)  # ONNX only: does not need the weights

    worker = workers.start(prepared_home)
    failed = _wait_finished(db, broken["job_id"])
    assert failed["status"] == "failed"
    assert failed["attempts"] == 1  # a failure is an answer, not a lost worker: no retry
    error = failed["error"]
    assert error and len(error) < 2000
    assert "Traceback" not in error and 'File "' not in error
    assert failed["message"] == "failed"
    assert _runs_of(db, broken["job_id"]) == []
    # The traceback, if any, belongs in the attempt's log, not in the reason shown to the user.
    assert (prepared_home / "artifacts" / "jobs" / broken["job_id"] / "attempt-1.log").is_file()

    assert "prepare it again" in error  # the model was reset, so the Models page offers to prepare it

    served = _wait_finished(db, fine["job_id"])
    assert served["status"] == "succeeded", served.get("error")
    assert len(_runs_of(db, fine["job_id"])) == 1
    assert worker.poll() is None
    # The next job found the model reset and prepared it again: usable weights, a ready card.
    assert api.get_model(db, "digits-cnn")["status"] == "ready"
    assert weights.stat().st_size > 10_000


def test_a_child_killed_by_sigkill_fails_the_job_naming_the_signal(prepared_db, prepared_home, workers):
    db = prepared_db
    submitted = api.submit_compress(db, "digits-cnn", QUANTIZE)
    job_id = submitted["job_id"]
    worker = workers.start(prepared_home, **LONG_TIMING)
    child = _wait_child(db, job_id)

    os.kill(child.pid, signal.SIGKILL)
    job = _wait_finished(db, job_id, timeout=30)
    assert job["status"] == "failed"
    assert "SIGKILL" in job["error"]
    assert "Traceback" not in job["error"]
    assert job["attempts"] == 1
    assert _runs_of(db, job_id) == []
    assert worker.poll() is None


def test_a_worker_killed_mid_job_takes_its_child_along_and_the_job_is_retried(prepared_db, prepared_home,
                                                                             workers):
    db = prepared_db
    submitted = api.submit_compress(db, "digits-cnn", QUANTIZE)
    job_id = submitted["job_id"]
    first = workers.start(prepared_home, lease_s=2, **LONG_TIMING)
    child = _wait_child(db, job_id)
    try:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        # PR_SET_PDEATHSIG: the child dies with the worker instead of computing a result nobody stores.
        wait_until(lambda: process_gone(child.pid), timeout=10, what="the orphaned child to die")
    finally:
        if not process_gone(child.pid):
            child.kill()
    job = _job(db, job_id)
    assert job["status"] == "running" and job["attempts"] == 1  # nobody has noticed yet

    second = workers.start(prepared_home, lease_s=2)  # reaps the expired lease, then runs the job again
    job = _wait_finished(db, job_id, timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    assert job["attempts"] == 2
    assert str(second.pid) in job["worker_id"]
    runs = _runs_of(db, job_id)
    assert len(runs) == 1 and runs[0]["id"] == submitted["run_id"]
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert (prepared_home / "artifacts" / "jobs" / job_id / "attempt-2.log").is_file()


def test_a_worker_stopped_with_sigterm_hands_its_job_back(prepared_db, prepared_home, workers):
    db = prepared_db
    submitted = api.submit_compress(db, "digits-cnn", QUANTIZE)
    job_id = submitted["job_id"]
    worker = workers.start(prepared_home, **LONG_TIMING)
    child = _wait_child(db, job_id)

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    wait_until(lambda: process_gone(child.pid), timeout=10, what="the child to stop")
    job = _job(db, job_id)
    assert job["status"] == "queued"
    assert job["attempts"] == 0  # a clean shutdown does not use up an attempt
    assert job["worker_id"] is None and job["lease_until"] is None
    assert "requeued" in job["message"]
    assert q.live_workers(db) == []  # it said goodbye
    assert _runs_of(db, job_id) == []


def test_compressing_a_model_not_prepared_yet_trains_it_first(db, home, workers):
    assert api.get_model(db, "digits-cnn")["status"] == "new"
    submitted = api.submit_compress(db, "digits-cnn", PRUNE_80)
    workers.start(home)
    messages = set()

    def observe():
        job = _job(db, submitted["job_id"])
        messages.add(job["message"])
        return job["status"] in q.FINISHED and job

    job = wait_until(observe, timeout=180, interval=0.05, what="train + compress")
    assert job["status"] == "succeeded", job.get("error")
    assert any(message.startswith("training digits-cnn") for message in messages), messages
    model = api.get_model(db, "digits-cnn")
    assert model["status"] == "ready"  # stored with the run, in the same transaction
    assert model["card"]["score"] > 0.9
    assert (home / model["artifact"]).is_file()
    run = api.get_run(db, submitted["run_id"])
    assert run["baseline"]["params"] == run["metrics"]["params"] == model["card"]["params"]
    assert run["metrics"]["nonzero_params"] < 0.25 * run["metrics"]["params"]


def test_cli_wait_lets_a_running_worker_do_the_job(prepared_db, prepared_home, workers):
    worker = workers.start(prepared_home)
    wait_until(lambda: q.live_workers(prepared_db), timeout=30, what="the worker to register")
    record = run_cli_json("compress", "--model", "digits-cnn", "--recipe", json.dumps(QUANTIZE), "--wait",
                          "--json", home=prepared_home)
    assert record["status"] == "succeeded"
    job = _job(prepared_db, record["job_id"])
    assert f"-{worker.pid}-" in job["worker_id"]  # done by the worker, not inline by the CLI
    assert len(_runs_of(prepared_db, record["job_id"])) == 1


def test_worker_once_drains_the_queue_and_exits(prepared_db, prepared_home):
    first = api.submit_compress(prepared_db, "digits-cnn", QUANTIZE)
    second = api.submit_compress(prepared_db, "digits-cnn", {"steps": [{"method": "quantize.dynamic",
                                                                        "params": {"operators": ["Conv"]}}]})
    env = {**os.environ, "EXPLORER_HOME": str(prepared_home)}
    done = subprocess.run([sys.executable, "-m", "services", "worker", "--once"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    for submitted in (first, second):
        assert _job(prepared_db, submitted["job_id"])["status"] == "succeeded"
    conv_only = api.get_run(prepared_db, second["run_id"])["metrics"]
    everything = api.get_run(prepared_db, first["run_id"])["metrics"]
    assert everything["size_bytes"] < conv_only["size_bytes"]  # the dense layers hold most weights
    assert q.live_workers(prepared_db) == []
    assert prepared_db.execute("SELECT count(*) FROM workers").fetchone()[0] == 0


def test_a_recipe_asking_for_a_gpu_fails_with_the_reason_where_torch_sees_none(prepared_db, prepared_home):
    """The local executor runs the job on this machine: with no CUDA device it ends at once with a sentence
    that says what to do (never a silent fallback to slow CPU training while a GPU was asked for)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the recipe would train on it")
    recipe = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 50}}], "gpus": 1}
    submitted = api.submit_compress(prepared_db, "digits-cnn", recipe)
    env = {**os.environ, "EXPLORER_HOME": str(prepared_home)}
    done = subprocess.run([sys.executable, "-m", "services", "worker", "--once"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    job = _job(prepared_db, submitted["job_id"])
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "asks for a GPU (gpus), but PyTorch sees none" in job["error"] and "EXPLORER_EXECUTOR=ray" in job["error"]
    assert _runs_of(prepared_db, submitted["job_id"]) == []
