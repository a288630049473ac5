"""The web's own database (SQLite, WAL): users, sessions, failed logins, reviews, audit log.

Kept apart from the worklist, which the web only reads (the nightly batch writes it).  By
default ``<worklist db stem>.web.sqlite`` beside the worklist (``web.db`` to choose).
The audit table is append-only: triggers refuse every UPDATE and DELETE.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import Config
from ..durable import open_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    password_changed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,          -- sha256 of the cookie's token; the token is not kept
    user_id INTEGER NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    created REAL NOT NULL,                -- seconds since the epoch
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);
CREATE TABLE IF NOT EXISTS login_failures (
    key TEXT NOT NULL,                    -- "user:NAME" or "client:ADDRESS"
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (key, at);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    target TEXT NOT NULL,                 -- "pattern" or "finding:N"
    action TEXT NOT NULL,                 -- confirm | reject | comment
    reader_category TEXT NOT NULL DEFAULT '',  -- the reader's RSNA category (pattern reviews)
    comment TEXT NOT NULL DEFAULT '',
    call TEXT NOT NULL DEFAULT '',        -- the study-level call the reader saw
    study_date TEXT NOT NULL DEFAULT '',
    algorithm_version TEXT NOT NULL DEFAULT '',
    username TEXT NOT NULL,
    at TEXT NOT NULL                      -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS reviews_study ON reviews (study_uid, target, id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_study ON audit (study_uid, username, action, at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def web_db_path(config: Config, worklist: Path) -> Path:
    """``web.db``, else ``<worklist db stem>.web.sqlite`` beside the worklist."""
    if config.web.db:
        return Path(config.web.db)
    return worklist.with_name(worklist.stem + ".web.sqlite")


# Columns added after the first release: (table, column, declaration).  users.sites: the
# sites (hospitals of a regional centre) whose studies the user sees, as a JSON list; NULL:
# every site.  reviews.site: the study's site ('' for a plain run).
_ADDED = (
    ("users", "sites", "TEXT"),
    ("reviews", "site", "TEXT NOT NULL DEFAULT ''"),
)


def create(path: Path) -> None:
    """Create the database (or bring an existing one to this schema)."""
    db = open_sqlite(path, SCHEMA)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, decl in _ADDED:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.close()


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for one request (or one command), schema already applied by
    :func:`create`; usable from whichever thread the request runs on."""
    db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    try:
        yield db
    finally:
        db.close()
