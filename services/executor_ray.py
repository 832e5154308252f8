"""The Ray executor (EXPLORER_EXECUTOR=ray): each claimed job runs as a Ray task on a cluster.

The worker stays the one process that claims jobs and writes the database; a Ray task only does the
work (services.engine.runner.run_job) and returns its result, so a remote node never opens SQLite.
The task reads and writes artifacts under the data folder, which every node must see at the same
path (one machine, or a shared file system; EXPLORER_SHARED_HOME names it when it is mounted
elsewhere than the worker's EXPLORER_HOME).

- `RAY_ADDRESS` joins an existing cluster (`ray start --head`, then `ray start --address=…` on the
  others); without it the worker starts a local Ray on this machine.
- Each task declares `num_cpus` (EXPLORER_RAY_CPUS_PER_JOB, default 1) and runs torch and ONNX
  Runtime with that many threads, so jobs in flight together do not fight over cores. No recipe asks
  for a GPU yet, so `num_gpus` stays 0.
- Ray keeps its worker processes between tasks, so torch, ONNX Runtime and the task's data stay
  loaded (a fresh process per task, `max_calls=1`, made 2 jobs in flight only 1.25x the serial
  throughput on digits-cnn, against 1.95x for the local executor); a process runs one task at a time,
  so killing it stops exactly one job. EXPLORER_RAY_FRESH_PROCESS=1 restores a process per task.
- Progress goes through one small Ray queue actor per executor, tagged with the job id.
- Cancel is `ray.cancel(force=True)`. A task whose process or node died comes back as a retryable
  outcome: the worker queues the job again within its attempt budget, then fails it with the reason.
"""
from __future__ import annotations

import os
import socket
from collections import defaultdict
from pathlib import Path

from services.executors import Outcome

CPUS_PER_JOB = int(os.environ.get("EXPLORER_RAY_CPUS_PER_JOB", "1"))


def _run_task(job: dict, model: dict, home: str, events, threads: int) -> dict:
    """Runs inside a Ray worker process. Returns {"result": …} or {"error": event}, and where it ran."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["EXPLORER_HOME"] = home
    for name, folder in (("XDG_CACHE_HOME", "cache"), ("HF_HOME", "cache/huggingface"), ("TMPDIR", "tmp")):
        os.environ[name] = str(Path(home) / folder)  # library caches and temporary files stay in the data folder
    (Path(home) / "tmp").mkdir(parents=True, exist_ok=True)
    os.chdir(Path(home) / "tmp")
    where = {"executor": "ray", "node": socket.gethostname(), "pid": os.getpid()}
    events.put({"job": job["id"], "type": "started", "pid": os.getpid(), "node": where["node"]})

    def progress(fraction: float, message: str) -> None:
        events.put({"job": job["id"], "type": "progress", "progress": round(float(fraction), 4), "message": message})

    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    from services.engine.runner import failure_event, run_job

    try:
        result = run_job(job, model, home, progress)
    except Exception as error:  # noqa: BLE001 - every failure becomes a reason the worker stores
        return {"error": failure_event(error), "runner": where}
    if "run" in result:
        result["run"]["runner"] = {"executor": "ray", "node": where["node"]}
    return {"result": result, "runner": where}


class RayJobHandle:
    def __init__(self, executor: "RayExecutor", job: dict, ref):
        self.executor, self.job, self.ref = executor, job, ref
        self.cancelled = False
        self.started: dict | None = None  # the task's process and node, once it reports in

    def poll_events(self) -> list[dict]:
        events = self.executor.events_for(self.job["id"])
        for event in events:
            if event["type"] == "started":
                self.started = event
        return [e for e in events if e["type"] == "progress"]

    def finished(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def cancel(self) -> None:
        import ray

        self.cancelled = True
        try:
            ray.cancel(self.ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone: nothing left to stop
            pass
        self.executor.forget(self.job["id"])

    def outcome(self) -> Outcome:
        import ray
        from ray import exceptions

        try:
            answer = ray.get(self.ref)
        except exceptions.TaskCancelledError:
            return Outcome(None, "The job was cancelled.")
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError,
                exceptions.OwnerDiedError, exceptions.ActorDiedError, exceptions.LocalRayletDiedError) as error:
            return Outcome(None, f"The Ray worker process running the job died ({type(error).__name__}) before it "
                                 f"finished.", retry=True)
        except exceptions.RayTaskError as error:
            return Outcome(None, f"The job failed inside its Ray task: {error.cause!r}"[:1000])
        finally:
            self.executor.forget(self.job["id"])
        if "error" in answer:
            event = answer["error"]
            return Outcome(None, event["reason"], event.get("model_update"))
        return Outcome(answer["result"], None)


class RayExecutor:
    """Jobs as Ray tasks on the cluster at RAY_ADDRESS, or on a local Ray."""
    name = "ray"

    def __init__(self, home: Path):
        import ray
        from ray.util.queue import Queue

        self.home = Path(home)
        self.shared_home = os.environ.get("EXPLORER_SHARED_HOME") or str(self.home.resolve())
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            from services.executors import PROJECT_ROOT

            # the tasks import this project: its folder on their path, on every node (same checkout path)
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                       "runtime_env": {"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}}}
            if not address:  # a local Ray on this machine, sized by EXPLORER_RAY_CPUS (default: its cores)
                options["num_cpus"] = int(os.environ.get("EXPLORER_RAY_CPUS", os.cpu_count() or 1))
            ray.init(address=address or None, **options)
        self.events = Queue(actor_options={"num_cpus": 0})
        self._buffered: dict[str, list[dict]] = defaultdict(list)
        fresh = os.environ.get("EXPLORER_RAY_FRESH_PROCESS") == "1"
        self._task = ray.remote(num_cpus=CPUS_PER_JOB, num_gpus=0, max_calls=1 if fresh else 0,
                                max_retries=0)(_run_task)

    def start(self, job: dict) -> RayJobHandle:
        from storage import open_db

        db = open_db(self.home)  # the worker's own database: the task gets the rows it needs, never the file
        try:
            model = dict(next(db.query("SELECT * FROM models WHERE id = ?", [job["model_id"]])))
        finally:
            db.conn.close()
        ref = self._task.remote(job, model, self.shared_home, self.events, CPUS_PER_JOB)
        return RayJobHandle(self, job, ref)

    def events_for(self, job_id: str) -> list[dict]:
        """Move every queued event into its job's buffer; hand out this job's."""
        while True:
            try:
                batch = self.events.get_nowait_batch(self.events.qsize())
            except Exception:  # noqa: BLE001 - empty, or the queue actor is busy: try again next poll
                batch = []
            if not batch:
                break
            for event in batch:
                self._buffered[event["job"]].append(event)
        return self._buffered.pop(job_id, [])

    def forget(self, job_id: str) -> None:
        self._buffered.pop(job_id, None)
