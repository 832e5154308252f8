"""Stopping trials early (services/search_optuna.py): a finished trial rules out settings that cannot
meet the goal, so they are never run (skipped) or stopped while queued or running."""
from __future__ import annotations

import optuna

from services import search_optuna

RATES = [{"rate": "prune.structured.amount", "compresses": "higher", "low": 0.0, "high": 0.95},
         {"rate": "lowrank.svd.energy", "compresses": "lower", "low": 0.5, "high": 1.0}]


def _trial(amount: float, energy: float, drop: float, size_mb: float = 1.0, speed: float = 1.0) -> dict:
    return {"params": {"prune.structured.amount": amount, "lowrank.svd.energy": energy}, "drop": drop,
            "size_bytes": size_mb * 1e6, "speed_ratio": speed, "size_ratio": 1 / size_mb, "score": 0.9}


def _values(amount: float, energy: float) -> dict:
    return {"prune.structured.amount": amount, "lowrank.svd.energy": energy}


def test_a_clear_loss_rules_out_settings_that_compress_at_least_as_much():
    spec = {"goal": "max-drop", "max_drop": 1.0, "rates": RATES}
    lost = _trial(0.5, 0.8, drop=4.0)
    assert search_optuna.ruled_out_by(spec, _values(0.6, 0.7), [lost]) is lost  # more on both rates
    assert search_optuna.ruled_out_by(spec, _values(0.5, 0.8), [lost]) is lost
    assert search_optuna.ruled_out_by(spec, _values(0.6, 0.9), [lost]) is None  # milder on one: unknown
    assert search_optuna.ruled_out_by(spec, _values(0.4, 0.7), [lost]) is None
    noisy = _trial(0.5, 0.8, drop=1.3)  # over the allowed drop, but within noise of it
    assert search_optuna.ruled_out_by(spec, _values(0.6, 0.7), [noisy]) is None
    assert "already lost 4.0 points" in search_optuna.why_ruled_out(spec, lost)


def test_a_trial_over_a_size_budget_rules_out_every_milder_setting():
    spec = {"goal": "size", "max_mb": 0.5, "rates": RATES}
    big = _trial(0.3, 0.9, drop=0.2, size_mb=0.8)
    assert search_optuna.ruled_out_by(spec, _values(0.2, 0.95), [big]) is big  # milder on both: bigger still
    assert search_optuna.ruled_out_by(spec, _values(0.4, 0.95), [big]) is None
    assert search_optuna.ruled_out_by({**spec, "goal": "front"}, _values(0.2, 0.95), [big]) is None
    assert "is already 0.8 MB" in search_optuna.why_ruled_out(spec, big)


def test_ruled_out_proposals_are_told_as_pruned_and_never_become_jobs(tmp_path):
    spec = {"goal": "max-drop", "max_drop": 1.0, "rates": RATES, "budget": 10}
    study = search_optuna._study(tmp_path, "s1", spec)
    # a trial at the mildest corner that lost far too much: every proposal compresses at least as much
    lost = _trial(0.0, 1.0, drop=50.0)
    number, values, skipped = search_optuna.ask_unruled(study, spec, [lost], tries=3)
    assert skipped == 3  # gave up skipping after 3 and returned the 4th proposal to run
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert len(pruned) == 3 and number not in {t.number for t in pruned}
    assert len(search_optuna.skipped_settings(study, [{"optuna_trial": number}])) == 3
