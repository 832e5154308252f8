"""Which of the user's data sets a model can be scored on, decided before anything is stored: the
kinds each model reads (text for Hugging Face models; arrays or audio for ONNX ones), how audio feeds an
input, how label names map to class outputs, and whether the class counts match. No torch, no onnx."""
from __future__ import annotations

import json
import re
from pathlib import Path

from services.errors import UserError

# ---- what an upload is scored on ----------------------------------------------------------
# fidelity: made-up inputs of the fixed shapes (or the attached data); your-data: the labels of an
# attached data set; digits: the built-in task, for an ONNX model whose input takes 8x8 images.
UPLOAD_TASKS = ("fidelity", "your-data", "digits")

# Which data set a model can read: a Hugging Face model reads text (CSV); an ONNX model reads arrays
# (NPZ) or, through one audio input, 16 kHz audio (a zip of WAV files).
DATA_WORDS = {"csv": "text (a CSV file)", "npz": "arrays (an NPZ file)", "wav": "audio (a zip of WAV files)"}
MEL_BINS = 80  # services/engine/speech/features.py: 80 mel bands, one frame every 20 ms


def output_kind_guess(name: str, dims, producer: str | None = None) -> str:
    """'logits' (class scores: fidelity = same top-1 answer) or 'embedding' (fidelity = cosine), read
    from the first output's producing operator, name and shape."""
    if producer in ("Softmax", "LogSoftmax"):
        return "logits"
    lowered = (name or "").lower()
    if any(word in lowered for word in ("logit", "prob", "class", "score")):
        return "logits"
    if any(word in lowered for word in ("embed", "pool", "hidden", "feature", "sentence", "vector")):
        return "embedding"
    if dims is not None and len(dims) == 2 and isinstance(dims[1], int) and 2 <= dims[1] <= 1000:
        return "logits"
    return "embedding"


def audio_input_layout(input_name: str, spec: dict, dataset_name: str) -> dict:
    """How 16 kHz audio feeds one ONNX input, decided from its shape: a waveform (batch, samples) or
    (batch, 1, samples), padded with silence or cut to that length; or log-mel frames (batch, frames, 80)
    or (batch, 80, frames), computed by the project's own features (20 ms hop, 80 mel bands)."""
    shape = list(spec["sample_shape"])
    wanted = "(" + ", ".join(["batch", *map(str, shape)]) + ")"
    if spec["dtype"] not in ("float", "float16", "double"):
        raise UserError(f"The data set {dataset_name!r} is audio, but the model's input {input_name!r} takes "
                        f"{spec['dtype']} values {wanted}; audio is fed as floating-point samples or log-mel "
                        f"features.", field="dataset")
    if len(shape) == 1:
        return {"kind": "waveform", "samples": shape[0]}
    if len(shape) == 2 and shape[1] == MEL_BINS:
        return {"kind": "log-mel", "frames": shape[0], "mel_first": False}
    if len(shape) == 2 and shape[0] == MEL_BINS:
        return {"kind": "log-mel", "frames": shape[1], "mel_first": True}
    if len(shape) == 2 and shape[0] == 1:
        return {"kind": "waveform", "samples": shape[1]}
    raise UserError(f"The data set {dataset_name!r} is audio, but the model's input {input_name!r} takes {wanted}, "
                    f"which is neither a waveform (batch, samples) nor log-mel frames (batch, frames, {MEL_BINS}), "
                    f"so the audio cannot be fed to it.", field="dataset")


def label_order(classes, id2label: dict | None = None) -> tuple[list[str], str]:
    """The data set's label names in the order of the model's outputs (name i is output i), and how that
    order was decided: 'id2label' when the model's config names exactly these labels (compared without
    case), else 'sorted': the names sorted, numerically when every label is a whole number ('2' before
    '10'), so that the smallest label is output 0."""
    classes = [str(c) for c in classes]
    if id2label:
        try:
            ids = sorted(int(k) for k in id2label)
        except (TypeError, ValueError):
            ids = []
        names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in ids]
        by_fold = {c.casefold(): c for c in classes}
        if (ids == list(range(len(classes))) and len(by_fold) == len(classes)
                and sorted(n.casefold() for n in names) == sorted(by_fold)):
            return [by_fold[n.casefold()] for n in names], "id2label"
    if classes and all(re.fullmatch(r"[+-]?\d+", c) for c in classes):
        return sorted(classes, key=int), "sorted"
    return sorted(classes), "sorted"


def describe_label_order(names: list[str], how: str) -> str:
    shown = ", ".join(f"{name} = {index}" for index, name in enumerate(names[:12]))
    if len(names) > 12:
        shown += f", … ({len(names)} labels)"
    if how == "id2label":
        return f"The data set's labels are matched to the model's outputs by its config's id2label: {shown}."
    return (f"The data set's labels are matched to the model's outputs in sorted order (the model names no "
            f"matching id2label): {shown}.")


def class_count_problem(outputs: int, dataset: dict, n_labels: int | None = None, top_id: int | None = None) -> str:
    """'' when `outputs` class scores can be scored against the data set's labels, else the sentence
    saying why not. Integer class ids (an NPZ without classes.json) must be below `outputs`; named
    labels must be exactly as many as the outputs."""
    name = dataset.get("name", "")
    fix = "attach a data set with the model's classes, or score it on fidelity (task 'fidelity')"
    if top_id is not None:
        if top_id >= outputs:
            return (f"The data set {name!r} has class ids up to {top_id}, but the model gives {outputs} class scores "
                    f"per sample (ids 0 to {outputs - 1}); {fix}.")
        return ""
    if n_labels is not None and n_labels != outputs:
        return (f"The model gives {outputs} class scores per sample, but the data set {name!r} has {n_labels} "
                f"labels; {fix}.")
    return ""


def _dataset_class_problem(outputs: int, dataset: dict) -> str:
    classes = dataset.get("classes") or []
    if not classes:  # an older record without a summary: the import job checks the real labels
        return ""
    if dataset["kind"] == "npz" and dataset.get("label_type") != "string":
        try:
            return class_count_problem(outputs, dataset, top_id=max(int(c) for c in classes))
        except ValueError:
            return ""
    return class_count_problem(outputs, dataset, n_labels=len(classes))


def hf_classifier_labels(config: dict) -> int | None:
    """How many classes a Hugging Face config's sequence-classification head gives, or None when the
    config names no such head (then the model is scored by its mean-pooled embedding)."""
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return None
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default


def check_data_fits(meta: dict, dataset: dict, task: str, folder: Path | None) -> None:
    """Refuse, before anything is stored, a data set the model cannot read or a label count its class
    scores cannot match (the import job checks again with the real model)."""
    kind, data_kind, name = meta["kind"], dataset["kind"], dataset["name"]
    if kind == "hf":
        if data_kind != "csv":
            raise UserError(f"The data set {name!r} holds {DATA_WORDS.get(data_kind, data_kind)}, but a Hugging Face "
                            f"model reads text; attach a CSV data set (columns text,label or text).", field="dataset")
        config_path = folder / "config.json" if folder is not None else None
        if task == "your-data" and config_path is not None and config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return  # transformers reads it in the import job and says what is wrong
            outputs = hf_classifier_labels(config) if isinstance(config, dict) else None
            problem = _dataset_class_problem(outputs, dataset) if outputs else ""
            if problem:
                raise UserError(problem, field="dataset")
        return
    if data_kind == "csv":
        raise UserError(f"The data set {name!r} holds text (a CSV file), but an ONNX model has no tokenizer to turn "
                        f"text into its inputs; attach an NPZ of input arrays (X, optional y), a zip of WAV files "
                        f"for an audio model, or import a Hugging Face text model instead.", field="dataset")
    inputs = meta.get("inputs") or {}
    if len(inputs) != 1:
        raise UserError(f"The data set {name!r} feeds one input, but the model has {len(inputs)} "
                        f"({', '.join(inputs)}).", field="dataset")
    input_name, spec = next(iter(inputs.items()))
    if data_kind == "wav":
        audio_input_layout(input_name, spec, name)
    elif dataset.get("x_shape") and list(dataset["x_shape"][1:]) != list(spec["sample_shape"]):
        want = "(" + ", ".join(["batch", *map(str, spec["sample_shape"])]) + ")"
        raise UserError(f"The data set {name!r} has samples shaped {tuple(dataset['x_shape'][1:])}, but the model's "
                        f"input {input_name!r} takes {want}.", field="dataset")
    output = meta.get("first_output") or {}
    dims = output.get("dims")
    if task == "your-data" and dims and isinstance(dims[-1], int) and dims[-1] > 0 \
            and output_kind_guess(output.get("name", ""), dims) == "logits":
        problem = _dataset_class_problem(dims[-1], dataset)
        if problem:
            raise UserError(problem, field="dataset")
