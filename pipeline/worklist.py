"""The triage worklist: one row per study, persisted in SQLite, ranked for reading.

Ranking (most urgent first), by the study-level call (the RSNA category, see
:func:`pipeline.lesions.rsna_category`):
  1. typical for COVID-19 pneumonia, by suspicion score (highest first)
  2. indeterminate, by suspicion score: findings that COVID-19 can give, but not only it
  3. atypical, by suspicion score: a finding that needs a reader, though probably for
     another diagnosis (lobar pneumonia, a mass): read after the possible COVID-19 cases
  4. not analysed or failed, and negative results that carry a quality warning (for
     example an implausible lung mask): a human must read these; never shown as negative
  5. negative, by suspicion score
Within a group, older studies first (they have waited longest).  Rows written before the
RSNA categories hold "present" / "indeterminate" / "absent": "present" ranks and shows
with the typical studies, "absent" with the negative ones (the row keeps its old value).

The group is a generated column (``rank_group``, computed by SQLite from status, pattern and
warnings, so it can never go stale) with an index on (group, score, date, UID): the list
is ordered and paged in SQL (:meth:`Worklist.page`), fast with a year of studies.  A
database from before the column gets it (and the patient columns) when first opened.

Patient name and ID are stored for the pages of ``ctscreen serve`` only: they are left out
of ``repr``, of :meth:`WorklistRow.as_json` and of the terminal table, and never logged.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .artefacts import OutputRef, Pattern, ScreeningResult, Status
from .durable import open_sqlite

# A study is known by its site and its UID (docs/sites.md); the site of a plain run is ''.
SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    site TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    reasons TEXT NOT NULL DEFAULT '[]',
    warnings TEXT NOT NULL DEFAULT '[]',
    series_uid TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    n_slices INTEGER NOT NULL DEFAULT 0,
    lung_right_ml REAL,
    lung_left_ml REAL,
    involved_pct REAL,
    severity_score INTEGER,
    severity_max INTEGER,
    suspicion REAL,
    pattern TEXT,
    n_findings INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    algorithm_version TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{}',
    first_seen TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (site, study_uid)
);
"""
# the columns of a database from before sites, copied when its table is rebuilt
_BEFORE_SITES = ("study_uid, accession_number, study_date, status, reasons, warnings, "
                 "series_uid, series_description, n_slices, lung_right_ml, lung_left_ml, "
                 "involved_pct, severity_score, severity_max, suspicion, pattern, n_findings, "
                 "outputs, algorithm_version, fingerprint, timings, first_seen, updated_at, "
                 "patient_name, patient_id")

# Columns added after the first release: (name, declaration), added to an older database
# by _migrate when it is opened.  rank_group is the ranking group of the module docstring,
# 0 (typical) .. 4 (negative); legacy "present" / "absent" as typical / negative.
_RANK_GROUP_SQL = """CASE
    WHEN status <> 'analysed' THEN 3
    WHEN pattern IN ('typical', 'present') THEN 0
    WHEN pattern = 'indeterminate' THEN 1
    WHEN pattern = 'atypical' THEN 2
    WHEN pattern IN ('negative', 'absent') THEN
        CASE WHEN json_valid(warnings) THEN
            CASE WHEN json_array_length(warnings) > 0 THEN 3 ELSE 4 END
        ELSE 3 END
    ELSE 3 END"""
_ADDED_COLUMNS = (
    ("patient_name", "TEXT NOT NULL DEFAULT ''"),
    ("patient_id", "TEXT NOT NULL DEFAULT ''"),
    ("rank_group", f"INTEGER GENERATED ALWAYS AS ({_RANK_GROUP_SQL}) VIRTUAL"),
)
_INDEXES = """
DROP INDEX IF EXISTS studies_rank;
CREATE INDEX IF NOT EXISTS studies_ranked
    ON studies (rank_group, COALESCE(suspicion, 0.0) DESC, study_date, study_uid, site);
CREATE INDEX IF NOT EXISTS studies_site ON studies (site, rank_group);
DROP INDEX IF EXISTS studies_date;
CREATE INDEX IF NOT EXISTS studies_day ON studies (study_date, status, pattern);
CREATE INDEX IF NOT EXISTS studies_updated ON studies (updated_at);
"""
# The ranking, in SQL: the order of the module docstring (a missing score counts as 0).
_ORDER_BY = "rank_group, COALESCE(suspicion, 0.0) DESC, study_date, study_uid, site"
# The groups by name (filters of Worklist.page): "read" is group 3, the studies a reader
# must look at without a call (not analysed, failed, a negative with a quality warning).
GROUPS = {"typical": 0, "indeterminate": 1, "atypical": 2, "read": 3, "negative": 4}

# Values stored by earlier versions ("present" / "absent") read as their nearest category.
_LEGACY = {"present": Pattern.TYPICAL.value, "absent": Pattern.NEGATIVE.value}
_FLAG = {
    Pattern.TYPICAL.value: "TYPICAL",
    Pattern.INDETERMINATE.value: "indeterminate",
    Pattern.ATYPICAL.value: "atypical",
    Pattern.NEGATIVE.value: "-",
}


def _category(pattern: str | None) -> str:
    """The stored pattern as one of the RSNA categories' values ('' where unknown)."""
    p = pattern or ""
    return _LEGACY.get(p, p)


@dataclass(frozen=True)
class WorklistRow:
    rank: int
    study_uid: str
    accession_number: str
    study_date: str
    status: str
    flag: str
    reasons: list[str]
    warnings: list[str]
    suspicion: float | None
    pattern: str | None
    involved_pct: float | None
    severity_score: int | None
    severity_max: int | None
    lung_right_ml: float | None
    lung_left_ml: float | None
    n_findings: int
    series_uid: str
    series_description: str
    algorithm_version: str
    result_uids: dict[str, list[str]]
    updated_at: str
    # identifying: shown by the web pages to the roles allowed to see them, nowhere else
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    rank_group: int = 3
    site: str = ""  # the hospital of a regional centre ('' for a plain run)

    @property
    def status_text(self) -> str:
        if self.status == Status.ANALYSED.value:
            return f"analysed (check: {', '.join(self.warnings)})" if self.warnings else "analysed"
        return f"not analysed: {', '.join(self.reasons) or 'unknown'}"

    def as_json(self) -> dict[str, Any]:
        """The row for scripts (``ctscreen worklist --json``), without the patient's name and ID."""
        d = asdict(self)
        del d["patient_name"], d["patient_id"]
        d["status_text"] = self.status_text
        return d


@dataclass(frozen=True)
class WorklistFilter:
    """What :meth:`Worklist.page` keeps: study dates (YYYYMMDD, inclusive; empty: open),
    a status ("analysed", "not-analysed", "failed"; empty: any), a group of
    :data:`GROUPS` by name (empty: any), one site (empty: any) and the sites a user may see
    (None: all; an empty tuple: none)."""

    date_from: str = ""
    date_to: str = ""
    status: str = ""
    group: str = ""
    site: str = ""
    sites: tuple[str, ...] | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition and its parameters ("1" where nothing is filtered)."""
        terms: list[str] = []
        args: list[Any] = []
        if self.date_from:
            terms.append("study_date >= ?")
            args.append(self.date_from)
        if self.date_to:
            terms.append("study_date <= ? AND study_date <> ''")
            args.append(self.date_to)
        if self.status:
            terms.append("status = ?")
            args.append(self.status)
        if self.group:
            if self.group not in GROUPS:
                raise ValueError(f"expected a group of {sorted(GROUPS)}, got {self.group!r}")
            terms.append("rank_group = ?")
            args.append(GROUPS[self.group])
        if self.site:
            terms.append("site = ?")
            args.append(self.site)
        if self.sites is not None:
            terms.append(f"site IN ({', '.join('?' * len(self.sites))})" if self.sites else "0")
            args.extend(self.sites)
        return (" AND ".join(terms) or "1"), args


class Worklist:
    """SQLite-backed worklist.  One connection per process; WAL so readers never block.

    ``site``: the studies one site's run records and looks up (:meth:`for_site`); None (the
    readers' default) sees every site, and a study is then looked up by UID alone (the first
    site's row where two sites hold copies of it)."""

    def __init__(self, path: str | Path, check_same_thread: bool = True,
                 site: str | None = None) -> None:
        self.path = Path(path)
        self.site = site
        self._db = open_sqlite(self.path, _SQLITE_PROBE, check_same_thread=check_same_thread)
        _migrate(self._db)

    def for_site(self, site: str) -> Worklist:
        """The same worklist (and connection) as the run of ``site`` sees it."""
        other = copy.copy(self)
        other.site = site
        return other

    def _scope(self, site: str | None = None) -> tuple[str, list[Any]]:
        """The SQL condition on the site (``site``, else this object's; '' none) and its
        parameter."""
        site = self.site if site is None else site
        return ("", []) if site is None else (" AND site = ?", [site])

    @classmethod
    def reader(cls, path: str | Path) -> Worklist:
        """A read-only connection to an existing worklist (no schema, no migration: open it
        once with ``Worklist(path)`` first), usable from any one thread at a time: the web
        pages open one per request while the batch writes."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.site = None
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA query_only=ON")
        return self

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Worklist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outputs(self, study_uid: str) -> list[OutputRef]:
        """The result objects recorded for the study by its last run."""
        scope, args = self._scope()
        row = self._db.execute(
            f"SELECT outputs FROM studies WHERE study_uid = ?{scope} ORDER BY site",
            (study_uid, *args)).fetchone()
        return [] if row is None else [OutputRef(**o) for o in json.loads(row["outputs"])]

    def record(self, result: ScreeningResult, fingerprint: str) -> None:
        """Insert or replace the study's row (of this object's site) in one transaction."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        lungs = result.lung_volume_ml or (None, None)
        with self._db:
            self._db.execute(
                """
                INSERT INTO studies (study_uid, accession_number, study_date, status, reasons,
                    warnings, series_uid, series_description, n_slices, lung_right_ml, lung_left_ml,
                    involved_pct, severity_score, severity_max, suspicion, pattern, n_findings,
                    outputs, algorithm_version, fingerprint, timings, first_seen, updated_at,
                    patient_name, patient_id, site)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(site, study_uid) DO UPDATE SET
                    accession_number=excluded.accession_number, study_date=excluded.study_date,
                    status=excluded.status, reasons=excluded.reasons,
                    warnings=excluded.warnings,
                    series_uid=excluded.series_uid,
                    series_description=excluded.series_description, n_slices=excluded.n_slices,
                    lung_right_ml=excluded.lung_right_ml, lung_left_ml=excluded.lung_left_ml,
                    involved_pct=excluded.involved_pct, severity_score=excluded.severity_score,
                    severity_max=excluded.severity_max, suspicion=excluded.suspicion,
                    pattern=excluded.pattern, n_findings=excluded.n_findings,
                    outputs=excluded.outputs, algorithm_version=excluded.algorithm_version,
                    fingerprint=excluded.fingerprint, timings=excluded.timings,
                    updated_at=excluded.updated_at, patient_name=excluded.patient_name,
                    patient_id=excluded.patient_id
                """,
                (
                    result.study_uid,
                    result.accession_number,
                    result.study_date,
                    result.status.value,
                    json.dumps(list(result.reasons)),
                    json.dumps(list(result.warnings)),
                    result.series_uid,
                    result.series_description,
                    result.n_slices,
                    lungs[0],
                    lungs[1],
                    result.involved_pct,
                    result.severity_score,
                    result.severity_max,
                    result.suspicion,
                    result.pattern.value if result.pattern else None,
                    result.n_findings,
                    json.dumps([asdict(o) for o in result.outputs]),
                    result.algorithm_version,
                    fingerprint,
                    json.dumps(result.timings_s),
                    now,
                    now,
                    result.patient_name,
                    result.patient_id,
                    self.site or "",
                ),
            )

    def rows(self) -> list[WorklistRow]:
        """Every study (of this object's site, where it has one), ranked most urgent first
        (see the module docstring)."""
        scope, args = self._scope()
        raw = self._db.execute(f"SELECT * FROM studies WHERE 1{scope} ORDER BY {_ORDER_BY}",
                               args).fetchall()
        return [_row(r, i) for i, r in enumerate(raw, start=1)]

    def page(
        self, offset: int = 0, limit: int = 50, filters: WorklistFilter | None = None
    ) -> tuple[list[WorklistRow], int]:
        """``limit`` rows from ``offset`` of the ranked list (``rows()``'s order) that pass
        ``filters``, and how many pass in all.  Ordered, paged and counted in SQL, on the
        rank index: fast with hundreds of thousands of studies."""
        where, args = (filters or WorklistFilter()).where()
        raw = self._db.execute(
            f"SELECT * FROM studies WHERE {where} ORDER BY {_ORDER_BY} LIMIT ? OFFSET ?",
            [*args, max(0, limit), max(0, offset)],
        ).fetchall()
        total = self._db.execute(f"SELECT COUNT(*) FROM studies WHERE {where}", args).fetchone()
        return [_row(r, offset + i) for i, r in enumerate(raw, start=1)], int(total[0])

    def get(self, study_uid: str, site: str | None = None) -> WorklistRow | None:
        """The study's row (its rank is 0: not computed) of ``site`` (default: this object's
        scope), or None."""
        scope, args = self._scope(site)
        r = self._db.execute(f"SELECT * FROM studies WHERE study_uid = ?{scope} ORDER BY site",
                             (study_uid, *args)).fetchone()
        return None if r is None else _row(r, 0)

    def sites(self) -> list[str]:
        """The sites that have studies here ('' for a plain run's), sorted."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT site FROM studies ORDER BY site")]

    def stamp(self) -> str:
        """Changes whenever a row is recorded (the list page polls it to refresh)."""
        r = self._db.execute("SELECT COUNT(*), MAX(updated_at) FROM studies").fetchone()
        return f"{r[0]}:{r[1] or ''}"

    def calls_by_date(
        self, date_from: str = "", date_to: str = "", sites: tuple[str, ...] | None = None,
    ) -> list[tuple[str, str, str, int]]:
        """(study date, status, stored pattern, studies) for the flag rate per week of the
        metrics page (of ``sites`` only, where given): counted on the (date, status, pattern)
        index."""
        where, args = WorklistFilter(date_from=date_from, date_to=date_to, sites=sites).where()
        return [
            (r[0], r[1], r[2] or "", int(r[3]))
            for r in self._db.execute(
                f"SELECT study_date, status, pattern, COUNT(*) FROM studies WHERE {where} "
                "GROUP BY study_date, status, pattern",
                args,
            )
        ]


_SQLITE_PROBE = "SELECT 1;"  # the table is made (or rebuilt) by _migrate


def _migrate(db: sqlite3.Connection) -> None:
    """Create the table; or rebuild one from before sites (key: the study UID alone) with
    the key (site, study UID), its rows keeping site ''; add the columns of
    ``_ADDED_COLUMNS`` an older database lacks, and the indexes (in one immediate
    transaction, so two processes opening it at once do not race)."""
    have = {r["name"] for r in db.execute("PRAGMA table_xinfo(studies)")}
    if "site" in have and all(name in have for name, _ in _ADDED_COLUMNS):
        with db:
            db.executescript(_INDEXES)
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {r["name"] for r in db.execute("PRAGMA table_xinfo(studies)")}
        old = bool(have) and "site" not in have
        if old:
            for name, decl in _ADDED_COLUMNS[:2]:  # patient_name, patient_id
                if name not in have:
                    db.execute(f"ALTER TABLE studies ADD COLUMN {name} {decl}")
            db.execute("ALTER TABLE studies RENAME TO studies_before_sites")
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                "tbl_name = 'studies_before_sites' AND sql IS NOT NULL"
                                ).fetchall():
                db.execute(f'DROP INDEX "{r[0]}"')
        if not have or old:
            db.execute(SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_xinfo(studies)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE studies ADD COLUMN {name} {decl}")
        if old:
            db.execute(f"INSERT INTO studies ({_BEFORE_SITES}) SELECT {_BEFORE_SITES} "
                       "FROM studies_before_sites")
            db.execute("DROP TABLE studies_before_sites")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    with db:
        db.executescript(_INDEXES)


def _row(r: sqlite3.Row, rank: int) -> WorklistRow:
    outputs = [OutputRef(**o) for o in json.loads(r["outputs"])]
    uids: dict[str, list[str]] = {}
    for o in outputs:
        uids.setdefault(o.kind, []).append(o.sop_instance_uid)
    analysed = r["status"] == Status.ANALYSED.value
    warnings = json.loads(r["warnings"])
    flag = _FLAG.get(_category(r["pattern"]), "?") if analysed else "NOT ANALYSED"
    if analysed and warnings and flag == "-":
        flag = "check"
    return WorklistRow(
        rank=rank,
        study_uid=r["study_uid"],
        accession_number=r["accession_number"],
        study_date=r["study_date"],
        status=r["status"],
        flag=flag,
        reasons=json.loads(r["reasons"]),
        warnings=warnings,
        suspicion=r["suspicion"],
        pattern=r["pattern"],
        involved_pct=r["involved_pct"],
        severity_score=r["severity_score"],
        severity_max=r["severity_max"],
        lung_right_ml=r["lung_right_ml"],
        lung_left_ml=r["lung_left_ml"],
        n_findings=r["n_findings"],
        series_uid=r["series_uid"],
        series_description=r["series_description"],
        algorithm_version=r["algorithm_version"],
        result_uids=uids,
        updated_at=r["updated_at"],
        patient_name=r["patient_name"],
        patient_id=r["patient_id"],
        rank_group=r["rank_group"],
        site=r["site"],
    )


def format_table(rows: list[WorklistRow]) -> str:
    """The worklist as a fixed-width table for a terminal (with a site column where any
    row has a site)."""
    sites = any(r.site for r in rows)
    head = (
        f"{'#':>3}  {'flag':<13} {'score':>5}  {'involved':>8}  {'severity':>8}  "
        f"{'lungs R/L (ml)':>14}  {'date':<8}  " + (f"{'site':<12} " if sites else "")
        + f"{'accession':<16} status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        score = f"{r.suspicion:.2f}" if r.suspicion is not None else "-"
        inv = f"{r.involved_pct:.1f}%" if r.involved_pct is not None else "-"
        sev = f"{r.severity_score}/{r.severity_max}" if r.severity_score is not None else "-"
        lungs = (
            f"{r.lung_right_ml:.0f}/{r.lung_left_ml:.0f}"
            if r.lung_right_ml is not None and r.lung_left_ml is not None
            else "-"
        )
        site = f"{(r.site or '-')[:12]:<12} " if sites else ""
        lines.append(
            f"{r.rank:>3}  {r.flag:<13} {score:>5}  {inv:>8}  {sev:>8}  {lungs:>14}  "
            f"{r.study_date or '-':<8}  {site}{(r.accession_number or '-')[:16]:<16} "
            f"{r.status_text}"
        )
    if not rows:
        lines.append("(no studies)")
    return "\n".join(lines)
