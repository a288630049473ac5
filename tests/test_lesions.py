"""Lesion detection and measurement on phantoms (any grid) and a real negative study."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from tiers import quick_one

from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    Finding,
    LesionKind,
    LungMasks,
    Pattern,
    Side,
    Volume,
    Zone,
)
from pipeline.config import LesionsConfig, LungsConfig
from pipeline.errors import ConfigError
from pipeline.lesions import (
    SEVERITY_SCALE,
    DensityLesionDetector,
    PleuralDepth,
    analyse,
    detect_and_analyse,
    detector_for,
    pattern_features,
    rsna_category,
    settle_kinds,
    severity_zone_score,
    suspicion_score,
)
from pipeline.lungs import segment_lungs
from pipeline.phantom.model import (
    LesionSpec,
    PhantomSpec,
    central_ggo_lesions,
    default_lesions,
    lobar_consolidation_lesions,
    make_grid,
    render,
    subpleural_ggo_lesions,
)

log = logging.getLogger(__name__)
SHAPE = (110, 160, 160)
SPACING = (2.5, 2.2, 2.2)
CLASSICAL = LungsConfig(method="classical")
CFG = LesionsConfig(detector="density")  # the density detector's tests


@pytest.fixture(scope="module", params=quick_one(["axial", "flipped", "oblique"], "oblique"))
def case(request):  # type: ignore[no-untyped-def]
    orient = request.param
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(), make_grid(SHAPE, SPACING, orient), SHAPE, thickness)
    lungs = segment_lungs(ct, CLASSICAL)
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
    # bilateral, three foci, mostly ground glass, the consolidation subpleural: typical
    assert an.pattern == Pattern.TYPICAL, pattern_features(an.findings)
    cons = _match(an, default_lesions()[1])
    assert cons.peripheral_fraction > 0.9  # it touches the costal pleura
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


def test_lesion_free_phantom_is_negative() -> None:
    ct, _ = render(PhantomSpec(lesions=()), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    an = detect_and_analyse(ct, segment_lungs(ct, CLASSICAL), CFG)
    assert an.pattern == Pattern.NEGATIVE
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
    # a whole zone of one lung consolidated, nothing else: unilateral, consolidation only
    assert an.pattern == Pattern.ATYPICAL


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
    nothing in the normal left lung.  The study-level call follows the pattern: one
    dense opacity in one lung is atypical for COVID-19 pneumonia, never typical.
    """
    from test_lungs import read_lidc

    ct: Volume = read_lidc(shared_data)
    lungs = segment_lungs(ct, CLASSICAL)
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
    features = pattern_features(an.findings)
    assert features.minor_lung_share < 0.05 and features.ggo_share < 0.3, features
    assert an.pattern is Pattern.ATYPICAL


# --------------------------------------------------------------------------- the study-level call


@pytest.mark.parametrize(("lesions", "orient", "want"), [
    (subpleural_ggo_lesions(), "axial", Pattern.TYPICAL),
    (subpleural_ggo_lesions(), "oblique", Pattern.TYPICAL),
    (central_ggo_lesions(), "flipped", Pattern.INDETERMINATE),
    (lobar_consolidation_lesions(), "flipped", Pattern.ATYPICAL),
], ids=["subpleural-ggo-axial", "subpleural-ggo-oblique", "central-ggo-flipped",
        "lobar-consolidation-flipped"])
def test_phantom_patterns_get_their_rsna_category(
        lesions: tuple[LesionSpec, ...], orient: str, want: Pattern) -> None:
    """The density detector on classical lungs, and the call from what it found."""
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(lesions=lesions), make_grid(SHAPE, SPACING, orient),  # type: ignore[arg-type]
                       SHAPE, thickness)
    an = detect_and_analyse(ct, segment_lungs(ct, CLASSICAL), CFG)
    features = pattern_features(an.findings)
    log.info("%s %s: %s, %.2f%% involved, %s", orient, want, an.pattern, an.involved_pct,
             features)
    assert an.pattern is want, features
    # each inserted lesion is found, of its kind, in its lung
    for spec, ml, side in zip(lesions, truth.lesion_ml, truth.lesion_sides, strict=True):
        f = _match(an, spec)
        assert f.side == side and abs(f.volume_ml - ml) < 0.25 * ml, (spec, f)
        if want is Pattern.TYPICAL:  # every one of them subpleural ...
            assert f.peripheral_fraction > 0.9, f
        if want is Pattern.INDETERMINATE:  # ... or perihilar, far from the costal pleura
            assert f.peripheral_fraction < 0.1, f


def test_pleural_depth_ignores_the_mediastinal_surface() -> None:
    """Depth is measured from the costal pleura: the lungs' medial surfaces are inside the
    chest cavity, whatever way the grid runs."""
    shape = (60, 160, 160)
    for orient in ("axial", "flipped", "oblique"):
        ct, truth = render(PhantomSpec(lesions=(), vessels=False),
                           make_grid(shape, (2.5, 2.2, 2.2), orient), shape)
        lab = truth.lungs.array
        box = tuple(slice(0, n) for n in shape)
        depth = PleuralDepth.around(lab, ct, box, box, 30.0)
        points = {"right lateral": (-125.0, 5.0, 0.0), "left lateral": (125.0, 5.0, 0.0),
                  "right medial": (-16.0, 5.0, 0.0), "left medial": (16.0, 30.0, 0.0),
                  "right posterior": (-70.0, 75.0, 0.0)}
        kji = np.rint(ct.lps_to_index(list(points.values()))).astype(np.intp)
        assert all(lab[tuple(i)] > 0 for i in kji), orient  # every point is in a lung
        d = dict(zip(points, depth.at(kji), strict=True))
        assert d["right lateral"] < 10 and d["left lateral"] < 10, (orient, d)
        assert d["right posterior"] < 10, (orient, d)
        assert d["right medial"] > 30 and d["left medial"] > 30, (orient, d)


def _finding(kind: LesionKind, ml: float, side: Side, peripheral: float) -> Finding:
    return Finding(index=1, kind=kind, volume_ml=ml, side=side, zone=Zone.MIDDLE,
                   mean_hu=-600.0 if kind is LesionKind.GGO else 20.0,
                   centroid_lps=(0.0, 0.0, 0.0), bbox_min_lps=(0.0, 0.0, 0.0),
                   bbox_max_lps=(0.0, 0.0, 0.0), voxel_count=1,
                   peripheral_fraction=peripheral)


GGO, CONS = LesionKind.GGO, LesionKind.CONSOLIDATION
R, L = Side.RIGHT, Side.LEFT


@pytest.mark.parametrize(("findings", "pct", "want"), [
    # nothing, or negligible involvement
    ((), 0.0, Pattern.NEGATIVE),
    ((_finding(GGO, 2.0, R, 1.0), _finding(GGO, 2.0, L, 1.0)), 0.05, Pattern.NEGATIVE),
    # bilateral peripheral ground glass, with or without consolidation
    ((_finding(GGO, 30, R, 0.9), _finding(GGO, 20, L, 0.8), _finding(GGO, 10, L, 0.7)), 1.5,
     Pattern.TYPICAL),
    ((_finding(GGO, 30, R, 0.8), _finding(CONS, 25, R, 0.9), _finding(GGO, 20, L, 0.7)), 2.0,
     Pattern.TYPICAL),
    # the same distribution, but too little of it to call
    ((_finding(GGO, 6, R, 0.9), _finding(GGO, 5, L, 0.8)), 0.3, Pattern.INDETERMINATE),
    # unilateral ground glass, even peripheral and multifocal
    ((_finding(GGO, 40, R, 0.9), _finding(GGO, 30, R, 0.9)), 2.0, Pattern.INDETERMINATE),
    # bilateral central (perihilar) ground glass
    ((_finding(GGO, 40, R, 0.1), _finding(GGO, 35, L, 0.2)), 2.0, Pattern.INDETERMINATE),
    # bilateral peripheral consolidation with hardly any ground glass: not typical, and
    # neither solitary nor unilateral: indeterminate
    ((_finding(CONS, 40, R, 0.9), _finding(CONS, 35, L, 0.9), _finding(GGO, 5, L, 0.9)), 2.0,
     Pattern.INDETERMINATE),
    # a unilateral lobar consolidation with thin ground-glass rims
    ((_finding(CONS, 210, R, 0.6), _finding(GGO, 12, R, 0.0), _finding(GGO, 3, R, 0.3)), 7.0,
     Pattern.ATYPICAL),
    # a solitary mass, peripheral
    ((_finding(CONS, 25, L, 1.0),), 0.8, Pattern.ATYPICAL),
    # a solitary mass with a speck of ground glass in the other lung
    ((_finding(CONS, 40, R, 0.8), _finding(GGO, 4, L, 0.9)), 1.2, Pattern.ATYPICAL),
    # consolidation in one lung, but ground glass beside it: unilateral GGO with
    # consolidation is indeterminate
    ((_finding(CONS, 30, R, 0.9), _finding(GGO, 30, R, 0.9)), 1.5, Pattern.INDETERMINATE),
], ids=["nothing", "negligible", "bilateral-peripheral-ggo", "bilateral-peripheral-mixed",
        "too-little", "unilateral-ggo", "central-ggo", "bilateral-consolidation",
        "lobar-consolidation", "solitary-mass", "mass-and-speck", "unilateral-mixed"])
def test_rsna_category_rule(findings: tuple[Finding, ...], pct: float, want: Pattern) -> None:
    assert rsna_category(findings, pct, CFG) is want, pattern_features(findings)


def test_rsna_category_thresholds_come_from_the_config() -> None:
    typical = (_finding(GGO, 30, R, 0.6), _finding(GGO, 20, L, 0.6))
    assert rsna_category(typical, 1.5, CFG) is Pattern.TYPICAL
    assert rsna_category(typical, 1.5, LesionsConfig(peripheral_min_share=0.7)) \
        is Pattern.INDETERMINATE
    assert rsna_category(typical, 1.5, LesionsConfig(typical_min_pct=2.0)) \
        is Pattern.INDETERMINATE
    assert rsna_category(typical, 1.5, LesionsConfig(bilateral_min_share=0.45)) \
        is Pattern.INDETERMINATE
    assert rsna_category(typical, 1.5, LesionsConfig(indeterminate_min_pct=2.0)) \
        is Pattern.NEGATIVE
    mass = (_finding(CONS, 30, R, 0.3), _finding(GGO, 10, L, 0.3))  # largest 0.75
    assert rsna_category(mass, 1.0, CFG) is Pattern.INDETERMINATE
    assert rsna_category(mass, 1.0, LesionsConfig(solitary_min_share=0.7)) is Pattern.ATYPICAL


def test_a_speck_of_one_kind_takes_the_kind_around_it() -> None:
    """min_lesion_ml applies to both kinds together; a one-voxel piece of consolidation in a
    ground-glass lesion (or the reverse) must not become a finding of its own."""
    labels = np.zeros((12, 30, 30), dtype=np.uint8)
    labels[2:10, 5:25, 5:25] = 1
    labels[5, 10, 10] = 2  # a speck of consolidation inside the ground glass
    labels[3:9, 15:24, 15:24] = 2  # a real consolidation inside it
    labels[5, 3, 3] = 2  # an isolated speck: not touching the other kind, left alone
    out = settle_kinds(labels, min_voxels=20)
    assert out[5, 10, 10] == 1 and out[5, 3, 3] == 2
    assert np.all(out[3:9, 15:24, 15:24] == 2)
    assert np.array_equal(out > 0, labels > 0)
    assert labels[5, 10, 10] == 2  # the input is not changed
    assert settle_kinds(out, 20) is out or np.array_equal(settle_kinds(out, 20), out)
