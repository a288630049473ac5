"""Durable local state: files written atomically and SQLite opened for crash safety.

Shared by the folder archive, the outbox and the worklist, so that "a reader never sees half
a file" and "a committed transaction survives a crash" are implemented once.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset


def write_dataset_atomically(ds: Dataset, path: Path, tmp_prefix: str = ".ctscreen-tmp") -> None:
    """Write ``ds`` to ``path``: a temporary file in the same folder, flushed and fsynced,
    renamed over ``path``, then the folder fsynced.  On any failure nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A connection in WAL mode (readers never block the writer) with full synchronous
    commits, the schema applied, rows addressable by column name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    with db:
        db.executescript(schema)
    return db
