"""What a job does: prepare a model, or compress it and measure the result against the baseline.

load model -> torch steps in order -> export ONNX -> ONNX steps in order -> score on the task
-> time with ONNX Runtime (baseline and result side by side) -> sizes and parameter counts.
Functions here return plain dicts; the worker stores them. Nothing here writes the database.
"""
from __future__ import annotations

import platform
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from services.catalog import BUILTIN_MODELS, architecture_of
from services.engine import measure, objectives, recovery, tasks, zoo
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.engine.tasks.base import EvalSet
from services.errors import StaleModelError, UserError
from storage.artifacts import ArtifactStore

Progress = Callable[[float, str], None]


@dataclass
class StepContext:
    """What a method may use while it runs.

    `fit_set()` gives the inputs a method may fit on (calibration, token counts, training): the
    task's fitting split, never the samples the result is scored on. A step that changes how inputs
    are made (vocab.trim rebuilds the tokenizer) sets `tokenizer_file`; the compressed model is then
    scored and timed on the same texts encoded by that tokenizer, and the file is kept with the run.
    `notes` are sentences shown beside the result (what a step did, what it risks).
    """
    model_id: str
    scratch: Path
    progress: Progress
    model: dict = field(default_factory=dict)
    task: str = ""
    home: Path | None = None
    adapter: object = None
    architecture: str = ""
    tokenizer_file: Path | None = None
    notes: list = field(default_factory=list)
    extra_metrics: dict = field(default_factory=dict)  # facts a step found, stored with the run's metrics
    # A fresh copy of the original PyTorch model, untouched by earlier steps (a student that learns
    # from the full-vocabulary original after vocab.trim); set by compress().
    load_original: Callable[[], torch.nn.Module] | None = None
    _fit_set: EvalSet | None = None

    @staticmethod
    def user_error(message: str) -> UserError:
        return UserError(message)

    def fit_set(self) -> EvalSet:
        if self._fit_set is None:
            self._fit_set = tasks.fit_set(self.task, self.model, self.home)
        return self._fit_set

    def reencode(self, evaluation: EvalSet) -> EvalSet:
        """The same samples as the compressed model must see them (its own tokenizer, if a step made one)."""
        if self.tokenizer_file is None:
            return evaluation
        texts = evaluation.extra.get("texts")
        if texts is None or not hasattr(self.adapter, "encode"):
            raise UserError("This step rebuilt the tokenizer, but the task's samples are not text the model's "
                            "tokenizer can encode again.")
        inputs = self.adapter.encode(texts, tokenizer_file=self.tokenizer_file)
        return EvalSet(inputs={k: inputs[k] for k in evaluation.inputs}, labels=evaluation.labels,
                       latency_batch=evaluation.latency_batch, extra=evaluation.extra)


def _weights_path(store: ArtifactStore, model_id: str) -> Path:
    return store.path("models", model_id, "weights.pt")


def prepare(store: ArtifactStore, model: dict, progress: Progress) -> dict:
    """Train (or load from its package) a built-in model, export it, and compute its card."""
    if model.get("source") == "upload":  # the user's own model: checked, loaded and measured by imported.py
        from services.engine import imported

        return imported.prepare(store, model, progress)
    model_id = model["id"]
    if model_id not in BUILTIN_MODELS:
        raise UserError(f"Model {model_id} cannot be prepared: it is not a built-in model.")
    adapter = zoo.get_adapter(model_id)
    progress(0.05, f"creating {model_id} (first use only)")
    net = adapter.create(progress)
    # A folder of its own: two workers preparing the same model must not clean up each other's files.
    scratch = store.scratch_dir("models", model_id, f"tmp-{secrets.token_hex(4)}")
    adapter.save(net, scratch / "weights.pt")
    store.put_file(scratch / "weights.pt", "models", model_id, "weights.pt")
    progress(0.7, "exporting to ONNX")
    export_onnx(net, adapter, scratch / "model.onnx")
    onnx_path = store.put_file(scratch / "model.onnx", "models", model_id, "model.onnx")
    shutil.rmtree(scratch, ignore_errors=True)
    progress(0.8, "measuring the baseline")
    evaluation = tasks.eval_set(model["task"], model_id)
    card = measure_model(onnx_path, model["task"], model_id, adapter.output_kind, evaluation)
    card["train_seconds"] = round(getattr(net, "train_seconds", 0.0), 2)
    card["io"] = measure.io_shapes(onnx_path)
    card["params_by_op"] = measure.params_by_op(onnx_path)
    card["output_kind"] = adapter.output_kind
    return {"model_update": {"status": "ready", "card": card, "artifact": store.relative(onnx_path),
                             "error": None}}


def measure_model(path: Path, task: str, model_id: str, output_kind: str, evaluation: EvalSet,
                  outputs=None, reference=None, latency: dict | None = None) -> dict:
    """Every metric of one ONNX file. `reference` is the original model's outputs (for fidelity);
    outputs and latency are computed here when not given."""
    if outputs is None:
        outputs = measure.run_outputs(measure.session(path), evaluation)
    reference = outputs if reference is None else reference
    metrics = {**measure.file_sizes(path), **measure.parameter_counts(path),
               **tasks.score(task, model_id, output_kind, evaluation, outputs, reference)}
    metrics.update(latency or measure.measure_latency([path], evaluation, seconds=measure.CARD_SECONDS)[0])
    return metrics


def _adapter_for(store: ArtifactStore, model: dict):
    if model.get("source") == "upload":  # built from the upload's folder and meta
        from services.engine import imported

        return imported.adapter_for(store, model)
    return zoo.get_adapter(model["id"])


def _load_torch_model(store: ArtifactStore, model_id: str, adapter=None) -> torch.nn.Module:
    try:
        return (adapter or zoo.get_adapter(model_id)).load(_weights_path(store, model_id))
    except Exception as error:  # missing, truncated, garbage or not a state dict: all the same to a user
        raise StaleModelError(f"The stored weights of {model_id} are missing or unreadable ({type(error).__name__}); "
                              f"the model was reset: prepare it again on the Models page.") from None


def _within_step(progress: Progress, index: int, total: int) -> Progress:
    """A step reports fractions of its own work (0..1); the job's bar shows them inside the step's slice
    of 0.3..0.6, so a long step (distillation) moves the bar forward and never back."""
    start, span = 0.3 + 0.3 * index / total, 0.3 / total
    return lambda fraction, message: progress(start + span * min(max(float(fraction), 0.0), 1.0),
                                              f"step {index + 1}/{total}: {message}")


def compress(store: ArtifactStore, model: dict, recipe: dict, run_id: str, progress: Progress) -> dict:
    started = time.perf_counter()
    result: dict = {}
    if model["status"] != "ready" or not model.get("artifact"):
        prepared = prepare(store, model, lambda f, m: progress(f * 0.3, m))
        result.update(prepared)
        model = {**model, **prepared["model_update"]}
    adapter = _adapter_for(store, model)
    baseline_path = store.resolve(model["artifact"])
    scratch = store.scratch_dir("runs", run_id, "tmp")
    context = StepContext(model_id=model["id"], scratch=scratch, progress=progress, model=model,
                          task=recipe["task"], home=store.home, adapter=adapter, architecture=architecture_of(model),
                          load_original=lambda: _load_torch_model(store, model["id"], adapter))
    torch_steps = [s for s in recipe["steps"] if REGISTRY[s["method"]].stage == "torch"]
    onnx_steps = [s for s in recipe["steps"] if REGISTRY[s["method"]].stage == "onnx"]
    recovery_plan = recipe.get("recovery") or {"objective": "none"}
    recovering = recovery_plan["objective"] != "none"
    rounds = recovery_plan.get("rounds", 1) if recovering else 1
    # progress units: the torch steps (pruning ones and the recovery once per round), then the ONNX steps
    per_round = sum(1 for step in torch_steps if objectives.round_params(step, 2, rounds) is not None) + recovering
    total = len(torch_steps) + recovering + (rounds - 1) * per_round + len(onnx_steps)
    done = 0

    current = baseline_path
    if torch_steps:
        net = _load_torch_model(store, model["id"], adapter)
        teacher = recovery.snapshot(net) if recovering else None
        snapshots = []
        for round_number in range(1, rounds + 1):
            for step in torch_steps:
                params = objectives.round_params(step, round_number, rounds)
                if params is None:  # not a pruning step: it ran in the first round
                    continue
                label = step["method"] + (f" (round {round_number}/{rounds}, amount {params['amount']:.3g})"
                                          if rounds > 1 else "")
                progress(0.3 + 0.3 * done / total, f"step {done + 1}/{total}: {label}")
                context.progress = _within_step(progress, done, total)
                REGISTRY[step["method"]].apply(net, params, context)
                done += 1
            if recovering:
                context.progress = _within_step(progress, done, total)
                describe = "recovery" + (f" round {round_number}/{rounds}" if rounds > 1 else "")
                note, _ = recovery.recover(net, teacher, recovery_plan, context, snapshots=snapshots, describe=describe)
                context.notes.append(note if rounds == 1 else f"Round {round_number}/{rounds}: {note}")
                done += 1
                if recovery_plan["objective"] == "contrastive" and round_number < rounds:
                    snapshots.append(recovery.snapshot(net))  # CAP's snapshot contrast in later rounds
        trace = None
        if context.tokenizer_file is not None:  # vocab.trim: the original ids may lie past the trimmed table
            feed = context.reencode(context.fit_set()).inputs
            trace = tuple(torch.from_numpy(feed[name][:2]) for name in adapter.input_names)
        current = export_onnx(net, adapter, scratch / "after_torch.onnx", trace)
    for offset, step in enumerate(onnx_steps):
        index = done + offset
        progress(0.3 + 0.3 * index / total, f"step {index + 1}/{total}: {step['method']}")
        out = scratch / f"step{index + 1}.onnx"
        context.progress = _within_step(progress, index, total)
        REGISTRY[step["method"]].apply(current, out, step["params"], context)
        current = out

    final = store.put_file(current, "runs", run_id, "model.onnx")
    extra_files = {}
    if context.tokenizer_file is not None:  # the compressed model only understands its own token ids
        extra_files["tokenizer"] = store.relative(store.put_file(context.tokenizer_file, "runs", run_id,
                                                                 "tokenizer.json"))
    progress(0.65, "timing the original and the compressed model with ONNX Runtime")
    evaluation = tasks.eval_set_for(recipe["task"], model, store.home)
    final_evaluation = context.reencode(evaluation)
    if "pooling_rate" in context.extra_metrics:  # the scorer counts each utterance's real frames at this rate
        final_evaluation = EvalSet(inputs=final_evaluation.inputs, labels=final_evaluation.labels,
                                   latency_batch=final_evaluation.latency_batch,
                                   extra={**final_evaluation.extra, "pooling_rate": context.extra_metrics["pooling_rate"]})
    shutil.rmtree(scratch, ignore_errors=True)
    base_latency, run_latency = measure.measure_latency([baseline_path, final], [evaluation, final_evaluation])
    progress(0.85, f"scoring on {recipe['task']}")
    kind, task = adapter.output_kind, recipe["task"]
    reference = measure.run_outputs(measure.session(baseline_path), evaluation)
    outputs = measure.run_outputs(measure.session(final), final_evaluation)
    baseline = measure_model(baseline_path, task, model["id"], kind, evaluation, reference, reference, base_latency)
    metrics = measure_model(final, task, model["id"], kind, final_evaluation, outputs, reference, run_latency)
    metrics["job_seconds"] = round(time.perf_counter() - started, 2)
    metrics.update(context.extra_metrics)
    if context.notes:
        metrics["notes"] = list(context.notes)
    if extra_files:  # relative to the data folder, like the artifact
        metrics["files"] = extra_files
    result["run"] = {
        "metrics": metrics,
        "baseline": baseline,
        "artifact": store.relative(final),
        "runner": {"executor": "local", "node": platform.node()},
    }
    return result
