"""Benchmark: a digits-cnn job from submit to result, and the Compare page with 200 runs.

    .venv/bin/python bench/end_to_end.py

Prints a small table. Goals (issue 2): job under 30 s on 2 cores with the first training
included; the Compare page renders in under 1 s with 200 stored runs.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.7}},
                    {"method": "quantize.dynamic", "params": {"per_channel": True}}]}


def wait_for(db, api, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get_job(db, job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def time_jobs(home: Path) -> list[tuple[str, float]]:
    """Submit through the API with a real worker process running, as a user of the web app does."""
    from services import api

    env = {**os.environ, "EXPLORER_HOME": str(home), "EXPLORER_POLL_SECONDS": "0.1"}
    worker = subprocess.Popen([sys.executable, "-m", "services", "worker"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        db = api.connect(home)
        deadline = time.monotonic() + 30
        while not api.worker_alive(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = []
        for label in ("first job (trains digits-cnn first)", "second job (model already trained)"):
            started = time.perf_counter()
            submitted = api.submit_compress(db, "digits-cnn", RECIPE)
            job = wait_for(db, api, submitted["job_id"])
            elapsed = time.perf_counter() - started
            assert job["status"] == "succeeded", job
            rows.append((label, elapsed))
        return rows
    finally:
        worker.terminate()
        worker.wait(10)


def time_compare_page(home: Path, runs: int = 200, repeats: int = 5) -> tuple[float, float]:
    """Fill the database to `runs` runs by replicating the measured ones (new ids, same numbers,
    scores nudged so the chart has spread), then time the Compare page's script run in AppTest."""
    from streamlit.testing.v1 import AppTest

    from services import api
    from storage import queue as q

    db = api.connect(home)
    real = list(db.query("SELECT * FROM runs"))
    job_template = dict(next(db.query("SELECT * FROM jobs WHERE kind = 'compress'")))
    for i in range(runs - len(real)):
        source = dict(real[i % len(real)])
        metrics = json.loads(source["metrics"])
        metrics["score"] = max(0.0, metrics["score"] - 0.001 * (i % 50))
        job_id, run_id = q.new_id(), q.new_id()
        db["jobs"].insert({**job_template, "id": job_id, "run_id": run_id})
        db["runs"].insert({**source, "id": run_id, "job_id": job_id, "metrics": json.dumps(metrics)})
    os.environ["EXPLORER_HOME"] = str(home)
    os.chdir(ROOT)
    times = []
    for _ in range(repeats):
        app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        app.switch_page("app_pages/compare.py")
        started = time.perf_counter()
        app.run()
        times.append(time.perf_counter() - started)
        assert not app.exception, app.exception
    return statistics.median(times), min(times)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    try:
        job_rows = time_jobs(home)
        median, best = time_compare_page(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    print("| measurement | seconds | goal |")
    print("|---|---|---|")
    for label, seconds in job_rows:
        print(f"| digits-cnn, prune.magnitude 0.7 → quantize.dynamic: {label}, submit to result | {seconds:.1f} | < 30 |")
    print(f"| Compare page with 200 runs, server-side script run (median of 5; best {best:.2f}) | {median:.2f} | < 1 |")


if __name__ == "__main__":
    main()
