"""run_study on phantom series written as DICOM in flipped and oblique orientations:
left stays left all the way from the files to the SR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.archive.folder import FolderArchive
from pipeline.artefacts import Status
from pipeline.config import Config
from pipeline.demo import write_phantom_study
from pipeline.ingest import find_studies
from pipeline.run import Stages, run_study

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

LEFT, RIGHT = "7771000", "24028007"  # SNOMED CT laterality codes
GGO, CONSOLIDATION = "112120", "95436008"  # DCM / SNOMED CT finding codes


@pytest.fixture(scope="module")
def stages() -> Stages:
    return Stages.load(Config())


def _items(items: object) -> Iterator[Dataset]:
    for item in items:  # type: ignore[attr-defined]
        yield item
        if "ContentSequence" in item:
            yield from _items(item.ContentSequence)


def _finding_lateralities(sr: Dataset, finding_code: str) -> list[str]:
    """Laterality codes of the finding sites of every measurement group of ``kind``."""
    out = []
    for group in _items(sr.ContentSequence):
        if "ContentSequence" not in group:
            continue
        children = list(group.ContentSequence)
        types = [
            c.ConceptCodeSequence[0].CodeValue
            for c in children
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == "121071"
        ]
        tracking = [c.get("TextValue", "") for c in children if c.ValueType == "TEXT"]
        if finding_code not in types:
            continue
        if not any(str(t).startswith("lesion") for t in tracking):
            continue
        for c in children:
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == "363698007":
                for m in c.get("ContentSequence", []):
                    out.append(m.ConceptCodeSequence[0].CodeValue)
    return out


@pytest.mark.parametrize("orientation", ["axial", "flipped", "oblique"])
def test_left_stays_left_from_dicom_to_sr(
    orientation: str, tmp_path: Path, stages: Stages
) -> None:
    write_phantom_study(tmp_path / "s", seed=3, with_lesions=True, accession="O",
                        orientation=orientation)
    archive = FolderArchive(tmp_path)
    (study,) = find_studies(archive)
    result = run_study(study, archive, stages)
    assert result.status is Status.ANALYSED, result.reasons
    assert result.lung_volume_ml is not None
    right_ml, left_ml = result.lung_volume_ml
    assert right_ml > left_ml  # the phantom's heart indents the left lung
    sr_ref = next(o for o in result.outputs if o.kind == "sr")
    sr = pydicom.dcmread(sr_ref.locator)
    # the phantom's only consolidation lies in the patient's LEFT lung (default_lesions)
    lats = _finding_lateralities(sr, CONSOLIDATION)
    assert lats and set(lats) == {LEFT}, lats
    # its largest ground-glass opacity lies in the RIGHT lung, the small one in the left
    ggo = _finding_lateralities(sr, GGO)
    assert ggo[0] == RIGHT and LEFT in ggo, ggo
