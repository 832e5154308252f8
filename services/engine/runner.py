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


def main(job_id: str) -> int:
    emit = _emitter()
    try:
        # torch is imported only by the jobs that need it (an ONNX upload does not); the worker sets
        # OMP_NUM_THREADS for it.
        from storage import ArtifactStore, open_db
        from storage.queue import get_job
        from services.engine import pipeline

        db = open_db()
        job = get_job(db, job_id)
        model = dict(next(db.query("SELECT * FROM models WHERE id = ?", [job["model_id"]])))
        store = ArtifactStore(db.home)
        db.conn.close()

        def progress(fraction: float, message: str) -> None:
            emit({"type": "progress", "progress": round(float(fraction), 4), "message": message})

        if job["kind"] == "prepare":
            result = pipeline.prepare(store, model, progress)
        elif job["kind"] == "compress":
            payload = job["payload"]
            result = pipeline.compress(store, model, payload["recipe"], payload["run_id"], progress)
        elif job["kind"] == "sensitivity":
            from services.engine import sensitivity

            result = sensitivity.scan(store, model, job["payload"], job_id, progress)
        else:
            raise UserError(f"Unknown job kind {job['kind']!r}.")
        emit({"type": "result", "result": result})
        return 0
    except StaleModelError as error:
        emit({"type": "error", "reason": str(error), "model_update": {"status": "new"}})
        return 3
    except UserError as error:
        emit({"type": "error", "reason": str(error)})
        return 3
    except Exception as error:  # an internal fault: the reason in words, the traceback in the log
        traceback.print_exc()
        emit({"type": "error", "reason": f"The job failed inside the engine: {type(error).__name__}: {error}"})
        return 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
