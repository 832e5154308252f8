"""Once-for-all sequence compression on speech-ssl, in ONE run (issue: self-supervision settings and
once-for-all sequence compression).

Per seed: one masked-frame pretraining, then from that same checkpoint
  - one once-for-all fine-tuning (a rate drawn from [1, 8] every step, rate 1 in a fifth of them),
    scored at every rate of a grid without retraining: the per-task tolerance curves;
  - one fine-tuning per fixed rate (1.5, 2, 3, 6), scored at its own rate.
Every score comes from the exported ONNX file through the task scorers, as a compress job scores it:
spoken-digits (1 - digit error rate, frame-level) and speaker-id (accuracy, utterance-level).
Then the seed-0 once-for-all model is timed with ONNX Runtime at each rate, batch 1, on 3.2 s and
10 s of audio, all rates side by side in interleaved rounds.

    .venv/bin/python bench/once_for_all.py [--seeds 0 1 2] [--scale 1.0] [--workers 2]
    .venv/bin/python bench/once_for_all.py --latency-only   # re-time the kept seed-0 model on a quiet machine

Writes bench/out/once_for_all.md and .json, and keeps the seed-0 once-for-all weights in
bench/out/once_for_all_seed0.pt. One torch thread per seed worker (as the job runner).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXED_RATES = (1.5, 2.0, 3.0, 6.0)
GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
TASKS = ("spoken-digits", "speaker-id")


def _scores(model, rate: float, scratch: Path) -> dict:
    """Both tasks' scores of `model` pooled at `rate`, through its exported ONNX file."""
    from services.engine import measure, tasks
    from services.engine.export import export_onnx
    from services.engine.families.speech import SpeechAdapter
    from services.engine.tasks.base import EvalSet

    model.pool.rate = rate
    path = export_onnx(model, SpeechAdapter(), scratch / f"rate-{rate:g}.onnx")
    out = {}
    for task in TASKS:
        scored = tasks.eval_set(task, "speech-ssl")  # with the rate, the scorer counts each utterance's real frames
        evaluation = EvalSet(inputs=scored.inputs, labels=scored.labels, latency_batch=scored.latency_batch,
                             extra={**scored.extra, "pooling_rate": rate})
        outputs = measure.run_outputs(measure.fresh_session(path), evaluation)
        out[task] = tasks.score(task, "speech-ssl", "logits", evaluation, outputs, outputs)["score"]
    path.unlink()
    return out


def run_seed(seed: int, scale: float, keep: str | None, fixed_rates: tuple = FIXED_RATES) -> dict:
    import torch

    from services.engine.speech.corpus import load_corpus
    from services.engine.speech.model import SpeechEncoder
    from services.engine.speech.train import RateSampler, Schedule, TrainingSet, finetune, pretrain

    torch.set_num_threads(1)
    corpus = load_corpus(lambda f, m: None)
    schedule = Schedule().scaled(scale)
    scratch = Path(tempfile.mkdtemp(prefix=f"ofa-{seed}-"))
    torch.manual_seed(seed)
    data = TrainingSet(corpus, seed)
    base = SpeechEncoder(n_speakers=int(corpus.voice.max()) + 1)
    mean, std = data.feature_stats()
    base.feature_mean.copy_(mean)
    base.feature_std.copy_(std)
    started = time.perf_counter()
    pretrain(base, data, schedule.pretrain_steps, schedule.pretrain_lr, seed,
             deep_reconstruction=schedule.deep_reconstruction, visible_weight=schedule.visible_weight,
             denoise=schedule.denoise)
    result = {"seed": seed, "pretrain_s": time.perf_counter() - started, "steps": schedule.finetune_steps}

    def fine_tuned(rate: float | None):
        model = copy.deepcopy(base)
        model.pool.rate = 1.0 if rate is None else rate
        sampler = None if rate is not None else RateSampler(schedule.max_rate, schedule.full_rate_share, seed)
        begun = time.perf_counter()
        finetune(model, TrainingSet(corpus, seed), schedule.finetune_steps, schedule.finetune_lr, seed,
                 schedule.speaker_weight, encoder_lr_scale=schedule.encoder_lr_scale, rates=sampler)
        return model, time.perf_counter() - begun

    ofa, result["ofa_s"] = fine_tuned(None)
    result["ofa"] = {str(rate): _scores(ofa, rate, scratch) for rate in GRID}
    if keep:
        ofa.pool.rate = 1.0
        torch.save(ofa.state_dict(), keep)
    result["fixed"], result["fixed_s"] = {}, {}
    for rate in fixed_rates:
        model, seconds = fine_tuned(rate)
        result["fixed"][str(rate)] = _scores(model, rate, scratch)
        result["fixed_s"][str(rate)] = seconds
        print(f"seed {seed}: fixed rate {rate:g} done ({seconds:.0f} s)", flush=True)
    return result


def latency_table(state_path: str, threads: int) -> list[dict]:
    import numpy as np
    import torch

    from services.engine import measure
    from services.engine.speech.corpus import N_MELS, VOICES
    from services.engine.speech.model import SpeechEncoder
    from services.engine.tasks.base import EvalSet

    measure.BENCH_THREADS = threads
    model = SpeechEncoder(n_speakers=len(VOICES))
    model.load_state_dict(torch.load(state_path, weights_only=True))
    model.eval()
    scratch = Path(tempfile.mkdtemp(prefix="ofa-latency-"))
    rows = []
    rates = (1.0, 1.5, 2.0, 3.0, 6.0, 8.0)
    for frames, seconds in ((160, 3.2), (500, 10.0)):
        paths = []
        for rate in rates:
            model.pool.rate = rate
            path = scratch / f"{frames}-{rate:g}.onnx"
            torch.onnx.export(model, (torch.randn(1, frames, N_MELS), torch.tensor([frames])), str(path),
                              input_names=["features", "lengths"], output_names=["digit_log_probs", "speaker_logits"],
                              opset_version=17, dynamo=False)
            paths.append(path)
        feed = EvalSet(inputs={"features": np.random.default_rng(0).normal(-5, 2, (1, frames, N_MELS)).astype(np.float32),
                               "lengths": np.array([frames])}, labels=None, latency_batch=1)
        timings = measure.measure_latency(paths, feed, seconds=4.0)
        base = timings[0]["latency_ms"]["p50"]
        for rate, timing in zip(rates, timings):
            rows.append({"audio_s": seconds, "rate": rate, "ms": timing["latency_ms"]["p50"],
                         "speedup": base / timing["latency_ms"]["p50"]})
    return rows


def _mean_spread(values: list[float]) -> str:
    import numpy as np

    values = np.asarray(values) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def report(results: list[dict], latency: list[dict], args, total_s: float) -> str:
    import numpy as np

    seeds = len(results)
    lines = ["# Once-for-all sequence compression on speech-ssl, one run", "",
             f"{seeds} seed(s) ({', '.join(str(r['seed']) for r in results)}), {results[0]['steps']} fine-tuning steps "
             f"per model after {round(400 * args.scale)} steps of masked-frame pretraining (one per seed, shared by "
             "every model of that seed), batch 32, one torch thread per seed, 2 shared cores. Scores in % from the "
             f"exported ONNX file: mean ± standard deviation over seeds. Total {total_s / 60:.0f} min.", "",
             "## Once-for-all against a model trained only at that rate", "",
             "| rate | frame period | spoken-digits OFA | fixed | OFA − fixed | speaker-id OFA | fixed | OFA − fixed |",
             "|---|---|---|---|---|---|---|---|"]
    for rate in args.fixed_rates:
        key = str(rate)
        cells = [f"{rate:g}×", f"{20 * rate:g} ms"]
        for task in TASKS:
            ofa = [r["ofa"][key][task] for r in results]
            fixed = [r["fixed"][key][task] for r in results]
            gap = np.asarray(ofa) - np.asarray(fixed)
            cells += [_mean_spread(ofa), _mean_spread(fixed), f"{gap.mean() * 100:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ofa_s = np.mean([r["ofa_s"] for r in results])
    fixed_s = np.mean([sum(r["fixed_s"].values()) for r in results])
    lines += ["", f"Training cost: one once-for-all fine-tuning {ofa_s:.0f} s serves every rate; the {len(args.fixed_rates)} "
              f"fixed-rate fine-tunings took {fixed_s:.0f} s together (each serves one rate). Pretraining "
              f"{np.mean([r['pretrain_s'] for r in results]):.0f} s per seed, shared.", "",
              "## Per-task tolerance: one once-for-all model, scored at every rate (no retraining)", "",
              "| rate | frame period | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
    for rate in GRID:
        lines.append(f"| {rate:g}× | {20 * rate:g} ms | "
                     + " | ".join(_mean_spread([r["ofa"][str(rate)][t] for r in results]) for t in TASKS) + " |")
    lines += ["", "## Latency of the once-for-all model by rate (ONNX Runtime, batch 1, "
              f"{args.threads} threads, all rates of one length timed together)", "",
              "| audio | rate | p50 ms | × faster than rate 1 |", "|---|---|---|---|"]
    for row in latency:
        lines.append(f"| {row['audio_s']:g} s | {row['rate']:g}× | {row['ms']:.2f} | {row['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="shrinks every step count (0.1 for a quick look)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads for the latency table (1, as jobs time: with 2 on a shared "
                             "machine a parallel kernel waits for a core another process holds)")
    parser.add_argument("--fixed-rates", type=float, nargs="+", default=list(FIXED_RATES),
                        help="the rates that get a fixed-rate model of their own")
    parser.add_argument("--name", default="once_for_all", help="output file name under bench/out")
    parser.add_argument("--latency-only", action="store_true",
                        help="only re-time the kept seed-0 model and rewrite the latency table of the last run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    keep = str(out / f"{args.name}_seed0.pt")
    if args.latency_only:
        saved = json.loads((out / f"{args.name}.json").read_text())
        latency = latency_table(keep, args.threads)
        text = report(saved["results"], latency, argparse.Namespace(**{**saved["args"], "threads": args.threads}),
                      saved["total_s"])
        (out / f"{args.name}.md").write_text(text)
        (out / f"{args.name}.json").write_text(json.dumps({**saved, "latency": latency}, indent=1))
        print(text)
        return
    from services.engine.speech.corpus import load_corpus

    load_corpus(lambda f, m: print(f"corpus: {m}", flush=True))  # synthesize (or read) once, before the workers
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_seed, seed, args.scale, keep if index == 0 else None, tuple(args.fixed_rates))
                   for index, seed in enumerate(args.seeds)]
        results = [f.result() for f in futures]
    latency = latency_table(keep, args.threads)
    total_s = time.perf_counter() - started
    text = report(results, latency, args, total_s)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps({"results": results, "latency": latency, "total_s": total_s,
                                                       "args": vars(args)}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
