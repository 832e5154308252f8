"""The contrastive terms of recovery training (services/engine/recovery.py): Contrastive Pruning's
InfoNCE against the original (and earlier pruning rounds), and momentum contrast (MoCo) against a
momentum copy of the model being recovered. Each is a training-only module whose parameters are its
heads; distill.train calls it as `extra_loss(state)` every step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import distill

TEMPERATURE = 0.1  # InfoNCE temperature (CAP and MoCo use 0.05-0.2)


def pooled(state: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One vector per sample: the mean over real positions (sequences) or over space (feature maps)."""
    if state.dim() == 4:
        return state.mean(dim=(2, 3))
    if state.dim() == 3:
        if mask is not None and mask.shape[:2] == state.shape[:2]:
            weights = mask.to(state.dtype)[..., None]
            return (state * weights).sum(1) / weights.sum(1).clamp(min=1)
        return state.mean(1)
    return state.reshape(len(state), -1)


def info_nce(anchor: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor | None,
             temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE of each anchor against all keys of the batch: its own key is a positive, the others are
    negatives; with labels, keys of the same class are positives too (supervised contrast, as CAP's
    fine-tuned term), averaged over the positives."""
    logits = F.normalize(anchor, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    positives = torch.eye(len(anchor), dtype=torch.bool, device=anchor.device)
    if labels is not None:
        positives = positives | (labels[:, None] == labels[None, :])
    log_probability = logits.log_softmax(dim=1)
    return -(log_probability * positives).sum(1).div(positives.sum(1)).mean()


def _projection(width_in: int, width_out: int) -> nn.Linear:
    """A training-only linear map between representation widths, the identity when they agree."""
    layer = nn.Linear(width_in, width_out)
    if width_in == width_out:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(width_in))
            layer.bias.zero_()
    return layer


class ContrastiveTerm(nn.Module):
    """CAP's contrast: the student's representation (through a training-only linear head to the
    original's width) against the original's and each snapshot's representations of the batch."""

    def __init__(self, student_width: int, teacher_width: int, snapshots: list[nn.Module], pair: tuple[str, str]):
        super().__init__()
        self.head = _projection(student_width, teacher_width)
        self.snapshots = snapshots
        self.pair = pair

    def forward(self, state: dict) -> torch.Tensor:
        batch = state["batch"]
        anchor = self.head(pooled(state["student_hidden"][self.pair[0]], batch.mask))
        keys = [pooled(state["teacher_hidden"][self.pair[1]], batch.mask)]
        for snapshot in self.snapshots:
            snapshot.to(anchor.device)  # kept out of the module tree, so not moved with it (a GPU job)
            with torch.no_grad(), distill.recording(snapshot, [self.pair[0]]) as hidden:
                snapshot(*batch.inputs)
            keys.append(self.head(pooled(hidden[self.pair[0]], batch.mask)).detach())
        return torch.stack([info_nce(anchor, key, batch.labels) for key in keys]).mean()


class MomentumTerm(nn.Module):
    """MoCo as a recovery objective: the query is the compressed model's representation of a masked
    view of each sample (through a training-only head), the key a momentum copy's representation of
    the whole sample, the negatives a queue of earlier keys (services/engine/moco.py). The momentum
    copy starts as the compressed model itself and follows it, so this needs neither labels nor the
    original; only `head` is trained by gradients."""

    def __init__(self, student: nn.Module, kit, probe):
        from services.engine import moco

        super().__init__()
        self.name = kit.representation[0]
        self.mask_inputs = kit.mask_inputs
        with torch.no_grad(), distill.recording(student, [self.name]) as hidden:
            student(*probe.for_student())
        width = pooled(hidden[self.name], probe.mask).shape[-1]
        self.head = moco.projection_head(width)
        # kept out of the module tree: the optimizer must not train them
        self.frozen = (student, moco.momentum_copy(student), moco.momentum_copy(self.head))
        # at most 16 batches of keys (MoCo's 65,536 keys are 256 of its batches, for a far longer training),
        # never more than half the samples (else a sample's own stale key would be a negative)
        batch = len(probe.inputs[0])
        self.queue = moco.KeyQueue(128, size=max(batch, min(moco.QUEUE_SIZE, kit.samples // 2, 16 * batch)))
        # filled before the first step (MoCo starts from random keys): the loss then measures the same
        # task all along instead of rising while the queue grows
        with torch.no_grad():
            while self.queue.filled < len(self.queue.keys):
                batch = next(kit.batches)
                self.queue.push(self.frozen[2](self.represent(self.frozen[1], batch.for_student(), batch.mask)))

    def represent(self, net: nn.Module, inputs: tuple, mask) -> torch.Tensor:
        with distill.recording(net, [self.name]) as hidden:
            net(*inputs)
        return pooled(hidden[self.name], mask)

    def forward(self, state: dict) -> torch.Tensor:
        from services.engine import moco

        student, key_encoder, key_head = self.frozen
        batch = state["batch"]
        device = batch.inputs[0].device
        key_encoder.to(device), key_head.to(device)  # out of the module tree: moved here for a GPU job
        queries = self.head(self.represent(student, self.mask_inputs(batch), batch.mask))
        with torch.no_grad():
            keys = key_head(self.represent(key_encoder, batch.for_student(), batch.mask))
        loss = moco.contrast_loss(queries, keys, self.queue)
        self.queue.push(keys)
        return loss

    def follow(self) -> None:
        """After each update: the momentum copies move a step toward the trained model and head."""
        from services.engine import moco

        student, key_encoder, key_head = self.frozen
        moco.momentum_update(key_encoder, student)
        moco.momentum_update(key_head, self.head)
