"""Training for 4-bit weights (quantization-aware training): the weights a later
`quantize.int4_weights` step will store in 4 bits are rounded to that grid in every forward pass
while the student trains, so it learns weights that survive the rounding.

The grid is ONNX Runtime's MatMulNBits one (round to nearest, one scale per block of `block_size`
weights along the input axis; asymmetric blocks span [min(w, 0), max(w, 0)] in 15 steps with a
zero point, symmetric ones ±max|w| in steps of max/8). Gradients pass the rounding unchanged
(the straight-through estimator). When training ends the rounded weights are kept, so the float
model exported afterwards already lies on the grid and the 4-bit quantizer loses almost nothing more.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize


def fake_quantize(weight: torch.Tensor, block_size: int, symmetric: bool) -> torch.Tensor:
    """`weight` (rows, inputs) rounded to the 4-bit block grid along its inputs, as float."""
    rows, inputs = weight.shape
    pad = (-inputs) % block_size
    blocks = nn.functional.pad(weight, (0, pad)).reshape(rows, -1, block_size)
    if symmetric:
        high, low = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
        extreme = torch.where(high.abs() > low.abs(), high, low)
        scale = extreme / -8.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        rounded = (blocks / safe).round().clamp(-8, 7) * scale
    else:
        low = blocks.amin(-1, keepdim=True).clamp(max=0)
        high = blocks.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / 15.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = (-low / safe).round().clamp(0, 15)
        rounded = ((blocks / safe + zero).round().clamp(0, 15) - zero) * scale
    return rounded.reshape(rows, -1)[:, :inputs]


class _OnGrid(nn.Module):
    """A parametrization: the forward pass sees the rounded weight, the gradient reaches the float one."""

    def __init__(self, block_size: int, symmetric: bool):
        super().__init__()
        self.block_size, self.symmetric = block_size, symmetric

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_quantize(weight, self.block_size, self.symmetric) - weight).detach()


def quantized_layers(net: nn.Module, embeddings: bool) -> list[nn.Module]:
    """The layers quantize.int4_weights stores in 4 bits: every nn.Linear (its weight becomes a
    MatMul's), and with `embeddings` every nn.Embedding (a Gather's table, blocks along its width)."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    return [m for m in net.modules() if isinstance(m, kinds) and m.weight.dim() == 2]


@contextmanager
def training_on_grid(net: nn.Module, block_size: int, symmetric: bool, embeddings: bool):
    """Within the block, the forward pass of `net` uses 4-bit-rounded weights; on leaving it, the
    rounded values replace the float ones."""
    layers = quantized_layers(net, embeddings)
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _OnGrid(block_size, symmetric))
    try:
        yield len(layers)
    finally:
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
