"""How far a rate can go: sweeps of a once-for-all rate (one short run per rate and task) and rate
searches (services/search.py). Part of the API the UI and the CLI call; services.api re-exports it."""
from __future__ import annotations

import time

from services import api
from services.errors import UserError
from storage import queue as q

SWEEP_RATES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
SWEEP_KEEPS = ("merge_after",)  # the step's settings a sweep keeps (the rate is what it varies)


def submit_rate_sweep(db, model_id: str, rates=SWEEP_RATES, tasks: list[str] | None = None,
                      params: dict | None = None) -> list[dict]:
    """One sequence.pool run per rate and task: a once-for-all model needs no retraining, so each is
    a job of seconds, and together they draw each task's score against the rate (Compare page)."""
    model = api.get_model(db, model_id)
    tasks = [t for t in (tasks or model["tasks"]) if t != "fidelity"] or model["tasks"]
    kept = {name: value for name, value in (params or {}).items() if name in SWEEP_KEEPS}
    recipes = [{"task": task, "name": f"rate sweep: {task} at {rate:g}x",
                "steps": [{"method": "sequence.pool", "params": {**kept, "rate": float(rate)}}]}
               for task in tasks for rate in rates]
    for recipe in recipes:  # all refused before any is queued
        api.check_recipe(db, model_id, recipe)
    return [api.submit_compress(db, model_id, recipe) for recipe in recipes]


# ---- rate searches (services/search.py): trials are compress jobs -------------------------

def start_search(db, model_id: str, recipe, rate: str | list[str], max_drop: float | None, budget: int,
                 task: str | None = None, goal: str = "max-drop", minutes: float | None = None,
                 max_mb: float | None = None, min_speedup: float | None = None) -> dict:
    from services import search

    return search.start(db, model_id, recipe, rate, max_drop, budget, task=task, check_recipe=api.check_recipe,
                        goal=goal, minutes=minutes, max_mb=max_mb, min_speedup=min_speedup)


SEARCH_GOALS = {"max-drop": "the most compression within the allowed drop",
                "front": "the Pareto front (score against size)",
                "size": "the best score within a size budget (MB)",
                "speed": "the best score at least N× faster"}


def score_change_words(change_points: float) -> str:
    from services.search import points

    return points(change_points)


def get_search(db, search_id: str) -> dict:
    from services import search

    return search.get(db, search_id)


def list_searches(db, model_id: str | None = None) -> list[dict]:
    from services import search

    return search.list_searches(db, model_id)


def search_rates() -> dict[str, dict]:
    from services import search

    return search.rate_params()


def wait_for_search(db, search_id: str, timeout_s: float = 3600.0) -> dict:
    """Run a search to its end: each trial through wait_for_job (a running worker, or inline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = get_search(db, search_id)
        if found["status"] != "running":
            return found
        pending = [t for t in found["trials"] if t["status"] in q.ACTIVE]
        if pending:
            api.wait_for_job(db, pending[0]["job_id"], max(1.0, deadline - time.monotonic()))
        else:
            from services import search

            search.advance(db, search_id, api.check_recipe)  # what a worker does when a trial ends
    raise UserError(f"Search {search_id} did not finish within {timeout_s:.0f} s; it goes on in the background.")


def rate_curves(runs: list[dict]) -> list[dict]:
    """Finished runs whose only step is sequence.pool, as points: task, rate, score, latency ratio."""
    points = []
    for run in runs:
        steps = run["recipe"]["steps"]
        if len(steps) != 1 or steps[0]["method"] != "sequence.pool" or not run.get("metrics"):
            continue
        rate = run["metrics"].get("pooling_rate", steps[0]["params"]["rate"])
        points.append({"task": run["recipe"]["task"], "rate": float(rate), "score": run["metrics"]["score"],
                       "how": "learned rate" if steps[0]["params"].get("learn_rate") else "rate chosen",
                       "score_name": run["metrics"]["score_name"],
                       "latency_pct": 100.0 * run["metrics"]["latency_ms"]["p50"] / run["baseline"]["latency_ms"]["p50"],
                       "link": run["share_path"]})
    return points
