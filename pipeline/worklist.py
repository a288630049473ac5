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
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .artefacts import OutputRef, Pattern, ScreeningResult, Status
from .durable import open_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
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
    updated_at TEXT NOT NULL
);
"""

# Values stored by earlier versions ("present" / "absent") read as their nearest category.
_LEGACY = {"present": Pattern.TYPICAL.value, "absent": Pattern.NEGATIVE.value}
_GROUP = {Pattern.TYPICAL.value: 0, Pattern.INDETERMINATE.value: 1, Pattern.ATYPICAL.value: 2,
          Pattern.NEGATIVE.value: 4}
_NOT_ANALYSED_GROUP = 3
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

    @property
    def status_text(self) -> str:
        if self.status == Status.ANALYSED.value:
            return f"analysed (check: {', '.join(self.warnings)})" if self.warnings else "analysed"
        return f"not analysed: {', '.join(self.reasons) or 'unknown'}"

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status_text"] = self.status_text
        return d


class Worklist:
    """SQLite-backed worklist.  One connection per process; WAL so readers never block."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_sqlite(self.path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Worklist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outputs(self, study_uid: str) -> list[OutputRef]:
        """The result objects recorded for the study by its last run."""
        row = self._db.execute(
            "SELECT outputs FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        return [] if row is None else [OutputRef(**o) for o in json.loads(row["outputs"])]

    def record(self, result: ScreeningResult, fingerprint: str) -> None:
        """Insert or replace the study's row in one transaction."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        lungs = result.lung_volume_ml or (None, None)
        with self._db:
            self._db.execute(
                """
                INSERT INTO studies (study_uid, accession_number, study_date, status, reasons,
                    warnings, series_uid, series_description, n_slices, lung_right_ml, lung_left_ml,
                    involved_pct, severity_score, severity_max, suspicion, pattern, n_findings,
                    outputs, algorithm_version, fingerprint, timings, first_seen, updated_at)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(study_uid) DO UPDATE SET
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
                    updated_at=excluded.updated_at
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
                ),
            )

    def rows(self) -> list[WorklistRow]:
        """Every study, ranked most urgent first (see the module docstring)."""
        raw = self._db.execute("SELECT * FROM studies").fetchall()

        def key(r: sqlite3.Row) -> tuple[int, float, str, str]:
            if r["status"] != Status.ANALYSED.value:
                group = _NOT_ANALYSED_GROUP
            else:
                group = _GROUP.get(_category(r["pattern"]), _NOT_ANALYSED_GROUP)
                if group == _GROUP[Pattern.NEGATIVE.value] and json.loads(r["warnings"]):
                    group = _NOT_ANALYSED_GROUP  # negative from a doubtful analysis: read it

            return (group, -(r["suspicion"] or 0.0), r["study_date"], r["study_uid"])

        out = []
        for i, r in enumerate(sorted(raw, key=key), start=1):
            outputs = [OutputRef(**o) for o in json.loads(r["outputs"])]
            uids: dict[str, list[str]] = {}
            for o in outputs:
                uids.setdefault(o.kind, []).append(o.sop_instance_uid)
            analysed = r["status"] == Status.ANALYSED.value
            warnings = json.loads(r["warnings"])
            flag = _FLAG.get(_category(r["pattern"]), "?") if analysed else "NOT ANALYSED"
            if analysed and warnings and flag == "-":
                flag = "check"
            out.append(
                WorklistRow(
                    rank=i,
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
                )
            )
        return out


def format_table(rows: list[WorklistRow]) -> str:
    """The worklist as a fixed-width table for a terminal."""
    head = (
        f"{'#':>3}  {'flag':<13} {'score':>5}  {'involved':>8}  {'severity':>8}  "
        f"{'lungs R/L (ml)':>14}  {'date':<8}  {'accession':<16} status"
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
        lines.append(
            f"{r.rank:>3}  {r.flag:<13} {score:>5}  {inv:>8}  {sev:>8}  {lungs:>14}  "
            f"{r.study_date or '-':<8}  {(r.accession_number or '-')[:16]:<16} {r.status_text}"
        )
    if not rows:
        lines.append("(no studies)")
    return "\n".join(lines)
