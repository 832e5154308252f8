"""A result as a Hugging Face Hub folder: the model card's metadata carries the measurements."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
from huggingface_hub import ModelCard

from services import api
from services.errors import UserError


@pytest.fixture
def finished_run(prepared_db):
    submitted = api.submit_compress(prepared_db, "digits-cnn", {"steps": [{"method": "quantize.dynamic"}]})
    assert api.wait_for_job(prepared_db, submitted["job_id"])["status"] == "succeeded"
    return api.get_run(prepared_db, submitted["run_id"])


def test_the_hub_folder_has_the_model_the_recipe_and_a_card_the_hub_library_reads(prepared_db, finished_run, tmp_path):
    archive = zipfile.ZipFile(io.BytesIO(api.hub_zip(prepared_db, finished_run["id"])))
    assert sorted(archive.namelist()) == ["README.md", "metrics.json", "model.onnx", "recipe.json"]
    assert archive.read("model.onnx") == api.artifact_bytes(prepared_db, finished_run)
    assert json.loads(archive.read("recipe.json")) == finished_run["recipe"]
    (tmp_path / "README.md").write_bytes(archive.read("README.md"))
    card = ModelCard.load(tmp_path / "README.md")  # huggingface-hub's own parser and model-index checks
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(finished_run["metrics"]["score"], abs=1e-6)
    assert results["fidelity"] == pytest.approx(finished_run["metrics"]["fidelity"], abs=1e-6)
    assert card.data.eval_results[0].task_type == "image-classification"
    assert card.data.library_name == "onnx" and "quantize.dynamic" in card.data.tags
    assert "smaller" in card.text and "quantize.dynamic" in card.text


def test_publishing_without_a_reachable_hub_says_what_to_do(prepared_db, finished_run):
    with pytest.raises(UserError, match="Could not publish to the Hugging Face Hub .*download the Hub folder"):
        api.publish_to_hub(prepared_db, finished_run["id"], "someone/digits-int8", "hf_token",
                           endpoint="http://127.0.0.1:9")  # nothing listens there: the real client fails to connect
    with pytest.raises(UserError, match="owner/name"):
        api.publish_to_hub(prepared_db, finished_run["id"], "no-owner", "hf_token")
