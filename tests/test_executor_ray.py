"""The Ray executor (services/executor_ray.py) on a local Ray: real jobs, real Ray tasks.

The worker runs in this test process (it is the Ray driver), with two jobs in flight; the jobs
are real digits-cnn compress jobs, and a long one (a student trained for many steps) is cancelled
or has its Ray worker process killed with SIGKILL mid-task.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import ray_worker_in_thread, wait_until
from services import api
from storage import queue as q

pytestmark = pytest.mark.slow
QUICK = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.5}}]}
LONG = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 20000}}]}


@pytest.fixture(scope="module")
def local_ray(ray_home):
    """The local Ray a worker starts when RAY_ADDRESS is unset (services.executor_ray.connect), 2 CPUs."""
    ray = pytest.importorskip("ray")
    from services.executor_ray import connect

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["EXPLORER_RAY_CPUS"] = "2"
    try:
        connect(ray_home)
    finally:
        os.environ.pop("EXPLORER_RAY_CPUS", None)
    yield ray
    ray.shutdown()


def test_a_local_ray_keeps_its_files_in_the_data_folder(local_ray, ray_home):
    """Session files (logs, sockets) and the token of Ray's token authentication lie under EXPLORER_HOME/ray,
    not in /tmp/ray or ~/.ray; token authentication stays on."""
    from ray._private import worker

    session = Path(worker._global_node.get_session_dir_path()).resolve()
    assert session.parent == (ray_home / "ray").resolve()
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token == (ray_home / "ray" / "auth_token").resolve() and len(token.read_text()) == 64
    assert token.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert os.environ["RAY_AUTH_MODE"] == "token"  # ray.init's default for a local cluster, kept
    assert local_ray.cluster_resources()["CPU"] == 2


def test_a_data_folder_too_long_for_unix_sockets_falls_back_to_a_short_temporary_folder(tmp_path, monkeypatch,
                                                                                         capsys):
    from services.executor_ray import SOCKET_PATH_ROOM, local_ray_files

    monkeypatch.setenv("RAY_AUTH_TOKEN", "set by the environment")  # leaves this process's token alone
    long_home = tmp_path / ("x" * SOCKET_PATH_ROOM)
    folder = Path(local_ray_files(long_home))
    try:
        assert len(str(folder)) <= SOCKET_PATH_ROOM and folder.is_dir()
        assert "too long for Ray's sockets" in capsys.readouterr().err
        assert not (long_home / "ray" / "auth_token").exists()  # the environment's token is used
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ray_worker(local_ray, prepared_db, monkeypatch):
    """A worker serving in a thread with the Ray executor and two jobs in flight; stopped at the end."""
    monkeypatch.setenv("EXPLORER_JOBS_IN_FLIGHT", "2")
    yield from ray_worker_in_thread(prepared_db)


def _running_task(worker, job_id: str, timeout: float = 120):
    """The Ray task's process of a running job, once it reported in (its 'started' event)."""
    def started():
        found = worker.in_flight.get(job_id)
        if found and found[1].started:
            return found[1].started
        return None
    return wait_until(started, timeout=timeout, what="the Ray task to start")


def test_two_jobs_run_as_ray_tasks_and_the_run_says_where(ray_worker, prepared_db):
    runs = [api.submit_compress(prepared_db, "digits-cnn", QUICK) for _ in range(2)]
    for submitted in runs:
        job = api.wait_for_job(prepared_db, submitted["job_id"], 240)
        assert job["status"] == "succeeded", job
    for submitted in runs:
        run = api.get_run(prepared_db, submitted["run_id"])
        assert run["runner"]["executor"] == "ray" and run["runner"]["node"]
        assert run["metrics"]["score"] > 0.9 and os.path.isfile(run["artifact"])
    jobs = [q.get_job(prepared_db, s["job_id"]) for s in runs]
    assert all(j["attempts"] == 1 and j["message"] == "done" for j in jobs)


def test_cancel_reaches_the_ray_task(ray_worker, prepared_db):
    submitted = api.submit_compress(prepared_db, "digits-cnn", LONG)
    task = _running_task(ray_worker, submitted["job_id"])
    wait_until(lambda: q.get_job(prepared_db, submitted["job_id"])["progress"] > 0, timeout=120,
               what="progress from the Ray task to reach the job")
    api.cancel_job(prepared_db, submitted["job_id"])
    job = wait_until(lambda: (j := q.get_job(prepared_db, submitted["job_id"]))["status"] == "cancelled" and j,
                     timeout=60, what="the job to be cancelled")
    assert job["status"] == "cancelled"
    wait_until(lambda: not _alive(task["pid"]), timeout=30, what="the task's process to end")


def test_a_killed_ray_worker_process_is_retried_and_the_job_ends_once(ray_worker, prepared_db):
    recipe = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 600}}]}
    submitted = api.submit_compress(prepared_db, "digits-cnn", recipe)
    task = _running_task(ray_worker, submitted["job_id"])
    os.kill(task["pid"], signal.SIGKILL)
    job = wait_until(lambda: (j := q.get_job(prepared_db, submitted["job_id"]))["status"] in q.FINISHED and j,
                     timeout=400, what="the job to end after its retry")
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert len(list(prepared_db.query("SELECT id FROM runs WHERE job_id = ?", [submitted["job_id"]]))) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_queue_of_12_jobs_survives_ray_task_processes_killed_three_times(ray_worker, prepared_db):
    """The chaos test of issue 7 on Ray: two jobs in flight, a running task's process SIGKILLed at three random
    moments; every job ends exactly once (succeeded, or failed with its reason after its last attempt)."""
    import random
    import time

    recipes = [{"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 150 + 5 * i}}]}
               for i in range(12)]
    submitted = [api.submit_compress(prepared_db, "digits-cnn", recipe) for recipe in recipes]
    rng = random.Random(11)
    kills = 0
    deadline = time.monotonic() + 240
    while kills < 3 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 1.0))
        running = [handle.started for _, handle in list(ray_worker.in_flight.values()) if handle.started]
        if running:
            victim = rng.choice(running)
            if _alive(victim["pid"]):
                os.kill(victim["pid"], signal.SIGKILL)
                kills += 1
    assert kills == 3, "the jobs ended before three kills: nothing was tested"

    def all_ended():
        return all(q.get_job(prepared_db, s["job_id"])["status"] in q.FINISHED for s in submitted)
    wait_until(all_ended, timeout=300, interval=0.2, what="every job to end")
    retried = 0
    for item in submitted:
        job = q.get_job(prepared_db, item["job_id"])
        runs = list(prepared_db.query("SELECT id FROM runs WHERE job_id = ?", [item["job_id"]]))
        if job["status"] == "succeeded":
            assert [r["id"] for r in runs] == [item["run_id"]]
        else:
            assert job["status"] == "failed" and job["error"] and job["attempts"] == job["max_attempts"], job
            assert runs == []
        retried += job["attempts"] > 1
    assert retried >= 1  # the killed tasks were run again


def test_a_recipe_asking_for_a_gpu_fails_at_once_on_a_cluster_without_one(ray_worker, prepared_db):
    """No node of this Ray has a GPU: the job ends with the reason instead of a task pending for ever."""
    recipe = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 50}}], "gpus": 1}
    submitted = api.submit_compress(prepared_db, "digits-cnn", recipe)
    job = wait_until(lambda: (j := q.get_job(prepared_db, submitted["job_id"]))["status"] in q.FINISHED and j,
                     timeout=60, what="the job to end")
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "asks for 1 GPU(s) (gpus), and the Ray cluster has 0" in job["error"]
