"""The speech encoder: log-mel frames -> a small Transformer -> per-frame digit CTC and a speaker.

Every weight matrix is an `nn.Linear` (attention included), so the methods that act on linear
layers (magnitude pruning, dynamic quantization of MatMul/Gemm) reach the whole encoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

N_MELS = 80
BLANK = 0
N_TOKENS = 11  # the CTC blank, then digits 0-9 as tokens 1-10


def sinusoids(length: int, channels: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    scale = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    table = torch.zeros(length, channels)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale)
    return table


class TimePooling(nn.Module):
    """Average every r neighbouring frames into one, ceil(T / r) frames out, counting only real frames.

    The rate is any number from 1 up (once-for-all training varies it, a run picks one): at rate 1
    it is the identity and adds nothing to the exported graph; a whole rate averages blocks of r
    frames; a fractional rate (1.5: three frames become two) weights each input frame by how much
    of it falls inside each output frame's window [i r, (i + 1) r), a small matrix product that
    exports to ONNX with the number of frames left dynamic.
    """

    def __init__(self, rate: float = 1):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        learnable = isinstance(self.rate, torch.Tensor)  # a rate being learned (gradients flow to it)
        rate = float(self.rate.detach()) if learnable else float(self.rate)
        if rate == 1.0 and not learnable:
            return x, mask
        if rate.is_integer() and not learnable:
            rate = int(rate)
            batch, frames, channels = x.shape
            pad = (-frames) % rate
            x = F.pad(x * mask[..., None], (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
            summed = x.reshape(batch, -1, rate, channels).sum(2)
            counts = mask.reshape(batch, -1, rate).sum(2)
            return summed / counts.clamp(min=1.0)[..., None], (counts > 0).to(x.dtype)
        frames = x.shape[1]
        if learnable:  # the window edges i * r move with the rate; their number ceil(T / r) is a step
            starts = torch.arange(math.ceil(frames / rate), dtype=x.dtype, device=x.device) * self.rate
            rate = self.rate
        else:
            starts = torch.arange(0, frames, rate, dtype=torch.float32, device=x.device)  # ceil(T / r) windows
        inputs = torch.arange(frames, dtype=torch.float32, device=x.device)
        overlap = (torch.minimum(starts[:, None] + rate, inputs[None, :] + 1)
                   - torch.maximum(starts[:, None], inputs[None, :])).clamp(min=0.0)  # (T', T)
        weights = overlap[None] * mask[:, None, :]  # (B, T', T): padding frames weigh nothing
        counts = weights.sum(-1)
        # a window that only grazes a real frame by rounding error is not a real output frame
        return weights @ x / counts.clamp(min=1e-6)[..., None], (counts > 1e-4).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(d_model // heads)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape

        def split(t):  # (B, T, D) -> (B, heads, T, D / heads)
            return t.reshape(batch, frames, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * self.scale + bias
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(batch, frames, -1))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer layer."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), bias))
        return x + self.dropout(self.ff_out(self.dropout(F.gelu(self.ff_in(self.norm2(x))))))


class SpeechEncoder(nn.Module):
    """features (B, T, 80) log-mel and lengths (B,) -> digit log-probs (B, T', 11) and speaker logits.

    T' = ceil(T / rate) frames: pooling happens after `pool_after` layers. Padded frames are
    masked out of attention and of the speaker's mean; their CTC outputs are to be ignored.
    """

    def __init__(self, n_speakers: int = 12, d_model: int = 128, layers: int = 4, heads: int = 4, d_ff: int = 512,
                 dropout: float = 0.1, pool_after: int = 1, rate: float = 1, max_frames: int = 512):
        super().__init__()
        # Global log-mel statistics of the training audio, set before training and saved with the weights.
        self.register_buffer("feature_mean", torch.zeros(N_MELS))
        self.register_buffer("feature_std", torch.ones(N_MELS))
        self.register_buffer("positions", sinusoids(max_frames, d_model), persistent=False)
        self.input_proj = nn.Linear(N_MELS, d_model)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, dropout) for _ in range(layers))
        self.pool_after = pool_after
        self.pool = TimePooling(rate)
        # The range of pooling rates fine-tuning covered, saved with the weights: [1, 1] for a model
        # trained without pooling, [1, 8] for a once-for-all model (services/engine/speech/train.py).
        self.register_buffer("trained_rates", torch.tensor([float(rate), float(rate)]))
        self.norm = nn.LayerNorm(d_model)
        self.ctc_head = nn.Linear(d_model, N_TOKENS)
        self.speaker_head = nn.Linear(d_model, n_speakers)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def encode(self, features: torch.Tensor, lengths: torch.Tensor, hide: torch.Tensor | None = None,
               hidden_frame: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T', D) and the mask of real frames (B, T') as 0/1 floats.

        Masked-frame pretraining passes `hide` (B, T) bool and `hidden_frame` (D,), a learned vector
        that stands in for the projection of every hidden frame (it is not part of the model).
        """
        x = self.input_proj(self.normalize(features))
        if hide is not None:
            x = torch.where(hide[..., None], hidden_frame.to(x.dtype), x)
        frames = x.shape[1]
        mask = (torch.arange(frames, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        x = self.input_dropout(x + self.positions[:frames])
        for index, layer in enumerate(self.layers):
            x = layer(x, (1.0 - mask)[:, None, None, :] * -1e9)
            if index + 1 == self.pool_after:
                x, mask = self.pool(x, mask)
        return self.norm(x), mask

    def heads(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = torch.log_softmax(self.ctc_head(hidden), dim=-1)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return log_probs, self.speaker_head(pooled)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(*self.encode(features, lengths))


def pooled_lengths(lengths: torch.Tensor, rate: float) -> torch.Tensor:
    """Real frames after pooling at `rate`: ceil(length / rate)."""
    return torch.ceil(lengths.double() / float(rate)).long()
