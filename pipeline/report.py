"""Pure: a screening result + the source CT headers -> DICOM SEG, Comprehensive 3D SR, key images.

Every object is built with highdicom (no hand-assembled content items) and passes dciodvfy.
Nothing here reads or writes files, talks to the network or logs patient identity.

Outputs of one run (``build_report``):

* **SEG** (``highdicom.seg.Segmentation``, BINARY, empty frames omitted): four segments whose
  numbers never change, so that consumers can rely on them even where one is empty (an empty
  segment is described and has no frames): 1 right lung, 2 left lung, 3 ground-glass opacity,
  4 consolidation (``SEGMENT_NUMBERS``).
* **SR** (``highdicom.sr.Comprehensive3DSR``) with a TID 1500 Measurement Report: procedure
  "CT of chest", the algorithm as device observer, an image library of the source series, and
  measurement groups for each lung, each lesion kind, each reported finding, each lung zone and
  the study as a whole (the RSNA category for COVID-19 pneumonia, severity, suspicion, total
  involvement).
* **Key images** (``highdicom.sc.SCImage``, RGB): the most affected slices in a lung window with
  outlines and a burned-in caption ("AI triage - not for diagnosis").

UIDs are deterministic (``output_uid``): a re-run of the same algorithm version on the same
series produces the same Series/SOP Instance UIDs, so that the archive replaces the previous
results instead of accumulating duplicates.  Dates and times are not part of any UID.
Content date/time is the ``created`` argument where given, otherwise the run time (highdicom's
default); Instance Creation Date/Time is always the run time.

``sources`` may be header-only (read with ``stop_before_pixels=True``): highdicom needs no pixel
data from the source images for any of the three objects; the key images are rendered from
``ct.array``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from .artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    LesionAnalysis,
    LesionKind,
    LungMasks,
    Pattern,
    Side,
    Volume,
    Zone,
    bounding_box,
)
from .config import ReportConfig

log = logging.getLogger(__name__)

__all__ = [
    "SEGMENT_NUMBERS",
    "EdgeLabels",
    "ReportObjects",
    "build_report",
    "choose_key_slices",
    "image_edge_labels",
    "output_uid",
    "patient_direction_letter",
    "render_key_image",
]

# ---------------------------------------------------------------- codes
# Real codes only (SNOMED CT "SCT", DICOM "DCM", UCUM); meanings <= 64 characters.

CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
LUNG: Code = codes.SCT.Lung  # 39607008
RIGHT: Code = codes.SCT.Right  # 24028007
LEFT: Code = codes.SCT.Left  # 7771000
ZONE_CODES: dict[Zone, Code] = {
    Zone.UPPER: codes.SCT.UpperZoneOfLung,  # 281392002
    Zone.MIDDLE: codes.SCT.MiddleZoneOfLung,  # 281393007
    Zone.LOWER: codes.SCT.LowerZoneOfLung,  # 281394001
}
KIND_CODES: dict[LesionKind, Code] = {
    LesionKind.GGO: codes.DCM.GroundGlassOpacity,  # DCM 112120, CID 6102/6104
    LesionKind.CONSOLIDATION: Code("95436008", "SCT", "Lung consolidation"),
}
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # 91723000
ABNORMAL_STRUCTURE: Code = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
COVID_19 = Code("840539006", "SCT", "COVID-19")
# The RSNA category (Simpson et al. 2020) as the value of the COVID-19 evaluation.  SNOMED CT
# has Indeterminate, Atypical and Negative qualifiers; for "typical" (the statement's words:
# "commonly reported imaging features of COVID-19 pneumonia are present") we found no
# "Typical" qualifier and use Suspected (415684004, DICOM CID 3770).  The key-image caption
# and the worklist name the category itself.
PATTERN_CODES: dict[Pattern, Code] = {
    Pattern.TYPICAL: Code("415684004", "SCT", "Suspected"),
    Pattern.INDETERMINATE: codes.SCT.Indeterminate,  # 82334004
    Pattern.ATYPICAL: Code("112231000", "SCT", "Atypical"),
    Pattern.NEGATIVE: codes.SCT.Negative,  # 260385009, DICOM CID 250
}
# How the key-image caption names each category (the statement's category names).
PATTERN_CAPTIONS: dict[Pattern, str] = {
    Pattern.TYPICAL: "typical for COVID-19 pneumonia",
    Pattern.INDETERMINATE: "indeterminate for COVID-19 pneumonia",
    Pattern.ATYPICAL: "atypical for COVID-19 pneumonia",
    Pattern.NEGATIVE: "negative for pneumonia",
}
VOLUME: Code = codes.SCT.Volume  # 118565006
EXTENT: Code = Code("260858005", "SCT", "Extent")  # percent of the lung involved
ATTENUATION: Code = codes.DCM.AttenuationCoefficient  # 112031, with derivation Mean
MEAN: Code = codes.SCT.Mean  # 373098007
SEVERITY: Code = Code("246112005", "SCT", "Severity")
SCORE: Code = Code("246262008", "SCT", "Score")
AI_FAMILY: Code = codes.cid7162.ArtificialIntelligence  # DCM 123110
DEVICE = hd.sr.CodedConcept.from_code(codes.DCM.Device)  # 121007, observer type

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT: Code = codes.UCUM.Percent
UNIT_HU: Code = codes.UCUM.HounsfieldUnit
UNIT_SCORE = Code("{score}", "UCUM", "score")
UNIT_ONE: Code = codes.UCUM.NoUnits  # "1"

SIDE_CODES: dict[Side, Code] = {Side.RIGHT: RIGHT, Side.LEFT: LEFT}

# Segment numbers are fixed: consumers may rely on them.
SEGMENT_NUMBERS: dict[Side | LesionKind, int] = {
    Side.RIGHT: 1,
    Side.LEFT: 2,
    LesionKind.GGO: 3,
    LesionKind.CONSOLIDATION: 4,
}

# Colours shared by the SEG display colours and the key-image outlines (RGB).
COLOURS: dict[Side | LesionKind, tuple[int, int, int]] = {
    Side.RIGHT: (0, 200, 255),
    Side.LEFT: (0, 200, 255),
    LesionKind.GGO: (255, 230, 0),
    LesionKind.CONSOLIDATION: (255, 40, 40),
}

SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "sc": 9703}
DISCLAIMER = "AI triage - not for diagnosis"
KEY_IMAGE_MIN_SIZE = 512  # key images are upscaled (nearest) to at least this many pixels
KEY_IMAGE_MIN_GAP_MM = 10.0  # prefer key slices at least this far apart
_POSITION_TOL_MM = 0.05
_DIRECTION_TOL = 1e-3


@dataclass(frozen=True)
class ReportObjects:
    """The DICOM objects of one screening run, ready to be stored."""

    sr: pydicom.Dataset
    seg: pydicom.Dataset
    key_images: tuple[pydicom.Dataset, ...]


@dataclass(frozen=True)
class EdgeLabels:
    """Patient direction letters ("L", "R", "A", "P", "H", "F") at each edge of an image."""

    left: str
    right: str
    top: str
    bottom: str


# ---------------------------------------------------------------- UIDs


# Namespace of the name-based UUIDs below (fixed forever: changing it changes every UID).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ctscreen:report-uids")


def _name_based_uid(*parts: str) -> str:
    """``2.25.<UUID>`` (PS3.5 B.2) with a version-5 (SHA-1, name-based) UUID of ``parts``.

    Note: ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores
    ``entropy_srcs`` and returns a random UUID, so it cannot be used for this.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(list(parts))).int}"


def output_uid(source_series_uid: str, algorithm_version: str, kind: str, index: int = 0) -> str:
    """A deterministic ``2.25.`` UID for one output of one algorithm version on one series.

    ``kind`` names the object ("seg-series", "sr-instance", "tracking-lesion", ...) and
    ``index`` tells apart several of one kind.  The same inputs always give the same UID;
    any change of series, version, kind or index gives another.
    """
    return _name_based_uid("output", source_series_uid, algorithm_version, kind, str(index))


# ---------------------------------------------------------------- orientation


_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS: -x right, +x left, -y ant., ...


def patient_direction_letter(vector: npt.ArrayLike) -> str:
    """The patient direction (DICOM PS3.3 C.7.6.1.1.1) that an LPS vector points to most.

    ``[1, 0, 0]`` -> "L", ``[0, -1, 0]`` -> "A", ``[0, 0, 1]`` -> "H".
    """
    v = np.asarray(vector, dtype=np.float64).reshape(3)
    axis = int(np.argmax(np.abs(v)))
    if abs(v[axis]) < 1e-6:
        raise ValueError(f"direction vector {v.tolist()} has no length")
    return _LETTERS[axis][1 if v[axis] > 0 else 0]


def image_edge_labels(row_cosine: npt.ArrayLike, column_cosine: npt.ArrayLike) -> EdgeLabels:
    """Which patient direction lies at each edge of a displayed image.

    ``row_cosine`` is the LPS direction of increasing column index (the first three values of
    ImageOrientationPatient), ``column_cosine`` that of increasing row index (the last three).
    For IOP ``[1,0,0,0,1,0]`` the image's right edge is patient left ("L").
    """
    r = np.asarray(row_cosine, dtype=np.float64)
    c = np.asarray(column_cosine, dtype=np.float64)
    return EdgeLabels(
        left=patient_direction_letter(-r),
        right=patient_direction_letter(r),
        top=patient_direction_letter(-c),
        bottom=patient_direction_letter(c),
    )


# ---------------------------------------------------------------- the whole report


def build_report(
    ct: Volume,
    sources: Sequence[pydicom.Dataset],
    lungs: LungMasks,
    analysis: LesionAnalysis,
    config: ReportConfig,
    *,
    algorithm_name: str,
    algorithm_version: str,
    created: datetime.datetime | None = None,
) -> ReportObjects:
    """SEG, SR and key images for one analysed series.

    ``sources[k]`` must be the (possibly header-only) CT dataset of slice ``k`` of ``ct``;
    the geometry of both is checked and a mismatch raises ``ValueError``.  ``created`` sets
    the content date/time of every object (default: now); it does not enter any UID.
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
    )
    min_gap = max(1, round(KEY_IMAGE_MIN_GAP_MM / ct.spacing[0]))
    ctx.key_slices = choose_key_slices(
        lungs.labels.array, analysis.labels.array, config.key_images, min_gap
    )
    seg = _build_seg(ctx)
    t1 = time.perf_counter()
    sr = _build_sr(ctx, seg)
    t2 = time.perf_counter()
    key_images = _build_key_images(ctx)
    t3 = time.perf_counter()
    for ds in (seg, sr, *key_images):
        _copy_missing(ds, sources[0], _SHARED_KEYS)
    log.info(
        "report for series %s: SEG %s frames (%.2f s), SR %d groups (%.2f s), "
        "%d key images (%.2f s)",
        series_uid, seg.NumberOfFrames, t1 - t0, ctx.n_groups, t2 - t1, len(key_images),
        t3 - t2,
    )
    return ReportObjects(sr=sr, seg=seg, key_images=tuple(key_images))


@dataclass
class _Context:
    ct: Volume
    sources: tuple[pydicom.Dataset, ...]
    lungs: LungMasks
    analysis: LesionAnalysis
    config: ReportConfig
    algorithm_name: str
    algorithm_version: str
    series_uid: str
    created: datetime.datetime | None
    n_groups: int = 0
    key_slices: list[int] = field(default_factory=list)

    def uid(self, kind: str, index: int = 0) -> str:
        return output_uid(self.series_uid, self.algorithm_version, kind, index)

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by the three highdicom constructors."""
        kw: dict[str, Any] = {
            "manufacturer_model_name": self.algorithm_name[:64],
            "software_versions": self.algorithm_version[:64],
        }
        if self.config.institution_name:
            kw["institution_name"] = self.config.institution_name
        if self.created is not None:
            kw["content_date"] = self.created.date()
            kw["content_time"] = self.created.time()
        return kw


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


# ---------------------------------------------------------------- SEG


def _algorithm_sequence(ctx: _Context) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ctx.algorithm_name[:64],
        family=AI_FAMILY,
        version=ctx.algorithm_version[:64],
        source=ctx.config.manufacturer[:64] or None,
    )


def _segment_description(
    ctx: _Context, what: Side | LesionKind, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    number = SEGMENT_NUMBERS[what]
    rgb = COLOURS[what]
    if isinstance(what, Side):
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{what.value.capitalize()} lung",
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=LUNG,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=ctx.uid("tracking-lung", number),
            tracking_id=f"{what.value} lung",
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        )
        # Laterality is a modifier of the property type (Segment Description macro, Type 3);
        # highdicom 0.28 has no argument for it.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(SIDE_CODES[what])
        ]
        return desc
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=what.value.capitalize(),
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=KIND_CODES[what],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=ctx.uid("tracking-kind", number),
        tracking_id=what.value,
        anatomic_regions=[LUNG],
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def _one_frame_of_reference(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The sources as highdicom's SEG needs them: one FrameOfReferenceUID for all.

    De-identified series (LIDC-IDRI) may carry one Frame of Reference UID per slice while
    their positions agree (the volume stage checks the positions).  highdicom refuses such
    sources, so the SEG gets light copies (elements shared, pixel data left out) that all
    carry the first slice's UID, which becomes the SEG's Frame of Reference.
    """
    uids = {str(ds.get("FrameOfReferenceUID", "")) for ds in sources}
    if len(uids) == 1:
        return list(sources)
    first = str(sources[0].get("FrameOfReferenceUID", ""))
    log.warning(
        "series %s: %d FrameOfReferenceUIDs among the slices; the SEG uses the first slice's",
        sources[0].SeriesInstanceUID, len(uids),
    )
    out = []
    for ds in sources:
        light = pydicom.Dataset()
        for elem in ds:
            if elem.keyword not in ("PixelData", "FrameOfReferenceUID"):
                light.add(elem)
        light.add(pydicom.DataElement("FrameOfReferenceUID", "UI", first))
        if hasattr(ds, "file_meta"):
            light.file_meta = ds.file_meta
        out.append(light)
    return out


class _SegmentStack(np.ndarray):
    """A (frames, rows, columns, segments) stack of binary uint8 planes for highdicom.

    highdicom 0.28 decides whether segments overlap with ``pixel_array.sum(axis=-1)``,
    which NumPy accumulates in uint64: 1.3 s and 8 bytes a pixel for a 275-slice study.
    Binary planes of fewer than 256 segments sum within a uint8, so only that reduction
    (over the segment axis, with no dtype asked for) accumulates in uint8 (20 ms); every
    other use of the array is plain NumPy.
    """

    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None,
            **kwargs: Any) -> Any:
        if (dtype is None and out is None and self.ndim == 4 and self.dtype == np.uint8
                and axis in (-1, 3) and self.shape[-1] < 256):
            dtype = np.uint8
        return super().sum(axis=axis, dtype=dtype, out=out, **kwargs)


def _build_seg(ctx: _Context) -> hd.seg.Segmentation:
    lung = ctx.lungs.labels.array
    les = ctx.analysis.labels.array
    order: list[Side | LesionKind] = sorted(SEGMENT_NUMBERS, key=SEGMENT_NUMBERS.__getitem__)
    # Only the slices that hold some segment become frames (highdicom would drop the empty
    # frames anyway, but its checks over the whole stack dominated the report's time).
    ks = np.flatnonzero(lung.any(axis=(1, 2)) | les.any(axis=(1, 2)))
    # Stacked-segments style (segments overlap: lesions lie inside the lungs), one uint8 plane
    # per segment; highdicom drops the all-zero frames (omit_empty_frames).  Each segment is
    # one contiguous block in memory (a (k, r, c, segment) view of a (segment, k, r, c)
    # array): highdicom's checks reduce over the segment axis 4x faster than when the
    # segments are interleaved, and each frame it copies out is contiguous.
    # Each plane is written only inside the bounding box of its label volume (lungs or
    # lesions); the rest stays the zeros of the allocation, never touched.
    planes = np.zeros((len(order), len(ks), *ctx.ct.shape[1:]), dtype=np.uint8)
    lung_box, les_box = bounding_box(lung), bounding_box(les)
    for i, what in enumerate(order):
        labels, value, box = ((lung, LUNG_LABELS[what], lung_box) if isinstance(what, Side)
                              else (les, LESION_LABELS[what], les_box))
        if box is None:
            continue
        j0, j1 = np.searchsorted(ks, [box[0].start, box[0].stop])  # planes' rows in the box
        np.equal(labels[ks[j0:j1], box[1], box[2]], value,
                 out=planes[i, j0:j1, box[1], box[2]], casting="unsafe")
    stack = planes.transpose(1, 2, 3, 0).view(_SegmentStack)
    algorithm = _algorithm_sequence(ctx)
    descriptions = [_segment_description(ctx, what, algorithm) for what in order]
    seg = hd.seg.Segmentation(
        source_images=_one_frame_of_reference([ctx.sources[k] for k in ks]),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=ctx.uid("seg-series"),
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=ctx.uid("seg-instance"),
        instance_number=1,
        manufacturer=ctx.config.manufacturer,
        device_serial_number="0",
        content_description="Lungs and suspected COVID-19 lesions (AI triage)",
        content_label="CTSCREEN",
        omit_empty_frames=True,
        series_description=f"{ctx.algorithm_name} SEG - {DISCLAIMER}"[:64],
        **ctx.common_kwargs(),
    )
    # highdicom draws a random Dimension Organization UID; a re-run must write the same
    # object, so it derives from the SEG's own UIDs like every other UID here.
    organisation = ctx.uid("seg-dimension-organization")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = organisation
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = organisation
    return seg


def _segments_with_frames(seg: pydicom.Dataset) -> set[int]:
    """Numbers of the segments that have at least one frame in the built SEG."""
    return {
        int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for fg in seg.PerFrameFunctionalGroupsSequence
    }


# ---------------------------------------------------------------- SR


def _tracking(ctx: _Context, kind: str, index: int, text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=ctx.uid(kind, index), identifier=text)


def _algorithm_id(ctx: _Context) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=ctx.algorithm_name, version=ctx.algorithm_version, family=AI_FAMILY
    )


def _measurement(name: Code, value: float, unit: Code, **kw: Any) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kw)


def _volume_ml(value: float) -> hd.sr.Measurement:
    return _measurement(VOLUME, round(value, 3), UNIT_ML)


def _extent_pct(value: float) -> hd.sr.Measurement:
    return _measurement(EXTENT, round(value, 3), UNIT_PERCENT)


def _build_sr(ctx: _Context, seg: hd.seg.Segmentation) -> hd.sr.Comprehensive3DSR:
    a = ctx.analysis
    source_series = hd.sr.SourceSeriesForSegmentation(ctx.series_uid)
    with_frames = _segments_with_frames(seg)

    def segment_ref(number: int) -> hd.sr.ReferencedSegment:
        # The whole segment: dciodvfy refuses Referenced Segment Number together with
        # Referenced Frame Number, so a finding cannot point at "its" frames of the segment.
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=source_series,
        )

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    algorithm_id = _algorithm_id(ctx)

    # 1. The study as a whole: RSNA category, severity, suspicion, total involvement.
    scale = a.severity_scale or "unnamed severity scale"
    severity_algorithm = hd.sr.AlgorithmIdentification(
        name=scale, version=ctx.algorithm_version,
        parameters=[f"study score, range 0 to {a.severity_max}"],
    )
    zone_algorithm = hd.sr.AlgorithmIdentification(
        name=scale, version=ctx.algorithm_version, parameters=["score of one lung zone"]
    )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(ctx, "tracking-study", 0, "study assessment"),
            finding_type=COVID_19,
            algorithm_id=algorithm_id,
            finding_sites=[hd.sr.FindingSite(LUNG)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=COVID_19, value=PATTERN_CODES[a.pattern])
            ],
            measurements=[
                _extent_pct(a.involved_pct),
                _measurement(
                    SEVERITY, a.severity_score, UNIT_SCORE, algorithm_id=severity_algorithm
                ),
                _measurement(SCORE, round(a.suspicion, 4), UNIT_ONE, algorithm_id=algorithm_id),
            ],
        )
    )

    # 2. Each lung: volume and percent involved, referencing its SEG segment.
    for fig in a.lungs:
        number = SEGMENT_NUMBERS[fig.side]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(ctx, "tracking-lung", number, f"{fig.side} lung"),
                referenced_segment=segment_ref(number),
                finding_type=LUNG,
                finding_category=ANATOMICAL_STRUCTURE,
                algorithm_id=algorithm_id,
                finding_sites=[hd.sr.FindingSite(LUNG, laterality=SIDE_CODES[fig.side])],
                measurements=[_volume_ml(fig.volume_ml), _extent_pct(fig.involved_pct)],
            )
        )

    # 3. Each lesion kind overall.  A kind without voxels has an empty segment: it is
    #    reported as 0 ml without an ROI reference.
    for kind in LesionKind:
        number = SEGMENT_NUMBERS[kind]
        total_ml = sum(
            fig.ggo_ml if kind is LesionKind.GGO else fig.consolidation_ml for fig in a.lungs
        )
        common: dict[str, Any] = {
            "tracking_identifier": _tracking(ctx, "tracking-kind", number, f"all {kind}"),
            "finding_type": KIND_CODES[kind],
            "finding_category": ABNORMAL_STRUCTURE,
            "algorithm_id": algorithm_id,
            "finding_sites": [hd.sr.FindingSite(LUNG)],
            "measurements": [_volume_ml(total_ml)],
        }
        if number in with_frames:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=segment_ref(number), **common
                )
            )
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))

    # 4. Each reported finding, referencing its kind's segment (the finding site and the
    #    volume tell it apart from the other findings of that kind).
    for f in a.findings:
        number = SEGMENT_NUMBERS[f.kind]
        site = hd.sr.FindingSite(ZONE_CODES[f.zone], laterality=SIDE_CODES[f.side])
        common = {
            "tracking_identifier": _tracking(ctx, "tracking-lesion", f.index, f"lesion {f.index}"),
            "finding_type": KIND_CODES[f.kind],
            "finding_category": ABNORMAL_STRUCTURE,
            "algorithm_id": algorithm_id,
            "finding_sites": [site],
            "measurements": [
                _volume_ml(f.volume_ml),
                _measurement(ATTENUATION, round(f.mean_hu, 1), UNIT_HU, derivation=MEAN),
            ],
        }
        if number in with_frames:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=segment_ref(number), **common
                )
            )
        else:  # inconsistent input (a finding without voxels of its kind): keep the numbers
            log.warning("finding %d has no %s voxels in the SEG", f.index, f.kind)
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))

    # 5. Each lung zone: percent involved and zone score.
    for i, z in enumerate(a.zones):
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(ctx, "tracking-zone", i, f"{z.side} {z.zone} zone"),
                finding_type=ZONE_CODES[z.zone],
                finding_category=ANATOMICAL_STRUCTURE,
                algorithm_id=algorithm_id,
                finding_sites=[
                    hd.sr.FindingSite(ZONE_CODES[z.zone], laterality=SIDE_CODES[z.side])
                ],
                measurements=[
                    _volume_ml(z.lung_ml),
                    _extent_pct(z.involved_pct),
                    _measurement(SEVERITY, z.score, UNIT_SCORE, algorithm_id=zone_algorithm),
                ],
            )
        )
    ctx.n_groups = len(groups)

    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_name_based_uid("device", ctx.algorithm_name, ctx.algorithm_version),
            name=ctx.algorithm_name,
            manufacturer_name=ctx.config.manufacturer or None,
            model_name=f"{ctx.algorithm_name} {ctx.algorithm_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups,
        # The image library lists the slices shown as key images: listing all source
        # slices made highdicom take ~7 s for 275 slices, and every source instance is
        # referenced in the evidence sequence anyway.
        referenced_images=[ctx.sources[k] for k in ctx.key_slices] or [ctx.sources[0]],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*ctx.sources, seg],
        content=report[0],
        series_instance_uid=ctx.uid("sr-series"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=ctx.uid("sr-instance"),
        instance_number=1,
        manufacturer=ctx.config.manufacturer,
        is_complete=True,
        is_final=False,  # PRELIMINARY: an unverified machine result
        is_verified=False,
        series_description=f"{ctx.algorithm_name} SR - {DISCLAIMER}"[:64],
        **ctx.common_kwargs(),
    )


# ---------------------------------------------------------------- key images


def choose_key_slices(
    lungs: npt.NDArray[Any], lesions: npt.NDArray[Any], n: int, min_gap: int = 1
) -> list[int]:
    """Up to ``n`` slice indices with the largest lesion area, at least ``min_gap`` apart
    where possible; without lesions, the one slice with the largest lung area."""
    area = np.count_nonzero(lesions.reshape(lesions.shape[0], -1), axis=1)
    if n <= 0:
        return []
    if not area.any():
        lung_area = np.count_nonzero(lungs.reshape(lungs.shape[0], -1), axis=1)
        return [int(np.argmax(lung_area))]
    ranked = [int(k) for k in np.lexsort((np.arange(area.size), -area)) if area[k] > 0]
    chosen: list[int] = []
    for k in ranked:
        if all(abs(k - c) >= min_gap for c in chosen):
            chosen.append(k)
        if len(chosen) == n:
            return chosen
    for k in ranked:  # not enough well-separated slices: fill with the next largest
        if k not in chosen:
            chosen.append(k)
        if len(chosen) == n:
            break
    return chosen


def _outline(mask: npt.NDArray[np.bool_], width: int = 1) -> npt.NDArray[np.bool_]:
    """Inner boundary of a 2-D mask, ``width`` pixels thick (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        e = inner.copy()
        e[1:, :] &= inner[:-1, :]
        e[:-1, :] &= inner[1:, :]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return np.asarray(mask & ~inner)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text``, shortened with "..." until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_key_image(
    ct: Volume,
    lung_labels: npt.NDArray[Any],
    lesion_labels: npt.NDArray[Any],
    k: int,
    caption: Sequence[str],
    config: ReportConfig,
) -> tuple[npt.NDArray[np.uint8], EdgeLabels, int]:
    """Slice ``k`` as an RGB image: lung window, outlines, orientation markers, caption.

    Returns the (rows, columns, 3) uint8 image, the patient directions at its edges and the
    integer upscaling factor (the image part has ``factor`` pixels per CT pixel; the caption
    is a black band below it).
    """
    hu = ct.array[k].astype(np.float32)
    lo = config.window_center - config.window_width / 2.0
    gray = np.clip((hu - lo) / config.window_width * 255.0 + 0.5, 0, 255).astype(np.uint8)
    factor = max(1, math.ceil(KEY_IMAGE_MIN_SIZE / max(gray.shape)))

    def up(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)

    rgb = np.repeat(up(gray)[..., None], 3, axis=2)
    width = max(1, round(max(rgb.shape[:2]) / 256))
    lung_up = up(np.asarray(lung_labels[k]))
    les_up = up(np.asarray(lesion_labels[k]))
    for side in Side:
        rgb[_outline(lung_up == LUNG_LABELS[side], width)] = COLOURS[side]
    for kind in LesionKind:
        rgb[_outline(les_up == LESION_LABELS[kind], width)] = COLOURS[kind]

    edges = image_edge_labels(ct.direction[:, 2], ct.direction[:, 1])
    h, w = rgb.shape[:2]
    size = max(12, w // 32)
    font = _font(size)
    line_h = size + size // 3
    band = line_h * (len(caption) + 1) + size // 2
    img = Image.new("RGB", (w, h + band), (0, 0, 0))
    img.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(img)
    marker_font = _font(max(14, w // 20))
    pad = max(4, w // 64)
    white, black = (255, 255, 255), (0, 0, 0)
    for x_pos, text, anchor in ((pad, edges.left, "lm"), (w - pad, edges.right, "rm")):
        draw.text(
            (x_pos, h // 2), text, fill=white, font=marker_font, anchor=anchor,
            stroke_width=max(1, size // 8), stroke_fill=black,
        )
    y = h + size // 4
    for line in caption:
        draw.text((pad, y), _fit(draw, line, font, w - 2 * pad), fill=(255, 255, 255), font=font)
        y += line_h
    x = float(pad)
    for label, colour in (("lung", COLOURS[Side.LEFT]), ("GGO", COLOURS[LesionKind.GGO]),
                          ("consolidation", COLOURS[LesionKind.CONSOLIDATION])):
        draw.text((x, y), label, fill=colour, font=font)
        x += draw.textlength(label + "   ", font=font)
    return np.asarray(img, dtype=np.uint8), edges, factor


def _build_key_images(ctx: _Context) -> list[hd.sc.SCImage]:
    a = ctx.analysis
    ct = ctx.ct
    lung = ctx.lungs.labels.array
    les = a.labels.array
    ks = ctx.key_slices
    ref = ctx.sources[0]
    out = []
    for i, k in enumerate(ks, start=1):
        src = ctx.sources[k]
        area_cm2 = int(np.count_nonzero(les[k])) * ct.spacing[1] * ct.spacing[2] / 100.0
        caption = [
            DISCLAIMER,
            f"Suspicion {a.suspicion:.2f} | RSNA: {PATTERN_CAPTIONS[a.pattern]}",
            f"Involvement {a.involved_pct:.1f}% | severity {a.severity_score}/{a.severity_max} "
            f"({a.severity_scale})",
            f"Slice {k + 1}/{ct.shape[0]}, lesion area {area_cm2:.1f} cm2 | "
            f"{ctx.algorithm_name} {ctx.algorithm_version}",
        ]
        pixels, edges, factor = render_key_image(ct, lung, les, k, caption, ctx.config)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ctx.uid("sc-series"),
            series_number=SERIES_NUMBERS["sc"],
            sop_instance_uid=ctx.uid("sc-instance", i),
            instance_number=i,
            manufacturer=ctx.config.manufacturer,
            patient_orientation=(edges.right, edges.bottom),
            # highdicom annotates tuple[int, int] but writes DS values: floats are right.
            pixel_spacing=(ct.spacing[1] / factor, ct.spacing[2] / factor),  # type: ignore[arg-type]
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{ctx.algorithm_name} key images - {DISCLAIMER}"[:64],
            **ctx.common_kwargs(),
        )
        image.BurnedInAnnotation = "YES"
        image.BodyPartExamined = str(ref.get("BodyPartExamined", "") or "CHEST")
        image.ImageComments = DISCLAIMER
        derived = pydicom.Dataset()
        derived.ReferencedSOPClassUID = src.SOPClassUID
        derived.ReferencedSOPInstanceUID = src.SOPInstanceUID
        image.SourceImageSequence = [derived]
        out.append(image)
    return out
