"""Results waiting for delivery: a persistent outbox with retries and backoff.

Every result object goes through the outbox: it is first written to disk
(``<outbox>/objects/<SOPInstanceUID>.dcm``, atomically) and recorded in SQLite
(``<outbox>/outbox.sqlite``), then stored in the archive.  It counts as *delivered* only
when the archive confirms it holds the instance (``Archive.contains``); then its file is
removed and its row kept for the record.  Until then nothing is lost, even if the process
dies or the archive is down for days.

States:

``pending``    not yet confirmed; tried again when due (backoff doubles after each failed
               attempt, from ``outbox.backoff_initial_s`` to ``outbox.backoff_max_s``)
``delivered``  the archive confirmed it holds the instance
``refused``    the archive answered with a failure status (kept with that status); the same
               object would be refused again, so it is not retried until someone asks
               (``ctscreen outbox --drain --retry-refused``) after fixing the cause
``superseded`` withdrawn before delivery: a later run of the study wrote a result with
               other content (``withdraw``); its file is removed and it is never delivered
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .archive import Archive
from .config import OutboxConfig
from .durable import open_sqlite, write_dataset_atomically
from .errors import ArchiveError, ArchiveUnavailable, StoreRefused

log = logging.getLogger(__name__)

PENDING, DELIVERED, REFUSED, SUPERSEDED = "pending", "delivered", "refused", "superseded"

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    archive TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    file TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    status TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    locator TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (archive, sop_uid)
);
"""


@dataclass(frozen=True)
class OutboxItem:
    archive: str
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    kind: str
    state: str
    attempts: int
    next_attempt: float
    status: str
    last_error: str
    locator: str
    updated_at: str

    @property
    def file_name(self) -> str:
        return _file_name(self.archive, self.sop_uid)


@dataclass
class Delivery:
    """What one delivery pass did, by SOP Instance UID."""

    delivered: dict[str, str] = field(default_factory=dict)  # sop -> locator
    pending: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # sop -> status
    archive_down: bool = False


class Outbox:
    """The outbox folder: ``outbox.sqlite`` and ``objects/``.  One per worklist."""

    def __init__(self, folder: str | Path, config: OutboxConfig | None = None) -> None:
        self.folder = Path(folder)
        self.config = config or OutboxConfig()
        (self.folder / "objects").mkdir(parents=True, exist_ok=True)
        self._db = open_sqlite(self.folder / "outbox.sqlite", SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queue

    def put(self, archive: str, kind: str, ds: Dataset) -> str:
        """Write ``ds`` to disk and queue it for ``archive`` (replacing an earlier version
        of the same instance, delivered or not); returns its SOP Instance UID."""
        sop = str(ds.SOPInstanceUID)
        path = self.folder / "objects" / _file_name(archive, sop)
        write_dataset_atomically(ds, path)
        now = _now()
        with self._db:
            self._db.execute(
                """
                INSERT INTO outbox (archive, sop_uid, study_uid, series_uid, sop_class_uid, kind,
                    file, state, attempts, next_attempt, status, last_error, locator,
                    created_at, updated_at)
                VALUES (?,?,?,?,?,?,?,?,0,?,'','','',?,?)
                ON CONFLICT(archive, sop_uid) DO UPDATE SET
                    study_uid=excluded.study_uid, series_uid=excluded.series_uid,
                    sop_class_uid=excluded.sop_class_uid, kind=excluded.kind,
                    file=excluded.file, state=excluded.state, attempts=0,
                    next_attempt=excluded.next_attempt, status='', last_error='',
                    locator='', updated_at=excluded.updated_at
                """,
                (
                    archive,
                    sop,
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPClassUID),
                    kind,
                    path.name,
                    PENDING,
                    time.time(),
                    now,
                    now,
                ),
            )
        return sop

    def states(self, archive: str, sops: list[str]) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (state, locator) of those of ``sops`` queued for ``archive``
        (looked up by key: the table keeps every object ever delivered)."""
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(sops), 500):
            chunk = sops[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._db.execute(
                f"SELECT sop_uid, state, locator FROM outbox WHERE archive = ? "
                f"AND sop_uid IN ({marks})", [archive, *chunk]
            ):
                out[r["sop_uid"]] = (r["state"], r["locator"])
        return out

    def withdraw(self, archive: str, sops: list[str]) -> int:
        """Never deliver these objects (pending or refused) to ``archive``: a newer result
        replaces them.  Returns how many were withdrawn."""
        n = 0
        for sop, (state, _) in self.states(archive, sops).items():
            if state in (PENDING, REFUSED):
                with self._db:
                    self._db.execute(
                        "UPDATE outbox SET state=?, updated_at=? WHERE archive=? AND sop_uid=?",
                        (SUPERSEDED, _now(), archive, sop),
                    )
                (self.folder / "objects" / _file_name(archive, sop)).unlink(missing_ok=True)
                n += 1
        return n

    def items(self, archive: str | None = None, state: str | None = None) -> list[OutboxItem]:
        sql = "SELECT * FROM outbox WHERE 1=1"
        args: list[str] = []
        if archive is not None:
            sql += " AND archive = ?"
            args.append(archive)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY created_at, rowid"  # first queued, first delivered
        return [
            OutboxItem(**{k: r[k] for k in OutboxItem.__dataclass_fields__})
            for r in self._db.execute(sql, args).fetchall()
        ]

    def counts(self, archive: str | None = None) -> dict[str, int]:
        out = {PENDING: 0, DELIVERED: 0, REFUSED: 0, SUPERSEDED: 0}
        for it in self.items(archive):
            out[it.state] = out.get(it.state, 0) + 1
        return out

    # ------------------------------------------------------------ delivery

    def deliver(
        self,
        archive: Archive,
        sops: list[str] | None = None,
        *,
        due_only: bool = True,
        retry_refused: bool = False,
    ) -> Delivery:
        """Store and confirm the queued objects of ``archive`` (``sops`` only, where given),
        in the order they were queued.  Stops at the first sign that the archive is down."""
        result = Delivery()
        states = (PENDING, REFUSED) if retry_refused else (PENDING,)
        now = time.time()
        rows = [
            it
            for it in self.items(archive.name)
            if it.state in states and (sops is None or it.sop_uid in sops)
        ]
        if sops is not None:
            order = {s: i for i, s in enumerate(sops)}
            rows.sort(key=lambda it: order.get(it.sop_uid, 0))
        for i, it in enumerate(rows):
            if due_only and it.state == PENDING and it.next_attempt > now:
                result.pending.append(it.sop_uid)
                continue
            try:
                loc = self._deliver_one(archive, it)
            except StoreRefused as e:
                self._mark(it, REFUSED, status=str(_status_text(e.status)), error=str(e))
                log.error("outbox: %s %s refused by %s: %s", it.kind, it.sop_uid, archive.name, e)
                result.refused[it.sop_uid] = _status_text(e.status)
            except ArchiveUnavailable as e:
                until = self._retry_later(it, str(e))
                self._defer(rows[i + 1 :], until)  # the archive is down for all of them
                log.warning("outbox: %s unavailable; %d object(s) wait: %s",
                            archive.name, len(rows) - i, e)
                result.pending.extend(r.sop_uid for r in rows[i:])
                result.archive_down = True
                break
            except ArchiveError as e:
                self._retry_later(it, str(e))
                log.warning("outbox: %s %s not delivered: %s", it.kind, it.sop_uid, e)
                result.pending.append(it.sop_uid)
            else:
                self._mark(it, DELIVERED, locator=loc)
                (self.folder / "objects" / it.file_name).unlink(missing_ok=True)
                log.info("delivered %s %s to %s", it.kind, it.sop_uid, archive.name)
                result.delivered[it.sop_uid] = loc
        return result

    def _deliver_one(self, archive: Archive, it: OutboxItem) -> str:
        path = self.folder / "objects" / it.file_name
        try:
            ds = pydicom.dcmread(path)
        except (OSError, ValueError, EOFError) as e:
            raise ArchiveError(f"outbox file {path.name} cannot be read ({e})") from e
        loc = archive.store(ds)
        if not archive.contains(it.study_uid, it.sop_uid):
            raise ArchiveError(
                f"{archive.name}: expected the archive to hold {it.kind} {it.sop_uid} "
                "after storing it, a query found nothing"
            )
        return loc

    def _retry_later(self, it: OutboxItem, error: str) -> float:
        """Count a failed attempt; the next is due after a backoff that doubles each time
        (``backoff_initial_s``, twice that, ... at most ``backoff_max_s``).  Returns when."""
        attempts = it.attempts + 1
        delay = min(
            self.config.backoff_initial_s * 2 ** (attempts - 1), self.config.backoff_max_s
        )
        until = time.time() + delay
        with self._db:
            self._db.execute(
                "UPDATE outbox SET attempts=?, next_attempt=?, last_error=?, updated_at=? "
                "WHERE archive=? AND sop_uid=?",
                (attempts, until, error[:500], _now(), it.archive, it.sop_uid),
            )
        return until

    def _defer(self, items: list[OutboxItem], until: float) -> None:
        """Not tried (the archive is down): not due before ``until`` either."""
        with self._db:
            self._db.executemany(
                "UPDATE outbox SET next_attempt=MAX(next_attempt, ?) WHERE archive=? AND sop_uid=?",
                [(until, it.archive, it.sop_uid) for it in items],
            )

    def _mark(
        self, it: OutboxItem, state: str, *, status: str = "", error: str = "", locator: str = ""
    ) -> None:
        with self._db:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, status=?, last_error=?, "
                "locator=?, updated_at=? WHERE archive=? AND sop_uid=?",
                (state, status, error[:500], locator, _now(), it.archive, it.sop_uid),
            )


def _status_text(status: int | str) -> str:
    return f"0x{status:04X}" if isinstance(status, int) else str(status)


def _file_name(archive: str, sop: str) -> str:
    return f"{_safe(archive)}--{_safe(sop)}.dcm"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in text)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
