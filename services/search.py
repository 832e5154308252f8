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


GOALS = {"max-drop": "the most compression within an allowed score drop",
         "front": "the whole Pareto front of score against size",
         "size": "the best score within a size budget (MB)",
         "speed": "the best score at least so many times faster"}


def start(db, model_id: str, recipe: dict | str, rate: str | list[str], max_drop: float | None, budget: int,
          task: str | None = None, check_recipe=None, goal: str = "max-drop", minutes: float | None = None,
          max_mb: float | None = None, min_speedup: float | None = None) -> dict:
    """Validate the goal, store the search and queue its first trial. One rate with goal max-drop is
    bracketed (services/search_strategy.py); several rates, or a front, go to Optuna."""
    from services.recipes import load_recipe_text

    rates = rate_params()
    names = [rate] if isinstance(rate, str) else list(rate or [])
    if goal not in GOALS:
        raise UserError(f"The goal must be one of {', '.join(GOALS)}; got {goal!r}.")
    _check_budget_goal(goal, max_mb, min_speedup)
    if not names and goal != "front":
        from services import search_portfolio

        return search_portfolio.start(db, model_id, goal, max_drop, max_mb, min_speedup, budget, task,
                                      check_recipe, minutes)
    if not names or len(set(names)) != len(names):
        raise UserError("The Pareto front needs at least one setting to move (Settings to push on the Search page, "
                        "--rate on the command line)." if not names else
                        "Name each setting to search once (--rate, repeated for several).")
    for name in names:
        if name not in rates:
            raise UserError(f"--rate must name a compression rate, one of {', '.join(sorted(rates))}; got {name!r}.")
    if goal == "size" and any(rates[n]["method"] == "sequence.pool" for n in names):
        raise UserError("sequence.pool changes time, not size: give it a speed goal instead.")
    if goal == "max-drop" or max_drop is not None:
        max_drop = _allowed_drop(max_drop)
    if not isinstance(budget, int) or not 2 <= budget <= MAX_BUDGET:
        raise UserError(f"The trial budget must be a whole number from 2 to {MAX_BUDGET}; got {budget!r}.")
    _check_minutes(minutes)
    chosen = [{"rate": name, **rates[name]} for name in names]
    if (goal == "front" or (goal == "max-drop" and len(chosen) > 1)) and any(r["method"] == "sequence.pool"
                                                                             for r in chosen):
        raise UserError("sequence.pool changes time, not size, and the front and several-settings searches weigh "
                        "size: search sequence.pool.rate alone, for the most shortening within the allowed drop.")
    base = load_recipe_text(recipe) if isinstance(recipe, str) else dict(recipe or {})
    steps = [dict(step) for step in base.get("steps", [])]
    for spec_rate in reversed(chosen):
        if not any(step.get("method") == spec_rate["method"] for step in steps):
            steps.insert(0, {"method": spec_rate["method"], "params": {}})  # the rate's own step, first
    base = {**base, "steps": steps, **({"task": task} if task else {})}
    # Both ends of the ranges must make a valid recipe: refused now, not as a failed trial.
    for end in ("low", "high"):
        clean = check_recipe(db, model_id, _with_rates(base, chosen, {r["rate"]: r[end] for r in chosen}))
    first = chosen[0]
    spec = {"recipe": {**base, "task": clean["task"]}, "rate": first["rate"], "method": first["method"],
            "param": first["param"], "low": first["low"], "high": first["high"], "compresses": first["compresses"],
            "rates": [{k: r[k] for k in ("rate", "method", "param", "low", "high", "compresses")} for r in chosen],
            "goal": goal, "strategy": "bracket" if goal != "front" and len(chosen) == 1 else "optuna",
            "max_drop": max_drop, "budget": budget, "minutes": None if minutes is None else float(minutes),
            "max_mb": max_mb, "min_speedup": min_speedup}
    search_id = q.new_id()
    db.execute("INSERT INTO searches (id, model_id, spec, status, created_at) VALUES (?, ?, ?, 'running', ?)",
               [search_id, model_id, json.dumps(spec), q.utcnow()])
    advance(db, search_id, check_recipe)
    return get(db, search_id)


def _check_budget_goal(goal: str, max_mb, min_speedup) -> None:
    if goal == "size" and not (isinstance(max_mb, (int, float)) and max_mb > 0):
        raise UserError(f"A size goal needs the largest size you accept, in MB (more than 0); got {max_mb!r}.")
    if goal == "speed" and not (isinstance(min_speedup, (int, float)) and min_speedup > 1):
        raise UserError(f"A speed goal needs how many times faster than the original (more than 1); got {min_speedup!r}.")


def _allowed_drop(max_drop) -> float:
    try:
        max_drop = float(max_drop)
    except (TypeError, ValueError):
        raise UserError(f"The allowed drop must be a number of score points; got {max_drop!r}.") from None
    if not 0 <= max_drop <= 100:
        raise UserError(f"The allowed drop must be between 0 and 100 score points; got {max_drop:g}.")
    return max_drop


def _check_minutes(minutes) -> None:
    if minutes is not None and not 0 < float(minutes) <= 24 * 60:
        raise UserError(f"The time budget must be between 0 and 1,440 minutes; got {minutes!r}.")


def _store(db, search_id: str, status: str, outcome: dict) -> str:
    db.execute("UPDATE searches SET status = ?, outcome = ?, finished_at = ? WHERE id = ?",
               [status, json.dumps(outcome), q.utcnow(), search_id])
    return status


def _with_rate(recipe: dict, spec: dict, value: float) -> dict:
    steps = [dict(step, params={**step.get("params", {}), spec["param"]: value})
             if step.get("method") == spec["method"] else step for step in recipe["steps"]]
    return {**recipe, "steps": steps}


def _with_rates(recipe: dict, rates: list[dict], values: dict) -> dict:
    for spec_rate in rates:
        recipe = _with_rate(recipe, spec_rate, values[spec_rate["rate"]])
    return recipe


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
                 "params": payload.get("search_params") or {}, "optuna_trial": payload.get("optuna_trial"),
                 "phase": payload.get("phase"), "candidate": payload.get("candidate"), "recipe": payload["recipe"],
                 "run_id": payload["run_id"], "share_path": f"/result?id={payload['run_id']}"}
        if row["metrics"]:
            metrics, baseline = json.loads(row["metrics"]), json.loads(row["baseline"])
            trial.update(score=metrics["score"], score_name=metrics["score_name"], baseline_score=baseline["score"],
                         drop=100.0 * (baseline["score"] - metrics["score"]),
                         size_ratio=baseline["size_bytes"] / metrics["size_bytes"], size_bytes=metrics["size_bytes"],
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
        if spec.get("strategy") == "optuna":
            return _advance_optuna(db, search, spec, trials, check_recipe)
        if spec.get("strategy") == "portfolio":
            from services import search_portfolio

            return search_portfolio.advance(db, search, spec, trials, check_recipe)
        if spec.get("goal") in ("size", "speed"):
            return _advance_budget_line(db, search, spec, trials, check_recipe)
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
        if len(measured) < spec["budget"] and not _out_of_time(search, spec):
            rate = next_rate(measured, low, high, spec["max_drop"], RESOLUTION_SHARE * (high - low))
        if rate is None:
            return _finish(db, search_id, "succeeded", spec, trials, _time_note(search, spec))
        value = round(sign * rate, 6)  # finer than the bracket's margins (2 % of >= 0.002 of the range)
        try:
            recipe = check_recipe(db, search["model_id"], _with_rate(spec["recipe"], spec, value))
        except UserError as problem:  # the model or a scan changed since the search began
            return _finish(db, search_id, "failed", spec, trials, f"The next trial was refused: {problem}")
        recipe["name"] = f"search {search_id[:6]}, trial {len(trials) + 1}"
        run_id = q.new_id()
        q.enqueue(db, "compress", search["model_id"], {"recipe": recipe, "run_id": run_id, "search_rate": value,
                                                       "search_params": {spec["rate"]: value}}, search_id=search_id)
    return "running"


def _advance_budget_line(db, search: dict, spec: dict, trials: list[dict], check_recipe) -> str:
    """One rate and a size or speed budget: the best score within it is the mildest setting that still
    fits, bracketed on the trials' relative excess over the budget (search_portfolio.next_value)."""
    from services import search_optuna
    from services.search_portfolio import next_value

    if any(t["status"] in q.ACTIVE for t in trials):
        return "running"
    measured = [t for t in trials if "drop" in t]

    def done(status: str, note: str = "") -> str:
        outcome = search_optuna.conclude_budget(spec, measured)
        outcome["sentence"] = " ".join(filter(None, [note, _time_note(search, spec), outcome["sentence"]]))
        return _store(db, search["id"], status, outcome)

    broken = next((t for t in trials if t["status"] != "succeeded"), None)
    if broken is not None:
        return done("failed", f"The trial at {spec['param']} {broken['rate']:g} did not finish "
                              f"({broken['error'] or broken['status']}); the search stopped there.")
    value = None
    if len(trials) < spec["budget"] and not _out_of_time(search, spec):
        value = next_value(spec, measured, spec["rates"][0], RESOLUTION_SHARE)
    if value is None:
        return done("succeeded")
    try:
        recipe = check_recipe(db, search["model_id"], _with_rate(spec["recipe"], spec, value))
    except UserError as problem:  # the model or a scan changed since the search began
        return done("failed", f"The next trial was refused: {problem}")
    recipe["name"] = f"search {search['id'][:6]}, trial {len(trials) + 1}"
    q.enqueue(db, "compress", search["model_id"], {"recipe": recipe, "run_id": q.new_id(), "search_rate": value,
                                                   "search_params": {spec["rate"]: value}}, search_id=search["id"])
    return "running"


def _advance_optuna(db, search: dict, spec: dict, trials: list[dict], check_recipe) -> str:
    """Tell the study what finished, then ask it for the next settings or conclude (in the caller's
    transaction, so two workers never queue the same trial)."""
    from services import search_optuna

    study = search_optuna._study(db.home, search["id"], spec)
    search_optuna.tell_finished(study, spec, trials)
    # Stop early: a trial still queued or running that a finished one has already ruled out.
    for trial in trials:
        by = search_optuna.ruled_out_by(spec, trial["params"], trials) if trial["status"] in q.ACTIVE else None
        if by is not None:
            q.stop_early(db, trial["job_id"], search_optuna.why_ruled_out(spec, by))
            trial["status"] = "cancelled"
    active = sum(t["status"] in q.ACTIVE for t in trials)
    # As many trials in flight as the live workers run jobs at once (workers × EXPLORER_JOBS_IN_FLIGHT;
    # on Ray, the tasks spread over the cluster): trials run in parallel.
    parallel = max(1, q.live_slots(db))
    if active >= parallel or (active and (len(trials) >= spec["budget"] or _out_of_time(search, spec))):
        return "running"  # a running trial is finished and counted before the search concludes
    if len(trials) >= spec["budget"] or _out_of_time(search, spec):
        outcome = search_optuna.conclude(study, spec, trials)
        outcome["sentence"] = " ".join(filter(None, [_time_note(search, spec), outcome["sentence"]]))
        return _store(db, search["id"], "succeeded", outcome)
    number, values, _ = search_optuna.ask_unruled(study, spec, trials)
    try:
        recipe = check_recipe(db, search["model_id"], _with_rates(spec["recipe"], spec["rates"], values))
    except UserError as problem:  # the model or a scan changed since the search began
        from optuna.trial import TrialState

        study.tell(number, state=TrialState.FAIL)
        outcome = search_optuna.conclude(study, spec, trials)
        outcome["sentence"] = f"The next trial was refused: {problem} {outcome['sentence']}"
        return _store(db, search["id"], "failed", outcome)
    recipe["name"] = f"search {search['id'][:6]}, trial {len(trials) + 1}"
    run_id = q.new_id()
    q.enqueue(db, "compress", search["model_id"], {"recipe": recipe, "run_id": run_id, "search_rate": values[spec["rate"]],
                                                   "search_params": values, "optuna_trial": number},
              search_id=search["id"])
    return "running"


def _elapsed_minutes(search: dict) -> float:
    import datetime as dt

    started = dt.datetime.fromisoformat(search["created_at"])
    return (dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60


def _out_of_time(search: dict, spec: dict) -> bool:
    """No new trial once the time budget is spent (a trial already running is finished and counted)."""
    return spec.get("minutes") is not None and _elapsed_minutes(search) >= spec["minutes"]


def _time_note(search: dict, spec: dict) -> str:
    return (f"The time budget of {spec['minutes']:g} minutes ran out; this is the best of what was measured."
            if _out_of_time(search, spec) else "")


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
                     f"{best['score_name']} {100 * best['score']:.2f}% ({points(-best['drop'])}).")
    if failure:
        sentence = failure + " " + sentence
    db.execute("UPDATE searches SET status = ?, outcome = ?, finished_at = ? WHERE id = ?",
               [status, json.dumps({"sentence": sentence, "best": best, "trials": len(measured)}), q.utcnow(), search_id])
    return status


def points(change: float) -> str:
    """A score change in words: '0.37 points below the original', 'as good as the original'."""
    if abs(change) < 0.005:
        return "as good as the original"
    return f"{abs(change):.2f} point{'' if abs(change) == 1 else 's'} {'above' if change > 0 else 'below'} the original"


def point_count(value: float) -> str:
    return f"{value:g} point{'' if value == 1 else 's'}"


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
    import logging

    for row in list(db.query("SELECT id FROM searches WHERE status = 'running'")):
        try:
            advance(db, row["id"])
        except Exception:  # noqa: BLE001 - one broken search must not keep the others from moving on
            logging.getLogger("explorer.search").exception("advancing search %s", row["id"])
