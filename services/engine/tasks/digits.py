"""scikit-learn's 8x8 digits: a fixed, stratified split and accuracy; `digits-parity` (even or odd,
on digits-multitask's parity head) reads the same images."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from services.engine.tasks.base import EvalSet

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
    """1257 train / 540 test images, the same split everywhere."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SHARE, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    return DigitsData(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


PARITY_OUTPUT = "parity_logits"  # digits-multitask's second head


def _as_task(task: str, evaluation: EvalSet, fitting: bool = False) -> EvalSet:
    """`digits-parity` is the same images read by digits-multitask's parity head: scored against even (0)
    or odd (1). Its fitting split keeps the digit labels: they are the classes of the model's first output,
    which recovery trains, and the parity follows from them (the model's coupling)."""
    if task == "digits":
        return evaluation
    if task != "digits-parity":
        raise ValueError(f"not a digits task: {task!r}")
    labels = evaluation.labels if fitting else evaluation.labels % 2
    return EvalSet(inputs=evaluation.inputs, labels=labels, latency_batch=evaluation.latency_batch,
                   extra={**evaluation.extra, "output_name": PARITY_OUTPUT})


def eval_set(task: str = "digits") -> EvalSet:
    data = digits_data()
    return _as_task(task, EvalSet(inputs={"input": data.x_test}, labels=data.y_test, latency_batch=256))


def fit_set(task: str = "digits") -> EvalSet:
    """The 1257 training images (the test split is never fitted on), labelled with their digits."""
    data = digits_data()
    return _as_task(task, EvalSet(inputs={"input": data.x_train}, labels=data.y_train, latency_batch=256,
                                  extra={"data": f"{len(data.x_train)} training images"}), fitting=True)


def score(task: str, evaluation: EvalSet, outputs: np.ndarray) -> dict:
    if task == "digits-parity" and (outputs.ndim != 2 or outputs.shape[1] != 2):
        raise ValueError(f"digits-parity scores the parity head {PARITY_OUTPUT!r} (batch, 2); got shape "
                         f"{outputs.shape}: the scorer was handed another output of the model")
    accuracy = float(np.mean(outputs.argmax(axis=1) == evaluation.labels))
    return {"score": accuracy, "score_name": "accuracy"}
