"""Tasks: the data each model is scored on and how it is scored.

`eval_set(task, model_id)` gives the inputs (for `fidelity`, the model's own task inputs);
`score(...)` turns ONNX Runtime outputs into {"score", "score_name", "fidelity", ...}.
Every score is computed on outputs of the exported ONNX model.
"""
from __future__ import annotations

import importlib

import numpy as np

from services.catalog import BUILTIN_MODELS
from services.engine.tasks.base import EvalSet
from services.engine.tasks.digits import digits_data  # noqa: F401  (re-exported for callers)

# task name -> module with eval_set(task) -> EvalSet and score(task, evaluation, outputs) -> dict
TASK_MODULES = {
    "digits": "services.engine.tasks.digits",
    "digits-parity": "services.engine.tasks.digits",  # digits-multitask's parity head
    "pydoc-retrieval": "services.engine.tasks.pydoc_retrieval",
    "spoken-digits": "services.engine.tasks.speech",
    "speaker-id": "services.engine.tasks.speech",
    "your-data": "services.engine.tasks.uploaded",  # an uploaded model scored on the user's labelled data
}


def _module(task: str):
    return importlib.import_module(TASK_MODULES[task])


def data_task(task: str, model_id: str) -> str:
    """The task whose inputs are used: fidelity runs on the model's own task inputs."""
    return BUILTIN_MODELS[model_id]["task"] if task == "fidelity" else task


def eval_set(task: str, model_id: str) -> EvalSet:
    source = data_task(task, model_id)
    return _module(source).eval_set(source)


# ---- the user's own models: their eval set comes from the model row's meta, not from the catalog

def eval_set_for(task: str, model: dict, home) -> EvalSet:
    """The eval set of any model row: built-in models by id, uploaded ones from their meta."""
    if model.get("source") == "upload":
        from services.engine.tasks import uploaded

        return uploaded.eval_set(task, model, home)
    return eval_set(task, model["id"])


# ---- the fitting split: what calibration, vocabulary trimming, sensitivity scans and recovery see

def fit_set(task: str, model: dict, home) -> EvalSet:
    """Inputs a method may fit on (calibrate, count tokens, train): never the samples a score is
    computed on, so that a result is not flattered by having seen its test. `extra["overlaps_scoring"]`
    is True only for a user's data set, which has no second split to draw from."""
    if model.get("source") == "upload":
        from services.engine.tasks import uploaded

        return uploaded.fit_set(task, model, home)
    source = data_task(task, model["id"])
    module = _module(source)
    return module.fit_set(source)


def fidelity(outputs: np.ndarray, reference: np.ndarray, output_kind: str) -> dict:
    """Agreement with the original model; needs no labels."""
    if output_kind == "embedding":
        a = outputs.reshape(len(outputs), -1).astype(np.float64)
        b = reference.reshape(len(reference), -1).astype(np.float64)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return {"fidelity": float(cosine.mean()), "fidelity_worst": float(cosine.min())}
    agreement = outputs.argmax(axis=-1) == reference.argmax(axis=-1)
    per_sample = agreement.reshape(len(agreement), -1).mean(axis=1)
    return {"fidelity": float(agreement.mean()), "fidelity_worst": float(per_sample.min())}


def score(task: str, model_id: str, output_kind: str, evaluation: EvalSet, outputs: np.ndarray,
          reference: np.ndarray) -> dict:
    # A task may know better what agreement means (speech: real frames only, not the padding).
    module = _module(data_task(task, model_id)) if model_id in BUILTIN_MODELS else None
    if module is not None and hasattr(module, "fidelity"):
        agreement = module.fidelity(data_task(task, model_id), evaluation, outputs, reference)
    else:
        agreement = fidelity(outputs, reference, output_kind)
    if task == "fidelity":
        return {"score": agreement["fidelity"], "score_name": "fidelity", **agreement}
    return {**_module(task).score(task, evaluation, outputs), **agreement}
