"""Training-only helpers (Look-into-Object) and momentum contrast as recovery, measured in ONE run
(issue 8 evidence, parts 1 and 2b).

digits-cnn at 90 % unstructured sparsity (prune.magnitude 0.9, global), recovered with each objective
with and without `recovery.aux: [spatial-context, object-extent]`, over several seeds; then the exported
models of one seed timed side by side (interleaved rounds, ONNX Runtime, fixed threads) so that size and
latency can be compared: the helpers must cost nothing at inference. Momentum contrast (MoCo) is a row
beside the other objectives.

    .venv/bin/python bench/aux_helpers.py [--seeds 0 1 2] [--steps 100 300] [--threads 1] [--seconds 6]

Prints the tables and writes bench/out/aux_helpers.md.
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

HELPERS = ["spatial-context", "object-extent"]
OBJECTIVES = ("supervised", "distill", "momentum-contrast")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per model")
    args = parser.parse_args()
    os.environ["EXPLORER_BENCH_THREADS"] = str(args.threads)  # ONNX Runtime threads of the timing
    os.environ["EXPLORER_BENCH_SECONDS"] = "0.5"  # the jobs' own timing is not what this bench compares
    import torch

    torch.set_num_threads(args.threads)
    from recovery import SPARSE, Bench

    from services.engine import measure, tasks

    home = Path(tempfile.mkdtemp(prefix="aux-bench-"))
    began = time.perf_counter()
    try:
        bench = Bench(home)
        rows = {}
        for steps in args.steps:
            for objective in OBJECTIVES:
                for helpers in ([], HELPERS):
                    for seed in args.seeds:
                        plan = {"objective": objective, "steps": steps, "seed": seed, "aux": helpers}
                        label = f"{objective}{' + helpers' if helpers else ''}, {steps} steps, seed {seed}"
                        rows[(steps, objective, bool(helpers), seed)] = bench.job("digits-cnn", [SPARSE], plan, label)
        none = bench.job("digits-cnn", [SPARSE], {"objective": "none"}, "no recovery")
        original = none["baseline"]["score"]

        lines = [f"digits-cnn, 90 % of its weights pruned (no recovery: {none['metrics']['score']:.4f}, original "
                 f"{original:.4f}); accuracy on the 540 test digits, mean ± spread over seeds {args.seeds}.", "",
                 "| recovery | steps | accuracy without helpers | with spatial-context + object-extent | difference |",
                 "|---|---|---|---|---|"]
        spread = (lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0.0)
        for steps in args.steps:
            for objective in OBJECTIVES:
                plain = [rows[(steps, objective, False, s)]["metrics"]["score"] for s in args.seeds]
                helped = [rows[(steps, objective, True, s)]["metrics"]["score"] for s in args.seeds]
                lines.append(f"| {objective} | {steps} | {statistics.mean(plain):.4f} ± {spread(plain):.4f} | "
                             f"{statistics.mean(helped):.4f} ± {spread(helped):.4f} | "
                             f"{statistics.mean(helped) - statistics.mean(plain):+.4f} |")

        # size and latency of the two exports of one seed, timed side by side
        seed, steps = args.seeds[0], args.steps[-1]
        pairs = []
        for objective in OBJECTIVES:
            plain, helped = rows[(steps, objective, False, seed)], rows[(steps, objective, True, seed)]
            pairs.append((objective, plain, helped, [plain["artifact"], helped["artifact"]]))
        # the noise floor: one export against a copy of itself, timed in the same rounds
        first = pairs[0][1]
        twin = home / "same-file-twice.onnx"
        shutil.copyfile(first["artifact"], twin)
        pairs.append(("(noise floor: the same file twice)", first, first, [first["artifact"], twin]))
        evaluation = tasks.eval_set("digits", "digits-cnn")
        every = [path for _, _, _, paths in pairs for path in paths]
        timed = measure.measure_latency(every, evaluation, seconds=args.seconds)
        lines += ["", f"Exports of seed {seed} after {steps} steps, timed side by side (ONNX Runtime, "
                      f"{args.threads} thread(s), interleaved rounds):", "",
                  "| recovery | bytes without / with helpers | parameters without / with | batch-1 p50 ratio "
                  "(with / without) | batch-256 p50 ratio |", "|---|---|---|---|---|"]
        for index, (objective, plain, helped, _) in enumerate(pairs):
            a, b = timed[2 * index], timed[2 * index + 1]
            lines.append(f"| {objective} | {plain['metrics']['size_bytes']:,} / {helped['metrics']['size_bytes']:,} | "
                         f"{plain['metrics']['params']:,} / {helped['metrics']['params']:,} | "
                         f"{b['latency_ms']['p50'] / a['latency_ms']['p50']:.3f} | "
                         f"{b['batch_latency_ms']['p50'] / a['batch_latency_ms']['p50']:.3f} |")
        lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} cores; {time.perf_counter() - began:.0f} s."]
        text = "\n".join(lines)
        print(text)
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "aux_helpers.md").write_text(text + "\n")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
