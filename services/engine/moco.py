"""Momentum contrast (MoCo, He et al. 2020): the pieces every user of the objective shares.

A query encoder (the model being trained, with a training-only projection head) and a key encoder,
a slowly moving copy of it (exponential moving average of its weights, never trained by gradients).
Each sample's query is pulled toward the key of another view of the same sample and pushed away from
a queue of keys of earlier batches: many more negatives than one batch holds, and all of them
computed by nearly the same encoder, which is what the momentum is for. No labels anywhere.

Used by speech-ssl-moco's pretraining (services/engine/speech/train.py) and by the `momentum-contrast`
recovery objective (services/engine/recovery.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

MOMENTUM = 0.99  # MoCo uses 0.999 over hundreds of thousands of steps; ours train for hundreds
TEMPERATURE = 0.2  # MoCo v2
QUEUE_SIZE = 1024


def momentum_copy(module: nn.Module) -> nn.Module:
    """The key encoder: a copy that gradients never reach (it moves by `momentum_update` only)."""
    twin = copy.deepcopy(module)
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, momentum: float = MOMENTUM) -> None:
    """key <- m key + (1 - m) query, parameter by parameter (buffers copied: normalisation statistics)."""
    for key, query in zip(key_encoder.parameters(), query_encoder.parameters()):
        key.mul_(momentum).add_(query.detach(), alpha=1.0 - momentum)
    for key, query in zip(key_encoder.buffers(), query_encoder.buffers()):
        key.copy_(query)


class KeyQueue:
    """The last `size` keys (normalised), oldest overwritten first."""

    def __init__(self, dim: int, size: int = QUEUE_SIZE):
        self.keys = torch.zeros(size, dim)
        self.filled = 0
        self.position = 0

    def negatives(self) -> torch.Tensor:
        return self.keys[:self.filled]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        keys = F.normalize(keys.detach(), dim=-1)[-len(self.keys):]
        end = self.position + len(keys)
        if end <= len(self.keys):
            self.keys[self.position:end] = keys.to(self.keys.device)
        else:  # wrap around
            first = len(self.keys) - self.position
            self.keys[self.position:] = keys[:first].to(self.keys.device)
            self.keys[:end - len(self.keys)] = keys[first:].to(self.keys.device)
        self.position = end % len(self.keys)
        self.filled = min(len(self.keys), self.filled + len(keys))


def contrast_loss(queries: torch.Tensor, keys: torch.Tensor, queue: KeyQueue,
                  temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE of each query against its own key (the positive), the queue and the batch's other keys
    (negatives: the queue is empty at the first step). `keys` must come from the key encoder (no grad);
    the caller pushes them onto the queue after the step."""
    queries = F.normalize(queries, dim=-1)
    keys = F.normalize(keys.detach(), dim=-1)
    batch_logits = queries @ keys.T  # (B, B): the diagonal holds the positives
    # a copy: the queue is overwritten in place after the step, and backward still needs these keys
    queue_logits = queries @ queue.negatives().to(queries.device, copy=True).T  # (B, filled)
    logits = torch.cat([batch_logits, queue_logits], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def projection_head(width_in: int, width_out: int = 128) -> nn.Module:
    """MoCo v2's training-only MLP head, thrown away afterwards."""
    return nn.Sequential(nn.Linear(width_in, width_in), nn.ReLU(), nn.Linear(width_in, width_out))
