"""How the amount of unlabeled audio changes what pretraining buys: masked-frame reconstruction
(speech-ssl) against momentum contrast (speech-ssl-moco), each pretrained on 10 %, 30 % and 100 % of
the training split's audio (a fixed seeded part, labels unused), plus a random start (no pretraining).

    .venv/bin/python bench/ssl_data.py [--scale 1.0] [--seeds 0] [--shares 0.1 0.3 1.0] [--home DIR] [--workers 1]
                                       [--equal-compute] [--resume]

Every model gets the same pretraining steps (the default Schedule's, times --scale) and the same
fine-tuning on the whole labeled split, and is scored through its exported ONNX file with the task
scorers (bench/speech.py's `_scores`): spoken-digits (1 - digit error rate, frame-level) and
speaker-id (accuracy, utterance-level). One torch thread per model, as the job runner uses; --workers
trains that many models side by side (the seconds columns then include the contention). Pass --home
with a cached corpus to score on the same corpus as the product's (eSpeak NG output differs between runs).
--equal-compute adds a random start fine-tuned for the pretraining plus fine-tuning steps (does
pretraining beat spending its time on fine-tuning?). Writes bench/out/ssl_data.json after every model
and bench/out/ssl_data.md at the end; --resume keeps the models already in the .json (add a seed later).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
OBJECTIVES = {"masked": "masked-frame reconstruction", "momentum-contrast": "momentum contrast"}
LABELS = {"none": "none (random start)", "none-equal-compute": "none, fine-tuned for pretraining + fine-tuning steps",
          **OBJECTIVES}


def _mean_std(values) -> str:
    import numpy as np

    values = [100 * v for v in values]
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")


def run_one(objective: str, share: float, seed: int, schedule, home: str) -> dict:
    """Train one model (in a worker process, one torch thread) and score it through ONNX."""
    os.environ["EXPLORER_HOME"] = home
    import torch

    torch.set_num_threads(1)  # as the job runner does
    from bench.speech import _scores
    from services.engine.speech import corpus as speech_corpus
    from services.engine.speech.train import TrainingSet, train_speech_ssl

    corpus = speech_corpus.load_corpus()
    net = train_speech_ssl(corpus, schedule, seed=seed)
    folder = Path(tempfile.mkdtemp(prefix="ssl-data-onnx-"))
    try:
        scores = _scores(net, folder, "model")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"objective": objective, "share": share, "seed": seed,
            "utterances": len(TrainingSet(corpus, seed, share)) if objective in OBJECTIVES else 0,
            "pretrain_steps": schedule.pretrain_steps, "finetune_steps": schedule.finetune_steps,
            "pretrain_s": net.pretrain_seconds, "finetune_s": net.finetune_seconds,
            "spoken-digits": scores["spoken-digits"]["score"], "speaker-id": scores["speaker-id"]["score"],
            "details": scores}


def _markdown(rows: list[dict], args, schedule, utterances: int, minutes: float) -> str:
    lines = ["# Unlabeled audio: masked-frame reconstruction against momentum contrast (speech encoder)", "",
             f"Seeds {sorted({r['seed'] for r in rows})}; pretraining (batch 32) on a share of the {utterances} "
             f"training utterances' audio, then fine-tuning on all of them, labeled (once-for-all, scored at "
             f"rate 1). Scores in % from the exported ONNX file (mean ± standard deviation over seeds). One torch "
             f"thread per model, {args.workers} model(s) at a time on {os.cpu_count()} shared cores (the seconds "
             f"include that contention); the last run took {minutes:.0f} min.", "",
             "| pretraining | unlabeled audio | utterances | steps (pretrain + fine-tune) | spoken-digits (1 − DER) "
             "| speaker-id accuracy | pretrain s | fine-tune s |", "|---|---|---|---|---|---|---|---|"]
    for objective, share in dict.fromkeys((r["objective"], r["share"]) for r in rows):
        chosen = [r for r in rows if r["objective"] == objective and r["share"] == share]
        amount = f"{100 * share:g} %" if objective in OBJECTIVES else "—"
        count = str(chosen[0]["utterances"]) if objective in OBJECTIVES else "—"
        lines.append(f"| {LABELS[objective]} | {amount} | {count} | {chosen[0]['pretrain_steps']} + "
                     f"{chosen[0]['finetune_steps']} | {_mean_std([r['spoken-digits'] for r in chosen])} | "
                     f"{_mean_std([r['speaker-id'] for r in chosen])} | "
                     f"{sum(r['pretrain_s'] for r in chosen) / len(chosen):.0f} | "
                     f"{sum(r['finetune_s'] for r in chosen) / len(chosen):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (1 = the real model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--home", help="a data folder whose corpus cache to reuse (default: a fresh one)")
    parser.add_argument("--out", default=str(OUT / "ssl_data"), help="path of the .json and .md, no suffix")
    parser.add_argument("--workers", type=int, default=1, help="models trained side by side, one thread each")
    parser.add_argument("--equal-compute", action="store_true",
                        help="add a random start fine-tuned for the pretraining + fine-tuning steps")
    parser.add_argument("--resume", action="store_true", help="keep the models already in the .json")
    args = parser.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="explorer-ssl-data-"))
    os.environ["EXPLORER_HOME"] = str(home)
    from services.engine.speech import corpus as speech_corpus
    from services.engine.speech.train import Schedule, TrainingSet

    schedule = Schedule().scaled(args.scale)
    corpus = speech_corpus.load_corpus()  # synthesize (or read) once, before the workers
    variants = [("none", 1.0, replace(schedule, pretrain_steps=0))]
    if args.equal_compute:
        variants.append(("none-equal-compute", 1.0, replace(
            schedule, pretrain_steps=0, finetune_steps=schedule.pretrain_steps + schedule.finetune_steps)))
    variants += [(objective, share, replace(schedule, pretrain_objective=objective, pretrain_share=share))
                 for objective in OBJECTIVES for share in args.shares]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    order = [(objective, share, seed) for objective, share, _ in variants for seed in args.seeds]
    rows = []
    if args.resume and out.with_suffix(".json").is_file():
        kept = json.loads(out.with_suffix(".json").read_text())
        if kept["schedule"] != asdict(schedule):
            raise SystemExit(f"{out.with_suffix('.json')} holds another schedule; resume with the same --scale")
        rows = [r for r in kept["rows"] if (r["objective"], r["share"], r["seed"]) in order]
    done = {(r["objective"], r["share"], r["seed"]) for r in rows}
    try:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            # the longest (momentum contrast on the most audio) first, so that no worker idles at the end
            futures = [pool.submit(run_one, objective, share, seed, variant, str(home))
                       for objective, share, variant in reversed(variants) for seed in args.seeds
                       if (objective, share, seed) not in done]
            for future in as_completed(futures):
                row = future.result()
                rows.append(row)
                rows.sort(key=lambda r: order.index((r["objective"], r["share"], r["seed"])))
                print(f"{row['objective']} {row['share']:g} seed {row['seed']}: pretrain {row['pretrain_s']:.0f} s, "
                      f"fine-tune {row['finetune_s']:.0f} s, spoken-digits {row['spoken-digits']:.3f}, "
                      f"speaker-id {row['speaker-id']:.3f}", file=sys.stderr, flush=True)
                out.with_suffix(".json").write_text(json.dumps(
                    {"schedule": asdict(schedule), "rows": rows}, indent=1))
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    text = _markdown(rows, args, schedule, len(TrainingSet(corpus)), (time.perf_counter() - started) / 60)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
