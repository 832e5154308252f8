"""The child process that runs one job: `python -m services.engine.runner JOB_ID`.

It reads the job from the database, does the work, and reports progress and the result as
JSON lines on the event pipe the worker gave it (EXPLORER_EVENT_FD). It never writes the
database: the worker, which holds the job's lease, is the one writer of job state.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

from services.errors import StaleModelError, UserError


def _emitter():
    fd = int(os.environ.get("EXPLORER_EVENT_FD", "1"))
    stream = os.fdopen(fd, "w", buffering=1, closefd=False)

    def emit(event: dict) -> None:
        stream.write(json.dumps(event) + "\n")
        stream.flush()

    return emit


def run_job(job: dict, model: dict, home, progress) -> dict:
    """Do one job's work and return its result (a run, a model card, a scan). Reads and writes only
    the artifact folder under `home`, never the database: the local child and a Ray task share it."""
    from storage import ArtifactStore
    from services.engine import device, pipeline

    store = ArtifactStore(home)
    if job["kind"] == "prepare":
        return pipeline.prepare(store, model, progress)
    if job["kind"] == "compress":
        payload = job["payload"]
        if device.gpus_asked(payload["recipe"]):
            import socket

            with device.training_on(device.require_gpu(f"on {socket.gethostname()}")):
                return pipeline.compress(store, model, payload["recipe"], payload["run_id"], progress)
        return pipeline.compress(store, model, payload["recipe"], payload["run_id"], progress)
    if job["kind"] == "sensitivity":
        from services.engine import sensitivity

        return sensitivity.scan(store, model, job["payload"], job["id"], progress)
    raise UserError(f"Unknown job kind {job['kind']!r}.")


def failure_event(error: BaseException) -> dict:
    """The error event for an exception: the reason in words (a fault's traceback goes to the log)."""
    if isinstance(error, StaleModelError):
        return {"type": "error", "reason": str(error), "model_update": {"status": "new"}}
    if isinstance(error, UserError):
        return {"type": "error", "reason": str(error)}
    traceback.print_exception(error)
    return {"type": "error", "reason": f"The job failed inside the engine: {type(error).__name__}: {error}"}


def main(job_id: str) -> int:
    emit = _emitter()
    try:
        # torch is imported only by the jobs that need it (an ONNX upload does not); the worker sets
        # OMP_NUM_THREADS for it.
        from storage import open_db
        from storage.queue import get_job

        db = open_db()
        job = get_job(db, job_id)
        model = dict(next(db.query("SELECT * FROM models WHERE id = ?", [job["model_id"]])))
        home = db.home
        db.conn.close()

        def progress(fraction: float, message: str) -> None:
            emit({"type": "progress", "progress": round(float(fraction), 4), "message": message})

        emit({"type": "result", "result": run_job(job, model, home, progress)})
        return 0
    except Exception as error:  # noqa: BLE001 - every failure becomes a reason the worker stores
        event = failure_event(error)
        emit(event)
        return 3 if isinstance(error, UserError) else 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
