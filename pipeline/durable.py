"""Durable local state: files written atomically and SQLite opened for crash safety.

Shared by the folder archive, the outbox and the worklist, so that "a reader never sees half
a file" and "a committed transaction survives a crash" are implemented once.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset

TMP_PREFIX = ".ctscreen-tmp"


def write_dataset_atomically(ds: Dataset, path: Path) -> None:
    """Write ``ds`` to ``path``: a temporary file in the same folder, flushed and fsynced,
    renamed over ``path``, then the folder fsynced.  On any failure nothing is left behind;
    a process killed mid-write leaves a temporary file named after its process id, which
    ``remove_orphaned_temporaries`` removes once that process is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}-{os.getpid()}-", dir=path.parent)
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


def remove_orphaned_temporaries(folder: Path, recursive: bool = True) -> int:
    """Delete the temporary files in (``recursive``: under) ``folder`` whose writing
    process no longer exists (on this host); returns how many.  Files of live writers are
    left alone."""
    from .state import pid_alive

    removed = 0
    if not folder.is_dir():
        return 0
    found = folder.rglob(f"{TMP_PREFIX}*") if recursive else folder.glob(f"{TMP_PREFIX}*")
    for p in found:
        parts = p.name[len(TMP_PREFIX):].split("-")
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            pid = -1  # an older naming: left by a dead run unless younger than a day
            if time.time() - p.stat().st_mtime < 86400:
                continue
        if pid > 0 and pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def open_sqlite(path: Path, schema: str, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection in WAL mode (readers never block the writer) with full synchronous
    commits, the schema applied, rows addressable by column name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30.0, check_same_thread=check_same_thread)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    with db:
        db.executescript(schema)
    return db
