"""The digits CNNs (x1, x2, x4): scikit-learn's 8x8 digits, trained here with a fixed seed."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from services.engine.families.base import ModelAdapter, Progress
from services.engine.tasks.digits import digits_data

TRAIN_SEED = 0


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a pooling and two linear layers; `width` scales every layer."""

    def __init__(self, width: int = 1):
        super().__init__()
        c1, c2, hidden = 16 * width, 32 * width, 32 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsAdapter(ModelAdapter):
    output_kind = "logits"

    def __init__(self, model_id: str, width: int, epochs: int = 30):
        self.model_id = model_id
        self.width = width
        self.epochs = epochs

    def build(self) -> nn.Module:
        return DigitsCNN(self.width)

    def example_inputs(self) -> tuple:
        return (torch.from_numpy(digits_data().x_test[:1]),)

    def create(self, progress: Progress) -> nn.Module:
        """Train from scratch with a fixed seed (deterministic on one machine)."""
        torch.manual_seed(TRAIN_SEED)
        np.random.seed(TRAIN_SEED)
        model = self.build()
        data = digits_data()
        x = torch.from_numpy(data.x_train)
        y = torch.from_numpy(data.y_train)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(TRAIN_SEED)
        started = time.perf_counter()
        model.train()
        for epoch in range(self.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 64):
                batch = order[start:start + 64]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
            progress(0.05 + 0.6 * (epoch + 1) / self.epochs,
                     f"training {self.model_id}: epoch {epoch + 1}/{self.epochs}, loss {loss.item():.3f}")
        model.eval()
        model.train_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        return model


ADAPTERS = [DigitsAdapter("digits-cnn", 1), DigitsAdapter("digits-cnn-x2", 2), DigitsAdapter("digits-cnn-x4", 4)]
