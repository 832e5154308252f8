"""Self-supervised helpers that exist only during recovery training (Look-into-Object, Zhou et al.).

Each helper is a small head that reads the model's inner states and solves a task the input itself
poses, so it needs no labels; its loss is added to the recovery objective's. The heads are never
attached to the model: they live in the training loop (distill.train's `extra_modules`) and are
dropped with it, so the exported model has exactly the parameters, operators and speed it would
have without them (tests/test_aux_heads.py checks the ONNX graphs).

- `spatial-context` (images; LIO's spatial context module): from the last convolution's feature
  map, predict where each inked region lies relative to the object's centre (the region that
  responds most), as polar coordinates (distance, and the angle as cosine and sine).
- `object-extent` (images; LIO's object-extent learning, in its simplest form): predict for every
  region of the feature map whether the object covers it (a digit's ink covers it).
- `frame-order` (speech): cut each utterance into 4 blocks of frames, shuffle them, and predict
  from the encoder's states where each block came from.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import distill

AUX_HELPERS = {
    "spatial-context": ("cnn", "Predicts where each part of the object lies relative to its centre "
                               "(Look-into-Object's spatial context)."),
    "object-extent": ("cnn", "Predicts which regions of the image the object covers (Look-into-Object's "
                             "object extent)."),
    "frame-order": ("speech-transformer", "Shuffles blocks of each utterance and predicts their order."),
}
AUX_WEIGHT = 0.1  # each helper's loss next to the objective's (LIO weighs its modules at 0.1 to 1)
INK = 0.05  # a region whose mean intensity passes this holds part of the object
ORDER_BLOCKS = 4


def helpers_for(architecture: str) -> list[str]:
    return [name for name, (kind, _) in AUX_HELPERS.items() if kind == architecture]


def why_not(helpers: list[str], architecture: str) -> str:
    """'' when every helper applies to this kind of model, else the reason in one sentence."""
    for name in helpers:
        if name not in AUX_HELPERS:
            return f"unknown helper {name!r}; known: {', '.join(AUX_HELPERS)}."
        if AUX_HELPERS[name][0] != architecture:
            usable = helpers_for(architecture)
            return (f"{name!r} works on {AUX_HELPERS[name][0]} models, not on this one"
                    + (f"; this one can use {', '.join(usable)}." if usable else "; this model has no helper yet."))
    return ""


def _last_conv(net: nn.Module) -> str:
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("the image helpers need a convolution to read")
    return names[-1]


class ImageHelpers(nn.Module):
    """`spatial-context` and/or `object-extent` on the last convolution's feature map."""

    def __init__(self, student: nn.Module, example: torch.Tensor, helpers: list[str]):
        super().__init__()
        self.layer = _last_conv(student)
        self.helpers = list(helpers)
        with torch.no_grad(), distill.recording(student, [self.layer]) as hidden:
            student(example)
        channels = hidden[self.layer].shape[1]
        self.embed = nn.Sequential(nn.Conv2d(channels, 64, 1), nn.ReLU())
        self.position = nn.Linear(128, 3)  # (distance, cos angle, sin angle) from (region, centre)
        self.extent = nn.Conv2d(channels, 1, 1)

    def forward(self, student: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with distill.recording(student, [self.layer]) as hidden:
            student(images)
        features = hidden[self.layer]  # (B, C, H, W)
        height, width = features.shape[-2:]
        ink = F.adaptive_avg_pool2d(images[:, :1], (height, width))[:, 0] > INK  # (B, H, W)
        losses = []
        if "object-extent" in self.helpers:
            losses.append(F.binary_cross_entropy_with_logits(self.extent(features)[:, 0], ink.float()))
        if "spatial-context" in self.helpers:
            losses.append(self._spatial_context(features, ink))
        return torch.stack(losses).sum()

    def _spatial_context(self, features: torch.Tensor, ink: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        # the centre: the inked region whose features respond most (LIO's most object-like region)
        response = features.detach().mean(1).masked_fill(~ink, -math.inf).flatten(1)
        centre = response.argmax(1)
        cy, cx = (centre // width).float(), (centre % width).float()
        ys = torch.arange(height, dtype=torch.float32, device=features.device)[None, :, None].expand(batch, height, width)
        xs = torch.arange(width, dtype=torch.float32, device=features.device)[None, None, :].expand(batch, height, width)
        dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
        distance = torch.sqrt(dy ** 2 + dx ** 2)
        angle = torch.atan2(dy, dx)
        target = torch.stack([distance / math.hypot(height - 1, width - 1), torch.cos(angle), torch.sin(angle)], -1)
        embedded = self.embed(features).permute(0, 2, 3, 1)  # (B, H, W, 64)
        centre_vector = embedded.flatten(1, 2)[torch.arange(batch, device=centre.device), centre]  # (B, 64)
        pairs = torch.cat([embedded, centre_vector[:, None, None, :].expand_as(embedded)], -1)
        predicted = self.position(pairs)
        counted = ink & (distance > 0)  # inked regions other than the centre
        if not counted.any():
            return predicted.sum() * 0.0
        return F.mse_loss(predicted[counted], target[counted])


class FrameOrderHelper(nn.Module):
    """`frame-order`: each utterance's real frames in 4 blocks, shuffled; a linear head on each
    block's mean state predicts the block's original place."""

    def __init__(self, student: nn.Module, example: tuple, seed: int):
        super().__init__()
        if not hasattr(student, "encode"):
            raise ValueError("frame-order needs the speech encoder's states")
        with torch.no_grad():
            hidden, _ = student.encode(*example)
        self.head = nn.Linear(hidden.shape[-1], ORDER_BLOCKS)
        self.generator = torch.Generator().manual_seed(seed + 7)

    def forward(self, student: nn.Module, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, frames = features.shape[:2]
        index = torch.arange(frames).repeat(batch, 1)
        block_of = torch.full((batch, frames), -1)  # the shuffled block each frame lands in
        origin = torch.empty(batch, ORDER_BLOCKS, dtype=torch.long)  # where each shuffled block came from
        for row, length in enumerate(lengths.tolist()):
            edges = [round(length * k / ORDER_BLOCKS) for k in range(ORDER_BLOCKS + 1)]
            order = torch.randperm(ORDER_BLOCKS, generator=self.generator)
            pieces = [torch.arange(edges[k], edges[k + 1]) for k in order.tolist()]
            index[row, :length] = torch.cat(pieces)
            position = 0
            for slot, piece in enumerate(pieces):
                block_of[row, position:position + len(piece)] = slot
                position += len(piece)
            origin[row] = order
        # built on the CPU (a seeded CPU generator), then moved to the batch's device (a GPU job)
        index, block_of, origin = index.to(features.device), block_of.to(features.device), origin.to(features.device)
        shuffled = torch.gather(features, 1, index[..., None].expand_as(features))
        hidden, mask = student.encode(shuffled, lengths)  # (B, T', D); T' < T when the model pools time
        stride = frames / hidden.shape[1]
        slots = block_of[:, (torch.arange(hidden.shape[1], device=hidden.device) * stride).long().clamp(max=frames - 1)]
        weights = F.one_hot(slots.clamp(min=0), ORDER_BLOCKS).float() * (slots >= 0)[..., None] * mask[..., None]
        blocks = weights.transpose(1, 2) @ hidden / weights.sum(1)[..., None].clamp(min=1.0)  # (B, 4, D)
        return F.cross_entropy(self.head(blocks).flatten(0, 1), origin.flatten())


class AuxiliaryTerm(nn.Module):
    """The helpers' summed loss as distill.train's `extra_loss`; its own parameters are the heads'."""

    def __init__(self, helpers: list[str], student: nn.Module, architecture: str, example_batch, seed: int):
        super().__init__()
        self.image = self.order = None
        if architecture == "cnn":
            self.image = ImageHelpers(student, example_batch.inputs[0], helpers)
        elif architecture == "speech-transformer":
            self.order = FrameOrderHelper(student, tuple(example_batch.inputs), seed)
        self.student = [student]  # not a submodule: the model's weights are trained by the loop, not here

    def forward(self, state: dict) -> torch.Tensor:
        inputs = state["batch"].for_student()
        if self.image is not None:
            return AUX_WEIGHT * self.image(self.student[0], inputs[0])
        return AUX_WEIGHT * self.order(self.student[0], *inputs)
