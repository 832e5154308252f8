"""prune.structured: what removing whole channels, neurons and heads buys in size and speed, and
what it costs in score, each compressed model timed side by side with its unpruned ONNX original
in the same job (ONNX Runtime, fixed threads, interleaved rounds), as a compress job does.

    .venv/bin/python bench/structured.py [--threads 2] [--seconds 6] [--quick]

Writes bench/out/structured.md. Everything happens in a temporary EXPLORER_HOME.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = [
    # (model, what is removed, params of prune.structured)
    ("digits-cnn-x4", "half the channels and neurons (amount 0.5)", {"amount": 0.5}),
    ("digits-cnn-x4", "the same, ranked by weight norm, not refitted (l2, refit off)",
     {"amount": 0.5, "importance": "l2", "refit": False}),
    ("minilm-l6", "half the heads and FFN neurons (amount 0.5)", {"amount": 0.5}),
    ("minilm-l6", "the same, ranked by weight norm, not refitted (l2, refit off)",
     {"amount": 0.5, "importance": "l2", "refit": False}),
    ("minilm-l6", "milder: a quarter of them (amount 0.25)", {"amount": 0.25}),
    ("minilm-l6", "FFN neurons only, three quarters (target neurons, 0.75)", {"amount": 0.75, "target": "neurons"}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per model and job")
    parser.add_argument("--quick", action="store_true", help="the first row of each model only")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="explorer-structured-"))
    # Read by services.engine.measure when it is imported: set before any engine import.
    os.environ.update(EXPLORER_HOME=str(home), EXPLORER_BENCH_THREADS=str(args.threads),
                      EXPLORER_BENCH_SECONDS=str(args.seconds))
    import torch

    from services.catalog import BUILTIN_MODELS, TASKS
    from services.engine import pipeline
    from services.recipes import validate_recipe
    from storage import ArtifactStore

    torch.set_num_threads(1)  # as the job runner does
    store = ArtifactStore(home)
    first_of_each_model = [r for i, r in enumerate(ROWS) if i == 0 or ROWS[i - 1][0] != r[0]]
    rows = first_of_each_model if args.quick else ROWS
    prepared: dict[str, dict] = {}
    lines = []
    started = time.perf_counter()
    try:
        for model_id, label, params in rows:
            builtin = BUILTIN_MODELS[model_id]
            if model_id not in prepared:
                row = {"id": model_id, "format": "torch", "task": builtin["task"], "status": "new", "artifact": None}
                print(f"preparing {model_id}", flush=True)
                prepared[model_id] = {**row, **pipeline.prepare(store, row, lambda f, m: None)["model_update"]}
            model = prepared[model_id]
            recipe = validate_recipe({"steps": [{"method": "prune.structured", "params": params}]}, model,
                                     [model["task"], "fidelity"])
            print(f"{model_id}: {label}", flush=True)
            begun = time.perf_counter()
            run = pipeline.compress(store, model, recipe, f"run{len(lines)}", lambda f, m: None)["run"]
            m, b = run["metrics"], run["baseline"]
            # Top-1 agreement of one image is 0 or 1: its worst case says nothing; an embedding's worst cosine does.
            embedding = model["card"]["output_kind"] == "embedding"
            fidelity = f"{m['fidelity']:.3f}" + (f" / {m['fidelity_worst']:.3f}" if embedding else "")
            single, batch = (b["latency_ms"]["p50"], m["latency_ms"]["p50"]), (
                b["batch_latency_ms"]["p50"], m["batch_latency_ms"]["p50"])
            lines.append(
                f"| {model_id} | {label} | {b['params']:,} → {m['params']:,} ({m['params'] / b['params']:.0%}) | "
                f"{b['size_bytes'] / 2**20:.2f} → {m['size_bytes'] / 2**20:.2f} | "
                f"{single[0] / single[1]:.2f}× ({single[0]:.2f} → {single[1]:.2f} ms) | "
                f"{batch[0] / batch[1]:.2f}× at {m['batch_latency_ms']['batch']} "
                f"({batch[0]:.1f} → {batch[1]:.1f} ms) | "
                f"{b['score']:.3f} → {m['score']:.3f} | {fidelity} | "
                f"{time.perf_counter() - begun:.0f} s |")
            print(lines[-1], flush=True)
            print("   ", m.get("notes", [""])[0], flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    score_names = ", ".join(f"{TASKS[prepared[k]['task']]['score_name']} ({k})" for k in prepared)
    text = "\n".join([
        "# prune.structured",
        "",
        f"ONNX Runtime {args.threads} threads, {args.seconds:g} s timing budget per model; every ratio is the "
        f"unpruned ONNX model over the pruned one, timed side by side (interleaved rounds) in the same job. "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other work while this ran (load average "
        f"{load:.1f} at the end): the ratios are noisy, the absolute times more so. "
        f"Scores ({score_names}) and fidelity are on each task's scored split; fidelity is top-1 agreement "
        f"with the original (digits) or cosine to the original embedding (MiniLM, mean / worst). "
        f"No recovery training after pruning. Total {time.perf_counter() - started:.0f} s.",
        "",
        "| model | what was removed | parameters | size MB | × faster, batch 1 | × faster, large batch | score | "
        "fidelity (mean / worst) | job |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])
    out = ROOT / "bench" / "out" / "structured.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
