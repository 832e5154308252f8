"""How far can one compression rate go? A search over a single monotone rate, without a grid.

The goal is "the most compression with a score drop of at most `max_drop`": for a rate such as
`prune.structured.amount` or `sequence.pool.rate`, more rate means more compression and (up to
noise) a lower score, so the answer is the largest rate whose measured drop is within the budget.
Instead of a grid, the search keeps a bracket (the highest rate that passed, the lowest that failed)
and places each trial inside it:

1. the top of the range first (if even that passes, it is the answer, in one trial);
2. then regula falsi on the logarithm of the measured drop (where the line through the bracket's two
   ends crosses the allowed drop), with the Illinois rule so that a drop that is flat and then steep, as
   pruning's is, cannot pin it to one side; the low end counts as a pass with no drop until
   measured, and is measured when two trials failed and none passed (is the goal reachable?);
3. until the bracket is narrower than `resolution` or the trial budget is spent.

Noise: the answer is always a rate that *was measured* within the budget, never an interpolation;
a pass above a failure (noise on a nearly flat stretch) does not move the bracket past the failure,
so the search stays on the safe side. A goal no rate meets is said in a sentence: "even the mildest
setting tried loses 3.2 points".

This module is pure (no torch, no database): it decides the next rate from the trials so far, so a
search that is stopped and restarted resumes from its stored trials.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


# Each guess stays this share of the bracket away from its ends. Simulated on power, exponential and
# stepped drops: wider margins or forced bisections helped the stepped drop by under 1 % of
# compression and cost the exponential one up to 8 %.
MARGIN = 0.02


@dataclass(frozen=True)
class Trial:
    rate: float
    drop: float  # score points lost against the original (positive = worse)


@dataclass(frozen=True)
class Bracket:
    passed: float | None  # the highest rate within the budget (below `failed`)
    failed: float | None  # the lowest rate over the budget
    passed_drop: float | None
    failed_drop: float | None


def bracket(trials: list[Trial], max_drop: float) -> Bracket:
    failures = [t for t in trials if t.drop > max_drop]
    failed = min(failures, key=lambda t: t.rate) if failures else None
    passes = [t for t in trials if t.drop <= max_drop and (failed is None or t.rate < failed.rate)]
    passed = max(passes, key=lambda t: t.rate) if passes else None
    return Bracket(passed and passed.rate, failed and failed.rate, passed and passed.drop, failed and failed.drop)


def next_rate(trials: list[Trial], low: float, high: float, max_drop: float, resolution: float,
              distance=None, assumed_at_low: float = 0.0) -> float | None:
    """The next rate to measure, or None when the search is done (bracket narrower than `resolution`,
    the top of the range passed, or even the bottom failed). Replays the trials in their order, so
    a resumed search continues exactly where it stopped.

    `distance(drop)` (> 0 fails) is where the secant is drawn; by default the log scale of score drops
    (`_distance`). A budget search (size or speed, search_portfolio) passes its own: the trial's
    relative excess over the budget, with `assumed_at_low` -1 (a file of no size, a call of no time)."""
    if not trials:
        return high
    measure = distance or (lambda drop: _distance(drop, max_drop))
    tried = {round(t.rate, 9) for t in trials}
    # f(rate) <= 0 passes. The low end counts as a pass with no drop (the mildest setting, usually
    # the untouched model) until it is measured.
    a, fa, b, fb, retained = low, measure(assumed_at_low), None, None, 0
    plateau = False  # the last trial measured exactly what its end of the bracket had: a flat step
    for trial in trials:
        f = measure(trial.drop)
        if b is None:
            if f > 0:
                b, fb = trial.rate, f
            elif trial.rate >= high:
                return None  # the top of the range is within the budget: nothing to search
            elif trial.rate > a:
                a, fa = trial.rate, f
            continue
        if not a < trial.rate < b:
            if trial.rate <= low and f > 0:
                return None  # even the mildest setting is over the budget
            continue  # outside the bracket: measured and kept, but noise cannot widen the bracket
        # Illinois: when the same end survives twice, halve its value, so a curved drop (flat, then
        # steep, as pruning's is) cannot pin the secant to one side.
        plateau = f == (fb if f > 0 else fa)
        if f > 0:
            b, fb = trial.rate, f
            fa, retained = (fa / 2, retained) if retained == -1 else (fa, -1)
        else:
            a, fa = trial.rate, f
            fb, retained = (fb / 2, retained) if retained == 1 else (fb, 1)
    if b is None:
        return None if round(high, 9) in tried else high
    passes_measured = any(t.drop <= max_drop for t in trials)
    if not passes_measured and len(trials) >= 2 and round(low, 9) not in tried:
        return low  # two failures and no pass yet: is the goal reachable at all?
    if b - a <= resolution:
        return None
    guess = (a * fb - b * fa) / (fb - fa)
    margin = (b - a) * MARGIN
    guess = min(max(guess, a + margin), b - margin)
    if plateau:
        # Pruning removes whole channels: several rates give the very same model, and the secant,
        # seeing no change, would creep along the step. Halve the bracket instead.
        guess = (a + b) / 2
    if round(guess, 9) in tried:
        guess = (a + b) / 2
    return None if round(guess, 9) in tried else guess


def _distance(drop: float, max_drop: float) -> float:
    """How far a drop is over the allowed one, on a log scale: pruning's drop goes from a fraction of a
    point to tens of points within a small change of rate, and a straight line through such values
    lands far too low; through their logarithms it lands near the limit (simulated on power, exponential
    and linear drops: within 1.5 % of the limit's compression in 7 trials, bisection 8 %)."""
    scale = max(max_drop, 0.1)
    return math.log1p(max(drop, 0.0) / scale) - math.log1p(max_drop / scale)


@dataclass(frozen=True)
class Outcome:
    best: Trial | None  # the highest-rate trial within the budget, below every failure
    trials: int
    sentence: str


def conclude(trials: list[Trial], max_drop: float, budget_left: int, name: str = "rate",
             show=lambda rate: rate) -> Outcome:
    """The answer in a sentence; `name` and `show` say the rate as the user knows it."""
    b = bracket(trials, max_drop)
    best = next((t for t in trials if b.passed is not None and t.rate == b.passed), None)
    if best is None:
        mildest = min(trials, key=lambda t: t.rate) if trials else None
        if mildest is None:
            return Outcome(None, 0, "No trial was measured.")
        return Outcome(None, len(trials), f"No setting meets the goal: even the mildest setting tried ({name} "
                                          f"{show(mildest.rate):g}) loses {mildest.drop:.1f} points, over the allowed "
                                          f"{max_drop:g}.")
    ends = sorted((show(b.passed), show(b.failed))) if b.failed is not None else None
    if b.failed is None:
        how = "the whole range stays within the allowed drop"
    elif budget_left <= 0:
        how = f"the trial budget ran out with the limit between {ends[0]:.4g} and {ends[1]:.4g}"
    else:
        how = f"the limit lies between {ends[0]:.4g} and {ends[1]:.4g}"
    return Outcome(best, len(trials), f"{name.capitalize()} {show(best.rate):.4g} loses {best.drop:.2f} points "
                                      f"(allowed: {max_drop:g} point{'' if max_drop == 1 else 's'}); {how} "
                                      f"({len(trials)} trials).")


def search(measure, low: float, high: float, max_drop: float, budget: int, resolution: float,
           trials: list[Trial] | None = None) -> Outcome:
    """Run the search with `measure(rate) -> drop`, starting from earlier `trials` (a resumed search)."""
    trials = list(trials or [])
    while len(trials) < budget:
        rate = next_rate(trials, low, high, max_drop, resolution)
        if rate is None:
            break
        trials.append(Trial(rate, measure(rate)))
    return conclude(trials, max_drop, budget - len(trials))
