"""The user's own model, checked before anything loads it: size, zip safety, file kinds, ONNX inputs.

This runs in the web process and the CLI, so it imports no torch, onnx or onnxruntime: an ONNX
file's inputs are read straight from its protobuf wire format, and a zip is inspected entry by
entry before a single byte is unpacked. What needs the real libraries (the ONNX checker,
ONNX Runtime, transformers) happens in the import job (services/engine/imported.py).

Every refusal is a UserError with one sentence a user can act on.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.errors import UserError
from services.onnx_inputs import (OnnxInput, OnnxSummary, check_external_locations, parse_input_shapes,  # noqa: F401
                                  read_first_output, read_onnx_summary, resolve_shapes)

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


# ---- which methods apply -------------------------------------------------------------------

def method_applicability(model: dict) -> list[dict]:
    """Every registered method, whether it applies to this model and, if not, why."""
    from services.catalog import architecture_of
    from services.engine.methods import REGISTRY  # declarations only: no torch

    architecture = architecture_of(model)
    out = []
    for name, method in REGISTRY.items():
        reason = method.why_not(model["format"], architecture, model.get("id", ""))
        out.append({"name": name, "title": method.title, "applies": not reason, "reason": reason})
    return out
