"""Training-only self-supervised helpers (services/engine/aux_heads.py) and momentum contrast
(services/engine/moco.py): the helpers learn their own tasks, change the trained weights, and are
gone from the export (same parameters, operators and bytes); MoCo's pieces do what MoCo says.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from services.engine import aux_heads, moco, pipeline, tasks
from services.engine.distill import Batch
from services.engine.families.digits import DigitsCNN
from services.engine.speech.model import SpeechEncoder
from services.recipes import validate_recipe

DIGITS_TASKS = ["digits", "fidelity"]


def _graph(path) -> tuple[list, list, dict]:
    model = onnx.load(str(path))
    shapes = sorted((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer)
    operators = sorted(node.op_type for node in model.graph.node)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return shapes, operators, values


def test_helpers_are_gone_from_the_export(digits_store, digits_prepared):
    """The same recipe with and without helpers: identical graph (initializers, shapes, operators,
    bytes), different trained weights (the helpers did train the model)."""
    model = dict(digits_prepared.model)
    runs = {}
    for name, helpers in (("plain", []), ("helpers", ["spatial-context", "object-extent"])):
        recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.9}}],
                                  "recovery": {"objective": "supervised", "steps": 60, "aux": helpers}},
                                 model, DIGITS_TASKS)
        runs[name] = pipeline.compress(digits_store, model, recipe, f"run-{name}", lambda f, m: None)["run"]
    plain, helped = (_graph(digits_store.home / runs[n]["artifact"]) for n in ("plain", "helpers"))
    assert plain[0] == helped[0] and plain[1] == helped[1]
    assert runs["plain"]["metrics"]["size_bytes"] == runs["helpers"]["metrics"]["size_bytes"]
    assert runs["plain"]["metrics"]["params"] == runs["helpers"]["metrics"]["params"]
    assert any(not np.array_equal(plain[2][n], helped[2][n]) for n in plain[2])
    note = next(n for n in runs["helpers"]["metrics"]["notes"] if n.startswith("Recovery"))
    assert "training-only helpers: spatial-context, object-extent (not exported)" in note


def _train(term: torch.nn.Module, net: torch.nn.Module, batches, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([*term.parameters(), *net.parameters()], lr=3e-3)
    losses = []
    for step in range(steps):
        loss = term({"batch": batches(step)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("helper", ["spatial-context", "object-extent"])
def test_each_image_helper_learns_its_task(helper):
    torch.manual_seed(0)
    images = torch.from_numpy(tasks.digits_data().x_train[:256])
    net = DigitsCNN()
    term = aux_heads.AuxiliaryTerm([helper], net, "cnn", Batch(inputs=(images[:8],), mask=None, labels=None), seed=0)
    assert not {id(p) for p in term.parameters()} & {id(p) for p in net.parameters()}  # heads only
    losses = _train(term, net, lambda step: Batch(inputs=(images[(step % 8) * 32:(step % 8 + 1) * 32],),
                                                  mask=None, labels=None), 120)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), (losses[:3], losses[-3:])


def test_frame_order_helper_learns_where_each_block_came_from():
    """Utterances whose frames drift slowly over time: the order of their blocks can be read back."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    frames = 32
    ramp = torch.linspace(-1, 1, frames)[None, :, None]

    def utterances(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        slope = torch.rand(count, 1, 80, generator=generator) + 0.5
        features = ramp * slope + 0.1 * torch.randn(count, frames, 80, generator=generator)
        return features, torch.randint(frames // 2, frames + 1, (count,), generator=generator)

    net = SpeechEncoder(n_speakers=2, d_model=32, layers=2, heads=2, d_ff=64, dropout=0.0)
    term = aux_heads.AuxiliaryTerm(["frame-order"], net, "speech-transformer",
                                   Batch(inputs=utterances(2), mask=None, labels=None), seed=0)
    losses = _train(term, net, lambda step: Batch(inputs=utterances(16), mask=None, labels=None), 100)
    chance = aux_heads.AUX_WEIGHT * math.log(aux_heads.ORDER_BLOCKS)
    assert np.mean(losses[-10:]) < 0.5 * chance, (losses[:3], losses[-3:])


def test_the_helpers_that_apply_to_each_kind_of_model():
    assert aux_heads.helpers_for("cnn") == ["spatial-context", "object-extent"]
    assert aux_heads.helpers_for("speech-transformer") == ["frame-order"]
    assert aux_heads.helpers_for("text-transformer") == []
    assert aux_heads.why_not(["spatial-context"], "cnn") == ""


def test_momentum_update_moves_the_key_encoder_part_way_and_never_trains_it():
    query = torch.nn.Linear(3, 2)
    key = moco.momentum_copy(query)
    assert all(not p.requires_grad for p in key.parameters())
    before = key.weight.detach().clone()
    with torch.no_grad():
        query.weight.add_(1.0)
    moco.momentum_update(key, query, momentum=0.9)
    assert torch.allclose(key.weight, 0.9 * before + 0.1 * query.weight.detach())


def test_the_key_queue_keeps_the_newest_keys_and_the_loss_prefers_the_own_key():
    queue = moco.KeyQueue(dim=2, size=4)
    for value in range(1, 4):  # 6 keys into 4 slots: the oldest two are overwritten
        queue.push(torch.tensor([[value, 0.0], [0.0, value]]))
    assert queue.filled == 4
    assert sorted(map(tuple, queue.negatives().tolist())) == [(0.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, 0.0)]
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    matching = moco.contrast_loss(keys, keys, moco.KeyQueue(dim=2, size=4))
    swapped = moco.contrast_loss(keys, keys.flip(0), moco.KeyQueue(dim=2, size=4))
    assert matching < swapped
