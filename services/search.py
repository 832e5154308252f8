"""Rate searches: "the most compression with a score drop of at most X", without a grid.

A search is a row in `searches` (its goal) and its trials are ordinary compress jobs tagged with
its id (`jobs.search_id`): they show on the Jobs page and run on any worker. Nothing waits: each
time a trial ends, the worker calls `advance`, which reads every finished trial back from the
database, asks the strategy (services/search_strategy.py) for the next rate and queues it, or
concludes. Because the state is only what the database holds, a search survives a killed worker
(its trial's lease runs out and the trial is run again) and a restart (`advance_all` on start-up).
Torch-free: the web process and the CLI call it.
"""
from __future__ import annotations

import json

from services.errors import UserError
from services.search_strategy import Trial, conclude, next_rate
from storage import queue as q

MAX_BUDGET = 30
# The bracket is closed when narrower than this share of the range (prune amounts: 0.002 of 0.95).
RESOLUTION_SHARE = 0.002


def rate_params() -> dict[str, dict]:
    """'method.param' -> its schema, for every parameter the search may move."""
    from services.engine.methods import REGISTRY

    return {f"{name}.{p.name}": {"method": name, "param": p.name, "low": p.minimum, "high": p.maximum,
                                 "compresses": p.compresses, "help": p.help}
            for name, method in REGISTRY.items() for p in method.params if p.compresses}


def start(db, model_id: str, recipe: dict | str, rate: str, max_drop: float, budget: int, task: str | None = None,
          check_recipe=None) -> dict:
    """Validate the goal, store the search and queue its first trial."""
    from services.recipes import load_recipe_text

    rates = rate_params()
    if rate not in rates:
        raise UserError(f"--rate must name a compression rate, one of {', '.join(sorted(rates))}; got {rate!r}.")
    try:
        max_drop = float(max_drop)
    except (TypeError, ValueError):
        raise UserError(f"The allowed drop must be a number of score points; got {max_drop!r}.") from None
    if not 0 <= max_drop <= 100:
        raise UserError(f"The allowed drop must be between 0 and 100 score points; got {max_drop:g}.")
    if not isinstance(budget, int) or not 2 <= budget <= MAX_BUDGET:
        raise UserError(f"The trial budget must be a whole number from 2 to {MAX_BUDGET}; got {budget!r}.")
    spec_rate = rates[rate]
    base = load_recipe_text(recipe) if isinstance(recipe, str) else dict(recipe or {})
    steps = [dict(step) for step in base.get("steps", [])]
    if not any(step.get("method") == spec_rate["method"] for step in steps):
        steps.insert(0, {"method": spec_rate["method"], "params": {}})  # the rate's own step, first
    base = {**base, "steps": steps, **({"task": task} if task else {})}
    # Both ends of the range must make a valid recipe: refused now, not as a failed trial.
    for value in (spec_rate["low"], spec_rate["high"]):
        check_recipe(db, model_id, _with_rate(base, spec_rate, value))
    clean = check_recipe(db, model_id, _with_rate(base, spec_rate, spec_rate["high"]))
    spec = {"recipe": {**base, "task": clean["task"]}, "rate": rate, "method": spec_rate["method"],
            "param": spec_rate["param"], "low": spec_rate["low"], "high": spec_rate["high"],
            "compresses": spec_rate["compresses"], "max_drop": max_drop, "budget": budget}
    search_id = q.new_id()
    db.execute("INSERT INTO searches (id, model_id, spec, status, created_at) VALUES (?, ?, ?, 'running', ?)",
               [search_id, model_id, json.dumps(spec), q.utcnow()])
    advance(db, search_id, check_recipe)
    return get(db, search_id)


def _with_rate(recipe: dict, spec: dict, value: float) -> dict:
    steps = [dict(step, params={**step.get("params", {}), spec["param"]: value})
             if step.get("method") == spec["method"] else step for step in recipe["steps"]]
    return {**recipe, "steps": steps}


def _oriented(spec: dict) -> tuple[float, float, int]:
    """The strategy wants 'higher compresses more': a rate where lower compresses more is negated."""
    sign = -1 if spec["compresses"] == "lower" else 1
    low, high = sorted((sign * spec["low"], sign * spec["high"]))
    return low, high, sign


def trials_of(db, search_id: str) -> list[dict]:
    rows = db.query("""SELECT j.id AS job_id, j.status, j.error, j.payload, r.id AS run_id, r.metrics, r.baseline
                       FROM jobs j LEFT JOIN runs r ON r.job_id = j.id
                       WHERE j.search_id = ? ORDER BY j.created_at, j.rowid""", [search_id])
    out = []
    for row in rows:
        payload = json.loads(row["payload"])
        trial = {"job_id": row["job_id"], "status": row["status"], "error": row["error"], "rate": payload["search_rate"],
                 "run_id": payload["run_id"], "share_path": f"/result?id={payload['run_id']}"}
        if row["metrics"]:
            metrics, baseline = json.loads(row["metrics"]), json.loads(row["baseline"])
            trial.update(score=metrics["score"], score_name=metrics["score_name"], baseline_score=baseline["score"],
                         drop=100.0 * (baseline["score"] - metrics["score"]),
                         size_ratio=baseline["size_bytes"] / metrics["size_bytes"],
                         speed_ratio=baseline["latency_ms"]["p50"] / metrics["latency_ms"]["p50"])
        out.append(trial)
    return out


def advance(db, search_id: str, check_recipe=None) -> str:
    """Queue the next trial or conclude; a no-op while a trial is queued or running. Returns the status."""
    if check_recipe is None:
        from services.api import check_recipe
    with q.immediate(db):
        rows = list(db.query("SELECT * FROM searches WHERE id = ?", [search_id]))
        if not rows or rows[0]["status"] != "running":
            return rows[0]["status"] if rows else "missing"
        search, spec = rows[0], json.loads(rows[0]["spec"])
        trials = trials_of(db, search_id)
        if any(t["status"] in q.ACTIVE for t in trials):
            return "running"
        broken = next((t for t in trials if t["status"] != "succeeded"), None)
        low, high, sign = _oriented(spec)
        measured = [Trial(sign * t["rate"], t["drop"]) for t in trials if "drop" in t]
        if broken is not None:
            reason = broken["error"] or f"the trial was {broken['status']}"
            return _finish(db, search_id, "failed", spec, trials, f"The trial at {spec['param']} "
                           f"{broken['rate']:g} did not finish ({reason}); the search stopped there.")
        rate = None
        if len(measured) < spec["budget"]:
            rate = next_rate(measured, low, high, spec["max_drop"], RESOLUTION_SHARE * (high - low))
        if rate is None:
            return _finish(db, search_id, "succeeded", spec, trials)
        value = round(sign * rate, 6)
        try:
            recipe = check_recipe(db, search["model_id"], _with_rate(spec["recipe"], spec, value))
        except UserError as problem:  # the model or a scan changed since the search began
            return _finish(db, search_id, "failed", spec, trials, f"The next trial was refused: {problem}")
        recipe["name"] = f"search {search_id[:6]}: {spec['param']} {value:g}"
        run_id = q.new_id()
        q.enqueue(db, "compress", search["model_id"], {"recipe": recipe, "run_id": run_id, "search_rate": value},
                  search_id=search_id)
    return "running"


def _finish(db, search_id: str, status: str, spec: dict, trials: list[dict], failure: str = "") -> str:
    low, high, sign = _oriented(spec)
    measured = [Trial(sign * t["rate"], t["drop"]) for t in trials if "drop" in t]
    outcome = conclude(measured, spec["max_drop"], spec["budget"] - len(measured), name=spec["param"],
                       show=lambda rate: sign * rate)  # the strategy saw negated rates where lower compresses
    best = None
    if outcome.best is not None:
        best = next(t for t in trials if "drop" in t and abs(sign * t["rate"] - outcome.best.rate) < 1e-9)
    sentence = outcome.sentence
    if best:
        speed = (f"{best['speed_ratio']:.2f}× faster" if best["speed_ratio"] >= 1
                 else f"{1 / best['speed_ratio']:.2f}× slower")
        sentence += (f" The best trial is {best['size_ratio']:.2f}× smaller and {speed} than the original, "
                     f"{best['score_name']} {best['score']:.4g} ({-best['drop']:+.2f} points).")
    if failure:
        sentence = failure + " " + sentence
    db.execute("UPDATE searches SET status = ?, outcome = ?, finished_at = ? WHERE id = ?",
               [status, json.dumps({"sentence": sentence, "best": best, "trials": len(measured)}), q.utcnow(), search_id])
    return status


def get(db, search_id: str) -> dict:
    rows = list(db.query("SELECT * FROM searches WHERE id = ?", [search_id]))
    if not rows:
        raise UserError(f"Unknown search {search_id!r}.")
    row = dict(rows[0])
    row["spec"] = json.loads(row["spec"])
    row["outcome"] = json.loads(row["outcome"]) if row["outcome"] else None
    row["trials"] = trials_of(db, search_id)
    row["share_path"] = f"/search?id={search_id}"
    return row


def list_searches(db, model_id: str | None = None) -> list[dict]:
    where, args = ("WHERE model_id = ?", [model_id]) if model_id else ("", [])
    return [get(db, row["id"]) for row in db.query(f"SELECT id FROM searches {where} ORDER BY created_at DESC", args)]


def advance_all(db) -> None:
    """Move every running search whose trials have all ended (after a restart, or a lost call)."""
    for row in list(db.query("SELECT id FROM searches WHERE status = 'running'")):
        advance(db, row["id"])
