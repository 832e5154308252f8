"""lowrank.svd and share.cluster on real models: digits-cnn (trained once for the module) through
whole compress jobs, and the real all-MiniLM-L6-v2 (one test per method, exported and run in ONNX
Runtime against the original on a few sentences)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from services.engine import measure, pipeline, tasks
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.engine.methods.lowrank_svd import _factorize, decompose
from services.engine.methods.share_cluster import fit_codebook
from services.errors import UserError
from services.recipes import validate_recipe

pytestmark = pytest.mark.slow
DIGITS = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
          "artifact": None}
MINILM = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "ready"}


@pytest.fixture
def prepared(digits_prepared):
    return digits_prepared


@pytest.fixture
def store(digits_store):
    return digits_store


def _recipe(*steps, model=DIGITS, task_names=("digits", "fidelity")):
    return validate_recipe({"steps": [{"method": name, "params": params} for name, params in steps]},
                           model, list(task_names))


def _compress(store, prepared, *steps) -> dict:
    return pipeline.compress(store, dict(prepared.model), _recipe(*steps), "run", lambda f, m: None)["run"]


def _context(tmp_path, adapter=None):
    return pipeline.StepContext(model_id="x", scratch=tmp_path, progress=lambda f, m: None, adapter=adapter)


def _refusal(method: str, params: dict) -> str:
    with pytest.raises(UserError) as caught:
        _recipe((method, params))
    return str(caught.value)


# ---- lowrank.svd ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, input_shape", [
    (torch.nn.Linear(40, 24), (3, 40)),
    (torch.nn.Conv2d(6, 10, 3, stride=2, padding=1), (3, 6, 9, 9)),
    (torch.nn.Conv1d(5, 12, 5, padding=2, dilation=2), (3, 5, 16)),
])
def test_a_full_rank_split_computes_the_same_layer(layer, input_shape):
    matrix = layer.weight.detach().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    split = _factorize(layer, min(matrix.shape), u, s, vh)
    x = torch.randn(*input_shape)
    with torch.no_grad():
        torch.testing.assert_close(split(x), layer(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(split.weight, layer.weight, rtol=1e-4, atol=1e-5)  # what model code may read
    assert type(split[0]) is type(layer) and split[0].bias is None and split[1].bias is not None
    if not isinstance(layer, torch.nn.Linear):
        assert split[1].kernel_size == (1,) * (layer.weight.dim() - 2)  # the pointwise half


def test_a_calibrated_split_fits_the_layer_on_its_inputs():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    # real activations are far from isotropic: here they lie close to a 16-dimensional subspace
    inputs = torch.randn(4000, 16) @ torch.randn(16, 64) + 0.05 * torch.randn(4000, 64)
    covariance = (inputs.T @ inputs).double()
    with torch.no_grad():
        wanted = layer(inputs)
        full = _factorize(layer, 48, *decompose(layer.weight, covariance))  # exact at full rank
        torch.testing.assert_close(full(inputs), wanted, rtol=1e-3, atol=1e-3)
        calibrated = _factorize(layer, 12, *decompose(layer.weight, covariance))(inputs)
        weights_only = _factorize(layer, 12, *decompose(layer.weight))(inputs)
    assert (calibrated - wanted).norm() < 0.5 * (weights_only - wanted).norm()  # measured 0.37


def test_lowrank_shrinks_the_digits_cnn_and_says_what_it_did(store, prepared):
    run = _compress(store, prepared, ("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.25}))
    metrics, baseline = run["metrics"], run["baseline"]
    # conv 16->32 (4,608 weights) and linear 512->32 (16,384) at rank 8 of 32; the two small layers stay
    assert metrics["params"] == baseline["params"] - (4608 + 16384) + 8 * (144 + 32) + 8 * (512 + 32)
    assert metrics["size_bytes"] < 0.5 * baseline["size_bytes"]
    assert metrics["fidelity"] > 0.3  # it runs in ONNX Runtime and still classifies; rank 8 is harsh
    [note] = metrics["notes"]
    assert "factorized 2 of 4 layers" in note and "2 have fewer than 4,096 weights" in note
    assert "fitted to the layers' inputs on 128 samples of the fitting split" in note


def test_lowrank_at_a_mild_setting_stays_close(store, prepared):
    run = _compress(store, prepared, ("lowrank.svd", {"mode": "energy", "energy": 0.95, "min_weights": 0}))
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["params"] < 0.9 * baseline["params"]
    assert metrics["fidelity"] > 0.95 and abs(metrics["score"] - baseline["score"]) < 0.05


def test_lowrank_refuses_a_setting_that_shrinks_nothing(store, tmp_path):
    net = pipeline._load_torch_model(store, "digits-cnn")
    with pytest.raises(UserError, match="No layer was factorized.*lower 'rank_ratio'"):
        params = _recipe(("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 1.0}))["steps"][0]["params"]
        REGISTRY["lowrank.svd"].apply(net, params, _context(tmp_path))
    with pytest.raises(UserError, match="no convolution layers"):
        REGISTRY["lowrank.svd"].apply(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                                      {"mode": "rank_ratio", "rank_ratio": 0.1, "energy": 0.9, "min_weights": 0,
                                       "layers": "conv"}, _context(tmp_path))


def test_lowrank_then_cluster_then_nothing_float(store, prepared):
    run = _compress(store, prepared, ("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.5}),
                    ("share.cluster", {"clusters": 32}))
    assert run["metrics"]["size_bytes"] < 0.25 * run["baseline"]["size_bytes"]
    with pytest.raises(UserError, match="needs float weights"):
        _recipe(("share.cluster", {}), ("lowrank.svd", {}))
    with pytest.raises(UserError, match="needs float weights"):
        _recipe(("share.cluster", {}), ("quantize.dynamic", {}))


@pytest.mark.parametrize("method, params", [("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.25}),
                                            ("share.cluster", {"clusters": 8})])
def test_a_layer_run_twice_is_replaced_everywhere_and_a_tied_weight_is_left_alone(method, params, tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(100, 64)
            shared = torch.nn.Linear(64, 64)  # one layer object at two places, as share.layers leaves it
            self.blocks = torch.nn.ModuleList([shared, shared])
            self.head = torch.nn.Linear(64, 100, bias=False)
            self.head.weight = self.embedding.weight  # tied, as in a language model

        def forward(self, ids):
            x = self.embedding(ids)
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.head(x)

    net = Tiny()
    context = _context(tmp_path)
    REGISTRY[method].apply(net, {"layers": "all", "min_weights": 0, "mode": "rank_ratio", "energy": 0.9,
                                 "calibrate": False, **params}, context)
    assert net.blocks[0] is net.blocks[1] and not isinstance(net.blocks[0], torch.nn.Linear)
    assert isinstance(net.head, torch.nn.Linear) and net.head.weight is net.embedding.weight
    assert "share their weights with another layer" in context.notes[0]
    assert net(torch.tensor([[1, 2, 3]])).shape == (1, 3, 100)


# ---- share.cluster -------------------------------------------------------------------------------

def test_fit_codebook_keeps_zeros_and_uses_at_most_k_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(300, 200)).astype(np.float32)
    values[np.abs(values) < 0.3] = 0.0  # as a pruning step leaves them
    codebook, indices = fit_codebook(values, 16)
    assert indices.dtype == np.uint8 and codebook[0] == 0.0 and len(codebook) == 17
    decoded = codebook[indices]
    assert np.array_equal(decoded == 0, values == 0)  # zeros stay zeros, nothing else becomes zero
    assert len(np.unique(decoded[values != 0])) <= 16
    assert np.sqrt(np.mean((decoded - values) ** 2)) < 0.1 * values.std()  # k-means: a small mean error
    few = np.array([[0.5, -0.25, 0.5], [0.0, 1.0, -0.25]], np.float32)  # fewer distinct values than k: exact
    codebook, indices = fit_codebook(few, 16)
    assert np.array_equal(codebook[indices], few)


def test_cluster_makes_the_digits_file_smaller_and_keeps_its_answers(store, prepared):
    run = _compress(store, prepared, ("share.cluster", {"clusters": 64}))
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["size_bytes"] < 0.4 * baseline["size_bytes"]
    assert metrics["zipped_bytes"] < 0.5 * baseline["zipped_bytes"]
    # same weights counted (as 8-bit indices), plus a 65-value table for each of the two clustered layers
    assert metrics["params"] == baseline["params"] + 2 * 65
    assert metrics["nonzero_params"] >= 0.99 * baseline["nonzero_params"]
    assert metrics["fidelity"] > 0.98 and abs(metrics["score"] - baseline["score"]) < 0.02
    graph = onnx.load(str(store.resolve(run["artifact"]))).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    indices = {n: a for n, a in tensors.items() if n.endswith(".weight_quantized")}
    assert sorted(indices) == ["classifier.1.weight_quantized", "features.2.weight_quantized"]
    for name, array in indices.items():  # at most 64 shared values per layer (index 0 = exact zero, unused)
        codebook = tensors[name.replace("weight_quantized", "codebook")]
        assert array.dtype == np.uint8 and len(np.unique(codebook[array])) <= 64
    assert "2 layers" in metrics["notes"][0] and "at most 64 shared values" in metrics["notes"][0]


def test_cluster_after_pruning_keeps_the_pruned_zeros(store, prepared, tmp_path):
    run = _compress(store, prepared, ("prune.magnitude", {"amount": 0.7}), ("share.cluster", {"clusters": 8}))
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["nonzero_params"] < 0.35 * baseline["nonzero_params"]  # the zeros survived clustering
    assert "pruned weights kept at 0" in metrics["notes"][-1]
    graph = onnx.load(str(store.resolve(run["artifact"]))).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    decoded = tensors["classifier.1.codebook"][tensors["classifier.1.weight_quantized"]]
    assert 0.6 < np.mean(decoded == 0) and len(np.unique(decoded)) <= 9  # 8 shared values and the zero


def test_bad_parameters_are_refused_with_a_clear_message():
    assert "between 0.01 and 1" in _refusal("lowrank.svd", {"rank_ratio": 0})
    assert "between 0.01 and 1" in _refusal("lowrank.svd", {"rank_ratio": 1.5})
    assert "one of rank_ratio, energy" in _refusal("lowrank.svd", {"mode": "rank"})
    assert "one of all, linear, conv" in _refusal("lowrank.svd", {"layers": "embeddings"})
    assert "between 0.1 and 0.9999" in _refusal("lowrank.svd", {"energy": 1.0})
    assert "between 2 and 255" in _refusal("share.cluster", {"clusters": 1})
    assert "between 2 and 255" in _refusal("share.cluster", {"clusters": 256})
    assert "whole number" in _refusal("share.cluster", {"clusters": 15.5})
    assert "has no parameter 'bits'" in _refusal("share.cluster", {"bits": 4})


# ---- minilm-l6 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2, its ONNX export and its embeddings of a few fitting-split texts."""
    from services.engine import zoo

    folder = tmp_path_factory.mktemp("minilm")
    adapter = zoo.get_adapter("minilm-l6")
    texts = tasks.fit_set("pydoc-retrieval", MINILM, None).extra["texts"][:24]
    feed = adapter.encode(texts)
    original = export_onnx(adapter.create(lambda f, m: None), adapter, folder / "original.onnx")
    return SimpleNamespace(adapter=adapter, feed=feed, original=original,
                           reference=measure.session(original).run(None, feed)[0])


def _compress_minilm(minilm, tmp_path, method, params):
    net = minilm.adapter.create(lambda f, m: None)
    context = pipeline.StepContext(model_id="minilm-l6", scratch=tmp_path, progress=lambda f, m: None, model=MINILM,
                                   task="pydoc-retrieval", adapter=minilm.adapter)
    clean = _recipe((method, params), model=MINILM, task_names=("pydoc-retrieval",))["steps"][0]["params"]
    REGISTRY[method].apply(net, clean, context)
    path = export_onnx(net, minilm.adapter, tmp_path / "out.onnx")
    got = measure.session(path).run(None, minilm.feed)[0]  # ONNX Runtime loads and runs the export
    cosine = (got * minilm.reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(minilm.reference, axis=1)
    return net, path, cosine, context.notes


def test_lowrank_on_minilm_factorizes_the_wide_layers(minilm, tmp_path):
    net, path, cosine, notes = _compress_minilm(minilm, tmp_path, "lowrank.svd",
                                                {"mode": "rank_ratio", "rank_ratio": 0.6})
    # at 60% of the rank only the 384 <-> 1536 feed-forward layers get smaller (230 * 1920 < 384 * 1536);
    # the square attention layers and the word embeddings stay
    layer = net.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, torch.nn.Sequential) and layer.intermediate.dense[0].out_features == 230
    assert isinstance(layer.attention.self.query, torch.nn.Linear)
    assert isinstance(net.bert.embeddings.word_embeddings, torch.nn.Embedding)
    saved = 12 * (384 * 1536 - 230 * (384 + 1536))
    assert measure.parameter_counts(path)["params"] == measure.parameter_counts(minilm.original)["params"] - saved
    assert "factorized 12 of 36 layers" in notes[0] and "24 would not get smaller" in notes[0]
    assert "fitted to the layers' inputs on 128 samples" in notes[0]  # calibrated on the fitting split
    assert cosine.mean() > 0.9


def test_cluster_on_minilm_shrinks_the_file_and_stays_close(minilm, tmp_path):
    _, path, cosine, notes = _compress_minilm(minilm, tmp_path, "share.cluster", {"clusters": 64})
    original = measure.file_sizes(minilm.original)
    clustered = measure.file_sizes(path)
    # 36 layers, 10.6 M weights: 4 bytes -> 1 byte each (-31.9 MB); the embeddings (12 M floats) stay
    assert clustered["size_bytes"] < original["size_bytes"] - 31e6
    assert clustered["zipped_bytes"] < 0.65 * original["zipped_bytes"]
    assert "36 layers" in notes[0]
    assert cosine.mean() > 0.99 and cosine.min() > 0.97


# ---- speech-transformer: the speech encoder's structure, untrained (training takes minutes) -------

@pytest.mark.parametrize("method, params", [("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.25}),
                                            ("share.cluster", {"clusters": 16})])
def test_both_methods_handle_the_speech_encoder(method, params, tmp_path):
    from services.engine.families.speech import SpeechAdapter

    adapter = SpeechAdapter()
    torch.manual_seed(0)
    net = adapter.build().eval()
    original = measure.session(export_onnx(net, adapter, tmp_path / "original.onnx"))
    feed = {"features": adapter.example_inputs()[0].numpy(), "lengths": adapter.example_inputs()[1].numpy()}
    context = _context(tmp_path, adapter)  # no task: lowrank falls back to the weights alone
    REGISTRY[method].apply(net, _recipe((method, params))["steps"][0]["params"], context)
    changed = measure.session(export_onnx(net, adapter, tmp_path / "changed.onnx"))
    before, after = original.run(None, feed), changed.run(None, feed)
    assert [a.shape for a in after] == [b.shape for b in before]  # both outputs, same shapes
    assert "layers" in context.notes[0]
    sizes = measure.file_sizes(tmp_path / "changed.onnx"), measure.file_sizes(tmp_path / "original.onnx")
    assert sizes[0]["size_bytes"] < 0.7 * sizes[1]["size_bytes"]
