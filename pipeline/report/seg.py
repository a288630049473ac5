"""The SEG (``highdicom.seg.Segmentation``, BINARY): lungs, lesion kinds and each reported
lesion alone, with fixed segment numbers (``SEGMENT_NUMBERS``, ``LESION_SEGMENT_BASE``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from ..artefacts import LESION_LABELS, LUNG_LABELS, Finding, LesionKind, Side, bounding_box
from ..lesions import finding_mask
from .codes import (
    ABNORMAL_STRUCTURE,
    AI_FAMILY,
    ANATOMICAL_STRUCTURE,
    COLOURS,
    DISCLAIMER,
    KIND_CODES,
    LESION_SEGMENT_BASE,
    LUNG,
    SEGMENT_NUMBERS,
    SERIES_NUMBERS,
    SIDE_CODES,
    ZONE_CODES,
)
from .context import _Context

log = logging.getLogger(__package__ or __name__)  # "pipeline.report", as before the split


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
