"""Adaptive rate search against a grid (issue 6's target), in ONE run of real compress jobs.

For each case, a grid of 20 rates gives the true best rate (the most compression whose score drop is
within the allowed one); the search (services/search_strategy.py) must find a rate whose compression is
within 5 % of the grid's with at most 7 trials. Cases:
  - digits-cnn, prune.structured.amount in [0, 0.95], accuracy drop <= 1 point (compression: parameters);
  - minilm-l6, sequence.pool.rate in [1, 8] (token merging), fidelity drop <= 1 point, i.e. mean cosine
    >= 0.99 (compression: the share of token-layers left, inverted).

  - digits-size: a size budget instead of an allowed drop (40 % of the original file): the best score
    within it is the mildest amount that fits; the grid's mildest fitting amount against the bracket's
    (services/search_portfolio.next_value, the relative excess over the budget).

    .venv/bin/python bench/search.py [--only digits,minilm,digits-size] [--budget 7]

Writes bench/out/search.md. Everything happens in a temporary EXPLORER_HOME, removed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    "digits": {"model": "digits-cnn", "task": "digits", "method": "prune.structured", "param": "amount",
               "low": 0.0, "high": 0.95, "resolution": 0.002, "grid": [round(i * 0.05, 4) for i in range(20)]},  # 0: the original
    "minilm": {"model": "minilm-l6", "task": "fidelity", "method": "sequence.pool", "param": "rate",
               "low": 1.0, "high": 8.0, "resolution": 0.02, "grid": [round(1 + i * 7 / 19, 4) for i in range(20)]},
}
MAX_DROP = 1.0
SIZE_SHARE = 0.4  # digits-size: the budget, as a share of the original file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="digits or minilm")
    parser.add_argument("--budget", type=int, default=7)
    args = parser.parse_args()

    import torch

    from services.engine import pipeline
    from services.engine.families.token_merge import work_share
    from services.recipes import validate_recipe
    from services.search_strategy import search
    from storage import ArtifactStore

    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp(prefix="explorer-search-"))
    store = ArtifactStore(home)
    lines = [f"Allowed drop {MAX_DROP:g} point; each trial and each grid point is one compress job (pipeline.compress).", ""]
    try:
        for name in (args.only.split(",") if args.only else [*CASES, "digits-size"]):
            if name == "digits-size":
                lines += size_budget_case(store, args.budget)
                continue
            case = CASES[name]
            row = {"id": case["model"], "format": "torch", "task": case["task"], "status": "new", "artifact": None}
            model = {**row, **pipeline.prepare(store, row, lambda f, m: None)["model_update"]}
            runs = {}

            def job(rate: float) -> dict:
                if rate <= 0:  # no pruning at all: the original itself, nothing to run
                    return {"rate": 0.0, "drop": 0.0, "compression": 1.0}
                recipe = validate_recipe({"task": case["task"], "steps": [
                    {"method": case["method"], "params": {case["param"]: float(rate)}}]}, model, [case["task"], "fidelity"])
                run = pipeline.compress(store, model, recipe, f"{name}-{len(runs):03d}", lambda f, m: None)["run"]
                m, b = run["metrics"], run["baseline"]
                if case["method"] == "sequence.pool":
                    compression = 1 / work_share(64, 6, rate, 1)
                else:
                    compression = b["params"] / m["params"]
                out = {"rate": rate, "drop": 100 * (b["score"] - m["score"]), "compression": compression}
                runs[len(runs)] = out
                print(f"  {name} {case['param']} {rate:.4f}: drop {out['drop']:.2f}, compression {compression:.2f}x", flush=True)
                return out

            begun = time.perf_counter()
            grid = [job(rate) for rate in case["grid"]]
            grid_s = time.perf_counter() - begun
            passing = [g for g in grid if g["drop"] <= MAX_DROP]
            grid_best = max(passing, key=lambda g: g["compression"]) if passing else None

            measured = {}
            begun = time.perf_counter()

            def measure(rate: float) -> float:
                measured[rate] = job(rate)
                return measured[rate]["drop"]
            outcome = search(measure, case["low"], case["high"], MAX_DROP, args.budget, case["resolution"])
            search_s = time.perf_counter() - begun
            found = measured[outcome.best.rate] if outcome.best else None
            ratio = found["compression"] / grid_best["compression"] if found and grid_best else 0.0
            lines += [f"### {case['model']}: {case['method']}.{case['param']} in [{case['low']:g}, {case['high']:g}]", "",
                      "| | trials | rate found | its drop (points) | compression | share of the grid's best |",
                      "|---|---|---|---|---|---|",
                      f"| grid of {len(grid)} | {len(grid)} ({grid_s:.0f} s) | {grid_best['rate']:.4f} | {grid_best['drop']:.2f} | "
                      f"{grid_best['compression']:.2f}x | 100 % |",
                      f"| search | {outcome.trials} ({search_s:.0f} s) | {found['rate']:.4f} | {found['drop']:.2f} | "
                      f"{found['compression']:.2f}x | {100 * ratio:.1f} %{' ✓' if ratio >= 0.95 and outcome.trials <= 7 else ''} |",
                      "", f"Search trials, in order: " + ", ".join(f"{r:.4f} ({m['drop']:.2f})" for r, m in measured.items()),
                      "", f"The search's sentence: {outcome.sentence}", ""]
            print("\n".join(lines[-12:]), flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "search.md").write_text("# Adaptive rate search against a grid\n\n" + "\n".join(lines) + "\n")


def size_budget_case(store, budget: int) -> list[str]:
    """digits-cnn under a size budget: grid of 20 amounts against the bracket on the excess."""
    from services.engine import pipeline
    from services.recipes import validate_recipe
    from services.search_portfolio import excess, next_value

    case = CASES["digits"]
    row = {"id": "digits-cnn", "format": "torch", "task": "digits", "status": "new", "artifact": None}
    model = {**row, **pipeline.prepare(store, row, lambda f, m: None)["model_update"]}
    max_mb = round(SIZE_SHARE * model["card"]["size_bytes"] / 1e6, 5)
    spec = {"goal": "size", "max_mb": max_mb}
    rate = {"rate": "prune.structured.amount", "low": 0.05, "high": 0.95, "compresses": "higher"}
    count = [0]

    def job(amount: float) -> dict:
        recipe = validate_recipe({"task": "digits", "steps": [{"method": "prune.structured", "params": {"amount": amount}}]},
                                 model, ["digits"])
        run = pipeline.compress(store, model, recipe, f"size-{count[0]:03d}", lambda f, m: None)["run"]
        count[0] += 1
        m, b = run["metrics"], run["baseline"]
        return {"params": {rate["rate"]: amount}, "amount": amount, "size_bytes": m["size_bytes"],
                "speed_ratio": 1.0, "drop": 100 * (b["score"] - m["score"]), "score": m["score"]}

    begun = time.perf_counter()
    grid = [job(a) for a in case["grid"] if a >= rate["low"]]
    grid_s = time.perf_counter() - begun
    fitting = [g for g in grid if excess(spec, g) <= 0]
    grid_best = min(fitting, key=lambda g: g["amount"])
    begun = time.perf_counter()
    line: list[dict] = []
    while len(line) < budget:
        value = next_value(spec, line, rate, 0.002)
        if value is None:
            break
        line.append(job(value))
    search_s = time.perf_counter() - begun
    found = min((t for t in line if excess(spec, t) <= 0), key=lambda t: t["amount"])
    return [f"### digits-cnn under {max_mb * 1000:.1f} KB ({100 * SIZE_SHARE:.0f} % of the file): prune.structured.amount", "",
            "| | trials | mildest amount that fits | its size | its accuracy drop (points) |", "|---|---|---|---|---|",
            f"| grid of {len(grid)} | {len(grid)} ({grid_s:.0f} s) | {grid_best['amount']:.4f} | "
            f"{grid_best['size_bytes'] / 1e3:.1f} KB | {grid_best['drop']:.2f} |",
            f"| search | {len(line)} ({search_s:.0f} s) | {found['amount']:.4f} | {found['size_bytes'] / 1e3:.1f} KB | "
            f"{found['drop']:.2f} |", "",
            "Search trials, in order: " + ", ".join(f"{t['amount']:.4f} ({t['size_bytes'] / 1e3:.1f} KB)" for t in line), ""]


if __name__ == "__main__":
    main()
