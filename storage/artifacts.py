"""Artifact files (trained models, compressed ONNX files, logs) under EXPLORER_HOME/artifacts.

Every write goes to a temporary name in the same folder and is renamed into place, so a
process killed mid-write never leaves a half-written artifact behind. Paths handed out are
relative to the home, and every path read back is checked to stay inside it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class ArtifactStore:
    def __init__(self, home: Path | str):
        self.home = Path(home).resolve()
        self.root = self.home / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """An absolute path under the artifact root; refuses anything that would escape it."""
        target = self.root.joinpath(*parts).resolve()
        if self.root not in target.parents and target != self.root:
            raise ValueError(f"artifact path escapes the data folder: {'/'.join(parts)}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def relative(self, path: Path | str) -> str:
        return str(Path(path).resolve().relative_to(self.home))

    def resolve(self, relative: str) -> Path:
        target = (self.home / relative).resolve()
        if self.home not in target.parents:
            raise ValueError(f"artifact path escapes the data folder: {relative}")
        return target

    def write_bytes(self, data: bytes, *parts: str) -> Path:
        target = self.path(*parts)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def put_file(self, source: Path | str, *parts: str) -> Path:
        """Copy (or move, when on the same folder) a finished file into place atomically."""
        target = self.path(*parts)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def scratch_dir(self, *parts: str) -> Path:
        """A folder for a job's intermediate files, inside the data folder."""
        folder = self.path(*parts, "x").parent
        folder.mkdir(parents=True, exist_ok=True)
        return folder
