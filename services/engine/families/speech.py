"""`speech-ssl` and `speech-ssl-moco`: a 0.8 M-parameter Transformer over log-mel frames, pretrained
self-supervised.

create(): synthesize (or read the cached) eSpeak NG corpus, pretrain on its audio (speech-ssl:
masked-frame reconstruction; speech-ssl-moco: momentum contrast), fine-tune a CTC digit head and a
speaker head; the two differ only in the pretraining objective (services/engine/speech/train.py).
The exported model takes a fixed-length padded batch, `features` (B, 160, 80) log-mel at 20 ms and
`lengths` (B,) int64 real frames, and returns `digit_log_probs` (B, 160, 11) first, then
`speaker_logits` (B, 12). Both tasks score this one model, each on its own output.
"""
from __future__ import annotations

import time

import torch

from services.engine.families.base import ModelAdapter, Progress
from services.engine.speech.corpus import MAX_FRAMES, N_MELS, VOICES, cache_path, load_corpus
from services.engine.speech.model import SpeechEncoder
from services.engine.speech.train import SEED, Schedule, train_speech_ssl


class SpeechAdapter(ModelAdapter):
    model_id = "speech-ssl"
    output_kind = "logits"  # the first output: per-frame CTC log-probs; fidelity = per-frame top-1 agreement
    input_names = ("features", "lengths")
    output_names = ("digit_log_probs", "speaker_logits")
    dynamic_axes = {"features": {0: "batch"}, "lengths": {0: "batch"},
                    "digit_log_probs": {0: "batch"}, "speaker_logits": {0: "batch"}}

    def __init__(self, schedule: Schedule | None = None):
        self.schedule = schedule or Schedule()

    def build(self) -> torch.nn.Module:
        return SpeechEncoder(n_speakers=len(VOICES))

    def load(self, path) -> torch.nn.Module:
        net = self.build()
        state = torch.load(path, weights_only=True)  # loading never runs code from the file
        # weights saved before the once-for-all training recorded its rates were trained at rate 1
        state.setdefault("trained_rates", torch.tensor([1.0, 1.0]))
        net.load_state_dict(state)
        return net.eval()

    def example_inputs(self) -> tuple:
        # Synthetic inputs: tracing must not need the corpus. Two rows so nothing is specialized to batch 1.
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(2, MAX_FRAMES, N_MELS, generator=generator) - 5.0
        return features, torch.tensor([MAX_FRAMES, MAX_FRAMES // 2], dtype=torch.int64)

    def create(self, progress: Progress) -> torch.nn.Module:
        started = time.perf_counter()
        progress(0.06, "speech corpus: reading the cache" if cache_path().is_file()
                 else "speech corpus: synthesizing 3,840 utterances with eSpeak NG (first use only)")
        corpus = load_corpus(lambda fraction, message: progress(0.06 + 0.09 * fraction, f"speech corpus: {message}"))
        corpus_seconds = time.perf_counter() - started
        schedule = self.schedule.scaled()
        model = train_speech_ssl(corpus, schedule, progress, span=(0.15, 0.7), seed=SEED)
        model.corpus_seconds = corpus_seconds  # type: ignore[attr-defined]
        model.train_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        progress(0.7, f"{self.model_id} trained: {schedule.pretrain_steps} pretraining and {schedule.finetune_steps} "
                      f"fine-tuning steps in {model.train_seconds:.0f} s")
        return model


class SpeechMocoAdapter(SpeechAdapter):
    """The same encoder and fine-tuning, pretrained with momentum contrast instead of masked frames."""
    model_id = "speech-ssl-moco"

    def __init__(self, schedule: Schedule | None = None):
        super().__init__(schedule or Schedule(pretrain_objective="momentum-contrast"))


ADAPTERS = [SpeechAdapter(), SpeechMocoAdapter()]
