"""Shared fixtures: a fresh data folder per test, a digits-cnn prepared once per session, and
helpers that run the real CLI and the real worker as subprocesses.

Every test gets its own EXPLORER_HOME under tmp_path, so tests never share a database. Training
digits-cnn costs a few seconds, so it happens once (`_prepared_template`) and each test that
needs a ready model copies that folder (`prepared_home`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # `pytest` run without `-m` still finds storage/ and services/
    sys.path.insert(0, str(PROJECT_ROOT))

# Short timing phases keep every compress job fast. Set at import so the engine modules (which
# read them when imported) and every child process of the worker see the same values.
os.environ["EXPLORER_BENCH_REPEATS"] = "20"
os.environ["EXPLORER_BENCH_BATCH_REPEATS"] = "5"
os.environ["EXPLORER_BENCH_WARMUP"] = "5"
os.environ["EXPLORER_BENCH_SECONDS"] = "1"
os.environ.pop("EXPLORER_EXECUTOR", None)

QUANTIZE = {"steps": [{"method": "quantize.dynamic"}]}
PRUNE_80 = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.8}}]}


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; returns that value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_cli(*args: str, home: Path, timeout: float = 180, extra_env: dict | None = None):
    """`python -m services ARGS` in the project folder with EXPLORER_HOME=home."""
    env = {**os.environ, "EXPLORER_HOME": str(home), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "services", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused_cleanly(db, home: Path, call, *phrases: str) -> str:
    """The call raises one sentence containing the phrases; no uploaded model row, no job and nothing
    under uploads/ is left behind. Returns the sentence."""
    from services.errors import UserError

    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.endswith("."), message
    for phrase in phrases:
        assert phrase in message, message
    assert list(db.query("SELECT id FROM models WHERE source = 'upload'")) == []
    assert list(db.query("SELECT id FROM jobs")) == []
    uploads = home / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == [], list(uploads.iterdir())
    return message


def run_cli_json(*args: str, home: Path, timeout: float = 180):
    done = run_cli(*args, home=home, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}; stderr:\n{done.stderr}"
    return json.loads(done.stdout)


def runner_processes(job_id: str | None = None) -> list[psutil.Process]:
    """Live job child processes (`python -m services.engine.runner JOB_ID`), optionally for one job."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "services.engine.runner" not in cmdline:
            continue
        if job_id is not None and job_id not in cmdline:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        found.append(proc)
    return found


def process_gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _prepare_into(home: Path) -> None:
    done = run_cli("models", "prepare", "digits-cnn", "--wait", "--json", home=home, timeout=300)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    assert model["status"] == "ready", model


@pytest.fixture(scope="session")
def _prepared_template(tmp_path_factory) -> Path:
    """A data folder where digits-cnn is trained, exported and measured: made once per session."""
    home = tmp_path_factory.mktemp("prepared-template") / "home"
    _prepare_into(home)
    return home


DIGITS_ROW = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
              "artifact": None}


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    """digits-cnn prepared in-process by the real engine (`pipeline.prepare`) once per session, for the
    method tests: `home` (do not write to it: copy it, see `digits_store`), `store`, the ready model row
    `model` and its ONNX file `onnx`."""
    from types import SimpleNamespace

    from services.engine import pipeline
    from storage import ArtifactStore

    home = tmp_path_factory.mktemp("digits-prepared") / "home"
    store = ArtifactStore(home)
    result = pipeline.prepare(store, dict(DIGITS_ROW), lambda fraction, message: None)
    model = {**DIGITS_ROW, **result["model_update"]}
    return SimpleNamespace(home=home, store=store, model=model, onnx=store.resolve(model["artifact"]))


def ray_worker_in_thread(db):
    """A worker with the Ray executor serving in a thread of this test process (the Ray driver), registered
    before it is yielded (else wait_for_job would run a job inline, not on Ray); stopped at the end."""
    import threading

    from services import api
    from services.executor_ray import RayExecutor
    from services.worker import Worker
    from storage import queue as q

    worker = Worker(db=api.connect(db.home), executor=RayExecutor(db.home))
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    wait_until(lambda: any(w["id"] == worker.id for w in q.live_workers(db)), timeout=60,
               what="the worker to register")
    yield worker
    worker.stopping = True
    thread.join(60)


@pytest.fixture(scope="session")
def ray_home():
    """A short data folder for the Ray tests' own Ray sessions (Unix sockets allow 107 bytes, and pytest's
    tmp paths are long): its ray/ folder holds the session files and the one auth token every Ray
    started by this test process shares (Ray caches the token per process)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="xr-"))
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    yield folder
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def digits_store(digits_prepared, tmp_path):
    """This test's own copy of the prepared digits-cnn data folder, as an artifact store."""
    from storage import ArtifactStore

    folder = tmp_path / "home"
    shutil.copytree(digits_prepared.home, folder)
    return ArtifactStore(folder)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty data folder for this test, set as EXPLORER_HOME."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("EXPLORER_HOME", str(folder))
    return folder


@pytest.fixture
def prepared_home(_prepared_template, tmp_path, monkeypatch) -> Path:
    """This test's own copy of a data folder where digits-cnn is ready; set as EXPLORER_HOME."""
    folder = tmp_path / "home"
    shutil.copytree(_prepared_template, folder)
    monkeypatch.setenv("EXPLORER_HOME", str(folder))
    return folder


@pytest.fixture
def db(home):
    """A fresh database (with the built-in models registered) in this test's data folder."""
    from services import api

    database = api.connect(home)
    yield database
    database.conn.close()


@pytest.fixture
def prepared_db(prepared_home):
    from services import api

    database = api.connect(prepared_home)
    yield database
    database.conn.close()


class WorkerProcesses:
    """Starts `python -m services worker` subprocesses and always stops them (and their children)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, home: Path, lease_s: float = 2, poll_s: float = 0.2, **extra_env) -> subprocess.Popen:
        env = {**os.environ, "EXPLORER_HOME": str(home), "EXPLORER_LEASE_SECONDS": str(lease_s),
               "EXPLORER_POLL_SECONDS": str(poll_s), **{k: str(v) for k, v in extra_env.items()}}
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "services", "worker"], cwd=PROJECT_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, index: int = -1) -> str:
        return (self.tmp_path / f"worker-{index % len(self.procs)}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            try:
                descendants = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for child in descendants:  # job children this worker started, should any outlive it
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture
def workers(tmp_path):
    """Start real worker processes with `workers.start(home, ...)`; all are stopped at teardown."""
    pool = WorkerProcesses(tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()
