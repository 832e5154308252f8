"""prune.structured on real models: digits-cnn (trained once for the module) through whole compress
jobs, the speech encoder's layout on a small untrained SpeechEncoder (checked exactly against the
original with the removed heads and neurons silenced), and the real all-MiniLM-L6-v2 in one test."""
from __future__ import annotations


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

pytestmark = pytest.mark.slow
METHOD = "prune.structured"
DIGITS = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
          "artifact": None}
MINILM = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "ready"}


@pytest.fixture
def prepared(digits_prepared):
    return digits_prepared


@pytest.fixture
def store(digits_store):
    return digits_store


def _params(model: dict, task: str, **params) -> dict:
    recipe = validate_recipe({"steps": [{"method": METHOD, "params": params}]}, model, [task, "fidelity"])
    return recipe["steps"][0]["params"]


def _compress(store, prepared, **params) -> dict:
    recipe = validate_recipe({"steps": [{"method": METHOD, "params": params}]}, DIGITS, ["digits", "fidelity"])
    return pipeline.compress(store, dict(prepared.model), recipe, "run", lambda f, m: None)["run"]


def _context(tmp_path, model: dict, adapter, architecture: str):
    return pipeline.StepContext(model_id=model["id"], scratch=tmp_path, progress=lambda f, m: None, model=model,
                                task=model["task"], adapter=adapter, architecture=architecture)


def _weight_shapes(path) -> dict:
    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t).shape for t in graph.initializer if t.name.endswith("weight")}


# ---- digits-cnn ----------------------------------------------------------------------------------

def test_half_the_channels_of_the_digits_cnn_go_and_the_export_runs(store, prepared):
    run = _compress(store, prepared, amount=0.5)
    path = store.resolve(run["artifact"])
    # Every inner layer keeps half its outputs; the image's one channel and the 10 classes stay.
    assert _weight_shapes(path) == {"features.0.weight": (8, 1, 3, 3), "features.2.weight": (16, 8, 3, 3),
                                    "classifier.1.weight": (16, 16 * 4 * 4), "classifier.3.weight": (10, 16)}
    metrics, baseline = run["metrics"], run["baseline"]
    expected = 8 * 9 + 8 + 16 * 8 * 9 + 16 + 16 * 256 + 16 + 10 * 16 + 10
    assert metrics["params"] == expected == 5530 and baseline["params"] == 21546
    assert metrics["nonzero_params"] > 0.99 * metrics["params"]  # removed, not zeroed
    assert metrics["size_bytes"] < 0.35 * baseline["size_bytes"]
    outputs = measure.run_outputs(measure.session(path), tasks.eval_set("digits", "digits-cnn"))
    assert outputs.shape == (540, 10) and np.isfinite(outputs).all()
    note = metrics["notes"][0]
    assert "features.0 16 -> 8" in note and "21,546 -> 5,530 parameters" in note and "recovery training" in note


def test_a_mild_setting_keeps_the_digits_answers(store, prepared):
    run = _compress(store, prepared, amount=0.15)
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["params"] < 0.8 * baseline["params"]
    assert metrics["score"] > baseline["score"] - 0.03
    assert metrics["fidelity"] > 0.95


def test_round_to_keeps_channel_counts_multiples(store, tmp_path):
    net = pipeline._load_torch_model(store, "digits-cnn")
    context = _context(tmp_path, DIGITS, zoo.get_adapter("digits-cnn"), "cnn")
    REGISTRY[METHOD].apply(net, _params(DIGITS, "digits", amount=0.3, round_to=8, importance="l1"), context)
    # 16 * 0.7 = 11.2 and 32 * 0.7 = 22.4 channels, rounded down to multiples of 8
    assert [net.features[0].out_channels, net.features[2].out_channels, net.classifier[1].out_features] == [8, 16, 16]
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_a_cnn_has_no_heads_to_remove(store, tmp_path):
    net = pipeline._load_torch_model(store, "digits-cnn")
    context = _context(tmp_path, DIGITS, zoo.get_adapter("digits-cnn"), "cnn")
    with pytest.raises(UserError, match="no attention heads"):
        REGISTRY[METHOD].apply(net, _params(DIGITS, "digits", target="heads"), context)


def test_refitting_keeps_more_of_the_digits_answers(store, tmp_path):
    evaluation = tasks.eval_set("digits", "digits-cnn")
    images = torch.from_numpy(evaluation.inputs["input"])
    accuracy = {}
    for refit in (False, True):
        net = pipeline._load_torch_model(store, "digits-cnn")
        context = _context(tmp_path, DIGITS, zoo.get_adapter("digits-cnn"), "cnn")
        REGISTRY[METHOD].apply(net, _params(DIGITS, "digits", amount=0.5, importance="l2", refit=refit), context)
        with torch.no_grad():
            accuracy[refit] = float((net(images).argmax(1).numpy() == evaluation.labels).mean())
    # measured: 0.75 without, 0.91 with (the same channels removed)
    assert accuracy[True] > accuracy[False] + 0.05 and accuracy[True] > 0.85


def test_a_refit_makes_up_exactly_for_an_input_the_kept_ones_predict():
    from services.engine.methods._channel_statistics import ChannelStatistics

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=generator, dtype=torch.float64)
    x = torch.cat([x, (x[:, :1] + 2 * x[:, 1:2] + 0.5)], 1)  # input 5 is predicted by inputs 0, 1 and the bias
    layer = torch.nn.Linear(6, 3).double()
    expected = layer(x).detach()
    stats = ChannelStatistics()
    stats.count[layer], stats.sums[layer], stats.grams[layer] = len(x), x.sum(0), x.T @ x
    stats.DAMPING = 0.0
    with torch.no_grad():
        stats._refit(layer, [5])
        got = x[:, :5] @ layer.weight[:, :5].T + layer.bias  # input 5 is gone
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("params, message", [
    ({"amount": 0.0}, "between 0.05 and 0.95"),
    ({"amount": 0.99}, "between 0.05 and 0.95"),
    ({"amount": "half"}, "must be a number"),
    ({"target": "layers"}, "must be one of all, neurons, heads"),
    ({"importance": "taylor"}, "must be one of contribution, l2, l1"),
    ({"round_to": 0}, "between 1 and 64"),
    ({"round_to": 2.5}, "whole number"),
    ({"refit": "yes"}, "true or false"),
])
def test_bad_parameters_are_refused_with_a_clear_message(params, message):
    with pytest.raises(UserError, match=message):
        _params(DIGITS, "digits", **params)


# ---- the speech encoder's layout -----------------------------------------------------------------

def _silenced(original, pruned):
    """The original model with, in every layer, the heads and feed-forward neurons that `pruned`
    no longer has switched off (their columns of the output projection zeroed)."""
    import copy

    reference = copy.deepcopy(original)
    with torch.no_grad():
        for layer, kept_layer in zip(reference.layers, pruned.layers):
            head_size = layer.attention.query.out_features // layer.attention.heads
            kept_heads = {_row(layer.attention.query.weight, w) // head_size
                          for w in kept_layer.attention.query.weight}
            for head in set(range(layer.attention.heads)) - kept_heads:
                layer.attention.out.weight[:, head * head_size:(head + 1) * head_size] = 0
            kept_neurons = {_row(layer.ff_in.weight, w) for w in kept_layer.ff_in.weight}
            for neuron in set(range(layer.ff_in.out_features)) - kept_neurons:
                layer.ff_out.weight[:, neuron] = 0
    return reference


def _row(matrix, row) -> int:
    return int(torch.nonzero((matrix == row).all(1))[0, 0])


def test_speech_heads_and_neurons_are_removed_exactly(tmp_path):
    adapter = zoo.get_adapter("speech-ssl")
    torch.manual_seed(0)
    original = adapter.build().eval()  # untrained: the layout is what is tested, not the accuracy
    net = adapter.build().eval()
    net.load_state_dict(original.state_dict())
    model = {"id": "speech-ssl", "format": "torch", "task": "spoken-digits"}
    context = _context(tmp_path, model, adapter, "speech-transformer")
    # Ranked by weight norms and not refitted: no corpus needed, and the result must be exact.
    REGISTRY[METHOD].apply(net, _params(model, "spoken-digits", amount=0.5, importance="l2", refit=False), context)
    for layer in net.layers:
        assert layer.attention.heads == 2 and layer.attention.query.out_features == 64
        assert layer.attention.out.in_features == 64 and layer.ff_in.out_features == 256
        assert layer.attention.out.out_features == 128  # the hidden width is kept
    features, lengths = adapter.example_inputs()
    with torch.no_grad():
        got, expected = net(features, lengths), _silenced(original, net)(features, lengths)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    session = measure.session(export_onnx(net, adapter, tmp_path / "speech.onnx"))
    digits, speakers = session.run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
    assert digits.shape == (2, 160, 11) and speakers.shape == (2, 12)
    np.testing.assert_allclose(digits, got[0].numpy(), rtol=1e-3, atol=1e-3)
    assert "2 of 4 attention heads and 256 of 512 feed-forward neurons in each of the 4 layers" in context.notes[0]


def test_speech_frames_rank_and_refit_the_speech_encoder(tmp_path):
    from services.engine.tasks.base import EvalSet

    adapter = zoo.get_adapter("speech-ssl")
    torch.manual_seed(0)
    net = adapter.build().eval()
    # Made-up log-mel frames stand in for the training utterances (the corpus takes minutes to synthesize).
    generator = np.random.default_rng(0)
    frames = EvalSet(inputs={"features": generator.normal(-5, 1, (40, 160, 80)).astype(np.float32),
                             "lengths": generator.integers(40, 161, 40).astype(np.int64)}, labels=None)
    model = {"id": "speech-ssl", "format": "torch", "task": "spoken-digits"}
    context = pipeline.StepContext(model_id="speech-ssl", scratch=tmp_path, progress=lambda f, m: None, model=model,
                                   task="spoken-digits", adapter=adapter, architecture="speech-transformer",
                                   _fit_set=frames)
    REGISTRY[METHOD].apply(net, _params(model, "spoken-digits", amount=0.25, target="neurons"), context)
    assert [layer.ff_in.out_features for layer in net.layers] == [384] * 4
    assert [layer.attention.heads for layer in net.layers] == [4] * 4
    digits, speakers = net(*adapter.example_inputs())
    assert digits.shape == (2, 160, 11) and torch.isfinite(digits).all()


# ---- text transformers ---------------------------------------------------------------------------

def _encoder_params(net) -> int:
    return sum(p.numel() for p in net.bert.encoder.parameters())


def test_minilm_loses_half_its_encoder_and_a_mild_setting_stays_close(tmp_path):
    adapter = zoo.get_adapter("minilm-l6")
    evaluation = tasks.eval_set("pydoc-retrieval", "minilm-l6")
    feed = {name: values[:48] for name, values in evaluation.inputs.items()}
    original = adapter.create(lambda f, m: None)
    with torch.no_grad():
        reference = original(*(torch.from_numpy(feed[n]) for n in adapter.input_names)).numpy()
    encoder_before = _encoder_params(original)

    heavy = adapter.create(lambda f, m: None)
    context = _context(tmp_path, MINILM, adapter, "text-transformer")
    # What goes does not depend on how it is ranked: weight norms spare the test the fitting samples' pass.
    REGISTRY[METHOD].apply(heavy, _params(MINILM, "pydoc-retrieval", amount=0.5, importance="l2", refit=False),
                           context)
    for layer in heavy.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 6 and attention.all_head_size == attention.query.out_features == 192
        assert layer.intermediate.dense.out_features == 768 and layer.output.dense.out_features == 384
    assert heavy.bert.embeddings.word_embeddings.weight.shape == (30522, 384)
    assert _encoder_params(heavy) / encoder_before == pytest.approx(0.5, abs=0.02)
    assert "6 of 12 attention heads and 768 of 1536 feed-forward neurons" in context.notes[0]

    mild = adapter.create(lambda f, m: None)
    REGISTRY[METHOD].apply(mild, _params(MINILM, "pydoc-retrieval", amount=0.1),
                           _context(tmp_path, MINILM, adapter, "text-transformer"))
    path = export_onnx(mild, adapter, tmp_path / "mild.onnx")
    got = measure.session(path).run(None, feed)[0]  # ONNX Runtime loads and runs the export
    assert got.shape == (48, 384)
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.mean() > 0.95  # measured 0.98 (ranked on the fitting samples and refitted: the defaults)


def test_a_transformer_without_bert_layers_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    from services.engine.hf_import import MeanPooled

    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=16)
    net = MeanPooled(DistilBertModel(config), ["input_ids", "attention_mask"])
    upload = {"id": "upload-1", "format": "torch", "task": "fidelity"}
    with pytest.raises(UserError, match="this distilbert model is laid out differently"):
        REGISTRY[METHOD].apply(net, _params(DIGITS, "digits"), _context(tmp_path, upload, None, "text-transformer"))
