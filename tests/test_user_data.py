"""The user's own data feeding the user's own model (issue 3, "The user's own data"): a CSV scores a
Hugging Face text model, a zip of WAV files scores an ONNX audio model (raw waveform or log-mel input).

Every model and data set is made here: a tiny random BERT sequence classifier (and the same BERT
without its head) saved with safetensors, small ONNX models exported from torch (dynamo=False), sine
tones written as WAV files. Each path is imported, scored on the data set, and its card says what it was
scored on; a data set the model cannot read is refused with one sentence before anything is stored.
"""
from __future__ import annotations

import io
import json
import random
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_refused_cleanly, run_cli
from services import api, data_fit
from services.errors import UserError

pytestmark = pytest.mark.slow

ID2LABEL = {0: "positive", 1: "negative", 2: "neutral"}  # not sorted: sorted order would be negative, neutral, positive
WORDS = ["the", "movie", "was", "good", "bad", "fine", "plot", "actor", "very", "not", "and", "story", "long",
         "short", "funny", "dull"]
UNUSED_WORDS = ["zebra", "quantum", "violin", "harbor"]  # in the vocabulary, never in the texts: vocab.trim drops them
RATE, TONE_SAMPLES = 16_000, 4_000  # 0.25 s tones
HIGH_HZ, LOW_HZ = 1_000.0, 300.0


# ---- models and data made here -----------------------------------------------------------------

def _save_bert(folder: Path, classifier: bool, num_labels: int = 3) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *WORDS, *UNUSED_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    id2label = ID2LABEL if num_labels == 3 else {i: f"class{i}" for i in range(num_labels)}
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(config) if classifier else BertModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("berts")
    return {"classifier": _save_bert(root / "review-classifier", classifier=True),
            "encoder": _save_bert(root / "review-encoder", classifier=False)}


def zip_folder(folder: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.writestr(path.relative_to(folder).as_posix(), path.read_bytes())
    return out.getvalue()


def review_texts(n: int) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def predicted_labels(folder: Path, texts: list[str]) -> list[str]:
    """What the classifier answers, read as the import reads it: its own tokenizer, 64 tokens, id2label."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = BertForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager").eval()
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4, "a near tie: ONNX and torch could disagree"
    return [ID2LABEL[int(i)] for i in logits.argmax(dim=1)]


def csv_bytes(rows: list[tuple]) -> bytes:
    header = "text,label" if len(rows[0]) == 2 else "text"
    return ("\n".join([header, *(",".join(r) for r in rows)]) + "\n").encode()


def tone(freq: float, samples: int = TONE_SAMPLES) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(samples) / RATE)).astype(np.float32)


def wav_bytes(signal: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(RATE)
        handle.writeframes(np.round(signal * 32767).astype("<i2").tobytes())
    return out.getvalue()


def tones_zip() -> bytes:
    """25 high and 25 low tones in folders 'high' and 'low'; low/00, low/01 (scored rows 25, 26) and
    low/04 (row 29: every 5th row is kept for fitting) are really high tones."""
    entries = {f"high/{i:02d}.wav": wav_bytes(tone(HIGH_HZ)) for i in range(25)}
    entries |= {f"low/{i:02d}.wav": wav_bytes(tone(HIGH_HZ if i in (0, 1, 4) else LOW_HZ)) for i in range(25)}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def export_onnx(net, example, path: Path, input_name: str = "audio") -> bytes:
    import torch

    torch.onnx.export(net.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=["logits"], dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}})
    return path.read_bytes()


def waveform_classifier(path: Path, samples: int = 4_800, classes: int = 2) -> bytes:
    """(batch, samples) -> (batch, classes): correlation with a high tone (output 0) and a low tone (output 1)."""
    import torch

    linear = torch.nn.Linear(samples, classes, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0] = torch.from_numpy(tone(HIGH_HZ, samples))
        linear.weight[1] = torch.from_numpy(tone(LOW_HZ, samples))
    return export_onnx(linear, torch.zeros(1, samples), path)


class MeanMelClassifier:
    """(batch, frames, 80) log-mels -> mean over frames -> nearest of two centroids (high = 0, low = 1)."""

    @staticmethod
    def build(frames: int):
        import torch

        from services.engine.speech import features

        samples = (frames - 1) * features.HOP
        centroids = np.stack([features.log_mel(tone(f, samples)).mean(axis=0) for f in (HIGH_HZ, LOW_HZ)])

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(80, 2)
                with torch.no_grad():
                    self.linear.weight.copy_(torch.from_numpy(centroids))
                    self.linear.bias.copy_(torch.from_numpy(-0.5 * (centroids ** 2).sum(axis=1)))

            def forward(self, mels):
                return self.linear(mels.mean(dim=1))

        return Net()


def logmel_classifier(path: Path, frames: int = 10) -> bytes:
    import torch

    return export_onnx(MeanMelClassifier.build(frames), torch.zeros(1, frames, 80), path, input_name="mels")


def image_onnx(classes: int = 3) -> bytes:
    """x (batch, 1, 8, 8) -> Flatten -> MatMul -> logits (batch, classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((64, classes), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "image", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# ---- helpers -------------------------------------------------------------------------------------

def wait_ready(db, queued: dict) -> dict:
    job = api.wait_for_job(db, queued["job_id"], timeout_s=240)
    model = api.get_model(db, queued["model_id"])
    assert job["status"] == "succeeded", (job.get("error"), model.get("error"))
    return model


def prepare_here(db, home: Path, queued: dict) -> dict:
    """The import job's work in this process (torch is loaded already): the model row as it would be stored."""
    from services.engine import pipeline
    from storage import ArtifactStore

    model = api.get_model(db, queued["model_id"])
    update = pipeline.prepare(ArtifactStore(home), model, lambda fraction, message: None)["model_update"]
    return {**model, **update, "meta": json.loads(update["meta"])}


def compress_here(db, home: Path, model_id: str, recipe: dict) -> dict:
    from services.engine import pipeline
    from storage import ArtifactStore

    clean = api.check_recipe(db, model_id, recipe)
    return pipeline.compress(ArtifactStore(home), api.get_model(db, model_id), clean, "run-1",
                             lambda fraction, message: None)["run"]


# ---- a CSV scores a Hugging Face text model ------------------------------------------------------

def test_a_csv_scores_a_sequence_classifier_on_accuracy_through_the_cli(db, home, berts):
    folder = berts["classifier"]
    texts = review_texts(60)
    predicted = predicted_labels(folder, texts)
    others = {name: [n for n in ID2LABEL.values() if n != name] for name in ID2LABEL.values()}
    wrong_scored = {1, 2, 3, 6, 7, 8}  # 6 of the 48 scored rows are labelled otherwise: accuracy 42 / 48
    labels = []
    for i, answer in enumerate(predicted):
        fitting = i % 5 == 4  # every 5th row is kept for fitting, never scored: all of them wrong here
        labels.append(others[answer][i % 2] if fitting or i in wrong_scored else answer)
    dataset = api.import_dataset(db, "reviews.csv", csv_bytes(list(zip(texts, labels))))
    assert set(dataset["summary"]["classes"]) == set(ID2LABEL.values())

    done = run_cli("models", "import", str(folder), "--dataset", dataset["id"], "--json", home=home, timeout=300)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    card = model["card"]
    assert model["status"] == "ready" and model["task"] == "your-data" and model["dataset_id"] == dataset["id"]
    assert card["output_kind"] == "logits" and card["score_name"] == "accuracy"
    assert card["score"] == pytest.approx(42 / 48)
    assert card["io"]["outputs"][0]["shape"] == ["batch", 3]
    assert card["eval_data"].startswith("48 scored rows (every 5th of the 60 is kept apart for fitting) of the data "
                                        "set reviews, tokenized by the model's own tokenizer")
    assert card["label_order"] == {"by": "id2label", "labels": ["positive", "negative", "neutral"]}
    assert "by its config's id2label: positive = 0, negative = 1, neutral = 2" in card["note"]

    from services.engine.tasks import uploaded

    fit = uploaded.fit_set("your-data", api.get_model(db, model["id"]), home)
    assert fit.extra["texts"] == texts[4::5] and not fit.extra.get("overlaps_scoring")
    assert "12 fitting rows" in fit.extra["data"] and len(fit.labels) == 12

    # Compressing it: vocab.trim counts tokens on the fitting rows and the run is scored on the same CSV rows
    # encoded by the rebuilt tokenizer; the classifier head survives the torch step and the export.
    # (In this process, as the compress job's child would run it: the job path is tested in test_imports.py.)
    recipe = {"steps": [{"method": "vocab.trim"}, {"method": "prune.magnitude", "params": {"amount": 0.2}}]}
    run = compress_here(db, home, model["id"], recipe)
    assert run["baseline"]["score"] == pytest.approx(42 / 48)
    assert run["metrics"]["score_name"] == "accuracy" and "tokenizer" in run["metrics"]["files"]
    assert run["metrics"]["size_bytes"] < run["baseline"]["size_bytes"]
    assert run["metrics"]["nonzero_params"] < run["baseline"]["nonzero_params"]
    assert any("used in 12 fitting texts that are never scored" in note for note in run["metrics"]["notes"])


def test_a_csv_scores_a_plain_encoder_on_fidelity_and_the_card_says_why(db, home, berts):
    rows = [(text, "yes" if i % 2 else "no") for i, text in enumerate(review_texts(20))]
    dataset = api.import_dataset(db, "small.csv", csv_bytes(rows))
    queued = api.import_model(db, zip_folder(berts["encoder"]), "review-encoder.zip", dataset_id=dataset["id"])
    assert api.get_model(db, queued["model_id"])["task"] == "your-data"
    model = prepare_here(db, home, queued)  # the job path is the CLI test's
    card = model["card"]
    assert model["task"] == "fidelity" and card["score_name"] == "fidelity"
    assert card["output_kind"] == "embedding" and card["score"] == pytest.approx(1.0)
    assert card["eval_data"].startswith("20 rows (too few to split: fitting sees the scored rows) of the data set "
                                        "small, tokenized by the model's own tokenizer")
    assert card["note"].startswith("Scored on fidelity over the data set's texts: the model has no "
                                   "sequence-classification head (its config names BertModel)")


# ---- a zip of WAV files scores an ONNX audio model -----------------------------------------------

def test_wav_files_score_a_waveform_model_and_a_log_mel_model(db, home, tmp_path):
    dataset = api.import_dataset(db, "tones.zip", tones_zip())
    assert dataset["kind"] == "wav" and dataset["summary"]["classes"] == {"high": 25, "low": 25}

    waveform = wait_ready(db, api.import_model(db, waveform_classifier(tmp_path / "wave.onnx"), "wave.onnx",
                                               dataset_id=dataset["id"]))
    card = waveform["card"]
    assert waveform["task"] == "your-data" and card["score_name"] == "accuracy"
    assert card["score"] == pytest.approx(38 / 40)  # 2 of the 40 scored recordings are labelled otherwise
    assert card["eval_data"].startswith("40 scored recordings (every 5th of the 50 is kept apart for fitting) of "
                                        "the data set tones, 16 kHz waveforms of 4,800 samples")
    assert card["label_order"] == {"by": "sorted", "labels": ["high", "low"]}
    assert "in sorted order" in card["note"] and "high = 0, low = 1" in card["note"]

    # The same data set for a log-mel model and, without labels, for fidelity: the import job's work in this
    # process (the job path is the waveform model's above).
    mels = prepare_here(db, home, api.import_model(db, logmel_classifier(tmp_path / "mels.onnx"), "mels.onnx",
                                                   dataset_id=dataset["id"]))
    card = mels["card"]
    assert card["score_name"] == "accuracy" and card["score"] == pytest.approx(38 / 40)
    assert "log-mel features (80 bands, one frame every 20 ms) of the first 10 frames" in card["eval_data"]

    from services.engine.tasks import uploaded

    fit = uploaded.fit_set("your-data", mels, home)
    assert fit.inputs["mels"].shape == (10, 10, 80) and list(fit.labels) == [0] * 5 + [1] * 5
    assert not fit.extra.get("overlaps_scoring")

    # Without labels the same audio scores fidelity.
    unlabelled = api.import_dataset(db, "loose.zip", zip_bytes({f"{i}.wav": wav_bytes(tone(LOW_HZ)) for i in range(4)}))
    loose = prepare_here(db, home, api.import_model(db, waveform_classifier(tmp_path / "w2.onnx"), "w2.onnx",
                                                    dataset_id=unlabelled["id"]))
    assert loose["task"] == "fidelity" and loose["card"]["score"] == 1.0
    assert "4 recordings (too few to split" in loose["card"]["eval_data"]


def zip_bytes(entries: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


# ---- mismatches: one sentence, nothing stored -----------------------------------------------------

def test_a_data_set_the_model_cannot_read_is_refused_before_anything_is_stored(db, home, berts, tmp_path):
    reviews = api.import_dataset(db, "reviews.csv", csv_bytes([(t, "a" if i % 2 else "b")
                                                               for i, t in enumerate(review_texts(10))]))
    tones = api.import_dataset(db, "tones.zip", tones_zip())
    arrays = io.BytesIO()
    np.savez(arrays, X=np.zeros((4, 64), np.float32))
    npz = api.import_dataset(db, "arrays.npz", arrays.getvalue())
    classifier_zip = zip_folder(berts["classifier"])

    assert_refused_cleanly(db, home, lambda: api.import_model(db, image_onnx(), "image.onnx",
                                                              dataset_id=reviews["id"]),
                           "The data set 'reviews' holds text (a CSV file), but an ONNX model has no tokenizer")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, classifier_zip, "clf.zip", dataset_id=tones["id"]),
                           "The data set 'tones' holds audio (a zip of WAV files), but a Hugging Face model reads "
                           "text; attach a CSV data set")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, classifier_zip, "clf.zip", dataset_id=npz["id"]),
                           "holds arrays (an NPZ file), but a Hugging Face model reads text")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, image_onnx(), "image.onnx", dataset_id=tones["id"]),
                           "The data set 'tones' is audio, but the model's input 'x' takes (batch, 1, 8, 8), which "
                           "is neither a waveform (batch, samples) nor log-mel frames (batch, frames, 80)")
    # Wrong class counts: 3 class scores for 2 folders of audio; a 3-label classifier for a 2-label CSV.
    three_way = waveform_classifier(tmp_path / "three.onnx", classes=3)
    assert_refused_cleanly(db, home, lambda: api.import_model(db, three_way, "three.onnx", dataset_id=tones["id"]),
                           "The model gives 3 class scores per sample, but the data set 'tones' has 2 labels")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, classifier_zip, "clf.zip", dataset_id=reviews["id"]),
                           "The model gives 3 class scores per sample, but the data set 'reviews' has 2 labels")
    # Scoring on fidelity instead needs no class match.
    queued = api.import_model(db, three_way, "three.onnx", dataset_id=tones["id"], task="fidelity")
    assert api.get_model(db, queued["model_id"])["task"] == "fidelity"


def test_label_order_and_the_fitting_split():
    assert data_fit.label_order(["Negative", "positive"], {"0": "POSITIVE", "1": "negative"}) == \
        (["positive", "Negative"], "id2label")
    assert data_fit.label_order(["b", "a"], {"0": "LABEL_0", "1": "LABEL_1"}) == (["a", "b"], "sorted")
    assert data_fit.label_order(["10", "2", "1"]) == (["1", "2", "10"], "sorted")

    from services.engine.tasks import uploaded

    scored, fitting, overlaps = uploaded.split_rows(50)
    assert fitting == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49] and len(scored) == 40 and not overlaps
    assert not set(scored) & set(fitting)
    assert uploaded.split_rows(49)[2] and uploaded.split_rows(49)[0] == uploaded.split_rows(49)[1]


def test_audio_input_layouts_are_read_from_the_input_shape(tmp_path):
    from services.engine.tasks import recordings

    paths = []
    for i, samples in enumerate((3_000, 6_000)):  # one shorter, one longer than the inputs below
        paths.append(tmp_path / f"{i}.wav")
        paths[-1].write_bytes(wav_bytes(tone(LOW_HZ, samples)))
    channel, _ = recordings.audio_inputs(paths, "audio", {"dtype": "float", "sample_shape": [1, 4_000]}, "d")
    assert channel.shape == (2, 1, 4_000) and not channel[0, 0, 3_000:].any() and channel[1, 0, -1] != 0
    frames_first, _ = recordings.audio_inputs(paths, "mels", {"dtype": "float", "sample_shape": [12, 80]}, "d")
    mel_first, how = recordings.audio_inputs(paths, "mels", {"dtype": "double", "sample_shape": [80, 12]}, "d")
    assert frames_first.shape == (2, 12, 80) and mel_first.shape == (2, 80, 12) and mel_first.dtype == np.float64
    assert np.allclose(mel_first.transpose(0, 2, 1), frames_first, atol=1e-5)
    assert "of the first 12 frames (0.22 s" in how
    with pytest.raises(UserError, match="takes int64 values"):
        recordings.audio_inputs(paths, "ids", {"dtype": "int64", "sample_shape": [4_000]}, "d")


# ---- the Models page attaches a data set ---------------------------------------------------------

def test_models_page_attaches_a_csv_to_a_hugging_face_upload(db, home, berts):
    from streamlit.testing.v1 import AppTest

    reviews = api.import_dataset(db, "reviews.csv", csv_bytes([(t, ID2LABEL[i % 3])
                                                               for i, t in enumerate(review_texts(9))]))
    tones = api.import_dataset(db, "tones.zip", tones_zip())
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=30)
    at.switch_page("app_pages/models.py")
    at.run()
    box = at.selectbox(key="import-dataset")
    assert "reviews (CSV text, labelled)" in box.options and "tones (WAV audio, labelled)" in box.options
    at.file_uploader(key="import-file").upload("clf.zip", zip_folder(berts["classifier"])).run()
    at.selectbox(key="import-dataset").set_value(tones["id"]).run()
    at.button(key="import-submit").click().run()
    assert any("a Hugging Face model reads text" in e.value for e in at.error), [e.value for e in at.error]
    assert list(db.query("SELECT id FROM models WHERE source = 'upload'")) == []

    at.selectbox(key="import-dataset").set_value(reviews["id"]).run()
    at.button(key="import-submit").click().run()
    assert not at.exception and any("Importing `clf-" in s.value for s in at.success)
    rows = list(db.query("SELECT * FROM models WHERE source = 'upload'"))
    assert len(rows) == 1 and rows[0]["task"] == "your-data" and rows[0]["dataset_id"] == reviews["id"]
    assert json.loads(rows[0]["meta"])["dataset"]["classes"] == ["negative", "neutral", "positive"]
