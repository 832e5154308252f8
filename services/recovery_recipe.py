"""A recipe's `recovery` block: the objective that trains the compressed model back towards the original,
its settings, its training-only helpers and its label budget; refused, with the reason, when it cannot work
on the recipe's steps, the model and its data."""
from __future__ import annotations

from services.catalog import architecture_of
from services.engine.methods import REGISTRY
from services.engine.registry import Param
from services.errors import UserError

RECOVERY_OBJECTIVES = ("none", "supervised", "distill", "contrastive", "masked", "momentum-contrast")
RECOVERY_KEYS = {"objective", "steps", "unfreeze", "rounds", "lr", "batch_size", "seed",
                 "aux", "label_budget", "selection"}
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


def validate_recovery(recovery, steps: list[dict], model: dict, task: str) -> dict:
    """The recipe's `recovery` block checked against its (already checked) steps, the model and the task,
    with defaults filled in."""
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
    return _check_recovery(recovery, objective, steps, model, task)


def _check_recovery(recovery: dict, objective: str, steps: list[dict], model: dict, task: str) -> dict:
    """The recovery settings with defaults filled in; refused when they cannot work on this recipe,
    model and data (a labelled objective without labels, nothing to recover, rounds without pruning)."""
    from services.engine.objectives import OBJECTIVES, ROUND_METHODS, why_not

    if objective == "none":
        return {"objective": "none"}
    clean = {"objective": objective}
    for param in RECOVERY_PARAMS:
        clean[param.name] = param.clean(recovery.get(param.name, param.default), f"Recovery: '{param.name}'",
                                        f"recovery.{param.name}")
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
