"""What each method does to a model, side by side: one real run per recipe, ratios to the
original measured in the same job.

    .venv/bin/python bench/methods.py [--model digits-cnn]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {
    "prune.magnitude 0.5 (global)": [{"method": "prune.magnitude", "params": {"amount": 0.5}}],
    "prune.magnitude 0.9 (global)": [{"method": "prune.magnitude", "params": {"amount": 0.9}}],
    "quantize.dynamic (default: MatMul + Gather, per-channel)": [{"method": "quantize.dynamic", "params": {}}],
    "quantize.dynamic, per-tensor": [{"method": "quantize.dynamic", "params": {"per_channel": False}}],
    "quantize.dynamic with Conv too": [{"method": "quantize.dynamic",
                                        "params": {"operators": ["MatMul", "Conv"]}}],
    "prune 0.7 → quantize.dynamic": [{"method": "prune.magnitude", "params": {"amount": 0.7}},
                                     {"method": "quantize.dynamic", "params": {}}],
}


# Sentence encoders: pruning hits the linear layers; Gather is the embedding table.
TRANSFORMER_RECIPES = {
    "prune.magnitude 0.3 (global)": [{"method": "prune.magnitude", "params": {"amount": 0.3}}],
    "quantize.dynamic (default: MatMul + Gather, per-channel)": [{"method": "quantize.dynamic", "params": {}}],
    "quantize.dynamic, MatMul only (embedding stays float)": [{"method": "quantize.dynamic",
                                                               "params": {"operators": ["MatMul"]}}],
    "quantize.dynamic, per-tensor": [{"method": "quantize.dynamic", "params": {"per_channel": False}}],
    "prune 0.3 → quantize.dynamic": [{"method": "prune.magnitude", "params": {"amount": 0.3}},
                                     {"method": "quantize.dynamic", "params": {}}],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-cnn")
    args = parser.parse_args()
    from services import api

    home = Path(tempfile.mkdtemp(prefix="explorer-methods-"))
    try:
        db = api.connect(home)
        score_name = api.list_tasks()[api.get_model(db, args.model)["task"]]["score_name"]
        print(f"| recipe ({args.model}) | size | × smaller | × smaller zipped | nonzero params | "
              f"× faster, batch 1 | × faster, large batch | {score_name} Δ points | fidelity |")
        print("|---|---|---|---|---|---|---|---|---|")
        recipes = TRANSFORMER_RECIPES if args.model == "minilm-l6" else RECIPES
        for label, steps in recipes.items():
            submitted = api.submit_compress(db, args.model, {"steps": steps})
            job = api.wait_for_job(db, submitted["job_id"])
            assert job["status"] == "succeeded", job
            run = api.get_run(db, submitted["run_id"])
            m, b = run["metrics"], run["baseline"]
            r = api.ratios(m, b)
            batch_x = b["batch_latency_ms"]["p50"] / m["batch_latency_ms"]["p50"]
            size = f"{m['size_bytes'] / 2**20:.1f} MB" if m["size_bytes"] > 2**20 else f"{m['size_bytes'] / 1024:.1f} KB"
            print(f"| {label} | {size} | {r['size_x_smaller']:.2f} | "
                  f"{r['zipped_x_smaller']:.2f} | {m['nonzero_params']:,} of {m['params']:,} | "
                  f"{r['latency_x_faster']:.2f} | {batch_x:.2f} | {100 * r['score_delta']:+.2f} | "
                  f"{m['fidelity']:.3f} (worst {m.get('fidelity_worst', m['fidelity']):.3f}) |")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
