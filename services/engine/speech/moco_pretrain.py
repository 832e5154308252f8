"""Momentum-contrast pretraining of the speech encoder (`speech-ssl-moco`; Schedule.pretrain_objective
"momentum-contrast"): block-level MoCo on unlabeled audio, with the shared pieces of
services/engine/moco.py and the optimizer, masking and batches of services/engine/speech/train.py."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from services.engine.speech.model import SpeechEncoder
from services.engine.speech.train import SEED, Progress, TrainingSet, _optimizer, _report, _step, hide_spans

MOCO_BLOCK = 8  # frames (160 ms, about half a spoken digit) pooled into one contrasted block
MOCO_SHIFT = MOCO_BLOCK  # the query view starts up to this many frames later than the key view
MOCO_GAIN = 0.7  # the query view's loudness moves by up to this much (natural-log power: ±3 dB)
MOCO_QUEUE = 4096  # keys of earlier batches (a batch holds about 300 blocks)


def _pool_blocks(hidden: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, block: int | None,
                 shift: torch.Tensor) -> torch.Tensor:
    """(blocks, D): the mean hidden state of each block. `lengths` are the utterances' own. A view
    that starts `shift` frames into its utterance sees block b (its frames [b block, (b + 1) block)) at
    frames b block - shift; only blocks whole in both views are kept (`starts`: the first such block
    per row). `block` None: the whole utterance is one block (then `shift` must be 0)."""
    if block is None:
        mask = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    rows, firsts = [], []
    for row, (first, end) in enumerate(zip(starts.tolist(), (lengths // block).tolist())):
        rows += [row] * max(0, end - first)
        firsts += [b * block - int(shift[row]) for b in range(first, end)]
    rows, firsts = torch.tensor(rows, dtype=torch.long), torch.tensor(firsts, dtype=torch.long)
    frames = firsts[:, None] + torch.arange(block)[None, :]  # (N, block)
    return hidden[rows[:, None], frames].mean(1)


def pretrain_momentum_contrast(model: SpeechEncoder, data: TrainingSet, steps: int, lr: float = 1e-3,
                               seed: int = SEED, progress: Progress | None = None,
                               span: tuple[float, float] = (0.0, 1.0), denoise: bool = True,
                               block: int | None = MOCO_BLOCK, queue_size: int = MOCO_QUEUE) -> list[float]:
    """Momentum contrast on the training audio, labels unused. Returns the loss per step.

    The query view: the noisy utterance, started up to MOCO_SHIFT frames late, louder or quieter by
    up to MOCO_GAIN, with spans hidden as in masked-frame pretraining. The key view: the same
    utterance whole and untouched, without its noise when `denoise` (as masked pretraining's targets),
    encoded by the momentum copy. Each block of MOCO_BLOCK frames is contrasted, not the utterance:
    spoken-digits reads frames, and an utterance-level contrast is solved by the voice, the noise and
    the length alone (every utterance differs in them), so it teaches little about what is said. The
    other blocks of the same utterance are negatives too (as in wav2vec 2.0): they share voice, noise
    and length, only what is said tells them apart. The shift keeps the frame position from naming the
    block; the hidden spans make the encoder infer what they hide from the context."""
    from services.engine.moco import KeyQueue, contrast_loss, momentum_copy, momentum_update, projection_head

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    width = model.norm.normalized_shape[0]
    # Training-only (thrown away afterwards): the projection head, its momentum copy, the stand-in for
    # hidden frames; the momentum encoder runs without dropout, so that keys are stable targets.
    head = projection_head(width)
    hidden_frame = nn.Parameter(torch.randn(width) * 0.02)
    key_encoder, key_head = momentum_copy(model).eval(), momentum_copy(head)
    queue = KeyQueue(head[-1].out_features, queue_size)
    optimizer, scheduler = _optimizer([*model.parameters(), *head.parameters(), hidden_frame], lr, steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = data.batch()
        features, lengths = batch["features"], batch["lengths"]
        frames = features.shape[1]
        shift = torch.from_numpy(rng.integers(0, MOCO_SHIFT if block else 1, len(lengths)))
        shift = torch.minimum(shift, lengths - 1)
        late = (torch.arange(frames)[None, :] + shift[:, None]).clamp(max=frames - 1)  # the view starts late
        gain = torch.from_numpy(rng.uniform(-MOCO_GAIN, MOCO_GAIN, (len(lengths), 1, 1)).astype(np.float32))
        query_view = torch.gather(features, 1, late[..., None].expand(-1, -1, features.shape[2])) + gain
        query_lengths = lengths - shift
        hide = hide_spans(query_lengths, frames, rng)
        starts = -(-shift // block) if block else shift
        hidden, _ = model.encode(query_view, query_lengths, hide=hide, hidden_frame=hidden_frame)
        pooled = _pool_blocks(hidden, lengths, starts, block, shift)
        with torch.no_grad():
            key_hidden, _ = key_encoder.encode(batch["clean"] if denoise else features, lengths)
            keys = key_head(_pool_blocks(key_hidden, lengths, starts, block, torch.zeros_like(shift)))
        loss = contrast_loss(head(pooled), keys, queue)
        losses.append(_step(model, loss, optimizer, scheduler))
        momentum_update(key_encoder, model)
        momentum_update(key_head, head)
        queue.push(keys)
        _report(progress, span, step, steps, "momentum-contrast pretraining", float(np.mean(losses[-25:])))
    model.eval()
    return losses
