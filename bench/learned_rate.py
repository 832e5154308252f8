"""A learned pooling rate against the best rate of a grid, per task, on one once-for-all speech-ssl
(issue: once-for-all sequence compression, "adaptive rate").

Both minimise the same objective on the fitting split: the task's training loss at rate r plus
penalty × compute_share(r) (the share of the encoder's frame work left at rate r). The grid evaluates
it at every rate of a grid (with a once-for-all model, one pass per rate; without one, one training per
rate); the learned rate comes from ONE short training of the rate alone (`sequence.pool` with
`learn_rate`, services/engine/speech/train.learn_rate). Each chosen rate is then scored on the held-out
split through the exported ONNX file, as a job scores it.

    .venv/bin/python bench/learned_rate.py [--weights bench/out/once_for_all_seed0.pt] [--penalties 0.1 0.5 2]

Uses the seed-0 once-for-all model that bench/once_for_all.py keeps. Writes bench/out/learned_rate.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = tuple(1.0 + 0.5 * i for i in range(15))  # 1, 1.5, ..., 8
TASKS = ("spoken-digits", "speaker-id")
FIT_SAMPLES = 512


def fit_loss(model, fit, task: str, rate: float) -> float:
    """Mean task loss over the fitting subset at `rate` (the grid adds the compute penalty)."""
    import numpy as np
    import torch

    from services.engine.speech.train import task_loss

    model.pool.rate = rate
    losses = []
    with torch.no_grad():
        for start in range(0, FIT_SAMPLES, 64):
            rows = np.arange(start, min(start + 64, FIT_SAMPLES))
            longest = int(fit.inputs["lengths"][rows].max())
            labels = [fit.labels[i] for i in rows] if task == "spoken-digits" else fit.labels[rows]
            losses.append(float(task_loss(model, torch.from_numpy(fit.inputs["features"][rows, :longest]),
                                          torch.from_numpy(fit.inputs["lengths"][rows]), labels, task)) * len(rows))
    return sum(losses) / FIT_SAMPLES


def held_out_score(model, task: str, rate: float, scratch: Path) -> float:
    from services.engine import measure, tasks
    from services.engine.export import export_onnx
    from services.engine.families.speech import SpeechAdapter
    from services.engine.tasks.base import EvalSet

    model.pool.rate = rate
    path = export_onnx(model, SpeechAdapter(), scratch / f"{task}-{rate:.3f}.onnx")
    scored = tasks.eval_set(task, "speech-ssl")  # with the rate, the scorer counts each utterance's real frames
    evaluation = EvalSet(inputs=scored.inputs, labels=scored.labels, latency_batch=scored.latency_batch,
                         extra={**scored.extra, "pooling_rate": rate})
    outputs = measure.run_outputs(measure.fresh_session(path), evaluation)
    return tasks.score(task, "speech-ssl", "logits", evaluation, outputs, outputs)["score"]


def main() -> None:
    import numpy as np
    import torch

    from services.engine import tasks
    from services.engine.families.speech import SpeechAdapter
    from services.engine.speech.train import compute_share, learn_rate

    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default=str(ROOT / "bench" / "out" / "once_for_all_seed0.pt"))
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = SpeechAdapter().load(args.weights)
    scratch = Path(tempfile.mkdtemp(prefix="learned-rate-"))
    rows = []
    for task in TASKS:
        fit = tasks.fit_set(task, {"id": "speech-ssl"}, None)
        order = np.random.default_rng(0).permutation(len(fit.inputs["lengths"]))[:FIT_SAMPLES]
        subset = type(fit)(inputs={k: v[order] for k, v in fit.inputs.items()},
                           labels=[fit.labels[i] for i in order] if task == "spoken-digits" else fit.labels[order])
        grid_started = time.perf_counter()
        losses = {rate: fit_loss(model, subset, task, rate) for rate in GRID}
        grid_seconds = time.perf_counter() - grid_started
        for penalty in args.penalties:
            best = min(GRID, key=lambda r: losses[r] + penalty * compute_share(model, r))
            learned = learn_rate(model, fit.inputs["features"], fit.inputs["lengths"], fit.labels, task,
                                 penalty=penalty, steps=args.steps)
            objective_at = {rate: fit_loss(model, subset, task, rate) + penalty * compute_share(model, rate)
                            for rate in (best, learned.rate)}
            rows.append({"task": task, "penalty": penalty, "grid_rate": best, "learned_rate": learned.rate,
                         "grid_objective": objective_at[best], "learned_objective": objective_at[learned.rate],
                         "grid_score": held_out_score(model, task, best, scratch),
                         "learned_score": held_out_score(model, task, learned.rate, scratch),
                         "rate1_score": held_out_score(model, task, 1.0, scratch),
                         "grid_s": grid_seconds, "learned_s": learned.seconds, "steps": learned.steps})
            print(rows[-1], flush=True)
    lines = ["# Learned pooling rate against the best grid rate (speech-ssl, one once-for-all model)", "",
             f"Objective on {FIT_SAMPLES} fitting utterances: task loss at rate r + penalty × share of encoder frame "
             f"work left at r. Grid: {len(GRID)} rates from 1 to 8 (with a once-for-all model one pass each; with "
             f"fixed-rate models {len(GRID)} trainings). Learned: one training of {args.steps} steps moving the rate "
             f"alone. Scores on the held-out split, through ONNX. Total {time.perf_counter() - started:.0f} s on 2 "
             "shared cores.", "",
             "| task | penalty | best grid rate | learned rate | objective at grid / learned rate | score at rate 1 "
             "| at grid rate | at learned rate | grid s | learned s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['penalty']:g} | {row['grid_rate']:g} | {row['learned_rate']:.2f} | "
                     f"{row['grid_objective']:.3f} / {row['learned_objective']:.3f} | "
                     f"{100 * row['rate1_score']:.1f} | {100 * row['grid_score']:.1f} | "
                     f"{100 * row['learned_score']:.1f} | {row['grid_s']:.0f} | {row['learned_s']:.0f} |")
    out = ROOT / "bench" / "out" / "learned_rate.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
