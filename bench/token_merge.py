"""sequence.pool on minilm-l6 (Token Merging, no training), in ONE run: every rate side by side.

For each rate (and merge point), the real all-MiniLM-L6-v2 is exported to ONNX with its tokens
merged, then scored as a compress job scores it: fidelity (cosine of each held-out paragraph's
embedding with the original's, mean and worst) and pydoc-retrieval (recall@1 among 256). All the
files are then timed together by ONNX Runtime in interleaved rounds (1 thread, as jobs time), at
batch 1 and batch 32, 64 tokens, and reported as ratios to rate 1.

    .venv/bin/python bench/token_merge.py [--seconds 6]

Writes bench/out/token_merge.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [(1.0, 1), (1.5, 1), (2.0, 1), (3.0, 1), (4.0, 1), (6.0, 1), (8.0, 1), (2.0, 2), (4.0, 2), (4.0, 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per file")
    args = parser.parse_args()

    import torch

    from services.engine import measure, tasks
    from services.engine.export import export_onnx
    from services.engine.families.minilm import MAX_TOKENS, MiniLMAdapter
    from services.engine.families.token_merge import schedule, work_share

    torch.set_num_threads(1)
    adapter = MiniLMAdapter()
    net = adapter.create(lambda fraction, message: None)
    layers = len(net.bert.encoder.layer)
    sets = {task: tasks.eval_set(task, "minilm-l6") for task in ("fidelity", "pydoc-retrieval")}
    scratch = Path(tempfile.mkdtemp(prefix="token-merge-"))
    rows, paths, references = [], [], {}
    for rate, merge_after in SETTINGS:
        net.merge_rate, net.merge_after = rate, merge_after
        path = export_onnx(net, adapter, scratch / f"rate-{rate:g}-after-{merge_after}.onnx")
        paths.append(path)
        row = {"rate": rate, "merge_after": merge_after, "tokens": schedule(MAX_TOKENS, layers, rate, merge_after),
               "work": work_share(MAX_TOKENS, layers, rate, merge_after)}
        for task, evaluation in sets.items():
            outputs = measure.run_outputs(measure.fresh_session(path), evaluation)
            references.setdefault(task, outputs)  # rate 1 is the original
            scored = tasks.score(task, "minilm-l6", "embedding", evaluation, outputs, references[task])
            if task == "fidelity":
                row["fidelity"], row["fidelity_worst"] = scored["fidelity"], scored["fidelity_worst"]
            else:
                row["recall@1"], row["mrr"] = scored["score"], scored["mrr"]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    timings = measure.measure_latency(paths, sets["fidelity"], seconds=args.seconds)
    for row, timing in zip(rows, timings):
        row["latency_b1_ms"] = timing["latency_ms"]["p50"]
        row["latency_b32_ms"] = timing["batch_latency_ms"]["p50"]
    base = rows[0]
    lines = ["| rate | merging after layer | tokens per layer | token-layers | fidelity mean / worst | recall@1 (MRR) "
             "| faster at batch 1 | faster at batch 32 |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['rate']:g} | {row['merge_after']} | {', '.join(map(str, row['tokens']))} | {row['work']:.0%} "
            f"| {row['fidelity']:.4f} / {row['fidelity_worst']:.3f} | {row['recall@1']:.3f} ({row['mrr']:.3f}) "
            f"| {base['latency_b1_ms'] / row['latency_b1_ms']:.2f}x | {base['latency_b32_ms'] / row['latency_b32_ms']:.2f}x |")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "token_merge.md").write_text(
        "sequence.pool on minilm-l6: Token Merging without training; ONNX Runtime, 1 thread, 64 tokens, all files "
        "timed together.\n\n" + "\n".join(lines) + "\n")
    (out / "token_merge.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
