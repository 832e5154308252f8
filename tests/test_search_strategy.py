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
