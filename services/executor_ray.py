"""The Ray executor (EXPLORER_EXECUTOR=ray): each claimed job runs as a Ray task on a cluster.

The worker stays the one process that claims jobs and writes the database; a Ray task only does the
work (services.engine.runner.run_job) and returns its result, so a remote node never opens SQLite.
The task reads and writes artifacts under the data folder, which every node must see at the same
path (one machine, or a shared file system; EXPLORER_SHARED_HOME names it when it is mounted
elsewhere than the worker's EXPLORER_HOME).

- `RAY_ADDRESS` joins an existing cluster (`ray start --head`, then `ray start --address=…` on the
  others); without it the worker starts a local Ray on this machine.
- Each task declares `num_cpus` (EXPLORER_RAY_CPUS_PER_JOB, default 1) and runs torch and ONNX
  Runtime with that many threads, so jobs in flight together do not fight over cores; a recipe's
  `gpus` becomes the task's `num_gpus` (a cluster with no GPU at all fails such a job at once, with
  the reason, instead of leaving it pending).
- A local Ray started by the worker keeps its session files (logs, sockets, object spill) in
  EXPLORER_HOME/ray, and its token for Ray's token authentication in EXPLORER_HOME/ray/auth_token
  (Ray's default would be /tmp/ray and ~/.ray): nothing is written outside the data folder. Unix
  sockets allow 107 bytes, so a data folder with a very long path falls back to a short temporary
  folder for the session files, and the worker says so.
- Ray keeps its worker processes between tasks, so torch, ONNX Runtime and the task's data stay
  loaded (a fresh process per task, `max_calls=1`, made 2 jobs in flight only 1.25x the serial
  throughput on digits-cnn, against 1.95x for the local executor); a process runs one task at a time,
  so killing it stops exactly one job. EXPLORER_RAY_FRESH_PROCESS=1 restores a process per task.
- Progress goes through one small Ray queue actor per executor, tagged with the job id, kept on the
  worker's own node so that a dying worker node cannot take it down.
- Cancel is `ray.cancel(force=True)`. A task whose process or node died comes back as a retryable
  outcome: the worker queues the job again within its attempt budget, then fails it with the reason.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from services.executors import Outcome

CPUS_PER_JOB = int(os.environ.get("EXPLORER_RAY_CPUS_PER_JOB", "1"))
# Ray's longest socket path under its temporary folder: session_<date>_<time>_<micro>_<pid>/sockets/plasma_store;
# AF_UNIX paths may hold 107 bytes.
SOCKET_PATH_ROOM = 107 - len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def local_ray_files(home: Path) -> str:
    """Prepare a local Ray's files inside the data folder; return its temporary folder (`_temp_dir`).

    Token authentication stays on (Ray's default for a local cluster), but its token lives in
    EXPLORER_HOME/ray/auth_token instead of ~/.ray (unless the environment names a token already)."""
    folder = Path(home).resolve() / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = folder / "auth_token"
        if not token.exists():
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    if len(str(folder)) <= SOCKET_PATH_ROOM:
        return str(folder)
    short = tempfile.mkdtemp(prefix="explorer-ray-")
    print(f"The data folder's path is too long for Ray's sockets ({len(str(folder))} > {SOCKET_PATH_ROOM} characters): "
          f"Ray's session files go to {short} instead of {folder}.", file=sys.stderr, flush=True)
    return short


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
    import ray

    context = ray.get_runtime_context()
    where = {"executor": "ray", "node": socket.gethostname(), "node_id": context.get_node_id(), "pid": os.getpid(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    events.put({"job": job["id"], "type": "started", **where})

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
        result["run"]["runner"] = {"executor": "ray", "node": where["node"], "node_id": where["node_id"]}
        if where["gpu_ids"]:
            result["run"]["runner"]["gpu_ids"] = where["gpu_ids"]
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


def connect(home: Path) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local Ray on this machine (its files in the data folder,
    sized by EXPLORER_RAY_CPUS, default its cores, and EXPLORER_RAY_GPUS); nothing when Ray is running."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    from services.executors import PROJECT_ROOT

    # the tasks import this project: its folder on their path, on every node (same checkout path)
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
               "runtime_env": {"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}}}
    if not address:
        options["num_cpus"] = int(os.environ.get("EXPLORER_RAY_CPUS", os.cpu_count() or 1))
        if os.environ.get("EXPLORER_RAY_GPUS"):
            options["num_gpus"] = int(os.environ["EXPLORER_RAY_GPUS"])
        options["_temp_dir"] = local_ray_files(home)
    ray.init(address=address or None, **options)


def gpus_asked(job: dict) -> float:
    from services.engine.device import gpus_asked as recipe_gpus

    return recipe_gpus((job.get("payload") or {}).get("recipe"))


class RefusedJobHandle:
    """A job the cluster cannot run at all (it asks for more GPUs than the cluster has): it ends at once
    with the reason, instead of a Ray task pending until someone notices."""

    def __init__(self, job: dict, reason: str):
        self.job, self.reason, self.started = job, reason, None

    def poll_events(self) -> list[dict]:
        return []

    def finished(self) -> bool:
        return True

    def cancel(self) -> None:
        pass

    def outcome(self) -> Outcome:
        return Outcome(None, self.reason)


class RayExecutor:
    """Jobs as Ray tasks on the cluster at RAY_ADDRESS, or on a local Ray."""
    name = "ray"

    def __init__(self, home: Path):
        import ray
        from ray.util.queue import Queue

        self.home = Path(home)
        self.shared_home = os.environ.get("EXPLORER_SHARED_HOME") or str(self.home.resolve())
        connect(self.home)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # the progress queue lives on the worker's own node: a worker node that dies cannot take it along
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
        gpus = gpus_asked(job)
        if gpus:
            import ray

            available = ray.cluster_resources().get("GPU", 0)
            if available < gpus:
                return RefusedJobHandle(job, f"The recipe asks for {gpus:g} GPU(s) (gpus), and the Ray cluster has "
                                             f"{available:g}: start a node with a GPU (ray start --address=… "
                                             f"--num-gpus=1), or remove 'gpus' from the recipe.")
        ref = self._task.options(num_gpus=gpus).remote(job, model, self.shared_home, self.events, CPUS_PER_JOB)
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
