"""The Python API (``import pipeline``): screen a folder, datasets or a Volume and look at
what the batch computes, without writing anything until ``save``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

import pipeline
from pipeline.artefacts import LUNG_LABELS, Side, Status, Volume
from pipeline.demo import write_phantom_study
from pipeline.errors import CtscreenError

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api") / "study"
    write_phantom_study(folder, seed=3, with_lesions=True, accession="API1")
    return folder


@pytest.fixture(scope="module")
def screened(study: Path) -> pipeline.Screening:
    return pipeline.screen(study)


def test_screen_a_folder_keeps_everything_and_writes_nothing(
    study: Path, screened: pipeline.Screening, tmp_path: Path
) -> None:
    s = screened
    assert s.analysed and s.result.pattern is not None and s.result.pattern.value == "typical"
    assert s.volume is not None and s.lungs is not None and s.lesions is not None
    assert s.lungs.labels.shape == s.volume.shape == s.lesions.shape
    assert len(s.sources) == s.volume.shape[0]
    assert s.analysis is not None and s.analysis.findings
    # the right lung is on the patient's right, whatever the array order
    k, r, c = np.argwhere(s.lungs.labels.array == LUNG_LABELS[Side.RIGHT]).mean(axis=0)
    assert s.volume.index_to_lps([k, r, c])[0, 0] < 0  # LPS: right is -x
    assert [kind for kind, _ in s.datasets][:2] == ["seg", "sr"]
    assert {kind for kind, _ in s.datasets} == {"seg", "sr", "sc", "ko"}
    assert not (study / "ctscreen").exists()  # nothing written into the source
    saved = s.save(tmp_path / "out")
    assert len(saved) == len(s.datasets)
    sr = pydicom.dcmread(next(p for p in saved if p.name.startswith("sr-")))
    assert sr.StudyInstanceUID == s.sources[0].StudyInstanceUID


def test_datasets_give_the_same_result_and_stay_as_they_were(
    study: Path, screened: pipeline.Screening
) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted(study.rglob("*.dcm"))]
    s = pipeline.screen(datasets)
    again = screened
    assert s.analysed
    assert [str(ds.SOPInstanceUID) for _, ds in s.datasets] == [
        str(ds.SOPInstanceUID) for _, ds in again.datasets]  # identity follows content
    assert all("PixelData" in ds for ds in datasets)  # the caller's datasets are untouched


def test_a_volume_and_one_stage_at_a_time(screened: pipeline.Screening) -> None:
    s = screened
    assert s.volume is not None and s.analysis is not None
    v = pipeline.screen(s.volume)
    assert v.analysed and not v.datasets
    assert v.result.involved_pct == pytest.approx(s.result.involved_pct)
    lungs = pipeline.segment_lungs(s.volume)
    assert np.array_equal(lungs.labels.array, s.lungs.labels.array)
    analysis = pipeline.detect_lesions(s.volume, lungs)
    assert analysis.pattern is s.analysis.pattern


def test_what_cannot_be_screened_says_why(tmp_path: Path) -> None:
    air = Volume(np.full((40, 64, 64), -1000, np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    s = pipeline.screen(air)
    assert s.result.status is Status.NOT_ANALYSED and s.result.reasons == ("no-lungs-found",)
    assert s.lungs is None and not s.datasets
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtscreenError, match="expected one study"):
        pipeline.screen(tmp_path / "empty")
    with pytest.raises(CtscreenError, match="expected a folder"):
        pipeline.screen(tmp_path / "missing")
