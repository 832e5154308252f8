"""Training `speech-ssl`: self-supervised pretraining on unlabeled audio, then fine-tuning both heads.

Pretraining (no labels) is one of two objectives, `Schedule.pretrain_objective`:
- "masked" (speech-ssl): hide spans of 4 frames (about 34% of each utterance) and reconstruct the
  hidden log-mel frames from the context (L1), with a head that is thrown away afterwards;
- "momentum-contrast" (speech-ssl-moco): each block of frames seen through a masked view must pick
  out its own key, computed by a slowly moving copy of the encoder on another view, among the keys
  of other blocks and utterances (MoCo: services/engine/speech/moco_pretrain.py, on the shared pieces
  of services/engine/moco.py).
`Schedule.pretrain_share` pretrains on a fixed seeded part of the training audio. Fine-tuning then
trains the whole encoder with the CTC loss over digit strings and the cross-entropy of the speaker
head, on the whole labeled training split.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.engine.speech.corpus import MAX_FRAMES, N_MELS, SpeechCorpus
from services.engine.speech.model import BLANK, SpeechEncoder, pooled_lengths

Progress = Callable[[float, str], None]

SEED = 0
BATCH = 32
MASK_SPAN = 4
MASK_SHARE = 0.34


def steps_scale() -> float:
    """EXPLORER_SPEECH_STEPS_SCALE shrinks every step count (the tests set 0.2); 1 for users."""
    return float(os.environ.get("EXPLORER_SPEECH_STEPS_SCALE", "1"))


@dataclass
class Schedule:
    pretrain_steps: int = 400
    finetune_steps: int = 600
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-3
    speaker_weight: float = 1.0
    encoder_lr_scale: float = 1.0  # fine-tuning: the encoder's learning rate relative to the heads'
    deep_reconstruction: bool = True  # pretraining: an MLP (not a linear layer) reconstructs the frames
    visible_weight: float = 1.0  # pretraining: weight of the frames left visible in the loss (hidden ones: 1)
    denoise: bool = True  # pretraining: reconstruct the frames of the speech without its noise
    # Once-for-all fine-tuning: every step pools time at a rate drawn from [1, max_rate] (rate 1 in
    # `full_rate_share` of the steps, so the unpooled path is trained too): one model for any rate.
    once_for_all: bool = True
    max_rate: float = 8.0
    full_rate_share: float = 0.2
    pretrain_objective: str = "masked"  # or "momentum-contrast" (PRETRAIN_OBJECTIVES)
    pretrain_share: float = 1.0  # share of the training split's audio pretraining sees (a fixed seeded subset)

    def scaled(self, scale: float | None = None) -> "Schedule":
        scale = steps_scale() if scale is None else scale
        return replace(self, pretrain_steps=max(1, round(self.pretrain_steps * scale)) if self.pretrain_steps else 0,
                       finetune_steps=max(1, round(self.finetune_steps * scale)))


PRETRAIN_OBJECTIVES = ("masked", "momentum-contrast")


class TrainingSet:
    """The training split as padded tensors, cut to the longest utterance of each batch.

    `share` < 1 keeps a fixed part of it, drawn by `seed` (how much unlabeled audio pretraining sees)."""

    def __init__(self, corpus: SpeechCorpus, seed: int = SEED, share: float = 1.0):
        self.indices = corpus.select("train")
        if share < 1.0:
            keep = max(1, round(share * len(self.indices)))
            self.indices = np.sort(np.random.default_rng(seed + 4).choice(self.indices, size=keep, replace=False))
        features, lengths = corpus.padded(self.indices, MAX_FRAMES)
        self.features = torch.from_numpy(features)
        self.clean = torch.from_numpy(corpus.padded(self.indices, MAX_FRAMES, clean=True)[0])
        self.lengths = torch.from_numpy(lengths)
        self.voice = torch.from_numpy(corpus.voice[self.indices])
        self.is_digits = torch.from_numpy(corpus.kind[self.indices] == "digits")
        # CTC targets: digit d is token d + 1 (0 is the blank).
        self.targets = [torch.tensor([int(c) + 1 for c in s], dtype=torch.long) for s in corpus.digits[self.indices]]
        self.by_length = np.argsort(self.lengths.numpy(), kind="stable")
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def feature_stats(self, clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(MAX_FRAMES)[None, :] < self.lengths[:, None]
        frames = (self.clean if clean else self.features)[mask]
        return frames.mean(0), frames.std(0).clamp(min=1e-3)

    def batch(self, size: int = BATCH) -> dict:
        """`size` utterances of similar length (drawn from a window of the length-sorted set), so
        that little compute goes to padding: random batches pad to nearly twice the mean length."""
        size = min(size, len(self))
        window = min(len(self), 3 * size)
        start = int(self.rng.integers(0, len(self) - window + 1))
        rows = torch.from_numpy(self.rng.choice(self.by_length[start:start + window], size=size, replace=False))
        lengths = self.lengths[rows]
        frames = int(lengths.max())
        return {"features": self.features[rows, :frames], "clean": self.clean[rows, :frames], "lengths": lengths,
                "voice": self.voice[rows], "is_digits": self.is_digits[rows],
                "targets": [self.targets[i] for i in rows.tolist()], "rows": rows}


def hide_spans(lengths: torch.Tensor, frames: int, rng: np.random.Generator, span: int = MASK_SPAN,
               share: float = MASK_SHARE) -> torch.Tensor:
    """(B, frames) bool: non-overlapping spans of `span` frames covering about `share` of each utterance."""
    hide = np.zeros((len(lengths), frames), bool)
    for row, length in enumerate(lengths.tolist()):
        offset = int(rng.integers(0, span))
        slots = np.arange(offset, max(offset + 1, length - span + 1), span)
        count = min(len(slots), max(1, round(share * length / span)))
        for start in rng.choice(slots, size=count, replace=False):
            hide[row, start:start + span] = True
        hide[row, length:] = False
    return torch.from_numpy(hide)


def _optimizer(params, lr: float, steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 5%
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _report(progress: Progress | None, span: tuple[float, float], step: int, steps: int, what: str, loss: float):
    if progress and (step % 25 == 24 or step == steps - 1):
        fraction = span[0] + (span[1] - span[0]) * (step + 1) / steps
        progress(fraction, f"{what}: step {step + 1}/{steps}, loss {loss:.3f}")


def pretrain(model: SpeechEncoder, data: TrainingSet, steps: int, lr: float = 1e-3, seed: int = SEED,
             progress: Progress | None = None, span: tuple[float, float] = (0.0, 1.0),
             deep_reconstruction: bool = True, visible_weight: float = 0.0, denoise: bool = True) -> list[float]:
    """Masked-frame reconstruction on the training audio, labels unused. Returns the loss per step.

    With `denoise`, the frames to reconstruct are those of the speech without its noise (the
    corpus keeps both): the encoder must model speech rather than the noise, which is most of
    what a noisy frame holds at 0-10 dB SNR."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    width = model.norm.normalized_shape[0]
    # Thrown away afterwards, with the learned stand-in for hidden frames.
    reconstruct = (nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, N_MELS))
                   if deep_reconstruction else nn.Linear(width, N_MELS))
    hidden_frame = nn.Parameter(torch.randn(width) * 0.02)
    clean_mean, clean_std = data.feature_stats(clean=True)
    optimizer, scheduler = _optimizer([*model.parameters(), *reconstruct.parameters(), hidden_frame], lr, steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = data.batch()
        features, lengths = batch["features"], batch["lengths"]
        hide = hide_spans(lengths, features.shape[1], rng)
        hidden, mask = model.encode(features, lengths, hide=hide, hidden_frame=hidden_frame)
        target = (batch["clean"] - clean_mean) / clean_std if denoise else model.normalize(features)
        error = (reconstruct(hidden) - target).abs().mean(-1)
        loss = error[hide].mean()
        if visible_weight:
            loss = loss + visible_weight * error[(mask > 0) & ~hide].mean()
        losses.append(_step(model, loss, optimizer, scheduler))
        _report(progress, span, step, steps, "masked-frame pretraining", float(np.mean(losses[-25:])))
    model.eval()
    return losses


def _step(model: nn.Module, loss: torch.Tensor, optimizer, scheduler) -> float:
    """One optimizer step with gradient clipping; returns the loss."""
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


def finetune_loss(model: SpeechEncoder, batch: dict, speaker_weight: float = 1.0) -> torch.Tensor:
    log_probs, speaker_logits = model(batch["features"], batch["lengths"])
    loss = speaker_weight * F.cross_entropy(speaker_logits, batch["voice"])
    digits = batch["is_digits"]
    if digits.any():
        rows = torch.nonzero(digits).flatten()
        targets = [batch["targets"][i] for i in rows.tolist()]
        loss = loss + F.ctc_loss(
            log_probs[rows].transpose(0, 1), torch.cat(targets),
            pooled_lengths(batch["lengths"][rows], model.pool.rate), torch.tensor([len(t) for t in targets]),
            blank=BLANK, zero_infinity=True)
    return loss


class RateSampler:
    """Once-for-all rates: 1 with probability `full_rate_share`, else uniform in [1, max_rate]."""

    def __init__(self, max_rate: float, full_rate_share: float, seed: int):
        self.max_rate, self.full_rate_share = float(max_rate), float(full_rate_share)
        self.rng = np.random.default_rng(seed + 3)

    def __call__(self) -> float:
        if self.rng.random() < self.full_rate_share:
            return 1.0
        return float(self.rng.uniform(1.0, self.max_rate))


def finetune(model: SpeechEncoder, data: TrainingSet, steps: int, lr: float = 1e-3, seed: int = SEED,
             speaker_weight: float = 1.0, progress: Progress | None = None,
             span: tuple[float, float] = (0.0, 1.0), encoder_lr_scale: float = 1.0,
             rates: "RateSampler | None" = None) -> list[float]:
    """CTC over digit strings plus speaker cross-entropy; every weight trains, the encoder's at
    `encoder_lr_scale` times the heads' learning rate. With `rates` (a RateSampler), every step
    pools time at a newly drawn rate (once-for-all); the model's own rate is kept otherwise."""
    torch.manual_seed(seed + 2)
    fixed_rate = model.pool.rate
    heads = [*model.ctc_head.parameters(), *model.speaker_head.parameters()]
    encoder = [p for p in model.parameters() if all(p is not h for h in heads)]
    groups = [{"params": heads, "lr": lr}, {"params": encoder, "lr": lr * encoder_lr_scale}]
    optimizer, scheduler = _optimizer(groups, lr, steps)
    model.train()
    losses = []
    for step in range(steps):
        if rates is not None:
            model.pool.rate = rates()
        loss = finetune_loss(model, data.batch(), speaker_weight)
        losses.append(_step(model, loss, optimizer, scheduler))
        _report(progress, span, step, steps, "fine-tuning the digit and speaker heads"
                + (" at every rate (once-for-all)" if rates is not None else ""), float(np.mean(losses[-25:])))
    model.pool.rate = fixed_rate
    if rates is not None:
        model.trained_rates.copy_(torch.tensor([1.0, rates.max_rate]))
    model.eval()
    return losses


def train_speech_ssl(corpus: SpeechCorpus, schedule: Schedule, progress: Progress | None = None,
                     span: tuple[float, float] = (0.0, 1.0), seed: int = SEED, model: nn.Module | None = None):
    """Pretrain (unless schedule.pretrain_steps is 0), then fine-tune; records the seconds of each phase.

    `model` defaults to a fresh SpeechEncoder; any module with the same forward, `ctc_head`,
    `speaker_head`, `pool` and feature statistics can be fine-tuned the same way (bench/speech.py).
    """
    if schedule.pretrain_objective not in PRETRAIN_OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {schedule.pretrain_objective!r}: one of {PRETRAIN_OBJECTIVES}")
    torch.manual_seed(seed)
    data = TrainingSet(corpus, seed)
    model = model if model is not None else SpeechEncoder(n_speakers=int(corpus.voice.max()) + 1)
    mean, std = data.feature_stats()
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    total = schedule.pretrain_steps + schedule.finetune_steps
    middle = span[0] + (span[1] - span[0]) * schedule.pretrain_steps / total
    # Pretraining sees the audio only (of a part of the split when pretrain_share < 1); fine-tuning the whole split.
    unlabeled = data if schedule.pretrain_share >= 1.0 else TrainingSet(corpus, seed, schedule.pretrain_share)
    started = time.perf_counter()
    if schedule.pretrain_steps and schedule.pretrain_objective == "masked":
        pretrain(model, unlabeled, schedule.pretrain_steps, schedule.pretrain_lr, seed, progress, (span[0], middle),
                 schedule.deep_reconstruction, schedule.visible_weight, schedule.denoise)
    elif schedule.pretrain_steps:
        from services.engine.speech.moco_pretrain import pretrain_momentum_contrast

        pretrain_momentum_contrast(model, unlabeled, schedule.pretrain_steps, schedule.pretrain_lr, seed, progress,
                                   (span[0], middle), schedule.denoise)
    pretrained = time.perf_counter()
    rates = (RateSampler(schedule.max_rate, schedule.full_rate_share, seed) if schedule.once_for_all else None)
    finetune(model, data, schedule.finetune_steps, schedule.finetune_lr, seed, schedule.speaker_weight,
             progress, (middle, span[1]), schedule.encoder_lr_scale, rates)
    model.pretrain_seconds = pretrained - started  # type: ignore[attr-defined]
    model.finetune_seconds = time.perf_counter() - pretrained  # type: ignore[attr-defined]
    return model


# ---- a learned rate: the task's own trade-off between score and compute --------------------------

def task_loss(model: SpeechEncoder, features: torch.Tensor, lengths: torch.Tensor, labels, task: str) -> torch.Tensor:
    """The training loss of one task on one batch: CTC over the digit strings (spoken-digits) or the
    speaker's cross-entropy (speaker-id)."""
    log_probs, speaker_logits = model(features, lengths)
    if task == "speaker-id":
        return F.cross_entropy(speaker_logits, torch.as_tensor(labels, dtype=torch.long))
    targets = [torch.tensor([int(c) + 1 for c in s], dtype=torch.long) for s in labels]
    rate = model.pool.rate
    rate = float(rate.detach()) if isinstance(rate, torch.Tensor) else float(rate)  # a rate being learned
    return F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), pooled_lengths(lengths, rate),
                      torch.tensor([len(t) for t in targets]), blank=BLANK, zero_infinity=True)


def compute_share(model: SpeechEncoder, rate):
    """Share of the encoder's frame-layer work left at `rate`: the layers before the pooling see every
    frame, the others 1 / rate of them (attention's quadratic part is left out: a lower bound)."""
    layers, before = len(model.layers), model.pool_after
    return (before + (layers - before) / rate) / layers


@dataclass
class LearnedRate:
    rate: float
    steps: int
    seconds: float
    trajectory: list  # the rate after every step


def learn_rate(model: SpeechEncoder, features: np.ndarray, lengths: np.ndarray, labels, task: str, *,
               penalty: float, steps: int = 100, lr: float = 0.1, batch: int = 32, seed: int = SEED,
               start: float = 2.0, max_rate: float = 8.0, progress: Progress | None = None) -> LearnedRate:
    """One training that finds the task's rate instead of a grid search: the weights stay frozen (a
    once-for-all model runs at any rate), and only the rate r = 1 + (max_rate - 1) sigmoid(theta)
    learns, by gradient descent on  task loss + penalty × compute_share(r).  The loss reaches r
    through the pooling windows' edges, which move with it; a higher penalty buys a higher rate."""
    started = time.perf_counter()
    generator = np.random.default_rng(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    if max_rate <= 1.0:
        raise ValueError("learning a rate needs a range of rates above 1")
    share = min(max((start - 1.0) / (max_rate - 1.0), 0.05), 0.95)  # start inside the range, never on its edge
    theta = torch.tensor(math.log(share / (1 - share)), requires_grad=True)
    rate_before = model.pool.rate
    optimizer = torch.optim.Adam([theta], lr=lr)
    labels = list(labels) if task == "spoken-digits" else np.asarray(labels)
    trajectory = []
    model.eval()  # no dropout: the rate is judged on the model as it runs
    try:
        for step in range(steps):
            rows = generator.choice(len(lengths), size=min(batch, len(lengths)), replace=False)
            longest = int(lengths[rows].max())
            rate = 1.0 + (max_rate - 1.0) * torch.sigmoid(theta)
            model.pool.rate = rate
            picked = [labels[i] for i in rows] if task == "spoken-digits" else labels[rows]
            loss = task_loss(model, torch.from_numpy(features[rows, :longest]), torch.from_numpy(lengths[rows]),
                             picked, task) + penalty * compute_share(model, rate)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trajectory.append(float(rate.detach()))
            if progress and (step % 10 == 9 or step == steps - 1):
                progress((step + 1) / steps, f"learning the rate: step {step + 1}/{steps}, rate {trajectory[-1]:.2f}")
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.pool.rate = rate_before  # never left holding a tensor, even when a step failed
    learned = float(np.mean(trajectory[-max(1, steps // 10):]))  # the last tenth: one step is noisy
    model.pool.rate = learned
    return LearnedRate(rate=learned, steps=steps, seconds=time.perf_counter() - started, trajectory=trajectory)
