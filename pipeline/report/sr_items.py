"""Building blocks of the SR's measurement groups: tracking identifiers, measurements,
finding sites, image regions and anchors, segment references."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.sr.coding import Code

from ..artefacts import Side
from .codes import AI_FAMILY, EXTENT, SIDE_CODES, SIDE_LUNG_CODES, UNIT_ML, UNIT_PERCENT, VOLUME
from .context import _Context


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


def _largest_slice(labels: npt.NDArray[Any], value: int) -> list[int]:
    """The slice with the largest area of ``value`` (none where it has no voxel)."""
    area = np.count_nonzero((labels == value).reshape(labels.shape[0], -1), axis=1)
    order = np.lexsort((np.arange(area.size), -area))
    return [int(k) for k in order[area[order] > 0][:1]]
