"""services/engine in-process: prepare, the two methods, parameter counting and measuring.

digits-cnn is prepared once for this module with `pipeline.prepare` (the real training, about
2 s); every test works on copies of what it made.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from services.engine import measure, pipeline, tasks, zoo
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.errors import UserError
from services.recipes import validate_recipe
from storage import ArtifactStore

pytestmark = pytest.mark.slow
MODEL = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
         "artifact": None}
WEIGHTED_LAYERS = ("features.0", "features.2", "classifier.1", "classifier.3")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    home = tmp_path_factory.mktemp("engine") / "home"
    store = ArtifactStore(home)
    events = []
    result = pipeline.prepare(store, dict(MODEL), lambda fraction, message: events.append((fraction, message)))
    return SimpleNamespace(home=home, store=store, result=result, events=events,
                           model={**MODEL, **result["model_update"]})


@pytest.fixture
def store(prepared, tmp_path):
    """A copy of the prepared data folder for one test."""
    home = tmp_path / "home"
    shutil.copytree(prepared.home, home)
    return ArtifactStore(home)


def _context(tmp_path):
    return pipeline.StepContext(model_id="digits-cnn", scratch=tmp_path, progress=lambda f, m: None)


def _trained_net(store) -> torch.nn.Module:
    return pipeline._load_torch_model(store, "digits-cnn")


def _quantize(source, target, tmp_path, **params):
    method = REGISTRY["quantize.dynamic"]
    clean = validate_recipe({"steps": [{"method": method.name, "params": params}]}, MODEL,
                            ["digits", "fidelity"])["steps"][0]["params"]
    method.apply(source, target, clean, _context(tmp_path))
    return target


def test_prepare_trains_exports_and_measures_the_model(prepared):
    update = prepared.result["model_update"]
    assert update["status"] == "ready" and update["error"] is None
    card = update["card"]
    assert card["score_name"] == "accuracy"
    assert card["score"] > 0.9
    assert card["fidelity"] == 1.0
    expected_params = sum(p.numel() for p in zoo.build("digits-cnn").parameters())
    assert card["params"] == card["nonzero_params"] == expected_params == 21546
    onnx_file = prepared.home / update["artifact"]
    assert update["artifact"] == "artifacts/models/digits-cnn/model.onnx"
    assert card["size_bytes"] == onnx_file.stat().st_size
    assert 0 < card["zipped_bytes"] < card["size_bytes"]
    assert card["latency_ms"]["p50"] > 0 and card["throughput_per_s"] > 0
    assert card["io"]["inputs"] == [{"name": "input", "type": "tensor(float)", "shape": ["batch", 1, 8, 8]}]
    assert card["io"]["outputs"][0]["shape"] == ["batch", 10]
    assert card["params_by_op"] == {"Gemm": 16746, "Conv": 4800}
    assert card["output_kind"] == "logits"
    weights = prepared.home / "artifacts" / "models" / "digits-cnn" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    assert sum(t.numel() for t in state.values()) == 21546
    assert not list((prepared.home / "artifacts" / "models" / "digits-cnn").glob("tmp*"))  # scratch cleaned
    fractions = [fraction for fraction, _ in prepared.events]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
    assert all(message for _, message in prepared.events)


def test_the_exported_model_agrees_with_the_torch_model(store):
    net = _trained_net(store)
    evaluation = tasks.eval_set("digits", "digits-cnn")
    with torch.no_grad():
        expected = net(torch.from_numpy(evaluation.inputs["input"])).numpy()
    got = measure.run_outputs(measure.session(store.path("models", "digits-cnn", "model.onnx")), evaluation)
    assert got.shape == (540, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_parameter_counts_of_a_quantized_model_count_int8_weights_only(store, tmp_path):
    base = store.path("models", "digits-cnn", "model.onnx")
    quantized = _quantize(base, tmp_path / "q.onnx", tmp_path, operators=["MatMul", "Conv"])
    graph = onnx.load(str(quantized)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    int8_weights = {n: a for n, a in arrays.items() if n.endswith("_quantized")}
    assert len(int8_weights) == 4 and all(a.dtype == np.int8 for a in int8_weights.values())
    # The graph also carries what must NOT be counted: shape constants, scales and zero points,
    # some of them arrays (per-channel), so a count that took them in would be visibly off.
    shape_constants = [a for a in arrays.values() if a.dtype == np.int64 and a.size > 1]
    assert shape_constants
    assert any(n.endswith("_scale") and a.size > 1 for n, a in arrays.items())
    assert any(n.endswith("_zero_point") and a.size > 1 for n, a in arrays.items())
    float_biases = {n: a for n, a in arrays.items() if n.endswith(".bias")}

    counts = measure.parameter_counts(quantized)
    expected = sum(a.size for a in int8_weights.values()) + sum(a.size for a in float_biases.values())
    assert counts["params"] == expected == measure.parameter_counts(base)["params"] == 21546
    # int8 rounds a few tiny weights to exactly zero; almost all stay non-zero
    assert 0.95 * counts["params"] <= counts["nonzero_params"] <= counts["params"]


@pytest.mark.parametrize("weight_type, per_channel", [("int8", True), ("uint8", True), ("uint8", False)])
def test_quantized_zeros_are_counted_against_the_zero_point(store, tmp_path, weight_type, per_channel):
    net = _trained_net(store)
    REGISTRY["prune.magnitude"].apply(net, {"amount": 0.8, "scope": "global"}, _context(tmp_path))
    pruned = export_onnx(net, zoo.get_adapter("digits-cnn"), tmp_path / "pruned.onnx")
    float_counts = measure.parameter_counts(pruned)
    quantized = _quantize(pruned, tmp_path / "pq.onnx", tmp_path, weight_type=weight_type,
                          per_channel=per_channel)
    counts = measure.parameter_counts(quantized)
    assert counts["params"] == float_counts["params"] == 21546
    # uint8 stores a pruned weight as its zero point (e.g. 128), not as 0: it must still count as zero
    assert counts["nonzero_params"] <= float_counts["nonzero_params"]
    assert 0.15 <= counts["nonzero_params"] / counts["params"] <= 0.22


def _sparsity(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / tensor.numel()


@pytest.mark.parametrize("amount", [0.3, 0.6, 0.9])
def test_per_layer_pruning_reaches_the_sparsity_in_every_layer(store, tmp_path, amount):
    net = _trained_net(store)
    biases_before = {n: p.clone() for n, p in net.named_parameters() if n.endswith("bias")}
    REGISTRY["prune.magnitude"].apply(net, {"amount": amount, "scope": "per_layer"}, _context(tmp_path))
    modules = dict(net.named_modules())
    for name in WEIGHTED_LAYERS:
        weight = modules[name].weight
        assert _sparsity(weight) == pytest.approx(amount, abs=1.0 / weight.numel() + 1e-9)
    for name, bias in biases_before.items():
        assert torch.equal(dict(net.named_parameters())[name], bias)  # biases are left alone
    assert not any(key.endswith(("_orig", "_mask")) for key in net.state_dict())  # pruning was made permanent


@pytest.mark.parametrize("amount", [0.3, 0.6, 0.9])
def test_global_pruning_reaches_the_sparsity_over_all_weights(store, tmp_path, amount):
    net = _trained_net(store)
    REGISTRY["prune.magnitude"].apply(net, {"amount": amount, "scope": "global"}, _context(tmp_path))
    modules = dict(net.named_modules())
    weights = [modules[name].weight for name in WEIGHTED_LAYERS]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / total == pytest.approx(amount, abs=1.0 / total + 1e-9)
    per_layer = [_sparsity(w) for w in weights]
    assert max(per_layer) - min(per_layer) > 0.02  # one threshold for all: layers lose different shares
    assert not any(key.endswith(("_orig", "_mask")) for key in net.state_dict())


def test_compress_in_process_prunes_then_quantizes(store, prepared):
    recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.5}},
                                        {"method": "quantize.dynamic"}]}, prepared.model, ["digits", "fidelity"])
    events = []
    result = pipeline.compress(store, dict(prepared.model), recipe, "run0001",
                               lambda fraction, message: events.append((fraction, message)))
    assert "model_update" not in result  # the model was ready: nothing retrained
    run = result["run"]
    metrics, baseline = run["metrics"], run["baseline"]
    assert run["artifact"] == "artifacts/runs/run0001/model.onnx"
    artifact = store.resolve(run["artifact"])
    assert artifact.stat().st_size == metrics["size_bytes"] < baseline["size_bytes"] / 2
    assert metrics["zipped_bytes"] < baseline["zipped_bytes"] / 2
    assert metrics["params"] == baseline["params"]
    assert 0.45 <= metrics["nonzero_params"] / metrics["params"] <= 0.52
    assert 0.8 < metrics["score"] <= 1.0 and 0.8 < metrics["fidelity"] <= 1.0
    assert baseline["score"] == prepared.result["model_update"]["card"]["score"]
    assert metrics["latency_ms"]["p50"] > 0 and baseline["latency_ms"]["p50"] > 0
    assert metrics["job_seconds"] > 0
    assert not store.resolve("artifacts/runs/run0001/tmp").exists()
    messages = " | ".join(message for _, message in events)
    assert "step 1/2: prune.magnitude" in messages and "step 2/2: quantize.dynamic" in messages
    fractions = [fraction for fraction, _ in events]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)


def test_fidelity_task_scores_agreement_with_the_original(store, prepared, tmp_path):
    recipe = validate_recipe({"task": "fidelity", "steps": [{"method": "quantize.dynamic"}]}, prepared.model,
                             ["digits", "fidelity"])
    run = pipeline.compress(store, dict(prepared.model), recipe, "run0002", lambda f, m: None)["run"]
    assert run["metrics"]["score_name"] == "fidelity"
    assert run["metrics"]["score"] == run["metrics"]["fidelity"]
    assert 0.9 <= run["metrics"]["score"] <= 1.0
    assert run["baseline"]["score"] == 1.0


def test_measure_latency_times_models_side_by_side(store):
    path = store.path("models", "digits-cnn", "model.onnx")
    results = measure.measure_latency([path, path], tasks.eval_set("digits", "digits-cnn"))
    assert len(results) == 2
    for result in results:
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"]
        assert result["latency_ms"]["batch"] == 1 and result["batch_latency_ms"]["batch"] == 256
        assert result["throughput_per_s"] == pytest.approx(256 / (result["batch_latency_ms"]["p50"] / 1000))
        assert result["threads"] == measure.BENCH_THREADS


def test_file_sizes_are_the_bytes_and_the_zipped_bytes(tmp_path):
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(100_000))
    sizes = measure.file_sizes(zeros)
    assert sizes["size_bytes"] == 100_000
    assert sizes["zipped_bytes"] < 1_000


def test_missing_weights_are_a_user_error(store):
    store.path("models", "digits-cnn", "weights.pt").unlink()
    with pytest.raises(UserError, match="stored weights of digits-cnn are missing or unreadable"):
        pipeline._load_torch_model(store, "digits-cnn")


def _garbage(data: bytes) -> bytes:
    return b"\x00garbage, not a state dict\xff" * 200


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", [_garbage, _truncated], ids=["garbage", "truncated"])
def test_unreadable_weights_are_a_user_error(store, damage):
    weights = store.path("models", "digits-cnn", "weights.pt")
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UserError, match="stored weights of digits-cnn are missing or unreadable"):
        pipeline._load_torch_model(store, "digits-cnn")
