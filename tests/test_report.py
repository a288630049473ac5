"""pipeline/report/: SEG / SR / key images from a real small CT series and synthetic results.

The CT is the 64x64x79 COPDGene series in ../shared/data (skipped where absent); lungs and
lesions are boxes placed in patient coordinates, findings are made by hand.  Every object is
written to a temporary file and checked with dciodvfy (skipped where dicom3tools is absent).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import UID

import pipeline.report
from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    Finding,
    LesionAnalysis,
    LesionKind,
    LungFigure,
    LungMasks,
    OutputRef,
    Pattern,
    Side,
    Volume,
    Zone,
    ZoneFigure,
)
from pipeline.config import LesionsConfig, ReportConfig, VolumeConfig
from pipeline.lesions import finding_mask, rsna_category
from pipeline.report import (
    CHEST_CT_TRIAGE,
    EXTENT,
    KIND_CODES,
    LESION_SEGMENT_BASE,
    LUNG,
    PATTERN_CODES,
    PRIVATE_CODES,
    PRIVATE_SCHEME,
    RSNA_CATEGORY,
    SEGMENT_NUMBERS,
    VOLUME,
    ReportObjects,
    build_report,
    choose_key_slices,
    image_edge_labels,
    output_uid,
    patient_direction_letter,
    render_key_image,
    wrap_caption,
)
from pipeline.volume import build_volume, stack_geometry

SMALL_SERIES = "chest-ct/cip-copdgene-10002k-64/ct-64Dicom"
BIG_SERIES = "chest-ct/lidc-idri-0314"
NAME, VERSION = "ctscreen-test", "0.1.0+density-1"
CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)
YELLOW = (255, 230, 0)


# ---------------------------------------------------------------- pure helpers (no data)


REPORT_PACKAGE = Path(pipeline.report.__file__).parent


def test_report_modules_stay_small() -> None:
    """No module of pipeline/report/ is over 400 lines (issue 13: split, don't grow)."""
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted(REPORT_PACKAGE.rglob("*.py"))}
    assert len(sizes) > 5, sizes
    assert all(n <= 400 for n in sizes.values()), sizes


def test_code_digest_covers_every_report_module() -> None:
    """The content key (and so every output UID) follows the code of the whole package."""
    from pipeline.run import content_files

    names = content_files()
    package = sorted(p.relative_to(REPORT_PACKAGE.parent).as_posix()
                     for p in REPORT_PACKAGE.rglob("*.py"))
    assert [n for n in names if n.startswith("report/")] == package
    assert "report/sr.py" in names and "report.py" not in names


def test_output_uid_is_deterministic_and_distinct() -> None:
    a = output_uid("1.2.3", "1.0", "seg-series")
    assert a == output_uid("1.2.3", "1.0", "seg-series")
    assert a.startswith("2.25.") and UID(a).is_valid
    others = {
        output_uid("1.2.3", "1.1", "seg-series"),
        output_uid("1.2.4", "1.0", "seg-series"),
        output_uid("1.2.3", "1.0", "sr-series"),
        output_uid("1.2.3", "1.0", "seg-series", 1),
    }
    assert a not in others and len(others) == 4


@pytest.mark.parametrize(
    ("iop", "left", "right", "top", "bottom"),
    [
        ([1, 0, 0, 0, 1, 0], "R", "L", "A", "P"),  # supine axial, the usual display
        ([-1, 0, 0, 0, 1, 0], "L", "R", "A", "P"),  # left-right flipped
        ([-1, 0, 0, 0, -1, 0], "L", "R", "P", "A"),  # prone
        ([0, 1, 0, 0, 0, -1], "A", "P", "H", "F"),  # sagittal
        ([0.966, 0.259, 0, -0.259, 0.966, 0], "R", "L", "A", "P"),  # 15 degrees oblique
    ],
)
def test_image_edge_labels(iop: list[float], left: str, right: str, top: str, bottom: str) -> None:
    labels = image_edge_labels(iop[:3], iop[3:])
    assert (labels.left, labels.right, labels.top, labels.bottom) == (left, right, top, bottom)


def test_patient_direction_letter_refuses_zero() -> None:
    assert patient_direction_letter([0, 0, -2]) == "F"
    with pytest.raises(ValueError):
        patient_direction_letter([0, 0, 0])


def test_choose_key_slices() -> None:
    lungs = np.zeros((10, 4, 4), np.uint8)
    lungs[2:8, :2, :] = 1  # area 8
    lungs[5, :, :] = 2  # largest lung area at k=5
    les = np.zeros_like(lungs)
    assert choose_key_slices(lungs, les, 3) == [5]  # negative: one slice, largest lung
    les[3, :2, :2] = 1  # area 4
    les[4, :3, :3] = 1  # area 9
    les[8, :1, :3] = 2  # area 3
    assert choose_key_slices(lungs, les, 3) == [4, 3, 8]
    assert choose_key_slices(lungs, les, 2, min_gap=2) == [4, 8]  # 3 is too close to 4
    assert choose_key_slices(lungs, les, 0) == []


# ---------------------------------------------------------------- a real series


@dataclass(frozen=True)
class Case:
    ct: Volume
    sources: list[pydicom.Dataset]  # header only, in k order
    lungs: LungMasks
    analysis: LesionAnalysis


def _read_series(folder: Path, pixels: bool) -> list[pydicom.Dataset]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [pydicom.dcmread(p, stop_before_pixels=not pixels) for p in files]


def _box(ct: Volume, k: tuple[int, int], r: tuple[int, int], c: tuple[int, int]) -> Any:
    return (slice(*k), slice(*r), slice(*c))


def _patient_side(ct: Volume, cols: tuple[int, int]) -> Side:
    """The patient side of a column range (at the volume's centre row/slice), from the affine."""
    k, r = ct.shape[0] // 2, ct.shape[1] // 2
    x = ct.index_to_lps([k, r, (cols[0] + cols[1]) / 2])[0, 0]
    return Side.LEFT if x > ct.index_to_lps([k, r, (ct.shape[2] - 1) / 2])[0, 0] else Side.RIGHT


def _finding(ct: Volume, index: int, kind: LesionKind, box: Any, mean_hu: float) -> Finding:
    m = np.zeros(ct.shape, bool)
    m[box] = True
    idx = np.argwhere(m)
    lps = ct.index_to_lps(idx)
    cols = (int(idx[:, 2].min()), int(idx[:, 2].max()) + 1)
    return Finding(
        index=index,
        kind=kind,
        volume_ml=round(len(idx) * ct.voxel_volume_ml, 3),
        side=_patient_side(ct, cols),
        zone=Zone.MIDDLE,
        mean_hu=mean_hu,
        centroid_lps=tuple(float(v) for v in lps.mean(axis=0)),  # type: ignore[arg-type]
        bbox_min_lps=tuple(float(v) for v in lps.min(axis=0)),  # type: ignore[arg-type]
        bbox_max_lps=tuple(float(v) for v in lps.max(axis=0)),  # type: ignore[arg-type]
        voxel_count=len(idx),
        voxel_box=(*(int(v) for v in idx.min(axis=0)), *(int(v) + 1 for v in idx.max(axis=0))),
        seed_index=tuple(int(v) for v in idx[0]),
    )


def _make_case(ct: Volume, sources: list[pydicom.Dataset], lesions: bool = True) -> Case:
    """Two box lungs and (optionally) one GGO box in the patient-left lung and one
    consolidation box in the patient-right lung, wherever the affine puts left and right."""
    k_range, r_range = (20, 60), (15, 45)
    low_cols, high_cols = (8, 30), (34, 56)
    low_side = _patient_side(ct, low_cols)
    lung_cols = {low_side: low_cols, Side.LEFT if low_side is Side.RIGHT else Side.RIGHT: high_cols}
    lung = np.zeros(ct.shape, np.uint8)
    for side, cols in lung_cols.items():
        lung[_box(ct, k_range, r_range, cols)] = LUNG_LABELS[side]
    les = np.zeros(ct.shape, np.uint8)
    findings: tuple[Finding, ...] = ()
    lc = lung_cols[Side.LEFT]
    rc = lung_cols[Side.RIGHT]
    if lesions:
        ggo = _box(ct, (28, 40), (20, 30), (lc[0] + 4, lc[0] + 14))
        cons = _box(ct, (40, 46), (25, 32), (rc[0] + 5, rc[0] + 11))
        les[ggo] = LESION_LABELS[LesionKind.GGO]
        les[cons] = LESION_LABELS[LesionKind.CONSOLIDATION]
        findings = (
            _finding(ct, 1, LesionKind.GGO, ggo, -612.4),
            _finding(ct, 2, LesionKind.CONSOLIDATION, cons, -35.2),
        )
    vml = ct.voxel_volume_ml
    figs = []
    for side in (Side.RIGHT, Side.LEFT):
        in_lung = lung == LUNG_LABELS[side]
        g = float(np.count_nonzero(in_lung & (les == 1)) * vml)
        c = float(np.count_nonzero(in_lung & (les == 2)) * vml)
        v = float(np.count_nonzero(in_lung) * vml)
        figs.append(LungFigure(side, round(v, 3), round(g, 3), round(c, 3), 100 * (g + c) / v))
    total = sum(f.volume_ml for f in figs)
    involved = sum(f.ggo_ml + f.consolidation_ml for f in figs)
    zones = tuple(
        ZoneFigure(s, z, total / 6, 0.0, 0.0, 0) for s in (Side.RIGHT, Side.LEFT) for z in Zone
    )
    analysis = LesionAnalysis(
        labels=ct.with_array(les),
        findings=findings,
        lungs=(figs[0], figs[1]),
        zones=zones,
        involved_pct=100 * involved / total,
        severity_score=4 if lesions else 0,
        severity_max=20,
        severity_scale="CT severity score, 5 lobes x 0-4 (test)",
        suspicion=0.8731 if lesions else 0.02,
        # the call of the rule itself: two boxes, one per lung, neither marked peripheral
        pattern=rsna_category(findings, 100 * involved / total, LesionsConfig()),
        detector="test 1",
        n_findings_total=len(findings),
    )
    return Case(ct, sources, LungMasks(ct.with_array(lung), "test-boxes"), analysis)


@pytest.fixture(scope="module")
def small(shared_data: Path) -> tuple[Volume, list[pydicom.Dataset]]:
    folder = shared_data / SMALL_SERIES
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    ct, ordered = build_volume(_read_series(folder, pixels=True), VolumeConfig())
    headers = {str(d.SOPInstanceUID): d for d in _read_series(folder, pixels=False)}
    return ct, [headers[str(d.SOPInstanceUID)] for d in ordered]


@pytest.fixture(scope="module")
def case(small: tuple[Volume, list[pydicom.Dataset]]) -> Case:
    return _make_case(*small)


def _build(case: Case, version: str = VERSION, **kw: Any) -> ReportObjects:
    return build_report(
        case.ct, case.sources, case.lungs, case.analysis, ReportConfig(),
        algorithm_name=NAME, algorithm_version=version, created=kw.pop("created", CREATED), **kw,
    )


@pytest.fixture(scope="module")
def built(case: Case) -> ReportObjects:
    return _build(case)


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for one file (skips where not installed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("Error", "Warn"))]


def _all(objects: ReportObjects) -> list[tuple[str, pydicom.Dataset]]:
    return [("sr", objects.sr), ("seg", objects.seg)] + [
        (f"sc{i}", d) for i, d in enumerate(objects.key_images)
    ] + [("ko", objects.kos)]


# Warnings that come from the source headers, not from us: single-component person names
# (COPDGene), Study Time / Study ID absent in the de-identified LIDC-IDRI series.
# And our private coding scheme: dciodvfy knows only the standard's designators, and says so
# for every code of it (the scheme is declared in the SR's Coding Scheme Identification).
_SOURCE_WARNINGS = ("Retired Person Name form", "needed to build DICOMDIR - Study",
                    "Unrecognized defined term <99CTSCREEN>")


def _assert_valid(objects: ReportObjects, tmp_path: Path) -> list[str]:
    """dciodvfy: no errors, no warnings other than those inherited from the source."""
    seen = []
    for name, ds in _all(objects):
        lines = _dciodvfy(_write(ds, tmp_path / f"{name}.dcm"))
        errors = [ln for ln in lines if ln.startswith("Error")]
        assert not errors, f"{name}: {errors}"
        assert all(any(w in ln for w in _SOURCE_WARNINGS) for ln in lines), f"{name}: {lines}"
        seen += [f"{name}: {ln}" for ln in lines]
    return seen


# ---------------------------------------------------------------- the three objects


def test_objects_pass_dciodvfy(built: ReportObjects, tmp_path: Path) -> None:
    _assert_valid(built, tmp_path)


@pytest.mark.parametrize(("pattern", "code"), [
    (Pattern.TYPICAL, ("CTS0011", "Typical appearance")),
    (Pattern.INDETERMINATE, ("CTS0012", "Indeterminate appearance")),
    (Pattern.ATYPICAL, ("CTS0013", "Atypical appearance")),
    (Pattern.NEGATIVE, ("CTS0014", "Negative for pneumonia")),
])
def test_each_rsna_category_is_coded_in_a_valid_sr(case: Case, tmp_path: Path,
                                                   pattern: Pattern, code: tuple[str, str]) -> None:
    assert set(PATTERN_CODES) == set(Pattern)
    c = replace(case, analysis=replace(case.analysis, pattern=pattern))
    sr_path = _write(_build(c).sr, tmp_path / "sr.dcm")
    lines = _dciodvfy(sr_path)
    assert not [ln for ln in lines if ln.startswith("Error")], lines
    assert all(any(w in ln for w in _SOURCE_WARNINGS) for ln in lines), lines
    sr = hd.sr.srread(sr_path)
    report: Any = sr.content
    (study,) = report.get_planar_roi_measurement_groups(finding_type=CHEST_CT_TRIAGE)
    (evaluation,) = study.get_qualitative_evaluations(name=RSNA_CATEGORY)
    assert (evaluation.value.value, evaluation.value.scheme_designator,
            evaluation.value.meaning) == (code[0], PRIVATE_SCHEME, code[1])
    # the disease is never asserted; the private scheme is declared in the object
    assert "840539006" not in str(sr)
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME and scheme.CodingSchemeName


def test_objects_reference_the_source_study(built: ReportObjects, case: Case) -> None:
    study = case.sources[0].StudyInstanceUID
    for name, ds in _all(built):
        assert ds.StudyInstanceUID == study, name
        assert ds.PatientID == case.sources[0].PatientID, name
    seg_refs = built.seg.ReferencedSeriesSequence[0]
    assert seg_refs.SeriesInstanceUID == case.sources[0].SeriesInstanceUID
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in built.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert built.seg.SOPInstanceUID in evidence
    assert {d.SOPInstanceUID for d in case.sources} <= evidence
    for sc in built.key_images:
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in evidence


def test_seg_decodes_back_to_the_masks(built: ReportObjects, case: Case, tmp_path: Path) -> None:
    seg = hd.seg.segread(_write(built.seg, tmp_path / "seg.dcm"))
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for i in series.ReferencedInstanceSequence
    }
    all_uids = [str(d.SOPInstanceUID) for d in case.sources]
    ks = [k for k, u in enumerate(all_uids) if u in referenced]
    uids = [all_uids[k] for k in ks]
    got = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3, 4])
    lung, les = case.lungs.labels.array, case.analysis.labels.array
    others = [k for k in range(len(all_uids)) if k not in set(ks)]
    assert not lung[others].any() and not les[others].any()  # only empty slices left out
    lung, les = lung[ks], les[ks]
    expected = np.stack(
        [
            lung == LUNG_LABELS[Side.RIGHT],
            lung == LUNG_LABELS[Side.LEFT],
            les == LESION_LABELS[LesionKind.GGO],
            les == LESION_LABELS[LesionKind.CONSOLIDATION],
        ],
        axis=-1,
    )
    assert got.shape == expected.shape
    assert np.array_equal(got.astype(bool), expected)
    # lesions lie inside the lungs: the SEG says its segments overlap
    assert (expected[..., 2:].any(axis=-1) & expected[..., :2].any(axis=-1)).any()
    assert seg.SegmentsOverlap == "YES"
    # Each lesion alone: exactly its voxels, under its SR group's tracking UID and text.
    findings = case.analysis.findings
    numbers = [LESION_SEGMENT_BASE + f.index for f in findings]
    alone = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers).astype(bool)
    for j, f in enumerate(findings):
        box, mask = finding_mask(case.analysis.labels.array, f)
        full = np.zeros(case.ct.shape, bool)
        full[box] = mask
        assert np.array_equal(alone[..., j], full[ks]), f.index
        assert int(alone[..., j].sum()) == f.voxel_count
    # Only frames with content are stored.
    every = np.concatenate([expected, alone], axis=-1)
    assert seg.NumberOfFrames == int(np.count_nonzero(every.any(axis=(1, 2))))
    labels = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {1: "Right lung", 2: "Left lung", 3: "Ground-glass opacity",
                      4: "Consolidation", 5: "Lesion 1 (ground-glass opacity)",
                      6: "Lesion 2 (consolidation)"}
    assert seg.ContentCreatorName
    colours = {s.SegmentNumber: tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence}
    assert colours[1] != colours[2]  # the two lungs are told apart
    right = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert right.CodeValue == "39607008"
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert seg.SegmentSequence[3].SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    series = str(case.sources[0].SeriesInstanceUID)
    tracking = {s.SegmentNumber: s.TrackingUID for s in seg.SegmentSequence}
    assert tracking[1] == output_uid(series, built.identity, "tracking-lung", 1)  # = the SR group's
    assert tracking[3] == output_uid(series, built.identity, "tracking-kind", 3)
    assert tracking[5] == output_uid(series, built.identity, "tracking-lesion", 1)
    texts = {s.TrackingUID: s.TrackingID for s in seg.SegmentSequence}
    sr_texts = {str(g.tracking_uid): g.tracking_identifier for g in
                hd.sr.srread(_write(built.sr, tmp_path / "sr.dcm")).content
                .get_volumetric_roi_measurement_groups()}
    assert {u: texts[u] for u in sr_texts} == sr_texts  # one text per tracking UID
    alg = seg.SegmentSequence[2].SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == (NAME, VERSION)


def _region_sop(region: Any) -> str:
    """The SOP Instance UID of the image an SCOORD was selected from."""
    (image,) = region.ContentSequence
    return str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _measurements(group: Any) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (float(m.value), m.unit.value) for m in group.get_measurements()}


def test_sr_holds_the_measurements(built: ReportObjects, case: Case, tmp_path: Path) -> None:
    sr = hd.sr.srread(_write(built.sr, tmp_path / "sr.dcm"))
    report: Any = sr.content  # a MeasurementReport (typed as ContentSequence)
    a = case.analysis
    series = str(case.sources[0].SeriesInstanceUID)

    study = report.get_planar_roi_measurement_groups(
        tracking_uid=output_uid(series, built.identity, "tracking-study")
    )
    assert len(study) == 1
    (evaluation,) = study[0].get_qualitative_evaluations(name=RSNA_CATEGORY)
    # bilateral ground glass (and consolidation) that is not peripheral: indeterminate
    assert a.pattern is Pattern.INDETERMINATE
    assert evaluation.value.value == "CTS0012"  # Indeterminate appearance
    m = _measurements(study[0])
    assert m["Extent"] == (pytest.approx(a.involved_pct, abs=1e-3), "%")
    assert m["Severity"] == (a.severity_score, "{score}")
    assert m["Triage suspicion score"] == (pytest.approx(a.suspicion, abs=1e-4), "1")

    # Every group is anchored on a CT image: planar with an image region, or volumetric
    # with a planar partner of the same tracking UID and text.
    sop_to_k = {str(d.SOPInstanceUID): k for k, d in enumerate(case.sources)}
    planar = {str(g.tracking_uid): g for g in report.get_planar_roi_measurement_groups()}
    for g in planar.values():
        region = g.reference_type.value, g.roi
        assert region[0] == "111030"  # Image Region
        assert _region_sop(g.roi) in sop_to_k
    for g in report.get_volumetric_roi_measurement_groups():
        assert planar[str(g.tracking_uid)].tracking_identifier == g.tracking_identifier
    assert not report.get_image_measurement_groups()  # no group without a region

    for fig in a.lungs:
        number = SEGMENT_NUMBERS[fig.side]
        (group,) = report.get_volumetric_roi_measurement_groups(
            tracking_uid=output_uid(series, built.identity, "tracking-lung", number)
        )
        assert group.referenced_segment is not None
        seg_item = group.referenced_segment[0]
        assert seg_item.referenced_sop_instance_uid == built.seg.SOPInstanceUID
        assert seg_item.referenced_segment_numbers == [number]
        m = _measurements(group)
        assert m["Volume"] == (pytest.approx(fig.volume_ml, abs=1e-3), "ml")
        assert m["Extent"][0] == pytest.approx(fig.involved_pct, abs=1e-3)
        lung_site, side_site = group.finding_sites[1], group.finding_sites[0]
        assert lung_site.value.value == LUNG.value
        assert lung_site.laterality.value == ("24028007" if fig.side is Side.RIGHT
                                              else "7771000")
        assert side_site.value.meaning == f"{fig.side.value.capitalize()} lung"

    for kind in LesionKind:
        groups = report.get_volumetric_roi_measurement_groups(finding_type=KIND_CODES[kind])
        kind_total = sum(f.ggo_ml if kind is LesionKind.GGO else f.consolidation_ml
                         for f in a.lungs)
        volumes = {g.tracking_identifier: _measurements(g)["Volume"][0] for g in groups}
        assert volumes[f"all {kind}"] == pytest.approx(kind_total, abs=1e-3)

    for f in a.findings:
        (group,) = report.get_volumetric_roi_measurement_groups(
            tracking_uid=output_uid(series, built.identity, "tracking-lesion", f.index)
        )
        assert group.tracking_identifier == f"lesion {f.index}"
        assert group.finding_type.value == KIND_CODES[f.kind].value
        m = _measurements(group)
        assert m["Volume"] == (pytest.approx(f.volume_ml, abs=1e-3), "ml")
        assert m["Attenuation Coefficient"] == (pytest.approx(f.mean_hu, abs=0.05), "[hnsf'U]")
        side_site, site = group.finding_sites  # the side's lung first (what OHIF shows)
        assert side_site.value.meaning == f"{f.side.value.capitalize()} lung"
        assert site.value.value == "281393007"  # middle zone of lung
        assert site.laterality.value == ("7771000" if f.side is Side.LEFT else "24028007")
        assert group.referenced_segment[0].referenced_segment_numbers == [
            LESION_SEGMENT_BASE + f.index]
        # its outline, closed, on its largest slice, around its voxels there
        outline = planar[str(group.tracking_uid)].roi
        assert outline.GraphicType == "POLYLINE"
        xy = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2)
        assert np.allclose(xy[0], xy[-1]) and len(xy) >= 4
        k = sop_to_k[_region_sop(outline)]
        box, mask = finding_mask(a.labels.array, f)
        area = mask.sum(axis=(1, 2))
        assert area[k - box[0].start] == area.max()
        rr, cc = np.nonzero(mask[k - box[0].start])
        assert xy[:, 0].min() <= cc.min() + box[2].start + 0.5 <= xy[:, 0].max()
        assert xy[:, 1].min() <= rr.min() + box[1].start + 0.5 <= xy[:, 1].max()

    # Procedure reported, device observer, image library of the whole series.
    assert sr.ContentSequence  # root container
    codes_used = {str(i.ConceptCodeSequence[0].CodeValue) for i in sr.ContentSequence
                  if "ConceptCodeSequence" in i}
    assert "169069000" in codes_used  # CT of chest
    assert "121007" in codes_used  # observer type: device
    library = [i for i in sr.ContentSequence
               if i.ConceptNameCodeSequence[0].CodeValue == "111028"]  # Image Library
    assert len(library) == 1
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentDate == "20240102"


def test_key_images(built: ReportObjects, case: Case) -> None:
    findings = case.analysis.findings
    assert len(built.key_images) == min(ReportConfig().key_images, len(findings)) == 2
    numbers = [d.InstanceNumber for d in built.key_images]
    assert numbers == [1, 2]
    for sc in built.key_images:
        assert sc.BurnedInAnnotation == "YES"
        assert sc.BodyPartExamined
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.PatientOrientation == ["L", "P"]  # IOP [1,0,0,0,1,0]
        assert "StudyDescription" in sc
        assert sc.SeriesInstanceUID == built.key_images[0].SeriesInstanceUID
    # One per finding, largest first, each on a slice that holds it at its largest.
    les = case.analysis.labels.array
    sop_to_k = {d.SOPInstanceUID: k for k, d in enumerate(case.sources)}
    ks = [sop_to_k[d.SourceImageSequence[0].ReferencedSOPInstanceUID] for d in built.key_images]
    assert len(set(ks)) == len(ks)
    for f, k in zip(findings, ks, strict=True):
        box, mask = finding_mask(les, f)
        area = mask.sum(axis=(1, 2))
        assert area[k - box[0].start] == area.max()
    # The Key Object Selection document flags the key images and the SR.
    kos = built.kos
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    flagged = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
               for i in kos.ContentSequence if i.ValueType in ("IMAGE", "COMPOSITE")}
    assert flagged == {str(d.SOPInstanceUID) for d in (*built.key_images, built.sr)}


def _flip_left_right(case: Case) -> Case:
    """The same patient stored mirrored: IOP row direction [-1,0,0], columns reversed."""
    ct = case.ct
    n_cols = ct.shape[2]
    affine = ct.affine.copy()
    affine[:3, 3] = ct.index_to_lps([0, 0, n_cols - 1])[0]
    affine[:3, 2] = -ct.affine[:3, 2]
    flipped = Volume(ct.array[:, :, ::-1].copy(), affine, ct.frame_of_reference_uid)
    sources = []
    for k, d in enumerate(case.sources):
        d2 = copy.deepcopy(d)
        iop = [float(v) for v in d.ImageOrientationPatient]
        d2.ImageOrientationPatient = [-iop[0], -iop[1], -iop[2], *iop[3:]]
        d2.ImagePositionPatient = [round(float(v), 6) for v in flipped.index_to_lps([k, 0, 0])[0]]
        sources.append(d2)
    return _make_case(flipped, sources)


def _yellow_mean_column(pixels: np.ndarray, image_rows: int) -> float:
    _, xs = np.nonzero(np.all(pixels[:image_rows] == YELLOW, axis=-1))
    assert xs.size > 0
    return float(xs.mean())


@pytest.mark.parametrize("flip", [False, True])
def test_left_marker_is_on_the_patient_left(case: Case, flip: bool) -> None:
    """The GGO box lies in the patient-left lung; in the rendered image it must lie on the
    half whose edge is labelled "L", for a normal and a mirrored source."""
    c = _flip_left_right(case) if flip else case
    k = int(np.argmax(np.count_nonzero(c.analysis.labels.array == 1, axis=(1, 2))))
    pixels, edges, factor = render_key_image(
        c.ct, c.lungs.labels.array, c.analysis.labels.array, k, ["caption"], ReportConfig()
    )
    width = c.ct.shape[2] * factor
    on_right_half = _yellow_mean_column(pixels, c.ct.shape[1] * factor) > width / 2
    assert (edges.right if on_right_half else edges.left) == "L"
    assert (edges.left, edges.right) == (("L", "R") if flip else ("R", "L"))
    if flip:
        objects = build_report(
            c.ct, c.sources, c.lungs, c.analysis, ReportConfig(),
            algorithm_name=NAME, algorithm_version=VERSION, created=CREATED,
        )
        assert objects.key_images[0].PatientOrientation == ["R", "P"]


def test_uids_are_idempotent_and_versioned(built: ReportObjects, case: Case) -> None:
    again = _build(case, created=datetime.datetime(2030, 5, 6, 7, 8, 9))
    other = _build(case, version="0.2.0")

    def uids(o: ReportObjects) -> list[str]:
        out = []
        for _, ds in _all(o):
            out += [ds.SOPInstanceUID, ds.SeriesInstanceUID]
        out += [s.TrackingUID for s in o.seg.SegmentSequence]
        return out

    assert uids(again) == uids(built)
    assert not set(uids(other)) & set(uids(built))
    # every UID in every object, nested ones included (highdicom draws some at random)
    assert _all_uids(again) == _all_uids(built)
    assert str(again.sr.ContentDate) == "20300506"  # content date follows ``created``
    assert len({ds.SeriesInstanceUID for _, ds in _all(built)}) == 4  # one series per kind
    assert len({ds.SOPInstanceUID for _, ds in _all(built)}) == 3 + len(built.key_images)


def test_uids_follow_content_and_the_new_sr_names_the_one_it_replaces(
    built: ReportObjects, case: Case
) -> None:
    """A changed configuration, model or code (``content_key``), and changed labels with
    everything else equal, each give all-new UIDs; the replacing SR lists the old SR in its
    Predecessor Documents Sequence, and a result is never its own predecessor."""

    def uids(o: ReportObjects) -> set[str]:
        return {str(u) for _, ds in _all(o) for u in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}

    old_sr = OutputRef("sr", str(built.sr.SOPClassUID), str(built.sr.SOPInstanceUID),
                       str(built.sr.SeriesInstanceUID), "x")
    reconfigured = _build(case, content_key="another configuration", previous=[old_sr])
    assert not uids(reconfigured) & uids(built)
    (pred,) = reconfigured.sr.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == built.sr.StudyInstanceUID
    (series,) = pred.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == built.sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == built.sr.SOPInstanceUID

    labels = case.analysis.labels.array.copy()
    k, r, c = np.argwhere(labels == 0)[0]
    labels[k, r, c] = 1  # one voxel more of ground glass, nothing else changed
    relabelled = replace(case.analysis, labels=replace(case.analysis.labels, array=labels))
    one_voxel = build_report(
        case.ct, case.sources, case.lungs, relabelled, ReportConfig(),
        algorithm_name=NAME, algorithm_version=VERSION, created=CREATED,
    )
    assert not uids(one_voxel) & uids(built)

    same = _build(case, previous=[old_sr])  # the same content again: the same UIDs
    assert uids(same) == uids(built) and "PredecessorDocumentsSequence" not in same.sr


def _all_uids(o: ReportObjects) -> list[str]:
    out: list[str] = []
    for _, ds in _all(o):
        stack = [ds]
        while stack:
            d = stack.pop()
            for elem in d:
                if elem.VR == "SQ":
                    stack.extend(elem.value)
                elif elem.VR == "UI":
                    out.append(f"{elem.keyword}={elem.value}")
    return out


def test_negative_study_builds_and_validates(small: tuple[Volume, list[pydicom.Dataset]],
                                           tmp_path: Path) -> None:
    c = _make_case(*small, lesions=False)
    objects = _build(c)
    _assert_valid(objects, tmp_path)
    assert len(objects.key_images) == 1
    present = {int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for fg in objects.seg.PerFrameFunctionalGroupsSequence}
    assert present == {1, 2}
    assert len(objects.seg.SegmentSequence) == 4  # empty lesion segments stay described
    sr = hd.sr.srread(_write(objects.sr, tmp_path / "sr.dcm"))
    report: Any = sr.content
    (study,) = report.get_planar_roi_measurement_groups(finding_type=CHEST_CT_TRIAGE)
    (evaluation,) = study.get_qualitative_evaluations(name=RSNA_CATEGORY)
    assert evaluation.value.value == "CTS0014"  # Negative for pneumonia
    # The empty lesion kinds are reported as 0 ml without a segment reference.
    for kind in LesionKind:
        (g,) = report.get_planar_roi_measurement_groups(finding_type=KIND_CODES[kind])
        assert _measurements(g)["Volume"] == (0.0, "ml")
    assert not report.get_volumetric_roi_measurement_groups(
        finding_type=KIND_CODES[LesionKind.GGO]
    )


def test_geometry_mismatch_is_refused(case: Case) -> None:
    with pytest.raises(ValueError, match="ImagePositionPatient"):
        build_report(
            case.ct, case.sources[::-1], case.lungs, case.analysis, ReportConfig(),
            algorithm_name=NAME, algorithm_version=VERSION,
        )
    with pytest.raises(ValueError, match="source datasets"):
        build_report(
            case.ct, case.sources[:-1], case.lungs, case.analysis, ReportConfig(),
            algorithm_name=NAME, algorithm_version=VERSION,
        )
    small_labels = replace(case.lungs, labels=Volume(case.lungs.labels.array[1:],
                                                        case.ct.affine))
    with pytest.raises(ValueError, match="not on the CT grid"):
        build_report(
            case.ct, case.sources, small_labels, case.analysis, ReportConfig(),
            algorithm_name=NAME, algorithm_version=VERSION,
        )


def test_codes_are_short_and_real(built: ReportObjects) -> None:
    """Every code meaning <= 64 characters; standard schemes only, except the private codes
    of what has no standard code, which are declared and each used with its one meaning."""
    seen: list[pydicom.Dataset] = []

    def walk(ds: pydicom.Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    if "CodeValue" in item and "CodingSchemeDesignator" in item:
                        seen.append(item)
                    walk(item)

    for _, ds in _all(built):
        walk(ds)
    assert seen
    for item in seen:
        assert len(item.CodeMeaning) <= 64
        if item.CodingSchemeDesignator == PRIVATE_SCHEME:
            assert (item.CodeValue, item.CodeMeaning) in {(c.value, c.meaning)
                                                          for c in PRIVATE_CODES}
            continue
        assert item.CodingSchemeDesignator in {"SCT", "DCM", "UCUM", "LN", "RFC5646"}
    assert {(VOLUME.value, "SCT"), (EXTENT.value, "SCT")} <= {
        (i.CodeValue, i.CodingSchemeDesignator) for i in seen
    }
    assert codes.SCT.Lung.value in {i.CodeValue for i in seen}


# ---------------------------------------------------------------- a full-size series


@pytest.mark.slow
def test_build_report_time_full_size(shared_data: Path, tmp_path: Path) -> None:
    """275 x 512 x 512 (LIDC-IDRI-0314 headers, synthetic HU and masks): prints the time."""
    folder = shared_data / BIG_SERIES
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    headers = _read_series(folder, pixels=False)
    geometry = stack_geometry(headers, VolumeConfig())
    sources = [headers[i] for i in geometry.order]
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, size=geometry.shape, dtype=np.int16)
    ct = Volume(hu, geometry.affine, "")
    c = _make_case_big(ct, sources)
    t0 = time.perf_counter()
    objects = build_report(
        c.ct, c.sources, c.lungs, c.analysis, ReportConfig(),
        algorithm_name=NAME, algorithm_version=VERSION,
    )
    elapsed = time.perf_counter() - t0
    print(f"\nbuild_report 275x512x512: {elapsed:.1f} s, SEG {objects.seg.NumberOfFrames} frames")
    print("\n".join(_assert_valid(objects, tmp_path)))


def _make_case_big(ct: Volume, sources: list[pydicom.Dataset]) -> Case:
    """Lungs over 200 slices of 512x512 and lesions over 60: a badly affected study."""
    lung = np.zeros(ct.shape, np.uint8)
    lung[30:230, 120:400, 60:240] = LUNG_LABELS[_patient_side(ct, (60, 240))]
    lung[30:230, 120:400, 272:452] = LUNG_LABELS[_patient_side(ct, (272, 452))]
    les = np.zeros(ct.shape, np.uint8)
    les[100:160, 200:300, 100:200] = LESION_LABELS[LesionKind.GGO]
    les[120:140, 220:260, 300:360] = LESION_LABELS[LesionKind.CONSOLIDATION]
    f1 = _finding(ct, 1, LesionKind.GGO, (slice(100, 160), slice(200, 300), slice(100, 200)),
                  -600.0)
    f2 = _finding(ct, 2, LesionKind.CONSOLIDATION,
                  (slice(120, 140), slice(220, 260), slice(300, 360)), -20.0)
    vml = ct.voxel_volume_ml
    figs = tuple(
        LungFigure(s, float(np.count_nonzero(lung == LUNG_LABELS[s]) * vml), 1.0, 1.0, 5.0)
        for s in (Side.RIGHT, Side.LEFT)
    )
    analysis = LesionAnalysis(
        labels=ct.with_array(les), findings=(f1, f2), lungs=(figs[0], figs[1]),
        zones=tuple(ZoneFigure(s, z, 100.0, 5.0, 5.0, 1) for s in Side for z in Zone),
        involved_pct=5.0, severity_score=6, severity_max=20, severity_scale="test scale",
        suspicion=0.9, pattern=Pattern.TYPICAL, detector="test", n_findings_total=2,
    )
    return Case(ct, sources, LungMasks(ct.with_array(lung), "test"), analysis)


# ---------------------------------------------------------------- key images of a phantom


def test_three_separate_lesions_get_three_key_images(tmp_path: Path) -> None:
    """The default phantom's three lesions (its truth masks, measured by the lesion stage):
    one key image each, on three different slices, each caption naming its lesion, the
    source image by its InstanceNumber and its table position."""
    from pipeline.demo import DEMO_SHAPE, DEMO_SPACING
    from pipeline.lesions import analyse
    from pipeline.phantom.dicom import write_ct_series
    from pipeline.phantom.model import PhantomSpec, make_grid, render

    affine = make_grid(DEMO_SHAPE, DEMO_SPACING, "axial")
    vol, truth = render(PhantomSpec(), affine, DEMO_SHAPE, slice_thickness_mm=DEMO_SPACING[0])
    write_ct_series(vol, tmp_path / "ct", slice_thickness=DEMO_SPACING[0])
    ct, ordered = build_volume(_read_series(tmp_path / "ct", pixels=True), VolumeConfig())
    lungs = LungMasks(truth.lungs, "truth")
    analysis = analyse(ct, lungs, truth.lesions, LesionsConfig(), "truth")
    assert len(analysis.findings) == 3
    objects = build_report(ct, ordered, lungs, analysis, ReportConfig(),
                           algorithm_name=NAME, algorithm_version=VERSION, created=CREATED)
    sop_to_k = {str(d.SOPInstanceUID): k for k, d in enumerate(ordered)}
    ks = [sop_to_k[str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)]
          for d in objects.key_images]
    assert len(set(ks)) == 3
    for f, k in zip(analysis.findings, ks, strict=True):  # each slice shows its lesion
        box, mask = finding_mask(analysis.labels.array, f)
        assert mask[k - box[0].start].any()
    _assert_valid(objects, tmp_path)


def test_captions_are_never_cut_off(small: tuple[Volume, list[pydicom.Dataset]]) -> None:
    """A narrow image and long caption lines: the caption wraps, and no text pixel comes
    near the right or bottom edge (checked on the rendered pixels)."""
    ct, _ = small
    narrow = Volume(np.ascontiguousarray(ct.array[:, :, :12]), ct.affine)
    lung = np.zeros(narrow.shape, np.uint8)
    caption = ["AI triage - not for diagnosis",
               "Lesion 12 of 40: ground-glass opacity, 123.4 ml, right lower zone, mean -612 HU",
               "Series 3 image 206 (location -123.5 mm) | ctscreen 0.2.0+a-very-long-version"]
    pixels, _, factor = render_key_image(narrow, lung, lung, narrow.shape[0] // 2, caption,
                                         ReportConfig())
    h_image = narrow.shape[1] * factor
    band = pixels[h_image:]
    assert band.shape[0] > 6 * 12  # more lines than given: the caption wrapped
    ink = np.argwhere(band.max(axis=2) > 40)
    w = pixels.shape[1]
    assert ink[:, 1].max() < w - 2 and ink[:, 1].min() > 1  # nothing reaches the edges
    assert ink[:, 0].max() < band.shape[0] - 2
    # the wrapped lines hold every character of the caption, and each one fits
    from PIL import Image, ImageDraw, ImageFont
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=12)
    lines = wrap_caption(draw, caption, font, 80)
    assert len(lines) > len(caption)
    assert "".join(lines).replace(" ", "") == "".join(caption).replace(" ", "")
    assert all(draw.textlength(ln, font=font) <= 80 for ln in lines)


# ---------------------------------------------------------------- independent readers


def _dcmqi(tool: str) -> str:
    exe = shutil.which(tool) or str(Path(sys.executable).parent / tool)
    if not Path(exe).exists():
        msg = f"dcmqi's {tool} is not installed (pip: dcmqi, in the test extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_dcmqi_reads_seg_and_sr_and_each_lesion_segment_is_that_lesion(
    built: ReportObjects, case: Case, tmp_path: Path
) -> None:
    """dcmqi (an independent reader) converts the SEG to images and the SR to JSON without a
    warning; every volumetric group's referenced segment, read back by dcmqi, holds the
    volume the group reports (within 1%), lesion by lesion."""
    import SimpleITK as sitk

    seg_path = _write(built.seg, tmp_path / "seg.dcm")
    sr_path = _write(built.sr, tmp_path / "sr.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for cmd in (
        [_dcmqi("segimage2itkimage"), "--inputDICOM", str(seg_path), "--outputDirectory",
         str(out), "--outputType", "nrrd"],
        [_dcmqi("tid1500reader"), "--inputDICOM", str(sr_path), "--outputMetadata",
         str(out / "sr.json")],
    )]
    for r in run:
        text = (r.stdout + r.stderr).lower()
        assert r.returncode == 0 and "warn" not in text and "error" not in text, text
    meta = json.loads((out / "meta.json").read_text())
    files = {a["labelID"]: i + 1 for i, group in enumerate(meta["segmentAttributes"])
             for a in group}
    doc = json.loads((out / "sr.json").read_text())
    checked = set()
    for m in doc["Measurements"]:
        if "ReferencedSegment" not in m:
            continue
        number = int(m["ReferencedSegment"])
        image = sitk.ReadImage(str(out / f"{files[number]}.nrrd"))
        ml = float(sitk.GetArrayViewFromImage(image).astype(bool).sum()) * float(
            np.prod(image.GetSpacing())) / 1000.0
        volume = next(float(i["value"]) for i in m["measurementItems"]
                      if i["quantity"]["CodeMeaning"] == "Volume")
        assert ml == pytest.approx(volume, rel=0.01), m["TrackingIdentifier"]
        checked.add(m["TrackingIdentifier"])
    assert {f"lesion {f.index}" for f in case.analysis.findings} <= checked
    assert {"right lung", "left lung"} <= checked


def test_ohif_draws_every_group_and_labels_each_lesion_with_its_volume(
    built: ReportObjects, case: Case, shared_data: Path, tmp_path: Path
) -> None:
    """OHIF v3's released SR extension (tests/ohif) loads the SR, every measurement has
    coordinates on a CT image of the series, and each lesion's label shows its volume."""
    from ohif_reader import check_ohif_reading, require_ohif

    require_ohif()
    lesions = {f"lesion {f.index}": (f.volume_ml, f.side.value.capitalize())
               for f in case.analysis.findings}
    check_ohif_reading(_write(built.sr, tmp_path / "sr.dcm"), shared_data / SMALL_SERIES,
                       lesions)
