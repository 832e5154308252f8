"""Recipes: parse, validate against the method registry, and refuse what cannot work.

Validation happens at submit time, so a recipe that cannot run is refused with its reason
instead of being discovered as a crash in the worker.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from services.catalog import architecture_of
from services.engine.methods import REGISTRY
from services.recovery_recipe import validate_recovery
from services.errors import UserError

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
        clean = {p.name: p.clean(params.get(p.name, p.default), f"Step {index + 1} ({name}): '{p.name}'",
                                 f"steps.{index}.{p.name}") for p in method.params}
        problem = method.check(clean, task) if method.check else ""
        if problem:
            raise UserError(f"Step {index + 1} ({name}): {problem}", field=f"steps.{index}.method")
        clean_steps.append({"method": name, "params": clean})
    _check_trained_grid(clean_steps)
    _check_replaced_words(clean_steps)
    out = {"task": task, "steps": clean_steps,
           "recovery": validate_recovery(recipe.get("recovery") or {"objective": "none"}, clean_steps, model, task)}
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
