"""Throughput of the worker with one job at a time, two at once, and on Ray (issue 7's measurement).

20 digits-cnn compress jobs (pruning amounts 0.05-0.95 with and without int8), each in a fresh copy of a
data folder where digits-cnn is ready, run to the end by ONE real worker process:
  - local executor, one job at a time (the default);
  - local executor, two jobs in flight (EXPLORER_JOBS_IN_FLIGHT=2);
  - Ray executor (a local Ray on this machine, 2 CPUs, 1 per job), one job at a time and two in flight;
then a 7-trial Optuna search (two rates, goal front) on Ray with one trial in flight against two.
Each job runs torch and ONNX Runtime on one thread, so two jobs use the two cores without fighting.
Prints wall times and ratios (serial time / time), and writes bench/out/scale_out.md.

    .venv/bin/python bench/scale_out.py [--jobs 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {"local, 1 job at a time": {"EXPLORER_EXECUTOR": "local", "EXPLORER_JOBS_IN_FLIGHT": "1"},
         "local, 2 jobs in flight": {"EXPLORER_EXECUTOR": "local", "EXPLORER_JOBS_IN_FLIGHT": "2"},
         "Ray (local, 2 CPUs), 1 job at a time": {"EXPLORER_EXECUTOR": "ray", "EXPLORER_JOBS_IN_FLIGHT": "1",
                                                  "EXPLORER_RAY_CPUS": "2"},
         "Ray (local, 2 CPUs), 2 jobs in flight": {"EXPLORER_EXECUTOR": "ray", "EXPLORER_JOBS_IN_FLIGHT": "2",
                                                    "EXPLORER_RAY_CPUS": "2"}}
SEARCH_MODES = {"Ray, 1 trial in flight": {"EXPLORER_EXECUTOR": "ray", "EXPLORER_JOBS_IN_FLIGHT": "1",
                                           "EXPLORER_RAY_CPUS": "2"},
                "Ray, 2 trials in flight": {"EXPLORER_EXECUTOR": "ray", "EXPLORER_JOBS_IN_FLIGHT": "2",
                                            "EXPLORER_RAY_CPUS": "2"}}


def recipes(count: int) -> list[dict]:
    out = []
    for index in range(count):
        amount = round(0.05 + 0.9 * (index // 2) / max(1, count // 2 - 1), 3)
        steps = [{"method": "prune.structured", "params": {"amount": amount}}]
        if index % 2:
            steps.append({"method": "quantize.dynamic", "params": {}})
        out.append({"steps": steps})
    return out


def start_worker(home: Path, env: dict) -> subprocess.Popen:
    full = {**os.environ, **env, "EXPLORER_HOME": str(home), "EXPLORER_POLL_SECONDS": "0.1",
            "EXPLORER_BENCH_SECONDS": "0.5", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "services", "worker"], cwd=ROOT, env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()

    from services import api
    from storage import queue as q

    work = Path(tempfile.mkdtemp(prefix="explorer-scale-"))
    template = work / "template"
    db = api.connect(template)
    api.wait_for_job(db, api.submit_compress(db, "digits-cnn", recipes(1)[0])["job_id"], 600)  # prepares it once
    db.conn.close()
    lines = [f"Machine: {platform.node()}, {os.cpu_count()} cores; {args.jobs} digits-cnn compress jobs per mode, "
             "one worker process; every job on one thread.", "",
             "| mode | wall time | jobs per minute | × the serial throughput |", "|---|---|---|---|"]
    serial = None
    try:
        for label, env in MODES.items():
            home = work / label.split(",")[0].split(" ")[0].lower() / str(len(lines))
            shutil.copytree(template, home)
            db = api.connect(home)
            ids = [api.submit_compress(db, "digits-cnn", recipe)["job_id"] for recipe in recipes(args.jobs)]
            began = time.perf_counter()
            worker = start_worker(home, env)
            try:
                while any(q.get_job(db, i)["status"] in q.ACTIVE for i in ids):
                    time.sleep(0.2)
            finally:
                stop(worker)
            seconds = time.perf_counter() - began
            statuses = [q.get_job(db, i)["status"] for i in ids]
            assert statuses.count("succeeded") == len(ids), statuses
            serial = serial or seconds
            lines.append(f"| {label} | {seconds:.1f} s | {60 * len(ids) / seconds:.1f} | {serial / seconds:.2f} |")
            print(lines[-1], flush=True)
            db.conn.close()
        lines += ["", "A 7-trial Optuna search (prune.structured.amount and prune.magnitude.amount, goal front):", "",
                  "| mode | wall time | × the one-at-a-time search |", "|---|---|---|"]
        serial = None
        for label, env in SEARCH_MODES.items():
            home = work / f"search-{len(lines)}"
            shutil.copytree(template, home)
            db = api.connect(home)
            worker = start_worker(home, env)
            try:
                while not q.live_workers(db):
                    time.sleep(0.2)
                began = time.perf_counter()
                found = api.start_search(db, "digits-cnn", {}, ["prune.structured.amount", "prune.magnitude.amount"],
                                         None, 7, goal="front")
                while api.get_search(db, found["id"])["status"] == "running":
                    time.sleep(0.2)
                seconds = time.perf_counter() - began
            finally:
                stop(worker)
            serial = serial or seconds
            lines.append(f"| {label} | {seconds:.1f} s | {serial / seconds:.2f} |")
            print(lines[-1], flush=True)
            db.conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "scale_out.md").write_text("# Scaling out\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
