"""The user's own model: ONNX files, Hugging Face folders (zip or hf:OWNER/NAME) and every bad input
of issue 3 ("Bad input, each with a test").

Each refusal must be one clear sentence, write nothing outside EXPLORER_HOME, leave no model row
when the cheap checks refuse it (a refusal inside the import job marks the row 'failed' with the
reason instead), and run no code from the upload. Models are built here: small ONNX graphs with
onnx.helper and a tiny random BERT saved with safetensors; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_refused_cleanly, run_cli
from services import api
from services.errors import UserError


# ---- models made here ----------------------------------------------------------------------

def classifier_onnx(batch="batch", feature_dim=4, features=4, classes=3, seed=0) -> onnx.ModelProto:
    """x (batch, features) -> MatMul -> Add -> logits (batch, classes); feature_dim is the declared size
    (a name makes it dynamic)."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, feature_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def zip_bytes(entries: dict) -> bytes:
    """name -> bytes (or a ZipInfo-name -> bytes pair with compression)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_folder(folder: Path) -> bytes:
    return zip_bytes({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                      if p.is_file()})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random BERT with 2 small layers and a 60-token WordPiece vocabulary, saved with safetensors."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert") / "tiny-bert"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
             "the", "of", "and", "to", "a", "in", "is", "def", "class", "return", "for", "if", "with", "python",
             "object", "function", "value", "name", "##s", "##ed", "##ing", "type", "list", "module"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    return folder


# ---- helpers -------------------------------------------------------------------------------

def upload_rows(db) -> list[dict]:
    return list(db.query("SELECT * FROM models WHERE source = 'upload'"))


def files_outside(tmp_path: Path, home: Path) -> set[str]:
    return {str(p) for p in tmp_path.rglob("*") if home not in p.parents and p != home}


def wait_ready(db, queued: dict) -> dict:
    job = api.wait_for_job(db, queued["job_id"], timeout_s=240)
    model = api.get_model(db, queued["model_id"])
    assert job["status"] == "succeeded", (job.get("error"), model.get("error"))
    assert model["status"] == "ready"
    return model


def cli_refusal(done) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# ---- bad input, refused by the cheap checks (web process / CLI) ---------------------------------

def test_truncated_onnx_is_refused(db, home):
    data = onnx_bytes(classifier_onnx())
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data[: len(data) // 2], "model.onnx"),
                           "model.onnx is not a valid ONNX model")


def test_random_bytes_named_onnx_are_refused(db, home):
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "weights.onnx"),
                           "weights.onnx is not a valid ONNX model")


def test_an_empty_file_is_refused(db, home):
    assert_refused_cleanly(db, home, lambda: api.import_model(db, b"", "model.onnx"), "model.onnx is empty")


def test_a_file_over_the_upload_limit_is_refused(db, home, monkeypatch):
    monkeypatch.setenv("EXPLORER_MAX_UPLOAD_MB", "1")
    data = onnx_bytes(classifier_onnx()) + b"\0" * (1024 * 1024)
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "big.onnx"),
                           "over the upload limit of 1 MB")


def test_a_file_of_another_kind_is_refused(db, home):
    assert_refused_cleanly(db, home, lambda: api.import_model(db, b"hello", "model.pt"), "upload an .onnx file")


def test_a_zip_entry_that_climbs_out_is_refused(db, home, tmp_path):
    before = files_outside(tmp_path, home)
    data = zip_bytes({"model.onnx": onnx_bytes(classifier_onnx()), "../../evil.txt": b"owned"})
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "model.zip"), "climbs out", "evil.txt")
    assert files_outside(tmp_path, home) == before


def test_a_zip_entry_with_an_absolute_path_is_refused(db, home, tmp_path):
    before = files_outside(tmp_path, home)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", onnx_bytes(classifier_onnx()))
        archive.writestr(zipfile.ZipInfo("placeholder"), b"x")
    raw = buffer.getvalue().replace(b"placeholder", b"/tmp/abs.tx")  # same length: an absolute entry name
    assert_refused_cleanly(db, home, lambda: api.import_model(db, raw, "model.zip"), "absolute path")
    assert files_outside(tmp_path, home) == before
    assert not Path("/tmp/abs.tx").exists()


def test_a_zip_bomb_is_refused_before_extracting(db, home):
    # 64 MB of zeros deflate to about 64 KB: a thousand times larger unpacked than packed.
    data = zip_bytes({"model.onnx": onnx_bytes(classifier_onnx()), "weights.bin": bytes(64 * 1024 * 1024)})
    assert len(data) < 1024 * 1024
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "bomb.zip"), "zip bomb")


def test_a_zip_declaring_more_than_the_unpacked_limit_is_refused(db, home, monkeypatch):
    monkeypatch.setenv("EXPLORER_MAX_UNPACKED_MB", "1")
    noise = np.random.default_rng(0).integers(0, 256, 2 * 1024 * 1024, dtype=np.uint8).tobytes()
    data = zip_bytes({"model.onnx": onnx_bytes(classifier_onnx()), "weights.bin": noise})
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "big.zip"), "would unpack to")


def test_extraction_stops_at_the_byte_cap_whatever_the_zip_declares(tmp_path, monkeypatch):
    from services import imports

    monkeypatch.setenv("EXPLORER_MAX_UNPACKED_MB", "1")
    data = zip_bytes({"model.onnx": bytes(3 * 1024 * 1024)})
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        layout = imports.Layout("onnx", ["model.onnx"], onnx_file="model.onnx")
        members = {"model.onnx": archive.getinfo("model.onnx")}
        with pytest.raises(UserError, match="zip bomb"):
            imports.extract_zip(archive, layout, members, tmp_path, "x.zip")
    assert (tmp_path / "model.onnx").stat().st_size <= 1024 * 1024


def test_a_zip_without_a_model_is_refused(db, home):
    assert_refused_cleanly(db, home, lambda: api.import_model(db, zip_bytes({"notes.txt": b"hi"}), "stuff.zip"),
                           "neither a Hugging Face model")


def test_a_dynamic_dimension_not_fixed_is_refused_by_name(db, home):
    data = onnx_bytes(classifier_onnx(feature_dim="features"))
    message = assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "dyn.onnx"),
                                     "input 'x'", "'features'", "dimension 2 of 2", "--input-shape x=batch,N")
    assert "dynamic dimension" in message
    queued = api.import_model(db, data, "dyn.onnx", input_shapes=["x=batch,4"])
    meta = api.get_model(db, queued["model_id"])["meta"]
    assert meta["inputs"]["x"] == {"dtype": "float", "batch": "dynamic", "sample_shape": [4]}


def test_input_shapes_are_checked_against_the_graph(db, home):
    data = onnx_bytes(classifier_onnx())
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "m.onnx", input_shapes=["y=1,4"]),
                           "no input 'y'; its inputs are x")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "m.onnx", input_shapes=["x=1,5"]),
                           "size 4 at dimension 2")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "m.onnx", input_shapes=["x=1,zero"]),
                           "not a size")


def _external_data_model(folder: Path, location: str) -> Path:
    """An ONNX model whose weights live in weights.bin beside it, then pointed at `location`."""
    from onnx import external_data_helper

    model = classifier_onnx()
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                        location="weights.bin", size_threshold=0)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    edited = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in edited.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(edited, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_external_data_pointing_outside_the_folder_is_refused(db, home, tmp_path):
    folder = tmp_path / "ext"
    _external_data_model(folder, "../../etc/passwd")
    data = zip_folder(folder)
    assert_refused_cleanly(db, home, lambda: api.import_model(db, data, "ext.zip"),
                           "point outside its folder", "../../etc/passwd")
    # The same file alone: refused for the same reason.
    assert_refused_cleanly(db, home, lambda: api.import_model(db, (folder / "model.onnx").read_bytes(), "m.onnx"),
                           "point outside its folder")


def test_the_import_job_checks_external_data_paths_itself(tmp_path):
    """Defence in depth: the job refuses an escaping path before onnx or ONNX Runtime reads it."""
    from services.engine import imported

    path = _external_data_model(tmp_path / "job", "../../etc/passwd")
    with pytest.raises(UserError, match="point outside its folder"):
        imported.load_with_checked_external_data(path, "model.onnx")
    path = _external_data_model(tmp_path / "job2", "/etc/passwd")
    with pytest.raises(UserError, match="point outside its folder"):
        imported.load_with_checked_external_data(path, "model.onnx")
    path = _external_data_model(tmp_path / "job3", "weights.bin")
    assert imported.load_with_checked_external_data(path, "model.onnx").graph.node


def test_hf_offline_without_a_cached_copy_says_so(db, home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, "hf:someone/tiny-bert"),
                           "Could not reach the Hugging Face Hub to fetch someone/tiny-bert (no network); "
                           "upload the model folder as a zip instead.")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, "hf:not a name"), "hf:OWNER/NAME")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    """weights_only=True refuses the pickle's call to os.system: the marker file never appears."""
    import pickle

    import torch

    from services.engine import hf_import

    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for index, save in enumerate((lambda obj, path: torch.save(obj, path),
                                  lambda obj, path: path.write_bytes(pickle.dumps(obj)))):
        folder = tmp_path / f"hf{index}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save({"weight": RunsCode()}, folder / "pytorch_model.bin")
        with pytest.raises(UserError, match="does not load with weights_only=True"):
            hf_import.ensure_safetensors(folder, "upload.zip")
        assert not marker.exists()
        assert not (folder / "model.safetensors").exists()


def test_a_plain_state_dict_pickle_is_converted_to_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    from services.engine import hf_import

    (tmp_path / "config.json").write_text("{}")
    torch.save({"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    hf_import.ensure_safetensors(tmp_path, "upload.zip")
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert set(load_file(tmp_path / "model.safetensors")) == {"a.weight", "b.bias"}


def test_a_model_folder_is_copied_with_only_model_files(db, home, tiny_bert, tmp_path):
    folder = tmp_path / "folder-bert"
    shutil.copytree(tiny_bert, folder)
    (folder / "modeling_evil.py").write_text("import os; os.system('touch pwned')\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    queued = api.import_model(db, str(folder))
    model = api.get_model(db, queued["model_id"])
    assert model["format"] == "torch" and model["status"] == "new" and model["name"] == "folder-bert"
    stored = home / model["meta"]["folder"]
    assert sorted(p.name for p in stored.iterdir()) == sorted(model["meta"]["files"])
    assert "model.safetensors" in model["meta"]["files"]
    assert model["meta"]["skipped_files"] == ["modeling_evil.py"] and not (stored / "modeling_evil.py").exists()


def test_a_folder_with_a_symbolic_link_is_refused(db, home, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_bytes(classifier_onnx()))
    (folder / "weights.bin").symlink_to("/etc/passwd")
    assert_refused_cleanly(db, home, lambda: api.import_model(db, str(folder)), "symbolic link")


def test_method_applicability_gives_a_reason_sentence():
    methods = {m["name"]: m for m in api.method_applicability({"format": "onnx"})}
    assert methods["quantize.dynamic"]["applies"] and methods["quantize.dynamic"]["reason"] == ""
    prune = methods["prune.magnitude"]
    assert not prune["applies"]
    assert prune["reason"].startswith("needs a PyTorch model; an ONNX upload can only be changed by graph-level")
    uploaded_hf = {m["name"]: m for m in api.method_applicability({"format": "torch"})}  # a text transformer
    assert all(m["applies"] for name, m in uploaded_hf.items() if name != "sequence.pool")
    assert uploaded_hf["sequence.pool"]["reason"].startswith("works on the built-in speech-ssl, speech-ssl-moco and minilm-l6 only")


# ---- the import job (child process) ------------------------------------------------------------

@pytest.mark.slow
def test_onnx_upload_is_imported_with_its_card_and_quantized(db, home):
    queued = api.import_model(db, onnx_bytes(classifier_onnx(batch=1)), "classifier.onnx", name="My classifier")
    assert api.get_model(db, queued["model_id"])["status"] == "new"
    model = wait_ready(db, queued)
    card = model["card"]
    assert model["format"] == "onnx" and model["task"] == "fidelity" and model["tasks"] == ["fidelity"]
    assert card["score_name"] == "fidelity" and card["score"] == 1.0
    assert card["params"] == 4 * 3 + 3 and card["params_by_op"] == {"MatMul": 12, "Add": 3}
    # The fixed batch of 1 was made dynamic, so the model can be timed and scored in batches.
    assert card["io"]["inputs"] == [{"name": "x", "type": "tensor(float)", "shape": ["batch", 4]}]
    assert card["io"]["outputs"][0]["shape"] == ["batch", 3]
    assert model["meta"]["batch_made_dynamic"] == 1
    assert card["output_kind"] == "logits" and card["latency_ms"]["p50"] > 0
    assert "synthetic" in card["eval_data"]
    methods = {m["name"]: m for m in card["methods"]}
    assert methods["quantize.dynamic"]["applies"] and not methods["prune.magnitude"]["applies"]
    assert (home / model["artifact"]).is_file()
    assert any(m["id"] == model["id"] for m in api.list_models(db))

    with pytest.raises(UserError, match="needs a PyTorch model"):
        api.submit_compress(db, model["id"], {"steps": [{"method": "prune.magnitude"}]})
    submitted = api.submit_compress(db, model["id"], {"steps": [{"method": "quantize.dynamic"}]})
    job = api.wait_for_job(db, submitted["job_id"], timeout_s=240)
    assert job["status"] == "succeeded", job.get("error")
    run = api.get_run(db, submitted["run_id"])
    assert run["metrics"]["score_name"] == "fidelity" and run["baseline"]["score"] == 1.0


@pytest.mark.slow
def test_onnx_upload_with_a_labelled_data_set_is_scored_on_accuracy(db, home):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    model = classifier_onnx()
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)
    y = (x @ weight + bias).argmax(axis=1)
    y[:6] = (y[:6] + 1) % 3  # 6 of 60 labelled otherwise: accuracy 0.9
    folder = home / "datasets" / "d1"
    folder.mkdir(parents=True)
    np.savez(folder / "data.npz", X=x, y=y.astype(np.int64))
    db["datasets"].insert({"id": "d1", "name": "my data", "kind": "npz", "has_labels": 1, "n_samples": 60,
                           "summary": "{}", "path": "datasets/d1", "created_at": "now"})
    queued = api.import_model(db, onnx_bytes(model), "classifier.onnx", dataset_id="d1")
    ready = wait_ready(db, queued)
    assert ready["task"] == "your-data" and ready["tasks"] == ["your-data", "fidelity"]
    assert ready["dataset_id"] == "d1"
    assert ready["card"]["score_name"] == "accuracy" and ready["card"]["score"] == pytest.approx(0.9)
    assert "my data" in ready["card"]["eval_data"]

    with pytest.raises(UserError, match="labels"):
        db["datasets"].insert({"id": "d2", "name": "unlabelled", "kind": "npz", "has_labels": 0, "n_samples": 60,
                               "summary": "{}", "path": "datasets/d1", "created_at": "now"})
        api.import_model(db, onnx_bytes(model), "c.onnx", dataset_id="d2", task="your-data")


@pytest.mark.slow
def test_onnx_zip_with_its_external_data_is_imported_as_one_file(db, home, tmp_path):
    folder = tmp_path / "ext-ok"
    _external_data_model(folder, "weights.bin")
    model = wait_ready(db, api.import_model(db, zip_folder(folder), "ext-ok.zip"))
    artifact = onnx.load(str(home / model["artifact"]), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in artifact.graph.initializer)
    assert model["card"]["params"] == 15 and model["card"]["score"] == 1.0


@pytest.mark.slow
def test_an_unreachable_hub_fails_the_job_with_the_clear_sentence(db, home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    queued = api.import_model(db, "hf:someone/tiny-bert")
    job = api.wait_for_job(db, queued["job_id"], timeout_s=120)
    assert job["status"] == "failed"
    assert job["error"] == ("Could not reach the Hugging Face Hub to fetch someone/tiny-bert (no network); upload "
                            "the model folder as a zip instead.")
    assert api.get_model(db, queued["model_id"])["status"] == "failed"


def digits_onnx() -> onnx.ModelProto:
    """image (batch, 1, 8, 8) -> Flatten -> MatMul -> logits (batch, 10), random weights."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "digits", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.slow
def test_onnx_upload_on_the_builtin_digits_task(db, home):
    model = wait_ready(db, api.import_model(db, onnx_bytes(digits_onnx()), "digits.onnx", task="digits"))
    assert model["tasks"] == ["digits", "fidelity"]
    assert model["card"]["score_name"] == "accuracy" and 0 <= model["card"]["score"] <= 1
    assert model["card"]["batch_latency_ms"]["batch"] == 256  # the digits task's own timing batch

    misfit = api.import_model(db, onnx_bytes(classifier_onnx()), "four.onnx", task="digits")
    job = api.wait_for_job(db, misfit["job_id"], timeout_s=120)
    assert job["status"] == "failed"
    assert job["error"] == "Task 'digits' has samples shaped (1, 8, 8), but the model's input 'x' takes (batch, 4)."
    with pytest.raises(UserError, match="can be scored on fidelity, your-data, digits"):
        api.import_model(db, onnx_bytes(classifier_onnx()), "four.onnx", task="pydoc-retrieval")


@pytest.mark.slow
def test_onnx_checker_refusal_fails_the_job_and_the_cli_exits_2(home, tmp_path):
    model = classifier_onnx()
    model.graph.node[0].input[1] = "missing_weight"  # a node reads a tensor nobody makes
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    line = cli_refusal(run_cli("models", "import", str(path), "--json", home=home))
    assert "The ONNX checker refused broken.onnx" in line
    conn = sqlite3.connect(home / "explorer.db")
    rows = conn.execute("SELECT status, error FROM models WHERE source = 'upload'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "failed" and "ONNX checker refused" in rows[0][1]


@pytest.mark.slow
def test_cli_refusals_are_one_line_with_exit_2(home, tmp_path):
    dynamic = tmp_path / "dyn.onnx"
    dynamic.write_bytes(onnx_bytes(classifier_onnx(feature_dim="features")))
    line = cli_refusal(run_cli("models", "import", str(dynamic), "--json", home=home))
    assert "dynamic dimension 'features'" in line
    cli_refusal(run_cli("models", "import", str(tmp_path / "nope.onnx"), "--json", home=home))
    cli_refusal(run_cli("models", "import", "hf:someone/model", "--json", home=home,
                        extra_env={"HF_HUB_OFFLINE": "1"}))
    done = run_cli("models", "import", str(dynamic), "--input-shape", "x=batch,4", "--name", "fixed", "--json",
                   home=home)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "ready" and record["name"] == "fixed" and record["card"]["params_by_op"]
    listed = json.loads(run_cli("models", "list", "--json", home=home).stdout)
    assert [m["id"] for m in listed if m["source"] == "upload"] == [record["id"]]


@pytest.mark.slow
def test_hugging_face_zip_is_imported_pruned_and_quantized(db, home, tiny_bert):
    queued = api.import_model(db, zip_folder(tiny_bert), "tiny-bert.zip")
    model = wait_ready(db, queued)
    card = model["card"]
    assert model["format"] == "torch" and card["output_kind"] == "embedding"
    assert card["score_name"] == "fidelity" and card["score"] == pytest.approx(1.0)
    assert [i["name"] for i in card["io"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert card["io"]["inputs"][0]["shape"] == ["batch", "sequence"]
    assert card["io"]["outputs"][0]["shape"] == ["batch", 32]
    assert "MatMul" in card["params_by_op"] and "Gather" in card["params_by_op"]
    assert "paragraphs of Python's help text" in card["eval_data"]
    # every method applies to a text transformer but the speech encoder's sequence pooling
    assert {m["name"] for m in card["methods"] if not m["applies"]} == {"sequence.pool"}

    recipe = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.5}}, {"method": "quantize.dynamic"}]}
    submitted = api.submit_compress(db, model["id"], recipe)
    job = api.wait_for_job(db, submitted["job_id"], timeout_s=240)
    assert job["status"] == "succeeded", job.get("error")
    metrics = api.get_run(db, submitted["run_id"])["metrics"]
    assert metrics["nonzero_params"] < card["nonzero_params"]
    assert 0 < metrics["fidelity"] < 1.0


@pytest.mark.slow
def test_hf_source_is_read_from_the_hub_cache_under_explorer_home(db, home, tiny_bert, monkeypatch):
    """hf:OWNER/NAME with HF_HUB_OFFLINE=1 and the model in EXPLORER_HOME/hf-cache (the hub's layout)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hf-cache" / "models--someone--tiny-bert"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_bert, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = wait_ready(db, api.import_model(db, "hf:someone/tiny-bert"))
    assert model["name"] == "tiny-bert" and model["meta"]["hf_repo"] == "someone/tiny-bert"
    assert model["meta"]["folder"] == f"hf-cache/models--someone--tiny-bert/snapshots/{commit}"
    assert model["card"]["score"] == pytest.approx(1.0)


@pytest.mark.slow
def test_hf_zip_with_a_code_running_pickle_fails_the_job_and_runs_nothing(db, home, tiny_bert, tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil-bert"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": RunsCode()}, folder / "pytorch_model.bin")
    queued = api.import_model(db, zip_folder(folder), "evil-bert.zip")
    job = api.wait_for_job(db, queued["job_id"], timeout_s=240)
    model = api.get_model(db, queued["model_id"])
    assert job["status"] == "failed" and model["status"] == "failed"
    assert "pytorch_model.bin is a pickle checkpoint that does not load with weights_only=True" in model["error"]
    assert not marker.exists()


# ---- the Models page's import form and the web process ------------------------------------------

def _models_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=30)
    at.switch_page("app_pages/models.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_models_page_import_shows_the_sentence_then_queues_the_job(db, home):
    at = _models_page()
    data = onnx_bytes(classifier_onnx(feature_dim="features"))
    at.file_uploader(key="import-file").upload("dyn.onnx", data).run()
    assert any("Input `x`: float [batch, features]" in c.value for c in at.caption)
    at.button(key="import-submit").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("dynamic dimension 'features'" in e for e in errors), errors
    assert upload_rows(db) == []

    at.text_input(key="import-shapes").set_value("x=batch,4").run()
    at.button(key="import-submit").click().run()
    assert not at.exception and not at.error
    assert any("Importing `dyn-" in s.value for s in at.success)
    rows = upload_rows(db)
    assert len(rows) == 1 and rows[0]["status"] == "new" and rows[0]["format"] == "onnx"
    jobs = api.list_jobs(db, model_id=rows[0]["id"])
    assert [(j["kind"], j["status"]) for j in jobs] == [("prepare", "queued")]


def test_models_page_refuses_a_zip_bomb_with_its_sentence(db, home):
    at = _models_page()
    data = zip_bytes({"model.onnx": onnx_bytes(classifier_onnx()), "weights.bin": bytes(32 * 1024 * 1024)})
    at.file_uploader(key="import-file").upload("bomb.zip", data).run()
    at.button(key="import-submit").click().run()
    assert any("zip bomb" in e.value for e in at.error)
    assert upload_rows(db) == []
    assert not (home / "uploads").exists() or not list((home / "uploads").iterdir())


@pytest.mark.slow
def test_importing_through_the_api_loads_no_torch_onnx_or_onnxruntime(tmp_path):
    import subprocess
    import sys

    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(onnx_bytes(classifier_onnx()))
    zipped = tmp_path / "m.zip"
    zipped.write_bytes(zip_bytes({"model.onnx": onnx_bytes(classifier_onnx())}))
    code = (
        "import sys\n"
        "from services import api\n"
        "db = api.connect()\n"
        f"api.import_model(db, {str(model_path)!r})\n"
        f"api.import_model(db, open({str(zipped)!r}, 'rb').read(), 'm.zip')\n"
        f"api.onnx_inputs(open({str(model_path)!r}, 'rb').read(), 'm.onnx')\n"
        "api.list_models(db); api.method_applicability({'format': 'onnx'})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnxruntime', 'onnx', 'transformers', 'huggingface_hub'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EXPLORER_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.slow
def test_models_page_shows_an_upload_card_and_a_failed_import(db, home):
    ready = wait_ready(db, api.import_model(db, onnx_bytes(classifier_onnx()), "mine.onnx", name="Mine"))
    broken = classifier_onnx()
    broken.graph.node[0].input[1] = "missing_weight"
    failed = api.import_model(db, onnx_bytes(broken), "broken.onnx")
    assert api.wait_for_job(db, failed["job_id"], timeout_s=120)["status"] == "failed"

    at = _models_page()
    assert f"Mine  ·  `{ready['id']}`" in [s.value for s in at.subheader]
    assert "Throughput (batch 32)" in [m.label for m in at.metric]
    text = " ".join(m.value for m in at.markdown)
    assert "Input `x`: tensor(float) [batch, 4]" in text
    assert "`prune.magnitude` (Magnitude pruning (unstructured)): not applicable: needs a PyTorch model" in text
    assert any(e.value.startswith("Importing this model failed: The ONNX checker refused broken.onnx")
               for e in at.error)
    assert [b.label for b in at.button if b.key == f"prepare-{failed['model_id']}"] == ["Import again"]
