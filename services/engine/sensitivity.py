"""Per-layer sensitivity scan: compress each layer alone at one setting and record what it costs.

The scan is measured on the task's FITTING split (never the scored one), as agreement with the
original model (fidelity: label-free, so it works for every model) plus the relative error of the
outputs, which still separates layers when top-1 agreement ties. Layers are listed most sensitive
first; `skip_sensitive: N` in a recipe leaves the first N of the latest scan alone.
"""
from __future__ import annotations

import copy
import shutil
import time

import numpy as np

from services.catalog import architecture_of
from services.engine import measure, pipeline, tasks
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.engine.tasks.base import EvalSet
from services.errors import UserError
from storage.artifacts import ArtifactStore

MAX_SAMPLES = 256  # enough to rank layers; keeps a 37-layer MiniLM scan to a few minutes


def _subset(evaluation: EvalSet, count: int) -> EvalSet:
    return EvalSet(inputs={k: v[:count] for k, v in evaluation.inputs.items()},
                   labels=None if evaluation.labels is None else evaluation.labels[:count],
                   latency_batch=evaluation.latency_batch, extra=evaluation.extra)


def output_error(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Relative L2 distance of the outputs from the original's, over the whole set."""
    difference = np.linalg.norm((outputs - reference).astype(np.float64))
    return float(difference / (np.linalg.norm(reference.astype(np.float64)) + 1e-12))


def _of_operators(onnx_path, names: list[str], operators: list[str]) -> list[str]:
    """The named nodes whose kind is among `operators` (a Gemm counts as MatMul, as the quantizers see it)."""
    kinds = {node.name: node.op_type for node in measure.load_model(onnx_path).graph.node}
    wanted = set(operators) | ({"Gemm"} if "MatMul" in operators else set())
    return [name for name in names if kinds.get(name) in wanted]


def scan(store: ArtifactStore, model: dict, spec: dict, job_id: str, progress) -> dict:
    """spec: {"method", "params" (validated), "task"}. Returns {"scan": {"layers": [...], "summary": {...}}}."""
    started = time.perf_counter()
    method = REGISTRY[spec["method"]]
    if model["status"] != "ready" or not model.get("artifact"):
        prepared = pipeline.prepare(store, model, lambda f, m: progress(f * 0.2, m))
        model = {**model, **prepared["model_update"]}
    adapter = pipeline._adapter_for(store, model)
    baseline = store.resolve(model["artifact"])
    whole = tasks.fit_set(spec["task"], model, store.home)
    fit = _subset(whole, MAX_SAMPLES)
    reference = measure.run_outputs(measure.session(baseline), fit)
    scratch = store.scratch_dir("scans", job_id, "tmp")
    context = pipeline.StepContext(model_id=model["id"], scratch=scratch, progress=lambda f, m: None, model=model,
                                   task=spec["task"], home=store.home, adapter=adapter,
                                   architecture=architecture_of(model))
    net = pipeline._load_torch_model(store, model["id"], adapter) if method.stage == "torch" else None
    names = method.layer_names(net if net is not None else baseline)
    if net is None and spec["params"].get("operators"):  # only the kinds of node this setting quantizes
        names = _of_operators(baseline, names, spec["params"]["operators"])
    if not names:
        raise UserError(f"{method.name} finds no layer it can compress in {model['id']}: nothing to scan.")
    layers = []
    for index, name in enumerate(names):
        progress(0.2 + 0.75 * index / len(names), f"layer {index + 1}/{len(names)}: {name}")
        params = {**spec["params"], "only_layers": [name]}
        out = scratch / f"layer{index}.onnx"
        if method.stage == "torch":
            single = copy.deepcopy(net)
            method.apply(single, params, context)
            export_onnx(single, adapter, out)
        else:
            method.apply(baseline, out, params, context)
        outputs = measure.run_outputs(measure.fresh_session(out), fit)
        agreement = tasks.fidelity(outputs, reference, adapter.output_kind)
        layers.append({"layer": name, "fidelity": agreement["fidelity"],
                       "fidelity_worst": agreement["fidelity_worst"],
                       "drop": 1.0 - agreement["fidelity"], "output_error": output_error(outputs, reference)})
        out.unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    layers.sort(key=lambda row: (-row["drop"], -row["output_error"]))
    summary = {"data": f"{len(fit)} samples of the fitting split ({whole.extra.get('data', len(whole))})",
               "samples": len(fit),
               "layers": len(layers), "seconds": round(time.perf_counter() - started, 2),
               "overlaps_scoring": bool(fit.extra.get("overlaps_scoring"))}
    return {"scan": {"layers": layers, "summary": summary}}
