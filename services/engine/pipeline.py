"""What a job does: prepare a model, or compress it and measure the result against the baseline.

load model -> torch steps in order -> export ONNX -> ONNX steps in order -> score on the task
-> time with ONNX Runtime (baseline and result side by side) -> sizes and parameter counts.
Functions here return plain dicts; the worker stores them. Nothing here writes the database.
"""
from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from services.catalog import BUILTIN_MODELS
from services.engine import measure, tasks, zoo
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.errors import UserError
from storage.artifacts import ArtifactStore

Progress = Callable[[float, str], None]


@dataclass
class StepContext:
    """What a method may use while it runs."""
    model_id: str
    scratch: Path
    progress: Progress

    @staticmethod
    def user_error(message: str) -> UserError:
        return UserError(message)


def _model_paths(store: ArtifactStore, model_id: str) -> tuple[Path, Path]:
    return store.path("models", model_id, "weights.pt"), store.path("models", model_id, "model.onnx")


def prepare(store: ArtifactStore, model: dict, progress: Progress) -> dict:
    """Train (or load) a built-in model, export it, and compute its card."""
    model_id = model["id"]
    if model_id not in BUILTIN_MODELS:
        raise UserError(f"Model {model_id} cannot be prepared: it is not a built-in model.")
    weights_path, onnx_path = _model_paths(store, model_id)
    progress(0.05, f"training {model_id} (seeded, first use only)")
    net = zoo.train_builtin(model_id, progress)
    scratch = store.scratch_dir("models", model_id, "tmp")
    tmp_weights = scratch / "weights.pt"
    torch.save(net.state_dict(), tmp_weights)
    store.put_file(tmp_weights, "models", model_id, "weights.pt")
    progress(0.7, "exporting to ONNX")
    export_onnx(net, zoo.input_example(model_id), scratch / "model.onnx")
    store.put_file(scratch / "model.onnx", "models", model_id, "model.onnx")
    shutil.rmtree(scratch, ignore_errors=True)
    progress(0.8, "measuring the baseline")
    card = measure_model(onnx_path, onnx_path, model["task"], model["task"])
    card["train_seconds"] = round(getattr(net, "train_seconds", 0.0), 2)
    card["input_shape"] = list(zoo.input_example(model_id).shape[1:])
    return {"model_update": {"status": "ready", "card": card, "artifact": store.relative(onnx_path),
                             "error": None}}


def measure_model(path: Path, reference_path: Path, task: str, model_task: str,
                  latency: dict | None = None) -> dict:
    inputs = tasks.task_inputs(task, model_task)
    outputs = measure.run_outputs(measure.session(path), inputs)
    reference = measure.run_outputs(measure.session(reference_path), inputs)
    metrics = {**measure.file_sizes(path), **measure.parameter_counts(path),
               **tasks.score(task, model_task, outputs, reference)}
    metrics.update(latency or measure.measure_latency([path], inputs)[0])
    return metrics


def _load_torch_model(store: ArtifactStore, model_id: str) -> torch.nn.Module:
    weights_path, _ = _model_paths(store, model_id)
    net = zoo.build(model_id)
    try:
        # weights_only=True: loading never runs code from the file.
        net.load_state_dict(torch.load(weights_path, weights_only=True))
    except Exception as error:  # missing, truncated, garbage or not a state dict: all the same to a user
        raise UserError(f"The stored weights of {model_id} are missing or unreadable ({type(error).__name__}); "
                        f"open the Models page to prepare it again.") from None
    net.eval()
    return net


def compress(store: ArtifactStore, model: dict, recipe: dict, run_id: str, progress: Progress) -> dict:
    started = time.perf_counter()
    result: dict = {}
    if model["status"] != "ready" or not model.get("artifact"):
        prepared = prepare(store, model, lambda f, m: progress(f * 0.3, m))
        result.update(prepared)
        model = {**model, **prepared["model_update"]}
    baseline_path = store.resolve(model["artifact"])
    scratch = store.scratch_dir("runs", run_id, "tmp")
    context = StepContext(model_id=model["id"], scratch=scratch, progress=progress)
    torch_steps = [s for s in recipe["steps"] if REGISTRY[s["method"]].stage == "torch"]
    onnx_steps = [s for s in recipe["steps"] if REGISTRY[s["method"]].stage == "onnx"]
    total = len(recipe["steps"])

    current = baseline_path
    if torch_steps:
        net = _load_torch_model(store, model["id"])
        for index, step in enumerate(torch_steps):
            progress(0.3 + 0.3 * index / total, f"step {index + 1}/{total}: {step['method']}")
            REGISTRY[step["method"]].apply(net, step["params"], context)
        current = export_onnx(net, zoo.input_example(model["id"]), scratch / "after_torch.onnx")
    for offset, step in enumerate(onnx_steps):
        index = len(torch_steps) + offset
        progress(0.3 + 0.3 * index / total, f"step {index + 1}/{total}: {step['method']}")
        out = scratch / f"step{index + 1}.onnx"
        REGISTRY[step["method"]].apply(current, out, step["params"], context)
        current = out

    final = store.put_file(current, "runs", run_id, "model.onnx")
    shutil.rmtree(scratch, ignore_errors=True)
    progress(0.65, "timing the original and the compressed model with ONNX Runtime")
    inputs = tasks.task_inputs(recipe["task"], model["task"])
    base_latency, run_latency = measure.measure_latency([baseline_path, final], inputs)
    progress(0.9, f"scoring on {recipe['task']}")
    baseline = measure_model(baseline_path, baseline_path, recipe["task"], model["task"], base_latency)
    metrics = measure_model(final, baseline_path, recipe["task"], model["task"], run_latency)
    metrics["job_seconds"] = round(time.perf_counter() - started, 2)
    result["run"] = {
        "metrics": metrics,
        "baseline": baseline,
        "artifact": store.relative(final),
        "runner": {"executor": "local", "node": platform.node()},
    }
    return result
