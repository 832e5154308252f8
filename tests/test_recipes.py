"""services/recipes.py and services/recovery_recipe.py: parsing (JSON, YAML, files), defaults, and errors
that point at their field.

Also: the modules the web process imports never pull in torch or onnxruntime.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from services import api
from services.engine.methods import REGISTRY
from services.errors import UserError
from services.recipes import load_recipe_text, validate_recipe
from services.recovery_recipe import RECOVERY_OBJECTIVES

TORCH_MODEL = {"id": "digits-cnn", "format": "torch", "task": "digits"}
ONNX_MODEL = {"id": "uploaded", "format": "onnx", "task": "fidelity"}
TASKS = ["digits", "fidelity"]

QUANTIZE_DEFAULTS = {"per_channel": True, "reduce_range": False, "weight_type": "int8",
                     "operators": ["MatMul", "Gather"], "keep_float_nodes": [], "kept_nodes_as": "float",
                     "skip_sensitive": 0}


def _validate(recipe, model=TORCH_MODEL, tasks=TASKS):
    return validate_recipe(recipe, model, tasks)


def _error(recipe, model=TORCH_MODEL, tasks=TASKS) -> UserError:
    with pytest.raises(UserError) as caught:
        _validate(recipe, model, tasks)
    return caught.value


# ---- defaults -------------------------------------------------------------------------------

def test_defaults_are_filled_in():
    clean = _validate({"steps": [{"method": "prune.magnitude"}, {"method": "quantize.dynamic", "params": {}}]})
    assert clean == {
        "task": "digits",  # the model's own task
        "steps": [{"method": "prune.magnitude", "params": {"amount": 0.5, "scope": "global", "skip_layers": [], "skip_sensitive": 0}},
                  {"method": "quantize.dynamic", "params": QUANTIZE_DEFAULTS}],
        "recovery": {"objective": "none"},
    }


def test_given_values_are_kept_and_normalised():
    clean = _validate({"task": "fidelity", "name": "n" * 300, "recovery": {"objective": "none"},
                       "steps": [{"method": "prune.magnitude", "params": {"amount": 0, "scope": "per_layer"}},
                                 {"method": "quantize.dynamic",
                                  "params": {"operators": "Conv, MatMul", "keep_float_nodes": "/Gemm_1",
                                             "weight_type": "uint8", "per_channel": False}}]})
    assert clean["task"] == "fidelity"
    assert clean["name"] == "n" * 100
    prune, quantize = (step["params"] for step in clean["steps"])
    assert prune == {"amount": 0.0, "scope": "per_layer", "skip_layers": [], "skip_sensitive": 0}
    assert isinstance(prune["amount"], float)  # an int given for a float parameter is stored as a float
    assert quantize["operators"] == ["Conv", "MatMul"]  # a comma list becomes a list
    assert quantize["keep_float_nodes"] == ["/Gemm_1"]
    assert quantize["weight_type"] == "uint8" and quantize["per_channel"] is False


BUILTIN_BY_ARCHITECTURE = {"cnn": TORCH_MODEL,
                           "text-transformer": {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"},
                           "speech-transformer": {"id": "speech-ssl", "format": "torch", "task": "spoken-digits"}}


def test_every_registered_method_validates_with_its_own_defaults():
    for name, method in REGISTRY.items():
        if "torch" not in method.applies_to:
            model = ONNX_MODEL
        else:
            model = BUILTIN_BY_ARCHITECTURE[(method.architectures or ("cnn",))[0]]
        clean = _validate({"steps": [{"method": name}]}, {**model, "task": "fidelity"})
        assert clean["steps"][0]["params"] == {p.name: p.default for p in method.params}


# ---- parsing --------------------------------------------------------------------------------

def test_inline_json_is_parsed():
    assert load_recipe_text('{"steps": [{"method": "quantize.dynamic"}]}') == \
        {"steps": [{"method": "quantize.dynamic"}]}


def test_yaml_text_is_accepted():
    text = """
task: digits
steps:
  - method: prune.magnitude
    params: {amount: 0.7, scope: per_layer}
  - method: quantize.dynamic
    params:
      per_channel: false
recovery:
  objective: none
"""
    recipe = load_recipe_text(text)
    clean = _validate(recipe)
    assert clean["steps"][0] == {"method": "prune.magnitude", "params": {"amount": 0.7, "scope": "per_layer",
                                                                         "skip_layers": [], "skip_sensitive": 0}}
    assert clean["steps"][1]["params"]["per_channel"] is False


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_recipe_files_are_read(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    recipe = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.25}}]}
    path.write_text(json.dumps(recipe) if suffix == ".json" else
                    "steps:\n  - method: prune.magnitude\n    params:\n      amount: 0.25\n")
    assert load_recipe_text(str(path)) == recipe


def test_a_missing_recipe_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "recipe.yaml"
    with pytest.raises(UserError, match="Recipe file not found") as caught:
        load_recipe_text(str(missing))
    assert str(missing) in str(caught.value)
    assert caught.value.field == "recipe"


@pytest.mark.parametrize("text", ['{"steps": [', "steps: [unclosed", "[1, 2]", "just words", "42"])
def test_text_that_is_not_a_recipe_is_refused(text):
    with pytest.raises(UserError) as caught:
        load_recipe_text(text)
    assert caught.value.field == "recipe"
    assert "\n" not in str(caught.value)


def test_malformed_json_says_where():
    with pytest.raises(UserError, match=r"not valid JSON: .* at line 2, column \d+\.$"):
        load_recipe_text('{"steps":\n [{"method": "quantize.dynamic"}}')


def test_json_with_a_trailing_comma_is_read_as_yaml():
    # YAML is a superset of JSON that allows a trailing comma: such a recipe is accepted.
    assert load_recipe_text('{"steps": [{"method": "quantize.dynamic",}]}') == \
        {"steps": [{"method": "quantize.dynamic"}]}


def test_check_recipe_takes_text_and_knows_the_model(db):
    clean = api.check_recipe(db, "digits-cnn", '{"steps": [{"method": "quantize.dynamic"}]}')
    assert clean["task"] == "digits" and clean["steps"][0]["params"] == QUANTIZE_DEFAULTS
    with pytest.raises(UserError) as caught:
        api.check_recipe(db, "nope", {"steps": [{"method": "quantize.dynamic"}]})
    assert caught.value.field == "model"
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


# ---- errors point at their field ------------------------------------------------------------

def _prune(**params):
    return {"method": "prune.magnitude", "params": params}


@pytest.mark.parametrize("recipe, field, words", [
    ({"steps": [{"method": "quantize.dynamic"}, {"method": "prune.magnitude"}]}, "steps.1.method",
     "before quantize.dynamic"),
    ({"steps": [{"method": "quantize.dynamic"}, {"method": "nope"}]}, "steps.1.method", "Unknown method 'nope'"),
    ({"steps": [_prune(amount=0.1), _prune(amount=1.5)]}, "steps.1.amount", "between 0 and 0.99; got 1.5"),
    ({"steps": [_prune(amount=-0.1)]}, "steps.0.amount", "between 0 and 0.99"),
    ({"steps": [_prune(amount="half")]}, "steps.0.amount", "must be a number"),
    ({"steps": [_prune(amount=True)]}, "steps.0.amount", "must be a number"),
    ({"steps": [_prune(scope="everywhere")]}, "steps.0.scope", "one of global, per_layer"),
    ({"steps": [_prune(), _prune(ratio=0.5)]}, "steps.1.ratio", "no parameter 'ratio'; its parameters are amount"),
    ({"steps": [{"method": "quantize.dynamic", "params": {"per_channel": "yes"}}]}, "steps.0.per_channel",
     "true or false"),
    ({"steps": [{"method": "quantize.dynamic", "params": {"operators": ["Conv", "LSTM"]}}]},
     "steps.0.operators", "unknown choice 'LSTM'"),
    ({"steps": [{"method": "quantize.dynamic", "params": {"operators": []}}]}, "steps.0.operators",
     "at least one"),
    ({"steps": [{"method": "quantize.dynamic", "params": {"keep_float_nodes": [1, 2]}}]},
     "steps.0.keep_float_nodes", "list of names"),
    ({"steps": [{"method": "quantize.dynamic", "params": ["per_channel"]}]}, "steps.0", "'params' must be"),
    ({"steps": ["quantize.dynamic"]}, "steps.0", "must be an object with a 'method'"),
    ({"steps": []}, "steps", "no steps"),
    ({}, "steps", "no steps"),
    ({"steps": [{"method": "quantize.dynamic"}], "stpes": []}, "recipe", "Unknown recipe key 'stpes'"),
    ({"task": "speaker-id", "steps": [{"method": "quantize.dynamic"}]}, "task", "cannot be scored on task"),
    ({"steps": [{"method": "quantize.dynamic"}], "recovery": {"objective": "dream"}}, "recovery.objective",
     "Unknown recovery objective"),
    ({"steps": [{"method": "quantize.dynamic"}], "recovery": "distill"}, "recovery", "must be an object"),
    ({"steps": [{"method": "quantize.dynamic"}], "gpus": 1}, "gpus", "nothing in it trains"),
    ({"steps": [{"method": "distill.student"}], "gpus": 1.5}, "gpus", "must be a whole number"),
    ({"steps": [{"method": "distill.student"}], "gpus": "yes"}, "gpus", "a number from 0 to 8"),
    ({"steps": [{"method": "distill.student"}], "gpus": True}, "gpus", "a number from 0 to 8"),
    ({"steps": [{"method": "distill.student"}], "gpus": 9}, "gpus", "a number from 0 to 8"),
])
def test_errors_name_the_field_at_fault(recipe, field, words):
    error = _error(recipe)
    assert error.field == field
    assert words in str(error)


def test_a_recipe_that_trains_may_ask_for_a_gpu_or_a_share_of_one():
    assert _validate({"steps": [{"method": "distill.student"}], "gpus": 1})["gpus"] == 1
    shared = {"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill"}, "gpus": 0.5}
    assert _validate(shared)["gpus"] == 0.5
    assert "gpus" not in _validate({"steps": [{"method": "distill.student"}], "gpus": 0})


def test_a_torch_method_on_an_onnx_model_is_refused():
    error = _error({"steps": [{"method": "prune.magnitude"}]}, model=ONNX_MODEL, tasks=["fidelity"])
    assert error.field == "steps.0.method"
    assert "needs a PyTorch model" in str(error)
    assert _validate({"steps": [{"method": "quantize.dynamic"}]}, ONNX_MODEL, ["fidelity"])["task"] == "fidelity"


def test_momentum_contrast_helpers_and_a_label_budget_are_accepted_with_defaults():
    assert "momentum-contrast" in RECOVERY_OBJECTIVES
    clean = _validate({"steps": [{"method": "prune.magnitude"}],
                       "recovery": {"objective": "momentum-contrast", "aux": ["spatial-context", "object-extent"]}})
    assert clean["recovery"]["objective"] == "momentum-contrast"
    assert clean["recovery"]["aux"] == ["spatial-context", "object-extent"]
    clean = _validate({"steps": [{"method": "prune.magnitude"}],
                       "recovery": {"objective": "supervised", "label_budget": 0.1}})
    assert clean["recovery"]["label_budget"] == 0.1 and clean["recovery"]["selection"] == "random"
    clean = _validate({"steps": [{"method": "prune.magnitude"}],
                       "recovery": {"objective": "supervised", "label_budget": 50, "selection": "uncertainty"}})
    assert (clean["recovery"]["label_budget"], clean["recovery"]["selection"]) == (50, "uncertainty")


def test_recovery_defaults_are_filled_in():
    clean = _validate({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill"}})
    assert clean["recovery"] == {"objective": "distill", "steps": 200, "unfreeze": "all", "rounds": 1, "lr": 0.0,
                                 "batch_size": 32, "seed": 0}


MINILM = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
HF_WITH_LABELS = {"id": "up-1", "format": "torch", "source": "upload", "task": "your-data",
                  "card": {"output_kind": "logits"}}


@pytest.mark.parametrize("recipe, model, field, words", [
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised"}}, MINILM,
     "recovery.objective", "needs class labels"),
    ({"steps": [{"method": "quantize.dynamic"}], "recovery": {"objective": "distill"}}, TORCH_MODEL,
     "recovery.objective", "nothing to recover yet"),
    ({"steps": [{"method": "quantize.dynamic"}], "recovery": {"objective": "distill"}}, ONNX_MODEL,
     "recovery.objective", "an ONNX upload has no training graph"),
    ({"steps": [{"method": "vocab.trim"}], "recovery": {"objective": "masked"}}, MINILM,
     "recovery.objective", "cannot follow vocab.trim"),
    ({"steps": [{"method": "lowrank.svd"}], "recovery": {"objective": "distill", "rounds": 3}}, TORCH_MODEL,
     "recovery.rounds", "has no prune.magnitude step"),
    ({"steps": [{"method": "prune.structured"}], "recovery": {"objective": "distill", "rounds": 2}}, TORCH_MODEL,
     "recovery.rounds", "Use rounds 1 with prune.structured"),
    ({"steps": [{"method": "share.cluster"}], "recovery": {"objective": "distill"}}, TORCH_MODEL,
     "recovery.objective", "cannot follow share.cluster"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "unfreeze": "some"}},
     TORCH_MODEL, "recovery.unfreeze", "Recovery: 'unfreeze' must be one of all, frozen, gradual"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "steps": 0}},
     TORCH_MODEL, "recovery.steps", "Recovery: 'steps' must be between 1 and 20000"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "label_budget": 10}},
     TORCH_MODEL, "recovery.label_budget", "Set the objective to supervised"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised", "label_budget": 5000}},
     TORCH_MODEL, "recovery.label_budget", "asks for 5000 samples, but the data has only 1257"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised", "label_budget": 2.5}},
     TORCH_MODEL, "recovery.label_budget", "A label budget above 1 is a count of samples and must be whole"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised", "label_budget": 0.1,
                                                          "selection": "loudest"}},
     TORCH_MODEL, "recovery.selection", "Unknown selection 'loudest'"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised", "selection": "random"}},
     TORCH_MODEL, "recovery.selection", "needs a 'label_budget'"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised", "label_budget": 0.2,
                                                          "selection": "inconsistency"}},
     MINILM, "recovery.objective", "needs class labels on the fitting samples, and this model's data has none"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "aux": ["frame-order"]}},
     TORCH_MODEL, "recovery.aux", "'frame-order' works on speech-transformer models, not on this one; this one "
                                  "can use spatial-context, object-extent"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "aux": ["jigsaw"]}},
     TORCH_MODEL, "recovery.aux", "unknown helper 'jigsaw'"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "aux": ["spatial-context"]}},
     MINILM, "recovery.aux", "this model has no helper yet"),
    ({"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "distill", "aux": {"a": 1}}},
     TORCH_MODEL, "recovery.aux", "must be a list of helper names"),
], ids=["supervised-without-labels", "nothing-to-recover", "onnx-upload", "after-vocab-trim",
        "rounds-without-pruning", "rounds-with-structured", "after-share-cluster", "bad-unfreeze", "zero-steps",
        "budget-without-supervised", "budget-over-the-data", "budget-not-a-share", "unknown-selection",
        "selection-without-budget", "budget-on-unlabelled-text", "helper-for-another-kind", "unknown-helper",
        "no-helper-for-text", "helpers-not-a-list"])
def test_recovery_that_cannot_work_is_refused_at_submit(recipe, model, field, words):
    error = _error(recipe, model, [model["task"], "fidelity"])
    assert error.field == field and words in str(error), str(error)


def test_supervised_recovery_is_offered_for_labelled_uploads():
    recipe = {"steps": [{"method": "prune.magnitude"}], "recovery": {"objective": "supervised"}}
    assert _validate(recipe, HF_WITH_LABELS, ["your-data", "fidelity"])["recovery"]["objective"] == "supervised"
    error = _error({**recipe, "task": "fidelity"}, HF_WITH_LABELS, ["your-data", "fidelity"])
    assert "needs class labels" in str(error)


@pytest.mark.parametrize("method", [["prune.magnitude"], {"name": "prune.magnitude"}], ids=["list", "object"])
def test_a_method_that_is_not_a_name_is_a_user_error(method):
    error = _error({"steps": [{"method": method}]})
    assert error.field == "steps.0.method"


@pytest.mark.parametrize("text", ['{"steps": [{"method": "prune.magnitude", "params": {"amount": NaN}}]}',
                                  "steps:\n  - method: prune.magnitude\n    params: {amount: .nan}\n"],
                         ids=["json", "yaml"])
def test_nan_is_not_a_valid_amount(text):
    error = _error(load_recipe_text(text))
    assert error.field == "steps.0.amount"


def test_a_one_sided_range_is_reported_as_a_user_error():
    from services.engine.registry import Param

    steps = Param("steps", "int", 100, "Training steps.", minimum=1)
    assert steps.clean(50, "Step 1 (recover.finetune): 'steps'", "steps.0.steps") == 50
    with pytest.raises(UserError, match="Step 1 \\(recover.finetune\\): 'steps' must be at least 1; got 0") as caught:
        steps.clean(0, "Step 1 (recover.finetune): 'steps'", "steps.0.steps")
    assert caught.value.field == "steps.0.steps"


def test_a_recipe_file_that_is_not_text_is_a_user_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(bytes([0xff, 0xfe, 0x00, 0x81]) * 64)
    with pytest.raises(UserError) as caught:
        load_recipe_text(str(path))
    assert caught.value.field == "recipe"


# ---- the web process never imports torch ----------------------------------------------------

@pytest.mark.slow
def test_api_recipes_and_registry_import_no_torch_or_onnxruntime(tmp_path):
    code = (
        "import sys\n"
        "import services.api, services.recipes, services.engine.methods, services.catalog, storage\n"
        "from services import api\n"
        "db = api.connect()\n"
        "api.list_methods(); api.list_models(db)\n"
        "api.submit_compress(db, 'digits-cnn', '{\"steps\": [{\"method\": \"prune.magnitude\"}]}')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'onnx'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EXPLORER_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_student_after_a_trimmed_vocabulary_is_accepted():
    minilm = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
    for order in (["vocab.trim", "distill.student"], ["distill.student", "vocab.trim"]):
        clean = _validate({"steps": [{"method": name} for name in order]}, minilm, ["pydoc-retrieval"])
        assert [step["method"] for step in clean["steps"]] == order  # kept in the order given
        assert clean["steps"][order.index("distill.student")]["params"]["train_for"] == "float"


def test_a_student_trained_for_4_bits_needs_the_matching_4_bit_step():
    minilm = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
    student = {"method": "distill.student", "params": {"train_for": "4-bit weights", "block_size": 64}}
    error = _error({"steps": [student]}, minilm, ["pydoc-retrieval"])
    assert error.field == "steps.0.train_for" and "add that step" in str(error)
    error = _error({"steps": [student, {"method": "quantize.int4_weights"}]}, minilm, ["pydoc-retrieval"])
    assert error.field == "steps.0.block_size" and "blocks of 64" in str(error) and "blocks of 32" in str(error)
    error = _error({"steps": [student, {"method": "quantize.int4_weights",
                                        "params": {"block_size": 64, "symmetric": True}}]}, minilm, ["pydoc-retrieval"])
    assert "'symmetric' off" in str(error)
    _validate({"steps": [student, {"method": "quantize.int4_weights", "params": {"block_size": 64}}]}, minilm,
              ["pydoc-retrieval"])


def test_replacing_words_after_a_trimmed_vocabulary_is_refused_at_submit():
    minilm = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval"}
    student = {"method": "distill.student", "params": {"replace_words": 0.3}}
    error = _error({"steps": [{"method": "vocab.trim"}, student]}, minilm, ["pydoc-retrieval"])
    assert error.field == "steps.1.replace_words" and "put vocab.trim after distill.student" in str(error)
    _validate({"steps": [student, {"method": "vocab.trim"}]}, minilm, ["pydoc-retrieval"])
    _validate({"steps": [{"method": "vocab.trim"}, {"method": "distill.student"}]}, minilm, ["pydoc-retrieval"])
