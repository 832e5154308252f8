"""Choosing which samples to label or calibrate on (services/engine/selection.py), and the two-headed
digits-multitask model it was built for: prepared once for the module by the real engine (a few seconds),
exported with both heads, scored on digits and digits-parity, compressed and calibrated by selection."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from services.engine import measure, pipeline, selection, tasks, zoo
from services.engine.families.digits import PARITY_COUPLING
from services.engine.methods import REGISTRY
from services.recipes import validate_recipe
from storage import ArtifactStore

MULTITASK = {"id": "digits-multitask", "name": "Digits multi-task CNN", "format": "torch", "task": "digits",
             "status": "new", "artifact": None}
TASKS = ["digits", "digits-parity", "fidelity"]


def _logits(rng, n: int, classes: int) -> np.ndarray:
    return rng.normal(size=(n, classes)).astype(np.float32)


# ---- budgets and picks -----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", selection.STRATEGIES)
@pytest.mark.parametrize("budget, expected", [(0.1, 50), (1.0, 500), (37, 37), (500, 500), (1, 1)])
def test_every_strategy_returns_exactly_the_budget_of_distinct_samples(strategy, budget, expected):
    rng = np.random.default_rng(0)
    outputs = [_logits(rng, 500, 10), _logits(rng, 500, 2)]
    original = [_logits(rng, 500, 10)]
    count = selection.budget_count(budget, 500)
    chosen, note = selection.choose_from_outputs(strategy, count, outputs, original, PARITY_COUPLING, seed=3)
    assert count == expected and len(chosen) == expected == len(np.unique(chosen))
    assert np.all(np.diff(chosen) > 0) and chosen.min() >= 0 and chosen.max() < 500
    assert note.startswith(f"{expected} of 500 samples")
    # the same seed picks the same samples; another seed may not (random), ranked ones stay put
    again, _ = selection.choose_from_outputs(strategy, count, outputs, original, PARITY_COUPLING, seed=3)
    assert np.array_equal(chosen, again)


def test_a_fraction_and_a_count_budget():
    assert selection.budget_count(0.25, 1257) == 314
    assert selection.budget_count(1.0, 1257) == 1257  # a share: all of them
    assert selection.budget_count(1, 1257) == 1  # a count: one sample
    assert selection.budget_count(100.0, 1257) == 100  # a whole float above 1 is a count (JSON writes 100.0)


@pytest.mark.parametrize("budget, words", [
    (1258, "only 1257"), (5000, "at most 1257"), (0, "more than zero"), (-0.5, "more than zero"),
    (2.5, "whole"), (0.0001, "less than one sample"), (True, "fraction"), ("10", "fraction"),
    (float("nan"), "more than zero")])
def test_a_budget_the_data_cannot_meet_is_refused_with_a_sentence(budget, words):
    with pytest.raises(ValueError) as caught:
        selection.budget_count(budget, 1257)
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message, message


@pytest.mark.parametrize("model, recovery, words", [
    (MULTITASK, {"objective": "supervised", "label_budget": 5000, "selection": "inconsistency"}, "1257"),
    ({"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "ready"},
     {"objective": "supervised", "label_budget": 10, "selection": "uncertainty"}, "labels")])
def test_a_budget_beyond_the_data_or_labels_the_data_lacks_are_refused_at_submit(model, recovery, words):
    from services.errors import UserError

    with pytest.raises(UserError) as caught:
        validate_recipe({"steps": [{"method": "prune.magnitude"}], "recovery": recovery}, model, [model["task"]])
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message, message


def test_inconsistency_ranks_first_the_samples_whose_heads_break_their_coupling():
    rng = np.random.default_rng(1)
    n = 200
    digits = rng.integers(0, 10, n)
    digit_logits = np.full((n, 10), -4.0, np.float32)
    digit_logits[np.arange(n), digits] = 4.0
    parity_logits = np.where(np.arange(2)[None, :] == (digits % 2)[:, None], 3.0, -3.0).astype(np.float32)
    broken = np.array([5, 17, 42, 99, 150])
    parity_logits[broken] = parity_logits[broken][:, ::-1]  # a confident digit, the other parity
    outputs = [digit_logits, parity_logits]
    scores = selection.scores("inconsistency", outputs, None, PARITY_COUPLING)
    assert set(np.argsort(-scores)[:len(broken)]) == set(broken)
    chosen = selection.pick("inconsistency", len(broken), n, scores, seed=0)
    assert np.array_equal(chosen, broken)
    # uncertainty sees nothing special in them: each head alone is sure
    assert not set(np.argsort(-selection.scores("uncertainty", outputs))[:len(broken)]) >= set(broken)


def test_a_single_head_is_ranked_by_disagreement_with_the_original_and_needs_it():
    rng = np.random.default_rng(2)
    original = _logits(rng, 100, 10)
    compressed = original.copy()
    changed = np.array([3, 30, 60])
    compressed[changed] = np.roll(compressed[changed], 1, axis=1) * 3
    scores = selection.scores("inconsistency", [compressed], [original])
    assert set(np.argsort(-scores)[:3]) == set(changed) and np.allclose(np.delete(scores, changed), 0)
    with pytest.raises(ValueError, match="original"):
        selection.scores("inconsistency", [compressed])
    # a model that answers at fewer positions (pooled frames) is compared by its average per sample
    frames = np.stack([original, original], axis=1)
    assert np.allclose(selection.scores("inconsistency", [original[:, None]], [frames]), 0)
    # nothing compressed yet: no disagreement to rank by, so it says it ranked by uncertainty instead
    chosen, note = selection.choose_from_outputs("inconsistency", 10, [original], [original])
    assert len(chosen) == 10 and "uncertain" in note


def test_a_ranked_pick_covers_every_cluster_with_a_typical_informative_sample():
    rng = np.random.default_rng(4)
    group_a = rng.normal(0, 0.1, size=(6, 2))
    group_a[0] = [0.0, 1.5]  # the most informative of its group, and an outlier in it
    points = np.concatenate([group_a, rng.normal(10, 0.1, size=(6, 2))])
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.2, 0.1])
    assert list(selection.pick("uncertainty", 2, 12, scores)) == [0, 1]  # plain top-k: one group only
    chosen = selection.pick("uncertainty", 2, 12, scores, representation=points)
    assert 1 <= chosen[0] < 6 and chosen[1] == 6  # a sample of each group; the outlier is passed over
    duplicates = np.zeros((12, 2))  # one distinct point: a single cluster, topped up by the best scores
    assert list(selection.pick("uncertainty", 4, 12, scores, representation=duplicates)) == [0, 1, 2, 3]


def test_torch_outputs_match_the_model_and_leave_its_mode_alone():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    x = np.random.default_rng(0).normal(size=(10, 2, 2)).astype(np.float32)
    (out,) = selection.torch_outputs(net, [x], batch=4)
    assert out.shape == (10, 3) and net.training
    assert np.allclose(out, net(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


# ---- digits-multitask --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multitask(tmp_path_factory):
    home = tmp_path_factory.mktemp("multitask") / "home"
    store = ArtifactStore(home)
    result = pipeline.prepare(store, dict(MULTITASK), lambda fraction, message: None)
    model = {**MULTITASK, **result["model_update"]}
    return SimpleNamespace(home=home, store=store, model=model, onnx=store.resolve(model["artifact"]),
                           adapter=zoo.get_adapter("digits-multitask"))


@pytest.mark.slow  # trains digits-multitask once for the module (a few seconds)
def test_digits_multitask_exports_two_heads_and_scores_on_both_tasks(multitask):
    graph = onnx.load(str(multitask.onnx)).graph
    assert [o.name for o in graph.output] == ["digit_logits", "parity_logits"]
    assert multitask.model["card"]["score_name"] == "accuracy" and multitask.model["card"]["score"] > 0.95
    digits, parity = tasks.eval_set("digits", "digits-multitask"), tasks.eval_set("digits-parity", "digits-multitask")
    session = measure.session(multitask.onnx)
    digit_out, parity_out = measure.run_outputs(session, digits), measure.run_outputs(session, parity)
    assert digit_out.shape == (540, 10) and parity_out.shape == (540, 2)
    scored = tasks.score("digits-parity", "digits-multitask", "logits", parity, parity_out, parity_out)
    assert scored["score"] > 0.95 and scored["fidelity"] == 1.0
    # the heads keep their coupling on nearly every held-out image
    assert np.mean(digit_out.argmax(1) % 2 == parity_out.argmax(1)) > 0.95
    with pytest.raises(ValueError, match="parity head"):
        tasks.score("digits-parity", "digits-multitask", "logits", parity, digit_out, digit_out)


@pytest.mark.slow  # trains digits-multitask once for the module (a few seconds)
def test_structured_pruning_keeps_both_heads_whole_and_quantization_calibrates_by_inconsistency(multitask, tmp_path):
    recipe = validate_recipe({"task": "digits-parity", "steps": [
        {"method": "prune.structured", "params": {"amount": 0.5}},
        {"method": "quantize.static", "params": {"calibration_samples": 64, "calibration_selection": "inconsistency"}}]},
        multitask.model, TASKS)
    run = pipeline.compress(multitask.store, dict(multitask.model), recipe, "pruned", lambda f, m: None)["run"]
    path = multitask.store.resolve(run["artifact"])
    outputs = selection.onnx_outputs(path, tasks.eval_set("digits", "digits-multitask").inputs)
    assert [o.shape for o in outputs] == [(540, 10), (540, 2)]
    assert run["metrics"]["score"] > 0.8 and run["metrics"]["score_name"] == "accuracy"
    assert any("64 samples" in note and "two heads" in note for note in run["metrics"]["notes"])


@pytest.mark.slow  # trains digits-multitask once for the module (a few seconds)
def test_static_quantization_calibrates_on_the_most_uncertain_samples(multitask, tmp_path, monkeypatch):
    from services.engine.methods import quantize_static

    used = []

    class Recording(quantize_static.FitSetReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self.indices)

    monkeypatch.setattr(quantize_static, "FitSetReader", Recording)
    params = validate_recipe({"steps": [{"method": "quantize.static", "params": {
        "calibration_samples": 48, "calibration_selection": "uncertainty"}}]}, multitask.model, TASKS)["steps"][0]["params"]
    context = pipeline.StepContext(model_id="digits-multitask", scratch=tmp_path, progress=lambda f, m: None,
                                   model=multitask.model, task="digits", home=multitask.home,
                                   adapter=multitask.adapter, architecture="cnn")
    REGISTRY["quantize.static"].apply(multitask.onnx, tmp_path / "static.onnx", params, context)
    assert "on 48 samples" in context.notes[-1] and "chosen by uncertainty" in context.notes[-1], context.notes[-1]
    outputs = selection.onnx_outputs(multitask.onnx, context.fit_set().inputs)
    expected, _ = selection.choose_from_outputs("uncertainty", 48, outputs)
    assert len(used[0]) == 48 and np.array_equal(used[0], expected)
    scores = selection.scores("uncertainty", outputs)
    assert scores[expected].mean() > 2 * scores.mean()  # more unsure than a spread of the split


@pytest.mark.slow  # trains digits-multitask once for the module (a few seconds)
def test_inconsistency_on_the_original_itself_calibrates_by_uncertainty_and_says_so(multitask, tmp_path):
    params = validate_recipe({"steps": [{"method": "quantize.static", "params": {
        "calibration_samples": 32, "calibration_selection": "inconsistency"}}]}, multitask.model, TASKS)["steps"][0]["params"]
    single_head = SimpleNamespace(**{k: getattr(multitask.adapter, k) for k in ("input_names", "output_kind")})
    context = pipeline.StepContext(model_id="digits-multitask", scratch=tmp_path, progress=lambda f, m: None,
                                   model=multitask.model, task="digits", home=multitask.home,
                                   adapter=single_head, architecture="cnn")
    REGISTRY["quantize.static"].apply(multitask.onnx, tmp_path / "static.onnx", params, context)
    assert "on 32 samples" in context.notes[-1] and "most uncertain samples were taken instead" in context.notes[-1]
