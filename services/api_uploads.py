"""The user's own models and data sets: uploads, Hugging Face imports and data set files. Part of the API
the UI and the CLI call; services.api re-exports it. Cheap checks run here (sizes, zip safety, ONNX inputs
read from the wire format); the ONNX checker, ONNX Runtime and transformers run in the import job, never
in the web process."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from services.catalog import BUILTIN_MODELS
from services.errors import UserError
from storage import queue as q
from storage import utcnow


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
