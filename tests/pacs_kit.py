"""Shared test helpers for the PACS tests (test_pacs, test_pacs_faults, test_outbox,
test_listen): phantom studies to store, the SOP classes a study holds after a run, the
command run in this process."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from orthanc import Orthanc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.artefacts import QueryWindow
from pipeline.cli import main
from pipeline.demo import DEMO_SHAPE, DEMO_SPACING
from pipeline.phantom.dicom import derive_uid, write_ct_series
from pipeline.phantom.model import PhantomSpec, make_grid, render

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
KO = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
# The phantoms' StudyDate/Time (2020-03-01 02:00): runs on it leave other studies alone.
PHANTOM_NIGHT = QueryWindow(datetime(2020, 2, 29, 18), datetime(2020, 3, 1, 7))


def result_counts(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    """Instances per kind in the study: ct, sr, seg, sc (and series per kind)."""
    out = {"ct": 0, "sr": 0, "seg": 0, "sc": 0, "ko": 0, "other": 0, "series": 0}
    for cls, counts in orthanc.series_by_class(study_uid).items():
        kind = (
            "ct" if cls == CT else "sr" if cls == SR else "seg" if cls == SEG
            else "sc" if cls in SC else "ko" if cls == KO else "other"
        )
        out[kind] += sum(counts)
        out["series"] += len(counts)
    return out


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr().out
    try:
        return rc, json.loads(out)
    except json.JSONDecodeError:
        return rc, out


_PHANTOM: dict[int, Any] = {}


def write_phantom(folder: Path, seed: int, transfer_syntax: str = ExplicitVRLittleEndian,
                  with_lesions: bool = True, study_date: str = "20200301") -> str:
    """A 200-slice chest phantom as one CT series in ``transfer_syntax``; its study UID."""
    if seed not in _PHANTOM:
        spec = PhantomSpec(seed=seed) if with_lesions else PhantomSpec(seed=seed, lesions=())
        affine = make_grid(DEMO_SHAPE, DEMO_SPACING, "axial")
        _PHANTOM[seed] = render(spec, affine, DEMO_SHAPE, slice_thickness_mm=DEMO_SPACING[0])[0]
    study_uid = derive_uid(seed, "pacs-study")
    write_ct_series(
        _PHANTOM[seed],
        folder,
        study_uid=study_uid,
        series_uid=derive_uid(seed, "pacs-series"),
        accession_number=f"PACS{seed}",
        patient_id=f"PACS-{seed:03d}",
        patient_name=f"Pacs^Phantom{seed}",
        study_date=study_date,
        slice_thickness=DEMO_SPACING[0],
        transfer_syntax=transfer_syntax,
        seed=seed,
    )
    return study_uid


def small_sc() -> Dataset:
    """A minimal Secondary Capture object of a study of its own (fresh UIDs)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
