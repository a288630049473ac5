"""Screening studies from a real PACS (Orthanc) through both doors, results written back.

DIMSE (C-FIND, C-GET / C-MOVE, C-STORE) and DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against
a real Orthanc on loopback; the real LIDC-IDRI-0314 series end to end; phantom studies
stored compressed (JPEG-LS, JPEG 2000 lossless) retrieved as stored.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from conftest import site_config
from orthanc import Orthanc
from pacs_kit import (
    CT,
    PHANTOM_NIGHT,
    SR,
    result_counts,
    run_cli,
    write_phantom,
)
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from pipeline.archive import open_archive
from pipeline.artefacts import QueryWindow
from pipeline.batch import run_batch
from pipeline.config import load_config
from pipeline.ingest import find_studies
from pipeline.outbox import Outbox
from pipeline.run import Stages
from pipeline.worklist import Worklist

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

LIDC_STUDY = "1.3.6.1.4.1.14519.5.2.1.6279.6001.265704884949271879044145982159"


# ---------------------------------------------------------------- LIDC end to end

@pytest.fixture(scope="module")
def lidc_in_orthanc(orthanc: Orthanc, shared_data: Path) -> Iterator[str]:
    files = sorted((shared_data / "chest-ct" / "lidc-idri-0314").glob("*.dcm"))
    assert len(files) == 275
    orthanc.upload(files)
    yield LIDC_STUDY
    orthanc.delete_study(LIDC_STUDY)


@pytest.mark.slow
@pytest.mark.parametrize("door", ["pacs", "pacs-web"])
def test_lidc_through_each_door(
    door: str,
    orthanc: Orthanc,
    lidc_in_orthanc: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found by C-FIND / QIDO, retrieved by C-GET / WADO, screened, SR + SEG + SC stored
    back by C-STORE / STOW into the same study; a second run adds nothing."""
    orthanc.delete_results(lidc_in_orthanc)
    assert result_counts(orthanc, lidc_in_orthanc)["sr"] == 0
    cfg = site_config(orthanc, tmp_path)
    wl = tmp_path / "wl.sqlite"
    args = ["run", "--archive", door, "--config", str(cfg), "--worklist", str(wl), "--json"]
    rc, summary = run_cli([*args, "--from", "1999-12-31T00:00", "--to", "2000-01-02"], capsys)
    assert rc == 0, summary
    assert summary["studies_found"] == 1 and summary["by_status"] == {"analysed": 1}, summary
    print(f"\n{door}: stage seconds {summary['stage_seconds']}")
    counts = result_counts(orthanc, lidc_in_orthanc)
    assert counts["ct"] == 275
    assert counts["sr"] == 1 and counts["seg"] == 1 and counts["sc"] >= 1, counts
    assert summary["outbox"]["pending"] == 0 and summary["outbox"]["refused"] == 0

    rc, again = run_cli(args, capsys)
    assert rc == 0 and again["skipped_unchanged"] == 1 and again["outputs_written"] == 0, again
    assert result_counts(orthanc, lidc_in_orthanc) == counts  # a second run adds nothing

    with Worklist(wl) as worklist:
        (row,) = worklist.rows()
    assert row.status == "analysed" and row.n_findings >= 0
    assert row.result_uids["sr"] and row.result_uids["seg"]


def test_query_window_keeps_other_nights_out(orthanc: Orthanc, tmp_path: Path) -> None:
    """The window goes into the StudyDate query; the time bounds are applied exactly."""
    folder = tmp_path / "p"
    study = write_phantom(folder, seed=21, study_date="20240105")  # StudyTime 02:00
    orthanc.upload(sorted(folder.glob("*.dcm")))
    try:
        config = load_config(site_config(orthanc, tmp_path))
        for name in ("pacs", "pacs-web"):
            archive = open_archive(name, config.archives[name])

            def found(start: str, end: str) -> list[str]:
                w = QueryWindow(_dt(start), _dt(end))
                return [s.study_uid for s in find_studies(archive, window=w)]  # noqa: B023

            assert study in found("2024-01-04T20:00", "2024-01-05T07:00")
            assert study not in found("2024-01-05T03:00", "2024-01-06T07:00")  # same day, later
            assert study not in found("2024-01-06T00:00", "2024-01-07T00:00")
            (ref,) = [s for s in find_studies(archive, window=QueryWindow.since(None))
                      if s.study_uid == study]
            assert [len(s.instances) for s in ref.series] == [200]
            assert ref.series[0].first.has_pixel_data  # judged from Rows/Columns
    finally:
        orthanc.delete_study(study)


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------- compressed, C-MOVE

def _results(orthanc: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> dataset of every result object (not CT) Orthanc holds."""
    out = {}
    for inst in orthanc.find("Instance", {"StudyInstanceUID": study_uid}):
        r = orthanc.session.get(f"{orthanc.url}/instances/{inst['ID']}/file", timeout=60)
        r.raise_for_status()
        ds = pydicom.dcmread(io.BytesIO(r.content))
        if ds.SOPClassUID != CT:
            out[str(ds.SOPInstanceUID)] = ds
    return out


def test_changed_configuration_replaces_the_result_in_orthanc(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Screen, change the analysis configuration, screen again: Orthanc holds exactly the
    new result set, under new UIDs; the new SR names the old one as its predecessor; the
    worklist and the delivery state speak of the new set only."""
    folder = tmp_path / "study"
    study = write_phantom(folder, seed=11)
    orthanc.upload(sorted(folder.glob("*.dcm")))
    try:
        config = load_config(site_config(orthanc, tmp_path))
        archive = open_archive("pacs-clean", config.archives["pacs-clean"])
        with Worklist(tmp_path / "wl.sqlite") as wl, Outbox(tmp_path / "outbox") as ob:
            first = run_batch(archive, Stages.load(config), wl, outbox=ob, window=PHANTOM_NIGHT)
            assert first.by_status == {"analysed": 1}, first.reasons
            old = _results(orthanc, study)
            assert {o.sop_instance_uid for o in wl.outputs(study)} == set(old)
            (old_sr,) = [u for u, ds in old.items() if ds.SOPClassUID == SR]

            changed = replace(config, lesions=replace(config.lesions,
                                                      ggo_min_hu=config.lesions.ggo_min_hu + 100))
            second = run_batch(archive, Stages.load(changed), wl, outbox=ob,
                               window=PHANTOM_NIGHT)
            assert second.by_status == {"analysed": 1} and second.skipped_unchanged == 0
            new = _results(orthanc, study)
            outputs = {o.sop_instance_uid for o in wl.outputs(study)}
            assert set(new) == outputs and not set(new) & set(old)  # exactly the new set
            (new_sr,) = [ds for ds in new.values() if ds.SOPClassUID == SR]
            assert not {ds.SeriesInstanceUID for ds in new.values()} & {
                ds.SeriesInstanceUID for ds in old.values()}
            (pred,) = new_sr.PredecessorDocumentsSequence
            assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
                .ReferencedSOPInstanceUID == old_sr
            states = {it.sop_uid: it.state for it in ob.items()}
            assert all(states[u] == "delivered" for u in outputs)
            assert ob.counts()["pending"] == 0
            (row,) = wl.rows()
            assert row.result_uids["sr"] == [str(new_sr.SOPInstanceUID)]

            third = run_batch(archive, Stages.load(changed), wl, outbox=ob,
                              window=PHANTOM_NIGHT)
            assert third.skipped_unchanged == 1 and set(_results(orthanc, study)) == set(new)
    finally:
        orthanc.delete_study(study)


@pytest.mark.parametrize(
    ("door", "syntax"),
    [
        ("pacs", JPEGLSLossless),
        ("pacs", JPEG2000Lossless),
        ("pacs-web", JPEGLSLossless),
        ("pacs-web", JPEG2000Lossless),
        ("pacs-move", JPEGLSLossless),
    ],
)
def test_compressed_study_is_retrieved_as_stored(
    door: str, syntax: str, orthanc: Orthanc, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    study = write_phantom(folder, seed=7, transfer_syntax=syntax)
    orthanc.upload(sorted(folder.glob("*.dcm")))
    try:
        (first,) = orthanc.find("Instance", {"StudyInstanceUID": study, "InstanceNumber": "1"})
        assert orthanc.transfer_syntax(first["ID"]) == syntax  # stored compressed
        config = load_config(site_config(orthanc, tmp_path))
        archive = open_archive(door, config.archives[door])
        seen: list[str] = []
        load = archive.load

        def recording_load(locators: list[str]) -> list[pydicom.Dataset]:
            t0 = time.perf_counter()
            datasets = load(locators)
            print(f"\n{door} {syntax}: {len(datasets)} instances in "
                  f"{time.perf_counter() - t0:.2f} s")
            seen.extend(str(ds.file_meta.TransferSyntaxUID) for ds in datasets)
            return datasets

        archive.load = recording_load  # type: ignore[method-assign]
        with Worklist(tmp_path / "wl.sqlite") as wl, Outbox(tmp_path / "outbox") as ob:
            summary = run_batch(archive, Stages.load(config), wl, outbox=ob, window=PHANTOM_NIGHT)
            (row,) = wl.rows()
        assert summary.by_status == {"analysed": 1}, summary.reasons
        assert row.pattern == "typical"
        assert len(seen) == 200 and set(seen) == {syntax}  # no transcoding by the archive
        counts = result_counts(orthanc, study)
        assert counts["sr"] == 1 and counts["seg"] == 1 and counts["sc"] >= 1, counts
    finally:
        orthanc.delete_study(study)
