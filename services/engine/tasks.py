"""Task data and scoring. Every score is computed on ONNX Runtime outputs of the exported model."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SHARE = 0.3


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=1)
def digits_data() -> DigitsData:
    """scikit-learn's 8x8 digits with a fixed, stratified split (1257 train / 540 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SHARE, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    return DigitsData(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def task_inputs(task: str, model_task: str) -> np.ndarray:
    """The inputs a model is scored and timed on: the model's own task data."""
    if model_task == "digits":
        return digits_data().x_test
    raise ValueError(f"no data for task {model_task!r}")


def score(task: str, model_task: str, outputs: np.ndarray, reference_outputs: np.ndarray) -> dict:
    """Score the compressed model's outputs; fidelity compares with the original's outputs."""
    agreement = float(np.mean(outputs.argmax(axis=1) == reference_outputs.argmax(axis=1)))
    if task == "fidelity":
        return {"score": agreement, "score_name": "fidelity", "fidelity": agreement}
    if task == "digits":
        accuracy = float(np.mean(outputs.argmax(axis=1) == digits_data().y_test))
        return {"score": accuracy, "score_name": "accuracy", "fidelity": agreement}
    raise ValueError(f"unknown task {task!r}")
