"""The recovery objectives as the product offers them: names, one-sentence explanations, what each
needs, and the iterative pruning schedule. No torch here: the web process and recipe validation read
this; services/engine/recovery.py does the training."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Objective:
    name: str
    title: str
    explanation: str  # one sentence for a non-expert
    needs_labels: bool = False


OBJECTIVES = {
    "none": Objective("none", "No recovery", "Keep the compressed model as it comes out of the last step."),
    "supervised": Objective(
        "supervised", "Supervised fine-tuning",
        "Trains the compressed model on the task's labelled examples; needs labels, and it can drift from what "
        "the original did on inputs the labels do not cover.", needs_labels=True),
    "distill": Objective(
        "distill", "Distillation from the original",
        "Trains the compressed model to give the original's outputs and inner representations on the fitting "
        "samples; needs no labels, and aims straight at agreeing with the original."),
    "contrastive": Objective(
        "contrastive", "Contrastive (CAP)",
        "Pulls each sample's representation toward the original's representation of the same sample and away "
        "from the other samples' (Contrastive Pruning); uses labels when there are some, works without."),
    "masked": Objective(
        "masked", "Masked reconstruction",
        "Hides a quarter of each input (tokens, image patches or audio frames) and trains the compressed model "
        "to compute from the rest what the original computes from everything; needs no labels and makes it "
        "robust to missing parts."),
    "momentum-contrast": Objective(
        "momentum-contrast", "Momentum contrast (MoCo)",
        "Hides a quarter of each input and trains the compressed model to tell which sample it was, out of many "
        "recent ones, by comparing with a slowly updated copy of itself; needs no labels (its final layer follows "
        "the labels when there are some, else the original's answers)."),
}
UNFREEZE = {
    "all": "every layer is trained",
    "frozen": "only the head (the last layer group) is trained",
    "gradual": "layers are unfrozen from the top down during training",
}


# ---- what the data and the model allow --------------------------------------------------------------

def has_class_labels(fit, output_kind: str) -> bool:
    """Whether a fitting set carries one integer class label per sample for a class-score output."""
    labels = getattr(fit, "labels", None)
    return (output_kind == "logits" and isinstance(labels, np.ndarray) and labels.ndim == 1
            and labels.dtype.kind in "iu" and len(labels) == len(next(iter(fit.inputs.values()))))


def why_not(objective: str, architecture: str, output_kind: str, labelled: bool, maskable: bool = True) -> str:
    """'' when the objective can run on such a model and data, else the reason in one sentence."""
    if objective == "none":
        return ""
    if architecture not in ("cnn", "text-transformer", "speech-transformer"):
        return ("recovery trains a PyTorch model; an ONNX upload has no training graph here (bring a Hugging Face "
                "model or use a built-in one).")
    if OBJECTIVES[objective].needs_labels and not labelled:
        return ("needs class labels on the fitting samples, and this model's data has none (or its output is not "
                "class scores): use distill, contrastive or masked, which need no labels.")
    if objective in ("masked", "momentum-contrast") and not maskable:
        return "needs a mask token to hide words behind, and this model's tokenizer has none."
    return ""


# ---- rounds: prune a little, recover, prune more ---------------------------------------------------

# prune.structured is left out: a round's small share of a narrow layer rounds to no channel at all
# (and a snapshot of an earlier round would be wider than the model it is contrasted with).
ROUND_METHODS = ("prune.magnitude",)


def round_params(step: dict, round_number: int, rounds: int) -> dict | None:
    """The step's parameters in this round of an iterative schedule, None when it does not run in it.
    A pruning step reaches its amount over the rounds on a geometric schedule (each round removes the
    same share of what is left): prune.magnitude's amount counts every weight, zeros included, so round
    r asks for 1 - (1 - amount)^(r/R) in all. Other steps run once, in the first round."""
    params = step["params"]
    if rounds == 1:
        return params
    if step["method"] not in ROUND_METHODS:
        return params if round_number == 1 else None
    return {**params, "amount": 1.0 - (1.0 - params["amount"]) ** (round_number / rounds)}
