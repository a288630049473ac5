"""The analytic chest phantom: geometry, contents, truth and speed on any grid."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from pipeline.artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Side
from pipeline.phantom.model import (
    HEART_CENTRE,
    LesionSpec,
    PhantomSpec,
    default_lesions,
    inserted_volume_ml,
    make_grid,
    render,
)

SHAPE = (110, 160, 160)
SPACING = (2.5, 2.2, 2.2)


@pytest.fixture(scope="module")
def axial():
    return render(PhantomSpec(), make_grid(SHAPE, SPACING, "axial"), SHAPE)


def test_lungs_have_adult_volume_and_left_is_plus_x(axial) -> None:
    ct, truth = axial
    total = truth.lung_ml()
    assert 4000 < total < 6000, f"expected 4-6 l of lung, got {total:.0f} ml"
    for side, sign in ((Side.LEFT, 1.0), (Side.RIGHT, -1.0)):
        idx = np.argwhere(truth.lungs.array == LUNG_LABELS[side])
        x = ct.index_to_lps(idx.mean(axis=0))[0, 0]
        assert x * sign > 40, f"{side} lung centroid x expected {'+' if sign > 0 else '-'}, got {x}"
    # the heart indents the left lung: left smaller than right
    assert truth.lung_ml(Side.LEFT) < truth.lung_ml(Side.RIGHT) - 50


def test_densities(axial) -> None:
    ct, truth = axial
    a = ct.array.astype(np.float64)
    lung = truth.lungs.array > 0
    parenchyma = lung & (truth.lesions.array == 0)
    assert -900 < np.median(a[parenchyma]) < -800
    ggo = truth.lesions.array == LESION_LABELS[LesionKind.GGO]
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    assert -660 < a[ggo].mean() < -540 and a[ggo].std() > 20  # textured
    assert -20 < a[cons].mean() < 50
    assert a[0, 0, 0] < -950  # air outside the body
    assert a.max() > 400  # bone
    k, r, c = np.round(ct.lps_to_index([HEART_CENTRE])[0]).astype(int)
    assert 0 < a[k, r, c] < 100  # heart is soft tissue


def test_truth_is_the_same_patient_on_any_grid(axial) -> None:
    _, truth = axial
    for orient in ("flipped", "oblique"):
        ct2, t2 = render(PhantomSpec(), make_grid(SHAPE, SPACING, orient), SHAPE)
        for side in Side:
            assert t2.lung_ml(side) == pytest.approx(truth.lung_ml(side), rel=0.02)
        assert t2.lesion_ml == truth.lesion_ml  # analytic: independent of the grid
        # the left lung is still at +x in LPS
        idx = np.argwhere(t2.lungs.array == LUNG_LABELS[Side.LEFT])
        assert ct2.index_to_lps(idx.mean(axis=0))[0, 0] > 40


def test_inserted_volume_is_analytic() -> None:
    inside = LesionSpec(LesionKind.GGO, (-80.0, 20.0, 0.0), (10.0, 12.0, 14.0))
    ml, side = inserted_volume_ml(inside)
    assert side == Side.RIGHT
    assert ml == pytest.approx(4 / 3 * math.pi * 10 * 12 * 14 / 1000, rel=0.01)
    sub = default_lesions()[1]  # the subpleural consolidation, partly in the chest wall
    ml_sub, side_sub = inserted_volume_ml(sub)
    full = 4 / 3 * math.pi * np.prod(sub.radii_mm) / 1000
    assert side_sub == Side.LEFT
    assert 0.5 * full < ml_sub < 0.95 * full


def test_slice_thickness_blurs_along_the_normal_only() -> None:
    aff = make_grid(SHAPE, SPACING, "axial")
    ct_thin, _ = render(PhantomSpec(noise_hu=0.0), aff, SHAPE)
    ct_thick, _ = render(PhantomSpec(noise_hu=0.0), aff, SHAPE, slice_thickness_mm=5.0)
    diff = np.abs(ct_thin.array.astype(int) - ct_thick.array.astype(int))
    assert diff.max() > 100  # edges across slices change
    assert np.median(diff) == 0  # homogeneous regions do not


def test_make_grid_orientations() -> None:
    for orient in ("axial", "flipped", "oblique"):
        aff = make_grid((11, 21, 31), (2.0, 1.0, 1.5), orient, centre_lps=(5.0, -3.0, 7.0))
        centre = aff @ np.array([5.0, 10.0, 15.0, 1.0])
        np.testing.assert_allclose(centre[:3], (5.0, -3.0, 7.0), atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), (2.0, 1.0, 1.5))
    flipped = make_grid((11, 21, 31), (2.0, 1.0, 1.5), "flipped")
    assert flipped[0, 2] < 0 and flipped[1, 1] < 0 and flipped[2, 0] < 0
    with pytest.raises(ValueError, match="orientation"):
        make_grid((1, 1, 1), (1.0, 1.0, 1.0), "sagittal")  # type: ignore[arg-type]


def test_deterministic_and_fast() -> None:
    shape = (120, 160, 160)
    aff = make_grid(shape, (2.0, 2.0, 2.0), "axial")
    t0 = time.perf_counter()
    a, _ = render(PhantomSpec(seed=3), aff, shape)
    dt = time.perf_counter() - t0
    b, _ = render(PhantomSpec(seed=3), aff, shape)
    c, _ = render(PhantomSpec(seed=4), aff, shape)
    assert np.array_equal(a.array, b.array)
    assert not np.array_equal(a.array, c.array)
    assert a.array.dtype == np.int16
    print(f"render {shape}: {dt:.2f} s")  # a figure, not a test: benchmarks judge speed


@pytest.mark.heavy  # 7 s: a 350 ml consolidation rendered
def test_lobar_consolidation_is_clipped_to_its_lung() -> None:
    """A consolidation larger than the upper third of a lung fills it, and only it."""
    for side, cx in ((Side.RIGHT, -70.0), (Side.LEFT, 70.0)):
        les = LesionSpec(LesionKind.CONSOLIDATION, (cx, 5.0, 95.0), (60.0, 70.0, 50.0))
        ml, where = inserted_volume_ml(les)
        full = 4 / 3 * math.pi * 60 * 70 * 50 / 1000
        assert where == side
        assert 0.3 * full < ml < 0.8 * full  # the lung's apex clips the ellipsoid
        ct, truth = render(PhantomSpec(lesions=(les,)), make_grid(SHAPE, SPACING, "axial"), SHAPE)
        cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
        assert np.all(truth.lungs.array[cons] == LUNG_LABELS[side])
        assert cons.sum() * ct.voxel_volume_ml == pytest.approx(ml, rel=0.05)
        # the lung's top slices hold consolidation only: no aerated lung of that side
        z = ct.index_to_lps(np.argwhere(truth.lungs.array == LUNG_LABELS[side]))[:, 2]
        top = truth.lungs.array == LUNG_LABELS[side]
        top &= ct.lps_grid(2) > np.percentile(z, 95)
        assert np.all(ct.array[top] > -100)
