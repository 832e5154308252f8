"""The user's own data (issue 3, "The user's own data" and "Bad input"): CSV, NPZ and zips of WAV files.

Every file is generated here. Each test has its own EXPLORER_HOME (conftest's `home` / `db`
fixtures: tmp_path/home, set with monkeypatch). A refused upload must leave no row, nothing under
EXPLORER_HOME/datasets and nothing anywhere else under tmp_path; the message must name the row,
column or file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import stat
import struct
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import PROJECT_ROOT, run_cli
from services import api
from services.errors import UserError

APP = str(PROJECT_ROOT / "app.py")


# ---- making files -------------------------------------------------------------------------------

def wav_bytes(rate: int = 16000, seconds: float = 0.5, channels: int = 1, width: int = 2, freq: float = 440.0,
              noise: bool = False) -> bytes:
    n = int(round(rate * seconds))
    t = np.arange(n) / rate
    signal = np.random.default_rng(0).uniform(-0.5, 0.5, n) if noise else 0.5 * np.sin(2 * np.pi * freq * t)
    frames = np.repeat(signal[:, None], channels, axis=1)
    if width == 1:
        raw = np.round(frames * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        value = np.round(frames * (2 ** 23 - 1)).astype(np.int32).reshape(-1)
        raw = np.stack([value & 0xFF, (value >> 8) & 0xFF, (value >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
    else:
        raw = np.round(frames * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(raw)
    return out.getvalue()


def float_wav_bytes(rate: int = 16000, seconds: float = 0.5) -> bytes:
    """IEEE-float WAV (format 3), which Python's wave module does not read."""
    samples = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", len(body)) + body


def zip_bytes(entries: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, content in entries.items():  # a name may be a ZipInfo (to set a symlink's mode bits)
            archive.writestr(name, content)
    return out.getvalue()


def npz_bytes(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def read_wav(path: Path) -> tuple[int, int, int, np.ndarray]:
    with wave.open(str(path)) as handle:
        return (handle.getframerate(), handle.getnchannels(), handle.getsampwidth(),
                np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2"))


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def stored_folder(home: Path, record: dict) -> Path:
    folder = home / record["path"]
    assert folder.parent == home / "datasets" and folder.name == record["id"]
    return folder


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


def files_outside(home: Path) -> set[str]:
    """Everything in this test's tmp_path except EXPLORER_HOME itself."""
    return {p for p in files_under(home.parent) if p != home.name and not p.startswith(f"{home.name}/")}


def assert_refused(db, home: Path, filename: str, data: bytes, *needles: str) -> str:
    """Import must fail with a UserError naming every needle, and leave nothing behind anywhere."""
    outside_before = files_outside(home)
    with pytest.raises(UserError) as caught:
        api.import_dataset(db, filename, data)
    message = str(caught.value)
    assert caught.value.field == "file"
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert "\n" not in message
    assert list(db.query("SELECT id FROM datasets")) == []
    assert files_under(home / "datasets") == set(), "a refused upload left files in the data folder"
    assert files_outside(home) == outside_before, "something was written outside EXPLORER_HOME"
    return message


# ---- CSV ----------------------------------------------------------------------------------------

def test_labeled_csv_is_stored_normalized(db, home):
    decomposed = "cafe\u0301"  # 'café' with a combining accent: stored as NFC
    data = ("\ufefftext , Label\r\n"
            f"  {decomposed} is open ,  yes \r\n"
            '"closed, sadly",no\r\n'
            '"two\r\nlines",yes\r\n'
            ",\r\n"  # a blank spreadsheet row is skipped
            "\r\n").encode("utf-8")
    record = api.import_dataset(db, "shops.csv", data)

    assert (record["name"], record["kind"], record["has_labels"], record["n_samples"]) == ("shops", "csv", True, 3)
    row = db["datasets"].get(record["id"])
    assert row["has_labels"] == 1 and row["n_samples"] == 3 and row["path"] == f"datasets/{record['id']}"
    folder = stored_folder(home, record)
    assert files_under(folder) == {"data.csv"}
    assert (folder / "data.csv").read_bytes().decode("utf-8") == (
        "text,label\ncafé is open,yes\n\"closed, sadly\",no\n\"two\nlines\",yes\n")
    summary = record["summary"]
    assert summary["classes"] == {"no": 1, "yes": 2}
    assert summary["text_chars"] == {"min": 9, "max": 13, "mean": 11.3}
    assert record["task"] == "classification" and "supervised" in record["recovery_objectives"]
    assert record["uses"] == "labels: accuracy can be measured and supervised recovery is possible"
    assert api.get_dataset(db, record["id"]) == record
    assert [d["id"] for d in api.list_datasets(db)] == [record["id"]]


def test_text_only_csv_is_unlabeled_and_scored_by_fidelity(db, home):
    record = api.import_dataset(db, "notes.csv", b"text\nfirst note\nsecond note\n", name="  My notes ")
    assert record["name"] == "My notes"
    assert (record["has_labels"], record["task"], record["scores"]) == (False, "fidelity", ["fidelity"])
    assert db["datasets"].get(record["id"])["has_labels"] == 0
    assert "supervised" not in record["recovery_objectives"] and "distill" in record["recovery_objectives"]
    assert record["uses"] == "no labels: scored by fidelity; only label-free recovery objectives"
    assert "classes" not in record["summary"]
    assert (stored_folder(home, record) / "data.csv").read_text() == "text\nfirst note\nsecond note\n"


@pytest.mark.parametrize("content, needles", [
    (b"sentence,label\nhi,a\nho,b\n", ["needs a header row `text,label` or `text`", "'sentence', 'label'"]),
    (b"text,label,id,source\nhi,a,1,x\nho,b,2,y\n", ["extra columns 'id', 'source'"]),
    ("text,label\nhi,a\ncafé,b\n".encode("latin-1"), ["not UTF-8", "line 3"]),
    (b"text,label\nhi,a\n,b\nho,a\n", ["row 3: the text is empty"]),
    (b"text,label\nhi,a\nho,b\nhm, \n", ["row 4: the label is empty"]),
    (b"text,label\nhi,x\nho,x\nhm,x\n", ["needs at least two classes; every row has label 'x'"]),
    (b"text,label\nhi,a\n", ["1 data row; at least 2 are needed"]),
    (b"text,label\nhi,a\nhello, world,b\n", ["row 3 has 3 fields but the header has 2"]),
    (b"\n\n", ["no header row"]),
], ids=["missing-column", "extra-columns", "not-utf8", "empty-text", "empty-label", "one-class", "one-row",
        "wrong-field-count", "blank"])
def test_bad_csv_is_refused_with_a_precise_sentence(db, home, content, needles):
    assert_refused(db, home, "data.csv", content, "'data.csv'", *needles)


# ---- NPZ ----------------------------------------------------------------------------------------

def test_npz_with_integer_labels(db, home):
    X = np.random.default_rng(0).normal(size=(12, 8, 8))  # float64: stored as float32
    y = np.array([0, 1, 2] * 4, dtype=np.int32)
    record = api.import_dataset(db, "digits.npz", npz_bytes(X=X, y=y))
    folder = stored_folder(home, record)
    assert files_under(folder) == {"data.npz"}
    with np.load(folder / "data.npz", allow_pickle=False) as stored:
        assert sorted(stored.files) == ["X", "y"]
        assert stored["X"].dtype == np.float32 and stored["X"].shape == (12, 8, 8)
        np.testing.assert_allclose(stored["X"], X.astype(np.float32))
        assert stored["y"].dtype == np.int64 and stored["y"].tolist() == y.tolist()
    assert record["summary"]["X"] == {"shape": [12, 8, 8], "dtype": "float32", "source_dtype": "float64"}
    assert record["summary"]["classes"] == {"0": 4, "1": 4, "2": 4}
    assert record["summary"]["label_type"] == "int" and record["has_labels"]


def test_npz_with_string_labels_writes_classes_json(db, home):
    y = np.array(["dog", "cat", "dog", "bird"])
    record = api.import_dataset(db, "pets.npz", npz_bytes(X=np.arange(8).reshape(4, 2), y=y))
    folder = stored_folder(home, record)
    classes = json.loads((folder / "classes.json").read_text())
    assert classes == ["bird", "cat", "dog"]
    with np.load(folder / "data.npz") as stored:
        assert [classes[i] for i in stored["y"]] == y.tolist()
    assert record["summary"]["classes"] == {"bird": 1, "cat": 1, "dog": 2}


def test_npz_without_y_is_unlabeled(db, home):
    record = api.import_dataset(db, "features.npz", npz_bytes(X=np.ones((5, 3), dtype=np.float32)))
    assert (record["has_labels"], record["task"], record["n_samples"]) == (False, "fidelity", 5)
    with np.load(stored_folder(home, record) / "data.npz") as stored:
        assert stored.files == ["X"]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_inside_an_npz_is_refused_and_never_unpickled(db, home, tmp_path):
    marker = tmp_path / "pickle-ran"
    evil = np.empty(3, dtype=object)
    evil[:] = [_RunsCodeWhenUnpickled(marker)] * 3
    data = npz_bytes(X=np.zeros((3, 2)), y=evil)
    assert b"pickle-ran" in data  # the pickle really is inside
    assert_refused(db, home, "evil.npz", data, "'evil.npz'", "array 'y' holds Python objects", "never loaded")
    assert not marker.exists()


@pytest.mark.parametrize("arrays, needles", [
    ({"x": np.zeros((3, 2)), "labels": np.arange(3)}, ["needs an array named 'X'", "found 'x', 'labels'"]),
    ({"X": np.arange(5.0)}, ["X is 1-D (shape (5,))", "X.reshape(-1, 1)"]),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1, 0])}, ["y has 3 labels but X has 4 samples"]),
    ({"X": np.zeros((4, 2)), "y": np.ones(4, dtype=int)}, ["needs at least two classes; every label in y is '1'"]),
    ({"X": np.array([["a", "b"], ["c", "d"]])}, ["X must hold numbers", "text"]),
    ({"X": np.array([[1.0], [2.0], [np.nan]])}, ["NaN", "sample 2"]),
    ({"X": np.zeros((3, 2)), "y": np.array([0.0, 1.5, 1.0])}, ["y[1] is 1.5", "class ids"]),
    ({"X": np.zeros((3, 2)), "y": np.array([0, 1]), "ids": np.arange(3)}, ["arrays 'ids' besides X and y"]),
    ({"X": np.zeros((1, 2))}, ["X has 1 sample", "at least 2"]),
], ids=["no-X", "1-D-X", "length-mismatch", "one-class", "text-X", "nan", "float-labels", "extra-array", "one-sample"])
def test_bad_npz_is_refused_with_a_precise_sentence(db, home, arrays, needles):
    assert_refused(db, home, "arrays.npz", npz_bytes(**arrays), "'arrays.npz'", *needles)


def test_random_bytes_named_npz_are_refused(db, home):
    assert_refused(db, home, "noise.npz", os.urandom(2048), "'noise.npz' is not an NPZ archive")


# ---- WAV zips -----------------------------------------------------------------------------------

def test_wav_zip_with_label_folders(db, home):
    tone = wav_bytes(freq=440)
    data = zip_bytes({"recordings/yes/b.wav": tone, "recordings/yes/a.wav": wav_bytes(freq=880),
                      "recordings/no/c.wav": tone, "__MACOSX/recordings/yes/._a.wav": b"\0" * 10,
                      "recordings/.DS_Store": b"\0" * 10})
    record = api.import_dataset(db, "words.zip", data)
    assert (record["kind"], record["has_labels"], record["n_samples"]) == ("wav", True, 3)
    folder = stored_folder(home, record)
    assert files_under(folder) == {"labels.csv", "audio", "audio/no", "audio/no/0.wav", "audio/yes",
                                   "audio/yes/0.wav", "audio/yes/1.wav"}
    with open(folder / "labels.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["path", "label"], ["audio/no/0.wav", "no"],
                                            ["audio/yes/0.wav", "yes"], ["audio/yes/1.wav", "yes"]]
    rate, channels, width, samples = read_wav(folder / "audio/yes/0.wav")  # a.wav: 16 kHz mono, kept exactly
    assert (rate, channels, width) == (16000, 1, 2)
    assert samples.tobytes() == wave.open(io.BytesIO(wav_bytes(freq=880))).readframes(10 ** 6)
    summary = record["summary"]
    assert summary["classes"] == {"no": 1, "yes": 2}
    assert summary["duration_s"] == {"min": 0.5, "max": 0.5, "total": 1.5}
    assert summary["converted"] == 0 and summary["conversions"] == []
    assert sorted(summary["ignored"]) == ["__MACOSX/recordings/yes/._a.wav", "recordings/.DS_Store"]


def test_stereo_and_22khz_wavs_are_converted_to_16khz_mono(db, home):
    data = zip_bytes({"stereo.wav": wav_bytes(16000, 1.0, channels=2, freq=440),
                      "cd.wav": wav_bytes(22050, 0.8, freq=1000),
                      "plain.wav": wav_bytes(16000, 0.25)})
    record = api.import_dataset(db, "clips.zip", data)
    assert (record["has_labels"], record["task"]) == (False, "fidelity")
    folder = stored_folder(home, record)
    assert files_under(folder) == {"labels.csv", "audio", "audio/0.wav", "audio/1.wav", "audio/2.wav"}
    with open(folder / "labels.csv", newline="") as handle:
        listing = [row[0] for row in csv.reader(handle)]
    assert listing == ["path", "audio/0.wav", "audio/1.wav", "audio/2.wav"]  # cd, plain, stereo (sorted)
    durations = []
    for path, freq in (("audio/0.wav", 1000), ("audio/2.wav", 440)):
        rate, channels, width, samples = read_wav(folder / path)
        assert (rate, channels, width) == (16000, 1, 2)
        durations.append(len(samples) / rate)
        assert abs(dominant_frequency(samples, rate) - freq) < 5  # the tone survives the conversion
        assert 0.45 < np.abs(samples[1000:-1000]).max() / 32767 < 0.55  # and keeps its amplitude
    assert durations == [0.8, 1.0]
    summary = record["summary"]
    assert summary["converted"] == 2
    assert {(g["from"], tuple(g["files"])) for g in summary["conversions"]} == {
        ("22050 Hz mono 16-bit", ("cd.wav",)), ("16000 Hz stereo 16-bit", ("stereo.wav",))}
    assert all(g["to"] == "16000 Hz mono 16-bit" for g in summary["conversions"])
    assert summary["duration_s"] == {"min": 0.25, "max": 1.0, "total": 2.05}


@pytest.mark.parametrize("make, described", [
    (lambda: wav_bytes(16000, 0.5, width=1), "16000 Hz mono 8-bit"),
    (lambda: wav_bytes(48000, 0.5, width=3), "48000 Hz mono 24-bit"),
    (lambda: float_wav_bytes(16000, 0.5), "16000 Hz mono 32-bit float"),
], ids=["8-bit", "24-bit-48k", "float32"])
def test_other_sample_formats_are_converted(db, home, make, described):
    record = api.import_dataset(db, "f.zip", zip_bytes({"a/x.wav": make(), "b/y.wav": wav_bytes()}))
    assert record["summary"]["conversions"][0]["from"] == described
    rate, channels, width, samples = read_wav(stored_folder(home, record) / "audio/a/0.wav")
    assert (rate, channels, width, len(samples)) == (16000, 1, 2, 8000)
    assert abs(dominant_frequency(samples, rate) - 440) < 5


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _lying_zip() -> bytes:
    """A zip whose directory declares 100 bytes for an entry that unpacks to far more."""
    data = bytearray(zip_bytes({"a/ok.wav": wav_bytes(), "b/big.wav": wav_bytes(seconds=2.0, noise=True)}))
    name = b"b/big.wav"
    local = data.find(name) - 30  # the name follows its local header (30 bytes) ...
    central = data.find(name, local + 31) - 46  # ... and its central directory entry (46 bytes)
    assert data[local:local + 4] == b"PK\x03\x04" and data[central:central + 4] == b"PK\x01\x02"
    data[local + 22:local + 26] = struct.pack("<I", 100)
    data[central + 24:central + 28] = struct.pack("<I", 100)
    return bytes(data)


@pytest.mark.parametrize("make, needles", [
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "../evil.wav": wav_bytes()}), ["'../evil.wav'", "climbs out"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "/tmp/evil.wav": wav_bytes()}), ["'/tmp/evil.wav'", "absolute path"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), _symlink_entry("b/link.wav"): b"/etc/passwd"}),
     ["'b/link.wav'", "symbolic link"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "b/big.wav": b"RIFF" + bytes(20 * 1024 * 1024)}),
     ["'b/big.wav'", "zip bomb"]),
    (_lying_zip, ["'b/big.wav'", "damaged"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "a/notes.txt": b"hi", "b/y.mp3": b"ID3"}),
     ["not WAV", "'a/notes.txt'", "'b/y.mp3'"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "b/broken.wav": os.urandom(500)}),
     ["'b/broken.wav' is not a readable WAV file"]),
    (lambda: zip_bytes({"a/x.wav": wav_bytes(), "a/y.wav": wav_bytes()}),
     ["needs at least two classes", "every file is in the folder 'a'"]),
    (lambda: zip_bytes({"x.wav": wav_bytes(), "a/y.wav": wav_bytes()}), ["mixes files", "'x.wav'", "'a/y.wav'"]),
    (lambda: zip_bytes({"a/b/c/x.wav": wav_bytes(), "y.wav": wav_bytes()}), ["'a/b/c/x.wav' is nested too deep"]),
    (lambda: zip_bytes({"notes.txt": b"hi"}), ["not WAV", "'notes.txt'"]),
    (lambda: os.urandom(4096), ["not a readable zip archive"]),
], ids=["dot-dot", "absolute", "symlink", "zip-bomb", "lying-sizes", "not-wav", "unreadable-wav", "one-label",
        "mixed-layout", "too-deep", "no-wav", "not-a-zip"])
def test_bad_wav_zip_is_refused_with_a_precise_sentence(db, home, make, needles):
    assert_refused(db, home, "audio.zip", make(), "'audio.zip'", *needles)
    assert not (home.parent / "evil.wav").exists() and not Path("/tmp/evil.wav").exists()


def test_total_unpacked_size_is_capped(db, home, monkeypatch):
    monkeypatch.setenv("EXPLORER_MAX_UNPACKED_MB", "0.5")
    data = zip_bytes({"a/x.wav": wav_bytes(seconds=10, noise=True), "b/y.wav": wav_bytes(seconds=10, noise=True)})
    assert len(data) < 1024 * 1024  # the upload itself is small; unpacked it is 640 KB
    assert_refused(db, home, "audio.zip", data, "would unpack to", "over the limit of 512.0 KB", "EXPLORER_MAX_UNPACKED_MB")


# ---- any file -----------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", ["empty.csv", "empty.npz", "empty.zip"])
def test_an_empty_file_is_refused(db, home, filename):
    assert_refused(db, home, filename, b"", f"'{filename}' is empty (0 bytes)")


def test_a_file_over_the_upload_limit_is_refused(db, home, monkeypatch):
    monkeypatch.setenv("EXPLORER_MAX_UPLOAD_MB", "0.01")  # about 10 KB
    data = b"text,label\n" + b"".join(b"sample %d,%d\n" % (i, i % 2) for i in range(2000))
    assert_refused(db, home, "big.csv", data, "'big.csv' is", "over the upload limit of 10.2 KB", "EXPLORER_MAX_UPLOAD_MB")


def test_an_unknown_extension_is_refused(db, home):
    assert_refused(db, home, "data.txt", b"text,label\na,b\n",
           "Unknown file type '.txt' for 'data.txt'", ".csv", ".npz", ".zip")


def test_an_unknown_dataset_id_is_a_user_error(db):
    with pytest.raises(UserError, match="Unknown dataset 'nope'; no dataset has been imported yet"):
        api.get_dataset(db, "nope")


def test_importing_a_wav_zip_loads_no_torch(home):
    code = ("import sys, io, wave, zipfile\n"
            "from services import api\n"
            "def tone(rate):\n"
            "    out = io.BytesIO(); w = wave.open(out, 'wb'); w.setnchannels(2); w.setsampwidth(2)\n"
            "    w.setframerate(rate); w.writeframes(bytes(rate)); w.close(); return out.getvalue()\n"
            "buf = io.BytesIO(); z = zipfile.ZipFile(buf, 'w')\n"
            "z.writestr('a/x.wav', tone(22050)); z.writestr('b/y.wav', tone(16000)); z.close()\n"
            "api.import_dataset(api.connect(), 'a.zip', buf.getvalue())\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime'))))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "EXPLORER_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# ---- the command line ---------------------------------------------------------------------------

def test_cli_data_import_list_show(home, tmp_path):
    source = tmp_path / "reviews.csv"
    source.write_text("text,label\ngreat,pos\nawful,neg\n")
    done = run_cli("data", "import", str(source), "--name", "Reviews", "--json", home=home)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert (record["name"], record["kind"], record["n_samples"], record["has_labels"]) == ("Reviews", "csv", 2, True)
    listed = json.loads(run_cli("data", "list", "--json", home=home).stdout)
    assert [d["id"] for d in listed] == [record["id"]]
    shown = run_cli("data", "show", record["id"], "--json", home=home)
    assert shown.returncode == 0 and json.loads(shown.stdout) == record


@pytest.mark.parametrize("args, sentence", [
    (["bad.csv"], "'bad.csv' row 3: the label is empty."),
    (["missing.csv"], "No such file:"),
], ids=["bad-csv", "missing-file"])
def test_cli_data_import_of_bad_input_exits_2_with_one_line(home, tmp_path, args, sentence):
    (tmp_path / "bad.csv").write_text("text,label\ngreat,pos\nawful,\n")
    done = run_cli("data", "import", str(tmp_path / args[0]), "--json", home=home)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and sentence in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert files_under(home / "datasets") == set()


def test_cli_data_show_of_an_unknown_id_exits_2(home):
    done = run_cli("data", "show", "nope", "--json", home=home)
    assert done.returncode == 2 and done.stderr.startswith("error: Unknown dataset 'nope'")


# ---- the Data page ------------------------------------------------------------------------------

def open_data_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page("app_pages/data.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def import_button(at: AppTest):
    return next(b for b in at.button if b.label == "Import")


def test_data_page_without_datasets(db):
    at = open_data_page()
    assert [t.value for t in at.title] == ["Data"]
    assert "No datasets yet. Import one above." in [i.value for i in at.info]
    assert import_button(at).disabled  # nothing to import before a file is chosen


def test_data_page_upload_shows_the_error_sentence_and_stores_nothing(db, home):
    at = open_data_page()
    at.file_uploader[0].upload("tickets.csv", b"text,label\nhello,a\nhi,a\n", "text/csv").run()
    import_button(at).click().run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "'tickets.csv' needs at least two classes; every row has label 'a'. "
        "Leave the label column out to score by fidelity instead."]
    assert api.list_datasets(db) == []
    assert files_under(home / "datasets") == set()


def test_data_page_upload_imports_and_lists_the_dataset(db):
    at = open_data_page()
    at.file_uploader[0].upload("tickets.csv", b"text,label\nhello,a\nhi,b\nhey,b\n", "text/csv").run()
    at.text_input[0].input("Support tickets").run()
    import_button(at).click().run()
    assert not at.exception and not at.error
    (record,) = api.list_datasets(db)
    assert record["name"] == "Support tickets" and record["n_samples"] == 3
    assert [s.value for s in at.success] == ["Imported **Support tickets**."]
    texts = [m.value for m in at.markdown]
    assert "#### Support tickets" in texts
    assert ":blue-badge[Texts (CSV)] :green-badge[labeled]" in texts
    assert "**3 samples** in **2 classes**: b **2** · a **1**" in texts
    assert any("**Labels:** accuracy can be measured and supervised recovery is possible" in t for t in texts)
    assert import_button(at).disabled  # the uploader was emptied: the same file is not imported twice


def test_data_page_lists_each_kind_with_what_it_can_be_used_for(db):
    api.import_dataset(db, "clips.zip", zip_bytes({"x.wav": wav_bytes(22050), "y.wav": wav_bytes()}))
    api.import_dataset(db, "arrays.npz", npz_bytes(X=np.zeros((4, 3)), y=np.array(["a", "b", "a", "b"])))
    at = open_data_page()
    texts = [m.value for m in at.markdown]
    badges = [t for t in texts if "-badge[" in t]
    assert badges == [":blue-badge[Arrays (NPZ)] :green-badge[labeled]",  # newest first
                      ":blue-badge[Audio (WAV)] :gray-badge[no labels]"]
    assert any("**No labels:** scored by fidelity" in t and "only label-free recovery objectives" in t for t in texts)
    assert any("**Labels:** accuracy can be measured" in t for t in texts)
    captions = [c.value for c in at.caption]
    assert any(c.startswith("`X` is 4 × 3 (float32, converted from float64).") for c in captions)
    assert any("1 file(s) converted to 16 kHz mono" in c for c in captions)
