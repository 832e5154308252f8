"""Label budgets (active learning, `recovery.label_budget` and `recovery.selection`): which samples a run
paid labels for, the score against the number of labels for each strategy, and one call that fills
in that curve. Part of the API the UI and the CLI call; services.api re-exports it."""
from __future__ import annotations

import json

from services import api
from services.errors import UserError

LADDER = (0.5, 1.0, 2.0)  # a sweep tries the run's own budget, half and twice it
ALL_LABELS = "all labels"
MAX_RUNS_READ = 2000  # the curve is drawn from the model's latest runs, never from every row


def _without_budget(recipe: dict) -> str:
    """The recipe as a key that ignores how many and which labels were bought (and the name)."""
    recovery = {k: v for k, v in (recipe.get("recovery") or {}).items() if k not in ("label_budget", "selection")}
    return json.dumps({"task": recipe.get("task"), "steps": recipe.get("steps"), "recovery": recovery},
                      sort_keys=True)


def labelled_samples(run: dict) -> dict | None:
    """What a run's recovery labelled: {"selection", "count", "of", "indices"}, with `images` (the
    first 48 chosen, 8x8 in [0, 1]) for the built-in digits models; None without a label budget."""
    chosen = (run.get("metrics") or {}).get("labelled_samples")
    if not chosen:
        return None
    from services.catalog import BUILTIN_MODELS

    if BUILTIN_MODELS.get(run["model_id"], {}).get("task") == "digits":
        from services.engine.tasks.digits import digits_data

        images = digits_data().x_train
        chosen = {**chosen, "images": [images[i, 0] for i in chosen["indices"][:48]]}
    return chosen


def label_curve(db, run_id: str) -> list[dict]:
    """Every finished run of the same model, task, steps and recovery as this one that differs only in
    its label budget or strategy: {"selection", "labels", "score", "run_id"} (the run with every label
    is "all labels")."""
    run = api.get_run(db, run_id)
    key = _without_budget(run["recipe"])
    points = []
    for other in api.list_runs(db, run["model_id"], limit=MAX_RUNS_READ):
        if other["status"] != "succeeded" or _without_budget(other["recipe"]) != key:
            continue
        chosen = other["metrics"].get("labelled_samples")
        points.append({"selection": chosen["selection"] if chosen else ALL_LABELS,
                       "labels": chosen["count"] if chosen else None, "score": other["metrics"]["score"],
                       "run_id": other["id"]})
    full = next((p["labels"] for p in points if p["labels"] is not None), None)
    of = (run["metrics"].get("labelled_samples") or {}).get("of", full)
    for point in points:
        if point["labels"] is None:
            point["labels"] = of
    return sorted(points, key=lambda p: (p["selection"], p["labels"]))


def submit_label_sweep(db, run_id: str, factors=LADDER) -> list[dict]:
    """The same recipe at half, the same and twice this run's label budget for every strategy, and once
    with every label (what a budget is measured against); runs that exist already are not repeated."""
    from services.engine.selection import STRATEGIES

    run = api.get_run(db, run_id)
    chosen = run["metrics"].get("labelled_samples")
    if not chosen:
        raise UserError("This run used every label: a label sweep starts from a run with a label budget.",
                        field="run")
    have = {(p["selection"], p["labels"]) for p in label_curve(db, run_id)} | _pending(db, run)
    counts = sorted({min(chosen["of"], max(1, round(chosen["count"] * factor))) for factor in factors})
    recipes = []
    for strategy in STRATEGIES:
        for count in counts:
            if (strategy, count) not in have:
                recovery = {**run["recipe"]["recovery"], "label_budget": int(count), "selection": strategy}
                recipes.append({**run["recipe"], "recovery": recovery,
                                "name": f"label sweep: {strategy}, {count} labels"})
    if not any(selection == ALL_LABELS for selection, _ in have):  # the reference every budget is held to
        recovery = {k: v for k, v in run["recipe"]["recovery"].items() if k not in ("label_budget", "selection")}
        recipes.append({**run["recipe"], "recovery": recovery, "name": "label sweep: every label"})
    for recipe in recipes:  # all refused before any is queued
        api.check_recipe(db, run["model_id"], recipe)
    return [api.submit_compress(db, run["model_id"], recipe) for recipe in recipes]


def _pending(db, run: dict) -> set[tuple]:
    """(selection, labels) of this recipe's compress jobs still queued or running: a second click on the
    sweep does not queue them twice."""
    from services.engine.selection import budget_count

    key, found = _without_budget(run["recipe"]), set()
    for status in ("queued", "running"):
        for job in api.list_jobs(db, status=status, limit=500, model_id=run["model_id"]):
            recipe = (job.get("payload") or {}).get("recipe")
            if job["kind"] != "compress" or not recipe or _without_budget(recipe) != key:
                continue
            recovery = recipe.get("recovery") or {}
            budget = recovery.get("label_budget")
            if budget is None:
                found.add((ALL_LABELS, None))
            else:
                found.add((recovery.get("selection", "random"),
                           budget_count(budget, run["metrics"]["labelled_samples"]["of"])))
    return found
