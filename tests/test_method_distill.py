"""distill.student: a smaller student trained from the original (services/engine/distill.py).

digits-cnn runs whole jobs (prepared once for the module, about 2 s of training); MiniLM is
loaded from its package and distilled for a few steps only: enough to show that training moves
the student towards the original, not to reach a useful student (bench/distill.py does that).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.engine import pipeline, tasks, training_text, zoo
from services.engine.export import export_onnx
from services.engine.methods import REGISTRY
from services.engine.methods import distill_student
from services.engine.tasks import pydoc_retrieval
from services.errors import UserError
from services.recipes import validate_recipe
from storage import ArtifactStore

pytestmark = pytest.mark.slow
METHOD = REGISTRY["distill.student"]
DIGITS = {"id": "digits-cnn", "name": "Digits CNN", "format": "torch", "task": "digits", "status": "new",
          "artifact": None}
MINILM = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "ready"}


def _params(model: dict, **given) -> dict:
    recipe = validate_recipe({"steps": [{"method": "distill.student", "params": given}]}, model,
                             [model["task"], "fidelity"])
    return recipe["steps"][0]["params"]


def _context(tmp_path, model: dict, architecture: str, events: list | None = None) -> pipeline.StepContext:
    return pipeline.StepContext(
        model_id=model["id"], scratch=tmp_path, model=model, task=model["task"], architecture=architecture,
        adapter=zoo.get_adapter(model["id"]),
        progress=(lambda f, m: events.append((f, m))) if events is not None else (lambda f, m: None))


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


# ---- the reusable loop (services/engine/distill.py) ----------------------------------------------------

def test_the_loop_trains_any_student_towards_its_teacher_and_leaves_the_teacher_alone():
    from services.engine import distill

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    teacher_before = copy.deepcopy(teacher.state_dict())
    names_before = [name for name, _ in student.named_parameters()]
    pruned = torch.zeros_like(student[0].weight, dtype=torch.bool)
    pruned[:, :2] = True  # recovery after pruning: `after_step` keeps these weights at zero

    def keep_pruned():
        with torch.no_grad():
            student[0].weight[pruned] = 0.0

    keep_pruned()
    inputs = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    events = []
    outcome = distill.train(student, teacher, distill.batches_from_arrays([inputs], 32, seed=0),
                            distill.output_loss_for("logits"), steps=150, lr=1e-2, hidden_pairs=[("1", "1")],
                            progress=lambda f, m: events.append(f), after_step=keep_pruned)
    assert np.mean(outcome.losses[-15:]) < 0.5 * np.mean(outcome.losses[:15])
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert bool((student[0].weight[pruned] == 0).all())
    assert [name for name, _ in student.named_parameters()] == names_before  # no projection left behind
    assert events[-1] == 1.0 and events == sorted(events)


# ---- digits-cnn ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    home = tmp_path_factory.mktemp("distill-digits")
    store = ArtifactStore(home)
    result = pipeline.prepare(store, dict(DIGITS), lambda f, m: None)
    return SimpleNamespace(store=store, model={**DIGITS, **result["model_update"]})


def _compress(digits, run_id: str, **params) -> dict:
    recipe = validate_recipe({"steps": [{"method": "distill.student", "params": params}]}, digits.model,
                             ["digits", "fidelity"])
    return pipeline.compress(digits.store, dict(digits.model), recipe, run_id, lambda f, m: None)["run"]


def test_a_digits_student_is_smaller_and_nearly_as_accurate(digits):
    run = _compress(digits, "student", width=0.5, steps=250, lr=2e-3)
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["params"] < baseline["params"] * 0.4  # half the channels: about a quarter of the weights
    assert metrics["size_bytes"] < baseline["size_bytes"] * 0.5
    assert metrics["score"] >= baseline["score"] - 0.04  # measured: 0.98 vs the original's 0.98
    assert metrics["fidelity"] > 0.93
    ort.InferenceSession(str(digits.store.resolve(run["artifact"])), providers=["CPUExecutionProvider"])
    note = " ".join(metrics["notes"])
    assert "a student with 0.5 of the channels" in note and "250 steps (" in note and "on 1257 fitting samples" in note

    tiny = _compress(digits, "tiny", width=0.5, steps=2, lr=2e-3)["metrics"]
    assert tiny["params"] == metrics["params"]
    assert metrics["score"] > tiny["score"]  # the training, not only the kept channels, makes it accurate


def test_the_same_recipe_gives_the_same_student(digits, tmp_path):
    teacher = pipeline._load_torch_model(digits.store, "digits-cnn")
    params = _params(digits.model, steps=20, width=0.5)
    students = []
    for _ in range(2):
        net = copy.deepcopy(teacher)
        METHOD.apply(net, params, _context(tmp_path, digits.model, "cnn"))
        students.append(net.state_dict())
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    other = copy.deepcopy(teacher)
    METHOD.apply(other, {**params, "seed": 1}, _context(tmp_path, digits.model, "cnn"))
    assert not all(torch.equal(students[0][k], other.state_dict()[k]) for k in students[0])


def test_progress_is_reported_as_fractions_of_the_step(digits, tmp_path):
    net = pipeline._load_torch_model(digits.store, "digits-cnn")
    events = []
    METHOD.apply(net, _params(digits.model, steps=40), _context(tmp_path, digits.model, "cnn", events))
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 1.0
    assert "step 40/40" in events[-1][1]


# ---- minilm-l6 -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    teacher = zoo.get_adapter("minilm-l6").create(lambda f, m: None)
    scored = pydoc_retrieval.eval_set()
    feed = {name: values[:96] for name, values in scored.inputs.items()}  # 96 scored paragraphs suffice
    return SimpleNamespace(teacher=teacher, feed=feed, reference=_embed(teacher, feed))


def _embed(net, feed) -> np.ndarray:
    with torch.no_grad():
        return net(*(torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask", "token_type_ids"))).numpy()


def test_a_minilm_student_has_fewer_layers_and_training_brings_it_closer(minilm, tmp_path):
    truncated = copy.deepcopy(minilm.teacher)
    distill_student.drop_layers(truncated, 3)  # the same student, untrained
    student = copy.deepcopy(minilm.teacher)
    context = _context(tmp_path, MINILM, "text-transformer")
    METHOD.apply(student, _params(MINILM, layers=3, steps=12, batch_size=8, lr=1e-3, extra_text=False), context)

    assert len(student.bert.encoder.layer) == 3 and student.bert.config.num_hidden_layers == 3
    assert _count(student) < _count(minilm.teacher) - 5_000_000  # three layers of 1.8 M parameters each
    assert _count(student) == _count(truncated)  # the projections were for training only
    before = tasks.fidelity(_embed(truncated, minilm.feed), minilm.reference, "embedding")["fidelity"]
    after = tasks.fidelity(_embed(student, minilm.feed), minilm.reference, "embedding")["fidelity"]
    assert after > before + 0.05, (before, after)  # scored paragraphs, never trained on
    assert "a student with 3 of 6 layers" in context.notes[0] and "765 fitting paragraphs" in context.notes[0]

    path = export_onnx(student, zoo.get_adapter("minilm-l6"), tmp_path / "student.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {k: v[:4] for k, v in minilm.feed.items()})[0]
    np.testing.assert_allclose(exported, _embed(student, {k: v[:4] for k, v in minilm.feed.items()}), atol=1e-4)


def test_a_student_as_deep_as_the_original_is_refused(minilm, tmp_path):
    with pytest.raises(UserError, match="fewer layers than the original, which has 6"):
        METHOD.apply(copy.deepcopy(minilm.teacher), _params(MINILM, layers=6), _context(tmp_path, MINILM,
                                                                                        "text-transformer"))


def test_after_vocab_trim_the_student_reads_its_own_ids_and_learns_from_the_full_vocabulary(minilm, tmp_path):
    """Mixed-vocabulary distillation: the teacher is the untouched original (full vocabulary, original ids),
    the student is the trimmed model, fed the trimmed tokenizer's ids of the same texts."""
    from services.engine.families import minilm as family

    net = copy.deepcopy(minilm.teacher)
    context = _context(tmp_path, MINILM, "text-transformer")
    context.load_original = lambda: copy.deepcopy(minilm.teacher)
    trim = validate_recipe({"steps": [{"method": "vocab.trim", "params": {"unseen": "pieces"}}]}, MINILM,
                           ["pydoc-retrieval"])["steps"][0]["params"]
    REGISTRY["vocab.trim"].apply(net, trim, context)
    rows = net.bert.embeddings.word_embeddings.num_embeddings
    own = family.encode(pydoc_retrieval.eval_set().extra["texts"][:96], context.tokenizer_file)  # scored ones
    untrained = copy.deepcopy(net)
    distill_student.drop_layers(untrained, 3)
    before = tasks.fidelity(_embed(untrained, own), minilm.reference, "embedding")["fidelity"]
    words_before = net.bert.embeddings.word_embeddings.weight.detach().clone()

    METHOD.apply(net, _params(MINILM, layers=3, steps=12, batch_size=8, lr=1e-3, extra_text=False), context)
    assert len(net.bert.encoder.layer) == 3
    assert net.bert.embeddings.word_embeddings.num_embeddings == rows  # still the trimmed table ...
    assert not torch.equal(net.bert.embeddings.word_embeddings.weight, words_before)  # ... which learned
    after = tasks.fidelity(_embed(net, own), minilm.reference, "embedding")["fidelity"]
    assert after > before + 0.05, (before, after)  # the training, not only the kept layers
    assert "mixed-vocabulary distillation" in context.notes[-1]


def test_replace_words_swaps_everyday_words_into_half_of_each_batch_drawn_afresh_every_time(tmp_path):
    import json

    from services.engine import distill
    from services.engine.families import minilm as family
    from services.engine.methods.vocab_trim import frequent_words

    texts = pydoc_retrieval.fit_paragraphs()[:64]
    feed = family.encode(texts)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    arrays = [feed[n] for n in names]
    plain = distill.batches_from_arrays(arrays, 64, seed=0, mask_index=1)
    batches, words = training_text.with_replaced_words(distill.batches_from_arrays(arrays, 64, seed=0, mask_index=1),
                                                       names, 0.3, 0, _context(tmp_path, MINILM, "text-transformer"))
    assert words == training_text.REPLACEMENT_WORDS
    epochs = [(next(plain).inputs, next(batches).inputs) for _ in range(2)]
    changed_rows = []
    for original, replaced in epochs:
        np.testing.assert_array_equal(replaced[1].numpy(), original[1].numpy())  # same lengths, same padding
        before, after = original[0].numpy(), replaced[0].numpy()
        changed = before != after
        special = np.isin(before, [0, 101, 102])  # [PAD], [CLS], [SEP] stay
        assert not changed[special].any()
        rows = changed.any(axis=1)
        assert 20 <= rows.sum() <= 44, rows.sum()  # about half of the texts ...
        share = changed[rows].sum() / (~special[rows]).sum()
        assert 0.25 < share < 0.32, share  # ... with 30 % of their tokens, less the draws that picked the same word
        changed_rows.append((before, after, rows))
    # the second epoch's replacements are new draws, not the first epoch's again
    first, second = ({tuple(b): tuple(a) for b, a, r in zip(*epoch) if r} for epoch in changed_rows)
    both = set(first) & set(second)
    assert both and all(first[text] != second[text] for text in both)
    tokenizer = family.tokenizer()
    drawn = {tokenizer.id_to_token(int(i)) for before, after, _ in changed_rows for i in after[before != after]}
    frequent = set(frequent_words(json.loads((family.package_dir() / "tokenizer.json").read_text()),
                                  training_text.REPLACEMENT_WORDS))
    assert drawn <= frequent and len(drawn) > 500  # spread over the vocabulary's frequent words


def test_the_replacement_words_reach_the_words_of_minilms_hardest_held_out_paragraph(tmp_path):
    from services.engine.families import minilm as family

    context = _context(tmp_path, MINILM, "text-transformer")
    replacer = training_text.WordReplacer(["input_ids", "attention_mask"], context)
    tokenizer = family.tokenizer()
    drawn_from = {tokenizer.id_to_token(int(i)) for i in replacer.words}
    # measured: with 10,000 words these two (BERT ids 13,271 and 14,614) were out, their factorized rows never
    # trained, and the paragraph that repeats them was the worst (0.885); with them in, 0.939
    assert {"descriptions", "illustration"} <= drawn_from
    assert not drawn_from & {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "a", "##s"}  # specials and single characters


def test_replace_words_says_why_it_cannot_read_a_model_without_a_wordpiece_tokenizer(tmp_path):
    import json

    names = ["input_ids", "attention_mask"]

    def uploaded(folder):
        return SimpleNamespace(model_id="up1", adapter=SimpleNamespace(folder=folder), user_error=UserError)

    with pytest.raises(UserError, match="this model has no such tokenizer or input"):
        training_text.WordReplacer(names, uploaded(tmp_path))  # a folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(UserError, match="WordPiece \\(BERT-like\\) vocabulary; this model's tokenizer is of another"):
        training_text.WordReplacer(names, uploaded(tmp_path))
    with pytest.raises(UserError, match="this model has no such tokenizer or input"):
        training_text.WordReplacer(["pixels"], uploaded(tmp_path))


def test_a_minilm_student_trained_on_replaced_words_says_so_and_is_refused_after_vocab_trim(minilm, tmp_path):
    student = copy.deepcopy(minilm.teacher)
    context = _context(tmp_path, MINILM, "text-transformer")
    METHOD.apply(student, _params(MINILM, layers=3, steps=6, batch_size=8, extra_text=False, replace_words=0.3),
                 context)
    assert "765 fitting paragraphs, half of each batch's texts with 30% of their tokens replaced by fresh random " \
           "ones among the vocabulary's 20,000 most frequent words and word pieces" in context.notes[0]

    trimmed = copy.deepcopy(minilm.teacher)
    trim = validate_recipe({"steps": [{"method": "vocab.trim", "params": {}}]}, MINILM,
                           ["pydoc-retrieval"])["steps"][0]["params"]
    REGISTRY["vocab.trim"].apply(trimmed, trim, context)
    with pytest.raises(UserError, match="replace_words swaps token ids"):
        METHOD.apply(trimmed, _params(MINILM, layers=3, steps=6, replace_words=0.3), context)


def test_a_student_trained_for_4_bit_weights_loses_nothing_more_when_stored_in_4_bits(digits, tmp_path):
    from services.engine.int4_training import fake_quantize

    recipe = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 30, "lr": 2e-3,
                                                                 "train_for": "4-bit weights", "block_size": 16}},
                        {"method": "quantize.int4_weights", "params": {"block_size": 16}}]}
    recipe = validate_recipe(recipe, digits.model, ["digits", "fidelity"])
    net = pipeline._load_torch_model(digits.store, "digits-cnn")
    context = _context(tmp_path, digits.model, "cnn")
    METHOD.apply(net, recipe["steps"][0]["params"], context)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(torch.allclose(fake_quantize(m.weight, 16, False), m.weight, atol=1e-6) for m in linears)
    assert not any("parametrizations" in name for name, _ in net.named_parameters())
    assert "already lie on the 4-bit grid" in context.notes[-1]

    # Stored in 4 bits by ONNX Runtime's quantizer, the trained student answers as it did in float;
    # a student trained in float moves further when stored the same way.
    images = tasks.eval_set("digits", "digits-cnn").inputs
    float_trained = pipeline._load_torch_model(digits.store, "digits-cnn")
    METHOD.apply(float_trained, {**recipe["steps"][0]["params"], "train_for": "float"}, _context(tmp_path, digits.model, "cnn"))
    moved = []
    for name, student in (("grid", net), ("float", float_trained)):
        exported = export_onnx(student, zoo.get_adapter("digits-cnn"), tmp_path / f"{name}.onnx")
        REGISTRY["quantize.int4_weights"].apply(exported, tmp_path / f"{name}-int4.onnx", recipe["steps"][1]["params"],
                                                 _context(tmp_path, digits.model, "cnn"))
        outputs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, images)[0]
                   for path in (exported, tmp_path / f"{name}-int4.onnx")]
        moved.append(float(np.abs(outputs[0] - outputs[1]).max() / np.abs(outputs[0]).max()))
    assert moved[0] < 1e-3 and moved[1] > 10 * moved[0], moved


def test_extra_text_never_includes_a_scored_paragraph():
    scored = set(training_text.scored_texts())
    extra = training_text.stdlib_paragraphs(exclude=frozenset(scored))
    assert len(extra) > 1000 and len(set(extra)) == len(extra)
    assert not scored & set(extra)
    assert all(len(p) >= training_text.MIN_PARAGRAPH_CHARS for p in extra)


def test_kept_layers_are_spread_from_the_first_to_the_last():
    assert distill_student.kept_layers(6, 3) == [0, 3, 5]
    assert distill_student.kept_layers(6, 2) == [0, 5]
    assert distill_student.kept_layers(6, 1) == [5]
    assert distill_student.kept_layers(12, 4) == [0, 4, 7, 11]


# ---- refusals at submit ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, words", [
    ({"width": 1.5}, "'width' must be between 0.05 and 0.95"),
    ({"layers": 0}, "'layers' must be between 1 and 48"),
    ({"steps": 0}, "'steps' must be between 1 and 20000"),
    ({"steps": 2.5}, "'steps' must be a whole number"),
    ({"lr": -1}, "'lr' must be between"),
    ({"extra_text": "yes"}, "'extra_text' must be true or false"),
    ({"depth": 2}, "has no parameter 'depth'"),
])
def test_bad_parameters_are_refused_at_submit(params, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _params(DIGITS, **params)


def test_a_student_of_an_onnx_upload_is_refused_at_submit():
    upload = {"id": "up1", "format": "onnx", "task": "fidelity", "source": "upload"}
    with pytest.raises(UserError, match="needs a PyTorch model"):
        validate_recipe({"steps": [{"method": "distill.student"}]}, upload, ["fidelity"])


# ---- the speech encoder (a small one built here: the real one trains for minutes) -------------------

def test_a_speech_student_keeps_fewer_layers_and_learns_the_frame_outputs(tmp_path):
    from services.engine.families.speech import SpeechAdapter
    from services.engine.speech.model import SpeechEncoder
    from services.engine.tasks.base import EvalSet

    torch.manual_seed(0)
    teacher = SpeechEncoder(n_speakers=12, d_model=32, layers=4, heads=2, d_ff=64).eval()
    generator = np.random.default_rng(0)

    def utterances(count):
        features = generator.normal(-5.0, 2.0, (count, 160, 80)).astype(np.float32)
        return {"features": features, "lengths": generator.integers(60, 161, count).astype(np.int64)}

    fit, held_out = utterances(64), utterances(16)
    context = pipeline.StepContext(model_id="speech-ssl", scratch=tmp_path, progress=lambda f, m: None,
                                   model={"id": "speech-ssl"}, task="spoken-digits", adapter=SpeechAdapter(),
                                   architecture="speech-transformer", _fit_set=EvalSet(inputs=fit))
    truncated = copy.deepcopy(teacher)
    distill_student.drop_layers(truncated, 2)
    student = copy.deepcopy(teacher)
    METHOD.apply(student, _params({"id": "speech-ssl", "format": "torch", "task": "spoken-digits"},
                                  layers=2, steps=40, batch_size=16, lr=3e-3), context)
    assert len(student.layers) == 2 and student.pool_after == 1

    def frame_kl(net):  # how far the per-frame digit distributions are from the teacher's, real frames only
        inputs = (torch.from_numpy(held_out["features"]), torch.from_numpy(held_out["lengths"]))
        with torch.no_grad():
            target, got = teacher(*inputs)[0], net(*inputs)[0]
        real = distill_student._frame_mask(inputs[1], 1, target.shape[1])
        return float(((target.exp() * (target - got)).sum(-1) * real).sum() / real.sum())

    assert frame_kl(student) < 0.5 * frame_kl(truncated)
    path = export_onnx(student, SpeechAdapter(), tmp_path / "speech.onnx")
    outputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"features": held_out["features"][:2], "lengths": held_out["lengths"][:2]})
    assert outputs[0].shape == (2, 160, 11) and outputs[1].shape == (2, 12)
