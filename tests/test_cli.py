"""The CLI end to end: `python -m services ...` as a user runs it (DESIGN.md, "CLI" and "Run record").

The two compress runs are made once for this module (`cli_runs`, in its own data folder copied
from the session's prepared digits-cnn); the tests that read them only query. Every test that
writes gets a fresh data folder.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from types import SimpleNamespace

import pytest

from conftest import PRUNE_80, QUANTIZE, run_cli, run_cli_json

pytestmark = pytest.mark.slow

METRIC_KEYS = {"size_bytes", "zipped_bytes", "params", "nonzero_params", "latency_ms", "batch_latency_ms",
               "throughput_per_s", "score", "score_name", "fidelity"}
RECORD_KEYS = {"id", "status", "model_id", "recipe", "metrics", "baseline", "runner", "artifact", "share_path"}


def _job_rows(home) -> int:
    path = home / "explorer.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def cli_runs(_prepared_template, tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-runs") / "home"
    shutil.copytree(_prepared_template, home)
    quantized = run_cli_json("compress", "--model", "digits-cnn", "--recipe", json.dumps(QUANTIZE),
                             "--wait", "--json", home=home)
    pruned = run_cli_json("compress", "--model", "digits-cnn", "--recipe", json.dumps(PRUNE_80),
                          "--wait", "--json", home=home)
    return SimpleNamespace(home=home, quantized=quantized, pruned=pruned)


# ---- listing --------------------------------------------------------------------------------

def test_models_list_on_a_fresh_home(home):
    models = run_cli_json("models", "list", "--json", home=home)
    by_id = {m["id"]: m for m in models}
    assert {"digits-cnn", "digits-cnn-x2", "digits-cnn-x4"} <= set(by_id)
    cnn = by_id["digits-cnn"]
    assert cnn["status"] == "new" and cnn["card"] is None
    assert cnn["format"] == "torch" and cnn["task"] == "digits"
    assert cnn["tasks"] == ["digits", "fidelity"]
    assert (home / "explorer.db").is_file()  # the CLI made its database in EXPLORER_HOME
    assert _job_rows(home) == 0


def test_models_list_shows_a_prepared_model_with_its_card(cli_runs):
    models = run_cli_json("models", "list", "--json", home=cli_runs.home)
    cnn = next(m for m in models if m["id"] == "digits-cnn")
    assert cnn["status"] == "ready"
    assert cnn["card"]["params"] == 21546  # 2 convolutions + 2 linear layers of the width-1 CNN
    assert cnn["card"]["score"] > 0.9 and cnn["card"]["score_name"] == "accuracy"
    assert (cli_runs.home / cnn["artifact"]).stat().st_size == cnn["card"]["size_bytes"]


def test_methods_list_gives_the_registry_with_parameter_schemas(home):
    methods = {m["name"]: m for m in run_cli_json("methods", "list", "--json", home=home)}
    assert {"prune.magnitude", "quantize.dynamic"} <= set(methods)
    prune = methods["prune.magnitude"]
    assert prune["stage"] == "torch" and prune["applies_to"] == ["torch"]
    params = {p["name"]: p for p in prune["params"]}
    assert params["amount"]["type"] == "float"
    assert params["amount"]["minimum"] == 0.0 and params["amount"]["maximum"] == 0.99
    assert params["amount"]["minimum"] <= params["amount"]["default"] <= params["amount"]["maximum"]
    assert params["scope"]["choices"] == ["global", "per_layer"]
    quantize = methods["quantize.dynamic"]
    assert quantize["stage"] == "onnx" and set(quantize["applies_to"]) == {"torch", "onnx"}
    qparams = {p["name"]: p for p in quantize["params"]}
    assert qparams["per_channel"]["type"] == "bool"
    assert qparams["weight_type"]["choices"] == ["int8", "uint8"]
    assert set(qparams["operators"]["default"]) <= set(qparams["operators"]["choices"])
    for method in methods.values():
        assert method["title"] and method["explanation"]
        for param in method["params"]:
            assert {"name", "type", "default", "help"} <= set(param)


# ---- compress and the run record ------------------------------------------------------------

def _check_metrics(metrics: dict) -> None:
    assert METRIC_KEYS <= set(metrics)
    assert metrics["size_bytes"] > 0 and 0 < metrics["zipped_bytes"]
    assert 0 < metrics["nonzero_params"] <= metrics["params"]
    assert 0.0 <= metrics["score"] <= 1.0 and metrics["score_name"] == "accuracy"
    assert 0.0 <= metrics["fidelity"] <= 1.0
    assert metrics["latency_ms"]["batch"] == 1
    assert 0 < metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p95"]
    assert metrics["batch_latency_ms"]["batch"] == 256
    assert 0 < metrics["batch_latency_ms"]["p50"] <= metrics["batch_latency_ms"]["p95"]
    assert metrics["throughput_per_s"] > 0


def test_compress_wait_returns_the_run_record_of_the_design(cli_runs):
    for record in (cli_runs.quantized, cli_runs.pruned):
        assert RECORD_KEYS <= set(record)
        assert record["status"] == "succeeded"
        assert record["model_id"] == "digits-cnn"
        assert len(record["id"]) == 32 and int(record["id"], 16) >= 0  # a 128-bit share id
        assert record["share_path"] == f"/result?id={record['id']}"
        assert record["runner"]["executor"] == "local" and record["runner"]["node"]
        _check_metrics(record["metrics"])
        _check_metrics(record["baseline"])
        assert record["baseline"]["fidelity"] == 1.0  # the original agrees with itself
        artifact = cli_runs.home / record["artifact"]
        assert artifact.suffix == ".onnx" and artifact.stat().st_size == record["metrics"]["size_bytes"]
        assert record["recipe"]["task"] == "digits"
        assert record["recipe"]["recovery"] == {"objective": "none"}
    assert cli_runs.quantized["id"] != cli_runs.pruned["id"]
    assert cli_runs.quantized["baseline"]["size_bytes"] == cli_runs.pruned["baseline"]["size_bytes"]


def test_quantize_dynamic_makes_the_file_much_smaller(cli_runs):
    record = cli_runs.quantized
    metrics, baseline = record["metrics"], record["baseline"]
    assert metrics["size_bytes"] < baseline["size_bytes"] / 2
    assert metrics["params"] == baseline["params"]  # the same weights, stored as int8
    assert metrics["score"] > 0.85
    # the defaults were filled into the stored recipe
    assert record["recipe"]["steps"] == [{"method": "quantize.dynamic", "params": {
        "per_channel": True, "reduce_range": False, "weight_type": "int8",
        "operators": ["MatMul", "Gather"], "keep_float_nodes": [], "kept_nodes_as": "float",
        "skip_sensitive": 0}}]


def test_magnitude_pruning_shrinks_the_zipped_file_and_zeroes_weights(cli_runs):
    metrics, baseline = cli_runs.pruned["metrics"], cli_runs.pruned["baseline"]
    assert metrics["zipped_bytes"] < 0.6 * baseline["zipped_bytes"]
    assert abs(metrics["size_bytes"] - baseline["size_bytes"]) < 0.02 * baseline["size_bytes"]  # dense file
    assert metrics["params"] == baseline["params"] == baseline["nonzero_params"]
    assert 0.18 <= metrics["nonzero_params"] / metrics["params"] <= 0.22
    assert cli_runs.pruned["recipe"]["steps"] == [
        {"method": "prune.magnitude", "params": {"amount": 0.8, "scope": "global", "skip_layers": [], "skip_sensitive": 0}}]


def test_compress_without_wait_queues_a_job(home, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("steps:\n  - method: quantize.dynamic\n    params:\n      per_channel: false\n")
    submitted = run_cli_json("compress", "--model", "digits-cnn", "--recipe", str(recipe_file), "--json",
                             home=home)
    assert submitted["status"] == "queued"
    assert submitted["share_path"] == f"/result?id={submitted['run_id']}"
    assert submitted["recipe"]["steps"][0]["params"]["per_channel"] is False
    assert _job_rows(home) == 1

    job = run_cli_json("jobs", "show", submitted["job_id"], "--json", home=home)
    assert job["status"] == "queued" and job["kind"] == "compress" and job["attempts"] == 0
    assert job["payload"]["run_id"] == submitted["run_id"]
    run = run_cli_json("runs", "show", submitted["run_id"], "--json", home=home)
    assert run["status"] == "queued" and run["metrics"] is None

    cancelled = run_cli_json("jobs", "cancel", submitted["job_id"], "--json", home=home)
    assert cancelled["status"] == "cancelled"
    assert run_cli_json("jobs", "list", "--status", "cancelled", "--json", home=home)[0]["id"] == job["id"]
    assert run_cli_json("runs", "list", "--json", home=home) == []


# ---- jobs, runs, reports --------------------------------------------------------------------

def test_jobs_list_and_show(cli_runs):
    jobs = run_cli_json("jobs", "list", "--json", home=cli_runs.home)
    kinds = [job["kind"] for job in jobs]
    assert kinds == ["compress", "compress", "prepare"]  # newest first
    assert all(job["status"] == "succeeded" and job["progress"] == 1.0 for job in jobs)
    assert jobs[0]["run_id"] == cli_runs.pruned["id"] and jobs[1]["run_id"] == cli_runs.quantized["id"]
    assert [j["id"] for j in run_cli_json("jobs", "list", "--limit", "1", "--json", home=cli_runs.home)] == \
        [jobs[0]["id"]]
    assert [j["id"] for j in run_cli_json("jobs", "list", "--limit", "1", "--offset", "2", "--json",
                                          home=cli_runs.home)] == [jobs[2]["id"]]
    assert run_cli_json("jobs", "list", "--status", "failed", "--json", home=cli_runs.home) == []

    shown = run_cli_json("jobs", "show", cli_runs.quantized["job_id"], "--json", home=cli_runs.home)
    assert shown["id"] == cli_runs.quantized["job_id"]
    assert shown["status"] == "succeeded" and shown["attempts"] == 1 and shown["error"] is None
    assert shown["payload"]["recipe"] == cli_runs.quantized["recipe"]
    assert shown["runner"]["executor"] == "local"


def test_runs_list_and_show(cli_runs):
    runs = run_cli_json("runs", "list", "--model", "digits-cnn", "--json", home=cli_runs.home)
    assert [r["id"] for r in runs] == [cli_runs.pruned["id"], cli_runs.quantized["id"]]
    assert run_cli_json("runs", "list", "--model", "digits-cnn-x2", "--json", home=cli_runs.home) == []
    assert len(run_cli_json("runs", "list", "--limit", "1", "--json", home=cli_runs.home)) == 1
    shown = run_cli_json("runs", "show", cli_runs.quantized["id"], "--json", home=cli_runs.home)
    assert shown["metrics"] == cli_runs.quantized["metrics"]
    assert shown["baseline"] == cli_runs.quantized["baseline"]
    assert shown["artifact"] == cli_runs.quantized["artifact"]
    assert RECORD_KEYS <= set(shown)


def test_report_in_every_format(cli_runs):
    record = cli_runs.quantized
    as_json = run_cli("report", record["id"], "--format", "json", home=cli_runs.home)
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["metrics"] == record["metrics"]

    as_csv = run_cli("report", record["id"], "--format", "csv", home=cli_runs.home)
    assert as_csv.returncode == 0
    rows = list(csv.reader(io.StringIO(as_csv.stdout.strip())))
    assert rows[0] == ["metric", "run", "baseline"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert table["size_bytes"] == [str(record["metrics"]["size_bytes"]), str(record["baseline"]["size_bytes"])]
    assert float(table["score"][0]) == pytest.approx(record["metrics"]["score"])
    assert float(table["latency_ms.p50"][0]) == pytest.approx(record["metrics"]["latency_ms"]["p50"])
    assert {"zipped_bytes", "params", "nonzero_params", "batch_latency_ms.p95", "throughput_per_s"} <= set(table)

    as_html = run_cli("report", record["id"], "--format", "html", home=cli_runs.home)
    assert as_html.returncode == 0
    page = as_html.stdout
    assert page.startswith("<!doctype html>") and "</html>" in page
    assert record["id"] in page and "<table>" in page
    assert "x smaller" in page and "accuracy" in page
    assert f"<td>{record['metrics']['size_bytes']}</td>" in page


# ---- user errors: exit 2, one line on stderr, nothing written -------------------------------

def _steps(*steps) -> str:
    return json.dumps({"steps": list(steps)})


BAD_COMPRESS = [
    pytest.param(["--model", "no-such-model", "--recipe", _steps({"method": "quantize.dynamic"})],
                 "Unknown model 'no-such-model'", id="unknown-model"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": "prune.nothing"})],
                 "Unknown method 'prune.nothing'", id="unknown-method"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": "prune.magnitude",
                                                                 "params": {"amount": 1.5}})],
                 "'amount' must be between 0 and 0.99; got 1.5", id="amount-out-of-range"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": "prune.magnitude",
                                                                 "params": {"ratio": 0.5}})],
                 "has no parameter 'ratio'", id="unknown-parameter"),
    pytest.param(["--model", "digits-cnn", "--recipe", '{"steps": [{"method": "quantize.dynamic"'],
                 "not valid JSON", id="malformed-json"),
    pytest.param(["--model", "digits-cnn", "--recipe", "{missing}/recipe.json"],
                 "Recipe file not found", id="missing-recipe-file"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": "quantize.dynamic"},
                                                                {"method": "prune.magnitude"})],
                 "Step 2 (prune.magnitude)", id="torch-step-after-onnx-step"),
    pytest.param(["--model", "digits-cnn", "--recipe", '{"steps": []}'], "no steps", id="no-steps"),
    pytest.param(["--model", "digits-cnn"], "--recipe", id="recipe-argument-missing"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": ["prune.magnitude"]})],
                 "method", id="method-not-a-string"),
    pytest.param(["--model", "digits-cnn", "--recipe", _steps({"method": "prune.magnitude",
                                                                 "params": {"amount": float("nan")}})],
                 "amount", id="amount-nan"),
    pytest.param(["--model", "digits-cnn", "--recipe", "{binary}"], "recipe", id="recipe-file-not-text"),
]


@pytest.mark.parametrize("args, problem", BAD_COMPRESS)
def test_bad_compress_input_is_refused_with_one_line(home, tmp_path, args, problem):
    binary = tmp_path / "recipe.json"
    binary.write_bytes(bytes([0xff, 0xfe, 0x00, 0x81]) * 64)
    args = [a.replace("{missing}", str(tmp_path / "nowhere")).replace("{binary}", str(binary)) for a in args]
    done = run_cli("compress", *args, "--json", home=home)
    assert "Traceback" not in done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert problem in lines[0]
    assert done.stdout == ""
    assert _job_rows(home) == 0  # nothing was queued


@pytest.mark.parametrize("args, problem", [
    (["jobs", "show", "feedface", "--json"], "Unknown job 'feedface'"),
    (["jobs", "cancel", "feedface", "--json"], "Unknown job 'feedface'"),
    (["jobs", "list", "--status", "sleeping", "--json"], "Unknown status 'sleeping'"),
    (["runs", "show", "feedface", "--json"], "Unknown run 'feedface'"),
    (["runs", "list", "--model", "no-such-model", "--json"], "Unknown model 'no-such-model'"),
    (["report", "feedface", "--format", "csv"], "Unknown run 'feedface'"),
    (["report", "feedface", "--format", "pdf"], "invalid choice: 'pdf'"),
    (["models", "prepare", "no-such-model", "--json"], "Unknown model 'no-such-model'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
], ids=lambda value: "-".join(value) if isinstance(value, list) else None)
def test_other_user_errors_exit_2_with_one_line(home, args, problem):
    done = run_cli(*args, home=home)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert _job_rows(home) == 0


def test_compress_wait_on_a_job_that_fails_for_a_user_reason_exits_2_with_one_line(prepared_home):
    weights = prepared_home / "artifacts" / "models" / "digits-cnn" / "weights.pt"
    weights.write_bytes(b"not a state dict" * 100)
    done = run_cli("compress", "--model", "digits-cnn", "--recipe", json.dumps(PRUNE_80), "--wait", "--json",
                   home=prepared_home)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed" in lines[0] and "prepare it again" in lines[0]
    assert done.stdout == ""  # no run record for a run that does not exist


@pytest.mark.parametrize("args", [["jobs", "list", "--limit", "0"], ["runs", "list", "--offset", "-5"]])
def test_paging_flags_out_of_range_are_refused(home, args):
    done = run_cli(*args, "--json", home=home)
    assert done.returncode == 2 and "--limit must be at least 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_runs_show_in_text_says_what_the_run_did(cli_runs):
    done = run_cli("runs", "show", cli_runs.quantized["id"], home=cli_runs.home)
    assert done.returncode == 0
    assert "smaller" in done.stdout and "accuracy" in done.stdout
