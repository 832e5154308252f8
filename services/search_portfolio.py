"""Goal only, and the product picks the methods: "as small as possible, losing at most X points"
(goal max-drop), "under 10 MB" (size) or "twice as fast" (speed).

First a short portfolio of candidate recipes (each method that applies to the model at a moderate
setting, and pruning followed by int8) is measured, all at once (one job each, in parallel when
several workers run). Then the most promising candidate that has a compression rate is refined by
the bracketing search on that rate, the candidate's other steps kept:
- max-drop: the most compression within the allowed drop (the rate pushed up to the limit);
- size / speed: the best score within the budget, which is the *mildest* rate that still meets it
  (the rate pushed down to the budget's edge), bracketed on the trial's relative excess over the
  budget (size is nearly linear in a pruning amount, so the secant lands close).
The answer is explained against the best trial of another kind ("… int8 alone was 4.0× smaller at
-0.1 points"). `start` and `advance` are this strategy's part of services/search.py's life cycle
(its trials are compress jobs tagged with the search). Torch-free.
"""
from __future__ import annotations

import json

from services.errors import UserError
from storage import queue as q

# (what a user reads, the recipe's steps); the first step with a rate is the one a refinement moves.
CANDIDATES = (
    ("int8 weights", [{"method": "quantize.dynamic", "params": {}}]),
    ("structured pruning", [{"method": "prune.structured", "params": {"amount": 0.3}}]),
    ("structured pruning, then int8", [{"method": "prune.structured", "params": {"amount": 0.3}},
                                       {"method": "quantize.dynamic", "params": {}}]),
    ("magnitude pruning, then int8", [{"method": "prune.magnitude", "params": {"amount": 0.5}},
                                      {"method": "quantize.dynamic", "params": {}}]),
    ("low-rank factorization", [{"method": "lowrank.svd", "params": {"energy": 0.9}}]),
)


def candidates(model: dict, task: str, applies, check) -> list[dict]:
    """The portfolio for this model: candidates whose methods all apply and whose recipe is valid."""
    out = []
    for label, steps in CANDIDATES:
        if not all(applies(step["method"]) for step in steps):
            continue
        recipe = {"task": task, "steps": [dict(step, params=dict(step["params"])) for step in steps]}
        try:
            check(recipe)
        except Exception:  # noqa: BLE001 - a candidate this model cannot take is simply left out
            continue
        out.append({"label": label, "recipe": recipe})
    return out


def rate_of(recipe: dict, rates: dict) -> dict | None:
    """The first rate the recipe's steps carry (method, param, range, direction, value)."""
    for step in recipe["steps"]:
        for name, spec_rate in rates.items():
            if spec_rate["method"] == step["method"] and spec_rate["param"] in step["params"]:
                return {"rate": name, **spec_rate, "value": step["params"][spec_rate["param"]]}
    return None


def excess(spec: dict, trial: dict) -> float:
    """How far a measured trial is past the goal's limit (<= 0: within it): score points over the
    allowed drop (max-drop), or the relative excess over a size or speed budget (0.2 = 20 % too big,
    or 20 % too slow)."""
    if spec["goal"] == "size":
        return trial["size_bytes"] / 1e6 / spec["max_mb"] - 1.0
    if spec["goal"] == "speed":
        return spec["min_speedup"] / trial["speed_ratio"] - 1.0
    return trial["drop"] - spec["max_drop"]


def merit(spec: dict, trial: dict) -> float:
    """What the goal maximises among trials within the limit: compression, or the score."""
    return trial["size_ratio"] if spec["goal"] == "max-drop" else -trial["drop"]


# Rates that change no latency: zeroed weights still go through dense kernels. A speed goal never
# refines them (a browser check saw a speed search spend two trials pruning 69 % and 99 % for nothing).
SPEED_NEUTRAL = ("prune.magnitude",)


def to_refine(portfolio: list[dict], spec: dict, rates: dict) -> dict | None:
    """The candidate trial worth a rate search: the best within the limit among those with a rate; if
    none is within it, the one closest to it (its rate will be searched towards the limit)."""
    with_rate = [t for t in portfolio if "drop" in t and rate_of(t["recipe"], rates)
                 and not (spec["goal"] == "speed" and rate_of(t["recipe"], rates)["method"] in SPEED_NEUTRAL)]
    feasible = [t for t in with_rate if excess(spec, t) <= 0]
    if feasible:
        return max(feasible, key=lambda t: merit(spec, t))
    return min(with_rate, key=lambda t: excess(spec, t)) if with_rate else None


def oriented(spec: dict, rate: dict) -> tuple[int, float, float]:
    """(sign, low, high) such that sign × value grows towards the limit the search pushes to: more
    compression for max-drop, a milder setting (a better score) for a budget."""
    sign = -1 if rate["compresses"] == "lower" else 1
    if spec["goal"] != "max-drop":
        sign = -sign
    low, high = sorted((sign * rate["low"], sign * rate["high"]))
    return sign, low, high


def next_value(spec: dict, line: list[dict], rate: dict, resolution_share: float) -> float | None:
    """The next value of `rate` on a line of trials that differ only in it (a portfolio candidate refined, or a
    one-rate budget search)."""
    from services.search_strategy import Trial, next_rate

    sign, low, high = oriented(spec, rate)
    resolution = resolution_share * (high - low)
    if spec["goal"] == "max-drop":
        measured = [Trial(sign * t["params"][rate["rate"]], t["drop"]) for t in line if "drop" in t]
        following = next_rate(measured, low, high, spec["max_drop"], resolution)
    else:
        measured = [Trial(sign * t["params"][rate["rate"]], excess(spec, t)) for t in line if "drop" in t]
        following = next_rate(measured, low, high, 0.0, resolution, distance=lambda value: value, assumed_at_low=-1.0)
    return None if following is None else round(sign * following, 6)


def describe(trial: dict) -> str:
    """'structured pruning, then int8 (amount 0.347)': the candidate's name and its rate."""
    settings = ", ".join(f"{name.split('.')[-1]} {value:.3g}" for name, value in trial["params"].items())
    return f"{trial['candidate']} ({settings})" if settings else trial["candidate"]


def goal_words(spec: dict) -> str:
    from services.search import point_count

    if spec["goal"] == "size":
        return f"at most {spec['max_mb']:g} MB"
    if spec["goal"] == "speed":
        return f"at least {spec['min_speedup']:g}× faster"
    return f"allowed drop {point_count(spec['max_drop'])}"


def conclude(trials: list[dict], spec: dict) -> dict:
    measured = [t for t in trials if "drop" in t]
    feasible = [t for t in measured if excess(spec, t) <= 0]
    if not feasible:
        closest = min(measured, key=lambda t: excess(spec, t)) if measured else None
        if closest is None:
            sentence = "No trial finished."
        elif spec["goal"] == "max-drop":
            from services.search import point_count

            sentence = (f"No candidate meets the goal: the mildest, {describe(closest)}, loses "
                        f"{closest['drop']:.1f} points, over the allowed {point_count(spec['max_drop'])}.")
        else:
            sentence = (f"No candidate meets the goal ({goal_words(spec)}): the closest, {describe(closest)}, is "
                        f"{_effect(closest)} ({len(measured)} trials).")
        return {"sentence": sentence, "best": None, "trials": len(measured)}
    best = max(feasible, key=lambda t: merit(spec, t))
    sentence = f"Recommended: {describe(best)}, {_effect(best)}."
    others = [t for t in feasible if t["candidate"] != best["candidate"]]
    if others:
        runner = max(others, key=lambda t: merit(spec, t))
        sentence += f" The best of another kind, {describe(runner)}, was {_effect(runner)}."
    return {"sentence": sentence + f" ({len(measured)} trials; {goal_words(spec)}.)",
            "best": best, "trials": len(measured)}


def _effect(trial: dict) -> str:
    from services.search import points

    # two decimals near 1: "1.0× slower" would hide a 5 % loss
    decimals = 2 if 0.9 < trial["speed_ratio"] < 1.1 else 1
    speed = (f"{trial['speed_ratio']:.{decimals}f}× faster" if trial["speed_ratio"] >= 1
             else f"{1 / trial['speed_ratio']:.{decimals}f}× slower")
    return f"{trial['size_bytes'] / 1e6:.3g} MB, {trial['size_ratio']:.1f}× smaller, {speed}, {points(-trial['drop'])}"


# ---- the search's life: started and advanced from services/search.py -----------------------------

def start(db, model_id: str, goal: str, max_drop, max_mb, min_speedup, budget: int, task: str | None,
          check_recipe, minutes) -> dict:
    """No setting named: store the search, with its portfolio of candidates, and queue them (search.start)."""
    from services import search as s
    from services.api import get_model
    from services.catalog import architecture_of
    from services.engine.methods import REGISTRY

    if goal == "max-drop":
        max_drop = s._allowed_drop(max_drop)
    model = get_model(db, model_id)
    task = task or model["tasks"][0]
    architecture = architecture_of(model)
    portfolio = candidates(model, task, lambda name: not REGISTRY[name].why_not(model["format"], architecture, model_id),
                           lambda recipe: check_recipe(db, model_id, recipe))
    if not portfolio:
        raise UserError(f"None of the search's candidate methods applies to {model_id}; name a setting to push instead.")
    if not isinstance(budget, int) or not len(portfolio) + 2 <= budget <= s.MAX_BUDGET:
        raise UserError(f"With no setting named, the search first measures {len(portfolio)} candidate recipes, then "
                        f"refines the best: give it a budget of {len(portfolio) + 2} to {s.MAX_BUDGET} trials; got {budget!r}.")
    s._check_minutes(minutes)
    spec = {"recipe": {"task": task, "steps": []}, "rate": None, "method": None, "param": "setting", "low": None,
            "high": None, "compresses": "higher", "rates": [], "goal": goal, "strategy": "portfolio",
            "candidates": portfolio, "max_drop": max_drop if goal == "max-drop" else None, "budget": budget,
            "minutes": None if minutes is None else float(minutes),
            "max_mb": max_mb if goal == "size" else None, "min_speedup": min_speedup if goal == "speed" else None}
    search_id = q.new_id()
    db.execute("INSERT INTO searches (id, model_id, spec, status, created_at) VALUES (?, ?, ?, 'running', ?)",
               [search_id, model_id, json.dumps(spec), q.utcnow()])
    s.advance(db, search_id, check_recipe)
    return s.get(db, search_id)


def advance(db, search: dict, spec: dict, trials: list[dict], check_recipe) -> str:
    """Phase 1 queues every candidate at once; then the best one's rate is refined (search.advance)."""
    from services import search as s

    if any(t["status"] in q.ACTIVE for t in trials):
        return "running"

    def queue(recipe: dict, phase: int, candidate: str, values: dict) -> None:
        recipe = check_recipe(db, search["model_id"], recipe)  # UserError: the caller ends the search
        recipe["name"] = f"search {search['id'][:6]}, trial {len(trials) + 1 + queued[0]}: {candidate}"
        queued[0] += 1
        q.enqueue(db, "compress", search["model_id"],
                  {"recipe": recipe, "run_id": q.new_id(), "search_rate": next(iter(values.values()), 0.0),
                   "search_params": values, "phase": phase, "candidate": candidate}, search_id=search["id"])

    queued = [0]
    rates = s.rate_params()
    done = lambda outcome: s._store(db, search["id"], "succeeded", outcome)  # noqa: E731
    if not trials:  # phase 1: every candidate at once
        try:
            for candidate in spec["candidates"]:
                found = rate_of(candidate["recipe"], rates)
                queue(candidate["recipe"], 1, candidate["label"], {found["rate"]: found["value"]} if found else {})
        except UserError as problem:
            return s._store(db, search["id"], "failed", {"sentence": f"A candidate was refused ({problem}); the search "
                                                                   "stopped.", "best": None, "trials": 0})
        return "running"
    broken = [t for t in trials if t.get("phase") == 2 and t["status"] != "succeeded"]
    if broken:  # a refinement trial failed or was cancelled: stop here with what was measured
        outcome = conclude(trials, spec)
        outcome["sentence"] = (f"A refinement trial did not finish ({broken[0]['error'] or broken[0]['status']}); "
                               f"the search stopped. {outcome['sentence']}")
        return done(outcome)
    if len(trials) >= spec["budget"] or s._out_of_time(search, spec):
        return done(conclude(trials, spec))
    seed = to_refine([t for t in trials if t.get("phase") == 1], spec, rates)
    if seed is None:
        return done(conclude(trials, spec))
    rate = rate_of(seed["recipe"], rates)
    line = [seed] + [t for t in trials if t.get("phase") == 2]
    value = next_value(spec, line, rate, s.RESOLUTION_SHARE)
    if value is None:
        return done(conclude(trials, spec))
    try:
        queue(s._with_rate(seed["recipe"], rate, value), 2, seed["candidate"], {rate["rate"]: value})
    except UserError as problem:
        return done({**conclude(trials, spec),
                     "sentence": f"The refinement was refused ({problem}). " + conclude(trials, spec)["sentence"]})
    return "running"
