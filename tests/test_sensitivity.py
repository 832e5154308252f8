"""Per-layer sensitivity scans: the real engine on digits-cnn, the queue, the CLI and skip_sensitive."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, run_cli_json
from services import api
from services.engine import sensitivity, tasks
from services.errors import UserError
from storage import ArtifactStore

pytestmark = pytest.mark.slow
DIGITS_LAYERS = {"features.0", "features.2", "classifier.1", "classifier.3"}


def _scan(home, method: str, params: dict) -> dict:
    db = api.connect(home)
    model = api.get_model(db, "digits-cnn")
    spec = {"method": method, "params": api.check_recipe(db, "digits-cnn", {"steps": [
        {"method": method, "params": params}]})["steps"][0]["params"], "task": "digits"}
    return sensitivity.scan(ArtifactStore(home), model, spec, "scan-test", lambda f, m: None)["scan"]


def test_pruning_nothing_costs_nothing_and_heavy_pruning_ranks_the_layers(prepared_home):
    untouched = _scan(prepared_home, "prune.magnitude", {"amount": 0.0})
    assert {row["layer"] for row in untouched["layers"]} == DIGITS_LAYERS
    assert all(row["fidelity"] == 1.0 and row["output_error"] < 1e-6 for row in untouched["layers"])

    heavy = _scan(prepared_home, "prune.magnitude", {"amount": 0.95})
    drops = [(row["drop"], row["output_error"]) for row in heavy["layers"]]
    assert drops == sorted(drops, reverse=True)  # most sensitive first
    assert heavy["layers"][0]["drop"] > 0.05
    # measured on the fitting split, never on the scored test images
    assert heavy["summary"]["samples"] == sensitivity.MAX_SAMPLES
    assert "training images" in heavy["summary"]["data"] and not heavy["summary"]["overlaps_scoring"]
    assert not (prepared_home / "artifacts" / "scans" / "scan-test" / "tmp").exists()


def test_a_quantization_scan_lists_the_weighted_graph_nodes(prepared_home):
    scan = _scan(prepared_home, "quantize.dynamic", {"operators": ["MatMul", "Conv"]})
    names = [row["layer"] for row in scan["layers"]]
    assert len(names) == 4 and any("Conv" in n for n in names) and any("Gemm" in n for n in names)
    assert all(0.9 <= row["fidelity"] <= 1.0 for row in scan["layers"])  # one int8 layer barely moves a CNN


def test_a_4_bit_scan_stores_one_linear_layer_at_a_time(prepared_home):
    scan = _scan(prepared_home, "quantize.int4_weights", {"block_size": 16})
    assert sorted(row["layer"] for row in scan["layers"]) == ["/classifier/classifier.1/Gemm",
                                                               "/classifier/classifier.3/Gemm"]
    assert all(0.9 <= row["fidelity"] <= 1.0 and row["output_error"] > 0 for row in scan["layers"])


def test_a_static_scan_quantizes_one_layer_at_a_time(prepared_home):
    scan = _scan(prepared_home, "quantize.static", {"calibration_samples": 64})
    assert len(scan["layers"]) == 4  # two convolutions and two linear layers
    assert all(0.8 <= row["fidelity"] <= 1.0 and row["output_error"] > 0 for row in scan["layers"])


def test_fit_sets_never_contain_what_is_scored():
    from services.engine.tasks import pydoc_retrieval

    scored = set(tasks.eval_set("pydoc-retrieval", "minilm-l6").extra["texts"])
    fitting = set(pydoc_retrieval.fit_paragraphs())
    assert fitting and not scored & fitting
    digits_fit, digits_test = tasks.fit_set("digits", {"id": "digits-cnn"}, None), tasks.eval_set("digits", "digits-cnn")
    assert len(digits_fit) == 1257 and len(digits_test) == 540


def test_skip_sensitive_needs_a_scan_then_takes_its_most_sensitive_layers(prepared_home, workers):
    db = api.connect(prepared_home)
    recipe = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.9, "skip_sensitive": 2}}]}
    with pytest.raises(UserError, match="needs a sensitivity scan of prune.magnitude") as refused:
        api.check_recipe(db, "digits-cnn", recipe)
    assert refused.value.field == "steps.0.skip_sensitive"

    workers.start(prepared_home)
    done = run_cli("sensitivity", "run", "--model", "digits-cnn", "--method", "prune.magnitude",
                   "--params", '{"amount": 0.9}', "--wait", "--json", home=prepared_home)
    assert done.returncode == 0, done.stderr
    scan = json.loads(done.stdout)
    assert scan["method"] == "prune.magnitude" and scan["params"]["amount"] == 0.9
    most_sensitive = [row["layer"] for row in scan["layers"][:2]]

    clean = api.check_recipe(db, "digits-cnn", recipe)
    assert clean["steps"][0]["params"]["skip_layers"] == most_sensitive
    with pytest.raises(UserError, match="found only 4 layers"):
        api.check_recipe(db, "digits-cnn", {"steps": [{"method": "prune.magnitude",
                                                       "params": {"skip_sensitive": 9}}]})
    # the layers left alone stay dense in the compressed model
    submitted = run_cli_json("compress", "--model", "digits-cnn", "--recipe", json.dumps(recipe), "--wait", "--json",
                             home=prepared_home, timeout=240)
    assert "left 2 layer(s) alone" in " ".join(submitted["metrics"]["notes"])


def test_bad_scan_requests_get_a_sentence(prepared_home):
    db = api.connect(prepared_home)
    with pytest.raises(UserError, match="Unknown method 'prune.nothing'"):
        api.submit_sensitivity(db, "digits-cnn", "prune.nothing")
    with pytest.raises(UserError, match="'amount' must be between 0 and 0.99"):
        api.submit_sensitivity(db, "digits-cnn", "prune.magnitude", {"amount": 2})
    done = run_cli("sensitivity", "run", "--model", "digits-cnn", "--method", "prune.magnitude", "--params", "[1]",
                   home=prepared_home)
    assert done.returncode == 2 and "must be a JSON object" in done.stderr
    shown = run_cli("sensitivity", "show", "--model", "digits-cnn", "--method", "quantize.dynamic", home=prepared_home)
    assert shown.returncode == 2 and "No sensitivity scan of quantize.dynamic" in shown.stderr
