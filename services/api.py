"""Everything the UI and the CLI may ask. No torch here: the web process imports this module.

Every function takes the database first (a sqlite-utils Database from `storage.open_db`), so
tests pass a fresh one and the pages pass a cached connection.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from services.catalog import BUILTIN_MODELS, MODEL_TASKS, TASKS
from services.engine.methods import REGISTRY
from services.errors import UserError
from services.recipes import load_recipe_text, validate_recipe
from storage import open_db, utcnow
from storage import queue as q

METRIC_KEYS = ("size_bytes", "zipped_bytes", "params", "nonzero_params", "latency_ms", "batch_latency_ms",
               "throughput_per_s", "score", "score_name", "fidelity")


def connect(home=None):
    db = open_db(home)
    ensure_builtin_models(db)
    return db


def ensure_builtin_models(db) -> None:
    now = utcnow()
    for model_id, spec in BUILTIN_MODELS.items():
        db.execute(
            """INSERT OR IGNORE INTO models (id, name, source, format, task, description, status, created_at, updated_at)
               VALUES (?, ?, 'builtin', ?, ?, ?, 'new', ?, ?)""",
            [model_id, spec["name"], spec["format"], spec["task"], spec["description"], now, now])


# ---- models -------------------------------------------------------------------------------

def _model_record(row: dict) -> dict:
    row = dict(row)
    row["card"] = json.loads(row["card"]) if row.get("card") else None
    row["meta"] = json.loads(row["meta"]) if row.get("meta") else None
    row["tasks"] = list(dict.fromkeys(MODEL_TASKS.get(row["id"], [row["task"], "fidelity"])))
    return row


def list_models(db) -> list[dict]:
    return [_model_record(r) for r in db.query("SELECT * FROM models ORDER BY source, id")]


def get_model(db, model_id: str) -> dict:
    rows = list(db.query("SELECT * FROM models WHERE id = ?", [model_id]))
    if not rows:
        known = ", ".join(r["id"] for r in db.query("SELECT id FROM models ORDER BY id"))
        raise UserError(f"Unknown model {model_id!r}; known models: {known}.", field="model")
    return _model_record(rows[0])


def prepare_model(db, model_id: str) -> str | None:
    """Queue the job that trains/exports a model and computes its card, unless one is on its way."""
    model = get_model(db, model_id)
    if model["status"] == "ready":
        return None
    with q.immediate(db):  # check and insert at once: two pages opened together queue one job
        active = list(db.query("SELECT id FROM jobs WHERE model_id = ? AND kind = 'prepare' AND status IN "
                               "('queued', 'running') LIMIT 1", [model_id]))
        if active:
            return active[0]["id"]
        return q.enqueue(db, "prepare", model_id, {"model_id": model_id})


# ---- methods and recipes ------------------------------------------------------------------

def list_methods() -> list[dict]:
    return [method.schema() for method in REGISTRY.values()]


def list_tasks() -> dict:
    return TASKS


def recovery_options(db, model_id: str, task: str) -> list[dict]:
    """Every recovery objective: whether this model and its data allow it, and if not, why (a sentence)."""
    from services.catalog import architecture_of
    from services.engine.objectives import OBJECTIVES, why_not
    from services.recovery_recipe import RECOVERY_OBJECTIVES, labels_available, output_kind_of

    model = get_model(db, model_id)
    labelled, kind, architecture = labels_available(model, task), output_kind_of(model), architecture_of(model)
    return [{"name": o.name, "title": o.title, "explanation": o.explanation, "needs_labels": o.needs_labels,
             "reason": why_not(o.name, architecture, kind, labelled)}
            for o in OBJECTIVES.values() if o.name in RECOVERY_OBJECTIVES]


def recovery_helpers(db, model_id: str) -> list[dict]:
    """The training-only self-supervised helpers (`recovery.aux`) this model can use, each explained."""
    from services.catalog import architecture_of
    from services.engine.aux_heads import AUX_HELPERS, helpers_for

    return [{"name": name, "explanation": AUX_HELPERS[name][1]}
            for name in helpers_for(architecture_of(get_model(db, model_id)))]


def selection_strategies() -> list[dict]:
    """How `recovery.selection` can choose the samples a label budget pays for, each explained."""
    from services.engine.selection import EXPLANATIONS, STRATEGIES

    return [{"name": name, "explanation": EXPLANATIONS[name]} for name in STRATEGIES]


def recovery_params() -> list[dict]:
    from services.recovery_recipe import RECOVERY_PARAMS

    return [p.schema() for p in RECOVERY_PARAMS]


def check_recipe(db, model_id: str, recipe) -> dict:
    """Validate a recipe (dict or JSON/YAML text or a file path) for a model; returns it completed,
    with `skip_sensitive: N` resolved to the layer names of the latest sensitivity scan."""
    model = get_model(db, model_id)
    if isinstance(recipe, str):
        recipe = load_recipe_text(recipe)
    clean = validate_recipe(recipe, model, model["tasks"])
    for index, step in enumerate(clean["steps"]):
        wanted = step["params"].get("skip_sensitive", 0)
        if not wanted:
            continue
        method = REGISTRY[step["method"]]
        scan = latest_scan(db, model_id, step["method"])
        if scan is None:
            raise UserError(f"Step {index + 1} ({step['method']}): skip_sensitive needs a sensitivity scan of "
                            f"{step['method']} on {model_id}; run one first (Compress page, 'Scan layers').",
                            field=f"steps.{index}.skip_sensitive")
        if wanted > len(scan["layers"]):
            raise UserError(f"Step {index + 1} ({step['method']}): skip_sensitive is {wanted}, but the latest scan "
                            f"found only {len(scan['layers'])} layers.", field=f"steps.{index}.skip_sensitive")
        sensitive = [row["layer"] for row in scan["layers"][:wanted]]
        kept = step["params"][method.skip_param]
        step["params"][method.skip_param] = kept + [name for name in sensitive if name not in kept]
    return clean


# ---- sensitivity scans --------------------------------------------------------------------

def submit_sensitivity(db, model_id: str, method_name: str, params: dict | None = None,
                       task: str | None = None) -> dict:
    """Queue a per-layer scan: each layer compressed alone with `params`, scored on the fitting split."""
    model = get_model(db, model_id)
    method = REGISTRY.get(method_name)
    if method is None:
        raise UserError(f"Unknown method {method_name!r}; known methods: {', '.join(sorted(REGISTRY))}.",
                        field="method")
    if not method.scannable:
        scannable = [name for name, m in REGISTRY.items() if m.scannable]
        raise UserError(f"{method_name} has no per-layer scan; these methods do: {', '.join(scannable)}.",
                        field="method")
    params = {k: v for k, v in (params or {}).items() if k not in ("skip_sensitive", method.skip_param)}
    clean = validate_recipe({"task": task, "steps": [{"method": method_name, "params": params}]}, model,
                            model["tasks"])
    step_params = clean["steps"][0]["params"]
    job_id = q.enqueue(db, "sensitivity", model_id,
                       {"method": method_name, "params": step_params, "task": clean["task"]})
    return {"job_id": job_id, "status": "queued", "method": method_name, "params": step_params,
            "task": clean["task"]}


def _scan_record(row: dict) -> dict:
    return {"job_id": row["job_id"], "model_id": row["model_id"], "method": row["method"], "task": row["task"],
            "params": json.loads(row["params"]), "layers": json.loads(row["layers"]),
            "summary": json.loads(row["summary"]), "created_at": row["created_at"]}


def latest_scan(db, model_id: str, method_name: str) -> dict | None:
    rows = list(db.query("SELECT * FROM scans WHERE model_id = ? AND method = ? ORDER BY created_at DESC, "
                         "rowid DESC LIMIT 1", [model_id, method_name]))
    return _scan_record(rows[0]) if rows else None


def list_scans(db, model_id: str | None = None) -> list[dict]:
    where, args = ("WHERE model_id = ?", [model_id]) if model_id else ("", [])
    return [_scan_record(row) for row in db.query(f"SELECT * FROM scans {where} ORDER BY created_at DESC", args)]


def submit_compress(db, model_id: str, recipe) -> dict:
    clean = check_recipe(db, model_id, recipe)
    run_id = q.new_id()
    job_id = q.enqueue(db, "compress", model_id, {"recipe": clean, "run_id": run_id})
    return {"job_id": job_id, "run_id": run_id, "status": "queued", "share_path": f"/result?id={run_id}",
            "recipe": clean}


# ---- jobs ---------------------------------------------------------------------------------

def _check_page(limit: int, offset: int) -> None:
    if limit < 1 or offset < 0:
        raise UserError(f"--limit must be at least 1 and --offset at least 0; got {limit} and {offset}.")


def list_jobs(db, status: str | None = None, limit: int = 100, offset: int = 0, model_id: str | None = None):
    _check_page(limit, offset)
    if status and status not in (*q.ACTIVE, *q.FINISHED):
        raise UserError(f"Unknown status {status!r}; use one of {', '.join((*q.ACTIVE, *q.FINISHED))}.")
    return q.list_jobs(db, status=status, limit=limit, offset=offset, model_id=model_id)


def get_job(db, job_id: str) -> dict:
    job = q.get_job(db, job_id)
    if job is None:
        raise UserError(f"Unknown job {job_id!r}.", field="job")
    return job


def cancel_job(db, job_id: str) -> dict:
    get_job(db, job_id)
    q.request_cancel(db, job_id)
    return get_job(db, job_id)


def worker_alive(db) -> bool:
    """Someone heartbeated within one lease: a worker killed without notice stops counting then."""
    from services.worker import LEASE_S

    return bool(q.live_workers(db, within_s=LEASE_S))


def wait_for_job(db, job_id: str, timeout_s: float = 600.0) -> dict:
    """Run a job to its end: let a running worker do it, or work inline when none is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q.reap_expired(db)  # a job held by a dead worker comes back to the queue, as a worker would do
        job = get_job(db, job_id)
        if job["status"] in q.FINISHED:
            return job
        if job["status"] == "queued" and not worker_alive(db):
            from services.worker import Worker  # the worker starts jobs in child processes; no torch here

            worker = Worker(db=db)
            claimed = q.claim(db, worker.id, job_id=job_id)
            if claimed:
                q.register_worker(db, worker.id, 0, "inline")
                try:
                    worker.run_claimed(claimed)
                finally:
                    q.unregister_worker(db, worker.id)
                continue
        time.sleep(0.3)
    raise UserError(f"Job {job_id} did not finish within {timeout_s:.0f} s; it is still {job['status']}.")


# ---- runs ---------------------------------------------------------------------------------

def _run_record(row: dict, home) -> dict:
    return {
        "id": row["id"],
        "status": "succeeded",
        "job_id": row["job_id"],
        "model_id": row["model_id"],
        "recipe": json.loads(row["recipe"]),
        "metrics": json.loads(row["metrics"]),
        "baseline": json.loads(row["baseline"]),
        "runner": json.loads(row["runner"]),
        "artifact": str(Path(home) / row["artifact"]),  # absolute: scripts may run from anywhere
        # files the model needs beside it (a trimmed vocabulary's tokenizer.json), absolute as well
        "files": {name: str(Path(home) / path) for name, path in json.loads(row["metrics"]).get("files", {}).items()},
        "created_at": row["created_at"],
        "share_path": f"/result?id={row['id']}",
    }


def list_runs(db, model_id: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
    _check_page(limit, offset)
    if model_id:
        get_model(db, model_id)
        rows = db.query("SELECT * FROM runs WHERE model_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                        [model_id, limit, offset])
    else:
        rows = db.query("SELECT * FROM runs ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?", [limit, offset])
    return [_run_record(r, db.home) for r in rows]


def count_runs(db, model_id: str) -> int:
    return db.execute("SELECT count(*) FROM runs WHERE model_id = ?", [model_id]).fetchone()[0]


def get_run(db, run_id: str) -> dict:
    """A run's record; for a run still being made, its job's status and no metrics yet."""
    rows = list(db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
    if rows:
        return _run_record(rows[0], db.home)
    jobs = list(db.query("SELECT * FROM jobs WHERE run_id = ?", [run_id]))
    if not jobs:
        raise UserError(f"Unknown run {run_id!r}.", field="run")
    job = q.get_job(db, jobs[0]["id"])
    return {"id": run_id, "status": job["status"], "job_id": job["id"], "model_id": job["model_id"],
            "recipe": job["payload"]["recipe"], "metrics": None, "baseline": None, "runner": job.get("runner"),
            "artifact": None, "error": job.get("error"), "share_path": f"/result?id={run_id}"}


def artifact_bytes(db, run: dict) -> bytes:
    from storage import ArtifactStore

    return ArtifactStore(db.home).resolve(run["artifact"]).read_bytes()


def run_file_bytes(db, run: dict, name: str) -> bytes:
    """A file a run keeps beside its model (a trimmed vocabulary's tokenizer.json)."""
    from storage import ArtifactStore

    return ArtifactStore(db.home).resolve(run["files"][name]).read_bytes()


def hub_folder(db, run_id: str) -> dict[str, bytes]:
    """The run as a Hub-ready folder: model.onnx, recipe.json, metrics.json, README.md (the model
    card, metrics in model-index metadata) and tokenizer.json when the run has one."""
    from services import hub

    run = get_run(db, run_id)
    return hub.folder_files(run, get_model(db, run["model_id"]), lambda r: artifact_bytes(db, r),
                            lambda r, name: run_file_bytes(db, r, name))


def hub_zip(db, run_id: str) -> bytes:
    from services import hub

    return hub.folder_zip(hub_folder(db, run_id))


def publish_to_hub(db, run_id: str, repo_id: str, token: str, endpoint: str | None = None) -> str:
    from services import hub

    scratch = Path(db.home) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    return hub.publish(hub_folder(db, run_id), repo_id.strip(), token.strip(), scratch,
                       endpoint or os.environ.get("EXPLORER_HF_ENDPOINT") or None)


def ratios(metrics: dict, baseline: dict) -> dict:
    """How the run compares with the baseline: >1 means smaller / faster, as a user reads it."""
    def safe(a, b):
        return (a / b) if a and b else None

    return {
        "size_x_smaller": safe(baseline["size_bytes"], metrics["size_bytes"]),
        "zipped_x_smaller": safe(baseline["zipped_bytes"], metrics["zipped_bytes"]),
        "params_x_fewer": safe(baseline["params"], metrics["params"]),
        "nonzero_x_fewer": safe(baseline["nonzero_params"], metrics["nonzero_params"]),
        "latency_x_faster": safe(baseline["latency_ms"]["p50"], metrics["latency_ms"]["p50"]),
        "throughput_x": safe(metrics["throughput_per_s"], baseline["throughput_per_s"]),
        "score_delta": metrics["score"] - baseline["score"],
    }


def summary_sentence(metrics: dict, baseline: dict) -> str:
    """One plain sentence: '4.1x smaller (zipped 6.0x), 1.9x faster, accuracy -0.4 points'."""
    r = ratios(metrics, baseline)
    size = _times(r["size_x_smaller"], "smaller", "larger", "the same size")
    if abs(r["zipped_x_smaller"] - r["size_x_smaller"]) > 0.2:
        size += f" ({r['zipped_x_smaller']:.1f}x smaller zipped)"
    speed_text = _times(r["latency_x_faster"], "faster", "slower", "about as fast")
    points = 100 * r["score_delta"]
    return f"{size}, {speed_text} at batch 1, {metrics['score_name']} {points:+.1f} points"


def _times(ratio: float, better: str, worse: str, same: str) -> str:
    if abs(ratio - 1) < 0.05:
        return same
    return f"{ratio:.1f}x {better}" if ratio > 1 else f"{1 / ratio:.1f}x {worse}"


# Sweeps of a once-for-all rate and rate searches live in services/api_rates.py; the UI and the CLI
# call them here, as everything else.
from services.api_rates import (  # noqa: E402  (after the names api_rates calls back into)
    SEARCH_GOALS, SWEEP_KEEPS, SWEEP_RATES, get_search, list_searches, rate_curves, score_change_words,
    search_rates, start_search, submit_rate_sweep, wait_for_search)

# Label budgets (active learning): what a run labelled and the score against labels, services/api_labels.py.
from services.api_labels import label_curve, labelled_samples, submit_label_sweep  # noqa: E402

# The user's own models and data sets (uploads, Hub imports): services/api_uploads.py.
from services.api_uploads import (  # noqa: E402
    get_dataset, import_dataset, import_dataset_file, import_model, list_datasets, max_upload_mb,
    method_applicability, onnx_inputs)
