"""The whole report of one analysed series (``build_report``): checks its inputs, makes the
choices the objects share, then builds the SEG, the SR, the key images and the KOS."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from ..artefacts import LesionAnalysis, LungMasks, OutputRef, Volume
from ..config import ReportConfig
from .codes import LESION_SEGMENT_BASE
from .context import _Context
from .key_images import _build_key_images
from .kos import _build_kos
from .seg import _build_seg
from .slices import KEY_IMAGE_MIN_GAP_MM, choose_finding_slices, choose_key_slices, lesion_view
from .sr import _build_sr
from .uids import content_identity

log = logging.getLogger(__package__ or __name__)  # "pipeline.report", as before the split

_POSITION_TOL_MM = 0.05
_DIRECTION_TOL = 1e-3


@dataclass(frozen=True)
class ReportObjects:
    """The DICOM objects of one screening run, ready to be stored."""

    sr: pydicom.Dataset
    seg: pydicom.Dataset
    key_images: tuple[pydicom.Dataset, ...]
    kos: pydicom.Dataset  # Key Object Selection: the key images and the SR
    identity: str = ""  # the seed of their UIDs (``content_identity``)


def build_report(
    ct: Volume,
    sources: Sequence[pydicom.Dataset],
    lungs: LungMasks,
    analysis: LesionAnalysis,
    config: ReportConfig,
    *,
    algorithm_name: str,
    algorithm_version: str,
    content_key: str = "",
    previous: Sequence[OutputRef] = (),
    created: datetime.datetime | None = None,
) -> ReportObjects:
    """SEG, SR and key images for one analysed series.

    ``sources[k]`` must be the (possibly header-only) CT dataset of slice ``k`` of ``ct``;
    the geometry of both is checked and a mismatch raises ``ValueError``.  ``created`` sets
    the content date/time of every object (default: now); it does not enter any UID.
    ``content_key`` is ``Stages.content_key`` (what else the content depends on);
    ``previous`` are the objects of the result this one replaces: its SRs become the new
    SR's predecessor documents (an object with this result's own UID is not its own
    predecessor).
    """
    t0 = time.perf_counter()
    _check_inputs(ct, sources, lungs, analysis)
    series_uid = str(sources[0].SeriesInstanceUID)
    ctx = _Context(
        ct=ct,
        sources=tuple(sources),
        lungs=lungs,
        analysis=analysis,
        config=config,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        series_uid=series_uid,
        created=created,
        identity=content_identity(content_key, algorithm_version, sources, lungs, analysis),
    )
    ctx.previous = [
        ref for ref in previous
        if ref.kind == "sr" and ref.sop_instance_uid != ctx.uid("sr-instance")
    ]
    min_gap = max(1, round(KEY_IMAGE_MIN_GAP_MM / ct.spacing[0]))
    ctx.views = {f.index: lesion_view(analysis.labels.array, f) for f in analysis.findings}
    if analysis.findings:
        picks = choose_finding_slices(
            [ctx.views[f.index].ranked_slices for f in analysis.findings],
            [ctx.views[f.index].ranked_areas for f in analysis.findings],
            config.key_images, min_gap,
        )
        ctx.key_slices = [k for _, k in picks]
        ctx.key_findings = [analysis.findings[i].index for i, _ in picks]
    else:
        ctx.key_slices = choose_key_slices(
            lungs.labels.array, analysis.labels.array, config.key_images, min_gap
        )
        ctx.key_findings = [0] * len(ctx.key_slices)
    seg = _build_seg(ctx)
    t1 = time.perf_counter()
    sr = _build_sr(ctx, seg)
    t2 = time.perf_counter()
    key_images = _build_key_images(ctx)
    kos = _build_kos(ctx, sr, key_images)
    t3 = time.perf_counter()
    for ds in (seg, sr, *key_images, kos):
        _copy_missing(ds, sources[0], _SHARED_KEYS)
    log.info(
        "report for series %s: SEG %s frames (%.2f s), SR %d groups (%.2f s), "
        "%d key images (%.2f s)",
        series_uid, seg.NumberOfFrames, t1 - t0, ctx.n_groups, t2 - t1, len(key_images),
        t3 - t2,
    )
    return ReportObjects(sr=sr, seg=seg, key_images=tuple(key_images), kos=kos,
                         identity=ctx.identity)


def _check_inputs(
    ct: Volume, sources: Sequence[pydicom.Dataset], lungs: LungMasks, analysis: LesionAnalysis
) -> None:
    """Refuse, never guess: the masks must be on the CT grid and the CT on the source slices."""
    if len(sources) != ct.shape[0]:
        raise ValueError(
            f"expected {ct.shape[0]} source datasets (one per slice), got {len(sources)}"
        )
    for name, vol in (("lung labels", lungs.labels), ("lesion labels", analysis.labels)):
        if vol.shape != ct.shape or not np.allclose(vol.affine, ct.affine, atol=1e-4):
            raise ValueError(f"{name} are not on the CT grid: shape {vol.shape} vs {ct.shape}")
    indices = [f.index for f in analysis.findings]
    if indices != list(range(1, len(indices) + 1)):
        raise ValueError(f"expected findings numbered 1..{len(indices)} in order, got {indices}")
    if len(indices) + LESION_SEGMENT_BASE > 255:
        raise ValueError(f"{len(indices)} findings: at most {255 - LESION_SEGMENT_BASE} fit "
                         "the SEG's segments (lesions.max_reported_findings)")
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        values = {str(ds.get(key, "")) for ds in sources}
        if len(values) != 1 or "" in values:
            raise ValueError(f"sources must share one non-empty {key}, got {len(values)} values")
    rows, cols = ct.shape[1], ct.shape[2]
    col_dir, row_dir = ct.direction[:, 2], ct.direction[:, 1]
    spacing = ct.spacing
    pos_tol = max(_POSITION_TOL_MM, 0.25 * min(spacing))  # slice k must be nearest to k
    for k, ds in enumerate(sources):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise ValueError(
                f"slice {k}: expected {rows}x{cols} pixels, got {ds.Rows}x{ds.Columns}"
            )
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not (
            np.allclose(iop[:3], col_dir, atol=_DIRECTION_TOL)
            and np.allclose(iop[3:], row_dir, atol=_DIRECTION_TOL)
        ):
            raise ValueError(
                f"slice {k}: ImageOrientationPatient {iop.tolist()} does not match the volume "
                f"directions {col_dir.tolist()} / {row_dir.tolist()}"
            )
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        expected = ct.index_to_lps([k, 0, 0])[0]
        if not np.allclose(ipp, expected, atol=pos_tol):
            raise ValueError(
                f"slice {k}: ImagePositionPatient {ipp.tolist()} differs from the volume's "
                f"{expected.round(3).tolist()}"
            )
        ps = [float(v) for v in ds.PixelSpacing]
        if not np.allclose(ps, (spacing[1], spacing[2]), atol=1e-3):
            raise ValueError(
                f"slice {k}: PixelSpacing {ps} differs from the volume's {spacing[1:]}"
            )


# Patient/study attributes that highdicom copies into some objects and not others; copied
# into all three so that the study stays consistent across instances (dcentvfy).
_SHARED_KEYS = (
    "StudyDescription", "StudyID", "AccessionNumber", "PatientBirthTime", "PatientComments",
)


def _copy_missing(dst: pydicom.Dataset, src: pydicom.Dataset, keys: Sequence[str]) -> None:
    for key in keys:
        if key in src and key not in dst:
            setattr(dst, key, src[key].value)
