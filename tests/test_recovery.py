"""Recovery training (services/engine/recovery.py): every objective lowers its own loss on a real
compressed model, the label-free ones run without labels, pruned weights stay pruned, `unfreeze`
trains what it says, and `rounds` prunes iteratively inside a real job.

digits-cnn (prepared once per session, 90% of its weights pruned) carries most tests: each recovery
is a second or two. One test loads MiniLM from its package for the text-specific parts (token
masking, layer groups of a transformer) with a few steps only.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from services.catalog import architecture_of
from services.engine import objectives, pipeline, recovery, tasks, zoo
from services.engine.methods import REGISTRY
from services.engine.tasks.base import EvalSet
from services.errors import UserError
from services.recipes import validate_recipe

pytestmark = pytest.mark.slow
DIGITS_TASKS = ["digits", "fidelity"]


def _settings(objective: str, **given) -> dict:
    recipe = validate_recipe({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": objective, **given}},
                             {"id": "digits-cnn", "format": "torch", "task": "digits"}, DIGITS_TASKS)
    return recipe["recovery"]


def _context(tmp_path, model: dict, fit_set: EvalSet | None = None) -> pipeline.StepContext:
    context = pipeline.StepContext(model_id=model["id"], scratch=tmp_path, progress=lambda f, m: None, model=model,
                                   task=model["task"], architecture=architecture_of(model),
                                   adapter=zoo.get_adapter(model["id"]))
    context._fit_set = fit_set
    return context


def _pruned_digits(digits_prepared, amount: float = 0.9):
    """(original, pruned copy) of the prepared digits-cnn."""
    original = pipeline._load_torch_model(digits_prepared.store, "digits-cnn")
    pruned = copy.deepcopy(original)
    REGISTRY["prune.magnitude"].apply(pruned, {"amount": amount, "scope": "global", "skip_layers": []}, None)
    return original, pruned


def _accuracy(net, evaluation) -> float:
    with torch.no_grad():
        logits = net(torch.from_numpy(evaluation.inputs["input"]))
    return float((logits.argmax(1).numpy() == evaluation.labels).mean())


def _zeros(net) -> dict:
    return {name: (p.detach() == 0) for name, p in net.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("objective", ["supervised", "distill", "contrastive", "masked", "momentum-contrast"])
def test_each_objective_lowers_its_loss_and_wins_back_accuracy(digits_prepared, tmp_path, objective):
    original, pruned = _pruned_digits(digits_prepared)
    evaluation = tasks.eval_set("digits", "digits-cnn")
    before, zeros = _accuracy(pruned, evaluation), _zeros(pruned)
    note, outcome = recovery.recover(pruned, original, _settings(objective), _context(tmp_path, digits_prepared.model))
    assert np.mean(outcome.losses[-20:]) < 0.8 * np.mean(outcome.losses[:20])
    after = _accuracy(pruned, evaluation)
    assert after > before + 0.15, (before, after)  # measured: 0.64 -> 0.96-0.97
    assert all(bool(pruned.get_parameter(n)[z].eq(0).all()) for n, z in zeros.items())  # pruned stay zero
    assert note.startswith(f"Recovery ({objective}): 200 steps")
    assert all(p.requires_grad for p in pruned.parameters())  # everything trainable again


@pytest.mark.parametrize("objective", ["distill", "contrastive", "masked", "momentum-contrast"])
def test_label_free_objectives_run_without_labels(digits_prepared, tmp_path, objective):
    original, pruned = _pruned_digits(digits_prepared)
    fit = tasks.fit_set("digits", digits_prepared.model, None)
    unlabeled = EvalSet(inputs=fit.inputs, labels=None, extra={"data": "the training images, labels removed"})
    note, outcome = recovery.recover(pruned, original, _settings(objective, steps=60),
                                     _context(tmp_path, digits_prepared.model, unlabeled))
    assert "no labels" in note
    assert np.mean(outcome.losses[-10:]) < np.mean(outcome.losses[:10])
    with pytest.raises(UserError, match="needs class labels"):
        recovery.recover(pruned, original, _settings("supervised", steps=5),
                         _context(tmp_path, digits_prepared.model, unlabeled))


def test_info_nce_prefers_matching_keys_and_counts_same_class_positives():
    anchor = torch.eye(4)
    assert recovery.info_nce(anchor, anchor, None) < recovery.info_nce(anchor, anchor.roll(1, 0), None)
    labels = torch.tensor([0, 0, 1, 1])
    # with labels, a key of the same class is a positive too: swapping within a class costs less
    swapped = anchor[[1, 0, 3, 2]]
    assert recovery.info_nce(anchor, swapped, labels) < recovery.info_nce(anchor, swapped, None)


def test_frozen_trains_only_the_head_and_gradual_opens_layers_from_the_top(digits_prepared, tmp_path):
    original, pruned = _pruned_digits(digits_prepared)
    groups = recovery.layer_groups(pruned)
    assert len(groups) == 4  # two convolutions, two linear layers, in order
    before = [[p.detach().clone() for p in group] for group in groups]
    recovery.recover(pruned, original, _settings("distill", steps=30, unfreeze="frozen"),
                     _context(tmp_path, digits_prepared.model))
    changed = [any(not torch.equal(a, b) for a, b in zip(old, group)) for old, group in zip(before, groups)]
    assert changed == [False, False, False, True]

    opened = []
    schedule = recovery.unfreeze_schedule(groups, "gradual", steps=100)
    for step in (0, 30, 60, 99):
        schedule(step)
        opened.append([group[0].requires_grad for group in groups])
    assert opened == [[False, False, False, True], [False, False, True, True], [False, True, True, True],
                      [True, True, True, True]]


def test_rounds_prune_on_a_geometric_schedule():
    step = {"method": "prune.magnitude", "params": {"amount": 0.9}}
    amounts = [objectives.round_params(step, r, 3)["amount"] for r in (1, 2, 3)]
    assert amounts == pytest.approx([1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9])
    other = {"method": "lowrank.svd", "params": {}}
    assert objectives.round_params(other, 1, 3) == {} and objectives.round_params(other, 2, 3) is None


def test_a_job_with_iterative_pruning_and_recovery(digits_store, digits_prepared):
    model = dict(digits_prepared.model)
    runs = {}
    for name, settings in (("none", {"objective": "none"}),
                           ("rounds", {"objective": "contrastive", "rounds": 3, "steps": 50, "unfreeze": "gradual"})):
        recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.9}},
                                            {"method": "quantize.dynamic"}], "recovery": settings},
                                 model, DIGITS_TASKS)
        events = []
        runs[name] = pipeline.compress(digits_store, model, recipe, f"run-{name}",
                                       lambda f, m: events.append((f, m)))["run"]
    metrics = runs["rounds"]["metrics"]
    assert metrics["score"] > runs["none"]["metrics"]["score"] + 0.15
    assert metrics["nonzero_params"] == runs["none"]["metrics"]["nonzero_params"]  # the same 90% pruned
    notes = [n for n in metrics["notes"] if n.startswith("Round")]
    assert [n[:9] for n in notes] == ["Round 1/3", "Round 2/3", "Round 3/3"]
    assert "contrast against the original and 2 earlier round(s)" in notes[2]
    messages = [m for _, m in events]
    assert any("prune.magnitude (round 2/3, amount 0.785)" in m for m in messages)
    fractions = [f for f, _ in events]
    assert all(later >= earlier - 1e-9 for earlier, later in zip(fractions, fractions[1:]))  # never back


def test_text_recovery_masks_tokens_and_groups_the_encoder_layers(tmp_path):
    model = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
    adapter = zoo.get_adapter("minilm-l6")
    original = adapter.create(lambda f, m: None)
    pruned = copy.deepcopy(original)
    REGISTRY["prune.magnitude"].apply(pruned, {"amount": 0.5, "scope": "global", "skip_layers": []}, None)
    groups = recovery.layer_groups(pruned)
    assert len(groups) == 8  # the embeddings, six encoder layers, what follows them (BERT's pooler)
    assert sum(p.numel() for p in groups[0]) > 11_000_000  # the word embedding is in the first group
    # the pooler feeds nothing the mean-pooled embedding reads: with the adapter to probe, it is no group,
    # so `frozen` trains the last encoder layer rather than a head that changes nothing
    reaching = recovery.layer_groups(pruned, adapter)
    pooler = {id(p) for p in pruned.bert.pooler.parameters()}
    assert len(reaching) == 7 and not pooler & {id(p) for group in reaching for p in group}
    assert [id(p) for p in reaching[-1]] == [id(p) for p in pruned.bert.encoder.layer[5].parameters()]

    context = _context(tmp_path, model)
    kit = recovery.build_kit("text-transformer", pruned, original, context, batch_size=8, seed=0)
    batch = next(kit.batches)
    ids, real = batch.inputs[0], batch.inputs[1].bool()
    masked = kit.mask_inputs(batch)[0]
    hidden = masked != ids
    assert bool((masked[hidden] == adapter.mask_token_id()).all())
    assert not hidden[:, 0].any() and not hidden[~real].any()  # never [CLS], never padding
    share = hidden.sum().item() / (real.sum().item() - 2 * len(ids))
    assert 0.15 < share < 0.35

    note, outcome = recovery.recover(pruned, original, {**_settings("masked"), "steps": 12, "batch_size": 8},
                                     context)
    assert "no labels" in note and len(outcome.losses) == 12
    # label-free MiniLM recovery also reads the standard library's docstrings (never scored)
    assert kit.samples > 2 * len(context.fit_set().inputs["input_ids"]) and "docstring paragraphs" in note
    assert np.mean(outcome.losses[-4:]) < np.mean(outcome.losses[:4])
