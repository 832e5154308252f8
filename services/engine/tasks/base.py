"""The data a model is scored and timed on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EvalSet:
    inputs: dict[str, np.ndarray]  # ONNX input name -> array, batch first, every sample of the split
    labels: Any = None  # whatever the task's scorer needs; None for label-free tasks
    latency_batch: int = 256  # batch size of the batch latency and throughput
    extra: dict = field(default_factory=dict)  # task-specific details for the scorer

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first n samples as a feed (repeated when the split is smaller than n)."""
        out = {}
        for name, values in self.inputs.items():
            if len(values) >= n:
                out[name] = values[:n]
            else:
                repeats = -(-n // len(values))
                out[name] = np.concatenate([values] * repeats)[:n]
        return out
