"""The per-study state machine of the nightly batch, persisted, with a lease per study.

    discovered ─▶ retrieved ─▶ analysed ─▶ written ─▶ delivered
         │             │
         └─────────────┴──▶ not-analysed (reason)  |  failed (reason)

- ``discovered``: found by the query; its fingerprint (input, configuration, algorithm)
  recorded.
- ``retrieved``: the chosen series' pixel data is in the worker's memory (not kept: a
  resumed study is retrieved again).
- ``analysed``: lungs and lesions done; the result objects are being built.
- ``written``: the result objects are on disk (in the outbox or the archive) and the
  worklist row is recorded; the archive may not have confirmed them yet.
- ``delivered``: the archive confirmed every result object.
- ``not-analysed``: refused with a coded reason (the worklist row says so);
  ``failed``: an unexpected error (a defect), tried again by the next run.

Every transition is one transaction, and is made only after what it announces exists
(results are written before their state says so).  A study is worked on only by the
holder of its lease: a run claims a study by a compare-and-set on its row, renews the
lease while it works, and releases it at the end.  A lease whose holder died is taken
over: at once when the holder was a process on this host that no longer exists, else
when the lease expires.  Transitions by a holder that lost its lease are refused
(``LeaseLost``), so a stalled run cannot overwrite the work of the run that took over.

The state lives in SQLite (WAL mode, the worklist's file by default) or in PostgreSQL
when ``batch.state_url`` is a ``postgresql://`` URL (the password from ``$PGPASSWORD``,
never from a file): the choice for workers on several hosts.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, CtscreenError

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    DISCOVERED = "discovered"
    RETRIEVED = "retrieved"
    ANALYSED = "analysed"
    WRITTEN = "written"
    DELIVERED = "delivered"
    NOT_ANALYSED = "not-analysed"
    FAILED = "failed"


# Reasons that say "the archive let us down this time", not "this input cannot be
# analysed": a study refused for one of these is tried again by the next run.
RETRY_REASONS = ("incomplete-retrieval", "archive-error")
LIMIT_REASON = "limit-exceeded"

# A study is known by its site and its UID (two hospitals may hold copies of one study; each
# copy is screened and delivered to its own site).  The site of a plain run is ''.
SCHEMA = """
CREATE TABLE IF NOT EXISTS study_state (
    site TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    limits TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reasons TEXT NOT NULL DEFAULT '[]',
    owner TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (site, study_uid)
)
"""
_COLUMNS = ("study_uid, fingerprint, limits, state, reasons, owner, lease_until, version, "
            "attempts, updated_at")


_SCHEMA_LOCK = 0x63747363  # "ctsc": the advisory lock that serialises schema creation


class LeaseLost(CtscreenError):
    """This run no longer holds the study's lease: another run took it over."""


class Claim(enum.StrEnum):
    CLAIMED = "claimed"
    DONE = "done"  # finished on this very input and setup: nothing to do
    BUSY = "busy"  # another live run holds it


@dataclass(frozen=True)
class StudyState:
    study_uid: str
    state: State
    reasons: tuple[str, ...]
    fingerprint: str
    owner: str
    attempts: int


def new_owner() -> str:
    """A lease holder's name: host, process id and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_dead(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer exists."""
    try:
        host, pid_text, _ = owner.split(":")
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) holds nothing any more.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class StateStore:
    """The ``study_state`` table in SQLite (a file path) or PostgreSQL (a URL), as one site
    sees it: every study this object reads or moves is one of ``site`` ('' for a plain run;
    :meth:`for_site` gives another site's view on the same connection).  Leases are renewed
    by owner, across sites."""

    def __init__(self, target: str | Path, site: str = "") -> None:
        self.target = str(target)
        self.site = site
        self._lock = threading.Lock()  # the heartbeat thread shares the connection
        self._pg = self.target.startswith(("postgresql://", "postgres://"))
        if self._pg:
            try:
                import psycopg
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ConfigError(
                    "batch.state_url names PostgreSQL, but psycopg is not installed "
                    "(pip install 'ctscreen[postgres]')"
                ) from e
            try:
                self._db: Any = psycopg.connect(self.target, autocommit=True)
            except psycopg.Error as e:
                raise CtscreenError(f"cannot connect to the state database: {e}") from e
            # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL (two
            # runs starting at once collide in the catalogue): one at a time.
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._db.execute(SCHEMA)
                _migrate_pg(self._db)
        else:
            from .durable import open_sqlite

            self._db = open_sqlite(Path(self.target), _SQLITE_PROBE, check_same_thread=False)
            _migrate_sqlite(self._db)

    def for_site(self, site: str) -> StateStore:
        """The same store (and connection) as ``site`` sees it."""
        if site == self.site:
            return self
        other = copy.copy(self)
        other.site = site
        return other

    @property
    def label(self) -> str:
        """Where the state lives, without credentials."""
        if self._pg:
            return "postgresql://" + self.target.rsplit("@", 1)[-1]
        return self.target

    def close(self) -> None:
        """Closes the connection (of every site's view of it)."""
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ SQL in one dialect

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; returns the rows it changed."""
        with self._lock:
            if self._pg:
                cur = self._db.execute(sql.replace("?", "%s"), params)
                return int(cur.rowcount)
            with self._db:
                return int(self._db.execute(sql, params).rowcount)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._pg:
                return [tuple(r) for r in self._db.execute(sql.replace("?", "%s"), params)]
            return [tuple(r) for r in self._db.execute(sql, params).fetchall()]

    # ------------------------------------------------------------ the machine

    def discover(self, study_uid: str) -> None:
        """Record a study found by the query (nothing changes for a known study)."""
        self._exec(
            "INSERT INTO study_state (site, study_uid, state, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (site, study_uid) DO NOTHING",
            (self.site, study_uid, State.DISCOVERED.value, time.time()),
        )

    def get(self, study_uid: str) -> StudyState | None:
        rows = self._rows(
            "SELECT study_uid, state, reasons, fingerprint, owner, attempts FROM study_state "
            "WHERE site = ? AND study_uid = ?",
            (self.site, study_uid),
        )
        if not rows:
            return None
        uid, st, reasons, fp, owner, attempts = rows[0]
        return StudyState(uid, State(st), tuple(json.loads(reasons)), fp, owner, int(attempts))

    def claim(
        self,
        study_uid: str,
        fingerprint: str,
        limits: str,
        owner: str,
        lease_s: float,
        force: bool = False,
    ) -> Claim:
        """Take the study's lease unless it is done on this input or held by a live run.
        A compare-and-set on the row's version: of two runs that try at once, one wins."""
        self.discover(study_uid)
        rows = self._rows(
            "SELECT state, reasons, fingerprint, limits, owner, lease_until, version "
            "FROM study_state WHERE site = ? AND study_uid = ?",
            (self.site, study_uid),
        )
        state, reasons, fp, old_limits, holder, lease_until, version = rows[0]
        now = time.time()
        if holder and holder != owner and lease_until > now and not owner_dead(holder):
            return Claim.BUSY
        if not force and _done(State(state), json.loads(reasons), fp == fingerprint,
                               old_limits == limits):
            return Claim.DONE
        changed = self._exec(
            "UPDATE study_state SET owner = ?, lease_until = ?, fingerprint = ?, limits = ?, "
            "state = ?, reasons = '[]', attempts = attempts + 1, version = version + 1, "
            "updated_at = ? WHERE site = ? AND study_uid = ? AND version = ?",
            (owner, now + lease_s, fingerprint, limits, State.DISCOVERED.value, now,
             self.site, study_uid, version),
        )
        if changed != 1:
            return Claim.BUSY
        if holder and holder != owner:
            log.info("study %s: took over the lease of a run that stopped", study_uid)
        _fault("after", State.DISCOVERED)
        return Claim.CLAIMED

    def advance(
        self, study_uid: str, state: State, owner: str, reasons: Iterable[str] = (),
        lease_s: float | None = None,
    ) -> None:
        """Move the study to ``state`` (one transaction) if ``owner`` still holds it."""
        _fault("before", state)
        sets = "state = ?, reasons = ?, version = version + 1, updated_at = ?"
        params: list[Any] = [state.value, json.dumps(list(reasons)), time.time()]
        if lease_s is not None:
            sets += ", lease_until = ?"
            params.append(time.time() + lease_s)
        changed = self._exec(
            f"UPDATE study_state SET {sets} WHERE site = ? AND study_uid = ? AND owner = ?",
            (*params, self.site, study_uid, owner),
        )
        if changed != 1:
            raise LeaseLost(f"study {study_uid}: the lease passed to another run")
        log.debug("study %s -> %s", study_uid, state.value)
        _fault("after", state)

    def holds(self, study_uid: str, owner: str) -> bool:
        return bool(self._rows(
            "SELECT 1 FROM study_state WHERE site = ? AND study_uid = ? AND owner = ?",
            (self.site, study_uid, owner),
        ))

    def mark_delivered(self, study_uid: str) -> None:
        """``written`` -> ``delivered`` once the outbox delivered every result; only a
        study that no live run holds moves (a dead holder's lease is dropped)."""
        rows = self._rows(
            "SELECT owner, lease_until FROM study_state WHERE site = ? AND study_uid = ? "
            "AND state = ?",
            (self.site, study_uid, State.WRITTEN.value),
        )
        if not rows:
            return
        holder, lease_until = rows[0]
        if holder and lease_until > time.time() and not owner_dead(holder):
            return
        self._exec(
            "UPDATE study_state SET state = ?, owner = '', lease_until = 0, "
            "version = version + 1, updated_at = ? WHERE site = ? AND study_uid = ? "
            "AND state = ? AND owner = ?",
            (State.DELIVERED.value, time.time(), self.site, study_uid, State.WRITTEN.value,
             holder),
        )

    def release(self, study_uid: str, owner: str) -> None:
        self._exec(
            "UPDATE study_state SET owner = '', lease_until = 0, version = version + 1 "
            "WHERE site = ? AND study_uid = ? AND owner = ?",
            (self.site, study_uid, owner),
        )

    def renew(self, owner: str, lease_s: float) -> int:
        """Extend every lease ``owner`` holds, at every site (the heartbeat); returns how
        many."""
        return self._exec(
            "UPDATE study_state SET lease_until = ? WHERE owner = ?",
            (time.time() + lease_s, owner),
        )

    def in_state(self, state: State) -> list[str]:
        return [r[0] for r in self._rows(
            "SELECT study_uid FROM study_state WHERE site = ? AND state = ? ORDER BY study_uid",
            (self.site, state.value),
        )]

    def counts(self, study_uids: Iterable[str] | None = None) -> Counter[str]:
        """Studies per state (of ``study_uids`` where given)."""
        rows = self._rows("SELECT study_uid, state FROM study_state WHERE site = ?",
                          (self.site,))
        wanted = None if study_uids is None else set(study_uids)
        return Counter(st for uid, st in rows if wanted is None or uid in wanted)


# The SQLite file gets the table through _migrate_sqlite (an older table is rebuilt there).
_SQLITE_PROBE = "SELECT 1;"


def _migrate_sqlite(db: Any) -> None:
    """Create the table, or rebuild one from before sites (key: the study UID alone) with
    the key (site, study UID), its studies keeping site '' (one immediate transaction, so
    two processes opening the file at once do not race)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cols = {r[1] for r in db.execute("PRAGMA table_info(study_state)")}
        if cols and "site" not in cols:
            db.execute("ALTER TABLE study_state RENAME TO study_state_before_sites")
            db.execute(SCHEMA)
            db.execute(f"INSERT INTO study_state ({_COLUMNS}) SELECT {_COLUMNS} "
                       "FROM study_state_before_sites")
            db.execute("DROP TABLE study_state_before_sites")
            log.info("state: the study table now keys studies by site and UID")
        elif not cols:
            db.execute(SCHEMA)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _migrate_pg(db: Any) -> None:
    """PostgreSQL: a table from before sites gets the site column and the key (site, UID)
    (inside the caller's schema transaction)."""
    have = {r[0] for r in db.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'study_state'")}
    if "site" in have:
        return
    db.execute("ALTER TABLE study_state ADD COLUMN site TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE study_state DROP CONSTRAINT study_state_pkey")
    db.execute("ALTER TABLE study_state ADD PRIMARY KEY (site, study_uid)")


def _done(state: State, reasons: list[str], same_input: bool, same_limits: bool) -> bool:
    if not same_input:
        return False
    if state in (State.WRITTEN, State.DELIVERED):
        return True
    if state is not State.NOT_ANALYSED:
        return False  # unfinished or failed: do it (again)
    codes = [r.split(":")[0] for r in reasons]
    if any(c in RETRY_REASONS for c in codes):
        return False
    return same_limits or LIMIT_REASON not in codes


class Heartbeat:
    """Renews the leases of ``owner`` every ``lease_s / 4`` seconds in a thread."""

    def __init__(self, store: StateStore, owner: str, lease_s: float) -> None:
        self._store, self._owner, self._lease_s = store, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 4):
            try:
                self._store.renew(self._owner, self._lease_s)
            except Exception:  # a missed beat is survivable; the next one tries again
                log.warning("could not renew the study leases", exc_info=True)


# ------------------------------------------------------------------ fault injection

_FAULT_ENV = "CTSCREEN_FAULT_KILL"
_fault_seen: Counter[str] = Counter()


def _fault(when: str, state: State) -> None:
    """Test-only fault injection: ``CTSCREEN_FAULT_KILL=after:written:2`` SIGKILLs this
    process's whole process group (the run and its workers) right after the process's
    second transition to ``written`` (``before``: just before that transition's commit;
    ``after:discovered``: just after a claim).  It stands for a crash exactly at a state
    boundary, which no outside signal can time; the tests start the run in a session of
    its own.  Unset (always, in production) it is a no-op."""
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return
    w, st, n = spec.split(":")
    if w != when or st != state.value:
        return
    _fault_seen[spec] += 1
    if _fault_seen[spec] == int(n):
        os.killpg(os.getpgrp(), signal.SIGKILL)
