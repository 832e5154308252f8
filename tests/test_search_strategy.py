"""The single-rate search (services/search_strategy.py) on drop curves with known answers."""
from __future__ import annotations

import random

import pytest

from services.search_strategy import Trial, next_rate, search


def curve(limit: float, steepness: float = 6.0, noise: float = 0.0, seed: int = 0):
    """A score drop that is flat, then rises through 1 point at `limit` (as pruning's does)."""
    rng = random.Random(seed)

    def measure(rate: float) -> float:
        return max(0.0, (rate / limit) ** steepness) + rng.uniform(-noise, noise)
    return measure


@pytest.mark.parametrize("limit", [0.12, 0.37, 0.55, 0.71, 0.88])
def test_finds_the_limit_within_seven_trials_never_over_the_budget(limit):
    measured = []

    def measure(rate):
        measured.append(rate)
        return curve(limit)(rate)
    outcome = search(measure, 0.0, 0.95, max_drop=1.0, budget=7, resolution=0.005)
    assert outcome.trials <= 7 and len(measured) == outcome.trials
    assert outcome.best.drop <= 1.0  # never an answer over the allowed drop
    # compression of structured pruning ~ 1 / (1 - amount)^2: within 5 % of the true limit's
    assert (1 - limit) ** 2 / (1 - outcome.best.rate) ** 2 > 0.95


def test_noise_never_makes_it_return_a_measured_failure():
    for seed in range(20):
        outcome = search(curve(0.6, noise=0.4, seed=seed), 0.0, 0.95, max_drop=1.0, budget=7, resolution=0.005)
        assert outcome.best is None or outcome.best.drop <= 1.0


def test_a_top_that_passes_ends_the_search_in_one_trial():
    outcome = search(lambda rate: 0.1, 1.0, 8.0, max_drop=1.0, budget=7, resolution=0.05)
    assert outcome.trials == 1 and outcome.best.rate == 8.0 and "whole range" in outcome.sentence


def test_a_goal_no_rate_meets_gets_a_sentence_not_an_empty_answer():
    outcome = search(lambda rate: 3.2 + rate, 0.0, 0.95, max_drop=1.0, budget=7, resolution=0.005)
    assert outcome.best is None and outcome.trials == 3  # the top, one guess, then the mildest setting
    assert outcome.sentence == ("No setting meets the goal: even the mildest setting tried (rate 0) loses 3.2 "
                                "points, over the allowed 1.")


def test_a_stopped_search_resumes_from_its_stored_trials():
    measure = curve(0.5)
    whole = search(measure, 0.0, 0.95, max_drop=1.0, budget=7, resolution=0.005)
    first = [Trial(0.95, measure(0.95))]
    first.append(Trial(next_rate(first, 0.0, 0.95, 1.0, 0.005), 0.0))  # a pass measured before the stop
    first[-1] = Trial(first[-1].rate, measure(first[-1].rate))
    resumed = search(measure, 0.0, 0.95, max_drop=1.0, budget=7, resolution=0.005, trials=first)
    assert resumed.best == whole.best and resumed.trials == whole.trials


@pytest.mark.parametrize("goal, budget_key, limit", [("size", "max_mb", 0.5), ("size", "max_mb", 0.2),
                                                     ("speed", "min_speedup", 2.0), ("speed", "min_speedup", 3.5)])
def test_a_budget_refinement_finds_the_mildest_setting_that_fits(goal, budget_key, limit):
    """Goal first with a size or speed budget (services/search_portfolio.py): the best score is the
    mildest pruning amount that still fits; the seed is the portfolio's candidate at amount 0.3."""
    from services.search_portfolio import excess, next_value

    spec = {"goal": goal, budget_key: limit}
    rate = {"rate": "prune.structured.amount", "low": 0.0, "high": 0.95, "compresses": "higher"}

    def trial(amount: float) -> dict:  # a 1 MB model; speed ~ 1 / (1 - amount) ** 1.5
        size = 1e6 * (1 - amount) ** 2 * 0.98 + 2e4
        return {"params": {rate["rate"]: amount}, "size_bytes": size, "size_ratio": 1e6 / size,
                "speed_ratio": 1 / (1 - amount) ** 1.5, "drop": 10 * amount ** 3}

    line = [trial(0.3)]
    while len(line) < 7:
        value = next_value(spec, line, rate, 0.002)
        if value is None:
            break
        line.append(trial(value))
    fitting = [t for t in line if excess(spec, t) <= 0]
    assert fitting, line
    best = min(t["params"][rate["rate"]] for t in fitting)
    edge = next(a / 1000 for a in range(951) if excess(spec, trial(a / 1000)) <= 0)  # the true mildest fit
    assert edge - 0.001 <= best <= edge + 0.03, (best, edge, [t["params"] for t in line])


def test_a_speed_goal_never_refines_a_rate_that_changes_no_latency():
    from services.search import rate_params
    from services.search_portfolio import to_refine

    def candidate(method: str, amount: float, speed: float) -> dict:
        return {"recipe": {"steps": [{"method": method, "params": {"amount": amount}}]}, "drop": 0.1,
                "speed_ratio": speed, "size_ratio": 2.0, "size_bytes": 1e5}

    magnitude, structured = candidate("prune.magnitude", 0.5, 1.4), candidate("prune.structured", 0.3, 1.2)
    spec = {"goal": "speed", "min_speedup": 1.5}
    assert to_refine([magnitude, structured], spec, rate_params()) is structured  # magnitude is closer, but dense
    assert to_refine([magnitude, structured], {"goal": "size", "max_mb": 0.05}, rate_params()) is not None
