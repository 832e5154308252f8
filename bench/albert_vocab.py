"""ALBERT-style sharing and vocabulary trimming on minilm-l6, side by side: one real compress job
per recipe (pipeline.compress in a temporary EXPLORER_HOME), each timed against the original in
the same job, then the int8 candidates timed together in one final round.

    .venv/bin/python bench/albert_vocab.py        # writes bench/out/albert_vocab.md (about 15 minutes)
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "new", "artifact": None}
QUANTIZE = {"method": "quantize.dynamic", "params": {"per_channel": True}}
RECIPES = {
    "quantize.dynamic (per-channel, the default)": [QUANTIZE],
    "share.embedding E=64": [{"method": "share.embedding", "params": {"E": 64}}],
    "share.embedding E=128": [{"method": "share.embedding", "params": {"E": 128}}],
    "share.embedding E=256": [{"method": "share.embedding", "params": {"E": 256}}],
    "share.embedding E=256, plain SVD (weight_by_use off)": [
        {"method": "share.embedding", "params": {"E": 256, "weight_by_use": False}}],
    "share.layers groups of 2, init first": [{"method": "share.layers", "params": {"group_size": 2, "init": "first"}}],
    "share.layers groups of 2, init average": [
        {"method": "share.layers", "params": {"group_size": 2, "init": "average"}}],
    "share.layers groups of 3, init first": [{"method": "share.layers", "params": {"group_size": 3, "init": "first"}}],
    "share.layers groups of 3, init average": [
        {"method": "share.layers", "params": {"group_size": 3, "init": "average"}}],
    "share.layers groups of 2 → quantize.dynamic": [{"method": "share.layers", "params": {"group_size": 2}}, QUANTIZE],
    "vocab.trim unseen=nearest": [{"method": "vocab.trim", "params": {"unseen": "nearest"}}],
    "vocab.trim unseen=pieces (keep_pieces)": [{"method": "vocab.trim", "params": {"unseen": "pieces"}}],
    "vocab.trim unseen=unknown (no pieces)": [{"method": "vocab.trim", "params": {"unseen": "unknown"}}],
    "vocab.trim nearest → quantize.dynamic": [{"method": "vocab.trim", "params": {"unseen": "nearest"}}, QUANTIZE],
    "vocab.trim pieces → quantize.dynamic": [{"method": "vocab.trim", "params": {"unseen": "pieces"}}, QUANTIZE],
    # Under 8 MB needs fewer layers: sharing gets there in size, but only distillation can bring fidelity back.
    "vocab.trim nearest → share.layers 2 → quantize.dynamic": [
        {"method": "vocab.trim", "params": {"unseen": "nearest"}}, {"method": "share.layers", "params": {"group_size": 2}},
        QUANTIZE],
}
# Timed together at the end, with the original: the candidates for "≤ 23 MB, no slower than quantize_dynamic".
FINAL_ROUND = ["quantize.dynamic (per-channel, the default)", "vocab.trim nearest → quantize.dynamic",
               "vocab.trim pieces → quantize.dynamic"]

FINDINGS = """## Reading it

- share.embedding: the SVD is weighted by how often the fitting paragraphs use each token; plain SVD treats
  30,000 rare tokens like the common ones and loses the common words (compare the two E=256 rows).
- share.layers: the file shrinks by the layers removed (the ONNX file stores a shared layer once), latency
  does not change (every layer still runs), and without retraining the output is far from the original
  whatever the grouping; "first" keeps more than "average". Recover with distillation.
- vocab.trim: the mean stays high but the worst held-out paragraph drops to about 0.6 whichever way unseen
  tokens are handled: spelling an unseen word in single characters ("pieces") is about as damaging as [UNK]
  for this model; "nearest" (same splits, the most similar kept vector) lifts the mean.
- Batch-1 ratios in the first table vary by up to ±50% between runs on this shared machine; the second
  table times the int8 candidates in one interleaved round and is the one to compare speed with.
"""


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="explorer-albert-"))
    os.environ["EXPLORER_HOME"] = str(home)
    from services.engine import measure, pipeline, tasks
    from services.engine.families import minilm
    from services.recipes import validate_recipe
    from storage import ArtifactStore

    started = time.perf_counter()
    rows, runs = [], {}
    try:
        store = ArtifactStore(home)
        model = {**MODEL, **pipeline.prepare(store, MODEL, lambda f, m: None)["model_update"]}
        for index, (label, steps) in enumerate(RECIPES.items()):
            recipe = validate_recipe({"steps": steps}, model, ["pydoc-retrieval"])
            begun = time.perf_counter()
            run = pipeline.compress(store, model, recipe, f"run{index}", lambda f, m: None)["run"]
            m, b = run["metrics"], run["baseline"]
            runs[label] = run
            rows.append(
                f"| {label} | {m['size_bytes'] / 1e6:.1f} | {m['params']:,} | "
                f"{b['latency_ms']['p50'] / m['latency_ms']['p50']:.2f} | "
                f"{b['batch_latency_ms']['p50'] / m['batch_latency_ms']['p50']:.2f} | "
                f"{m['score']:.3f} ({100 * (m['score'] - b['score']):+.1f}) | {m['fidelity']:.4f} | "
                f"{m['fidelity_worst']:.4f} |")
            print(rows[-1], f"[{time.perf_counter() - begun:.0f} s]", flush=True)
            for note in m.get("notes", []):
                print("   ", note, flush=True)
        baseline = runs[FINAL_ROUND[0]]["baseline"]

        # The int8 candidates and the original, timed in one interleaved round.
        evaluation = tasks.eval_set("pydoc-retrieval", "minilm-l6")
        paths = [store.resolve(model["artifact"])] + [store.resolve(runs[label]["artifact"]) for label in FINAL_ROUND]
        evaluations = [evaluation]
        for label in FINAL_ROUND:
            tokenizer = runs[label]["metrics"].get("files", {}).get("tokenizer")
            inputs = minilm.encode(evaluation.extra["texts"], store.home / tokenizer) if tokenizer else evaluation.inputs
            evaluations.append(type(evaluation)(inputs=inputs, labels=None, latency_batch=evaluation.latency_batch,
                                                extra=evaluation.extra))
        timed = measure.measure_latency(paths, evaluations)
        final_rows = [f"| {label} | {runs[label]['metrics']['size_bytes'] / 1e6:.1f} | {t['latency_ms']['p50']:.2f} | "
                      f"{t['batch_latency_ms']['p50']:.1f} | {runs[label]['metrics']['fidelity']:.4f} | "
                      f"{runs[label]['metrics']['fidelity_worst']:.4f} |"
                      for label, t in zip(FINAL_ROUND, timed[1:])]
        original = timed[0]
    finally:
        shutil.rmtree(home, ignore_errors=True)

    out = ROOT / "bench" / "out" / "albert_vocab.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        "# ALBERT-style sharing and vocabulary trimming on minilm-l6",
        "",
        f"One compress job per recipe (pipeline.compress), scored on the 512 pydoc-retrieval paragraphs (never seen "
        f"by vocab.trim or share.embedding, which count tokens on the 765 fitting paragraphs). Original: "
        f"{baseline['size_bytes'] / 1e6:.1f} MB, {baseline['params']:,} parameters, recall@1 {baseline['score']:.3f}. "
        f"Latency ratios are original / compressed (>1 = faster), each measured side by side with the original in "
        f"its own job, ONNX Runtime with {measure.BENCH_THREADS} thread, on a 2-core machine shared with other work "
        f"(noisy: differences under ~10% are noise). Fidelity = cosine to the original's embedding, mean and worst "
        f"paragraph. No retraining anywhere. Total {time.perf_counter() - started:.0f} s.",
        "",
        "| recipe | size MB | params | × faster, batch 1 | × faster, batch 32 | recall@1 (Δ points) | fidelity mean "
        "| fidelity worst |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## The int8 candidates, timed together in one round",
        "",
        f"Original in the same round: batch 1 {original['latency_ms']['p50']:.2f} ms, batch 32 "
        f"{original['batch_latency_ms']['p50']:.1f} ms (p50).",
        "",
        "| recipe | size MB | batch 1 ms | batch 32 ms | fidelity mean | fidelity worst |",
        "|---|---|---|---|---|---|",
        *final_rows,
        "",
        FINDINGS,
    ]), encoding="utf-8")
    print(out.read_text())


if __name__ == "__main__":
    main()
