"""Pure: a study's headers -> the best thin-slice axial chest CT series, or coded reasons.

Each series is judged against the rules in ``SelectionConfig`` (data, from configs/).
A series passes when it has no reasons; among passing series the preferred one has a
lung (sharp) kernel, then the thinnest slices, then the longest coverage.

Reason codes (stable, shown to users as "not analysed: <code>"):

``missing-study-uid``            instances carry no StudyInstanceUID
``invalid-uid:<Keyword>``        a Study/Series/SOP Instance UID that is not a DICOM UID
                                 (digits and dots, no leading zeros, at most 64 characters):
                                 results could not be filed under it, nor reference it
``truncated-file``               an instance's file ends before what it announces
``unreadable-instance``          an instance's file is DICOM but does not parse
``no-ct-series``                 no series of a CT modality in the study
``localizer-only``               the only CT images are localizers / scouts
``not-ct-image:<Modality>``      not a CT image object (SR, SEG, SC, ...)
``missing-tag:<Keyword>``        a tag needed to judge the series is absent (also an empty
                                 SeriesInstanceUID or SOPInstanceUID)
``mixed-series:<Keyword>``       instances sharing one SeriesInstanceUID disagree on what
                                 makes a series (two reconstructions under one UID)
``localizer``                    ImageType says LOCALIZER / SCOUT / TOPOGRAM
``not-original-primary``         derived or secondary images (reformats, MPR, ...)
``multiframe-unsupported``       enhanced multi-frame CT is not handled yet
``not-axial:<angle>deg``         slice normal further than the tolerance from head-feet
``slice-too-thick:<T>mm``        SliceThickness above the maximum
``too-few-slices:<N>``           fewer slices than the minimum
``insufficient-coverage:<L>mm``  the stack is shorter than a chest
``not-chest:<BodyPart>``         BodyPartExamined names another region
``duplicate-sop-instance-uid``   the same SOP Instance UID appears twice in the series
``no-pixel-data``                no instance of the series has pixel data
``missing-pixel-data``           some instances of the series have none
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from .artefacts import InstanceHeader, Selection, SeriesDecision, SeriesRef, StudyRef
from .config import SelectionConfig


def select_series(study: StudyRef, config: SelectionConfig) -> Selection:
    """Judge every series of ``study``; choose the best one that passes every rule.

    Refused as a whole: a study without a valid StudyInstanceUID, and a study holding a
    damaged instance that could not be read far enough to know its series (it may be a
    slice of any of them)."""
    if not study.uid_valid:
        problems = _read_problems(h for s in study.series for h in s.instances)
        return _refuse_study(study, (*problems, "missing-study-uid"))
    if not valid_uid(study.study_uid):
        return _refuse_study(study, ("invalid-uid:StudyInstanceUID",))
    orphans = _read_problems(h for s in study.series if not s.first.series_uid for h in s.instances)
    if orphans:
        return _refuse_study(study, orphans)

    decisions: list[SeriesDecision] = []
    passing: list[tuple[tuple[float, ...], SeriesRef]] = []
    for series in study.series:
        reasons = series_reasons(series, config)
        key = _rank_key(series, config)
        decisions.append(_decision(series, reasons, key))
        if not reasons:
            passing.append((key, series))
    if passing:
        passing.sort(key=lambda kv: kv[0])
        return Selection(study.study_uid, passing[0][1], tuple(decisions))
    return Selection(
        study.study_uid, None, tuple(decisions), _study_reasons(study, decisions, config)
    )


def valid_uid(uid: str) -> bool:
    """A DICOM UID (PS3.5 9.1): components of digits without leading zeros, separated by
    dots, at most 64 characters.  Anything else cannot name a file or be referenced."""
    return len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _refuse_study(study: StudyRef, reasons: tuple[str, ...]) -> Selection:
    refused = tuple(_decision(s, reasons) for s in study.series)
    return Selection(study.study_uid, None, refused, reasons)


def _read_problems(instances: Iterable[InstanceHeader]) -> tuple[str, ...]:
    """The distinct read problems of ``instances``, in order of first appearance."""
    return tuple(dict.fromkeys(h.read_problem for h in instances if h.read_problem))


def _uid_reasons(series: SeriesRef) -> list[str]:
    reasons = []
    if not series.first.series_uid:
        reasons.append("missing-tag:SeriesInstanceUID")
    elif not valid_uid(series.first.series_uid):
        reasons.append("invalid-uid:SeriesInstanceUID")
    sops = [h.sop_instance_uid for h in series.instances]
    if not all(sops):
        reasons.append("missing-tag:SOPInstanceUID")
    elif not all(valid_uid(u) for u in sops):
        reasons.append("invalid-uid:SOPInstanceUID")
    return reasons


def _mixed_series(series: SeriesRef) -> str | None:
    """The first attribute on which the instances of one series UID disagree (where they
    carry it), or None.  Geometry is judged by the volume stage, not here."""
    for keyword, values in (
        ("SOPClassUID", {h.sop_class_uid for h in series.instances}),
        ("Modality", {h.modality for h in series.instances}),
        ("SeriesNumber", {h.series_number for h in series.instances}),
        ("ConvolutionKernel", {h.convolution_kernel for h in series.instances}),
    ):
        if len(values - {None, ""}) > 1:
            return keyword
    return None


def series_reasons(series: SeriesRef, config: SelectionConfig) -> tuple[str, ...]:
    """Every reason this series cannot be analysed; empty when it qualifies."""
    first = series.first
    problems = _read_problems(series.instances)
    if problems:  # the rest of a damaged file's header cannot be trusted to judge by
        return problems
    reasons: list[str] = []
    if not first.modality:
        reasons.append("missing-tag:Modality")
    elif first.modality not in config.modalities:
        return (f"not-ct-image:{first.modality}",)
    if first.sop_class_uid not in config.sop_classes:
        if first.number_of_frames > 1 or first.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1":
            return ("multiframe-unsupported",)
        return (f"not-ct-image:{first.modality or first.sop_class_uid or 'unknown'}",)
    if any(t in config.excluded_image_type for t in first.image_type):
        return ("localizer",)
    required = config.required_image_type
    if (
        len(first.image_type) < len(required)
        or tuple(first.image_type[: len(required)]) != required
    ):
        reasons.append("not-original-primary")
    reasons.extend(_uid_reasons(series))
    mixed = _mixed_series(series)
    if mixed:
        reasons.append(f"mixed-series:{mixed}")
    if any(h.number_of_frames > 1 for h in series.instances):
        reasons.append("multiframe-unsupported")
    with_pixels = sum(h.has_pixel_data for h in series.instances)
    if with_pixels == 0:
        reasons.append("no-pixel-data")
    elif with_pixels < len(series.instances):
        reasons.append("missing-pixel-data")
    body = first.body_part.replace(" ", "")
    if body and body in config.non_chest_body_parts:
        reasons.append(f"not-chest:{body}")
    if first.slice_thickness is None:
        reasons.append("missing-tag:SliceThickness")
    elif first.slice_thickness > config.max_slice_thickness_mm + 1e-6:
        reasons.append(f"slice-too-thick:{first.slice_thickness:.1f}mm")
    angle = _axial_angle_deg(first)
    if angle is None:
        reasons.append("missing-tag:ImageOrientationPatient")
    elif angle > config.axial_tolerance_deg:
        reasons.append(f"not-axial:{angle:.0f}deg")
    n = len(series.instances)
    if n < config.min_slices:
        reasons.append(f"too-few-slices:{n}")
    else:
        coverage = _coverage_mm(series)
        if coverage is None:
            reasons.append("missing-tag:ImagePositionPatient")
        elif coverage < config.min_coverage_mm:
            reasons.append(f"insufficient-coverage:{coverage:.0f}mm")
    counts = Counter(h.sop_instance_uid for h in series.instances)
    if any(c > 1 for c in counts.values()):
        reasons.append("duplicate-sop-instance-uid")
    return tuple(reasons)


def _study_reasons(
    study: StudyRef, decisions: list[SeriesDecision], config: SelectionConfig
) -> tuple[str, ...]:
    ct = [
        d
        for d, s in zip(decisions, study.series, strict=True)
        if s.first.modality in config.modalities or not s.first.modality
    ]
    ct = [d for d in ct if not any(r.startswith("not-ct-image") for r in d.reasons)]
    if not ct:
        return ("no-ct-series",)
    if all(d.reasons == ("localizer",) for d in ct):
        return ("localizer-only",)
    seen: dict[str, None] = {}
    for d in ct:
        for r in d.reasons:
            if r != "localizer":
                seen.setdefault(r, None)
    return tuple(seen)


def _decision(
    series: SeriesRef, reasons: tuple[str, ...], key: tuple[float, ...] = ()
) -> SeriesDecision:
    return SeriesDecision(
        series.series_uid, series.description, len(series.instances), reasons, key
    )


def _rank_key(series: SeriesRef, config: SelectionConfig) -> tuple[float, ...]:
    kernel_rank = float(len(config.preferred_kernels))
    kernel = series.first.convolution_kernel
    for i, pattern in enumerate(config.preferred_kernels):
        if kernel and re.search(pattern, kernel):
            kernel_rank = float(i)
            break
    thickness = series.first.slice_thickness or 99.0
    coverage = _coverage_mm(series) or 0.0
    return (kernel_rank, thickness, -coverage, -float(len(series.instances)))


def _normal(h: InstanceHeader) -> np.ndarray | None:
    if h.image_orientation is None:
        return None
    iop = np.asarray(h.image_orientation, dtype=float)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return None if norm < 1e-6 else n / norm


def _axial_angle_deg(h: InstanceHeader) -> float | None:
    """Angle between the slice normal and the patient's head-feet axis (0 = axial)."""
    n = _normal(h)
    if n is None:
        return None
    return math.degrees(math.acos(min(1.0, abs(float(n[2])))))


def _coverage_mm(series: SeriesRef) -> float | None:
    n = _normal(series.first)
    if n is None or any(h.image_position is None for h in series.instances):
        return None
    d = [float(np.dot(n, h.image_position)) for h in series.instances]  # type: ignore[arg-type]
    return max(d) - min(d)
