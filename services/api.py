"""Everything the UI and the CLI may ask. No torch here: the web process imports this module.

Every function takes the database first (a sqlite-utils Database from `storage.open_db`), so
tests pass a fresh one and the pages pass a cached connection.
"""
from __future__ import annotations

import json
import os
import re
import shutil
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


# ---- the user's own models -----------------------------------------------------------------
# Cheap checks here (size, zip safety, file kinds, ONNX inputs read from the wire format); the
# ONNX checker, ONNX Runtime and transformers run in the import job, never in this process.

def import_model(db, source, filename: str | None = None, name: str | None = None, task: str | None = None,
                 input_shapes=None, dataset_id: str | None = None) -> dict:
    """Store an upload under uploads/<model id>/, add its model row and queue its import job.

    source: the uploaded bytes (give filename), a path to an .onnx file, a .zip or a model folder,
    or 'hf:OWNER/NAME'. A refusal raises UserError and leaves no row and no file behind.
    """
    from services import data_fit, imports

    home = Path(db.home)
    shapes = imports.parse_input_shapes(input_shapes)
    dataset = _dataset_for_import(db, dataset_id) if dataset_id else None
    staging = None
    try:
        if isinstance(source, str) and source.strip().startswith("hf:"):
            repo = imports.parse_hf_source(source.strip())
            if imports.hub_offline() and not imports.hf_cached(home, repo):
                raise UserError(imports.no_hub_sentence(repo), field="source")
            meta = {"kind": "hf", "hf_repo": repo, "source": f"hf:{repo}"}
            default_name, description = repo.split("/")[1], f"{repo}, fetched from the Hugging Face Hub."
        else:
            staging = imports.new_staging_dir(home)
            meta, default_name, description = imports.stage_upload(source, filename, staging, shapes)
        if meta["kind"] == "hf" and shapes:
            raise UserError("Input shapes apply to ONNX models; a Hugging Face model is fed tokenized text.",
                            field="input_shapes")
        meta["input_shapes"] = shapes
        task = _import_task(task, meta["kind"], dataset)
        if dataset:  # a data set the model cannot read is refused now, before anything is stored
            data_fit.check_data_fits(meta, dataset, task, staging)
        model_id = _new_model_id(db, (name or "").strip() or default_name)
        if staging is not None:
            final = home / "uploads" / model_id
            os.replace(staging, final)  # the upload appears whole or not at all
            staging = final
            meta["folder"] = f"uploads/{model_id}"
        if dataset:
            meta["dataset"] = dataset
        job_id = _insert_upload(db, model_id, ((name or "").strip() or default_name)[:100], task, description,
                                meta, dataset_id)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"model_id": model_id, "job_id": job_id, "status": "queued"}


def _dataset_for_import(db, dataset_id: str) -> dict:
    """What the import job needs to know of the data set (kept in the model's meta): where it lies,
    its kind, and its labels (the class names of its summary) to check against the model's outputs."""
    rows = list(db.query("SELECT * FROM datasets WHERE id = ?", [dataset_id]))
    if not rows:
        raise UserError(f"Unknown data set {dataset_id!r}.", field="dataset")
    row = rows[0]
    summary = json.loads(row["summary"] or "{}") if isinstance(row["summary"], str) else (row["summary"] or {})
    record = {"id": row["id"], "name": row["name"], "kind": row["kind"], "has_labels": bool(row["has_labels"]),
              "path": row["path"]}
    if summary.get("classes"):
        record["classes"] = sorted(summary["classes"])
    if summary.get("label_type"):
        record["label_type"] = summary["label_type"]
    if (summary.get("X") or {}).get("shape"):
        record["x_shape"] = summary["X"]["shape"]
    return record


def _import_task(task: str | None, kind: str, dataset: dict | None) -> str:
    from services import data_fit

    labelled = bool(dataset and dataset["has_labels"])
    if not task:
        return "your-data" if labelled else "fidelity"
    if task not in data_fit.UPLOAD_TASKS:
        raise UserError(f"An uploaded model can be scored on {', '.join(data_fit.UPLOAD_TASKS)}, not {task!r}.",
                        field="task")
    if task == "your-data" and not labelled:
        raise UserError("Task 'your-data' scores the model against the labels of an attached data set; attach a "
                        "data set with labels, or use 'fidelity'.", field="task")
    if kind == "hf" and task not in ("fidelity", "your-data"):
        raise UserError(f"A Hugging Face upload is scored on 'fidelity' (agreement with the original) or on "
                        f"'your-data' (the labels of an attached CSV); {task!r} needs the built-in model's own "
                        f"inputs.", field="task")
    return task


def _new_model_id(db, name: str) -> str:
    import secrets

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-") or "model"
    while True:
        model_id = f"{slug}-{secrets.token_hex(3)}"
        if model_id not in BUILTIN_MODELS and not list(db.query("SELECT 1 FROM models WHERE id = ?", [model_id])):
            return model_id


def _insert_upload(db, model_id: str, name: str, task: str, description: str, meta: dict,
                   dataset_id: str | None) -> str:
    """The model row and its import job in one transaction: both or neither."""
    now = utcnow()
    job_id = q.new_id()
    fmt = "torch" if meta["kind"] == "hf" else "onnx"
    with q.immediate(db):  # raw SQL: sqlite-utils' insert would commit this transaction early
        db.execute(
            """INSERT INTO models (id, name, source, format, task, description, status, meta, dataset_id,
                                   created_at, updated_at)
               VALUES (?, ?, 'upload', ?, ?, ?, 'new', ?, ?, ?, ?)""",
            [model_id, name, fmt, task, description, json.dumps(meta), dataset_id, now, now])
        db.execute(
            """INSERT INTO jobs (id, kind, model_id, payload, status, attempts, max_attempts, created_at)
               VALUES (?, 'prepare', ?, ?, 'queued', 0, 3, ?)""",
            [job_id, model_id, json.dumps({"model_id": model_id}), now])
    return job_id


def onnx_inputs(data: bytes, filename: str) -> list[dict]:
    """The inputs of an ONNX file as its graph declares them (for the upload form; no onnx import)."""
    from services import imports

    summary = imports.read_onnx_summary(data, filename)
    return [{"name": i.name, "type": i.elem_type, "shape": i.dims} for i in summary.inputs]


def method_applicability(model: dict) -> list[dict]:
    """Every registered method, whether it applies to this model and, when not, why (a sentence)."""
    from services import imports

    return imports.method_applicability(model)


def max_upload_mb() -> int:
    from services import imports

    return imports.max_upload_mb()


# ---- methods and recipes ------------------------------------------------------------------

def list_methods() -> list[dict]:
    return [method.schema() for method in REGISTRY.values()]


def list_tasks() -> dict:
    return TASKS


def recovery_options(db, model_id: str, task: str) -> list[dict]:
    """Every recovery objective: whether this model and its data allow it, and if not, why (a sentence)."""
    from services.catalog import architecture_of
    from services.engine.objectives import OBJECTIVES, why_not
    from services.recipes import SUPPORTED_OBJECTIVES, labels_available, output_kind_of

    model = get_model(db, model_id)
    labelled, kind, architecture = labels_available(model, task), output_kind_of(model), architecture_of(model)
    return [{"name": o.name, "title": o.title, "explanation": o.explanation, "needs_labels": o.needs_labels,
             "reason": why_not(o.name, architecture, kind, labelled)}
            for o in OBJECTIVES.values() if o.name in SUPPORTED_OBJECTIVES]


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
    from services.recipes import RECOVERY_PARAMS

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


# ---- the user's own data ------------------------------------------------------------------
# Parsing, validation and the storage layout live in services/datasets.py (numpy and the standard
# library only); these stay thin so that the UI and the CLI call one place.

def import_dataset(db, filename: str, data: bytes, name: str | None = None) -> dict:
    """Validate an uploaded CSV, NPZ or zip of WAV files and store it; a UserError names what is wrong."""
    from services import datasets

    return datasets.import_dataset(db, filename, data, name)


def import_dataset_file(db, path, name: str | None = None) -> dict:
    """The CLI's way in: the file's size is checked before it is read."""
    from services import datasets

    return datasets.import_dataset(db, str(path), datasets.read_upload_file(path), name)


def list_datasets(db) -> list[dict]:
    from services import datasets

    return datasets.list_datasets(db)


def get_dataset(db, dataset_id: str) -> dict:
    from services import datasets

    return datasets.get_dataset(db, dataset_id)


# Sweeps of a once-for-all rate and rate searches live in services/api_rates.py; the UI and the CLI
# call them here, as everything else.
from services.api_rates import (  # noqa: E402  (after the names api_rates calls back into)
    SEARCH_GOALS, SWEEP_KEEPS, SWEEP_RATES, get_search, list_searches, rate_curves, score_change_words,
    search_rates, start_search, submit_rate_sweep, wait_for_search)

# Label budgets (active learning): what a run labelled and the score against labels, services/api_labels.py.
from services.api_labels import label_curve, labelled_samples, submit_label_sweep  # noqa: E402
