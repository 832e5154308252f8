"""What pretraining buys speech-ssl: the corpus and training timed on this machine, and both tasks
scored for (a) log-mel features alone, (b) the same encoder from a random start, (c) speech-ssl.

    .venv/bin/python bench/speech.py [--scale 1.0] [--seeds 0 1] [--no-equal-compute] [--home DIR]

Every model gets the same fine-tuning steps on the same labeled split and is scored through its
exported ONNX file with the task scorers, exactly as a compress job scores it. One torch thread,
as the job runner uses. With --equal-compute (the default) a random start is also fine-tuned for
the pretraining plus fine-tuning steps, so pretraining is compared at equal training time too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _log_mel_probe(n_speakers: int):
    import torch
    from torch import nn

    from services.engine.speech.corpus import N_MELS
    from services.engine.speech.model import N_TOKENS, TimePooling

    class LogMelProbe(nn.Module):
        """A linear CTC layer on each normalized log-mel frame and a linear speaker layer on the
        mean and standard deviation of an utterance's frames: what the features alone can do."""

        def __init__(self):
            super().__init__()
            self.register_buffer("feature_mean", torch.zeros(N_MELS))
            self.register_buffer("feature_std", torch.ones(N_MELS))
            self.pool = TimePooling(1)
            self.ctc_head = nn.Linear(N_MELS, N_TOKENS)
            self.speaker_head = nn.Linear(2 * N_MELS, n_speakers)

        def forward(self, features, lengths):
            x = (features - self.feature_mean) / self.feature_std
            mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.dtype)[..., None]
            count = mask.sum(1).clamp(min=1.0)
            mean = (x * mask).sum(1) / count
            std = (((x - mean[:, None]) ** 2 * mask).sum(1) / count).sqrt()
            return torch.log_softmax(self.ctc_head(x), -1), self.speaker_head(torch.cat([mean, std], -1))

    return LogMelProbe()


def _log_mel_statistics_regression(corpus) -> dict:
    """Speaker-id from each utterance's log-mel mean and standard deviation, by a logistic
    regression trained to convergence (not step-limited): the strongest 'features alone' answer."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from services.engine.tasks import speech as speech_tasks

    def statistics(indices):
        rows = [corpus.frames(i) for i in indices]
        return np.stack([np.concatenate([r.mean(0), r.std(0)]) for r in rows])

    train = corpus.select("train")
    scaler = StandardScaler().fit(statistics(train))
    classifier = LogisticRegression(max_iter=3000).fit(scaler.transform(statistics(train)), corpus.voice[train])
    evaluation = speech_tasks.eval_set("speaker-id")
    test = corpus.select("test")
    logits = classifier.decision_function(scaler.transform(statistics(test)))
    return speech_tasks.score("speaker-id", evaluation, logits)


def _scores(net, folder: Path, name: str) -> dict:
    """Export like the product does, run every output in ONNX Runtime, score both tasks."""
    import numpy as np

    from services.engine import measure
    from services.engine.export import export_onnx
    from services.engine.families.speech import SpeechAdapter
    from services.engine.tasks import speech as speech_tasks

    path = export_onnx(net, SpeechAdapter(), folder / f"{name}.onnx")
    sess = measure.session(path)
    out = {}
    for task, output in (("spoken-digits", 0), ("speaker-id", 1)):
        evaluation = speech_tasks.eval_set(task)
        chunks = [sess.run(None, {k: v[i:i + 64] for k, v in evaluation.inputs.items()})[output]
                  for i in range(0, len(evaluation), 64)]
        out[task] = speech_tasks.score(task, evaluation, np.concatenate(chunks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (1 = the real model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-equal-compute", dest="equal_compute", action="store_false")
    parser.add_argument("--home", help="a data folder whose corpus cache to reuse (default: a fresh one)")
    args = parser.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="explorer-speech-"))
    os.environ["EXPLORER_HOME"] = str(home)
    import numpy as np
    import torch

    torch.set_num_threads(1)  # as the job runner does
    from services.engine.speech import corpus as speech_corpus
    from services.engine.speech.train import Schedule, train_speech_ssl

    schedule = Schedule().scaled(args.scale)
    cached = speech_corpus.cache_path().is_file()
    started = time.perf_counter()
    corpus = speech_corpus.load_corpus()
    corpus_seconds = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp(prefix="speech-bench-onnx-"))
    variants = [
        ("(a) log-mel features alone (linear CTC per frame; linear speaker layer on mean + std)",
         replace(schedule, pretrain_steps=0), lambda: _log_mel_probe(len(speech_corpus.VOICES))),
        ("(b) encoder from a random start, fine-tuned", replace(schedule, pretrain_steps=0), None),
    ]
    if args.equal_compute:
        variants.append(("(b') random start, fine-tuned for pretraining + fine-tuning steps",
                         replace(schedule, pretrain_steps=0,
                                 finetune_steps=schedule.pretrain_steps + schedule.finetune_steps), None))
    variants.append(("(c) speech-ssl: masked-frame pretraining, then fine-tuned", schedule, None))

    rows = []
    try:
        for label, variant, make in variants:
            results = []
            for seed in args.seeds:
                net = train_speech_ssl(corpus, variant, seed=seed, model=make() if make else None)
                scores = _scores(net, folder, f"v{len(rows)}s{seed}")
                results.append((net.pretrain_seconds, net.finetune_seconds, scores))
                print(f"{label} seed {seed}: pretrain {net.pretrain_seconds:.0f} s, fine-tune "
                      f"{net.finetune_seconds:.0f} s, {scores}", file=sys.stderr, flush=True)
            rows.append((label, variant, results))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def mean(values):
        return float(np.mean(values))

    print(f"\nCorpus: {len(corpus)} utterances, {corpus.features.shape[0]} frames; "
          + (f"read from the cache in {corpus_seconds:.1f} s (generated in {corpus.generate_seconds:.1f} s)"
             if cached else f"generated and cached in {corpus_seconds:.1f} s")
          + f". One torch thread, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
            f"seeds {args.seeds}.\n")
    print("| model | steps (pretrain + fine-tune) | pretrain s | fine-tune s | spoken-digits 1 − DER | "
          "digit error rate | strings all right | speaker-id accuracy | on words never heard from that voice |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, variant, results in rows:
        digits = [r[2]["spoken-digits"] for r in results]
        speakers = [r[2]["speaker-id"] for r in results]
        print(f"| {label} | {variant.pretrain_steps} + {variant.finetune_steps} | {mean([r[0] for r in results]):.0f} | "
              f"{mean([r[1] for r in results]):.0f} | {mean([d['score'] for d in digits]):.3f} | "
              f"{mean([d['digit_error_rate'] for d in digits]):.3f} | {mean([d['string_accuracy'] for d in digits]):.3f} | {mean([s['score'] for s in speakers]):.3f} | "
              f"{mean([s['accuracy_words'] for s in speakers]):.3f} |")
    converged = _log_mel_statistics_regression(corpus)
    print(f"| (a') log-mel mean + std, logistic regression fitted to convergence (speaker-id only) | — | — | — | — "
          f"| — | — | {converged['score']:.3f} | {converged['accuracy_words']:.3f} |")
    if not args.home:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
