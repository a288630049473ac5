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
        wl.record(_analysed("1.1", 0.05, Pattern.ABSENT), "f1")
        wl.record(_analysed("1.2", 0.9, Pattern.PRESENT), "f2")
        wl.record(
            ScreeningResult(
                "1.3", "", "20200301", Status.NOT_ANALYSED, reasons=("slice-too-thick:5.0mm",)
            ),
            "f3",
        )
        wl.record(_analysed("1.4", 0.3, Pattern.INDETERMINATE), "f4")
        wl.record(_analysed("1.5", 0.95, Pattern.PRESENT), "f5")
        wl.record(
            ScreeningResult("1.6", "", "", Status.FAILED, reasons=("internal-error:ValueError",)),
            "f6",
        )
        rows = wl.rows()
    assert [r.study_uid for r in rows] == ["1.5", "1.2", "1.4", "1.6", "1.3", "1.1"]
    by = {r.study_uid: r for r in rows}
    assert by["1.3"].status_text == "not analysed: slice-too-thick:5.0mm"
    assert by["1.3"].flag == "NOT ANALYSED" and by["1.3"].pattern is None
    assert by["1.6"].status_text.startswith("not analysed: internal-error")
    assert by["1.5"].flag == "FLAG" and by["1.1"].flag == "-"
    assert by["1.2"].result_uids == {"sr": ["1.2.9"]}
    table = format_table(rows)
    assert "not analysed: slice-too-thick:5.0mm" in table
    assert table.splitlines()[2].split()[1] == "FLAG"
    json.dumps([r.as_json() for r in rows])


def test_a_doubtful_negative_is_never_shown_as_negative(tmp_path: Path) -> None:
    from dataclasses import replace

    with Worklist(tmp_path / "wl.sqlite") as wl:
        wl.record(_analysed("1.1", 0.01, Pattern.ABSENT), "a")
        doubtful = replace(_analysed("1.2", 0.0, Pattern.ABSENT), warnings=("lung-asymmetry",))
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
        wl.record(_analysed("1.1", 0.5, Pattern.PRESENT), "A")
        wl.record(_analysed("1.1", 0.1, Pattern.ABSENT), "B")
        assert len(wl.rows()) == 1 and wl.rows()[0].pattern == "absent"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
