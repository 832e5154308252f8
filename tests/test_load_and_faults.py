"""Load and faults (issue 7): many submitters at once, and artifacts written by a killed process.

Real processes throughout: submitters are separate Python processes (the CLI and services.api), and
the artifact writer is a child killed with SIGKILL while it writes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, wait_until
from services import api

pytestmark = pytest.mark.slow
RECIPE = json.dumps({"steps": [{"method": "quantize.dynamic"}]})

API_SUBMITTER = """
import json, sys
from services import api
db = api.connect()
ids = [api.submit_compress(db, "digits-cnn", {"steps": [{"method": "quantize.dynamic"}]})["job_id"]
       for _ in range(int(sys.argv[1]))]
print(json.dumps(ids))
"""

CLI_SUBMITTER = """
import json, subprocess, sys
ids = []
for _ in range(int(sys.argv[1])):
    done = subprocess.run([sys.executable, "-m", "services", "compress", "--model", "digits-cnn",
                           "--recipe", sys.argv[2], "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        sys.exit(1)
    ids.append(json.loads(done.stdout)["job_id"])
print(json.dumps(ids))
"""


def test_200_jobs_submitted_at_once_from_8_processes_are_all_stored(home):
    api.connect(home).conn.close()  # the schema first, as `make run` does
    env = {**os.environ, "EXPLORER_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    # 6 processes through services.api (30 jobs each) and 2 through the CLI (10 each): 200 jobs
    plan = [("api", 30)] * 6 + [("cli", 10)] * 2
    processes = [subprocess.Popen([sys.executable, "-c", API_SUBMITTER if kind == "api" else CLI_SUBMITTER, str(count),
                                   RECIPE], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for kind, count in plan]
    submitted = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
        assert "locked" not in err.lower()
        submitted += json.loads(out)
    assert len(submitted) == 200 and len(set(submitted)) == 200
    db = api.connect(home)
    stored = {row["id"] for row in db.query("SELECT id FROM jobs WHERE kind = 'compress' AND status = 'queued'")}
    assert stored == set(submitted)  # none lost, none extra
    runs = [row["run_id"] for row in db.query("SELECT run_id FROM jobs WHERE kind = 'compress'")]
    assert len(set(runs)) == 200  # every job its own run id (and share link)


SLOW_WRITER = """
import shutil, sys, time

def slow_copy(source, target, *args, **kwargs):
    # the same bytes, a megabyte every 20 ms: the kill lands in the middle of the write
    with open(source, "rb") as inp, open(target, "wb") as out:
        while chunk := inp.read(1 << 20):
            out.write(chunk)
            out.flush()
            time.sleep(0.02)
    return target

shutil.copyfile = slow_copy
from storage import ArtifactStore
ArtifactStore(sys.argv[1]).put_file(sys.argv[2], "runs", "r1", "model.onnx")
"""


def test_an_artifact_written_while_its_process_is_killed_never_appears_half_written(tmp_path):
    from storage import ArtifactStore

    store = ArtifactStore(tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 48)  # 48 MB, written in about a second
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path), str(big)], cwd=PROJECT_ROOT,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    target = store.path("runs", "r1", "model.onnx")

    def partly_written():
        return [p for p in target.parent.iterdir() if p.name != target.name and p.stat().st_size >= 4 << 20]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not partly_written():
        time.sleep(0.005)
    assert partly_written(), "the writer never got going"
    os.kill(writer.pid, signal.SIGKILL)  # mid-write
    writer.wait(10)
    assert not target.exists()  # the half-written bytes only ever lived under a temporary name
    assert all(p.name.startswith(".model.onnx.") and p.name.endswith(".tmp") for p in partly_written())
    store.put_file(big, "runs", "r1", "model.onnx")  # the job's next attempt writes it whole
    assert target.read_bytes() == big.read_bytes()


def test_a_worker_killed_three_times_at_random_moments_loses_no_job_and_runs_none_twice(prepared_db, prepared_home,
                                                                                        workers):
    """12 jobs, two workers; one of them is killed with SIGKILL three times at random moments and restarted."""
    import random

    from conftest import process_gone, runner_processes
    from storage import queue as q

    db = prepared_db
    recipes = [{"steps": [{"method": "prune.magnitude", "params": {"amount": round(0.1 + 0.07 * i, 2)}}]}
               for i in range(12)]
    submitted = [api.submit_compress(db, "digits-cnn", recipe) for recipe in recipes]
    steady = workers.start(prepared_home, lease_s=2)
    victim = workers.start(prepared_home, lease_s=2)
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 4.0))
        children = [p.pid for p in runner_processes() if p.ppid() == victim.pid]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        # its job's child dies with it (PR_SET_PDEATHSIG): the job cannot run on two workers at once
        wait_until(lambda: all(process_gone(pid) for pid in children), timeout=10, what="the victim's children to die")
        victim = workers.start(prepared_home, lease_s=2)

    def all_ended():
        return all(q.get_job(db, s["job_id"])["status"] in q.FINISHED for s in submitted)
    wait_until(all_ended, timeout=240, interval=0.2, what="every job to end")
    for item in submitted:
        job = q.get_job(db, item["job_id"])
        runs = list(db.query("SELECT id FROM runs WHERE job_id = ?", [item["job_id"]]))
        if job["status"] == "succeeded":
            assert [r["id"] for r in runs] == [item["run_id"]]  # exactly one result row
        else:  # failed after its last attempt, with its reason
            assert job["status"] == "failed" and job["error"] and job["attempts"] == job["max_attempts"], job
            assert runs == []
        assert job["attempts"] <= job["max_attempts"]
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == sum(
        q.get_job(db, s["job_id"])["status"] == "succeeded" for s in submitted)
    wait_until(lambda: not runner_processes(), timeout=30, what="no job child left behind")
    assert steady.poll() is None  # the other worker never noticed anything but more work
