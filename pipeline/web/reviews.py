"""Reviews of the flags, and the site's own figures against them, week by week.

A review targets the study-level call (``pattern``) or one finding (``finding:N``, N its
index: 1 is the largest) and is
``confirm``, ``reject`` or ``comment``; it keeps the user, the time and the call the reader
saw (a later re-screen does not rewrite history).  A pattern review that rejects the call
names the reader's own RSNA category.

What the figures count (docs/web.md):

- a **positive call** is an analysed study whose category is one of
  ``web.positive_categories`` (default typical and indeterminate); atypical and negative are
  negative calls; a study not analysed has no call and is left out;
- a review's **truth** is the reader's category (the call itself where the reader
  confirmed it), positive when it is one of the same categories;
- of each study only its latest confirm / reject of the pattern counts (comments do not);
- a study belongs to the ISO week of its study date (of the review where it has none).

Per week: sensitivity TP/(TP+FN), specificity TN/(TN+FP) and positive predictive value
TP/(TP+FP), each with its 95% Wilson interval, and beside them the week's flag rate (positive
calls of the analysed studies, reviewed or not).  A figure is marked ``low`` where its
estimate is under its bound (``web.min_sensitivity`` ...) and ``drift`` where even the
interval's upper end is: the bound is then outside what the week's reviews allow.
"""

from __future__ import annotations

import csv
import io
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from ..artefacts import Pattern
from ..config import WebConfig

TARGET_PATTERN = "pattern"
ACTIONS = ("confirm", "reject", "comment")
CATEGORIES = tuple(p.value for p in Pattern)
MAX_COMMENT = 2000
_LEGACY = {"present": Pattern.TYPICAL.value, "absent": Pattern.NEGATIVE.value}


def category(pattern: str | None) -> str:
    """A stored pattern as an RSNA category ('' where none)."""
    p = pattern or ""
    return _LEGACY.get(p, p)


class ReviewError(ValueError):
    """A review form that does not make sense (said to the user as a 400)."""


def add_review(
    db: sqlite3.Connection, *, study_uid: str, target: str, action: str, reader_category: str,
    comment: str, call: str, study_date: str, algorithm_version: str, n_findings: int,
    username: str, at: str, site: str = "",
) -> None:
    """Store one review, checked: a known target, a known action, a reject of the pattern
    naming another category than the call, a comment within MAX_COMMENT characters."""
    if action not in ACTIONS:
        raise ReviewError(f"expected an action of {list(ACTIONS)}")
    if target == TARGET_PATTERN:
        if not call and action != "comment":
            raise ReviewError("a study without a call can only be commented on")
        if action == "reject":
            if reader_category not in CATEGORIES or reader_category == call:
                raise ReviewError("a rejected call needs the reader's category (another one)")
        elif action == "confirm":
            reader_category = call
        else:
            reader_category = ""
    elif target.startswith("finding:") and target[8:].isdigit():
        if not 1 <= int(target[8:]) <= n_findings:  # findings are numbered from 1, largest
            raise ReviewError(f"expected a finding of 1 to {n_findings}")
        reader_category = ""
    else:
        raise ReviewError("expected the pattern or a finding as the target")
    comment = comment.strip()
    if len(comment) > MAX_COMMENT:
        raise ReviewError(f"expected a comment of at most {MAX_COMMENT} characters")
    if action == "comment" and not comment:
        raise ReviewError("a comment needs some text")
    with db:
        db.execute(
            "INSERT INTO reviews (study_uid, target, action, reader_category, comment, call, "
            "study_date, algorithm_version, username, at, site) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (study_uid, target, action, reader_category, comment, call, study_date,
             algorithm_version, username, at, site),
        )


def for_study(db: sqlite3.Connection, study_uid: str, site: str = "") -> list[sqlite3.Row]:
    """The reviews of the study of ``site`` (a copy at another site has its own)."""
    return db.execute("SELECT * FROM reviews WHERE study_uid = ? AND site = ? ORDER BY id",
                      (study_uid, site)).fetchall()


def reviewed(db: sqlite3.Connection, studies: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of the (site, study UID) pairs have a confirm / reject of their pattern."""
    uids = sorted({uid for _, uid in studies})
    if not uids:
        return set()
    marks = ",".join("?" * len(uids))
    found = {(r[0], r[1]) for r in db.execute(
        f"SELECT DISTINCT site, study_uid FROM reviews WHERE target = 'pattern' AND action <> "
        f"'comment' AND study_uid IN ({marks})", uids)}
    return found & set(studies)


def all_reviews(db: sqlite3.Connection,
                sites: Sequence[str] | None = None) -> list[sqlite3.Row]:
    """Every review (of ``sites`` only, where given)."""
    rows = db.execute("SELECT * FROM reviews ORDER BY id").fetchall()
    return rows if sites is None else [r for r in rows if r["site"] in sites]


# ------------------------------------------------------------------ figures


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float, float] | None:
    """(estimate, lower, upper) of a proportion k/n with its Wilson score interval; None
    where n is 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Figure:
    name: str
    k: int
    n: int
    bound: float

    @property
    def interval(self) -> tuple[float, float, float] | None:
        return wilson(self.k, self.n)

    @property
    def mark(self) -> str:
        """"drift" (the interval lies under the bound), "low" (the estimate does), or ''."""
        w = self.interval
        if w is None:
            return ""
        if w[2] < self.bound:
            return "drift"
        return "low" if w[0] < self.bound else ""


@dataclass
class Week:
    week: str  # ISO week, "2020-W09"
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    analysed: int = 0
    flagged: int = 0
    not_analysed: int = 0
    figures: list[Figure] = field(default_factory=list)

    @property
    def reviewed(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def flag_rate(self) -> tuple[float, float, float] | None:
        return wilson(self.flagged, self.analysed)

    def finish(self, cfg: WebConfig) -> Week:
        self.figures = [
            Figure("sensitivity", self.tp, self.tp + self.fn, cfg.min_sensitivity),
            Figure("specificity", self.tn, self.tn + self.fp, cfg.min_specificity),
            Figure("PPV", self.tp, self.tp + self.fp, cfg.min_ppv),
        ]
        return self

    @property
    def marked(self) -> bool:
        return any(f.mark for f in self.figures)


def iso_week(study_date: str, fallback: str = "") -> str:
    """The ISO week of a DICOM date (YYYYMMDD), else of an ISO timestamp's date; '' if none."""
    for text, fmt in ((study_date, "%Y%m%d"), (fallback[:10], "%Y-%m-%d")):
        try:
            d = datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        y, w, _ = d.isocalendar()
        return f"{y}-W{w:02d}"
    return ""


def week_start(week: str) -> date:
    y, w = week.split("-W")
    return date.fromisocalendar(int(y), int(w), 1)


def weekly(
    reviews: Iterable[sqlite3.Row],
    calls: Iterable[tuple[str, str, str, int]],
    cfg: WebConfig,
    since_week: str = "",
) -> tuple[list[Week], Week]:
    """The figures per week (oldest first) from ``since_week`` on, and over all reviews.

    ``reviews``: rows of the reviews table; ``calls``: (study date, status, pattern, studies)
    from :meth:`pipeline.worklist.Worklist.calls_by_date`."""
    positive = set(cfg.positive_categories)
    latest: dict[str, sqlite3.Row] = {}
    for r in reviews:
        if r["target"] == TARGET_PATTERN and r["action"] in ("confirm", "reject") and r["call"]:
            prev = latest.get(r["study_uid"])
            if prev is None or r["id"] > prev["id"]:
                latest[r["study_uid"]] = r
    weeks: dict[str, Week] = {}
    total = Week("all")

    def week_of(key: str) -> Week:
        return weeks.setdefault(key, Week(key))

    for r in latest.values():
        called = category(r["call"]) in positive
        truth = r["reader_category"] in positive
        attr = ("tp" if truth else "fp") if called else ("fn" if truth else "tn")
        setattr(total, attr, getattr(total, attr) + 1)
        key = iso_week(r["study_date"], r["at"])
        if key and key >= since_week:
            w = week_of(key)
            setattr(w, attr, getattr(w, attr) + 1)
    for study_date, status, pattern, n in calls:
        key = iso_week(study_date)
        if not key or key < since_week:
            continue
        w = week_of(key)
        if status == "analysed":
            w.analysed += n
            if category(pattern) in positive:
                w.flagged += n
        else:
            w.not_analysed += n
    return [weeks[k].finish(cfg) for k in sorted(weeks)], total.finish(cfg)


# ------------------------------------------------------------------ CSV

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> str:
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @ (or a
    tab / carriage return) gets a leading apostrophe."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow([safe_cell(h) for h in header])
    for row in rows:
        w.writerow([safe_cell(v) for v in row])
    return out.getvalue()
