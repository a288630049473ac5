"""The audit log: every view of patient data, every export, every login (append-only).

A row: when, who (user name and role), what (``action``), which study, a short detail and
the client address.  Actions: ``login``, ``login-failed``, ``logout``, ``view-worklist``
(the detail lists the study UIDs shown), ``view-study``, ``view-images`` (slices and key
images of a study, once per user and study every ``IMAGE_AUDIT_S`` seconds: a reader
scrolls hundreds of slices), ``review``, ``export-reviews``, ``export-audit``,
``view-audit``.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

IMAGE_AUDIT_S = 600.0


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def record(db: sqlite3.Connection, now: float, username: str, role: str, action: str,
           study_uid: str = "", detail: str = "", client: str = "") -> None:
    with db:
        db.execute(
            "INSERT INTO audit (at, username, role, action, study_uid, detail, client) "
            "VALUES (?,?,?,?,?,?,?)",
            (iso(now), username, role, action, study_uid, detail, client),
        )


def record_image_view(db: sqlite3.Connection, now: float, username: str, role: str,
                      study_uid: str, client: str) -> None:
    """``view-images`` for the study, unless this user has one in the last IMAGE_AUDIT_S."""
    recent = db.execute(
        "SELECT 1 FROM audit WHERE study_uid = ? AND username = ? AND action = 'view-images' "
        "AND at >= ? LIMIT 1",
        (study_uid, username, iso(now - IMAGE_AUDIT_S)),
    ).fetchone()
    if recent is None:
        record(db, now, username, role, "view-images", study_uid, "", client)


def page(db: sqlite3.Connection, offset: int, limit: int) -> tuple[list[sqlite3.Row], int]:
    """The newest entries first."""
    rows = db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ? OFFSET ?",
                      (limit, offset)).fetchall()
    (total,) = db.execute("SELECT COUNT(*) FROM audit").fetchone()
    return rows, int(total)


def all_rows(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM audit ORDER BY id").fetchall()
