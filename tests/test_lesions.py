"""Lesion detection and measurement on phantoms (any grid) and a real negative study."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    LesionKind,
    LungMasks,
    Pattern,
    Side,
    Volume,
    Zone,
)
from pipeline.config import LesionsConfig
from pipeline.errors import ConfigError
from pipeline.lesions import (
    SEVERITY_SCALE,
    DensityLesionDetector,
    analyse,
    detect_and_analyse,
    detector_for,
    severity_zone_score,
    suspicion_score,
)
from pipeline.lungs import segment_lungs
from pipeline.phantom.model import LesionSpec, PhantomSpec, default_lesions, make_grid, render

log = logging.getLogger(__name__)
SHAPE = (110, 160, 160)
SPACING = (2.5, 2.2, 2.2)
CFG = LesionsConfig()


@pytest.fixture(scope="module", params=["axial", "flipped", "oblique"])
def case(request):  # type: ignore[no-untyped-def]
    orient = request.param
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(), make_grid(SHAPE, SPACING, orient), SHAPE, thickness)
    lungs = segment_lungs(ct)
    return orient, ct, truth, lungs, detect_and_analyse(ct, lungs, CFG)


def _match(an, spec: LesionSpec):  # type: ignore[no-untyped-def]
    """The reported finding of the same kind whose centroid is nearest the lesion centre."""
    same = [f for f in an.findings if f.kind == spec.kind]
    return min(same, key=lambda f: np.linalg.norm(np.subtract(f.centroid_lps, spec.centre_lps)))


def test_each_lesion_found_measured_and_placed(case) -> None:  # type: ignore[no-untyped-def]
    orient, _, truth, _, an = case
    assert an.n_findings_total == len(default_lesions()), [f.volume_ml for f in an.findings]
    for spec, ml, side in zip(default_lesions(), truth.lesion_ml, truth.lesion_sides, strict=True):
        f = _match(an, spec)
        log.info("%s %s: %.1f ml measured vs %.1f ml inserted", orient, spec.kind, f.volume_ml, ml)
        assert abs(f.volume_ml - ml) < 0.20 * ml, f"{orient} {spec.kind}: {f.volume_ml} vs {ml}"
        assert f.side == side
        # centroid at the right LPS place (the subpleural one is clipped by the pleura)
        assert np.linalg.norm(np.subtract(f.centroid_lps, spec.centre_lps)) < 8.0
        for a in range(3):
            assert f.bbox_min_lps[a] <= f.centroid_lps[a] <= f.bbox_max_lps[a]


def test_left_lesion_is_reported_left(case) -> None:  # type: ignore[no-untyped-def]
    orient, _, _, _, an = case
    cons = _match(an, default_lesions()[1])  # inserted at LPS x = +118: patient LEFT
    assert cons.side == Side.LEFT, orient
    assert cons.centroid_lps[0] > 90
    ggo = _match(an, default_lesions()[0])  # at x = -95: patient RIGHT, lower zone
    assert ggo.side == Side.RIGHT and ggo.zone == Zone.LOWER
    assert _match(an, default_lesions()[2]).zone == Zone.UPPER


def test_kind_volumes_and_figures(case) -> None:  # type: ignore[no-untyped-def]
    orient, ct, truth, lungs, an = case
    for kind in LesionKind:
        got = np.count_nonzero(an.labels.array == LESION_LABELS[kind]) * ct.voxel_volume_ml
        want = np.count_nonzero(truth.lesions.array == LESION_LABELS[kind]) * ct.voxel_volume_ml
        assert abs(got - want) < 0.2 * want, f"{orient} {kind}: {got:.1f} vs {want:.1f} ml"
    right, left = an.lungs
    assert right.side == Side.RIGHT and left.side == Side.LEFT
    assert right.consolidation_ml == 0 and left.consolidation_ml > 10
    assert right.volume_ml == pytest.approx(lungs.mask(Side.RIGHT).sum() * ct.voxel_volume_ml)
    assert len(an.zones) == 6
    assert sum(z.lung_ml for z in an.zones) == pytest.approx(right.volume_ml + left.volume_ml)
    assert an.pattern == Pattern.PRESENT
    assert an.severity_scale == SEVERITY_SCALE and an.severity_max == 30
    # every involved zone holds < 5%: score 1 each; the right GGO straddles the middle/lower
    # boundary, so four zones (R middle, R lower, L middle, L upper); same as the truth's
    assert an.severity_score == sum(z.score for z in an.zones) == 4
    ref = analyse(ct, lungs, truth.lesions, CFG, "truth")
    assert [z.score for z in an.zones] == [z.score for z in ref.zones]
    assert 0 < an.suspicion < 1


def test_no_finding_outside_the_lungs(case) -> None:  # type: ignore[no-untyped-def]
    _, _, _, lungs, an = case
    assert not np.any((an.labels.array > 0) & ~lungs.mask())
    # even when a detector marks voxels outside, analyse drops them
    junk = np.ones(lungs.labels.shape, dtype=np.uint8)
    an2 = analyse(lungs.labels, lungs, lungs.labels.with_array(junk), CFG, "junk")
    assert not np.any((an2.labels.array > 0) & ~lungs.mask())


def test_lesion_free_phantom_is_absent() -> None:
    ct, _ = render(PhantomSpec(lesions=()), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    an = detect_and_analyse(ct, segment_lungs(ct), CFG)
    assert an.pattern == Pattern.ABSENT
    assert an.n_findings_total <= 1 and an.involved_pct < 0.05
    assert an.severity_score <= 1 and an.suspicion < 0.05


def test_severity_of_known_involvement() -> None:
    """A label volume covering known fractions of each zone gives the Pan et al. scores."""
    ct, truth = render(PhantomSpec(lesions=()), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    lungs = LungMasks(truth.lungs, "truth")
    z = ct.lps_grid(2)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    right = truth.lungs.array == LUNG_LABELS[Side.RIGHT]
    zr = z[right]
    lo, hi = zr.min(), zr.max()
    upper = right & (z > hi - (hi - lo) / 3 + 0.01)  # the right upper zone, all of it
    labels[upper] = LESION_LABELS[LesionKind.CONSOLIDATION]
    an = analyse(ct, lungs, ct.with_array(labels), CFG, "test")
    scores = {(zf.side, zf.zone): zf.score for zf in an.zones}
    assert scores[(Side.RIGHT, Zone.UPPER)] == 5
    assert sum(scores.values()) == an.severity_score == 5
    assert an.zones[0].involved_pct > 99
    assert an.lungs[0].consolidation_ml > 0 and an.lungs[1].ggo_ml == 0
    assert an.pattern == Pattern.PRESENT


def test_score_functions() -> None:
    assert [severity_zone_score(p) for p in (0, 0.01, 4.9, 5, 25, 30, 50, 75, 76, 100)] == \
        [0, 1, 1, 2, 2, 3, 4, 4, 5, 5]
    assert suspicion_score(0, 0, False) == 0.0
    s = [suspicion_score(p, 2, False) for p in (0.1, 1, 5, 20, 60)]
    assert s == sorted(s) and 0 < s[0] and s[-1] <= 1.0
    assert suspicion_score(3, 4, True) > suspicion_score(3, 1, False)


def test_findings_are_ranked_and_capped() -> None:
    ct, truth = render(PhantomSpec(), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    lungs = LungMasks(truth.lungs, "truth")
    an = analyse(ct, lungs, truth.lesions, LesionsConfig(max_reported_findings=2), "truth")
    assert an.n_findings_total == 3 and len(an.findings) == 2
    assert an.findings[0].volume_ml >= an.findings[1].volume_ml
    assert [f.index for f in an.findings] == [1, 2]


def test_factory() -> None:
    assert isinstance(detector_for(CFG), DensityLesionDetector)
    with pytest.raises(ConfigError, match="expected one of"):
        detector_for(LesionsConfig(detector="unet"))


@pytest.mark.slow
@pytest.mark.shared_data
def test_lidc_real_study(shared_data: Path) -> None:
    """LIDC-IDRI-0314: no COVID-19, one nodule, and an opacified right upper lobe.

    The density detector cannot tell a collapsed or consolidated lobe from COVID-19
    consolidation: it must report the opacity (right, upper zone, about 200 ml) and
    nothing in the normal left lung.  The "present" flag this gives is a known false
    positive for COVID-19 (a true dense finding), stated in the README.
    """
    from test_lungs import read_lidc

    ct: Volume = read_lidc(shared_data)
    lungs = segment_lungs(ct)
    t0 = time.perf_counter()
    an = detect_and_analyse(ct, lungs, CFG)
    dt = time.perf_counter() - t0
    log.info("LIDC-IDRI-0314: %d findings, %.3f%%, pattern %s, %.1f s",
             an.n_findings_total, an.involved_pct, an.pattern, dt)
    largest = an.findings[0]
    assert largest.kind is LesionKind.CONSOLIDATION
    assert (largest.side, largest.zone) == (Side.RIGHT, Zone.UPPER)
    assert 120.0 < largest.volume_ml < 320.0
    _right, left = an.lungs
    assert left.ggo_ml + left.consolidation_ml < 5.0  # the normal lung stays clean
    assert an.n_findings_total <= 10
    assert not np.any((an.labels.array > 0) & ~lungs.mask())
