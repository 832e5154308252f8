"""The user's own data: validate an upload (CSV, NPZ, or a zip of WAV files) and store it normalized.

Storage contract (stable: the engine, the pages and the CLI read these files)
------------------------------------------------------------------------------
A dataset is a row of the `datasets` table (id, name, kind 'csv' | 'npz' | 'wav', has_labels 0/1,
n_samples, summary JSON, path, created_at) and a folder `EXPLORER_HOME/<path>` with
path = `datasets/<id>` (id: 128 random bits from `secrets`, hex). The folder appears whole or not
at all: it is written in `datasets/.incoming-*` inside the home, renamed into place, and the row is
inserted last. An upload that fails validation leaves no row and no folder.

- 'csv' -> `data.csv`: UTF-8 (no BOM), "\\n" line ends, header `text,label` (labeled) or `text`
  (unlabeled), one row per sample, quoted as Python's csv module does. Texts and labels are
  Unicode-NFC, stripped of surrounding whitespace, never empty.
- 'npz' -> `data.npz` (numpy.savez, no object arrays): `X` float32 of shape (N, ...) with at least
  two dimensions, samples first; when labeled `y` int64 of shape (N,), class ids. When the uploaded
  labels were strings, `classes.json` is the JSON list of class names, sorted: y == i means
  classes[i]. Integer labels are kept as given (then there is no classes.json).
- 'wav' -> `audio/<label>/<n>.wav` (labeled) or `audio/<n>.wav` (unlabeled): 16 kHz, mono, 16-bit
  PCM; n counts from 0 in each folder, in the order of the uploaded file names. Stereo is averaged
  to mono; other sample rates are resampled with scipy.signal.resample_poly (which low-passes).
  `labels.csv` lists every file in that order: header `path,label` (labeled) or `path`, the path
  relative to the dataset folder (e.g. `audio/dog/0.wav`).

summary (JSON): `n_samples`, `has_labels`, and `classes` ({label: count}, labels as strings) when
labeled. csv: `text_chars` {min, max, mean}. npz: `X` {shape, dtype, source_dtype}, `label_type`
('int' | 'string'). wav: `sample_rate`, `duration_s` {min, max, total}, `converted` (how many files
were converted) and `conversions` [{from, to, count, files (the first 50)}], `ignored` (names of
__MACOSX / .DS_Store entries skipped).

Rows in messages are counted as a spreadsheet shows them: the header is row 1.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from services.errors import UserError
from storage import utcnow

SAMPLE_RATE = 16_000
MAX_ZIP_RATIO = 100        # an entry unpacking to over 100x its packed size (and over 1 MiB) is a zip bomb
MAX_ZIP_ENTRIES = 200_000
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
LABEL_FREE_OBJECTIVES = ("none", "distill", "contrastive", "masked", "momentum-contrast")
USES = {True: "labels: accuracy can be measured and supervised recovery is possible",
        False: "no labels: scored by fidelity; only label-free recovery objectives"}


def max_upload_bytes() -> int:
    return int(float(os.environ.get("EXPLORER_MAX_UPLOAD_MB", "200")) * 1024 * 1024)


def max_unpacked_bytes() -> int:
    return int(float(os.environ.get("EXPLORER_MAX_UNPACKED_MB", "1024")) * 1024 * 1024)


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:,.1f} KB"


def _fail(message: str) -> UserError:
    return UserError(message, field="file")


# ---- the public functions (services.api calls these) -------------------------------------------

def check_size(filename: str, n_bytes: int) -> None:
    if n_bytes == 0:
        raise _fail(f"'{filename}' is empty (0 bytes).")
    if n_bytes > max_upload_bytes():
        raise _fail(f"'{filename}' is {_mb(n_bytes)}, over the upload limit of {_mb(max_upload_bytes())} "
                    "(EXPLORER_MAX_UPLOAD_MB).")


def read_upload_file(path: Path | str) -> bytes:
    """The bytes of a file named on the command line, its size checked before it is read."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"No such file: {path}.")
    check_size(path.name, path.stat().st_size)
    return path.read_bytes()


def import_dataset(db, filename: str, data: bytes, name: str | None = None) -> dict:
    """Validate an upload, store it normalized (see the module docstring) and return its record."""
    filename = Path(filename or "upload").name
    name = (name or "").strip() or Path(filename).stem
    if len(name) > 100:
        raise UserError(f"The name is {len(name)} characters long; keep it to 100.", field="name")
    check_size(filename, len(data))
    kind = {".csv": "csv", ".npz": "npz", ".zip": "wav"}.get(Path(filename).suffix.lower())
    if kind is None:
        raise _fail(f"Unknown file type '{Path(filename).suffix or '(none)'}' for '{filename}': upload a .csv "
                    "(columns text,label or text), a .npz (arrays X and optional y) or a .zip of WAV files.")
    home = Path(db.home).resolve()
    root = home / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_incoming(root)
    if kind == "csv":
        rows, has_labels, summary = parse_csv(data, filename)  # validate everything before writing
        write = lambda folder: _write_csv(folder, rows, has_labels)  # noqa: E731
    elif kind == "npz":
        X, y, classes, summary = parse_npz(data, filename)
        write = lambda folder: _write_npz(folder, X, y, classes)  # noqa: E731
    else:
        from services.wav_zip import convert_wavs, plan_wav_zip  # imports this module's helpers

        plan = plan_wav_zip(data, filename)  # every entry checked before a byte is unpacked
        summary = None
    dataset_id = secrets.token_hex(16)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    final = root / dataset_id
    try:
        if kind == "wav":
            summary = convert_wavs(plan, incoming)
        else:
            write(incoming)
        os.rename(incoming, final)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    row = {"id": dataset_id, "name": name, "kind": kind, "has_labels": int(summary["has_labels"]),
           "n_samples": summary["n_samples"], "summary": json.dumps(summary),
           "path": final.relative_to(home).as_posix(), "created_at": utcnow()}
    try:
        db["datasets"].insert(row)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return get_dataset(db, dataset_id)


def list_datasets(db) -> list[dict]:
    return [_record(r) for r in db.query("SELECT * FROM datasets ORDER BY created_at DESC, rowid DESC")]


def get_dataset(db, dataset_id: str) -> dict:
    rows = list(db.query("SELECT * FROM datasets WHERE id = ?", [dataset_id]))
    if not rows:
        known = [r["id"] for r in db.query("SELECT id FROM datasets ORDER BY created_at DESC LIMIT 10")]
        hint = f"; known datasets: {', '.join(known)}" if known else "; no dataset has been imported yet"
        raise UserError(f"Unknown dataset {dataset_id!r}{hint}.", field="dataset")
    return _record(rows[0])


def _record(row: dict) -> dict:
    labeled = bool(row["has_labels"])
    return {**row, "has_labels": labeled, "summary": json.loads(row["summary"]),
            "task": "classification" if labeled else "fidelity",
            "scores": ["accuracy", "fidelity"] if labeled else ["fidelity"],
            "recovery_objectives": ["supervised", *LABEL_FREE_OBJECTIVES] if labeled else list(LABEL_FREE_OBJECTIVES),
            "uses": USES[labeled]}


def _remove_stale_incoming(root: Path) -> None:
    """A process killed mid-import leaves its temporary folder; clear those older than an hour."""
    for folder in root.glob(".incoming-*"):
        try:
            if time.time() - folder.stat().st_mtime > 3600:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _class_counts(labels) -> dict:
    return {str(k): int(v) for k, v in sorted(Counter(labels).items(), key=lambda kv: str(kv[0]))}


# ---- CSV ----------------------------------------------------------------------------------------

def _clean(value: str) -> str:
    return unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n")).strip()


def parse_csv(data: bytes, filename: str) -> tuple[list[tuple[str, ...]], bool, dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise _fail(f"'{filename}' is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line} cannot be "
                    "read. Save it as UTF-8 (in Excel: CSV UTF-8).") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records, header_row = [], 1
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header, header_row = next(reader, None), header_row + 1  # blank lines before the header
        for record in reader:
            records.append(record)
    except csv.Error as error:
        raise _fail(f"'{filename}' row {header_row + len(records) + 1} cannot be read as CSV: {error}.") from None
    if header is None:
        raise _fail(f"'{filename}' has no header row: the first line must be text,label or text.")
    columns = [c.strip().lower() for c in header]
    found = ", ".join(f"'{c.strip()}'" for c in header)
    if "text" not in columns:
        raise _fail(f"'{filename}' needs a header row `text,label` or `text`; found the columns {found}.")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise _fail(f"'{filename}' has the column '{duplicated[0]}' more than once; found the columns {found}.")
    extra = [c.strip() for c, key in zip(header, columns) if key not in ("text", "label")]
    if extra:
        raise _fail(f"'{filename}' has extra columns {', '.join(repr(c) for c in extra)}: only `text` and "
                    "`label` are allowed; remove the others.")
    has_labels = "label" in columns
    text_at, label_at = columns.index("text"), (columns.index("label") if has_labels else None)
    rows = []
    for number, record in enumerate(records, start=header_row + 1):
        if not any(cell.strip() for cell in record):
            continue  # a blank row (a spreadsheet writes one as ",")
        if len(record) != len(columns):
            raise _fail(f"'{filename}' row {number} has {len(record)} fields but the header has {len(columns)} "
                        f"({','.join(columns)}); put quotes around text that contains commas.")
        value = _clean(record[text_at])
        if not value:
            raise _fail(f"'{filename}' row {number}: the text is empty.")
        if has_labels:
            label = _clean(record[label_at])
            if not label:
                raise _fail(f"'{filename}' row {number}: the label is empty.")
            rows.append((value, label))
        else:
            rows.append((value,))
    if len(rows) < 2:
        raise _fail(f"'{filename}' has {len(rows)} data row{'s' if len(rows) != 1 else ''}; at least 2 are needed.")
    lengths = [len(r[0]) for r in rows]
    summary = {"n_samples": len(rows), "has_labels": has_labels,
               "columns": ["text", "label"] if has_labels else ["text"],
               "text_chars": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(rows), 1)}}
    if has_labels:
        summary["classes"] = _class_counts(r[1] for r in rows)
        if len(summary["classes"]) == 1:
            raise _fail(f"'{filename}' needs at least two classes; every row has label '{rows[0][1]}'. "
                        "Leave the label column out to score by fidelity instead.")
    return rows, has_labels, summary


def _write_csv(folder: Path, rows, has_labels: bool) -> None:
    with open(folder / "data.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["text", "label"] if has_labels else ["text"])
        writer.writerows(rows)


# ---- NPZ ----------------------------------------------------------------------------------------

def parse_npz(data: bytes, filename: str):
    if data[:6] == b"\x93NUMPY":
        raise _fail(f"'{filename}' is a single .npy array; save an archive with numpy.savez(file, X=..., y=...).")
    if data[:4] != b"PK\x03\x04":
        raise _fail(f"'{filename}' is not an NPZ archive; save one with numpy.savez(file, X=..., y=...).")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile as error:
        raise _fail(f"'{filename}' is a damaged NPZ archive ({error}).") from None
    if declared > max_unpacked_bytes():
        raise _fail(f"'{filename}' unpacks to {_mb(declared)}, over the limit of {_mb(max_unpacked_bytes())} "
                    "(EXPLORER_MAX_UNPACKED_MB).")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:  # object arrays (pickles) are never loaded
        names = list(arrays.files)
        found = ", ".join(f"'{n}'" for n in names) or "no arrays"
        if "X" not in names:
            raise _fail(f"'{filename}' needs an array named 'X' (and optionally 'y'); found {found}.")
        extra = [n for n in names if n not in ("X", "y")]
        if extra:
            raise _fail(f"'{filename}' holds arrays {', '.join(repr(n) for n in extra)} besides X and y; "
                        "save only X and y.")
        X = _load_array(arrays, "X", filename)
        y = _load_array(arrays, "y", filename) if "y" in names else None
    if X.dtype.kind not in "biuf":
        raise _fail(f"'{filename}': X must hold numbers; it holds {_dtype_words(X.dtype)}.")
    if X.ndim < 2:
        raise _fail(f"'{filename}': X is {X.ndim}-D (shape {X.shape}); it needs one row per sample, shape "
                    "(samples, features...). For one feature per sample use X.reshape(-1, 1).")
    if X.shape[0] < 2:
        raise _fail(f"'{filename}': X has {X.shape[0]} sample{'s' if X.shape[0] != 1 else ''} (shape {X.shape}); "
                    "at least 2 are needed.")
    source_dtype = str(X.dtype)
    with np.errstate(over="ignore"):
        X32 = np.ascontiguousarray(X, dtype=np.float32)
    bad = ~np.isfinite(X32.reshape(len(X32), -1)).all(axis=1)
    if bad.any():
        raise _fail(f"'{filename}': X has a value that is NaN, infinite or too large for float32 in sample "
                    f"{int(np.argmax(bad))} (counting from 0).")
    summary = {"n_samples": int(X.shape[0]), "has_labels": y is not None,
               "X": {"shape": list(X32.shape), "dtype": "float32", "source_dtype": source_dtype}}
    classes = None
    if y is not None:
        y, classes = _clean_labels(y, len(X32), filename)
        summary["label_type"] = "string" if classes is not None else "int"
        names_of = (lambda i: classes[i]) if classes is not None else str
        summary["classes"] = _class_counts(names_of(int(v)) for v in y)
        if len(summary["classes"]) == 1:
            raise _fail(f"'{filename}' needs at least two classes; every label in y is "
                        f"'{next(iter(summary['classes']))}'. Leave y out to score by fidelity instead.")
    return X32, y, classes, summary


def _load_array(arrays, key: str, filename: str) -> np.ndarray:
    try:
        return arrays[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise _fail(f"'{filename}': array '{key}' holds Python objects (a pickle). Only plain numeric or "
                        "string arrays are accepted (for text labels: np.array(labels, dtype=str)); pickles are never "
                        "loaded, since loading one can run code.") from None
        raise _fail(f"'{filename}': array '{key}' cannot be read ({error}).") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise _fail(f"'{filename}': array '{key}' cannot be read ({error}).") from None


def _dtype_words(dtype: np.dtype) -> str:
    return {"U": "text", "S": "bytes", "c": "complex numbers", "M": "dates", "m": "time spans",
            "V": "records"}.get(dtype.kind, "values") + f" (dtype {dtype})"


def _clean_labels(y: np.ndarray, n: int, filename: str) -> tuple[np.ndarray, list[str] | None]:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise _fail(f"'{filename}': y must be 1-D, one label per sample; it has shape {y.shape}.")
    if len(y) != n:
        raise _fail(f"'{filename}': y has {len(y)} labels but X has {n} samples; they must match.")
    if y.dtype.kind in "US":
        names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in y.tolist()]
        names = [unicodedata.normalize("NFC", v).strip() for v in names]
        if "" in names:
            raise _fail(f"'{filename}': y[{names.index('')}] is an empty label.")
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[v] for v in names], dtype=np.int64), classes
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (np.round(y) == y)
        if not whole.all():
            at = int(np.argmax(~whole))
            raise _fail(f"'{filename}': y[{at}] is {float(y[at]):g}; labels must be class ids (whole numbers) or "
                        "strings. Regression targets are not supported.")
    elif y.dtype.kind not in "biu":
        raise _fail(f"'{filename}': y must hold class ids or strings; it holds {_dtype_words(y.dtype)}.")
    y = y.astype(np.int64)
    if (y < 0).any():
        at = int(np.argmax(y < 0))
        raise _fail(f"'{filename}': y[{at}] is {y[at]}; class ids must be 0 or more.")
    return y, None


def _write_npz(folder: Path, X: np.ndarray, y, classes) -> None:
    arrays = {"X": X} if y is None else {"X": X, "y": y}
    with open(folder / "data.npz", "wb") as handle:
        np.savez(handle, **arrays)
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes, ensure_ascii=False), encoding="utf-8")


# ---- WAV files in a zip -------------------------------------------------------------------------
