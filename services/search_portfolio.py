"""Goal only: "as small as possible, losing at most X points", and the product picks the methods.

First a short portfolio of candidate recipes (each method that applies to the model at a moderate
setting, and pruning followed by int8) is measured, all at once (one job each, in parallel when
several workers run). Then the most promising candidate that has a compression rate is refined by
the bracketing search on that rate, the candidate's other steps kept. The answer is the smallest
trial within the allowed drop, explained against the runner-up of another kind ("… int8 alone was
4.0× smaller at -0.1 points"). Torch-free.
"""
from __future__ import annotations

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


def to_refine(portfolio: list[dict], max_drop: float, rates: dict) -> dict | None:
    """The candidate trial worth a rate search: the smallest within the drop among those with a rate;
    if none is within it, the one that lost least (its rate will be searched downwards)."""
    with_rate = [t for t in portfolio if "drop" in t and rate_of(t["recipe"], rates)]
    feasible = [t for t in with_rate if t["drop"] <= max_drop]
    if feasible:
        return max(feasible, key=lambda t: t["size_ratio"])
    return min(with_rate, key=lambda t: t["drop"]) if with_rate else None


def describe(trial: dict) -> str:
    """'structured pruning, then int8 (amount 0.347)': the candidate's name and its rate."""
    settings = ", ".join(f"{name.split('.')[-1]} {value:.3g}" for name, value in trial["params"].items())
    return f"{trial['candidate']} ({settings})" if settings else trial["candidate"]


def conclude(trials: list[dict], max_drop: float) -> dict:
    from services.search import point_count

    measured = [t for t in trials if "drop" in t]
    feasible = [t for t in measured if t["drop"] <= max_drop]
    if not feasible:
        mildest = min(measured, key=lambda t: t["drop"]) if measured else None
        sentence = ("No trial finished." if mildest is None else
                    f"No candidate meets the goal: the mildest, {describe(mildest)}, loses "
                    f"{mildest['drop']:.1f} points, over the allowed {point_count(max_drop)}.")
        return {"sentence": sentence, "best": None, "trials": len(measured)}
    best = max(feasible, key=lambda t: t["size_ratio"])
    sentence = f"Recommended: {describe(best)}, {_effect(best)}."
    others = [t for t in feasible if t["candidate"] != best["candidate"]]
    if others:
        runner = max(others, key=lambda t: t["size_ratio"])
        sentence += f" The best of another kind, {describe(runner)}, was {_effect(runner)}."
    return {"sentence": sentence + f" ({len(measured)} trials; allowed drop {point_count(max_drop)}.)",
            "best": best, "trials": len(measured)}


def _effect(trial: dict) -> str:
    from services.search import points

    speed = (f"{trial['speed_ratio']:.1f}× faster" if trial["speed_ratio"] >= 1
             else f"{1 / trial['speed_ratio']:.1f}× slower")
    return f"{trial['size_ratio']:.1f}× smaller, {speed}, {points(-trial['drop'])}"
