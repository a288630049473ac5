"""Selection is pure: headers in, a choice or coded reasons out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.archive.folder import FolderArchive
from pipeline.artefacts import InstanceHeader, SeriesRef, StudyRef
from pipeline.config import SelectionConfig
from pipeline.ingest import group_studies
from pipeline.selection import select_series, series_reasons

CFG = SelectionConfig()
CT = "1.2.840.10008.5.1.4.1.1.2"


def _series(
    uid: str = "1.2.3.1",
    n: int = 200,
    step: float = 1.0,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    **kw: object,
) -> SeriesRef:
    base = InstanceHeader(
        locator="",
        study_uid="1.2.3",
        series_uid=uid,
        sop_instance_uid="",
        sop_class_uid=CT,
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness=1.0,
        pixel_spacing=(0.7, 0.7),
        image_orientation=iop,  # type: ignore[arg-type]
        rows=512,
        columns=512,
        body_part="CHEST",
        convolution_kernel="B70f",
        has_pixel_data=True,
    )
    base = replace(base, **kw)  # type: ignore[arg-type]
    import numpy as np

    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    inst = tuple(
        replace(
            base,
            sop_instance_uid=f"{uid}.{i}",
            instance_number=i + 1,
            image_position=tuple(float(v) for v in normal * step * i),  # type: ignore[arg-type]
            locator=f"/x/{uid}/{i}",
        )
        for i in range(n)
    )
    return SeriesRef("1.2.3", uid, inst)


def _study(*series: SeriesRef) -> StudyRef:
    return StudyRef("1.2.3", tuple(series))


def test_a_thin_axial_chest_series_is_chosen() -> None:
    sel = select_series(_study(_series()), CFG)
    assert sel.chosen is not None and sel.chosen.series_uid == "1.2.3.1"
    assert sel.reasons == ()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"slice_thickness": 5.0}, "slice-too-thick:5.0mm"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "not-original-primary"),
        ({"body_part": "HEAD"}, "not-chest:HEAD"),
        ({"modality": ""}, "missing-tag:Modality"),
        ({"slice_thickness": None}, "missing-tag:SliceThickness"),
        ({"has_pixel_data": False}, "no-pixel-data"),
        ({"number_of_frames": 300}, "multiframe-unsupported"),
    ],
)
def test_each_rule_gives_its_reason(changes: dict[str, object], reason: str) -> None:
    s = _series(**changes)
    assert reason in series_reasons(s, CFG)
    sel = select_series(_study(s), CFG)
    assert sel.chosen is None
    assert reason in sel.reasons or sel.reasons == ("localizer-only",)


def test_coronal_and_too_oblique_series_are_not_axial() -> None:
    coronal = _series(iop=(1, 0, 0, 0, 0, -1))
    assert any(r.startswith("not-axial:90") for r in series_reasons(coronal, CFG))
    import math

    a = math.radians(30)
    oblique = _series(iop=(1, 0, 0, 0, math.cos(a), -math.sin(a)))
    assert "not-axial:30deg" in series_reasons(oblique, CFG)
    a = math.radians(8)
    slight = _series(iop=(1, 0, 0, 0, math.cos(a), -math.sin(a)))
    assert series_reasons(slight, CFG) == ()


def test_flipped_axial_series_are_axial() -> None:
    for iop in [(-1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0), (-1, 0, 0, 0, -1, 0)]:
        assert series_reasons(_series(iop=iop), CFG) == (), iop


def test_short_stacks_are_refused() -> None:
    assert "too-few-slices:20" in series_reasons(_series(n=20), CFG)
    assert "insufficient-coverage:99mm" in series_reasons(_series(n=100), CFG)


def test_duplicate_sop_instance_uids_are_refused() -> None:
    s = _series()
    dup = SeriesRef(s.study_uid, s.series_uid, (*s.instances, s.instances[0]))
    assert "duplicate-sop-instance-uid" in series_reasons(dup, CFG)


def test_localizer_only_study() -> None:
    s = _series(n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert select_series(_study(s), CFG).reasons == ("localizer-only",)


def test_no_ct_series() -> None:
    sr = _series(modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34")
    sel = select_series(_study(sr), CFG)
    assert sel.reasons == ("no-ct-series",)


def test_lung_kernel_preferred_then_thinner() -> None:
    soft = _series("1.2.3.1", convolution_kernel="B30f")
    lung = _series("1.2.3.2", convolution_kernel="B70f")
    thin_soft = _series("1.2.3.3", convolution_kernel="B30f", slice_thickness=0.6)
    sel = select_series(_study(soft, lung, thin_soft), CFG)
    assert sel.chosen is not None and sel.chosen.series_uid == "1.2.3.2"
    sel = select_series(_study(soft, thin_soft), CFG)
    assert sel.chosen is not None and sel.chosen.series_uid == "1.2.3.3"


def test_thresholds_are_data() -> None:
    thick = _series(slice_thickness=2.0)
    assert series_reasons(thick, CFG) == ("slice-too-thick:2.0mm",)
    assert series_reasons(thick, replace(CFG, max_slice_thickness_mm=2.5)) == ()


def test_missing_study_uid() -> None:
    s = _series()
    study = StudyRef("no-uid-abc", (s,), uid_valid=False)
    assert select_series(study, CFG).reasons == ("missing-study-uid",)


# ------------------------------------------------------------------ real headers


def _studies(folder: Path) -> list[StudyRef]:
    return group_studies(FolderArchive(folder).headers())


def test_real_lidc_series_is_chosen(shared_data: Path) -> None:
    (study,) = _studies(shared_data / "chest-ct" / "lidc-idri-0314")
    sel = select_series(study, CFG)
    assert sel.chosen is not None and len(sel.chosen.instances) == 275


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("bad-input/gantry-tilt", "not-chest:BRAIN"),
        ("bad-input/gantry-tilt-variable-spacing", "not-chest:HEAD"),
        ("bad-input/localizer", "localizer-only"),
        ("bad-input/secondary-capture", "no-ct-series"),
        ("bad-input/minimal-header", "missing-tag:Modality"),
        ("codecs/j2k-lossless-series", "missing-study-uid"),
        ("codecs/wg04", "slice-too-thick:5.0mm"),
        ("chest-ct/cip-copdgene-10002k-64/ct-64Dicom", "slice-too-thick:4.0mm"),
    ],
)
def test_real_bad_input_gets_coded_reasons(shared_data: Path, folder: str, expected: str) -> None:
    studies = _studies(shared_data / folder)
    assert studies, folder
    reasons = [r for s in studies for r in select_series(s, CFG).reasons]
    assert all(select_series(s, CFG).chosen is None for s in studies)
    assert expected in reasons, reasons
