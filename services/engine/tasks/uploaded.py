"""What the user's own models are scored and timed on, built from the model row's meta.

- an attached data set (its data.npz: X, optional y): accuracy against y for class logits,
  fidelity otherwise;
- a built-in task whose inputs fit the model (an ONNX digits classifier on `digits`);
- otherwise deterministic synthetic inputs of the shapes fixed at import (seeded), scored on
  fidelity; a Hugging Face upload gets a fixed set of Python help paragraphs, tokenized with
  its own tokenizer (random token ids when the upload has none).
"""
from __future__ import annotations

import importlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from services.engine.tasks.base import EvalSet
from services.errors import UserError

SEED = 0
SYNTHETIC_SAMPLES = 256
TEXT_SAMPLES = 128
MAX_TOKENS = 64
LATENCY_BATCH = 32
BUILTIN_DATA_TASKS = {"digits": "services.engine.tasks.digits"}  # tasks whose inputs an upload may share

NUMPY_TYPES = {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
               "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
               "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


def meta_of(model: dict) -> dict:
    meta = model.get("meta") or {}
    return json.loads(meta) if isinstance(meta, str) else meta


def eval_set(task: str, model: dict, home: Path) -> EvalSet:
    meta = meta_of(model)
    if meta.get("kind") == "hf":
        return text_eval_set(meta, Path(home))
    source = model["task"] if task == "fidelity" else task
    if meta.get("dataset"):
        return dataset_eval_set(meta, Path(home), with_labels=source == "your-data")
    if source in BUILTIN_DATA_TASKS:
        return builtin_eval_set(source, meta)
    return synthetic_eval_set(meta)


def fit_set(task: str, model: dict, home: Path) -> EvalSet:
    """What a method may fit on: help paragraphs that are not scored (text uploads), the training
    split of a built-in task, other synthetic samples; a user's data set has no second split, so its
    fit set is the scored data itself and says so (extra["overlaps_scoring"])."""
    meta = meta_of(model)
    home = Path(home)
    if meta.get("kind") == "hf":
        scored = int(meta.get("eval_samples", TEXT_SAMPLES))
        feed, described = text_feed(home / meta["folder"], meta["input_names"], int(meta["vocab_size"]),
                                    count=TEXT_SAMPLES, texts=all_paragraphs()[scored:scored + TEXT_SAMPLES])
        return EvalSet(inputs={n: feed[n] for n in meta["input_names"]}, labels=None,
                       latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)), extra={"data": described})
    source = model["task"] if task == "fidelity" else task
    if meta.get("dataset"):
        built = dataset_eval_set(meta, home, with_labels=source == "your-data")
        built.extra["overlaps_scoring"] = True
        return built
    if source in BUILTIN_DATA_TASKS:
        module = importlib.import_module(BUILTIN_DATA_TASKS[source])
        train = module.fit_set(source)
        name, spec = _single_input(meta, f"Task {source!r}")
        x = next(iter(train.inputs.values()))
        return EvalSet(inputs={name: _check_fits(name, spec, x, f"Task {source!r}")}, labels=train.labels,
                       latency_batch=train.latency_batch, extra={"data": f"the {source} training split"})
    return synthetic_eval_set(meta, seed=SEED + 1)


def score(task: str, evaluation: EvalSet, outputs: np.ndarray) -> dict:
    """'your-data': the share of samples whose top answer is their label."""
    predicted = outputs.reshape(len(outputs), -1).argmax(axis=1)
    return {"score": float(np.mean(predicted == evaluation.labels)), "score_name": "accuracy"}


# ---- ONNX uploads ------------------------------------------------------------------------------

def synthetic_eval_set(meta: dict, seed: int = SEED) -> EvalSet:
    """Seeded inputs of the fixed shapes: normal floats, token-like integers below the table they
    index, ones for masks, zeros for token types."""
    rng = np.random.default_rng(seed)
    count = min(SYNTHETIC_SAMPLES, int(meta.get("eval_samples", SYNTHETIC_SAMPLES)))
    inputs = {}
    for name, spec in meta["inputs"].items():
        shape = (SYNTHETIC_SAMPLES, *spec["sample_shape"])  # drawn in full, then cut: the same first samples
        dtype = NUMPY_TYPES.get(spec["dtype"])
        if dtype is None:
            raise UserError(f"The model's input {name!r} takes {spec['dtype']} values, which cannot be made up "
                            f"for scoring; attach a data set instead.")
        fill = spec.get("fill", "normal")
        if fill == "ones":
            values = np.ones(shape, dtype)
        elif fill == "zeros":
            values = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            values = rng.integers(0, max(1, int(spec.get("high", 2))), size=shape).astype(dtype)
        elif dtype == np.bool_:
            values = rng.integers(0, 2, size=shape).astype(bool)
        else:
            values = rng.standard_normal(shape).astype(dtype)
        inputs[name] = values[:count]
    return EvalSet(inputs=inputs, labels=None, latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)),
                   extra={"data": f"{count} synthetic samples (seed {seed})"})


def _single_input(meta: dict, what: str) -> tuple[str, dict]:
    if len(meta["inputs"]) != 1:
        raise UserError(f"{what} feeds one input, but the model has {len(meta['inputs'])} "
                        f"({', '.join(meta['inputs'])}).")
    return next(iter(meta["inputs"].items()))


def _check_fits(name: str, spec: dict, x: np.ndarray, what: str) -> np.ndarray:
    if list(x.shape[1:]) != list(spec["sample_shape"]):
        want = "(" + ", ".join(["batch", *map(str, spec["sample_shape"])]) + ")"
        raise UserError(f"{what} has samples shaped {tuple(x.shape[1:])}, but the model's input {name!r} takes "
                        f"{want}.")
    dtype = NUMPY_TYPES.get(spec["dtype"], np.float32)
    return x.astype(dtype, copy=False)


def dataset_eval_set(meta: dict, home: Path, with_labels: bool) -> EvalSet:
    dataset = meta["dataset"]
    path = (home / dataset["path"] / "data.npz").resolve()
    if home.resolve() not in path.parents:
        raise UserError(f"The data set {dataset['name']} lies outside the data folder.")
    what = f"The data set {dataset['name']!r}"
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["X"])
            y = np.asarray(data["y"]) if "y" in data.files else None
    except (OSError, KeyError, ValueError):
        raise UserError(f"{what} has no readable data.npz with an X array; it cannot feed an ONNX model.") from None
    name, spec = _single_input(meta, what)
    inputs = {name: _check_fits(name, spec, x, what)}
    labels = y if with_labels else None
    return EvalSet(inputs=inputs, labels=labels, latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)),
                   extra={"data": f"{len(x)} samples of the data set {dataset['name']}"})


def builtin_eval_set(task: str, meta: dict) -> EvalSet:
    module = importlib.import_module(BUILTIN_DATA_TASKS[task])
    built = module.eval_set(task)
    what = f"Task {task!r}"
    if len(built.inputs) != 1:
        raise UserError(f"{what} cannot feed an uploaded model.")
    x = next(iter(built.inputs.values()))
    name, spec = _single_input(meta, what)
    return EvalSet(inputs={name: _check_fits(name, spec, x, what)}, labels=built.labels,
                   latency_batch=built.latency_batch, extra={**built.extra, "data": f"the {task} test split"})


# ---- Hugging Face uploads ----------------------------------------------------------------------

def paragraphs() -> list[str]:
    """TEXT_SAMPLES paragraphs of Python's own help text, the same for everyone (the scored ones)."""
    return all_paragraphs()[:TEXT_SAMPLES]


@lru_cache(maxsize=1)
def all_paragraphs() -> list[str]:
    """Every help paragraph of at least 80 characters, in a fixed shuffled order."""
    from pydoc_data.topics import topics

    found = []
    for topic in sorted(topics):
        for paragraph in topics[topic].split("\n\n"):
            text = re.sub(r"\s+", " ", paragraph).strip()
            if len(text) >= 80:
                found.append(text)
    random.Random(SEED).shuffle(found)
    return found


def load_tokenizer(folder: Path):
    """The upload's own tokenizer (files only, never code), or None when it has none that loads."""
    names = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model")
    if not any((folder / n).is_file() for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception:  # a tokenizer that does not load: fall back to random token ids
        return None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            return None
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_feed(folder: Path, input_names: list[str], vocab_size: int, count: int = TEXT_SAMPLES,
              texts: list[str] | None = None) -> tuple[dict, str]:
    tokenizer = load_tokenizer(folder)
    texts = (paragraphs() if texts is None else texts)[:count]
    if tokenizer is not None:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                            return_tensors="np")
        feed = {}
        for name in input_names:
            values = encoded.get(name)
            feed[name] = (np.zeros_like(encoded["input_ids"]) if values is None else values).astype(np.int64)
        feed["input_ids"] = np.clip(feed["input_ids"], 0, vocab_size - 1)
        return feed, f"{len(texts)} paragraphs of Python's help text, at most {MAX_TOKENS} tokens"
    rng = np.random.default_rng(SEED)
    shape = (len(texts), MAX_TOKENS)
    feed = {"input_ids": rng.integers(0, vocab_size, size=shape).astype(np.int64),
            "attention_mask": np.ones(shape, np.int64)}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = np.zeros(shape, np.int64)
    return feed, f"{len(texts)} random token sequences of {MAX_TOKENS} (the upload has no tokenizer)"


def text_eval_set(meta: dict, home: Path) -> EvalSet:
    feed, described = text_feed(home / meta["folder"], meta["input_names"], int(meta["vocab_size"]),
                                int(meta.get("eval_samples", TEXT_SAMPLES)))
    return EvalSet(inputs={n: feed[n] for n in meta["input_names"]}, labels=None,
                   latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)), extra={"data": described})
