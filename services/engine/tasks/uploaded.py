"""What the user's own models are scored and timed on, built from the model row's meta.

- an attached data set:
  - NPZ (data.npz: X, optional y) for an ONNX model: accuracy against y for class logits, fidelity
    otherwise (an NPZ has no second split: fitting sees the scored samples and says so);
  - CSV (text, optional label) for a Hugging Face model: the texts tokenized with the upload's own
    tokenizer;
  - WAV files (16 kHz mono) for an ONNX model with one audio input: the waveform padded or cut to the
    input's length, or the project's log-mel features for a (frames, 80) input (tasks/recordings.py);
  a CSV or WAV set is split: every 5th row is kept for fitting when it has 50 rows or more, and labels
  map to output indices in the order fixed at import (meta["label_names"], see data_fit.label_order);
- a built-in task whose inputs fit the model (an ONNX digits classifier on `digits`);
- otherwise deterministic synthetic inputs of the shapes fixed at import (seeded), scored on
  fidelity; a Hugging Face upload gets a fixed set of Python help paragraphs, tokenized with
  its own tokenizer (random token ids when the upload has none).
"""
from __future__ import annotations

import csv
import importlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from services import data_fit
from services.engine.tasks.base import NUMPY_TYPES, EvalSet
from services.engine.tasks.recordings import audio_inputs
from services.errors import UserError

SEED = 0
SYNTHETIC_SAMPLES = 256
TEXT_SAMPLES = 128
MAX_TOKENS = 64
LATENCY_BATCH = 32
BUILTIN_DATA_TASKS = {"digits": "services.engine.tasks.digits"}  # tasks whose inputs an upload may share
# A user's CSV or WAV data set: every FIT_EVERY-th row goes to fitting (calibration, counting, training)
# when there are at least MIN_ROWS_TO_SPLIT rows; at most MAX_DATA_SAMPLES rows of each part are used,
# evenly spread over the file (a file sorted by label keeps its class mix).
FIT_EVERY = 5
MIN_ROWS_TO_SPLIT = 50
MAX_DATA_SAMPLES = 1024



def meta_of(model: dict) -> dict:
    meta = model.get("meta") or {}
    return json.loads(meta) if isinstance(meta, str) else meta


def _rows_data_set(meta: dict) -> bool:
    """A CSV or WAV data set: read row by row and split for fitting (an NPZ is one array)."""
    return (meta.get("dataset") or {}).get("kind") in ("csv", "wav")


def eval_set(task: str, model: dict, home: Path) -> EvalSet:
    meta = meta_of(model)
    source = model["task"] if task == "fidelity" else task
    if _rows_data_set(meta):
        return user_data_set(meta, Path(home), with_labels=source == "your-data", part="scored")
    if meta.get("kind") == "hf":
        return text_eval_set(meta, Path(home))
    if meta.get("dataset"):
        return dataset_eval_set(meta, Path(home), with_labels=source == "your-data")
    if source in BUILTIN_DATA_TASKS:
        return builtin_eval_set(source, meta)
    return synthetic_eval_set(meta)


def fit_set(task: str, model: dict, home: Path) -> EvalSet:
    """What a method may fit on: the fitting rows of a CSV or WAV data set (every 5th row, never scored;
    all rows of a set under 50 rows, flagged extra["overlaps_scoring"]), help paragraphs that are not
    scored (text uploads), the training split of a built-in task, other synthetic samples; an NPZ data
    set has no second split, so its fit set is the scored data itself and says so."""
    meta = meta_of(model)
    home = Path(home)
    source = model["task"] if task == "fidelity" else task
    if _rows_data_set(meta):
        return user_data_set(meta, home, with_labels=source == "your-data", part="fit")
    if meta.get("kind") == "hf":
        scored = int(meta.get("eval_samples", TEXT_SAMPLES))
        texts = all_paragraphs()[scored:scored + TEXT_SAMPLES]
        feed, described = text_feed(home / meta["folder"], meta["input_names"], int(meta["vocab_size"]),
                                    count=TEXT_SAMPLES, texts=texts)
        extra = {"data": described}
        if "random token" not in described:  # real texts: a step that rebuilds the tokenizer may count them
            extra["texts"] = texts
        return EvalSet(inputs={n: feed[n] for n in meta["input_names"]}, labels=None,
                       latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)), extra=extra)
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


def _dataset_folder(home: Path, dataset: dict) -> Path:
    folder = (home / dataset["path"]).resolve()
    if home.resolve() not in folder.parents:
        raise UserError(f"The data set {dataset['name']} lies outside the data folder.")
    return folder


def dataset_eval_set(meta: dict, home: Path, with_labels: bool) -> EvalSet:
    dataset = meta["dataset"]
    what = f"The data set {dataset['name']!r}"
    if dataset.get("kind", "npz") != "npz":
        raise UserError(f"{what} holds {data_fit.DATA_WORDS.get(dataset['kind'], dataset['kind'])}, which this "
                        f"model cannot read.")
    path = _dataset_folder(home, dataset) / "data.npz"
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
              texts: list[str] | None = None, dataset_name: str | None = None) -> tuple[dict, str]:
    """Token ids (and masks) of `texts` (default: the scored help paragraphs), padded or cut to
    MAX_TOKENS by the upload's own tokenizer; random token ids when it has none, unless the texts are
    a data set's (dataset_name), which cannot be scored without the model's tokenizer."""
    tokenizer = load_tokenizer(folder)
    texts = (paragraphs() if texts is None else texts)[:count]
    if tokenizer is None and dataset_name is not None:
        raise UserError(f"The model folder has no tokenizer that loads (tokenizer.json, or vocab.txt with "
                        f"tokenizer_config.json), so the texts of the data set {dataset_name!r} cannot be turned "
                        f"into its inputs; upload the folder with its tokenizer files.")
    if tokenizer is not None:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                            return_tensors="np")
        feed = {}
        for name in input_names:
            values = encoded.get(name)
            feed[name] = (np.zeros_like(encoded["input_ids"]) if values is None else values).astype(np.int64)
        feed["input_ids"] = np.clip(feed["input_ids"], 0, vocab_size - 1)
        if dataset_name is not None:
            return feed, f"tokenized by the model's own tokenizer, at most {MAX_TOKENS} tokens"
        return feed, f"{len(texts)} paragraphs of Python's help text, at most {MAX_TOKENS} tokens"
    rng = np.random.default_rng(SEED)
    shape = (len(texts), MAX_TOKENS)
    feed = {"input_ids": rng.integers(0, vocab_size, size=shape).astype(np.int64),
            "attention_mask": np.ones(shape, np.int64)}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = np.zeros(shape, np.int64)
    return feed, f"{len(texts)} random token sequences of {MAX_TOKENS} (the upload has no tokenizer)"


def text_eval_set(meta: dict, home: Path) -> EvalSet:
    count = int(meta.get("eval_samples", TEXT_SAMPLES))
    texts = paragraphs()[:count]
    feed, described = text_feed(home / meta["folder"], meta["input_names"], int(meta["vocab_size"]), count)
    extra = {"data": described}
    if "random token" not in described:  # real texts: the pipeline can encode them again (vocab.trim)
        extra["texts"] = texts
    return EvalSet(inputs={n: feed[n] for n in meta["input_names"]}, labels=None,
                   latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)), extra=extra)


# ---- a user's CSV or WAV data set ----------------------------------------------------------------

def split_rows(n: int) -> tuple[list[int], list[int], bool]:
    """(scored rows, fitting rows, whether they overlap). Every FIT_EVERY-th row (the 5th, 10th, ...) is
    kept for fitting, so that calibration, token counting and recovery training never see a scored row;
    a set under MIN_ROWS_TO_SPLIT rows is too small to lose a fifth of its scored rows, so both parts are
    all rows and the fit set says so (extra["overlaps_scoring"])."""
    every = list(range(n))
    if n < MIN_ROWS_TO_SPLIT:
        return every, every, True
    fitting = every[FIT_EVERY - 1::FIT_EVERY]
    return [i for i in every if i % FIT_EVERY != FIT_EVERY - 1], fitting, False


def _spread(indices: list[int], limit: int = MAX_DATA_SAMPLES) -> list[int]:
    if len(indices) <= limit:
        return indices
    picks = np.linspace(0, len(indices) - 1, limit).round().astype(int)
    return [indices[i] for i in picks]


def read_data_rows(home: Path, dataset: dict) -> list[tuple[str, str | None]]:
    """(text or audio path, label or None) per row, in file order: data.csv of a CSV set, labels.csv of
    a WAV set (services/datasets.py writes both)."""
    folder = _dataset_folder(home, dataset)
    name = "data.csv" if dataset["kind"] == "csv" else "labels.csv"
    try:
        with open(folder / name, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows = [(r[0], r[1] if len(header) > 1 else None) for r in reader if r]
    except (OSError, StopIteration, IndexError, csv.Error):
        raise UserError(f"The data set {dataset['name']!r} has no readable {name}; import it again.") from None
    return rows


def data_label_names(home: Path, dataset: dict) -> list[str]:
    """The data set's distinct labels (the classes of its summary, else read from its rows)."""
    if dataset.get("classes"):
        return [str(c) for c in dataset["classes"]]
    return sorted({label for _, label in read_data_rows(home, dataset) if label is not None})


def user_data_set(meta: dict, home: Path, with_labels: bool, part: str) -> EvalSet:
    """The scored (part='scored') or fitting (part='fit') rows of a CSV or WAV data set as model inputs."""
    dataset = meta["dataset"]
    rows = read_data_rows(home, dataset)
    scored, fitting, overlaps = split_rows(len(rows))
    chosen = _spread(scored if part == "scored" else fitting)
    labels = None
    if with_labels:
        names = meta.get("label_names") or data_fit.label_order(data_label_names(home, dataset))[0]
        index = {name: i for i, name in enumerate(names)}
        missing = next((rows[i][1] for i in chosen if rows[i][1] not in index), None)
        if missing is not None:
            raise UserError(f"The data set {dataset['name']!r} has the label {missing!r}, which the model's outputs "
                            f"were not matched to at import; import the model again.")
        labels = np.array([index[rows[i][1]] for i in chosen], np.int64)
    if dataset["kind"] == "csv":
        if meta.get("kind") != "hf":
            raise UserError(f"The data set {dataset['name']!r} holds text, and only a Hugging Face model (with its "
                            f"tokenizer) can read text.")
        texts = [rows[i][0] for i in chosen]
        feed, how = text_feed(home / meta["folder"], meta["input_names"], int(meta["vocab_size"]),
                              count=len(texts), texts=texts, dataset_name=dataset["name"])
        inputs, extra = {n: feed[n] for n in meta["input_names"]}, {"texts": texts}
        unit = "rows"
    else:
        name, spec = _single_input(meta, f"The data set {dataset['name']!r}")
        folder = _dataset_folder(home, dataset)
        x, how = audio_inputs([folder / rows[i][0] for i in chosen], name, spec, dataset["name"])
        inputs, extra, unit = {name: x}, {}, "recordings"
    if overlaps:
        which = f"{len(chosen)} {unit} (too few to split: fitting sees the scored {unit})"
    elif part == "scored":
        which = f"{len(chosen)} scored {unit} (every {FIT_EVERY}th of the {len(rows)} is kept apart for fitting)"
    else:
        which = f"{len(chosen)} fitting {unit} (every {FIT_EVERY}th of the {len(rows)}; never scored)"
    extra["data"] = f"{which} of the data set {dataset['name']}, {how}"
    if overlaps and part == "fit":
        extra["overlaps_scoring"] = True
    return EvalSet(inputs=inputs, labels=labels, latency_batch=int(meta.get("latency_batch", LATENCY_BATCH)),
                   extra=extra)
