"""Searches the bracket cannot do, on Optuna: several rates at once, or the whole Pareto front.

- goal `front`: two objectives, the score (maximised) and the ONNX file's size (minimised), with
  Optuna's multi-objective TPE sampler; the answer is the study's Pareto front.
- goal `max-drop` over several rates: the size ratio is maximised under the constraint "score drop
  at most the allowed one" (TPE with `constraints_func`); the answer is the best feasible trial.

The study lives in the data folder (`searches/<id>/study.log`, Optuna's journal storage, safe for
several processes), and each trial is an ordinary compress job carrying its Optuna trial number:
`advance` tells Optuna what finished jobs measured, then asks for the next settings, so a search
stopped anywhere (a killed worker, a restart) continues from its study. Torch-free.
"""
from __future__ import annotations

from pathlib import Path

STARTUP_SHARE = 0.4  # random trials before TPE models the results (at least 2)


def _study(home: Path, search_id: str, spec: dict):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(home) / "searches" / search_id
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "study.log")))
    startup = max(2, round(STARTUP_SHARE * spec["budget"]))
    # A sampler lives as long as one `advance`; seeded by how many trials the study has, so each ask
    # draws afresh (one fixed seed would repeat the same random start every time) yet reproducibly.
    seed = len(storage.get_all_trials(storage.get_study_id_from_name(search_id))) if _exists(storage, search_id) else 0
    if spec["goal"] == "front":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
        directions = ["maximize", "minimize"]  # score, size in bytes
    else:  # one objective under a constraint: size ratio within the drop, or score within a size/speed budget
        # the constraint ("over_budget" <= 0) is set on each trial when it is told (tell_finished)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
        directions = ["maximize"]
    return optuna.create_study(study_name=search_id, storage=storage, sampler=sampler, directions=directions,
                               load_if_exists=True)


def _exists(storage, name: str) -> bool:
    return any(summary.study_name == name for summary in storage.get_all_studies())


def distributions(spec: dict) -> dict:
    from optuna.distributions import FloatDistribution

    return {r["rate"]: FloatDistribution(r["low"], r["high"]) for r in spec["rates"]}


def tell_finished(study, spec: dict, trials: list[dict]) -> None:
    """Report every finished job Optuna has not heard of yet."""
    import optuna
    from optuna.trial import TrialState

    open_numbers = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for trial in trials:
        number = trial.get("optuna_trial")
        if number not in open_numbers or trial["status"] in ("queued", "running"):
            continue
        if "drop" not in trial:  # stopped early by the search (ruled out), cancelled, or failed
            early = trial["status"] == "cancelled" and (trial.get("error") or "").startswith("stopped early")
            study.tell(number, state=TrialState.PRUNED if early else TrialState.FAIL)
            continue
        if spec["goal"] == "front":
            study.tell(number, [trial["score"], trial["size_bytes"]])
            continue
        live = optuna.trial.Trial(study, open_numbers[number]._trial_id)
        live.set_constraint("over_budget", over_budget(spec, trial))
        study.tell(number, trial["size_ratio"] if spec["goal"] == "max-drop" else trial["score"])


def over_budget(spec: dict, trial: dict) -> float:
    """How far a trial is past the goal's limit (<= 0: within it)."""
    if spec["goal"] == "size":
        return trial["size_bytes"] / 1e6 - spec["max_mb"]
    if spec["goal"] == "speed":
        return spec["min_speedup"] - trial["speed_ratio"]
    return trial["drop"] - spec["max_drop"]


def ask(study, spec: dict) -> tuple[int, dict]:
    trial = study.ask(distributions(spec))
    return trial.number, {name: round(value, 6) for name, value in trial.params.items()}


# "Clearly" out: a drop this far past the allowed one is not noise (scores move by a few tenths of a
# point between splits); sizes are exact; speed-ups move by about 10 % between timings.
CLEAR_DROP_POINTS = 0.5
CLEAR_SPEED_SHARE = 0.1


def ruled_out_by(spec: dict, values: dict, trials: list[dict]) -> dict | None:
    """A finished trial that already shows these settings cannot meet the goal, or None.

    Compression is monotone in each rate: settings that compress at least as much on every rate as
    a trial that lost clearly more than the allowed drop will lose as much (max-drop); settings that
    compress no more on every rate than a trial clearly over a size or speed budget will be over it
    too (size, speed). A front has no budget, so nothing is ruled out."""
    if spec["goal"] == "front":
        return None
    compression = {r["rate"]: (-1 if r["compresses"] == "lower" else 1) for r in spec["rates"]}
    for trial in trials:
        if "drop" not in trial or not all(name in trial["params"] for name in compression):
            continue
        more = all(compression[n] * values[n] >= compression[n] * trial["params"][n] for n in compression)
        less = all(compression[n] * values[n] <= compression[n] * trial["params"][n] for n in compression)
        if spec["goal"] == "max-drop" and more and trial["drop"] > spec["max_drop"] + CLEAR_DROP_POINTS:
            return trial
        if spec["goal"] == "size" and less and over_budget(spec, trial) > 0:
            return trial
        if spec["goal"] == "speed" and less and trial["speed_ratio"] < spec["min_speedup"] * (1 - CLEAR_SPEED_SHARE):
            return trial
    return None


def why_ruled_out(spec: dict, by: dict) -> str:
    """The reason a stopped or skipped trial shows, naming the trial that ruled it out."""
    if spec["goal"] == "max-drop":
        return f"{_settings(by)} already lost {by['drop']:.1f} points and these settings compress at least as much"
    if spec["goal"] == "size":
        return f"{_settings(by)} is already {by['size_bytes'] / 1e6:.3g} MB and these settings compress no more"
    return f"{_settings(by)} is only {by['speed_ratio']:.2f}× as fast and these settings compress no more"


def ask_unruled(study, spec: dict, trials: list[dict], tries: int = 20) -> tuple[int, dict, int]:
    """Ask for settings no finished trial has ruled out; the ruled-out ones are told to Optuna as
    pruned without running a job. Returns (trial number, settings, how many were skipped)."""
    from optuna.trial import TrialState

    skipped = 0
    while True:
        number, values = ask(study, spec)
        by = ruled_out_by(spec, values, trials)
        if by is None or skipped >= tries:  # after `tries` skips, run it anyway: the sampler insists
            return number, values, skipped
        study.tell(number, state=TrialState.PRUNED)
        skipped += 1


def conclude(study, spec: dict, trials: list[dict]) -> dict:
    """The outcome: for a front, its runs from the smallest to the best scoring; else the best feasible;
    with a word on what was stopped early or skipped."""
    outcome = _conclude(study, spec, trials)
    early = sum(1 for t in trials if (t.get("error") or "").startswith("stopped early"))
    skipped = len(skipped_settings(study, trials))
    notes = []
    if early:
        notes.append(f"{early} trial(s) were stopped early, ruled out by a finished trial.")
    if skipped:
        notes.append(f"{skipped} setting(s) Optuna proposed were skipped without a job: a finished trial had "
                     f"already ruled them out.")
    if notes:
        outcome["sentence"] = " ".join([outcome["sentence"], *notes])
    return outcome


def skipped_settings(study, trials: list[dict]) -> list:
    """Optuna trials told as pruned that never became a job (ask_unruled)."""
    from optuna.trial import TrialState

    numbers = {t.get("optuna_trial") for t in trials}
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.number not in numbers]


def _conclude(study, spec: dict, trials: list[dict]) -> dict:
    from services.search import point_count, points

    measured = [t for t in trials if "drop" in t]
    if spec["goal"] == "front":
        numbers = {t.number for t in study.best_trials}
        front = sorted((t for t in measured if t.get("optuna_trial") in numbers), key=lambda t: t["size_bytes"])
        if not front:
            return {"sentence": "No trial finished, so there is no front to show.", "best": None, "front": [],
                    "trials": len(measured)}
        ends = (f"from {_settings(front[0])} ({front[0]['size_ratio']:.2f}× smaller, {points(-front[0]['drop'])}) "
                f"to {_settings(front[-1])} ({front[-1]['size_ratio']:.2f}× smaller, {points(-front[-1]['drop'])})")
        sentence = (f"The Pareto front of {len(measured)} trials has {len(front)} run(s), {ends}: each is the best "
                    "score among the trials at most its size." if len(front) > 1 else
                    f"One trial beats all others on both score and size: {ends.split(' to ')[0]}.")
        return {"sentence": sentence, "best": None, "front": front, "trials": len(measured)}
    if spec["goal"] in ("size", "speed"):
        return conclude_budget(spec, measured)
    feasible = [t for t in measured if t["drop"] <= spec["max_drop"]]
    if not feasible:
        mildest = min(measured, key=lambda t: t["drop"]) if measured else None
        sentence = ("No trial finished." if mildest is None else
                    f"No setting tried meets the goal: the mildest loss was {mildest['drop']:.1f} points "
                    f"({_settings(mildest)}), over the allowed {spec['max_drop']:g}.")
        return {"sentence": sentence, "best": None, "trials": len(measured)}
    best = max(feasible, key=lambda t: t["size_ratio"])
    return {"sentence": f"{_settings(best)} loses {best['drop']:.2f} points (allowed: {point_count(spec['max_drop'])}) and is "
                        f"{best['size_ratio']:.2f}× smaller, the most of {len(feasible)} trials within the goal "
                        f"({len(measured)} trials).", "best": best, "trials": len(measured)}


def conclude_budget(spec: dict, measured: list[dict]) -> dict:
    """The best score among the measured trials within a size or speed budget, in a sentence."""
    from services.search import points

    limit = (f"at most {spec['max_mb']:g} MB" if spec["goal"] == "size"
             else f"at least {spec['min_speedup']:g}× faster at batch 1")
    feasible = [t for t in measured if over_budget(spec, t) <= 0]
    if not feasible:
        closest = min(measured, key=lambda t: over_budget(spec, t)) if measured else None
        sentence = ("No trial finished." if closest is None else
                    f"No setting tried is {limit}: the closest, {_settings(closest)}, is "
                    f"{closest['size_bytes'] / 1e6:.2f} MB and {closest['speed_ratio']:.2f}× as fast.")
        return {"sentence": sentence, "best": None, "trials": len(measured)}
    best = max(feasible, key=lambda t: t["score"])
    return {"sentence": f"{_settings(best)} scores best among the {len(feasible)} trial(s) {limit}: "
                        f"{best['score_name']} {100 * best['score']:.2f}% ({points(-best['drop'])}), "
                        f"{best['size_bytes'] / 1e6:.2f} MB, {best['speed_ratio']:.2f}× as fast "
                        f"({len(measured)} trials).", "best": best, "trials": len(measured)}


def _settings(trial: dict) -> str:
    """'amount 0.41, energy 0.9'; the full name where two settings share a short one."""
    short = [name.split(".")[-1] for name in trial["params"]]
    return ", ".join(f"{name if short.count(name.split('.')[-1]) > 1 else name.split('.')[-1]} {value:.4g}"
                     for name, value in trial["params"].items())
