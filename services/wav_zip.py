"""Zips of WAV files, one folder per label: checked entry by entry before anything is unpacked
(no absolute paths, no `..`, no symlinks, a cap on the unpacked total and on each entry's ratio),
then converted to 16 kHz mono 16-bit PCM. The storage layout is described in services/datasets.py.
"""
from __future__ import annotations

import csv
import io
import math
import re
import stat
import struct
import wave
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from services.errors import UserError
from services.datasets import (IGNORED_NAMES, MAX_ZIP_ENTRIES, MAX_ZIP_RATIO, SAMPLE_RATE, _class_counts, _fail,
                               _mb, max_unpacked_bytes)


def _zip_entry_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in parts:
        return "climbs out of its folder with '..'"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if info.flag_bits & 0x1:
        return "is encrypted"
    if any(ord(ch) < 32 for ch in name):
        return "has a control character in its name"
    return None


def plan_wav_zip(data: bytes, filename: str) -> dict:
    """Check every entry of the zip (paths, links, sizes, layout) without unpacking anything."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as error:
        raise _fail(f"'{filename}' is not a readable zip archive ({error}).") from None
    try:
        return _plan(archive, filename)
    except BaseException:
        archive.close()
        raise


def _plan(archive: zipfile.ZipFile, filename: str) -> dict:
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise _fail(f"'{filename}' has {len(infos):,} entries; at most {MAX_ZIP_ENTRIES:,} are accepted.")
    for info in infos:
        problem = _zip_entry_problem(info)
        if problem:
            raise _fail(f"'{filename}': the entry '{info.filename}' {problem}; nothing was unpacked.")
    wavs, ignored, others = [], [], []
    for info in infos:
        parts = [p for p in re.split(r"[\\/]", info.filename) if p not in ("", ".")]
        if info.is_dir() or not parts:
            continue
        if parts[0] == "__MACOSX" or parts[-1] in IGNORED_NAMES:
            ignored.append(info.filename)
        elif parts[-1].lower().endswith(".wav"):
            wavs.append((parts, info))
        else:
            others.append(info.filename)
    if others:
        shown = ", ".join(f"'{n}'" for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise _fail(f"'{filename}' holds files that are not WAV: {shown}. Only .wav files are accepted.")
    if not wavs:
        raise _fail(f"'{filename}' holds no .wav files.")
    total = 0
    for _, info in wavs:
        total += info.file_size
        if info.file_size > 1024 * 1024 and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise _fail(f"'{filename}': the entry '{info.filename}' would unpack to {_mb(info.file_size)} from "
                        f"{info.compress_size:,} bytes (over {MAX_ZIP_RATIO}x); refused as a possible zip bomb.")
    if total > max_unpacked_bytes():
        raise _fail(f"'{filename}' would unpack to {_mb(total)}, over the limit of {_mb(max_unpacked_bytes())} "
                    "(EXPLORER_MAX_UNPACKED_MB).")
    # A zipped folder wraps everything in one top folder: 'mydata/dog/1.wav' means label 'dog'.
    if all(len(p) == 3 for p, _ in wavs) and len({p[0] for p, _ in wavs}) == 1:
        wavs = [(p[1:], info) for p, info in wavs]
    depths = {len(p) for p, _ in wavs}
    deep = next((info.filename for p, info in wavs if len(p) > 2), None)
    if deep:
        raise _fail(f"'{filename}': '{deep}' is nested too deep; use one folder per label (label/file.wav), "
                    "or put every file at the top level for unlabeled audio.")
    if depths == {1, 2}:
        top = next(info.filename for p, info in wavs if len(p) == 1)
        inner = next(info.filename for p, info in wavs if len(p) == 2)
        raise _fail(f"'{filename}' mixes files at the top level ('{top}', unlabeled) with files in label folders "
                    f"('{inner}'); put every file in a label folder, or none.")
    labeled = depths == {2}
    for p, info in wavs:
        if labeled and (p[0].startswith(".") or len(p[0]) > 100):
            raise _fail(f"'{filename}': the folder name '{p[0]}' (of '{info.filename}') cannot be a label; "
                        "use a name of up to 100 characters that does not start with '.'.")
    if labeled:
        labels = {p[0] for p, _ in wavs}
        if len(labels) == 1:
            raise _fail(f"'{filename}' needs at least two classes; every file is in the folder '{labels.pop()}'. "
                        "Use one folder per label, or put the files at the top level for unlabeled audio.")
    if len(wavs) < 2:
        raise _fail(f"'{filename}' holds 1 WAV file; at least 2 are needed.")
    wavs.sort(key=lambda item: (item[0][0] if labeled else "", item[1].filename))
    return {"archive": archive, "filename": filename, "labeled": labeled, "ignored": ignored,
            "entries": [(p[0] if labeled else None, info) for p, info in wavs]}


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, filename: str, budget: list[int]) -> bytes:
    """An entry's bytes, counted as they come: a lying size in the zip's directory cannot blow past the caps."""
    chunks, size = [], 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                budget[0] -= len(chunk)
                if size > info.file_size or budget[0] < 0:
                    raise _fail(f"'{filename}': the entry '{info.filename}' unpacks to more than the zip declares; "
                                "refused as a possible zip bomb.")
                chunks.append(chunk)
    except UserError:
        raise
    except Exception as error:  # BadZipFile (bad CRC), zlib.error, an unsupported compression method, ...
        raise _fail(f"'{filename}': the entry '{info.filename}' is damaged ({error}).") from None
    return b"".join(chunks)


def _decode_pcm(raw: bytes, width: int, is_float: bool) -> np.ndarray:
    if is_float:
        return np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128) / 128
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(1 << (8 * width - 1))


def _parse_riff(data: bytes) -> tuple[int, int, int, bool, bytes]:
    """For what the wave module refuses: IEEE-float and WAVE_FORMAT_EXTENSIBLE files."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt, audio, at = None, None, 12
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        body = data[at + 8:at + 8 + size]
        if chunk == b"fmt ":
            fmt = body
        elif chunk == b"data":
            audio = body
        at += 8 + size + (size & 1)
    if fmt is None or audio is None or len(fmt) < 16:
        raise ValueError("no fmt or data chunk")
    code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if code == 0xFFFE and len(fmt) >= 26:
        code = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the format code
    if code not in (1, 3) or channels < 1 or bits not in (8, 16, 24, 32, 64) or (code == 3 and bits < 32):
        raise ValueError(f"unsupported encoding (format {code}, {bits}-bit); save it as PCM")
    frame = channels * bits // 8
    return channels, bits // 8, rate, code == 3, audio[:len(audio) // frame * frame]


def _read_wav(data: bytes, where: str) -> tuple[np.ndarray, int, str]:
    """Samples in [-1, 1] as (frames, channels), the sample rate, and how it was stored."""
    try:
        with wave.open(io.BytesIO(data)) as handle:
            channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
            raw, is_float = handle.readframes(handle.getnframes()), False
    except (wave.Error, EOFError, struct.error, ValueError) as first:
        try:
            channels, width, rate, is_float, raw = _parse_riff(data)
        except (ValueError, struct.error) as error:
            reason = error if "unsupported" in str(error) else (str(first) or "it ends too early")
            raise _fail(f"{where} is not a readable WAV file ({reason}).") from None
    if not is_float and width not in (1, 2, 3, 4):
        raise _fail(f"{where} uses {8 * width}-bit samples; save it as 16-bit PCM.")
    raw = raw[:len(raw) // (width * channels) * (width * channels)]  # a truncated file can end mid-frame
    if not 1000 <= rate <= 384_000:
        raise _fail(f"{where} has a sample rate of {rate} Hz; expected 1,000 to 384,000 Hz.")
    samples = _decode_pcm(raw, width, is_float).reshape(-1, channels)
    if len(samples) == 0:
        raise _fail(f"{where} holds no audio (0 samples).")
    if not np.isfinite(samples).all():
        raise _fail(f"{where} holds NaN or infinite samples.")
    layout = "mono" if channels == 1 else ("stereo" if channels == 2 else f"{channels} channels")
    stored = f"{rate} Hz {layout} {8 * width}-bit{' float' if is_float else ''}"
    return samples, rate, stored


def _to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly  # a polyphase filter: low-pass and resample in one step

        g = math.gcd(SAMPLE_RATE, rate)
        mono = resample_poly(mono, SAMPLE_RATE // g, rate // g)
    return np.clip(np.round(mono * 32768), -32768, 32767).astype("<i2")  # 16-bit mono 16 kHz input: unchanged


def convert_wavs(plan: dict, folder: Path) -> dict:
    """Read, convert and write every WAV into `folder` (a temporary folder inside the home)."""
    filename, labeled = plan["filename"], plan["labeled"]
    budget = [max_unpacked_bytes()]
    listing, durations, conversions, counters = [], [], {}, Counter()
    target = f"{SAMPLE_RATE} Hz mono 16-bit"
    with plan["archive"] as archive:
        for label, info in plan["entries"]:
            samples, rate, stored = _read_wav(_read_entry(archive, info, filename, budget),
                                              f"'{filename}': '{info.filename}'")
            pcm = _to_16k_mono(samples, rate)
            if stored != target:
                group = conversions.setdefault(stored, {"from": stored, "to": target, "count": 0, "files": []})
                group["count"] += 1
                if len(group["files"]) < 50:
                    group["files"].append(info.filename)
            relative = f"audio/{label}/{counters[label]}.wav" if labeled else f"audio/{counters[label]}.wav"
            counters[label] += 1
            out = (folder / relative).resolve()
            if folder.resolve() not in out.parents:  # labels were checked; this is the last line of defence
                raise _fail(f"'{filename}': the entry '{info.filename}' would be written outside the dataset folder.")
            out.parent.mkdir(parents=True, exist_ok=True)
            with wave.open(str(out), "wb") as handle:
                handle.setnchannels(1)
                handle.setsampwidth(2)
                handle.setframerate(SAMPLE_RATE)
                handle.writeframes(pcm.tobytes())
            listing.append((relative, label) if labeled else (relative,))
            durations.append(len(pcm) / SAMPLE_RATE)
    with open(folder / "labels.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"] if labeled else ["path"])
        writer.writerows(listing)
    summary = {"n_samples": len(listing), "has_labels": labeled, "sample_rate": SAMPLE_RATE,
               "duration_s": {"min": round(min(durations), 3), "max": round(max(durations), 3),
                              "total": round(sum(durations), 3)},
               "converted": sum(g["count"] for g in conversions.values()),
               "conversions": list(conversions.values()), "ignored": plan["ignored"]}
    if labeled:
        summary["classes"] = _class_counts(label for label, _ in plan["entries"])
    return summary
