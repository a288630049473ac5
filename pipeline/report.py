"""Pure: a screening result + the source CT headers -> DICOM SEG, Comprehensive SR, key
images and a Key Object Selection document (docs/results.md describes them for users).

Every object is built with highdicom (no hand-assembled content items) and passes dciodvfy.
Nothing here reads or writes files, talks to the network or logs patient identity.

Outputs of one run (``build_report``):

* **SEG** (``highdicom.seg.Segmentation``, BINARY, empty frames omitted): segments whose
  numbers never change, so that consumers can rely on them even where one is empty (an empty
  segment is described and has no frames): 1 right lung, 2 left lung, 3 ground-glass opacity,
  4 consolidation (``SEGMENT_NUMBERS``), then 4 + i for reported lesion i alone
  (``LESION_SEGMENT_BASE``).
* **SR** (``highdicom.sr.ComprehensiveSR``) with a TID 1500 Measurement Report: procedure
  "CT of chest", the algorithm as device observer, an image library of the key slices, and
  measurement groups for the study as a whole (the RSNA category, severity, suspicion, total
  involvement), each lung, each lesion kind, each reported lesion and each lung zone.  Every
  group is anchored on a CT image (``_build_sr``).  What has no standard code is coded in the
  private scheme ``PRIVATE_SCHEME``, declared in the SR.
* **Key images** (``highdicom.sc.SCImage``, RGB): one per finding, on its largest slice not yet
  shown, in a lung window with outlines and a burned-in caption that wraps to the width.
* **Key Object Selection** (``highdicom.ko``): flags the key images and the SR.

UIDs are deterministic and follow content (``content_identity``, ``output_uid``): they derive
from the source series and its instances, the lung and lesion labels themselves, and the
``content_key`` of the stages (code, stage versions, model hashes, analysis configuration).
The same inputs give the same UIDs, so a re-run duplicates nothing; any change that can change
what an object says gives new UIDs, so no archive can keep a stale object under a current UID
(and finding the UID in the archive confirms this content).  The SR names the SRs of the
result it replaces (``previous``) in its Predecessor Documents Sequence.  Dates and times are
not part of any UID.
Content date/time is the ``created`` argument where given, otherwise the run time (highdicom's
default); Instance Creation Date/Time is always the run time.

``sources`` may be header-only (read with ``stop_before_pixels=True``): highdicom needs no pixel
data from the source images for any of the three objects; the key images are rendered from
``ct.array``.
"""

from __future__ import annotations

import datetime
import hashlib
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
from scipy import ndimage as ndi
from skimage import measure

from .artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    Finding,
    LesionAnalysis,
    LesionKind,
    LungMasks,
    OutputRef,
    Pattern,
    Side,
    Volume,
    Zone,
    bounding_box,
)
from .config import ReportConfig
from .lesions import finding_mask

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
# What ctscreen found is an imaging pattern, not a disease: the study-level call is the RSNA
# expert consensus category (Simpson et al., Radiology: Cardiothoracic Imaging 2020), and
# the suspicion is a ranking score.  Neither has a standard code (SNOMED CT codes the disease
# COVID-19, 840539006, which a reader would take as a diagnosis), so they are coded in
# ctscreen's private scheme, declared in each SR's Coding Scheme Identification Sequence and
# listed in docs/results.md.
PRIVATE_SCHEME = "99CTSCREEN"
PRIVATE_SCHEME_NAME = "ctscreen private codes"
PRIVATE_SCHEME_VERSION = "1"
CHEST_CT_TRIAGE = Code("CTS0001", PRIVATE_SCHEME, "Chest CT triage assessment")
RSNA_CATEGORY = Code("CTS0002", PRIVATE_SCHEME, "RSNA COVID-19 pneumonia CT category")
SUSPICION = Code("CTS0003", PRIVATE_SCHEME, "Triage suspicion score")
PATTERN_CODES: dict[Pattern, Code] = {
    Pattern.TYPICAL: Code("CTS0011", PRIVATE_SCHEME, "Typical appearance"),
    Pattern.INDETERMINATE: Code("CTS0012", PRIVATE_SCHEME, "Indeterminate appearance"),
    Pattern.ATYPICAL: Code("CTS0013", PRIVATE_SCHEME, "Atypical appearance"),
    Pattern.NEGATIVE: Code("CTS0014", PRIVATE_SCHEME, "Negative for pneumonia"),
}
PRIVATE_CODES: tuple[Code, ...] = (CHEST_CT_TRIAGE, RSNA_CATEGORY, SUSPICION,
                                   *PATTERN_CODES.values())
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
AI_FAMILY: Code = codes.cid7162.ArtificialIntelligence  # DCM 123110
DEVICE = hd.sr.CodedConcept.from_code(codes.DCM.Device)  # 121007, observer type

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT: Code = codes.UCUM.Percent
UNIT_HU: Code = codes.UCUM.HounsfieldUnit
UNIT_SCORE = Code("{score}", "UCUM", "score")
UNIT_ONE: Code = codes.UCUM.NoUnits  # "1"

SIDE_CODES: dict[Side, Code] = {Side.RIGHT: RIGHT, Side.LEFT: LEFT}
# The lung of each side, pre-coordinated: a second finding site beside the post-coordinated
# (structure + laterality) one, since viewers (OHIF 3.13) show a finding site's own meaning
# and drop its laterality.
SIDE_LUNG_CODES: dict[Side, Code] = {
    Side.RIGHT: Code("3341006", "SCT", "Right lung"),
    Side.LEFT: Code("44029006", "SCT", "Left lung"),
}

# Segment numbers are fixed: consumers may rely on them.
SEGMENT_NUMBERS: dict[Side | LesionKind, int] = {
    Side.RIGHT: 1,
    Side.LEFT: 2,
    LesionKind.GGO: 3,
    LesionKind.CONSOLIDATION: 4,
}

# Lesion ``i`` (``Finding.index``, 1 = largest) has its own segment, number 4 + i, besides
# the union of its kind; the SR's group of that lesion references it.
LESION_SEGMENT_BASE = 4

# Colours shared by the SEG display colours and the key-image outlines (RGB).
COLOURS: dict[Side | LesionKind, tuple[int, int, int]] = {
    Side.RIGHT: (0, 200, 255),
    Side.LEFT: (70, 220, 110),
    LesionKind.GGO: (255, 230, 0),
    LesionKind.CONSOLIDATION: (255, 40, 40),
}

SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "sc": 9703, "ko": 9704}
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
    kos: pydicom.Dataset  # Key Object Selection: the key images and the SR
    identity: str = ""  # the seed of their UIDs (``content_identity``)


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


# Header values of the source that the result objects copy (patient and study modules) or
# show (the key-image caption): part of the result's identity.
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
              "PatientComments", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
              "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
              "BodyPartExamined", "FrameOfReferenceUID")
SLICE_KEYS = ("SOPInstanceUID", "InstanceNumber", "SeriesNumber", "SliceLocation")


def content_identity(
    content_key: str,
    algorithm_version: str,
    sources: Sequence[pydicom.Dataset],
    lungs: LungMasks,
    analysis: LesionAnalysis,
) -> str:
    """The seed of every output UID of one result: a hash of the stages' ``content_key``,
    the algorithm version, the source instances in slice order with the header values the
    objects show or copy (``SLICE_KEYS`` of each, ``STUDY_KEYS`` of the first: a DICOM
    instance's pixels never change under its UID, but an archive may correct its headers),
    and the lung and lesion labels.  Every number, outline, caption and copied attribute of
    the result is a function of these."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{content_key}|{algorithm_version}|".encode())
    if sources:
        h.update(repr([str(sources[0].get(k, "")) for k in STUDY_KEYS]).encode())
    for ds in sources:
        h.update(repr([str(ds.get(k, "")) for k in SLICE_KEYS]).encode())
    for labels in (lungs.labels, analysis.labels):
        arr = np.ascontiguousarray(labels.array)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def output_uid(source_series_uid: str, identity: str, kind: str, index: int = 0) -> str:
    """A deterministic ``2.25.`` UID for one output of one result (``identity``, from
    ``content_identity``) on one series.

    ``kind`` names the object ("seg-series", "sr-instance", "tracking-lesion", ...) and
    ``index`` tells apart several of one kind.  The same inputs always give the same UID;
    any change of series, version, kind or index gives another.
    """
    return _name_based_uid("output", source_series_uid, identity, kind, str(index))


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
    identity: str
    n_groups: int = 0
    key_slices: list[int] = field(default_factory=list)
    # the finding each key image shows (Finding.index; 0: none, a study without findings)
    key_findings: list[int] = field(default_factory=list)
    views: dict[int, LesionView] = field(default_factory=dict)  # by Finding.index
    previous: list[OutputRef] = field(default_factory=list)

    def uid(self, kind: str, index: int = 0) -> str:
        return output_uid(self.series_uid, self.identity, kind, index)

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
        tracking_id=f"all {what}",
        anatomic_regions=[LUNG],
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def _lesion_description(
    ctx: _Context, f: Finding, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """Lesion ``f`` alone: the region its SR group measures (same tracking UID and text)."""
    desc = hd.seg.SegmentDescription(
        segment_number=LESION_SEGMENT_BASE + f.index,
        segment_label=f"Lesion {f.index} ({f.kind})"[:64],
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=KIND_CODES[f.kind],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=ctx.uid("tracking-lesion", f.index),
        tracking_id=f"lesion {f.index}",
        anatomic_regions=[ZONE_CODES[f.zone]],
        display_color=hd.color.CIELabColor.from_rgb(*COLOURS[f.kind]),
    )
    desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
        hd.sr.CodedConcept.from_code(SIDE_CODES[f.side])
    ]
    return desc


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
    findings = ctx.analysis.findings
    planes = np.zeros((len(order) + len(findings), len(ks), *ctx.ct.shape[1:]), dtype=np.uint8)
    lung_box, les_box = bounding_box(lung), bounding_box(les)
    for i, what in enumerate(order):
        labels, value, box = ((lung, LUNG_LABELS[what], lung_box) if isinstance(what, Side)
                              else (les, LESION_LABELS[what], les_box))
        if box is None:
            continue
        j0, j1 = np.searchsorted(ks, [box[0].start, box[0].stop])  # planes' rows in the box
        np.equal(labels[ks[j0:j1], box[1], box[2]], value,
                 out=planes[i, j0:j1, box[1], box[2]], casting="unsafe")
    for f in findings:  # each lesion alone (connected: every slice of its box is in ks)
        box, mask = finding_mask(les, f)
        j0, j1 = np.searchsorted(ks, [box[0].start, box[0].stop])
        planes[LESION_SEGMENT_BASE + f.index - 1, j0:j1, box[1], box[2]] = mask
    stack = planes.transpose(1, 2, 3, 0).view(_SegmentStack)
    algorithm = _algorithm_sequence(ctx)
    descriptions = [_segment_description(ctx, what, algorithm) for what in order]
    descriptions += [_lesion_description(ctx, f, algorithm) for f in findings]
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
        content_creator_name=f"{ctx.algorithm_name}^",  # the device; a person adds a name
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


Group = (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
         | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
         | hd.sr.MeasurementsAndQualitativeEvaluations)


def _sites(site: Code, side: Side, side_first: bool) -> list[hd.sr.FindingSite]:
    """``site`` with the side's laterality, and the side's lung (see SIDE_LUNG_CODES); the
    one a viewer should show first (OHIF shows only the first)."""
    out = [hd.sr.FindingSite(site, laterality=SIDE_CODES[side]),
           hd.sr.FindingSite(SIDE_LUNG_CODES[side])]
    return out[::-1] if side_first else out


def _partner(ctx: _Context, region: hd.sr.ImageRegion, common: dict[str, Any]
             ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The planar group that anchors a volumetric one on an image: the same tracking UID
    and text, finding and sites, no measurements of its own (a viewer merges the two by
    tracking UID; a reader that sums groups counts each volume once)."""
    return _planar(ctx, region, **{k: v for k, v in common.items() if k != "measurements"})


def _region(ctx: _Context, k: int, xy: npt.NDArray[Any]) -> hd.sr.ImageRegion:
    """An image region on source slice ``k``: a closed polyline, or one point."""
    src = ctx.sources[k]
    return hd.sr.ImageRegion(
        graphic_type=(hd.sr.GraphicTypeValues.POLYLINE if len(xy) > 1
                      else hd.sr.GraphicTypeValues.POINT),
        graphic_data=np.asarray(xy, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=src.SOPClassUID,
            referenced_sop_instance_uid=src.SOPInstanceUID,
        ),
    )


def _point_in(mask: npt.NDArray[np.bool_]) -> tuple[float, float] | None:
    """A pixel of a 2-D mask near its centroid, as (column, row) image coordinates."""
    rr, cc = np.nonzero(mask)
    if rr.size == 0:
        return None
    i = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    return float(cc[i]) + 0.5, float(rr[i]) + 0.5


def _anchor(ctx: _Context, mask_of: Any, slices: Sequence[int]) -> hd.sr.ImageRegion:
    """A point inside ``mask_of(k)`` on the first of ``slices`` where it has one; failing
    that, the centre of the first key slice (the lungs' image)."""
    for k in slices:
        xy = _point_in(mask_of(k))
        if xy is not None:
            return _region(ctx, k, np.array([xy]))
    k = ctx.key_slices[0] if ctx.key_slices else ctx.ct.shape[0] // 2
    return _region(ctx, k, np.array([[ctx.ct.shape[2] / 2.0, ctx.ct.shape[1] / 2.0]]))


def _planar(ctx: _Context, region: hd.sr.ImageRegion, **kw: Any
            ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=region, algorithm_id=_algorithm_id(ctx), **kw
    )


def _segment_ref(ctx: _Context, seg: hd.seg.Segmentation, number: int
                 ) -> hd.sr.ReferencedSegment:
    # The whole segment: dciodvfy refuses Referenced Segment Number together with
    # Referenced Frame Number.
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(ctx.series_uid),
    )


def _study_group(ctx: _Context) -> Group:
    """The study as a whole: the RSNA category, severity, suspicion, total involvement;
    anchored at a point in the lungs on the first key image's slice."""
    a = ctx.analysis
    lung = ctx.lungs.labels.array
    scale = a.severity_scale or "unnamed severity scale"
    severity_algorithm = hd.sr.AlgorithmIdentification(
        name=scale, version=ctx.algorithm_version,
        parameters=[f"study score, range 0 to {a.severity_max}"],
    )
    return _planar(
        ctx, _anchor(ctx, lambda k: lung[k] > 0, ctx.key_slices),
        tracking_identifier=_tracking(ctx, "tracking-study", 0, "study assessment"),
        finding_type=CHEST_CT_TRIAGE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=RSNA_CATEGORY, value=PATTERN_CODES[a.pattern])
        ],
        measurements=[
            _extent_pct(a.involved_pct),
            _measurement(SEVERITY, a.severity_score, UNIT_SCORE, algorithm_id=severity_algorithm),
            _measurement(SUSPICION, round(a.suspicion, 4), UNIT_ONE,
                         algorithm_id=_algorithm_id(ctx)),
        ],
    )


def _largest_slice(labels: npt.NDArray[Any], value: int) -> list[int]:
    """The slice with the largest area of ``value`` (none where it has no voxel)."""
    area = np.count_nonzero((labels == value).reshape(labels.shape[0], -1), axis=1)
    order = np.lexsort((np.arange(area.size), -area))
    return [int(k) for k in order[area[order] > 0][:1]]


def _lung_groups(ctx: _Context, seg: hd.seg.Segmentation) -> list[Group]:
    """Each lung: volume and percent involved, referencing its SEG segment."""
    lung = ctx.lungs.labels.array
    out: list[Group] = []
    for fig in ctx.analysis.lungs:
        number = SEGMENT_NUMBERS[fig.side]
        value = LUNG_LABELS[fig.side]
        common: dict[str, Any] = {
            "tracking_identifier": _tracking(ctx, "tracking-lung", number, f"{fig.side} lung"),
            "finding_type": LUNG,
            "finding_category": ANATOMICAL_STRUCTURE,
            "finding_sites": _sites(LUNG, fig.side, side_first=True),
            "measurements": [_volume_ml(fig.volume_ml), _extent_pct(fig.involved_pct)],
        }
        anchor = _anchor(ctx, lambda k, v=value: lung[k] == v, _largest_slice(lung, value))
        if fig.volume_ml > 0:
            out.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=_segment_ref(ctx, seg, number),
                algorithm_id=_algorithm_id(ctx), **common))
            out.append(_partner(ctx, anchor, common))
        else:
            out.append(_planar(ctx, anchor, **common))
    return out


def _kind_groups(ctx: _Context, seg: hd.seg.Segmentation) -> list[Group]:
    """Each lesion kind overall.  A kind without voxels has an empty segment: it is
    reported as 0 ml, anchored in the lungs, without a segment reference."""
    les = ctx.analysis.labels.array
    lung = ctx.lungs.labels.array
    with_frames = _segments_with_frames(seg)
    out: list[Group] = []
    for kind in LesionKind:
        number = SEGMENT_NUMBERS[kind]
        value = LESION_LABELS[kind]
        total_ml = sum(
            fig.ggo_ml if kind is LesionKind.GGO else fig.consolidation_ml
            for fig in ctx.analysis.lungs
        )
        common: dict[str, Any] = {
            "tracking_identifier": _tracking(ctx, "tracking-kind", number, f"all {kind}"),
            "finding_type": KIND_CODES[kind],
            "finding_category": ABNORMAL_STRUCTURE,
            "finding_sites": [hd.sr.FindingSite(LUNG)],
            "measurements": [_volume_ml(total_ml)],
        }
        if number in with_frames:
            out.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=_segment_ref(ctx, seg, number),
                algorithm_id=_algorithm_id(ctx), **common))
            anchor = _anchor(ctx, lambda k, v=value: les[k] == v, _largest_slice(les, value))
            out.append(_partner(ctx, anchor, common))
        else:
            out.append(_planar(ctx, _anchor(ctx, lambda k: lung[k] > 0, ctx.key_slices),
                               **common))
    return out


def _lesion_groups(ctx: _Context, seg: hd.seg.Segmentation) -> list[Group]:
    """Each reported lesion: its own segment, and its outline on its largest slice."""
    out: list[Group] = []
    for f in ctx.analysis.findings:
        number = LESION_SEGMENT_BASE + f.index
        view = ctx.views[f.index]
        common: dict[str, Any] = {
            "tracking_identifier": _tracking(ctx, "tracking-lesion", f.index,
                                             f"lesion {f.index}"),
            "finding_type": KIND_CODES[f.kind],
            "finding_category": ABNORMAL_STRUCTURE,
            "finding_sites": _sites(ZONE_CODES[f.zone], f.side, side_first=True),
            "measurements": [
                _volume_ml(f.volume_ml),
                _measurement(ATTENUATION, round(f.mean_hu, 1), UNIT_HU, derivation=MEAN),
            ],
        }
        out.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=_segment_ref(ctx, seg, number),
            algorithm_id=_algorithm_id(ctx), **common))
        out.append(_partner(ctx, _region(ctx, view.slice, view.outline), common))
    return out


def _zone_groups(ctx: _Context) -> list[Group]:
    """Each lung zone: its volume, percent involved and zone score, anchored at a point of
    that lung on the middle slice of the zone (thirds of the lung's extent along the
    patient's head-foot axis, as the lesion stage divides it)."""
    lung = ctx.lungs.labels.array
    zone_algorithm = hd.sr.AlgorithmIdentification(
        name=ctx.analysis.severity_scale or "unnamed severity scale",
        version=ctx.algorithm_version, parameters=["score of one lung zone"],
    )
    centre = [ctx.ct.shape[1] / 2.0, ctx.ct.shape[2] / 2.0]
    z_of = ctx.ct.index_to_lps([[k, *centre] for k in range(ctx.ct.shape[0])])[:, 2]
    out: list[Group] = []
    for i, z in enumerate(ctx.analysis.zones):
        value = LUNG_LABELS[z.side]
        ks = np.flatnonzero((lung == value).any(axis=(1, 2)))
        slices: list[int] = []
        if ks.size:
            zs = z_of[ks]
            lo, hi = float(zs.min()), float(zs.max())
            third = np.clip(((hi - zs) / max(hi - lo, 1e-6) * 3).astype(int), 0, 2)
            mine = ks[third == list(Zone).index(z.zone)]
            if mine.size:
                slices = [int(mine[mine.size // 2])]
        out.append(_planar(
            ctx, _anchor(ctx, lambda k, v=value: lung[k] == v, slices),
            tracking_identifier=_tracking(ctx, "tracking-zone", i, f"{z.side} {z.zone} zone"),
            finding_type=ZONE_CODES[z.zone],
            finding_category=ANATOMICAL_STRUCTURE,
            finding_sites=_sites(ZONE_CODES[z.zone], z.side, side_first=False),
            measurements=[
                _volume_ml(z.lung_ml),
                _extent_pct(z.involved_pct),
                _measurement(SEVERITY, z.score, UNIT_SCORE, algorithm_id=zone_algorithm),
            ],
        ))
    return out


def _build_sr(ctx: _Context, seg: hd.seg.Segmentation) -> hd.sr.ComprehensiveSR:
    """TID 1500 with every group anchored on a CT image (an image region selected from it),
    since viewers draw a measurement only where it has one (OHIF loads no report in which
    any group lacks it).  Regions that are volumes (lungs, lesion kinds, lesions) have a
    volumetric group referencing their SEG segment and a planar group with the same
    tracking UID and text holding the image region: the outline of a lesion on its largest
    slice, a point for the others."""
    groups: list[Group] = [
        _study_group(ctx),
        *_lung_groups(ctx, seg),
        *_kind_groups(ctx, seg),
        *_lesion_groups(ctx, seg),
        *_zone_groups(ctx),
    ]
    ctx.n_groups = len(groups)

    observer = _device_observer(ctx)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups,
        # The image library lists the slices shown as key images: listing all source
        # slices made highdicom take ~7 s for 275 slices, and every source instance is
        # referenced in the evidence sequence anyway.
        referenced_images=[ctx.sources[k] for k in ctx.key_slices] or [ctx.sources[0]],
    )
    sr = hd.sr.ComprehensiveSR(  # image regions are 2D SCOORDs: no SCOORD3D, no 3D SR
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
        previous_versions=_predecessors(ctx) or None,
        series_description=f"{ctx.algorithm_name} SR - {DISCLAIMER}"[:64],
        **ctx.common_kwargs(),
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> pydicom.Dataset:
    """The Coding Scheme Identification item of ctscreen's private codes (PS3.3 C.12.1)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "the ctscreen project"
    return item


def _device_observer(ctx: _Context) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_name_based_uid("device", ctx.algorithm_name, ctx.algorithm_version),
            name=ctx.algorithm_name,
            manufacturer_name=ctx.config.manufacturer or None,
            model_name=f"{ctx.algorithm_name} {ctx.algorithm_version}",
        ),
    )


def _build_kos(ctx: _Context, sr: pydicom.Dataset, key_images: Sequence[pydicom.Dataset]
               ) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection document ("Of Interest") flagging the key images and the SR,
    so that a PACS marks them as the study's key objects."""
    selected = [*key_images, sr]
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=selected,
        observer_device_context=_device_observer(ctx),
        description=f"{ctx.algorithm_name}: one key image per finding, and the measurement "
                    f"report ({DISCLAIMER})",
    )
    kw = ctx.common_kwargs()
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=selected,
        content=content,
        series_instance_uid=ctx.uid("ko-series"),
        series_number=SERIES_NUMBERS["ko"],
        sop_instance_uid=ctx.uid("ko-instance"),
        instance_number=1,
        manufacturer=ctx.config.manufacturer or None,
        institution_name=kw.get("institution_name"),
        series_description=f"{ctx.algorithm_name} key objects - {DISCLAIMER}"[:64],
    )
    if ctx.created is not None:
        kos.ContentDate = pydicom.valuerep.DA(ctx.created.date())
        kos.ContentTime = pydicom.valuerep.TM(ctx.created.time())
    return kos


def _predecessors(ctx: _Context) -> list[pydicom.Dataset]:
    """The replaced SRs as highdicom's ``previous_versions`` wants them (their identifying
    attributes; they are in the same study)."""
    out = []
    for ref in ctx.previous:
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = ctx.sources[0].StudyInstanceUID
        ds.SeriesInstanceUID = ref.series_instance_uid
        ds.SOPClassUID = ref.sop_class_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        out.append(ds)
    return out


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


def choose_finding_slices(
    ranked: Sequence[Sequence[int]], areas: Sequence[Sequence[int]], n: int, min_gap: int = 1
) -> list[tuple[int, int]]:
    """One key slice per finding, for the first ``n`` findings (largest first) that still
    have a slice of their own: ``(position of the finding, slice)``.

    ``ranked[i]`` are finding i's slices by decreasing area ``areas[i]``.  Each finding gets
    its largest slice not yet taken; where that lies within ``min_gap`` of a chosen slice (it
    would show nearly the same image), a slice at least that far away is preferred if it
    still holds half the finding's largest area."""
    chosen: list[tuple[int, int]] = []
    for i, (slices, area) in enumerate(zip(ranked, areas, strict=True)):
        if len(chosen) == n:
            break
        taken = {k for _, k in chosen}
        free = [(k, a) for k, a in zip(slices, area, strict=True) if k not in taken and a > 0]
        if not free:
            continue  # every slice of it is shown already
        far = [(k, a) for k, a in free if all(abs(k - c) >= min_gap for _, c in chosen)
               and 2 * a >= area[0]]
        chosen.append((i, (far or free)[0][0]))
    return chosen


@dataclass(frozen=True)
class LesionView:
    """Where to show one finding: its slices by decreasing area, and the outline of it on
    its largest slice as SCOORD image coordinates ((column, row), pixel centres at +0.5;
    closed: the first point is repeated at the end), or one point where it is too small
    for an outline."""

    ranked_slices: tuple[int, ...]
    ranked_areas: tuple[int, ...]
    outline: npt.NDArray[np.float32]

    @property
    def slice(self) -> int:
        return self.ranked_slices[0]


def lesion_view(labels: npt.NDArray[np.uint8], f: Finding) -> LesionView:
    box, mask = finding_mask(labels, f)
    area = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    order = np.lexsort((np.arange(area.size), -area))
    order = order[area[order] > 0]
    k = int(order[0])
    plane = mask[k]
    pieces, n = ndi.label(plane)
    if n > 1:  # the largest piece of it on that slice
        plane = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    r0, c0 = box[1].start, box[2].start
    contours = measure.find_contours(np.pad(plane, 1).astype(np.float32), 0.5)
    ring = max(contours, key=len) if contours else np.zeros((0, 2))
    if len(ring) >= 4 and np.allclose(ring[0], ring[-1]):
        # fewer points, within half a pixel (OpenCV's Douglas-Peucker: skimage's
        # approximate_polygon imports scipy.signal, 2 s on the first report of a process)
        import cv2

        kept = cv2.approxPolyDP(ring[:-1].astype(np.float32).reshape(-1, 1, 2), 0.5, True)
        ring = np.concatenate([kept.reshape(-1, 2), kept.reshape(-1, 2)[:1]]).astype(np.float64)
    if len(ring) >= 4 and np.allclose(ring[0], ring[-1]):
        # padded (row, col) -> image (column, row): -1 for the pad, +0.5 to pixel centres
        xy = np.stack([ring[:, 1] - 0.5 + c0, ring[:, 0] - 0.5 + r0], axis=1)
    else:
        rr, cc = np.nonzero(plane)
        xy = np.array([[cc.mean() + 0.5 + c0, rr.mean() + 0.5 + r0]])
    return LesionView(
        ranked_slices=tuple(int(i) + box[0].start for i in order),
        ranked_areas=tuple(int(area[i]) for i in order),
        outline=xy.astype(np.float32),
    )


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


def wrap_caption(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Any,
                 width: float) -> list[str]:
    """``lines`` broken at spaces (a word wider than ``width`` at characters) so that every
    line fits ``width`` pixels: nothing of the caption is cut off."""
    out: list[str] = []
    for text in lines:
        line = ""
        for word in text.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                out.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                out.append(word[:cut])
                word = word[cut:]
            line = word
        out.append(line)
    return out


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
    pad = max(4, w // 64)
    measure_draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = [("lung", COLOURS[Side.RIGHT]), ("lung", COLOURS[Side.LEFT]),
              ("GGO", COLOURS[LesionKind.GGO]),
              ("consolidation", COLOURS[LesionKind.CONSOLIDATION])]
    legend_rows = _legend_rows(measure_draw, legend, font, w - 2 * pad)
    wrapped = wrap_caption(measure_draw, caption, font, w - 2 * pad)
    band = line_h * (len(wrapped) + len(legend_rows)) + size // 2
    img = Image.new("RGB", (w, h + band), (0, 0, 0))
    img.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(img)
    marker_font = _font(max(14, w // 20))
    white, black = (255, 255, 255), (0, 0, 0)
    for x_pos, text, anchor in ((pad, edges.left, "lm"), (w - pad, edges.right, "rm")):
        draw.text(
            (x_pos, h // 2), text, fill=white, font=marker_font, anchor=anchor,
            stroke_width=max(1, size // 8), stroke_fill=black,
        )
    y = h + size // 4
    for line in wrapped:
        draw.text((pad, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    for row in legend_rows:
        x = float(pad)
        for label, colour in row:
            draw.text((x, y), label, fill=colour, font=font)
            x += draw.textlength(label + "   ", font=font)
        y += line_h
    return np.asarray(img, dtype=np.uint8), edges, factor


def _legend_rows(draw: ImageDraw.ImageDraw, items: Sequence[tuple[str, tuple[int, int, int]]],
                 font: Any, width: float) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """The colour legend's words, as many to a row as fit ``width``."""
    rows: list[list[tuple[str, tuple[int, int, int]]]] = [[]]
    x = 0.0
    for label, colour in items:
        step = draw.textlength(label + "   ", font=font)
        if rows[-1] and x + draw.textlength(label, font=font) > width:
            rows.append([])
            x = 0.0
        rows[-1].append((label, colour))
        x += step
    return rows


def _image_position(src: pydicom.Dataset, ct: Volume, k: int) -> str:
    """How a viewer names the source slice: its series and instance numbers and its table
    position (Slice Location where given, else the patient z of its position)."""
    number = src.get("InstanceNumber")
    loc = src.get("SliceLocation")
    z = float(loc) if loc not in (None, "") else float(ct.index_to_lps([k, 0, 0])[0, 2])
    series = src.get("SeriesNumber")
    head = f"Series {series} image {number}" if series not in (None, "") else f"Image {number}"
    return f"{head} ({'location' if loc not in (None, '') else 'z'} {z:.1f} mm)"


def _build_key_images(ctx: _Context) -> list[hd.sc.SCImage]:
    a = ctx.analysis
    ct = ctx.ct
    lung = ctx.lungs.labels.array
    les = a.labels.array
    ks = ctx.key_slices
    ref = ctx.sources[0]
    out = []
    by_index = {f.index: f for f in a.findings}
    for i, (k, shown) in enumerate(zip(ks, ctx.key_findings, strict=True), start=1):
        src = ctx.sources[k]
        f = by_index.get(shown)
        what = (f"Lesion {f.index} of {a.n_findings_total}: {f.kind}, {f.volume_ml:.1f} ml, "
                f"{f.side} {f.zone} zone, mean {f.mean_hu:.0f} HU" if f is not None
                else "No lesion found")
        caption = [
            DISCLAIMER,
            f"Suspicion {a.suspicion:.2f} | RSNA category: {PATTERN_CAPTIONS[a.pattern]}",
            f"Involvement {a.involved_pct:.1f}% | severity {a.severity_score}/{a.severity_max} "
            f"({a.severity_scale})",
            what,
            f"{_image_position(src, ct, k)} | {ctx.algorithm_name} {ctx.algorithm_version}",
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
