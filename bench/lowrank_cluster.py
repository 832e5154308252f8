"""lowrank.svd and share.cluster side by side on digits-cnn-x4 and minilm-l6: one real compress job
per setting (pipeline.compress, in process), each timed against the fp32 original in the same job
(ONNX Runtime, fixed threads, interleaved rounds), scored on the task's held-out split.

    .venv/bin/python bench/lowrank_cluster.py [--models digits-cnn-x4 minilm-l6] [--seconds 2] [--only cluster]

Writes bench/out/lowrank_cluster.md. Also times session creation (load) for the original and the
clustered file, since the clustered one rebuilds its float weights while ONNX Runtime loads it.
"weights only" rows switch off lowrank.svd's calibration (plain truncated SVD of the weights).
"graph ORT runs" compares the operators ONNX Runtime runs after its load-time optimizations with
the original's: the clustered files' Cast -> Gather of the weights must be folded away there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "lowrank rank_ratio 0.5": ("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.5}),
    "lowrank rank_ratio 0.5, weights only": ("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.5,
                                                             "calibrate": False}),
    "lowrank rank_ratio 0.25": ("lowrank.svd", {"mode": "rank_ratio", "rank_ratio": 0.25}),
    "lowrank energy 0.9 (default)": ("lowrank.svd", {"mode": "energy", "energy": 0.9}),
    "lowrank energy 0.9, weights only": ("lowrank.svd", {"mode": "energy", "energy": 0.9, "calibrate": False}),
    "lowrank energy 0.99": ("lowrank.svd", {"mode": "energy", "energy": 0.99}),
    "cluster 16": ("share.cluster", {"clusters": 16}),
    "cluster 32": ("share.cluster", {"clusters": 32}),
    "cluster 64 (default)": ("share.cluster", {"clusters": 64}),
    "cluster 255": ("share.cluster", {"clusters": 255}),
}


def _load_seconds(path: Path, repeats: int = 3) -> float:
    import onnxruntime as ort

    best = float("inf")
    for _ in range(repeats):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        started = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        best = min(best, time.perf_counter() - started)
    return best


def _ops_after_load(path: Path, scratch: Path) -> Counter:
    """Operator counts of the graph ONNX Runtime runs, after its load-time optimizations (constant
    folding rebuilds a clustered layer's float weight there)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(scratch / "optimized.onnx"), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def _difference(ops: Counter, baseline: Counter) -> str:
    if ops == baseline:
        return "same as fp32"
    changes = {op: ops[op] - baseline[op] for op in sorted(set(ops) | set(baseline)) if ops[op] != baseline[op]}
    return ", ".join(f"{count:+d} {op}" for op, count in changes.items())


def _mb(count: int) -> str:
    return f"{count / 2**20:.2f}" if count >= 2**20 else f"{count / 2**20:.3f}"


def bench_model(model_id: str, home: Path, lines: list[str], only: str = "") -> None:
    from services.catalog import BUILTIN_MODELS
    from services.engine import pipeline
    from services.errors import UserError
    from services.recipes import validate_recipe
    from storage import ArtifactStore

    store = ArtifactStore(home / model_id)
    task = BUILTIN_MODELS[model_id]["task"]
    model = {"id": model_id, "format": "torch", "task": task, "status": "new", "artifact": None}
    print(f"preparing {model_id} ...", flush=True)
    model = {**model, **pipeline.prepare(store, model, lambda f, m: None)["model_update"]}
    baseline_file = store.resolve(model["artifact"])
    card = model["card"]
    baseline_ops = _ops_after_load(baseline_file, home)
    lines += [f"\n### {model_id} (task {task}, score = {card['score_name']})\n",
              "| setting | params | size MB | zipped MB | × faster, batch 1 | × faster, batch N | load s | "
              f"graph ORT runs | {card['score_name']} | fidelity mean / worst |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| fp32 original | {card['params']:,} | {_mb(card['size_bytes'])} | {_mb(card['zipped_bytes'])} | 1 | 1 "
              f"| {_load_seconds(baseline_file):.3f} | {sum(baseline_ops.values())} nodes | {card['score']:.3f} "
              f"| 1 / 1 |"]
    notes = []
    for index, (label, (method, params)) in enumerate(SETTINGS.items()):
        if only not in label:
            continue
        print(f"  {label} ...", flush=True)
        recipe = validate_recipe({"steps": [{"method": method, "params": params}]}, model, [task, "fidelity"])
        try:
            run = pipeline.compress(store, model, recipe, f"run{index}", lambda f, m: None)["run"]
        except UserError as refused:
            lines.append(f"| {label} | refused: {refused} | | | | | | | | |")
            continue
        m, b = run["metrics"], run["baseline"]
        single = b["latency_ms"]["p50"] / m["latency_ms"]["p50"]
        batch = b["batch_latency_ms"]["p50"] / m["batch_latency_ms"]["p50"]
        result_file = store.resolve(run["artifact"])
        lines.append(
            f"| {label} | {m['params']:,} | {_mb(m['size_bytes'])} | {_mb(m['zipped_bytes'])} | {single:.2f} | "
            f"{batch:.2f} (N={m['batch_latency_ms']['batch']}) | {_load_seconds(result_file):.3f} | "
            f"{_difference(_ops_after_load(result_file, home), baseline_ops)} | "
            f"{m['score']:.3f} ({100 * (m['score'] - b['score']):+.1f} pts) | "
            f"{m['fidelity']:.4f} / {m['fidelity_worst']:.4f} |")
        notes += [f"- {label}: {note}" for note in m.get("notes", [])]
    lines += ["", "Notes the runs reported:", "", *notes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["digits-cnn-x4", "minilm-l6"])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per model and job")
    parser.add_argument("--only", default="", help="run only the settings whose label contains this text")
    args = parser.parse_args()
    os.environ["EXPLORER_BENCH_SECONDS"] = str(args.seconds)  # read when measure is imported
    from services.engine import measure

    home = Path(tempfile.mkdtemp(prefix="explorer-lowrank-cluster-"))
    lines = ["# lowrank.svd and share.cluster",
             "",
             f"One compress job per row; latency ratios are the original's p50 over the result's p50, timed "
             f"side by side in the same job with ONNX Runtime ({measure.BENCH_THREADS} thread, "
             f"{args.seconds:g} s budget per model). 'load s' is the best of 3 ONNX Runtime session creations; "
             f"'graph ORT runs' is the operator count difference after ONNX Runtime's load-time optimizations. "
             f"Machine: shared, 2 cores, other jobs running: ratios are noisy (±10-20%).",
             ]
    started = time.perf_counter()
    try:
        for model_id in args.models:
            bench_model(model_id, home, lines, args.only)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    lines.append(f"\nBench took {time.perf_counter() - started:.0f} s.")
    out = ROOT / "bench" / "out" / "lowrank_cluster.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
