"""The whole flow through the command line, on folder archives: phantoms and real CT."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from conftest import dciodvfy_lines
from ohif_reader import check_ohif_reading, require_ohif

from pipeline.cli import main
from pipeline.config import LesionsConfig
from pipeline.demo import write_phantom_study

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}


def _outputs(archive: Path) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for p in (archive / "ctscreen").rglob("*.dcm"):
        cls = str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
        kinds[
            "sr"
            if cls == SR_CLASS
            else "seg"
            if cls == SEG_CLASS
            else "sc"
            if cls in SC_CLASSES
            else "ko"
            if cls == KO_CLASS
            else cls
        ] += 1
    return kinds


def _worklist(archive: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["worklist", "--archive", str(archive), "--json"]) == 0
    rows: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return rows


@pytest.fixture(scope="module")
def phantom_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "archive"
    write_phantom_study(root / "a", seed=1, with_lesions=True, accession="E2E1")
    write_phantom_study(root / "b", seed=2, with_lesions=False, accession="E2E2")
    return root


def test_phantom_archive_end_to_end(
    phantom_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--archive", str(phantom_archive)]) == 0
    out = capsys.readouterr().out
    assert "2 studies found" in out
    rows = _worklist(phantom_archive, capsys)
    assert [r["accession_number"] for r in rows] == ["E2E1", "E2E2"]  # lesions ranked first
    sick, clear = rows
    assert sick["status"] == "analysed" and sick["pattern"] == "typical"
    assert clear["status"] == "analysed" and clear["pattern"] == "negative"
    assert float(sick["suspicion"]) > float(clear["suspicion"])  # type: ignore[arg-type]
    kinds = _outputs(phantom_archive)
    assert kinds["sr"] == 2 and kinds["seg"] == 2 and kinds["sc"] >= 2 and kinds["ko"] == 2
    assert set(kinds) == {"sr", "seg", "sc", "ko"}
    for p in (phantom_archive / "ctscreen").rglob("*.dcm"):
        errors = [ln for ln in dciodvfy_lines(p) if ln.startswith("Error")]
        assert not errors, (p.name, errors)


@pytest.mark.heavy  # three more runs: the quick tier has the first
def test_rerun_replaces_and_never_duplicates(
    phantom_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--archive", str(phantom_archive)]) == 0
    before = sorted(p.name for p in (phantom_archive / "ctscreen").rglob("*.dcm"))
    capsys.readouterr()
    assert main(["run", "--archive", str(phantom_archive)]) == 0
    assert "0 screened now, 2 already done" in capsys.readouterr().out
    assert main(["run", "--archive", str(phantom_archive), "--force"]) == 0
    after = sorted(p.name for p in (phantom_archive / "ctscreen").rglob("*.dcm"))
    assert before == after
    kinds = _outputs(phantom_archive)
    assert kinds["sr"] == 2 and kinds["seg"] == 2
    assert len(_worklist(phantom_archive, capsys)) == 2


def _link_tree(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, target)


@pytest.mark.slow
def test_real_lidc_study(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    _link_tree(shared_data / "chest-ct" / "lidc-idri-0314", archive / "lidc")
    assert main(["run", "--archive", str(archive)]) == 0
    (row,) = _worklist(archive, capsys)
    assert row["status"] == "analysed", row
    total = float(row["lung_right_ml"]) + float(row["lung_left_ml"])  # type: ignore[arg-type]
    assert 3000 < total < 8000, row
    kinds = _outputs(archive)
    assert kinds["sr"] == 1 and kinds["seg"] == 1 and kinds["sc"] >= 1 and kinds["ko"] == 1
    for p in (archive / "ctscreen").rglob("*.dcm"):
        errors = [ln for ln in dciodvfy_lines(p) if ln.startswith("Error")]
        assert not errors, (p.name, errors)

    # OHIF's SR extension loads the SR onto the CT and labels every lesion with its volume
    require_ohif()
    (sr_path,) = [p for p in (archive / "ctscreen").rglob("*.dcm")
                  if str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) == SR_CLASS]
    report: Any = hd.sr.srread(sr_path).content
    lesions = {}
    for g in report.get_volumetric_roi_measurement_groups():
        if g.tracking_identifier.startswith("lesion "):
            (volume,) = [m.value for m in g.get_measurements() if m.name.meaning == "Volume"]
            side = g.finding_sites[0].value.meaning.split()[0]
            lesions[g.tracking_identifier] = (float(volume), side)
    n = int(row["n_findings"])  # type: ignore[call-overload]
    assert len(lesions) == min(n, LesionsConfig().max_reported_findings) > 0
    check_ohif_reading(sr_path, archive / "lidc", lesions)


@pytest.mark.heavy
@pytest.mark.shared_data
def test_every_bad_and_codec_series_gets_a_row(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    _link_tree(shared_data / "bad-input", archive / "bad-input")
    _link_tree(shared_data / "codecs", archive / "codecs")
    _link_tree(shared_data / "chest-ct" / "cip-copdgene-10002k-64", archive / "copd")
    assert main(["run", "--archive", str(archive)]) == 0  # 0: nothing failed
    rows = _worklist(archive, capsys)
    assert len(rows) >= 7
    for r in rows:
        assert r["status"] in ("analysed", "not-analysed"), r
        if r["status"] == "not-analysed":
            assert r["reasons"] and r["flag"] == "NOT ANALYSED", r
            assert str(r["status_text"]).startswith("not analysed: ")
