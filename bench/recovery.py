"""Recovery training after compression (issue 5 evidence, part 1): what each recovery objective wins
back, measured with real compress jobs in ONE run.

1. `digits` / `minilm`: 90% unstructured sparsity (prune.magnitude 0.9, global) with recovery none /
   supervised / distill / contrastive (CAP) / masked, then iterative pruning (rounds 3) with distill and
   with contrastive (CAP's snapshot contrast).
2. `structured`: MiniLM with half its heads and FFN neurons removed (prune.structured 0.5), no recovery
   against distill recovery (issue 4's target: mean fidelity >= 0.95), with the job's own side-by-side
   latency against the fp32 original.
3. `large`: "train large, then compress": digits-cnn-x4 brought down to about digits-cnn's parameter
   count, against digits-cnn compressed lightly.

    .venv/bin/python bench/recovery.py [--only digits|minilm|structured|large] [--threads 2]
        [--digits-steps 300] [--minilm-steps 100] [--minilm-round-steps 34] [--structured-steps 300[,600]]
        [--probe-lr 5e-4 (0: no extra learning-rate rows)] [--write]

Prints the tables and writes them to bench/out/recovery.md (with --only, only with --write). Everything
happens in a temporary EXPLORER_HOME that is removed at the end.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("digits", "minilm", "structured", "large")
SPARSE = {"method": "prune.magnitude", "params": {"amount": 0.9, "scope": "global"}}
X1_PARAMS = 21_546  # digits-cnn (checked again after preparing)
# CAP (Xu et al., "From Dense to Sparse: Contrastive Pruning"): BERT-base on QQP keeps 99.2% of its score at 97% sparsity.
CAP_RETAINED = 99.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="one part, or several comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per model in part 2 "
                        "(the other parts report no latency and time briefly)")
    parser.add_argument("--digits-steps", type=int, default=300)
    # MiniLM trains at about 2.5 s a step on the shared 2 cores: 300 steps would be 12 minutes per
    # recovery and the whole run over an hour, so part 1 uses 100 (rounds: 3 x 34) and part 2 300.
    parser.add_argument("--minilm-steps", type=int, default=100)
    parser.add_argument("--minilm-round-steps", type=int, default=34,
                        help="MiniLM steps per round with rounds 3 (3 x 34: about the single-round budget)")
    parser.add_argument("--structured-steps", default="300", help="distill steps to try in part 2 (comma-separated)")
    parser.add_argument("--probe-lr", type=float, default=5e-4,
                        help="MiniLM: one more distill row in parts 1 and 2 at this learning rate (0: none), to "
                             "see whether the text default 5e-5 is what limits a short recovery")
    parser.add_argument("--large-amount", type=float, default=0.75,
                        help="prune.structured amount for digits-cnn-x4 (0.75: a quarter of the channels, "
                             "x4 at x1's width)")
    parser.add_argument("--write", action="store_true", help="with --only: write bench/out/recovery.md anyway")
    args = parser.parse_args()
    args.parts = [p for p in args.only.split(",") if p] or list(PARTS)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part {sorted(unknown)[0]!r}; choose from {', '.join(PARTS)}")
    return args


def recovery(objective: str, steps: int, rounds: int = 1, lr: float = 0.0) -> dict:
    if objective == "none":
        return {"objective": "none"}
    return {"objective": objective, "steps": steps, "unfreeze": "all", "rounds": rounds, "lr": lr,
            "batch_size": 32, "seed": 0}


class Bench:
    """Prepares built-in models once and runs compress jobs on them in one temporary home."""

    def __init__(self, home: Path):
        from storage import ArtifactStore

        self.store = ArtifactStore(home)
        self.models: dict[str, dict] = {}
        self.count = 0

    def model(self, model_id: str) -> dict:
        from services.catalog import BUILTIN_MODELS
        from services.engine import pipeline

        if model_id not in self.models:
            builtin = BUILTIN_MODELS[model_id]
            row = {"id": model_id, "format": "torch", "task": builtin["task"], "status": "new", "artifact": None}
            begun = time.perf_counter()
            print(f"preparing {model_id}", flush=True)
            self.models[model_id] = {**row, **pipeline.prepare(self.store, row, lambda f, m: None)["model_update"]}
            print(f"  prepared in {time.perf_counter() - begun:.0f} s", flush=True)
        return self.models[model_id]

    def job(self, model_id: str, steps: list[dict], plan: dict, label: str) -> dict:
        """One compress job; a refused or failed recipe is a row too (with its error)."""
        from services.engine import pipeline
        from services.recipes import validate_recipe

        model = self.model(model_id)
        self.count += 1
        print(f"[{time.strftime('%H:%M:%S')}] {model_id}: {label}", flush=True)
        begun = time.perf_counter()
        try:
            recipe = validate_recipe({"steps": steps, "recovery": plan}, model, [model["task"], "fidelity"])
            run = pipeline.compress(self.store, model, recipe, f"run{self.count:03d}", lambda f, m: None)["run"]
        except Exception as error:  # noqa: BLE001 - reported in the table, with the traceback printed here
            traceback.print_exc()
            return {"label": label, "error": f"{type(error).__name__}: {error}", "job_s": time.perf_counter() - begun}
        notes = run["metrics"].get("notes", [])
        # the recovery notes say "N steps (S s)" and "loss a → b" for every round
        recovery_s = sum(int(s) for note in notes for s in re.findall(r"steps \((\d+) s\)", note))
        losses = [f"{a}→{b}" for note in notes for a, b in re.findall(r"loss (\d[\d.e+-]*\d) → (\d[\d.e+-]*\d)", note)]
        row = {"label": label, "metrics": run["metrics"], "baseline": run["baseline"], "notes": notes,
               "artifact": self.store.home / run["artifact"],
               "recovery_s": recovery_s, "losses": losses, "job_s": time.perf_counter() - begun}
        m = run["metrics"]
        print(f"  score {m['score']:.4f} (original {run['baseline']['score']:.4f}), fidelity {m['fidelity']:.4f} "
              f"/ {m['fidelity_worst']:.4f}, params {m['params']:,} nonzero {m['nonzero_params']:,}, "
              f"recovery {recovery_s} s, job {row['job_s']:.0f} s, loss {' ; '.join(losses) or '—'}", flush=True)
        return row


# ---- part 1: 90% sparsity, every objective ---------------------------------------------------------------

def part_sparse(bench: Bench, model_id: str, steps: int, round_steps: int, labelled: bool,
                probe_lr: float = 0.0) -> tuple[str, float]:
    begun = time.perf_counter()
    rows = []
    for objective in ("none", "supervised", "distill", "contrastive", "masked"):
        if objective == "supervised" and not labelled:
            rows.append({"label": "supervised", "skip": "not offered: no labels"})
            continue
        label = objective if objective == "none" else f"{objective}, {steps} steps"
        rows.append(bench.job(model_id, [SPARSE], recovery(objective, steps), label))
    for objective in ("distill", "contrastive"):
        rows.append(bench.job(model_id, [SPARSE], recovery(objective, round_steps, rounds=3),
                              f"{objective}, rounds 3 × {round_steps} steps (iterative pruning"
                              + (", CAP snapshot contrast)" if objective == "contrastive" else ")")))
    if probe_lr:
        rows.append(bench.job(model_id, [SPARSE], recovery("distill", steps, lr=probe_lr),
                              f"distill, {steps} steps, lr {probe_lr:g}"))
    embedding = bench.model(model_id)["card"]["output_kind"] == "embedding"
    header = ("| recovery | score | score retained | fidelity mean | fidelity worst | nonzero params | "
              "recovery s | job s | loss first → last tenth |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    original = next((r["baseline"] for r in rows if "baseline" in r), None)
    if original:
        lines.append(f"| original (dense) | {original['score']:.4f} | 100% | 1.0000 | {'1.0000' if embedding else '—'} "
                     f"| {original['nonzero_params']:,} | — | — | — |")
    for row in rows:
        if "skip" in row:
            lines.append(f"| {row['label']} | {row['skip']} ||||||||")
        elif "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error'][:200]} ||||||| {row['job_s']:.0f} |")
        else:
            m, b = row["metrics"], row["baseline"]
            worst = f"{m['fidelity_worst']:.4f}" if embedding else "—"
            lines.append(f"| {row['label']} | {m['score']:.4f} | {m['score'] / b['score']:.1%} | {m['fidelity']:.4f} | "
                         f"{worst} | {m['nonzero_params']:,} | {row['recovery_s'] or '—'} | {row['job_s']:.0f} | "
                         f"{'; '.join(row['losses']) or '—'} |")
    return "\n".join(lines), time.perf_counter() - begun


# ---- part 2: MiniLM, half its heads and FFN neurons -------------------------------------------------------

def part_structured(bench: Bench, step_counts: list[int], probe_lr: float = 0.0) -> tuple[str, float]:
    begun = time.perf_counter()
    prune = [{"method": "prune.structured", "params": {"amount": 0.5}}]
    rows = [bench.job("minilm-l6", prune, recovery("none", 0), "none")]
    rows += [bench.job("minilm-l6", prune, recovery("distill", n), f"distill, {n} steps") for n in step_counts]
    if probe_lr:
        rows.append(bench.job("minilm-l6", prune, recovery("distill", step_counts[0], lr=probe_lr),
                              f"distill, {step_counts[0]} steps, lr {probe_lr:g}"))
    lines = ["| recovery | params | size MB | fidelity mean | fidelity worst | recall@1 | × faster b1 (ms) | "
             "× faster b32 (ms) | recovery s | job s |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r["baseline"] for r in rows if "baseline" in r), None)
    if base:
        lines.append(f"| original fp32 | {base['params']:,} | {base['size_bytes'] / 1e6:.1f} | 1.0000 | 1.0000 | "
                     f"{base['score']:.4f} | 1.00 | 1.00 | — | — |")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error'][:200]} ||||||||| ")
            continue
        m, b = row["metrics"], row["baseline"]
        one = (b["latency_ms"]["p50"], m["latency_ms"]["p50"])
        many = (b["batch_latency_ms"]["p50"], m["batch_latency_ms"]["p50"])
        target = " ✓" if m["fidelity"] >= 0.95 else ""
        lines.append(f"| {row['label']} | {m['params']:,} | {m['size_bytes'] / 1e6:.1f} | {m['fidelity']:.4f}{target} | "
                     f"{m['fidelity_worst']:.4f} | {m['score']:.4f} | {one[0] / one[1]:.2f} ({one[0]:.1f} → "
                     f"{one[1]:.1f}) | {many[0] / many[1]:.2f} ({many[0]:.0f} → {many[1]:.0f}) | "
                     f"{row['recovery_s'] or '—'} | {row['job_s']:.0f} |")
    return "\n".join(lines), time.perf_counter() - begun


# ---- part 3: train large, then compress ----------------------------------------------------------------

def part_large(bench: Bench, steps: int, amount: float) -> tuple[str, float]:
    begun = time.perf_counter()
    distill = recovery("distill", steps)
    rows = [
        ("digits-cnn-x4", bench.job("digits-cnn-x4", [{"method": "prune.structured", "params": {"amount": amount}}],
                                    recovery("none", 0), f"prune.structured {amount:g}, no recovery")),
        ("digits-cnn-x4", bench.job("digits-cnn-x4", [{"method": "prune.structured", "params": {"amount": amount}}],
                                    distill, f"prune.structured {amount:g} + distill {steps} steps")),
        ("digits-cnn-x4", bench.job("digits-cnn-x4", [{"method": "distill.student",
                                                       "params": {"width": 0.25, "steps": steps}}],
                                    recovery("none", 0), f"distill.student width 0.25, {steps} steps")),
        ("digits-cnn", bench.job("digits-cnn", [{"method": "prune.structured", "params": {"amount": 0.2}}],
                                 distill, f"prune.structured 0.2 + distill {steps} steps")),
        ("digits-cnn", bench.job("digits-cnn", [{"method": "quantize.dynamic", "params": {}}],
                                 recovery("none", 0), "quantize.dynamic only")),
    ]
    lines = ["| model | compression | params | size KB | accuracy | fidelity (top-1 agreement) | job s |",
             "|---|---|---|---|---|---|---|"]
    originals = {}
    for model_id, row in rows:
        if "baseline" in row and model_id not in originals:
            originals[model_id] = row["baseline"]
    for model_id in ("digits-cnn-x4", "digits-cnn"):
        if model_id in originals:
            b = originals[model_id]
            lines.append(f"| {model_id} | none (original fp32) | {b['params']:,} | {b['size_bytes'] / 1e3:.1f} | "
                         f"{b['score']:.4f} | 1.0000 | — |")
    for model_id, row in rows:
        if "error" in row:
            lines.append(f"| {model_id} | {row['label']}: failed: {row['error'][:200]} ||||| {row['job_s']:.0f} |")
            continue
        m = row["metrics"]
        lines.append(f"| {model_id} | {row['label']} | {m['params']:,} | {m['size_bytes'] / 1e3:.1f} | "
                     f"{m['score']:.4f} | {m['fidelity']:.4f} | {row['job_s']:.0f} |")
    return "\n".join(lines), time.perf_counter() - begun


def main() -> None:
    args = parse_args()
    home = Path(tempfile.mkdtemp(prefix="explorer-recovery-"))
    # Read by services.engine.measure when it is imported: set before any engine import.
    os.environ.update(EXPLORER_HOME=str(home), EXPLORER_BENCH_THREADS=str(args.threads),
                      EXPLORER_BENCH_SECONDS="1", OMP_NUM_THREADS=str(args.threads))
    # Why passive: with 2 torch threads on 2 cores that other processes also use, OpenMP's spinning
    # workers wait for a descheduled partner at every op; a digits recovery of 300 steps took 176 s
    # instead of 9 s, MiniLM's steps 10.6 s instead of 1.9 s. Read when torch loads its OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from services.engine import measure

    torch.set_num_threads(args.threads)
    bench = Bench(home)
    started = time.perf_counter()
    sections = []
    try:
        if "digits" in args.parts:
            table, seconds = part_sparse(bench, "digits-cnn", args.digits_steps, args.digits_steps, labelled=True)
            sections.append((f"## 1a. digits-cnn, 90% unstructured sparsity (prune.magnitude 0.9, global) — "
                             f"{seconds:.0f} s",
                             f"Score: accuracy on the scored digits images; fidelity: top-1 agreement with the "
                             f"original (a per-image worst case is 0 or 1, so none is shown). Recovery: "
                             f"{args.digits_steps} steps of batch 32 at lr 1e-3 (the CNN default), every layer "
                             f"trained, seed 0; rounds 3 = the 90% reached over 3 prune-and-recover rounds "
                             f"(amounts 0.54, 0.78, 0.9) with {args.digits_steps} steps after each.", table))
        if "minilm" in args.parts:
            table, seconds = part_sparse(bench, "minilm-l6", args.minilm_steps, args.minilm_round_steps,
                                         labelled=False, probe_lr=args.probe_lr)
            probe = f" The last row tries lr {args.probe_lr:g}." if args.probe_lr else ""
            sections.append((f"## 1b. minilm-l6, 90% unstructured sparsity (prune.magnitude 0.9, global) — "
                             f"{seconds:.0f} s",
                             f"Score: recall@1 on the 256 scored pydoc pairs; fidelity: cosine to the original "
                             f"embedding over the 512 scored paragraphs (mean / worst). Recovery: "
                             f"{args.minilm_steps} steps of batch 32 at lr 5e-5 (the text default), every layer "
                             f"trained, seed 0, on the 765 fitting paragraphs; rounds 3 = 3 prune-and-recover "
                             f"rounds of {args.minilm_round_steps} steps each ({3 * args.minilm_round_steps} in "
                             f"all).{probe} prune.magnitude zeroes 90% of the encoder's linear weights (one "
                             f"global threshold); the embeddings (half of MiniLM's parameters) are not pruned, so "
                             f"42% of all parameters are zero. CAP reports {CAP_RETAINED}% of BERT-base's score "
                             f"retained on QQP at 97% encoder sparsity (with QQP's labels and epochs of training).",
                             table))
        if "structured" in args.parts:
            measure.SECONDS_PER_MODEL = args.seconds  # this part reports the job's side-by-side latency
            counts = [int(n) for n in args.structured_steps.split(",") if n]
            table, seconds = part_structured(bench, counts, args.probe_lr)
            measure.SECONDS_PER_MODEL = 1.0
            sections.append((f"## 2. minilm-l6, half the heads and FFN neurons (prune.structured 0.5) — "
                             f"{seconds:.0f} s",
                             f"Issue 4's target: mean fidelity >= 0.95 (✓ where met). Latency: the job's own "
                             f"ONNX Runtime timing ({args.threads} threads, {args.seconds:g} s budget per model, "
                             f"interleaved rounds), fp32 original over the result (> 1 = faster), batch 1 and "
                             f"batch 32. Recovery: distill, batch 32, lr 5e-5 (the text default"
                             + (f"; the last row {args.probe_lr:g}" if args.probe_lr else "")
                             + "), every layer, seed 0.", table))
        if "large" in args.parts:
            x1 = bench.model("digits-cnn")["card"].get("params")
            x4 = bench.model("digits-cnn-x4")["card"].get("params")
            table, seconds = part_large(bench, args.digits_steps, args.large_amount)
            sections.append((f"## 3. Train large, then compress: digits-cnn-x4 at digits-cnn's size — {seconds:.0f} s",
                             f"digits-cnn has {x1 or X1_PARAMS:,} parameters and digits-cnn-x4 {x4 or '?':,}; "
                             f"prune.structured {args.large_amount:g} keeps a quarter of x4's inner channels "
                             f"(x1's widths). Recovery: distill {args.digits_steps} steps, batch 32, lr 1e-3. "
                             f"Accuracy on the scored digits images.", table))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    total = time.perf_counter() - started
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        "# Recovery training after compression",
        "",
        f"`.venv/bin/python bench/recovery.py{' --only ' + args.only if args.only else ''}`: every row is a real "
        f"compress job (pipeline.compress: torch steps → recovery → ONNX export → ONNX steps → scoring on the "
        f"task's held-out split). torch and ONNX Runtime with {args.threads} threads; {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other people's work while this ran (load average {load:.1f} at the "
        f"end): seconds are noisy. Total {total:.0f} s ({total / 60:.1f} min).",
        "",
        *[block for title, settings, table in sections for block in (title, "", settings, "", table, "")],
    ])
    print(text)
    if args.only and not args.write:  # a part alone is for development: it does not replace the full table
        return
    out = ROOT / "bench" / "out" / "recovery.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
