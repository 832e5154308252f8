"""Which samples to label (issue 8 evidence): labels needed to reach 95 % of the score of supervised
recovery with every label, for `selection` random, uncertainty and inconsistency, measured with real
compress jobs in ONE run.

digits-multitask (one trunk, a digit head and a parity head) with 90 % of its weights pruned
(prune.magnitude 0.9, global: accuracy falls from about 0.98 to 0.52), then supervised recovery with
`label_budget` N on a ladder of N and each `selection`, over several seeds (the recipe's seed draws
the random samples, breaks ties and orders the training batches). The labels needed by a strategy are
where its mean accuracy over the seeds first crosses 95 % of the mean accuracy with every label
(linear between the two ladder rungs around the crossing; "≤ N" when the first rung N already
reaches it). The goal: inconsistency needs at least
15 % fewer labels than random (the multi-task active-learning study needed 20 % fewer).

    .venv/bin/python bench/active_learning.py [--seeds 0 1 2 3 4] [--ladder 5,10,15,20,25,30,40,55,70]
        [--amount 0.9] [--steps 200] [--threads 1]

Prints the table and writes bench/out/active_learning.md. Everything happens in a temporary
EXPLORER_HOME that is removed at the end.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = "digits-multitask"
STRATEGIES = ("random", "uncertainty", "inconsistency")
TARGET_SHARE = 0.95
GOAL = 0.15  # inconsistency: at least 15 % fewer labels than random


def labels_needed(ladder: list[int], means: list[float], target: float) -> float | None:
    """The budget where the mean score first reaches `target`, linear between ladder rungs; None if never."""
    for index, (budget, score) in enumerate(zip(ladder, means)):
        if score >= target:
            if index == 0:
                return float(budget)
            low, below = ladder[index - 1], means[index - 1]
            return low + (target - below) / (score - below) * (budget - low)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ladder", default="5,10,15,20,25,30,40,55,70", help="label budgets (counts), ascending")
    parser.add_argument("--amount", type=float, default=0.9, help="prune.magnitude amount")
    parser.add_argument("--steps", type=int, default=200, help="recovery steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ladder = sorted(int(v) for v in args.ladder.split(","))
    home = Path(tempfile.mkdtemp(prefix="active-learning-bench-"))
    # read by services.engine.measure when it is imported: the jobs' own timing is not compared here
    os.environ.update(EXPLORER_HOME=str(home), EXPLORER_BENCH_THREADS=str(args.threads), EXPLORER_BENCH_SECONDS="0.3",
                      OMP_NUM_THREADS=str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/recovery.py: spinning OpenMP on shared cores
    import torch

    torch.set_num_threads(args.threads)
    from recovery import Bench

    prune = [{"method": "prune.magnitude", "params": {"amount": args.amount, "scope": "global"}}]

    def plan(seed: int, budget: int | None = None, strategy: str = "random") -> dict:
        recovery = {"objective": "supervised", "steps": args.steps, "unfreeze": "all", "seed": seed}
        if budget is not None:
            recovery.update(label_budget=budget, selection=strategy)
        return recovery

    began = time.perf_counter()
    try:
        bench = Bench(home)
        none = bench.job(MODEL, prune, {"objective": "none"}, "no recovery")
        full = [bench.job(MODEL, prune, plan(seed), f"every label, seed {seed}") for seed in args.seeds]
        scores = {}
        for strategy in STRATEGIES:
            for budget in ladder:
                for seed in args.seeds:
                    row = bench.job(MODEL, prune, plan(seed, budget, strategy), f"{strategy}, {budget} labels, seed {seed}")
                    if "error" in row:
                        raise SystemExit(f"{strategy} with {budget} labels failed: {row['error']}")
                    scores[(strategy, budget, seed)] = row["metrics"]["score"]
        every = statistics.mean(r["metrics"]["score"] for r in full)
        target = TARGET_SHARE * every
        available = full[0]["notes"]
        spread = (lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0.0)

        lines = [f"{MODEL}, {args.amount:.0%} of its weights pruned (prune.magnitude, global): accuracy "
                 f"{none['metrics']['score']:.4f} without recovery (original {none['baseline']['score']:.4f}); supervised "
                 f"recovery, {args.steps} steps, with every label of the 1257 fitting images: {every:.4f} (mean over seeds "
                 f"{args.seeds}); target = {TARGET_SHARE:.0%} of that = {target:.4f}.", "",
                 "Mean accuracy on the 540 scored digits ± spread over seeds, by label budget:", "",
                 "| labels | " + " | ".join(STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]
        means = {s: [statistics.mean(scores[(s, b, seed)] for seed in args.seeds) for b in ladder] for s in STRATEGIES}
        for index, budget in enumerate(ladder):
            cells = [f"{means[s][index]:.4f} ± {spread([scores[(s, budget, seed)] for seed in args.seeds]):.4f}"
                     for s in STRATEGIES]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
        needed = {s: labels_needed(ladder, means[s], target) for s in STRATEGIES}
        lines += ["", "| selection | labels to reach the target | share of the 1257 | vs random |", "|---|---|---|---|"]
        for strategy in STRATEGIES:
            n, r = needed[strategy], needed["random"]
            reached = "not reached" if n is None else f"≤ {n:.0f}" if n == ladder[0] else f"{n:.1f}"
            lines.append(f"| {strategy} | {reached} | "
                         f"{'—' if n is None else f'{n / 1257:.1%}'} | "
                         f"{'—' if n is None or r is None else f'{n / r:.2f}'} |")
        if needed["inconsistency"] is not None and needed["random"] is not None:
            saving = 1 - needed["inconsistency"] / needed["random"]
            verdict = "met" if saving >= GOAL else "MISSED"
            bound = " at least" if needed["inconsistency"] == ladder[0] else ""
            lines += ["", f"inconsistency / random = {needed['inconsistency'] / needed['random']:.3f}:{bound} "
                          f"{saving:.0%} fewer labels than random (goal: at least {GOAL:.0%}) — {verdict}."]
        else:
            lines += ["", "inconsistency or random never reached the target on this ladder — goal MISSED; "
                          "extend the ladder."]
        lines += ["", f"Notes of one full-label job: {' '.join(available)}",
                  f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s); "
                  f"{bench.count} jobs in {time.perf_counter() - began:.0f} s."]
        text = "\n".join(lines)
        print(text)
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "active_learning.md").write_text(text + "\n")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
