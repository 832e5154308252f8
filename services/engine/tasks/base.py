"""The data a model is scored and timed on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


# ONNX element types, as the import records them on an input's spec, and their numpy types
NUMPY_TYPES = {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
               "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
               "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


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
