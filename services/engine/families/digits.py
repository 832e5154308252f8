"""The digits CNNs (x1, x2, x4) and the two-headed `digits-multitask`: scikit-learn's 8x8 digits,
trained here with a fixed seed."""
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

    def loss(self, outputs, digits):
        """The training loss of the model's outputs against the digit labels (a tensor of ints)."""
        return nn.functional.cross_entropy(outputs, digits)

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
                loss = self.loss(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
            progress(0.05 + 0.6 * (epoch + 1) / self.epochs,
                     f"training {self.model_id}: epoch {epoch + 1}/{self.epochs}, loss {loss.item():.3f}")
        model.eval()
        model.train_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        return model


class DigitsMultitaskCNN(DigitsCNN):
    """DigitsCNN's trunk with two coupled heads: the digit (10 scores) and its parity (2: even, odd).

    The two heads are the rows of one output layer, split in `forward`: each head is still its own
    linear map of the shared features, and methods that keep a model's last layer whole (structured
    pruning and distill.student must not remove a class) then keep both heads whole."""

    def __init__(self):
        super().__init__(1)
        self.classifier[-1] = nn.Linear(self.classifier[-1].in_features, 10 + 2)

    def forward(self, x):
        scores = self.classifier(self.features(x))
        return scores[:, :10], scores[:, 10:]


# Which coarse label each digit implies: row d is one-hot at d % 2 (column 0 even, 1 odd).
PARITY_COUPLING = np.eye(2, dtype=np.float32)[np.arange(10) % 2]


class DigitsMultitaskAdapter(DigitsAdapter):
    """`digits-multitask`: outputs `digit_logits` (first: the digits task and fidelity read it) and
    `parity_logits` (the digits-parity task); `coupling` says which parity each digit implies."""

    output_names = ("digit_logits", "parity_logits")
    dynamic_axes = {"input": {0: "batch"}, "digit_logits": {0: "batch"}, "parity_logits": {0: "batch"}}
    coupling = PARITY_COUPLING

    def __init__(self, epochs: int = 30):
        super().__init__("digits-multitask", 1, epochs)

    def build(self) -> nn.Module:
        return DigitsMultitaskCNN()

    def loss(self, outputs, digits):
        """Both heads' cross-entropy; the parity label follows from the digit through the coupling."""
        digit_logits, parity_logits = outputs
        return (nn.functional.cross_entropy(digit_logits, digits)
                + nn.functional.cross_entropy(parity_logits, digits % 2))


ADAPTERS = [DigitsAdapter("digits-cnn", 1), DigitsAdapter("digits-cnn-x2", 2), DigitsAdapter("digits-cnn-x4", 4),
            DigitsMultitaskAdapter()]
