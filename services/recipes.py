"""Recipes: parse, validate against the method registry, and refuse what cannot work.

Validation happens at submit time, so a recipe that cannot run is refused with its reason
instead of being discovered as a crash in the worker.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from services.catalog import architecture_of
from services.engine.methods import REGISTRY
from services.engine.registry import Param
from services.errors import UserError

RECOVERY_OBJECTIVES = ("none", "supervised", "distill", "contrastive", "masked", "momentum-contrast")
RECOVERY_KEYS = {"objective", "steps", "unfreeze", "rounds", "lr", "batch_size", "seed",
                 "aux", "label_budget", "selection"}
# Objectives whose training is built; the others are accepted by the contract but refused for now.
SUPPORTED_OBJECTIVES = RECOVERY_OBJECTIVES
# The recovery settings besides the objective, checked like a method's parameters.
RECOVERY_PARAMS = (
    Param("steps", "int", 200, "Training steps of the recovery (per round with rounds > 1).",
          minimum=1, maximum=20000, step=50),
    Param("unfreeze", "choice", "all", "Which layers recovery trains: all of them, only the head (frozen), or "
          "the head first and then layer after layer from the top down (gradual).",
          choices=("all", "frozen", "gradual")),
    Param("rounds", "int", 1, "Iterative pruning: reach the pruning amount in this many rounds, each followed by "
          "recovery (needs a prune.magnitude step).", minimum=1, maximum=20, step=1),
    Param("lr", "float", 0.0, "Learning rate (AdamW); 0 picks one for the model kind (CNN 1e-3, text transformer "
          "5e-5, speech encoder 3e-4).", minimum=0.0, maximum=0.1),
    Param("batch_size", "int", 32, "Samples per training step.", minimum=2, maximum=512, step=8),
    Param("seed", "int", 0, "Random seed: the same recipe and seed give the same result.", minimum=0,
          maximum=2**31 - 1),
)


MAX_RECIPE_BYTES = 64 * 1024

class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UserError(f"The recipe uses a YAML alias (*{event.anchor}); write the values out instead.",
                            field="recipe")
        return super().compose_node(parent, index)


def parse_recipe_text(text: str) -> dict:
    """A recipe from JSON or YAML text. Never reads files: the web UI calls this with what a user pasted."""
    if len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES:
        raise UserError(f"The recipe is larger than {MAX_RECIPE_BYTES // 1024} KB; a recipe is a few lines.",
                        field="recipe")
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as json_error:
        json_problem = (f"The recipe is not valid JSON: {json_error.msg} at line {json_error.lineno}, "
                        f"column {json_error.colno}.")
        try:
            recipe = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError:
            raise UserError(json_problem, field="recipe") from None
        if not isinstance(recipe, dict):
            raise UserError(json_problem, field="recipe") from None
    except ValueError as error:  # e.g. an integer with thousands of digits
        raise UserError(f"The recipe has a value that is not a usable number ({error}).", field="recipe") from None
    if not isinstance(recipe, dict):
        raise UserError("A recipe must be an object with 'steps' (a list of methods).", field="recipe")
    return recipe


def load_recipe_text(text_or_path: str) -> dict:
    """A recipe from inline JSON/YAML or from a file path (the command line's --recipe)."""
    text = text_or_path
    candidate = Path(text_or_path)
    if not text_or_path.lstrip().startswith(("{", "[")) and len(text_or_path) < 4096:
        try:
            is_file = candidate.is_file()
        except OSError:
            is_file = False
        if is_file:
            if candidate.stat().st_size > MAX_RECIPE_BYTES:
                raise UserError(f"The recipe file {text_or_path} is larger than {MAX_RECIPE_BYTES // 1024} KB.",
                                field="recipe")
            try:
                text = candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise UserError(f"Cannot read the recipe file {text_or_path}: "
                                f"{'it is not UTF-8 text' if isinstance(error, UnicodeDecodeError) else error.strerror}.",
                                field="recipe") from None
        elif "\n" not in text_or_path and text_or_path.endswith((".json", ".yaml", ".yml")):
            raise UserError(f"Recipe file not found: {text_or_path}", field="recipe")
    return parse_recipe_text(text)


def _check_param(method_name: str, index: int, param: Param, value: Any) -> Any:
    where = f"Step {index + 1} ({method_name}): '{param.name}'"
    field = f"steps.{index}.{param.name}"
    if param.kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, not {value!r}.", field=field)
        if isinstance(value, int) and abs(value) > 2 ** 53:
            raise UserError(f"{where} is far out of range; got a number with {len(str(value))} digits.", field=field)
        if param.kind == "int":
            if float(value) != int(value):
                raise UserError(f"{where} must be a whole number, not {value!r}.", field=field)
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number; got {value!r}.", field=field)
        too_low = param.minimum is not None and value < param.minimum
        too_high = param.maximum is not None and value > param.maximum
        if too_low or too_high:
            if param.minimum is not None and param.maximum is not None:
                allowed = f"between {param.minimum:g} and {param.maximum:g}"
            elif param.minimum is not None:
                allowed = f"at least {param.minimum:g}"
            else:
                allowed = f"at most {param.maximum:g}"
            raise UserError(f"{where} must be {allowed}; got {value:g}.", field=field)
        return value
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, not {value!r}.", field=field)
        return value
    if param.kind == "choice":
        if value not in param.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, param.choices))}; got {value!r}.",
                            field=field)
        return value
    if param.kind in ("multichoice", "names"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of names.", field=field)
        if param.kind == "multichoice":
            unknown = [v for v in value if v not in param.choices]
            if unknown:
                raise UserError(f"{where}: unknown choice {unknown[0]!r}; choose from "
                                f"{', '.join(param.choices)}.", field=field)
            if not value:
                raise UserError(f"{where} needs at least one choice.", field=field)
        return value
    raise AssertionError(f"unknown parameter kind {param.kind}")


def validate_recipe(recipe: dict, model: dict, tasks: list[str]) -> dict:
    """Check a recipe against the registry and the model; return it with defaults filled in."""
    unknown_keys = set(recipe) - {"task", "steps", "recovery", "name", "gpus"}
    if unknown_keys:
        raise UserError(f"Unknown recipe key {sorted(unknown_keys)[0]!r}; a recipe has 'task', 'steps', "
                        f"'recovery', and optionally 'name' and 'gpus'.", field="recipe")
    task = recipe.get("task") or model["task"]
    if task not in tasks:
        raise UserError(f"Model {model['id']} cannot be scored on task {task!r}; choose one of "
                        f"{', '.join(tasks)}.", field="task")
    steps = recipe.get("steps", [])
    if not isinstance(steps, list) or not steps:
        raise UserError("The recipe has no steps: add at least one compression method.", field="steps")
    clean_steps = []
    first_onnx_step = None
    quantized_by = None  # (index, name) of the step that wrote integer weights
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or "method" not in step:
            raise UserError(f"Step {index + 1} must be an object with a 'method'.", field=f"steps.{index}")
        unknown_step_keys = sorted(set(step) - {"method", "params"})
        if unknown_step_keys:
            raise UserError(f"Step {index + 1} has an unknown key {unknown_step_keys[0]!r}; a step has 'method' "
                            f"and 'params'.", field=f"steps.{index}")
        name = step["method"]
        if not isinstance(name, str):
            raise UserError(f"Step {index + 1}: 'method' must be a method name such as \"prune.magnitude\".",
                            field=f"steps.{index}.method")
        method = REGISTRY.get(name)
        if method is None:
            raise UserError(f"Unknown method {name!r} in step {index + 1}; known methods: "
                            f"{', '.join(sorted(REGISTRY))}.", field=f"steps.{index}.method")
        why_not = method.why_not(model["format"], architecture_of(model), model["id"])
        if why_not:
            raise UserError(f"{name} does not apply to {model['id']}: it {why_not}", field=f"steps.{index}.method")
        if method.stage == "onnx" and first_onnx_step is None:
            first_onnx_step = (index, name)
        if method.stage == "torch" and first_onnx_step is not None:
            raise UserError(f"Step {index + 1} ({name}) changes the PyTorch model, but step {first_onnx_step[0] + 1} "
                            f"({first_onnx_step[1]}) has already turned it into an ONNX graph; put {name} "
                            f"before {first_onnx_step[1]}.", field=f"steps.{index}.method")
        if quantized_by is not None and (method.quantizes or method.stage == "torch"):
            raise UserError(f"Step {index + 1} ({name}) needs float weights, but step {quantized_by[0] + 1} "
                            f"({quantized_by[1]}) has already turned them into integers; put {name} before {quantized_by[1]}, "
                            f"or keep one quantization step.", field=f"steps.{index}.method")
        if method.quantizes:
            quantized_by = (index, name)
        params = step.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"Step {index + 1} ({name}): 'params' must be an object.", field=f"steps.{index}")
        for key in params:
            if method.param(key) is None:
                known = ", ".join(p.name for p in method.params)
                raise UserError(f"Step {index + 1} ({name}) has no parameter {key!r}; its parameters are {known}.",
                                field=f"steps.{index}.{key}")
        clean = {p.name: _check_param(name, index, p, params.get(p.name, p.default)) for p in method.params}
        problem = method.check(clean, task) if method.check else ""
        if problem:
            raise UserError(f"Step {index + 1} ({name}): {problem}", field=f"steps.{index}.method")
        clean_steps.append({"method": name, "params": clean})
    _check_trained_grid(clean_steps)
    _check_replaced_words(clean_steps)
    recovery = recipe.get("recovery") or {"objective": "none"}
    if not isinstance(recovery, dict):
        raise UserError("'recovery' must be an object such as {\"objective\": \"none\"}.", field="recovery")
    unknown_recovery_keys = sorted(set(recovery) - RECOVERY_KEYS)
    if unknown_recovery_keys:
        raise UserError(f"'recovery' has an unknown key {unknown_recovery_keys[0]!r}; known keys: "
                        f"{', '.join(sorted(RECOVERY_KEYS))}.", field="recovery")
    objective = recovery.get("objective", "none")
    if objective not in RECOVERY_OBJECTIVES:
        raise UserError(f"Unknown recovery objective {objective!r}; choose one of "
                        f"{', '.join(RECOVERY_OBJECTIVES)}.", field="recovery.objective")
    if objective not in SUPPORTED_OBJECTIVES:
        raise UserError(f"Recovery objective {objective!r} is not available yet; use one of "
                        f"{', '.join(SUPPORTED_OBJECTIVES)}.", field="recovery.objective")
    out = {"task": task, "steps": clean_steps,
           "recovery": _check_recovery(recovery, objective, clean_steps, model, task)}
    gpus = _check_gpus(recipe.get("gpus", 0), out)
    if gpus:
        out["gpus"] = gpus
    if recipe.get("name") is not None:
        if not isinstance(recipe["name"], str):
            raise UserError("The recipe's 'name' must be text.", field="name")
        out["name"] = recipe["name"][:100]
    return out


TRAINING_METHODS = ("distill.student",)


def _check_gpus(gpus, recipe: dict) -> float:
    """`gpus`: how many GPUs the job's training holds (the Ray task's num_gpus); a share below 1 lets
    jobs share one GPU. Only training uses a GPU, so a recipe that trains nothing may not ask for one."""
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 8:
        raise UserError(f"'gpus' must be a number from 0 to 8 (a share below 1 lets jobs share a GPU); got {gpus!r}.",
                        field="gpus")
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"'gpus' above 1 must be a whole number (Ray gives whole GPUs beyond one); got {gpus:g}.",
                        field="gpus")
    trains = recipe["recovery"]["objective"] != "none" or any(s["method"] in TRAINING_METHODS for s in recipe["steps"])
    if gpus and not trains:
        raise UserError("The recipe asks for a GPU (gpus), but nothing in it trains: a GPU only speeds up "
                        "distill.student and recovery training. Remove 'gpus', or add a training step.", field="gpus")
    return float(gpus) if gpus != int(gpus) else int(gpus)


def _check_trained_grid(steps: list[dict]) -> None:
    """A student trained for 4-bit weights is only worth it if a later quantize.int4_weights step stores
    them on the same grid (same blocks, embeddings too where it was trained with them)."""
    for index, step in enumerate(steps):
        trained_for = step["params"].get("train_for", "float") if step["method"] == "distill.student" else "float"
        if trained_for == "float":
            continue
        later = [s["params"] for s in steps[index + 1:] if s["method"] == "quantize.int4_weights"]
        if not later:
            raise UserError(f"Step {index + 1} (distill.student) trains for {trained_for}, which only helps when a "
                            f"later quantize.int4_weights step stores them: add that step, or set train_for to float.",
                            field=f"steps.{index}.train_for")
        block = step["params"]["block_size"]
        if later[0]["block_size"] != block:
            raise UserError(f"Step {index + 1} (distill.student) trains for 4-bit blocks of {block} weights, but the "
                            f"quantize.int4_weights step uses blocks of {later[0]['block_size']}; use the same size in "
                            f"both.", field=f"steps.{index}.block_size")
        if later[0]["symmetric"]:
            raise UserError(f"Step {index + 1} (distill.student) trains for asymmetric 4-bit blocks (with a zero "
                            f"point), as quantize.int4_weights stores them by default; turn its 'symmetric' off.",
                            field=f"steps.{index}.train_for")


def _check_replaced_words(steps: list[dict]) -> None:
    """distill.student's replace_words swaps ids that teacher and student read alike; after vocab.trim the
    student reads another vocabulary (mixed-vocabulary distillation), so the two cannot go together."""
    trimmed_at = next((i for i, s in enumerate(steps) if s["method"] == "vocab.trim"), None)
    for index, step in enumerate(steps):
        if step["method"] == "distill.student" and step["params"].get("replace_words") and \
                trimmed_at is not None and trimmed_at < index:
            raise UserError(f"Step {index + 1} (distill.student) replaces words in its training texts, which needs the "
                            f"student and the original to read one vocabulary, but step {trimmed_at + 1} (vocab.trim) "
                            f"comes first; set replace_words to 0 or put vocab.trim after distill.student.",
                            field=f"steps.{index}.replace_words")


def _check_recovery(recovery: dict, objective: str, steps: list[dict], model: dict, task: str) -> dict:
    """The recovery settings with defaults filled in; refused when they cannot work on this recipe,
    model and data (a labelled objective without labels, nothing to recover, rounds without pruning)."""
    from services.engine.objectives import OBJECTIVES, ROUND_METHODS, why_not

    if objective == "none":
        return {"objective": "none"}
    clean = {"objective": objective}
    for param in RECOVERY_PARAMS:
        value = recovery.get(param.name, param.default)
        try:
            clean[param.name] = _check_param("recovery", 0, param, value)
        except UserError as error:  # reword "Step 1 (recovery)" for the recovery block
            raise UserError(str(error).replace("Step 1 (recovery): ", "Recovery: "),
                            field=f"recovery.{param.name}") from None
    reason = why_not(objective, architecture_of(model), output_kind_of(model), labels_available(model, task),
                     maskable=True)
    if reason:
        raise UserError(f"Recovery objective {objective!r} ({OBJECTIVES[objective].title}) {reason}",
                        field="recovery.objective")
    torch_steps = [s["method"] for s in steps if REGISTRY[s["method"]].stage == "torch"]
    if not torch_steps:
        raise UserError("Recovery trains the PyTorch model after the recipe's PyTorch steps (pruning, factorizing, "
                        "sharing, a student), and this recipe has none: its steps rewrite the exported graph, so "
                        "there is nothing to recover yet. Add such a step before them, or set the objective to none.",
                        field="recovery.objective")
    if "vocab.trim" in torch_steps:
        raise UserError("Recovery cannot follow vocab.trim: the original model it learns from reads the original "
                        "token ids, which the trimmed vocabulary no longer has. Recover in a recipe without "
                        "vocab.trim, or set the objective to none.", field="recovery.objective")
    if "share.cluster" in torch_steps:
        raise UserError("Recovery cannot follow share.cluster yet: its layers look their weights up in a shared "
                        "table, which this training cannot update. Put share.cluster after a recovered step in "
                        "another recipe, or set the objective to none.", field="recovery.objective")
    if "sequence.pool" in torch_steps:
        raise UserError("Recovery cannot follow sequence.pool yet: the original it learns from answers frame by frame "
                        "at the full rate, the pooled model at fewer frames. A once-for-all model needs none; set "
                        "the objective to none.", field="recovery.objective")
    clean.update(_check_helpers(recovery, model))
    clean.update(_check_label_budget(recovery, objective, model, task))
    if clean["rounds"] > 1 and "prune.structured" in torch_steps:
        raise UserError("'rounds' works with prune.magnitude: prune.structured removes whole channels and heads, and "
                        "a round's small share of a narrow layer rounds to none. Use rounds 1 with prune.structured.",
                        field="recovery.rounds")
    if clean["rounds"] > 1 and not any(name in ROUND_METHODS for name in torch_steps):
        raise UserError(f"'rounds' spreads a pruning step over several rounds of prune-and-recover, and this recipe "
                        f"has no {' or '.join(ROUND_METHODS)} step; set rounds to 1.", field="recovery.rounds")
    return clean


def _check_helpers(recovery: dict, model: dict) -> dict:
    """`aux`: a list of training-only helpers (services/engine/aux_heads.py) that apply to this model."""
    from services.engine.aux_heads import AUX_HELPERS, why_not as helper_problem

    helpers = recovery.get("aux", [])
    if helpers in (None, False):
        helpers = []
    if isinstance(helpers, str):
        helpers = [helpers]
    if not isinstance(helpers, list) or not all(isinstance(h, str) for h in helpers):
        raise UserError(f"'recovery.aux' must be a list of helper names, such as [\"spatial-context\"]; known: "
                        f"{', '.join(AUX_HELPERS)}.", field="recovery.aux")
    reason = helper_problem(helpers, architecture_of(model))
    if reason:
        raise UserError(f"Recovery helper {reason}", field="recovery.aux")
    return {"aux": list(dict.fromkeys(helpers))} if helpers else {}


def _check_label_budget(recovery: dict, objective: str, model: dict, task: str) -> dict:
    """`label_budget` (a share in (0, 1] or a count of fitting samples) and `selection`: how many and
    which samples' labels supervised recovery may use."""
    budget, strategy = recovery.get("label_budget"), recovery.get("selection")
    if budget is None:
        if strategy is not None:
            raise UserError("'recovery.selection' chooses which samples to label, and needs a 'label_budget' "
                            "(a share such as 0.1, or a count such as 50).", field="recovery.selection")
        return {}
    from services.engine.selection import STRATEGIES, budget_count

    strategy = strategy or "random"
    if strategy not in STRATEGIES:
        raise UserError(f"Unknown selection {strategy!r}; choose one of {', '.join(STRATEGIES)}.",
                        field="recovery.selection")
    if objective != "supervised":
        raise UserError(f"A label budget decides which samples' labels supervised recovery learns from; the "
                        f"{objective!r} objective uses no labels or every one. Set the objective to supervised, "
                        f"or remove 'label_budget'.", field="recovery.label_budget")
    # the one set of rules (and sentences) the worker applies too; an upload's sample count is known
    # only there, so here its budget is checked for form alone
    available = fitting_sample_count(model, task)
    try:
        budget_count(budget, available if available is not None else 2**31)
    except ValueError as error:
        raise UserError(str(error), field="recovery.label_budget") from None
    clean_budget = float(budget) if isinstance(budget, float) and budget <= 1 else int(budget)
    return {"label_budget": clean_budget, "selection": strategy}


def fitting_sample_count(model: dict, task: str) -> int | None:
    """How many fitting samples recovery can draw labels from: the built-in digits models' training
    split (scikit-learn's digits, no torch); None when only the worker can tell (selection.budget_count
    refuses there with the same sentence)."""
    from services.catalog import BUILTIN_MODELS

    if BUILTIN_MODELS.get(model.get("id"), {}).get("task") == "digits":
        from services.engine.tasks.digits import digits_data

        return len(digits_data().y_train)
    return None


def output_kind_of(model: dict) -> str:
    """'logits' or 'embedding': what the model's first output is (built-ins declare it, uploads have
    it on their card)."""
    from services.catalog import BUILTIN_MODELS

    if model.get("id") in BUILTIN_MODELS:
        return BUILTIN_MODELS[model["id"]].get("output_kind", "logits")
    return (model.get("card") or {}).get("output_kind") or "logits"


def labels_available(model: dict, task: str) -> bool:
    """Whether the fitting samples carry class labels a supervised loss can use: the digits images of the
    built-in CNNs, or a user's CSV with labels scored as `your-data` by a model with class scores."""
    from services.catalog import BUILTIN_MODELS

    if model.get("id") in BUILTIN_MODELS:
        return BUILTIN_MODELS[model["id"]].get("architecture") == "cnn"
    return task == "your-data" and output_kind_of(model) == "logits"
