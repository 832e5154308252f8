"""Rate searches end to end on digits-cnn: trials are real compress jobs run by real workers."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import run_cli, wait_until
from services import api
from services.errors import UserError
from storage import queue as q

RATE = "prune.structured.amount"


def test_a_search_finds_a_rate_within_the_drop_and_every_trial_is_a_run(prepared_db):
    found = api.wait_for_search(prepared_db, api.start_search(prepared_db, "digits-cnn", {}, RATE, 1.0, 5)["id"])
    assert found["status"] == "succeeded" and found["share_path"] == f"/search?id={found['id']}"
    trials = found["trials"]
    assert 2 <= len(trials) <= 5 and trials[0]["rate"] == 0.95  # the top of the range first
    assert all(t["status"] == "succeeded" and api.get_run(prepared_db, t["run_id"]) for t in trials)
    best = found["outcome"]["best"]
    assert best["drop"] <= 1.0 and best["rate"] == max(t["rate"] for t in trials if t["drop"] <= 1.0)
    assert best["size_ratio"] > 1.5  # digits-cnn keeps its accuracy at a third of its channels removed
    assert found["outcome"]["sentence"].startswith(f"Amount {best['rate']:.4g} loses")
    jobs = [j for j in api.list_jobs(prepared_db) if j["kind"] == "compress"]
    assert {j["id"] for j in jobs} == {t["job_id"] for t in trials}  # ordinary jobs, on the Jobs page


def test_a_goal_no_rate_meets_says_so_in_a_sentence(prepared_db):
    ruined = {"steps": [{"method": "prune.magnitude", "params": {"amount": 0.97}}]}  # loses most of the accuracy
    found = api.wait_for_search(prepared_db, api.start_search(prepared_db, "digits-cnn", ruined, RATE, 1.0, 7)["id"])
    assert found["status"] == "succeeded" and found["outcome"]["best"] is None
    assert found["outcome"]["sentence"].startswith("No setting meets the goal: even the mildest setting tried "
                                                   "(amount 0.05) loses")
    assert len(found["trials"]) == 3  # the top, one guess, the mildest setting
    # the rate's step is added first, the base recipe's own step kept
    first = api.get_run(prepared_db, found["trials"][0]["run_id"])
    assert [step["method"] for step in first["recipe"]["steps"]] == ["prune.structured", "prune.magnitude"]


@pytest.mark.parametrize("rate, max_drop, budget, message", [
    ("prune.structured.width", 1.0, 7, "--rate must name a compression rate"),
    ("quantize.dynamic.operators", 1.0, 7, "--rate must name a compression rate"),
    (RATE, -1.0, 7, "allowed drop must be between 0 and 100"),
    (RATE, 1.0, 1, "budget must be a whole number from 2 to 30"),
])
def test_a_bad_goal_is_refused_before_anything_is_queued(prepared_db, rate, max_drop, budget, message):
    with pytest.raises(UserError, match=message):
        api.start_search(prepared_db, "digits-cnn", {}, rate, max_drop, budget)
    assert [j for j in api.list_jobs(prepared_db) if j["kind"] != "prepare"] == []
    assert api.list_searches(prepared_db) == []


def test_a_search_survives_its_worker_being_killed(prepared_db, prepared_home, workers):
    started = api.start_search(prepared_db, "digits-cnn", {}, RATE, 1.0, 5)
    first = workers.start(prepared_home, lease_s=2)
    wait_until(lambda: sum(t["status"] == "succeeded" for t in api.get_search(prepared_db, started["id"])["trials"]) >= 2,
               timeout=120, what="two trials to finish")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    workers.start(prepared_home, lease_s=2)  # reaps a trial the dead worker held, and goes on
    wait_until(lambda: api.get_search(prepared_db, started["id"])["status"] != "running", timeout=240,
               what="the search to end")
    found = api.get_search(prepared_db, started["id"])
    assert found["status"] == "succeeded", found["outcome"]
    assert len(found["trials"]) <= 5 and found["outcome"]["best"]["drop"] <= 1.0
    rates = [t["rate"] for t in found["trials"]]
    assert len(rates) == len(set(rates))  # no trial was queued twice


def test_two_rates_at_once_give_a_pareto_front_from_an_optuna_study_in_the_data_folder(prepared_db, prepared_home):
    started = api.start_search(prepared_db, "digits-cnn", {}, [RATE, "prune.magnitude.amount"], None, 4, goal="front")
    assert started["spec"]["strategy"] == "optuna"
    found = api.wait_for_search(prepared_db, started["id"])
    assert found["status"] == "succeeded" and len(found["trials"]) == 4
    settings = [tuple(t["params"].values()) for t in found["trials"]]
    assert len(set(settings)) == 4  # each trial a new pair of settings
    front = found["outcome"]["front"]
    assert front and all(not any(o["size_bytes"] <= t["size_bytes"] and o["score"] >= t["score"]
                                 and (o["size_bytes"], o["score"]) != (t["size_bytes"], t["score"])
                                 for o in found["trials"]) for t in front)  # nothing beats a front run on both
    assert (prepared_home / "searches" / started["id"] / "study.log").is_file()  # the study, resumable
    run = api.get_run(prepared_db, found["trials"][0]["run_id"])
    assert [s["method"] for s in run["recipe"]["steps"]] == ["prune.structured", "prune.magnitude"]


def test_with_two_workers_optuna_trials_run_at_the_same_time(prepared_db, prepared_home, workers):
    """One Optuna trial per live worker is in flight: with two workers, trials overlap in time."""
    import datetime as dt

    for _ in range(2):
        workers.start(prepared_home, lease_s=2)
    wait_until(lambda: len(q.live_workers(prepared_db)) == 2, timeout=60, what="two workers to register")
    started = api.start_search(prepared_db, "digits-cnn", {}, [RATE, "prune.magnitude.amount"], None, 6, goal="front")
    wait_until(lambda: api.get_search(prepared_db, started["id"])["status"] != "running", timeout=300,
               what="the search to end")
    found = api.get_search(prepared_db, started["id"])
    assert found["status"] == "succeeded" and len(found["trials"]) == 6
    jobs = [q.get_job(prepared_db, t["job_id"]) for t in found["trials"]]
    spans = [(dt.datetime.fromisoformat(j["started_at"]), dt.datetime.fromisoformat(j["finished_at"])) for j in jobs]
    overlapping = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])
    assert overlapping >= 2, spans  # trials in flight together, not one after the other
    assert len({j["worker_id"] for j in jobs}) == 2


def test_a_goal_alone_measures_a_portfolio_then_refines_the_most_promising(prepared_db):
    found = api.wait_for_search(prepared_db, api.start_search(prepared_db, "digits-cnn", {}, None, 1.0, 8)["id"])
    assert found["status"] == "succeeded" and found["spec"]["strategy"] == "portfolio"
    first = [t for t in found["trials"] if t["phase"] == 1]
    assert [t["candidate"] for t in first] == ["int8 weights", "structured pruning", "structured pruning, then int8",
                                               "magnitude pruning, then int8", "low-rank factorization"]
    refined = [t for t in found["trials"] if t["phase"] == 2]
    assert refined and len({t["candidate"] for t in refined}) == 1 and len(found["trials"]) <= 8
    best = found["outcome"]["best"]
    feasible = [t for t in found["trials"] if t["drop"] <= 1.0]
    assert best["drop"] <= 1.0 and best["size_ratio"] == max(t["size_ratio"] for t in feasible)
    assert "smaller" in found["outcome"]["sentence"] and "The best of another kind" in found["outcome"]["sentence"]
    with pytest.raises(UserError, match="first measures 5 candidate recipes"):
        api.start_search(prepared_db, "digits-cnn", {}, None, 1.0, 4)


def test_a_size_budget_alone_picks_the_methods_and_the_best_score_that_fits(prepared_db):
    """'Under X MB', no setting named: the portfolio, then the mildest rate that still fits."""
    original = api.get_model(prepared_db, "digits-cnn")["card"]["size_bytes"]
    max_mb = round(0.3 * original / 1e6, 4)  # int8 alone does not fit (about 0.4 of the file): pruning must
    started = api.start_search(prepared_db, "digits-cnn", {}, None, None, 8, goal="size", max_mb=max_mb)
    found = api.wait_for_search(prepared_db, started["id"])
    assert found["status"] == "succeeded" and found["spec"]["strategy"] == "portfolio"
    assert found["spec"]["goal"] == "size" and found["spec"]["max_drop"] is None
    fits = [t for t in found["trials"] if t["size_bytes"] <= max_mb * 1e6]
    best = found["outcome"]["best"]
    assert fits and best["score"] == max(t["score"] for t in fits)
    assert [t for t in found["trials"] if t["phase"] == 2]  # a rate was refined towards the budget's edge
    sentence = found["outcome"]["sentence"]
    assert sentence.startswith("Recommended: ") and f"at most {max_mb:g} MB" in sentence and " MB, " in sentence
    with pytest.raises(UserError, match="more than 1"):
        api.start_search(prepared_db, "digits-cnn", {}, None, None, 8, goal="speed", min_speedup=1.0)
    with pytest.raises(UserError, match="The Pareto front needs at least one setting"):
        api.start_search(prepared_db, "digits-cnn", {}, None, None, 8, goal="front")


def test_a_size_budget_gives_the_best_score_that_fits(prepared_db):
    found = api.wait_for_search(prepared_db, api.start_search(prepared_db, "digits-cnn", {}, RATE, None, 4,
                                                              goal="size", max_mb=0.04)["id"])
    assert found["status"] == "succeeded" and found["spec"]["strategy"] == "bracket"
    fits = [t for t in found["trials"] if t["size_bytes"] <= 40_000]
    best = found["outcome"]["best"]
    # size falls steadily with the amount, so the bracket reaches the budget's edge within 4 trials
    assert fits and best["score"] == max(t["score"] for t in fits) and "scores best" in found["outcome"]["sentence"]
    with pytest.raises(UserError, match="largest size you accept"):
        api.start_search(prepared_db, "digits-cnn", {}, RATE, None, 4, goal="size")
    with pytest.raises(UserError, match="more than 1"):
        api.start_search(prepared_db, "digits-cnn", {}, RATE, None, 4, goal="speed", min_speedup=0.5)


def test_a_time_budget_stops_new_trials_and_keeps_the_best_measured(prepared_db):
    started = api.start_search(prepared_db, "digits-cnn", {}, RATE, 100.0, 7, minutes=0.02)  # 1.2 s
    found = api.wait_for_search(prepared_db, started["id"])  # the first trial takes longer than that
    assert found["status"] == "succeeded" and len(found["trials"]) == 1
    assert found["outcome"]["sentence"].startswith("The time budget of 0.02 minutes ran out")
    assert found["outcome"]["best"]["rate"] == 0.95  # within 100 points even at the top of the range


def test_the_search_command_prints_the_trials_and_the_answer(prepared_home):
    done = run_cli("search", "--model", "digits-cnn", "--rate", RATE, "--max-drop", "1", "--budget", "3", "--wait",
                   home=prepared_home, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("search ") and "status=succeeded" in lines[0]
    assert lines[1].startswith("  amount 0.95: succeeded drop +")
    assert "loses" in lines[-1] and "smaller" in lines[-1]
    refused = run_cli("search", "--model", "digits-cnn", "--rate", "prune.structured.amount", home=prepared_home)
    assert refused.returncode == 2 and "needs --max-drop" in refused.stderr and "Traceback" not in refused.stderr
