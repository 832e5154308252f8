"""Executors run one claimed job somewhere and report back; the worker does the bookkeeping.

The interface is small so that a distributed executor (Ray, services/executor_ray.py) sits beside
the local one: `start(job)` returns a handle with `poll_events()`, `finished()`, `outcome()` and
`cancel()`.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    result: dict | None
    reason: str | None  # why it failed, in plain words (None when it succeeded)
    model_update: dict | None = None  # for a failure that leaves the model unusable
    retry: bool = False  # the process or node running it died: worth another attempt


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the worker dies, so no orphan is left."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalJobHandle:
    def __init__(self, job: dict, home: Path, log_path: Path):
        read_fd, write_fd = os.pipe()
        threads = os.environ.get("EXPLORER_TORCH_THREADS", "1")
        env = {**os.environ, "EXPLORER_HOME": str(home), "EXPLORER_EVENT_FD": str(write_fd),
               "PYTHONUNBUFFERED": "1",
               # Small models train fastest on one thread, and a job must not oversubscribe the cores
               # that the web process, other workers and the timing runs share (torch reads these).
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               # With more than one thread on shared cores, OpenMP's spinning wait made training 5-20x
               # slower (bench/recovery.py); a passive wait costs nothing measurable on a quiet machine.
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               # Libraries' caches (ONNX Runtime writes one on import) stay inside the data folder.
               "XDG_CACHE_HOME": str(Path(home) / "cache"), "HF_HOME": str(Path(home) / "cache" / "huggingface"),
               # Temporary files, and files a library drops in its working folder (ONNX Runtime's shape
               # inference writes beside it), land in the data folder too, never in the project.
               "TMPDIR": str(Path(home) / "tmp"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        (Path(home) / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.engine.runner", job["id"]],
            cwd=Path(home) / "tmp", env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), start_new_session=True, preexec_fn=_die_with_parent)
        os.close(write_fd)
        self._events: queue.Queue = queue.Queue()
        self._result: dict | None = None
        self._reason: str | None = None
        self._model_update: dict | None = None
        self.cancelled = False
        self._reader = threading.Thread(target=self._read_events, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read_events(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r") as stream:
            for line in stream:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("type") == "result":
                    self._result = event["result"]
                elif event.get("type") == "error":
                    self._reason = event["reason"]
                    self._model_update = event.get("model_update")
                else:
                    self._events.put(event)

    def poll_events(self) -> list[dict]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def finished(self) -> bool:
        return self.process.poll() is not None

    def wait(self, timeout: float | None = None) -> None:
        self.process.wait(timeout)

    def cancel(self) -> None:
        """Stop the work for real: SIGTERM the child's process group, then SIGKILL."""
        self.cancelled = True
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        self._log.close()

    def outcome(self) -> Outcome:
        self.process.wait()
        self._close()
        code = self.process.returncode
        if code == 0 and self._result is not None:
            return Outcome(self._result, None)
        if self._reason:
            return Outcome(None, self._reason, self._model_update)
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
            return Outcome(None, f"The job's process was killed by {name}{hint} before it finished.")
        return Outcome(None, f"The job's process exited with code {code} before it finished; "
                             f"its log is {self.log_path.name}. Last line: {_last_line(self.log_path)}")


def _last_line(path: Path) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


class LocalExecutor:
    """Each job in a fresh child process on this machine."""
    name = "local"

    def __init__(self, home: Path):
        self.home = Path(home)

    def start(self, job: dict) -> LocalJobHandle:
        log_dir = self.home / "artifacts" / "jobs" / job["id"]
        log_dir.mkdir(parents=True, exist_ok=True)
        return LocalJobHandle(job, self.home, log_dir / f"attempt-{job['attempts']}.log")


def make_executor(home: Path):
    name = os.environ.get("EXPLORER_EXECUTOR", "local")
    if name == "local":
        return LocalExecutor(home)
    if name == "ray":
        from services.executor_ray import RayExecutor

        return RayExecutor(home)
    raise ValueError(f"EXPLORER_EXECUTOR={name!r} is not available; use 'local' or 'ray'.")
