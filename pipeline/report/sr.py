"""The Comprehensive SR: a TID 1500 Measurement Report whose measurement groups are built
section by section (the study, each lung, each lesion kind, each lesion, each lung zone)."""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from ..artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Zone
from .codes import (
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    ATTENUATION,
    CHEST_CT_TRIAGE,
    CT_OF_CHEST,
    DEVICE,
    DISCLAIMER,
    KIND_CODES,
    LESION_SEGMENT_BASE,
    LUNG,
    MEAN,
    PATTERN_CODES,
    RSNA_CATEGORY,
    SEGMENT_NUMBERS,
    SERIES_NUMBERS,
    SEVERITY,
    SUSPICION,
    UNIT_HU,
    UNIT_ONE,
    UNIT_SCORE,
    ZONE_CODES,
    _private_scheme,
)
from .context import _Context
from .seg import _segments_with_frames
from .sr_items import (
    Group,
    _algorithm_id,
    _anchor,
    _extent_pct,
    _largest_slice,
    _measurement,
    _partner,
    _planar,
    _region,
    _segment_ref,
    _sites,
    _tracking,
    _volume_ml,
)
from .uids import _name_based_uid


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
