"""The user's own model, checked before anything loads it: size, zip safety, file kinds, ONNX inputs.

This runs in the web process and the CLI, so it imports no torch, onnx or onnxruntime: an ONNX
file's inputs are read straight from its protobuf wire format, and a zip is inspected entry by
entry before a single byte is unpacked. What needs the real libraries (the ONNX checker,
ONNX Runtime, transformers) happens in the import job (services/engine/imported.py).

Every refusal is a UserError with one sentence a user can act on.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.errors import UserError
from services.onnx_inputs import (OnnxInput, OnnxSummary, check_external_locations, parse_input_shapes,  # noqa: F401
                                  read_onnx_summary, resolve_shapes)
from services.onnx_inputs import _fields, _NotProtobuf, _value_info  # the same wire-format reader, for outputs

# ---- limits --------------------------------------------------------------------------------

DEFAULT_MAX_UPLOAD_MB = 200  # the same as Streamlit's server.maxUploadSize in .streamlit/config.toml
MAX_RATIO = 100  # unpacked / packed; model weights barely compress, a zip bomb compresses thousands of times
MAX_ENTRIES = 5000
CHUNK = 1 << 20


def max_upload_mb() -> int:
    try:
        return max(1, int(os.environ.get("EXPLORER_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)))
    except ValueError:
        return DEFAULT_MAX_UPLOAD_MB


def max_upload_bytes() -> int:
    return max_upload_mb() * 1024 * 1024


def max_unpacked_bytes() -> int:
    """Same setting as the data uploads (services/datasets.py) use."""
    try:
        return int(float(os.environ.get("EXPLORER_MAX_UNPACKED_MB", "1024")) * 1024 * 1024)
    except ValueError:
        return 1024 * 1024 * 1024


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f} MB"


def check_size(size: int, filename: str) -> None:
    if size == 0:
        raise UserError(f"The file {filename} is empty.", field="file")
    if size > max_upload_bytes():
        raise UserError(f"{filename} is {_mb(size)}, over the upload limit of {max_upload_mb()} MB "
                        f"(EXPLORER_MAX_UPLOAD_MB).", field="file")


# ---- which files a model folder may hold ---------------------------------------------------

# A Hugging Face model folder: configuration, safetensors weights, tokenizer files. Anything else
# (code, TensorFlow/Flax weights, other pickles) is left out and never written to disk.
HF_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".md")
HF_PICKLE_NAMES = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")  # refused later unless weights_only loads it


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _hf_keeps(parts: tuple[str, ...]) -> bool:
    name = parts[-1]
    return name.endswith(HF_SUFFIXES) or bool(HF_PICKLE_NAMES.match(name))


@dataclass
class Layout:
    """What a folder or zip holds: 'onnx' (one .onnx file, maybe with its external data) or 'hf'."""
    kind: str
    keep: list[str]  # relative paths to store
    skipped: list[str] = field(default_factory=list)
    onnx_file: str | None = None


def classify(names: list[str], source: str) -> Layout:
    """Decide what a model folder is from its file names (relative, '/'-separated, files only)."""
    visible = [n for n in names if not _hidden(PurePosixPath(n).parts)]
    if "config.json" in visible:
        keep = [n for n in visible if _hf_keeps(PurePosixPath(n).parts)]
        if not any(n.endswith(".safetensors") or HF_PICKLE_NAMES.match(PurePosixPath(n).name) for n in keep):
            raise UserError(f"{source} has a config.json but no model.safetensors weights; save the model with "
                            f"save_pretrained(..., safe_serialization=True) and upload that folder.", field="file")
        return Layout("hf", keep, sorted(set(visible) - set(keep)))
    onnx_files = [n for n in visible if n.lower().endswith(".onnx")]
    if len(onnx_files) == 1:
        return Layout("onnx", visible, onnx_file=onnx_files[0])
    if len(onnx_files) > 1:
        raise UserError(f"{source} holds {len(onnx_files)} .onnx files ({', '.join(sorted(onnx_files)[:3])}); "
                        f"upload one model at a time.", field="file")
    raise UserError(f"{source} holds neither a Hugging Face model (config.json with model.safetensors) nor an "
                    f".onnx file.", field="file")


def _strip_common_folder(names: list[str]) -> tuple[list[str], str]:
    """A zip made by zipping a folder has every entry under that folder: drop it."""
    tops = {PurePosixPath(n).parts[0] for n in names}
    if len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in names):
        top = tops.pop()
        return ["/".join(PurePosixPath(n).parts[1:]) for n in names], top + "/"
    return names, ""


# ---- zip files -----------------------------------------------------------------------------

def _safe_member_name(raw: str, source: str) -> str:
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise UserError(f"{source} has an entry with a NUL character in its name; it was refused.", field="file")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UserError(f"{source} has an entry with an absolute path ({raw!r}); entries must stay inside the "
                        f"zip's own folder, so it was refused.", field="file")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"{source} has an entry that climbs out of its folder ({raw!r}); it was refused.",
                        field="file")
    return "/".join(parts)


def inspect_zip(archive: zipfile.ZipFile, source: str) -> tuple[Layout, dict[str, zipfile.ZipInfo]]:
    """Check every entry's name, type and declared size before extracting anything."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise UserError(f"{source} has {len(infos):,} entries; a model folder has far fewer "
                        f"(at most {MAX_ENTRIES:,} allowed).", field="file")
    files: dict[str, zipfile.ZipInfo] = {}
    packed = unpacked = 0
    for info in infos:
        name = _safe_member_name(info.filename, source)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UserError(f"{source} has a symbolic link ({info.filename}); upload real files only.", field="file")
        if info.flag_bits & 0x1:
            raise UserError(f"{source} is encrypted ({info.filename}); upload an unencrypted zip.", field="file")
        if info.is_dir() or not name:
            continue
        if name in files:
            raise UserError(f"{source} has the entry {name} twice; it was refused.", field="file")
        files[name] = info
        packed += info.compress_size
        unpacked += info.file_size
        if info.file_size > 10 * CHUNK and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise UserError(f"{source} unpacks far larger than it is ({info.filename}: {_mb(info.file_size)} from "
                            f"{_mb(info.compress_size)}), as a zip bomb does; it was refused.", field="file")
    if unpacked > max_unpacked_bytes():
        raise UserError(f"{source} would unpack to {_mb(unpacked)}, over the limit of "
                        f"{_mb(max_unpacked_bytes())}; it was refused.", field="file")
    if unpacked > 10 * CHUNK and unpacked > MAX_RATIO * max(packed, 1):
        raise UserError(f"{source} unpacks far larger than it is ({_mb(unpacked)} from {_mb(packed)}), as a zip "
                        f"bomb does; it was refused.", field="file")
    if not files:
        raise UserError(f"{source} is an empty zip.", field="file")
    stripped, prefix = _strip_common_folder(list(files))
    layout = classify(stripped, source)
    by_name = {short: files[prefix + short] for short in stripped}
    return layout, by_name


def extract_zip(archive: zipfile.ZipFile, layout: Layout, members: dict[str, zipfile.ZipInfo], dest: Path,
                source: str) -> None:
    """Unpack the kept entries into dest, counting real bytes: a declared size may lie."""
    budget = max_unpacked_bytes()
    written = 0
    for name in layout.keep:
        info = members[name]
        target = dest.joinpath(*name.split("/"))
        if dest not in target.parents:  # belt and braces: names were already checked
            raise UserError(f"{source} has an entry that climbs out of its folder ({info.filename}).", field="file")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with archive.open(info) as stream, open(target, "wb") as out:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                written += len(chunk)
                if size > info.file_size or written > budget:
                    raise UserError(f"{source} unpacks to more than it declares ({info.filename}), as a zip bomb "
                                    f"does; it was refused.", field="file")
                out.write(chunk)


# ---- Hugging Face Hub sources --------------------------------------------------------------

HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def parse_hf_source(source: str) -> str:
    repo = source[len("hf:"):].strip()
    if not HF_REPO.match(repo) or ".." in repo:
        raise UserError(f"{source!r} is not a Hugging Face model name; write hf:OWNER/NAME, for example "
                        f"hf:sentence-transformers/all-MiniLM-L6-v2.", field="source")
    return repo


def hf_cache_dir(home: Path) -> Path:
    return Path(home) / "hf-cache"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cached(home: Path, repo: str) -> bool:
    snapshots = hf_cache_dir(home) / ("models--" + repo.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def no_hub_sentence(repo: str) -> str:
    return (f"Could not reach the Hugging Face Hub to fetch {repo} (no network); upload the model folder as a "
            f"zip instead.")


# ---- storing an upload ---------------------------------------------------------------------

def copy_folder(source: Path, dest: Path) -> Layout:
    """A folder given on the command line: same rules as a zip (no links, limits, file kinds)."""
    names, total = [], 0
    for root, dirs, files in os.walk(source, followlinks=False):
        for entry in dirs + files:
            path = Path(root) / entry
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link; upload real files only.", field="file")
        for entry in files:
            path = Path(root) / entry
            total += path.stat().st_size
            names.append(path.relative_to(source).as_posix())
        if len(names) > MAX_ENTRIES:
            raise UserError(f"{source} has more than {MAX_ENTRIES:,} files; a model folder has far fewer.",
                            field="file")
    if not names:
        raise UserError(f"The folder {source} is empty.", field="file")
    layout = classify(names, str(source))
    kept = sum((source / n).stat().st_size for n in layout.keep)
    if kept > max_upload_bytes():
        raise UserError(f"{source} holds {_mb(kept)} of model files, over the upload limit of {max_upload_mb()} MB "
                        f"(EXPLORER_MAX_UPLOAD_MB).", field="file")
    for name in layout.keep:
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)
    return layout


def new_staging_dir(home: Path) -> Path:
    """A private folder under uploads/ to assemble an upload in; renamed into place when complete."""
    import secrets

    root = Path(home) / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".incoming-{secrets.token_hex(8)}"
    staging.mkdir()
    return staging


def stage_upload(source, filename: str | None, staging: Path, shapes: dict) -> tuple[dict, str, str]:
    """Check and write an upload into the staging folder; returns (meta, default name, description)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not filename:
            raise UserError("An upload needs its file name.", field="file")
        data, label = bytes(source), Path(filename).name
        check_size(len(data), label)
    else:
        path = Path(str(source)).expanduser()
        label = path.name or str(path)
        if not path.exists():
            raise UserError(f"No such file or folder: {source}", field="file")
        if path.is_dir():
            layout = copy_folder(path, staging)
            return _finish_layout(layout, staging, label, shapes, "folder")
        check_size(path.stat().st_size, label)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"Cannot read {source}: {error.strerror}.", field="file") from None
    suffix = Path(label).suffix.lower()
    if suffix == ".onnx":
        summary = read_onnx_summary(data, label)
        check_external_locations(summary, "model.onnx", None)
        inputs = resolve_shapes(summary.inputs, shapes)
        (staging / "model.onnx").write_bytes(data)
        meta = {"kind": "onnx", "onnx_file": "model.onnx", "files": ["model.onnx"], "inputs": inputs,
                "source": label, "first_output": read_first_output(data)}
        return meta, Path(label).stem, f"Your ONNX model, uploaded as {label}."
    if suffix == ".zip":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                layout, members = inspect_zip(archive, label)
                extract_zip(archive, layout, members, staging, label)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError):
            raise UserError(f"{label} is not a readable zip file.", field="file") from None
        return _finish_layout(layout, staging, label, shapes, "zip")
    raise UserError(f"{label} is not a model file that can be imported: upload an .onnx file or a .zip of a model "
                    f"folder (config.json with model.safetensors), or name hf:OWNER/NAME.", field="file")


def _finish_layout(layout, staging: Path, label: str, shapes: dict, how: str) -> tuple[dict, str, str]:
    stem = Path(label).stem if how == "zip" else label
    meta = {"kind": layout.kind, "files": layout.keep, "skipped_files": layout.skipped, "source": label}
    if layout.kind == "hf":
        return meta, stem, f"A Hugging Face model folder, uploaded as {label}."
    onnx_bytes = (staging / layout.onnx_file).read_bytes()
    summary = read_onnx_summary(onnx_bytes, layout.onnx_file)
    check_external_locations(summary, layout.onnx_file, set(layout.keep))
    meta.update(onnx_file=layout.onnx_file, inputs=resolve_shapes(summary.inputs, shapes),
                first_output=read_first_output(onnx_bytes))
    return meta, stem, f"Your ONNX model {layout.onnx_file}, uploaded as {label}."


# ---- what an upload is scored on ----------------------------------------------------------
# fidelity: made-up inputs of the fixed shapes (or the attached data); your-data: the labels of an
# attached data set; digits: the built-in task, for an ONNX model whose input takes 8x8 images.
UPLOAD_TASKS = ("fidelity", "your-data", "digits")

# Which data set a model can read: a Hugging Face model reads text (CSV); an ONNX model reads arrays
# (NPZ) or, through one audio input, 16 kHz audio (a zip of WAV files).
DATA_WORDS = {"csv": "text (a CSV file)", "npz": "arrays (an NPZ file)", "wav": "audio (a zip of WAV files)"}
MEL_BINS = 80  # services/engine/speech/features.py: 80 mel bands, one frame every 20 ms


def read_first_output(data) -> dict | None:
    """The name and declared dims of an ONNX graph's first output, from the wire format (None when
    unreadable: the import job reads it again with ONNX Runtime)."""
    buf = memoryview(data)
    try:
        graph = next((value for number, wire, value in _fields(buf, 0, len(buf)) if number == 7 and wire == 2), None)
        if graph is None:
            return None
        for number, wire, value in _fields(buf, *graph):
            if number == 12 and wire == 2:
                output = _value_info(buf, value)
                return {"name": output.name, "dims": output.dims}
    except (_NotProtobuf, UserError):
        return None
    return None


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


# ---- which methods apply -------------------------------------------------------------------

def method_applicability(model: dict) -> list[dict]:
    """Every registered method, whether it applies to this model and, if not, why."""
    from services.catalog import architecture_of
    from services.engine.methods import REGISTRY  # declarations only: no torch

    architecture = architecture_of(model)
    out = []
    for name, method in REGISTRY.items():
        reason = method.why_not(model["format"], architecture)
        out.append({"name": name, "title": method.title, "applies": not reason, "reason": reason})
    return out
