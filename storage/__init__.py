"""Storage: the only state shared between the web process, the CLI and the worker.

`open_db` gives a sqlite-utils Database on the SQLite file under EXPLORER_HOME with WAL,
a busy timeout and every migration applied; `ArtifactStore` keeps files under the same home.
"""
from storage.db import open_db, explorer_home, utcnow
from storage.artifacts import ArtifactStore

__all__ = ["open_db", "explorer_home", "utcnow", "ArtifactStore"]
