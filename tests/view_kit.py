"""A small synthetic screened study for the web's view store tests (test_web_viewer,
test_web): an ellipse of lungs split at the midline and one bright ball that is a lesion."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    Finding,
    LesionAnalysis,
    LesionKind,
    LungMasks,
    Pattern,
    ScreeningResult,
    Side,
    Status,
    Volume,
    Zone,
)
from pipeline.run import StudyAnalysis

SHAPE = (36, 80, 96)  # (slices, rows, columns)
SPACING = (2.5, 1.6, 1.4)
MARKER = (-45.0, -30.0, 22.0)  # LPS: patient right, anterior, superior of the centre
UID = "1.2.826.0.1.3680043.8.498.1"


def image(affine: npt.NDArray[np.float64], shape: tuple[int, int, int] = SHAPE,
           marker: tuple[float, float, float] = MARKER) -> tuple[Volume, Any, Any]:
    """Air at -800 HU, a bright ball at ``marker`` (a lesion there too), the lungs split at
    x = 0 (right: x < 0)."""
    ct = Volume(np.zeros(shape, np.int16), affine)
    x, y, z = (ct.lps_grid(i) for i in range(3))
    d2 = (x - marker[0]) ** 2 + (y - marker[1]) ** 2 + (z - marker[2]) ** 2
    ball = d2 <= 6.0 ** 2
    hu = np.where(ball, 400, -800).astype(np.int16)
    inside = (x / 70) ** 2 + (y / 55) ** 2 <= 1
    lungs = np.where(inside & (x < -3), LUNG_LABELS[Side.RIGHT],
                     np.where(inside & (x > 3), LUNG_LABELS[Side.LEFT], 0)).astype(np.uint8)
    lesions = np.where(ball, LESION_LABELS[LesionKind.GGO], 0).astype(np.uint8)
    return Volume(hu, affine, "1.2.3.9"), lungs, lesions


def finding(ct: Volume, lesions: npt.NDArray[np.uint8]) -> Finding:
    idx = np.argwhere(lesions > 0)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return Finding(
        index=1, kind=LesionKind.GGO, volume_ml=float(len(idx) * ct.voxel_volume_ml),
        side=Side.RIGHT, zone=Zone.UPPER, mean_hu=400.0, centroid_lps=MARKER,
        bbox_min_lps=MARKER, bbox_max_lps=MARKER, voxel_count=len(idx),
        voxel_box=(*map(int, lo), *map(int, hi)), seed_index=tuple(int(v) for v in idx[0]),
    )


def analysis(ct: Volume, lungs: Any, lesions: Any, *, uid: str = UID,
              version: str = "test-1") -> StudyAnalysis:
    findings = (finding(ct, lesions),) if lesions.any() else ()
    la = LesionAnalysis(
        labels=ct.with_array(lesions), findings=findings, lungs=(), zones=(), involved_pct=1.0,
        severity_score=1, severity_max=25, severity_scale="test", suspicion=0.7,
        pattern=Pattern.TYPICAL, detector="test-detector-1", n_findings_total=len(findings))
    result = ScreeningResult(study_uid=uid, accession_number="", study_date="",
                             status=Status.ANALYSED, series_uid=uid + ".1",
                             algorithm_version=version)
    return StudyAnalysis(result, [], ct, [], LungMasks(ct.with_array(lungs), "test-lungs"), la)
