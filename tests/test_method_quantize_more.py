"""quantize.static (calibrated int8, QDQ) and quantize.int4_weights (4-bit MatMul weights) on real models.

digits-cnn is prepared once for the module with `pipeline.prepare` (its real training, a few
seconds); one test exports minilm-l6 from its package (~20 s) for the embedding tables only a
transformer has.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from services.engine import measure, pipeline, tasks, zoo
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.engine.tasks.base import EvalSet
from services.errors import UserError
from services.recipes import validate_recipe
from storage import ArtifactStore

pytestmark = pytest.mark.slow
MODEL = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
         "artifact": None}


@pytest.fixture
def prepared(digits_prepared):
    return digits_prepared


def _context(tmp_path, fit_set: EvalSet | None = None):
    context = pipeline.StepContext(model_id="digits-cnn", scratch=tmp_path, progress=lambda f, m: None,
                                   model=dict(MODEL), task="digits")
    context._fit_set = fit_set  # None: the task's own fitting split, as in a job
    return context


def _params(method: str, model: dict = MODEL, **params) -> dict:
    recipe = validate_recipe({"steps": [{"method": method, "params": params}]}, model, [model["task"], "fidelity"])
    return recipe["steps"][0]["params"]


def _run(method, source, target, tmp_path, context=None, **params):
    REGISTRY[method].apply(source, target, _params(method, **params), context or _context(tmp_path))
    return target


def _agreement(path, reference_path) -> float:
    evaluation = tasks.eval_set("digits", "digits-cnn")
    got = measure.run_outputs(measure.fresh_session(path), evaluation)
    expected = measure.run_outputs(measure.fresh_session(reference_path), evaluation)
    return float(np.mean(got.argmax(1) == expected.argmax(1)))


def _initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _input_scale(path) -> float:
    """The calibrated scale of the model's input: ONNX Runtime names it after the input."""
    return float(_initializers(path)["input_scale"])


# ---- quantize.static

def test_static_quantizes_every_layer_to_int8_and_keeps_the_answers(prepared, tmp_path):
    context = _context(tmp_path)
    out = _run("quantize.static", prepared.onnx, tmp_path / "static.onnx", tmp_path, context)
    arrays = _initializers(out)
    weights = {name: a for name, a in arrays.items() if name.endswith(".weight_quantized")}
    assert len(weights) == 4 and all(a.dtype == np.int8 for a in weights.values())  # 2 Conv + 2 Gemm
    assert all(arrays[name.replace("weight", "bias")].dtype == np.int32 for name in weights)  # int32 biases
    # activations are int8 too: a quantize node after the input, the ReLUs and the pooling
    graph = onnx.load(str(out)).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 4
    assert out.stat().st_size < prepared.onnx.stat().st_size / 2.5  # 4x on the weights, less the graph
    assert measure.parameter_counts(out)["params"] == 21546
    assert _agreement(out, prepared.onnx) >= 0.98
    assert context.notes == ["Activation ranges calibrated (MinMax) on 128 samples of 1257 training images."]
    assert not list(tmp_path.glob("*.onnx.data"))


def test_static_calibrates_on_the_fitting_split_it_is_given(prepared, tmp_path):
    train = tasks.fit_set("digits", MODEL, None)
    assert train.inputs["input"].max() == 1.0  # the pixel range 0..1 of every split
    _run("quantize.static", prepared.onnx, tmp_path / "own.onnx", tmp_path, calibration_samples=64)
    assert _input_scale(tmp_path / "own.onnx") == pytest.approx(1.0 / 255, rel=1e-4)
    # A fitting split at half brightness: the input range follows it, not the scored test images.
    dim = EvalSet(inputs={"input": train.inputs["input"] * 0.5}, labels=train.labels,
                  extra={"data": "a dimmed copy of the training images", "overlaps_scoring": True})
    context = _context(tmp_path, fit_set=dim)
    _run("quantize.static", prepared.onnx, tmp_path / "dim.onnx", tmp_path, context, calibration_samples=64)
    assert _input_scale(tmp_path / "dim.onnx") == pytest.approx(0.5 / 255, rel=1e-4)
    note = context.notes[0]
    assert "on 64 samples of a dimmed copy of the training images" in note
    assert "also the ones the score is computed on" in note


def test_static_uses_the_chosen_samples_only(prepared, tmp_path):
    train = tasks.fit_set("digits", MODEL, None)
    images = train.inputs["input"] * 0.5
    images[1] *= 4.0  # one bright image, which 8 evenly spread samples (0, 179, ...) leave out
    bright = EvalSet(inputs={"input": images}, labels=train.labels, extra={"data": "test images"})
    out = _run("quantize.static", prepared.onnx, tmp_path / "few.onnx", tmp_path,
               _context(tmp_path, fit_set=bright), calibration_samples=8)
    assert _input_scale(out) == pytest.approx(0.5 / 255, rel=1e-4)
    out = _run("quantize.static", prepared.onnx, tmp_path / "all.onnx", tmp_path,
               _context(tmp_path, fit_set=bright), calibration_samples=2048)  # more than there are: all
    assert _input_scale(out) == pytest.approx(images.max() / 255, rel=1e-4) and images.max() > 1.0


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_static_histogram_calibration_clips_ranges_and_stays_accurate(prepared, tmp_path, method):
    minmax = _run("quantize.static", prepared.onnx, tmp_path / "minmax.onnx", tmp_path)
    clipped = _run("quantize.static", prepared.onnx, tmp_path / "clipped.onnx", tmp_path,
                   calibrate_method=method, percentile=99.9)
    scales = {name: float(a) for name, a in _initializers(minmax).items() if name.endswith("_output_0_scale")}
    clipped_scales = {name: float(a) for name, a in _initializers(clipped).items() if name in scales}
    assert clipped_scales.keys() == scales.keys()
    # a searched or percentile range is never wider than the full one, and narrower for some activations
    assert all(clipped_scales[n] <= scales[n] * 1.0001 for n in scales)
    assert any(clipped_scales[n] < 0.9 * scales[n] for n in scales)
    assert _agreement(clipped, prepared.onnx) >= 0.95


def test_static_keeps_named_nodes_in_float_and_names_real_ones_when_wrong(prepared, tmp_path):
    out = _run("quantize.static", prepared.onnx, tmp_path / "keep.onnx", tmp_path,
               keep_float_nodes=["/features/features.0/Conv", "/classifier/classifier.3/Gemm"])
    arrays = _initializers(out)
    assert arrays["features.0.weight"].dtype == np.float32 and "features.0.weight_quantized" not in arrays
    assert arrays["classifier.3.weight"].dtype == np.float32
    assert arrays["features.2.weight_quantized"].dtype == np.int8
    with pytest.raises(UserError, match=r"no node named 'conv1'.*/features/features.0/Conv"):
        _run("quantize.static", prepared.onnx, tmp_path / "bad.onnx", tmp_path, keep_float_nodes=["conv1"])
    with pytest.raises(UserError, match=r"No layer was quantized: the chosen operators \(Gather\).*Conv, Gemm"):
        _run("quantize.static", prepared.onnx, tmp_path / "none.onnx", tmp_path, operators=["Gather"])


def test_static_one_layer_at_a_time_calibrates_once_per_setting_and_samples(prepared, tmp_path):
    """A sensitivity scan quantizes each layer alone: the ranges are measured once and reused."""
    context = _context(tmp_path)
    layers = REGISTRY["quantize.static"].layer_names(prepared.onnx)
    assert len(layers) == 4
    for index, layer in enumerate(layers[:2]):
        params = {**_params("quantize.static", calibration_samples=64), "only_layers": [layer]}
        REGISTRY["quantize.static"].apply(prepared.onnx, tmp_path / f"one{index}.onnx", params, context)
        caches = list(tmp_path.glob("static_calibration_*.json"))
        if index == 0:
            first = (caches[0], caches[0].stat().st_mtime_ns)
        assert [(c, c.stat().st_mtime_ns) for c in caches] == [first]
        quantized = [n for n in _initializers(tmp_path / f"one{index}.onnx") if n.endswith("weight_quantized")]
        assert len(quantized) == 1  # only this layer's weight (and its bias)
    # other samples are other ranges: a second cache, not the first one reused
    params = {**_params("quantize.static", calibration_samples=32), "only_layers": [layers[0]]}
    REGISTRY["quantize.static"].apply(prepared.onnx, tmp_path / "fewer.onnx", params, context)
    assert len(list(tmp_path.glob("static_calibration_*.json"))) == 2


def test_static_runs_as_a_job_and_reports_what_it_calibrated_on(prepared, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(prepared.home, home)
    store = ArtifactStore(home)
    recipe = validate_recipe({"steps": [{"method": "quantize.static"}]}, prepared.model, ["digits", "fidelity"])
    run = pipeline.compress(store, dict(prepared.model), recipe, "run-static", lambda f, m: None)["run"]
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["size_bytes"] < baseline["size_bytes"] / 2.5
    assert metrics["fidelity"] >= 0.98 and metrics["score"] >= baseline["score"] - 0.02
    assert metrics["notes"] == ["Activation ranges calibrated (MinMax) on 128 samples of 1257 training images."]


# ---- quantize.int4_weights

def test_int4_stores_the_linear_layers_in_4_bits_and_leaves_convolutions(prepared, tmp_path):
    context = _context(tmp_path)
    out = _run("quantize.int4_weights", prepared.onnx, tmp_path / "int4.onnx", tmp_path, context)
    graph = onnx.load(str(out)).graph
    ops = [node.op_type for node in graph.node]
    # the two Gemm layers became MatMul + Add and then 4-bit MatMulNBits; the convolutions stay float
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops and ops.count("Conv") == 2
    arrays = _initializers(out)
    assert arrays["features.0.weight"].dtype == np.float32
    assert "classifier.1.weight" not in arrays and arrays["classifier.1.weight_Q4"].dtype == np.uint8
    # the linear layers hold 16746 of the 21546 parameters: 67 KB of floats become about 10 KB
    assert out.stat().st_size < prepared.onnx.stat().st_size / 2.3
    assert _agreement(out, prepared.onnx) >= 0.97
    assert context.notes == ["2 linear layers stored in 4 bits (blocks of 32); everything else stays float."]
    # 4-bit weights are unpacked when counting: every parameter is still counted once, scales are not
    assert measure.parameter_counts(out)["params"] == 21546


def test_int4_block_size_and_symmetry_trade_size(prepared, tmp_path):
    sizes = {}
    for block, symmetric in [(16, False), (128, False), (128, True)]:
        out = _run("quantize.int4_weights", prepared.onnx, tmp_path / f"b{block}{symmetric}.onnx", tmp_path,
                   block_size=block, symmetric=symmetric)
        sizes[block, symmetric] = out.stat().st_size
        nodes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
        assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute
                if a.name == "block_size"} == {block}
        assert all(len(n.input) == (3 if symmetric else 4) for n in nodes)  # zero points only when asymmetric
        assert _agreement(out, prepared.onnx) >= 0.9
    assert sizes[16, False] > sizes[128, False] > sizes[128, True]


def test_int4_refuses_a_model_without_linear_layers_it_can_quantize(prepared, tmp_path):
    with pytest.raises(UserError, match="needs linear layers.*Conv, Gemm"):
        _run("quantize.int4_weights", prepared.onnx, tmp_path / "none.onnx", tmp_path,
             keep_float_nodes=["/classifier/classifier.1/Gemm", "/classifier/classifier.3/Gemm"])
    with pytest.raises(UserError, match="no node named 'fc1'"):
        _run("quantize.int4_weights", prepared.onnx, tmp_path / "bad.onnx", tmp_path, keep_float_nodes=["fc1"])


# ---- both: what is refused

def test_an_already_quantized_model_is_refused(prepared, tmp_path):
    static = _run("quantize.static", prepared.onnx, tmp_path / "static.onnx", tmp_path)
    int4 = _run("quantize.int4_weights", prepared.onnx, tmp_path / "int4.onnx", tmp_path)
    dynamic = tmp_path / "dynamic.onnx"
    REGISTRY["quantize.dynamic"].apply(prepared.onnx, dynamic, _params("quantize.dynamic"), _context(tmp_path))
    for method in ("quantize.static", "quantize.int4_weights"):
        for source in (static, int4, dynamic):
            with pytest.raises(UserError, match="already quantized"):
                _run(method, source, tmp_path / "twice.onnx", tmp_path)


@pytest.mark.parametrize("method, params, message", [
    ("quantize.static", {"calibration_samples": 0}, "'calibration_samples' must be between 8 and 2048"),
    ("quantize.static", {"calibration_samples": 12.5}, "must be a whole number"),
    ("quantize.static", {"calibrate_method": "Distribution"}, "must be one of MinMax, Entropy, Percentile"),
    ("quantize.static", {"percentile": 50}, "'percentile' must be between 99 and 100"),
    ("quantize.static", {"operators": ["Softmax"]}, "unknown choice 'Softmax'"),
    ("quantize.static", {"operators": []}, "needs at least one choice"),
    ("quantize.static", {"activation_type": "int4"}, "must be one of uint8, int8"),
    ("quantize.static", {"calibration": 64}, "has no parameter 'calibration'"),
    ("quantize.int4_weights", {"block_size": 48}, "'block_size' must be one of 16, 32, 64, 128"),
    ("quantize.int4_weights", {"symmetric": "yes"}, "must be true or false"),
    ("quantize.int4_weights", {"keep_float_nodes": 3}, "must be a list of names"),
])
def test_bad_parameters_are_refused_at_submit(method, params, message):
    with pytest.raises(UserError, match=message):
        _params(method, **params)


def test_a_second_quantizer_after_these_is_refused_at_submit():
    for first in ("quantize.static", "quantize.int4_weights"):
        with pytest.raises(UserError, match="already turned them into integers"):
            validate_recipe({"steps": [{"method": first}, {"method": "quantize.dynamic"}]}, MODEL, ["digits"])


def test_static_refuses_int8_activations_with_uint8_weights(prepared, tmp_path):
    with pytest.raises(UserError, match="cannot combine int8 activations with uint8 weights"):
        _run("quantize.static", prepared.onnx, tmp_path / "mixed.onnx", tmp_path,
             activation_type="int8", weight_type="uint8")


def test_dynamic_can_store_its_kept_layers_as_4_bit_weights(prepared, tmp_path):
    """quantize.dynamic with `kept_nodes_as: 4-bit weights`: the kept linear layer computes in float on
    weights stored in 4 bits (MatMulNBits), the rest is int8, and a kept convolution stays float."""
    kept = ["/classifier/classifier.3/Gemm", "/features/features.0/Conv"]
    in_float = _run("quantize.dynamic", prepared.onnx, tmp_path / "float.onnx", tmp_path,
                    operators=["MatMul", "Conv"], keep_float_nodes=kept)
    context = _context(tmp_path)
    in_4_bits = _run("quantize.dynamic", prepared.onnx, tmp_path / "four.onnx", tmp_path, context,
                     operators=["MatMul", "Conv"], keep_float_nodes=kept, kept_nodes_as="4-bit weights")
    ops = [node.op_type for node in onnx.load(str(in_4_bits)).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulInteger") == 1  # classifier.3 / classifier.1
    assert ops.count("ConvInteger") == 1 and ops.count("Conv") == 1  # features.2 int8, features.0 kept float
    arrays = _initializers(in_4_bits)
    assert arrays["classifier.3.weight_Q4"].dtype == np.uint8 and arrays["features.0.weight"].dtype == np.float32
    assert in_4_bits.stat().st_size < in_float.stat().st_size
    assert _agreement(in_4_bits, prepared.onnx) >= 0.97
    assert context.notes == [
        "quantize.dynamic kept 1 linear layer(s) out of int8 and stored their weights in 4 bits (blocks of 16, "
        "float arithmetic): /classifier/classifier.3/Gemm.",
        "quantize.dynamic kept 1 node(s) in float: /features/features.0/Conv."]
    with pytest.raises(UserError, match="must be one of float, 4-bit weights"):
        _params("quantize.dynamic", kept_nodes_as="int2")


# ---- a transformer: 4-bit embedding tables

def test_int4_with_embeddings_shrinks_minilm_six_fold_and_stays_close(tmp_path):
    adapter = zoo.get_adapter("minilm-l6")
    source = export_onnx(adapter.create(lambda f, m: None), adapter, tmp_path / "minilm.onnx")
    model = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
    context = pipeline.StepContext(model_id="minilm-l6", scratch=tmp_path, progress=lambda f, m: None,
                                   model=model, task="pydoc-retrieval")
    out = tmp_path / "int4.onnx"
    REGISTRY["quantize.int4_weights"].apply(
        source, out, _params("quantize.int4_weights", model, quantize_embeddings=True), context)
    converted = onnx.load(str(out))
    ops = [node.op_type for node in converted.graph.node]
    # 36 linear layers and the word, position and token-type tables; the graph was converted to opset 21
    # first (the quantizer only relabels it, which left MiniLM's ReduceL2 invalid)
    assert ops.count("MatMulNBits") == 36 and ops.count("GatherBlockQuantized") == 3
    assert next(o.version for o in converted.opset_import if o.domain == "") == 21
    assert out.stat().st_size < source.stat().st_size / 5.5  # 86 MB -> about 14 MB
    texts = tasks.eval_set("pydoc-retrieval", "minilm-l6").extra["texts"][:64]
    feed = adapter.encode(texts)
    expected = measure.fresh_session(source).run(None, feed)[0]
    got = measure.fresh_session(out).run(None, feed)[0]
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.mean() > 0.95 and cosine.min() > 0.8  # measured: 0.97 and 0.90 over the scored split
    assert context.notes[0].startswith("36 linear layers and 3 embedding tables stored in 4 bits")
