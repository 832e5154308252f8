"""speech-ssl and its tasks: the eSpeak NG corpus, the features, the exported model, both scores.

speech-ssl is created once for this module through `pipeline.prepare` under its own data folder,
with EXPLORER_SPEECH_STEPS_SCALE shrinking its training (the real step counts are for users);
the tests that need it share that folder and copy it when they write.
"""
from __future__ import annotations

import copy
import math
import shutil
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.engine import measure, pipeline, tasks
from services.engine.speech import corpus as speech_corpus
from services.engine.speech import features as speech_features
from services.engine.speech.espeak import espeak
from services.engine.speech.corpus import MAX_FRAMES, N_MELS, VOICES
from services.engine.tasks import speech as speech_tasks
from services.engine.tasks.base import EvalSet
from services.recipes import validate_recipe
from storage import ArtifactStore

MODEL = {"id": "speech-ssl", "name": "Speech SSL", "format": "torch", "task": "spoken-digits", "status": "new",
         "artifact": None}
TASKS = ["spoken-digits", "speaker-id", "fidelity"]
STEPS_SCALE = "0.4"


# ---- no model needed ------------------------------------------------------------------------------

def test_the_plan_is_drawn_up_front_and_holds_out_the_test_strings():
    plan = speech_corpus.plan_corpus()
    assert plan == speech_corpus.plan_corpus()  # every choice comes from one seed
    train = {p["digits"] for p in plan if p["split"] == "train" and p["kind"] == "digits"}
    test = [p["digits"] for p in plan if p["split"] == "test" and p["kind"] == "digits"]
    assert len(test) == speech_corpus.TEST_DIGIT_UTTERANCES and len(set(test)) == len(test)
    assert not train & set(test)
    assert all(3 <= len(s) <= 6 for s in train | set(test))
    for voice in range(len(VOICES)):  # speaker-id words: never heard from this voice in training
        heard = {w for p in plan if p["voice"] == voice and p["kind"] == "words" and p["split"] == "train"
                 for w in p["text"].split()}
        unheard = {w for p in plan if p["voice"] == voice and p["kind"] == "words" and p["split"] == "test"
                   for w in p["text"].split()}
        assert unheard and not heard & unheard
    assert {p["voice"] for p in plan} == set(range(len(VOICES)))
    assert all(170 <= p["rate"] <= 260 and 0 <= p["snr_db"] <= 20 for p in plan)
    assert len({p["pitch"] for p in plan}) > 20 and len({p["noise_seed"] for p in plan}) == len(plan)


def test_the_twelve_voices_really_differ():
    distances = speech_corpus.voice_distances()
    off_diagonal = distances[~np.eye(len(VOICES), dtype=bool)]
    assert off_diagonal.min() > 1.5  # eSpeak's own jitter between two runs of one voice is about 0.7


def test_an_unknown_voice_is_refused_instead_of_falling_back():
    with pytest.raises(ValueError, match="unknown eSpeak NG voice"):
        espeak().synthesize("one", "en+nosuchvoice", 200, 50, 50)


def test_log_mel_has_80_bins_every_20_ms():
    seconds = np.arange(speech_features.SAMPLE_RATE) / speech_features.SAMPLE_RATE
    tone = (0.1 * np.sin(2 * np.pi * 1000 * seconds)).astype(np.float32)
    features = speech_features.log_mel(tone)
    assert features.shape == (51, N_MELS) and features.dtype == np.float32  # 1 s / 20 ms, centred frames
    centres = speech_features.mel_filterbank().argmax(axis=0) * speech_features.SAMPLE_RATE / speech_features.N_FFT
    assert abs(centres[features[25].argmax()] - 1000) < 60  # the loudest band is the tone's
    batch = speech_features.log_mels([tone, tone[:8000]])
    assert [len(f) for f in batch] == [51, 26]
    np.testing.assert_allclose(batch[0], features, atol=1e-5)


def test_greedy_ctc_decoding_and_digit_error_rate():
    frames = np.full((1, 8, 11), -10.0, np.float32)
    for t, token in enumerate([0, 4, 4, 0, 4, 2, 0, 0]):  # blank 3 3 blank 3 1 blank blank
        frames[0, t, token] = 0.0
    assert speech_tasks.greedy_decode(frames[0], 8) == "331"
    assert speech_tasks.greedy_decode(frames[0], 3) == "3"  # frames past the length are ignored
    assert speech_tasks.edit_distance("331", "3312") == 1 and speech_tasks.edit_distance("", "12") == 2
    assert list(speech_tasks.output_lengths(np.array([160, 33]), 160, 40)) == [40, 9]  # pooled by 4
    rate, hypotheses = speech_tasks.digit_error_rate(np.repeat(frames, 2, 0), np.array([8, 8]), ["331", "3310"],
                                                      frames_in=8)
    assert hypotheses == ["331", "331"] and rate == pytest.approx(1 / 7)


# ---- one created model, shared ------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    home = tmp_path_factory.mktemp("speech") / "home"
    patch = pytest.MonkeyPatch()
    patch.setenv("EXPLORER_HOME", str(home))
    patch.setenv("EXPLORER_SPEECH_STEPS_SCALE", STEPS_SCALE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job runner does: two threads on two busy cores only fight
    store = ArtifactStore(home)
    events = []
    try:
        result = pipeline.prepare(store, dict(MODEL), lambda fraction, message: events.append((fraction, message)))
        yield SimpleNamespace(home=home, store=store, result=result, events=events,
                              model={**MODEL, **result["model_update"]},
                              onnx=store.path("models", "speech-ssl", "model.onnx"))
    finally:
        torch.set_num_threads(threads)
        patch.undo()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _all_outputs(path, evaluation, batch: int = 64) -> dict[str, np.ndarray]:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(None, {k: v[i:i + batch] for k, v in evaluation.inputs.items()})
            for i in range(0, len(evaluation), batch)]
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


@pytest.mark.slow
def test_prepare_creates_exports_and_scores_speech_ssl(prepared):
    update = prepared.result["model_update"]
    assert update["status"] == "ready" and update["artifact"] == "artifacts/models/speech-ssl/model.onnx"
    card = update["card"]
    assert card["score_name"] == "1 - digit error rate" and 0.0 < card["score"] <= 1.0
    assert card["fidelity"] == 1.0
    assert card["io"]["inputs"] == [
        {"name": "features", "type": "tensor(float)", "shape": ["batch", MAX_FRAMES, N_MELS]},
        {"name": "lengths", "type": "tensor(int64)", "shape": ["batch"]}]
    assert [o["name"] for o in card["io"]["outputs"]] == ["digit_log_probs", "speaker_logits"]
    assert card["io"]["outputs"][0]["shape"] == ["batch", MAX_FRAMES, 11]
    assert card["io"]["outputs"][1]["shape"] == ["batch", len(VOICES)]
    assert 0.7e6 < card["params"] < 1.1e6 and card["train_seconds"] > 0
    fractions = [fraction for fraction, _ in prepared.events]
    assert fractions == sorted(fractions) and all(0.05 <= f <= 1.0 for f in fractions)
    messages = " | ".join(message for _, message in prepared.events)
    assert "speech corpus" in messages and "masked-frame pretraining" in messages and "fine-tuning" in messages
    assert sum(0.15 < f < 0.7 for f in fractions) >= 4  # training reports as it goes


@pytest.mark.slow
def test_the_corpus_cache_gives_the_same_arrays(prepared):
    files = list((prepared.home / "artifacts" / "cache" / "speech").glob("corpus-*.npz"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*.tmp"))  # written atomically
    first = speech_corpus.load_corpus()
    speech_corpus._read_cached.cache_clear()
    second = speech_corpus.load_corpus()
    assert first is not second
    for name in ("features", "offsets", "voice", "split", "kind", "digits", "text"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert len(first) == 3840 and first.lengths.max() <= MAX_FRAMES
    assert set(first.voice[first.select("test", "words")]) == set(range(len(VOICES)))


@pytest.mark.slow
def test_the_onnx_model_runs_at_batch_1_and_larger_and_matches_torch(prepared):
    evaluation = tasks.eval_set("spoken-digits", "speech-ssl")
    feed = evaluation.head(5)
    sess = _session(prepared.onnx)
    log_probs, speakers = sess.run(None, feed)
    assert log_probs.shape == (5, MAX_FRAMES, 11) and speakers.shape == (5, len(VOICES))
    single = sess.run(None, {k: v[2:3] for k, v in feed.items()})
    np.testing.assert_allclose(single[0][0], log_probs[2], atol=1e-4)
    np.testing.assert_allclose(single[1][0], speakers[2], atol=1e-4)
    net = pipeline._load_torch_model(prepared.store, "speech-ssl")
    with torch.no_grad():
        expected = net(*(torch.from_numpy(feed[name]) for name in ("features", "lengths")))
    np.testing.assert_allclose(log_probs, expected[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(speakers, expected[1].numpy(), atol=1e-3)


@pytest.mark.slow
def test_padding_does_not_change_what_the_model_says(prepared):
    evaluation = tasks.eval_set("spoken-digits", "speech-ssl")
    feed = evaluation.head(3)
    noisy = {k: v.copy() for k, v in feed.items()}
    for row, length in enumerate(noisy["lengths"]):
        noisy["features"][row, length:] = np.random.default_rng(row).normal(size=(MAX_FRAMES - length, N_MELS))
    sess = _session(prepared.onnx)
    clean_out, noisy_out = sess.run(None, feed), sess.run(None, noisy)
    for row, length in enumerate(feed["lengths"]):
        np.testing.assert_allclose(noisy_out[0][row, :length], clean_out[0][row, :length], atol=1e-4)
    np.testing.assert_allclose(noisy_out[1], clean_out[1], atol=1e-4)


@pytest.mark.slow
def test_spoken_digits_and_speaker_id_scores(prepared):
    digits = tasks.eval_set("spoken-digits", "speech-ssl")
    assert len(digits) == 600 and digits.latency_batch == 16
    digit_scores = speech_tasks.score("spoken-digits", digits, _all_outputs(prepared.onnx, digits)["digit_log_probs"])
    assert 0.0 < digit_scores["score"] <= 1.0
    assert digit_scores["score"] == pytest.approx(prepared.result["model_update"]["card"]["score"])
    speakers = tasks.eval_set("speaker-id", "speech-ssl")
    assert len(speakers) == 840
    outputs = _all_outputs(prepared.onnx, speakers)
    speaker_scores = speech_tasks.score("speaker-id", speakers, outputs["speaker_logits"])
    assert speaker_scores["score_name"] == "accuracy"
    assert speaker_scores["score"] > 4 / len(VOICES)  # chance is 1/12
    assert speaker_scores["accuracy_words"] > 3 / len(VOICES)  # words this voice never said in training
    with pytest.raises(ValueError, match="speaker_logits"):  # handed the CTC output by mistake
        speech_tasks.score("speaker-id", speakers, outputs["digit_log_probs"])


@pytest.mark.slow
def test_speaker_id_through_the_pipeline_scores_the_speaker_output(prepared):
    evaluation = tasks.eval_set("speaker-id", "speech-ssl")
    assert evaluation.extra["output_name"] == "speaker_logits"
    outputs = measure.run_outputs(measure.session(prepared.onnx), evaluation)
    assert outputs.shape == (840, len(VOICES))  # the second output, by name, not the first
    metrics = pipeline.measure_model(prepared.onnx, "speaker-id", "speech-ssl", "logits", evaluation)
    assert metrics["score"] > 4 / len(VOICES) and metrics["fidelity"] == 1.0


@pytest.mark.slow
def test_fidelity_of_the_model_with_itself_is_one(prepared):
    evaluation = tasks.eval_set("fidelity", "speech-ssl")
    outputs = measure.run_outputs(measure.session(prepared.onnx), evaluation)
    scores = tasks.score("fidelity", "speech-ssl", "logits", evaluation, outputs, outputs)
    assert scores["score"] == scores["fidelity"] == 1.0


@pytest.mark.slow
def test_compress_prunes_speech_ssl_and_scores_the_run(prepared, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(prepared.home, home)
    store = ArtifactStore(home)
    recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.5}}]},
                             prepared.model, TASKS)
    assert recipe["task"] == "spoken-digits"
    run = pipeline.compress(store, dict(prepared.model), recipe, "speechrun", lambda f, m: None)["run"]
    metrics, baseline = run["metrics"], run["baseline"]
    assert metrics["score_name"] == baseline["score_name"] == "1 - digit error rate"
    assert 0.0 <= metrics["score"] <= 1.0 and 0.0 < baseline["score"] <= 1.0
    assert 0.0 < metrics["fidelity"] <= 1.0 and baseline["fidelity"] == 1.0
    assert metrics["nonzero_params"] < 0.62 * metrics["params"]  # half of the linear weights are zero
    assert metrics["zipped_bytes"] < baseline["zipped_bytes"]
    assert metrics["latency_ms"]["p50"] > 0 and metrics["batch_latency_ms"]["batch"] == 16


def test_speech_recovery_by_momentum_contrast_with_the_frame_order_helper_exports_the_same_graph(prepared, tmp_path):
    """speech-ssl pruned, recovered by MoCo with and without the training-only frame-order helper: the
    two exports have the same initializers and operators (the helper's head is gone)."""
    import onnx

    home = tmp_path / "home"
    shutil.copytree(prepared.home, home)
    store = ArtifactStore(home)
    graphs, notes = [], []
    for helpers in ([], ["frame-order"]):
        recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.5}}],
                                  "recovery": {"objective": "momentum-contrast", "steps": 6, "batch_size": 8,
                                               "aux": helpers}}, prepared.model, TASKS)
        run = pipeline.compress(store, dict(prepared.model), recipe, f"speech-aux-{len(helpers)}",
                                lambda f, m: None)["run"]
        model = onnx.load(str(home / run["artifact"]))
        graphs.append((sorted((t.name, tuple(t.dims)) for t in model.graph.initializer),
                       sorted(n.op_type for n in model.graph.node)))
        notes.append(next(n for n in run["metrics"]["notes"] if n.startswith("Recovery")))
    assert graphs[0] == graphs[1]
    assert "momentum contrast" in notes[0] and "training-only helpers: frame-order (not exported)" in notes[1]


def test_speech_fidelity_counts_real_frames_only():
    evaluation = SimpleNamespace(inputs={"lengths": np.array([2, 4])})
    reference = np.zeros((2, MAX_FRAMES, 11), np.float32)
    reference[:, :, 0] = 1.0  # all blank
    outputs = reference.copy()
    outputs[0, 1] = np.eye(11)[3]  # one of utterance 0's two real frames now says "2"
    outputs[1, 50] = np.eye(11)[5]  # a padded frame changes: does not count
    scores = speech_tasks.fidelity("spoken-digits", evaluation, outputs, reference)
    assert scores == {"fidelity": pytest.approx(5 / 6), "fidelity_worst": 0.5, "transcript_agreement": 0.5}


def test_speech_fidelity_of_a_pooled_model_compares_transcripts():
    """Fewer output frames than the original: the frames no longer line up, the transcripts do."""
    evaluation = SimpleNamespace(inputs={"lengths": np.array([8, 8])})
    reference = np.zeros((2, MAX_FRAMES, 11), np.float32)
    reference[:, :, 0] = 1.0
    reference[:, 2] = np.eye(11)[4]  # both say "3"
    reference[0, 5] = np.eye(11)[6]  # the first says "35"
    pooled = np.zeros((2, MAX_FRAMES // 2, 11), np.float32)
    pooled[:, :, 0] = 1.0
    pooled[:, 1] = np.eye(11)[4]  # both say "3": right for the second, one digit short for the first
    scores = speech_tasks.fidelity("spoken-digits", evaluation, pooled, reference)
    assert scores == {"fidelity": pytest.approx(0.75), "fidelity_worst": 0.5, "transcript_agreement": 0.5}


@pytest.mark.parametrize("rate", [1, 1.5, 3, 4.75, 8])
def test_pooling_by_a_rate_keeps_real_frames_apart_from_padding(rate):
    from services.engine.speech.model import SpeechEncoder

    torch.manual_seed(0)
    net = SpeechEncoder(rate=rate).eval()
    features = torch.randn(2, MAX_FRAMES, N_MELS)
    lengths = torch.tensor([MAX_FRAMES, 37])
    with torch.no_grad():
        log_probs, speakers = net(features, lengths)
        shorter = net(features[1:, :37], lengths[1:])  # the same utterance without its padding
    frames_out = math.ceil(MAX_FRAMES / rate)
    assert log_probs.shape == (2, frames_out, 11) and speakers.shape == (2, len(VOICES))
    real = int(speech_tasks.output_lengths(np.array([37]), MAX_FRAMES, frames_out)[0])
    assert real == math.ceil(37 / rate)
    torch.testing.assert_close(log_probs[1, :real], shorter[0][0, :real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(speakers[1], shorter[1][0], atol=1e-4, rtol=1e-4)


def test_a_fractional_rate_weighs_frames_by_their_overlap_and_equals_the_whole_rate_path():
    from services.engine.speech.model import TimePooling

    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    mask = torch.ones(1, 6)
    pooled, real = TimePooling(1.5)(x, mask)  # windows [0, 1.5), [1.5, 3), [3, 4.5), [4.5, 6)
    torch.testing.assert_close(pooled.flatten(), torch.tensor([(0 + 0.5) / 1.5, (0.5 + 2) / 1.5,
                                                               (3 + 2) / 1.5, (2 + 5) / 1.5]))
    assert real.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    features, lengths = torch.randn(2, 40, 3), torch.tensor([40, 23])
    mask = (torch.arange(40)[None] < lengths[:, None]).float()
    whole, whole_real = TimePooling(4)(features, mask)
    fractional, fractional_real = TimePooling(4 + 1e-6)(features, mask)  # the overlap-matrix path
    torch.testing.assert_close(fractional, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(fractional_real, whole_real)


@pytest.mark.parametrize("rate", [1.5, 2.5, 6.5])
def test_a_fractional_rate_exports_with_the_length_left_free(tmp_path, rate):
    from services.engine.speech.model import SpeechEncoder

    torch.manual_seed(0)
    net = SpeechEncoder(rate=rate).eval()
    path = tmp_path / "pooled.onnx"
    torch.onnx.export(net, (torch.randn(2, 160, N_MELS), torch.tensor([160, 90])), str(path), dynamo=False,
                      input_names=["features", "lengths"], output_names=["digit_log_probs", "speaker_logits"],
                      dynamic_axes={"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"}}, opset_version=17)
    for frames in (160, 500):
        features, lengths = torch.randn(1, frames, N_MELS), torch.tensor([frames])
        got = _session(path).run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
        with torch.no_grad():
            expected = net(features, lengths)
        assert got[0].shape == (1, math.ceil(frames / rate), 11)
        np.testing.assert_allclose(got[0], expected[0].numpy(), atol=1e-4)


@pytest.mark.slow
def test_speech_ssl_is_trained_once_for_all_and_pools_at_any_rate_without_retraining(prepared, tmp_path):
    """One once-for-all model: sequence.pool only sets the rate; the outputs get shorter, the scores stay
    usable for the utterance-level task, and a long clip runs faster at a high rate."""
    net = pipeline._load_torch_model(prepared.store, "speech-ssl")
    assert net.trained_rates.tolist() == [1.0, 8.0]
    home = tmp_path / "home"
    shutil.copytree(prepared.home, home)
    store = ArtifactStore(home)
    scores = {}
    for rate in (1.5, 6.0):
        for task in ("spoken-digits", "speaker-id"):
            recipe = validate_recipe({"task": task, "steps": [{"method": "sequence.pool", "params": {"rate": rate}}]},
                                     prepared.model, TASKS)
            run = pipeline.compress(store, dict(prepared.model), recipe, f"pool-{rate}-{task}", lambda f, m: None)["run"]
            scores[rate, task] = run["metrics"]["score"]
            assert run["metrics"]["params"] == run["baseline"]["params"]
            assert "no retraining was needed" in run["metrics"]["notes"][0]
            outputs = _all_outputs(store.resolve(run["artifact"]), tasks.eval_set(task, "speech-ssl"))
            assert outputs["digit_log_probs"].shape[1] == math.ceil(MAX_FRAMES / rate)
    assert scores[1.5, "speaker-id"] > 4 / len(VOICES) and scores[6.0, "speaker-id"] > 4 / len(VOICES)

    # ten seconds of audio: the rate-6 model runs in fewer operations, and ONNX Runtime sees it
    long_audio = EvalSet(inputs={"features": np.random.default_rng(0).normal(
        -5, 1, (1, 500, N_MELS)).astype(np.float32), "lengths": np.array([500])}, labels=None, latency_batch=1)
    paths = []
    for rate in (1.0, 6.0):
        net.pool.rate = rate
        path = tmp_path / f"long-{rate}.onnx"
        torch.onnx.export(net, (torch.randn(1, 500, N_MELS), torch.tensor([500])), str(path), dynamo=False,
                          input_names=["features", "lengths"], output_names=["digit_log_probs", "speaker_logits"],
                          opset_version=17)
        paths.append(path)
    full, pooled = measure.measure_latency(paths, long_audio, seconds=2.0)
    assert pooled["latency_ms"]["p50"] < 0.8 * full["latency_ms"]["p50"]  # measured: about 2x faster


def test_a_learned_rate_rises_with_its_compute_penalty():
    """learn_rate moves only the rate (weights frozen) and a higher penalty buys a higher rate."""
    from services.engine.speech.model import SpeechEncoder
    from services.engine.speech.train import compute_share, learn_rate

    torch.manual_seed(0)
    net = SpeechEncoder(n_speakers=3, d_model=32, layers=2, heads=2, d_ff=64).eval()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    features = rng.normal(-5, 2, (48, 60, N_MELS)).astype(np.float32)
    lengths = rng.integers(30, 61, 48)
    labels = rng.integers(0, 3, 48)
    rates = {}
    for penalty in (0.0, 5.0):
        learned = learn_rate(net, features, lengths, labels, "speaker-id", penalty=penalty, steps=40, batch=16)
        rates[penalty] = learned.rate
        assert 1.0 <= learned.rate <= 8.0 and len(learned.trajectory) == 40
        assert net.pool.rate == learned.rate and isinstance(net.pool.rate, float)
    assert rates[5.0] > rates[0.0] + 1.0
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())  # nothing but the rate moved
    assert all(p.requires_grad for p in net.parameters())
    assert compute_share(net, 1.0) == 1.0 and compute_share(net, 4.0) == pytest.approx((1 + 1 / 4) / 2)


def test_sequence_pool_is_refused_where_it_cannot_work():
    from services.errors import UserError

    with pytest.raises(UserError, match="sequence.pool does not apply to digits-cnn"):
        validate_recipe({"steps": [{"method": "sequence.pool"}]}, {"id": "digits-cnn", "format": "torch",
                                                                   "task": "digits"}, ["digits"])
    with pytest.raises(UserError, match="'rate' must be between 1 and 8"):
        validate_recipe({"steps": [{"method": "sequence.pool", "params": {"rate": 9}}]}, MODEL, TASKS)
    with pytest.raises(UserError, match=r"Step 1 \(sequence.pool\): learning the rate .* not fidelity"):
        validate_recipe({"task": "fidelity", "steps": [{"method": "sequence.pool", "params": {"learn_rate": True}}]},
                        MODEL, TASKS)
    with pytest.raises(UserError, match="cannot follow sequence.pool"):
        validate_recipe({"steps": [{"method": "sequence.pool"}], "recovery": {"objective": "distill"}}, MODEL, TASKS)


@pytest.mark.parametrize("rate", [1.5, 2.5, 7.25])
def test_the_scorer_counts_exactly_the_frames_the_model_pools(rate):
    """Given the rate, every utterance's real output frames are those the model marks real; from the
    shapes alone (T and T') a fractional rate is ambiguous (7.25 gives as many frames as 7)."""
    from services.engine.speech.model import TimePooling

    lengths = np.arange(1, MAX_FRAMES + 1)
    mask = (torch.arange(MAX_FRAMES)[None, :] < torch.from_numpy(lengths)[:, None]).float()
    _, real = TimePooling(rate)(torch.zeros(len(lengths), MAX_FRAMES, 1), mask)
    counted = speech_tasks.output_lengths(lengths, MAX_FRAMES, real.shape[1], rate)
    np.testing.assert_array_equal(counted, real.sum(1).numpy().astype(int))


def test_recovery_pairs_a_block_shared_by_several_depths_once():
    """After share.layers one block runs at two depths: it is matched once, at its last use."""
    from services.engine import distill, recovery
    from services.engine.speech.model import SpeechEncoder

    torch.manual_seed(0)
    teacher = SpeechEncoder(n_speakers=3, d_model=32, layers=4, heads=2, d_ff=64).eval()
    student = copy.deepcopy(teacher)
    student.layers = torch.nn.ModuleList([student.layers[0], student.layers[0], student.layers[2], student.layers[3]])
    pairs = recovery._block_pairs(student, teacher)
    assert pairs == [("layers.0", "layers.1"), ("layers.2", "layers.2"), ("layers.3", "layers.3")]
    features, lengths = torch.randn(2, 40, N_MELS), torch.tensor([40, 30])
    with distill.recording(student, [s for s, _ in pairs]) as states:  # every name is a registered module
        student(features, lengths)
    assert set(states) == {s for s, _ in pairs}
