"""The worklist ranks the most suspicious first and never shows "not analysed" as negative."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pipeline.artefacts import OutputRef, Pattern, ScreeningResult, Status
from pipeline.worklist import Worklist, format_table


def _analysed(uid: str, suspicion: float, pattern: Pattern) -> ScreeningResult:
    return ScreeningResult(
        study_uid=uid,
        accession_number=f"ACC{uid[-1]}",
        study_date="20200301",
        status=Status.ANALYSED,
        lung_volume_ml=(2500.0, 2200.0),
        involved_pct=suspicion * 30,
        severity_score=int(suspicion * 10),
        severity_max=30,
        suspicion=suspicion,
        pattern=pattern,
        n_findings=3,
        outputs=(OutputRef("sr", "1.2.840.10008.5.1.4.1.1.88.34", f"{uid}.9", f"{uid}.8"),),
    )


def test_ranking_groups_and_order(tmp_path: Path) -> None:
    with Worklist(tmp_path / "wl.sqlite") as wl:
        wl.record(_analysed("1.1", 0.05, Pattern.NEGATIVE), "f1")
        wl.record(_analysed("1.2", 0.9, Pattern.TYPICAL), "f2")
        wl.record(
            ScreeningResult(
                "1.3", "", "20200301", Status.NOT_ANALYSED, reasons=("slice-too-thick:5.0mm",)
            ),
            "f3",
        )
        wl.record(_analysed("1.4", 0.3, Pattern.INDETERMINATE), "f4")
        wl.record(_analysed("1.5", 0.95, Pattern.TYPICAL), "f5")
        wl.record(
            ScreeningResult("1.6", "", "", Status.FAILED, reasons=("internal-error:ValueError",)),
            "f6",
        )
        # an atypical study with a higher score than every typical one still comes after them
        wl.record(_analysed("1.7", 0.99, Pattern.ATYPICAL), "f7")
        rows = wl.rows()
    assert [r.study_uid for r in rows] == ["1.5", "1.2", "1.4", "1.7", "1.6", "1.3", "1.1"]
    by = {r.study_uid: r for r in rows}
    assert by["1.3"].status_text == "not analysed: slice-too-thick:5.0mm"
    assert by["1.3"].flag == "NOT ANALYSED" and by["1.3"].pattern is None
    assert by["1.6"].status_text.startswith("not analysed: internal-error")
    assert by["1.5"].flag == "TYPICAL" and by["1.1"].flag == "-"
    assert by["1.4"].flag == "indeterminate" and by["1.7"].flag == "atypical"
    assert by["1.7"].pattern == "atypical"
    assert by["1.2"].result_uids == {"sr": ["1.2.9"]}
    table = format_table(rows)
    assert "not analysed: slice-too-thick:5.0mm" in table
    assert table.splitlines()[2].split()[1] == "TYPICAL"
    assert table.splitlines()[5].split()[1] == "atypical"
    json.dumps([r.as_json() for r in rows])


def test_rows_from_before_the_rsna_categories_still_rank(tmp_path: Path) -> None:
    """Rows stored as "present" / "indeterminate" / "absent" by earlier versions read as
    typical / indeterminate / negative, and keep their stored value."""
    path = tmp_path / "wl.sqlite"
    with Worklist(path) as wl:
        wl.record(_analysed("2.1", 0.5, Pattern.TYPICAL), "new")
        wl.record(_analysed("2.2", 0.2, Pattern.INDETERMINATE), "new")
        wl.record(_analysed("2.3", 0.99, Pattern.ATYPICAL), "new")
        for uid, suspicion in (("2.4", 0.8), ("2.5", 0.3), ("2.6", 0.01), ("2.7", 0.0)):
            wl.record(_analysed(uid, suspicion, Pattern.NEGATIVE), "old")
    db = sqlite3.connect(path)
    with db:
        for uid, old in (("2.4", "present"), ("2.5", "indeterminate"), ("2.6", "absent"),
                         ("2.7", "absent")):
            db.execute("UPDATE studies SET pattern = ? WHERE study_uid = ?", (old, uid))
        db.execute("UPDATE studies SET warnings = ? WHERE study_uid = '2.7'",
                   (json.dumps(["lung-asymmetry"]),))
    db.close()
    with Worklist(path) as wl:
        rows = wl.rows()
    assert [r.study_uid for r in rows] == ["2.4", "2.1", "2.5", "2.2", "2.3", "2.7", "2.6"]
    by = {r.study_uid: r for r in rows}
    assert by["2.4"].pattern == "present" and by["2.4"].flag == "TYPICAL"
    assert by["2.5"].flag == "indeterminate"
    assert by["2.6"].pattern == "absent" and by["2.6"].flag == "-"
    assert by["2.7"].flag == "check"  # an old doubtful "absent" is read, never negative


def test_a_doubtful_negative_is_never_shown_as_negative(tmp_path: Path) -> None:
    from dataclasses import replace

    with Worklist(tmp_path / "wl.sqlite") as wl:
        wl.record(_analysed("1.1", 0.01, Pattern.NEGATIVE), "a")
        doubtful = replace(_analysed("1.2", 0.0, Pattern.NEGATIVE), warnings=("lung-asymmetry",))
        wl.record(doubtful, "b")
        wl.record(ScreeningResult("1.3", "", "20200302", Status.NOT_ANALYSED, reasons=("x",)), "c")
        rows = wl.rows()
    assert [r.study_uid for r in rows] == ["1.2", "1.3", "1.1"]
    assert rows[0].flag == "check"
    assert rows[0].status_text == "analysed (check: lung-asymmetry)"
    assert rows[0].warnings == ["lung-asymmetry"]


def test_record_replaces_the_row(tmp_path: Path) -> None:
    path = tmp_path / "wl.sqlite"
    with Worklist(path) as wl:
        wl.record(_analysed("1.1", 0.5, Pattern.TYPICAL), "A")
        wl.record(_analysed("1.1", 0.1, Pattern.NEGATIVE), "B")
        assert len(wl.rows()) == 1 and wl.rows()[0].pattern == "negative"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
