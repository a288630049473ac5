"""Lung segmentation: phantoms on axial / flipped / oblique grids, and real CT."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tiers import quick_one

from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    LesionKind,
    LungMasks,
    Side,
    Volume,
    volume_from_sitk,
)
from pipeline.config import LungsConfig
from pipeline.errors import ConfigError, NotAnalysable
from pipeline.lungs import (
    ClassicalLungSegmenter,
    lung_mask_warnings,
    segment_lungs,
    segmenter_for,
)
from pipeline.phantom.model import (
    HEART_CENTRE,
    HEART_RADII,
    LUNG_CENTRES,
    LesionSpec,
    PhantomSpec,
    make_grid,
    render,
)

log = logging.getLogger(__name__)
SHAPE = (110, 160, 160)
CLASSICAL = LungsConfig(method="classical")  # this file tests the classical segmenter
SPACING = (2.5, 2.2, 2.2)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.fixture(scope="module", params=quick_one(["axial", "flipped", "oblique"], "oblique"))
def case(request):  # type: ignore[no-untyped-def]
    orient = request.param
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(), make_grid(SHAPE, SPACING, orient), SHAPE, thickness)
    return orient, ct, truth, segment_lungs(ct, CLASSICAL)


def test_volume_and_dice_per_lung(case) -> None:  # type: ignore[no-untyped-def]
    orient, ct, truth, lungs = case
    assert lungs.labels.array.dtype == np.uint8 and lungs.labels.shape == ct.shape
    np.testing.assert_array_equal(lungs.labels.affine, ct.affine)
    for side in Side:
        got = lungs.mask(side)
        want = truth.lungs.array == LUNG_LABELS[side]
        v_got, v_want = got.sum() * ct.voxel_volume_ml, want.sum() * ct.voxel_volume_ml
        assert abs(v_got - v_want) < 0.10 * v_want, f"{orient} {side}: {v_got:.0f} vs {v_want:.0f}"
        d = dice(got, want)
        log.info("%s %s lung: %.0f ml vs %.0f ml, Dice %.3f", orient, side, v_got, v_want, d)
        assert d > 0.95, f"{orient} {side}: Dice {d:.3f}"  # also fails on a mirrored mask


def test_left_is_patient_left_in_lps(case) -> None:  # type: ignore[no-untyped-def]
    _, ct, _, lungs = case
    for side, sign in ((Side.LEFT, 1.0), (Side.RIGHT, -1.0)):
        x = ct.index_to_lps(np.argwhere(lungs.mask(side)).mean(axis=0))[0, 0]
        assert x * sign > 40, f"{side} lung centroid at LPS x={x:.0f}"


def test_subpleural_consolidation_stays_inside(case) -> None:  # type: ignore[no-untyped-def]
    orient, _, truth, lungs = case
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    frac = np.count_nonzero(cons & lungs.mask()) / np.count_nonzero(cons)
    assert frac >= 0.9, f"{orient}: only {frac:.1%} of the subpleural consolidation is in the lungs"


def test_heart_is_not_swallowed(case) -> None:  # type: ignore[no-untyped-def]
    orient, ct, truth, lungs = case
    pts = [ct.lps_grid(a) for a in range(3)]
    q = sum(((pts[a] - HEART_CENTRE[a]) / HEART_RADII[a]) ** 2 for a in range(3))
    heart = q <= 0.9  # a little inside the heart surface
    frac = np.count_nonzero(heart & lungs.mask()) / np.count_nonzero(heart)
    assert frac < 0.01, f"{orient}: {frac:.1%} of the heart is labelled lung"
    left_got = lungs.mask(Side.LEFT).sum()
    left_truth = np.count_nonzero(truth.lungs.array == LUNG_LABELS[Side.LEFT])
    assert left_got < 1.05 * left_truth  # the heart's indentation is not filled


def heart_core(ct: Volume) -> npt.NDArray[np.bool_]:
    """A little inside the phantom's heart surface."""
    pts = [ct.lps_grid(a) for a in range(3)]
    q = sum(((pts[a] - HEART_CENTRE[a]) / HEART_RADII[a]) ** 2 for a in range(3))
    return np.asarray(q <= 0.9)


@pytest.fixture(scope="module", params=quick_one(["axial", "flipped", "oblique"], "oblique"))
def clean(request):  # type: ignore[no-untyped-def]
    """The phantom without lesions, segmented with and without mirror recovery."""
    orient = request.param
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(lesions=()), make_grid(SHAPE, SPACING, orient), SHAPE,
                       thickness)
    return orient, ct, truth, segment_lungs(ct, CLASSICAL), segment_lungs(
        ct, LungsConfig(method="classical", mirror_recovery=False))


def test_lesion_free_phantom_is_accurate(clean) -> None:  # type: ignore[no-untyped-def]
    orient, ct, truth, lungs, _ = clean
    for side in Side:
        got = lungs.mask(side)
        want = truth.lungs.array == LUNG_LABELS[side]
        assert abs(got.sum() / want.sum() - 1.0) < 0.03, f"{orient} {side}: volume"
        assert dice(got, want) > 0.98, f"{orient} {side}: Dice {dice(got, want):.3f}"
    assert np.count_nonzero(heart_core(ct) & lungs.mask()) == 0
    assert lung_mask_warnings(lungs) == ()


def test_mirror_recovery_leaves_a_healthy_chest_alone(clean) -> None:  # type: ignore[no-untyped-def]
    orient, _, _, lungs, without = clean
    np.testing.assert_array_equal(lungs.labels.array, without.labels.array, err_msg=orient)


# A consolidation filling most of the upper third of one lung (clipped to the lung): the
# slices above ~65 mm hold no aerated lung of that side at all.
LOBAR_RADII = (60.0, 70.0, 50.0)


@pytest.fixture(scope="module",
                params=quick_one([(o, s) for o in ("axial", "flipped", "oblique")
                                  for s in (Side.RIGHT, Side.LEFT)], ("oblique", Side.LEFT)),
                ids=lambda p: f"{p[0]}-{p[1]}-upper")
def lobar(request):  # type: ignore[no-untyped-def]
    orient, side = request.param
    cx, cy, _ = LUNG_CENTRES[side]
    les = LesionSpec(LesionKind.CONSOLIDATION, (cx, cy, 95.0), LOBAR_RADII)
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(lesions=(les,)), make_grid(SHAPE, SPACING, orient), SHAPE,
                       thickness)
    assert truth.lesion_sides == (side,) and truth.lesion_ml[0] > 350
    return orient, side, ct, truth, segment_lungs(ct, CLASSICAL)


def test_lobar_consolidation_stays_inside_its_lung(lobar) -> None:  # type: ignore[no-untyped-def]
    orient, side, ct, truth, lungs = lobar
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    frac = np.count_nonzero(cons & lungs.mask(side)) / np.count_nonzero(cons)
    log.info("%s %s upper lobar consolidation: %.1f%% inside", orient, side, 100 * frac)
    assert frac >= 0.85, f"{orient} {side}: only {frac:.1%} of the consolidation in the lung"
    for s in Side:  # both lungs still match the truth (the lesion is lung)
        d = dice(lungs.mask(s), truth.lungs.array == LUNG_LABELS[s])
        assert d > 0.97, f"{orient} {s}: Dice {d:.3f}"
    heart = heart_core(ct)
    assert np.count_nonzero(heart & lungs.mask()) < 0.01 * np.count_nonzero(heart)
    assert lung_mask_warnings(lungs) == ()


def test_without_mirror_recovery_the_lobar_consolidation_is_lost() -> None:
    """Mirror recovery is what keeps it inside: turned off, most of it is outside."""
    les = LesionSpec(LesionKind.CONSOLIDATION, (-70.0, 5.0, 95.0), LOBAR_RADII)
    ct, truth = render(PhantomSpec(lesions=(les,)), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    lungs = segment_lungs(ct, LungsConfig(method="classical", mirror_recovery=False))
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    assert np.count_nonzero(cons & lungs.mask()) / np.count_nonzero(cons) < 0.5


def test_lobar_consolidation_off_centre_patient() -> None:
    """The mirror plane is fitted to the bones, not taken from the grid centre."""
    les = LesionSpec(LesionKind.CONSOLIDATION, (70.0, 5.0, 95.0), LOBAR_RADII)
    aff = make_grid(SHAPE, SPACING, "axial", centre_lps=(-20.0, 10.0, 0.0), in_plane_deg=0.0)
    ct, truth = render(PhantomSpec(lesions=(les,)), aff, SHAPE)
    lungs = segment_lungs(ct, CLASSICAL)
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    assert np.count_nonzero(cons & lungs.mask(Side.LEFT)) / np.count_nonzero(cons) >= 0.85


def test_without_pleural_repair_the_consolidation_is_lost() -> None:
    """The repair is what keeps it inside: turned off, the same test fails."""
    ct, truth = render(PhantomSpec(), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    lungs = segment_lungs(ct, LungsConfig(method="classical", pleural_max_depth_mm=0.0))
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    assert np.count_nonzero(cons & lungs.mask()) / np.count_nonzero(cons) < 0.5


def test_no_lungs_is_refused() -> None:
    """An abdomen-like volume: body of soft tissue, no lungs."""
    aff = make_grid((40, 128, 128), (2.5, 2.5, 2.5), "axial")
    vol = Volume(np.full((40, 128, 128), -1000, dtype=np.int16), aff)
    x, y = vol.lps_grid(0), vol.lps_grid(1)
    body = (x / 150.0) ** 2 + (y / 110.0) ** 2 <= 1.0
    arr = np.where(body, 40, -1000).astype(np.int16)
    arr[:, 60:64, 60:64] = -1000  # a little bowel gas
    with pytest.raises(NotAnalysable) as e:
        segment_lungs(vol.with_array(arr), CLASSICAL)
    assert e.value.code == "no-lungs-found"
    assert "expected at least 500 ml" in str(e.value)


def masks_of(right_ml: float, left_ml: float) -> LungMasks:
    """Box-shaped lungs of the given volumes on a 1 ml-voxel grid (10 mm cubes)."""
    n = int(max(right_ml, left_ml)) + 1
    arr = np.zeros((2, 1, n), dtype=np.uint8)
    arr[0, 0, : int(right_ml)] = LUNG_LABELS[Side.RIGHT]
    arr[1, 0, : int(left_ml)] = LUNG_LABELS[Side.LEFT]
    return LungMasks(Volume(arr, np.diag([10.0, 10.0, 10.0, 1.0])), "test")


def test_lung_mask_warnings() -> None:
    assert lung_mask_warnings(masks_of(2600, 2400)) == ()
    assert lung_mask_warnings(masks_of(945, 1928)) == ("lung-asymmetry:right=0.49",)
    assert lung_mask_warnings(masks_of(3000, 1200)) == ("lung-asymmetry:left=0.40",)
    assert lung_mask_warnings(masks_of(900, 1000)) == ("lung-volume-low:total_ml=1900",)
    assert lung_mask_warnings(masks_of(0, 2500)) == ("lung-missing:right",)
    # thresholds come from the configuration
    cfg = LungsConfig(qa_min_side_ratio=0.4, qa_min_total_ml=1000.0)
    assert lung_mask_warnings(masks_of(945, 1928), cfg) == ()
    assert lung_mask_warnings(masks_of(900, 1000), cfg) == ()


def test_factory() -> None:
    from pipeline.lungs import LearnedLungSegmenter

    assert isinstance(segmenter_for(LungsConfig()), LearnedLungSegmenter)  # the default
    assert isinstance(segmenter_for(LungsConfig(method="classical")), ClassicalLungSegmenter)
    with pytest.raises(ConfigError, match="expected one of"):
        segmenter_for(LungsConfig(method="unet"))


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_copdgene_agreement_with_cip_labels(shared_data: Path) -> None:
    """3D agreement with the Chest Imaging Platform's algorithmic lung labels (not truth)."""
    import SimpleITK as sitk

    d = shared_data / "chest-ct" / "cip-copdgene-10002k-64"
    ct = volume_from_sitk(sitk.ReadImage(str(d / "ct-64.nrrd")))
    ct = ct.with_array(ct.array.astype(np.int16))
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "wholeLung-64.nrrd"))) > 0
    regions = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "lm-64.nrrd"))) & 0xFF
    lungs = segment_lungs(ct, CLASSICAL)
    agreement = dice(lungs.mask(), whole)
    log.info("COPDGene 10002K (4 mm): Dice agreement with CIP wholeLung %.3f", agreement)
    assert agreement > 0.95  # measured 0.978
    # CIP regions 9-11 are the left lung's thirds, 12-14 the right lung's
    cip_left, cip_right = np.isin(regions, (9, 10, 11)), np.isin(regions, (12, 13, 14))
    assert dice(lungs.mask(Side.LEFT), cip_left) > 0.9
    assert dice(lungs.mask(Side.RIGHT), cip_right) > 0.9


def read_lidc(shared_data: Path) -> Volume:
    import SimpleITK as sitk

    folder = str(shared_data / "chest-ct" / "lidc-idri-0314")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    reader.SetOutputPixelType(sitk.sitkInt16)
    return volume_from_sitk(reader.Execute())


# LPS points (mm) checked on axial, coronal and sagittal views of LIDC-IDRI-0314
LIDC_OPACIFIED_RIGHT_UPPER = [(-64.3, 180.8, -479.8), (-61.2, 184.0, -469.8),
                              (-58.8, 182.4, -459.8), (-56.5, 180.8, -449.8)]
LIDC_NOT_LUNG = {"ascending aorta": (-11.9, 130.1, -507.8), "heart": (17.8, 120.7, -559.8),
                 "trachea": (-15.7, 161.1, -459.8),
                 "under the right lung base": (-52.6, 112.9, -589.8)}


@pytest.mark.slow
@pytest.mark.shared_data
def test_lidc_lungs(shared_data: Path) -> None:
    """This patient's right upper lung is opacified (soft tissue with small air
    bronchograms from about z = -505 mm up to the apex) and the right lung base is raised
    over a fluid-density layer.  Measured: right 1211 ml, left 1928 ml (the threshold
    alone: right 945 ml); the recovered region was checked visually on axial, coronal and
    sagittal views."""
    ct = read_lidc(shared_data)
    t0 = time.perf_counter()
    lungs = segment_lungs(ct, CLASSICAL)
    dt = time.perf_counter() - t0
    right = lungs.mask(Side.RIGHT).sum() * ct.voxel_volume_ml
    left = lungs.mask(Side.LEFT).sum() * ct.voxel_volume_ml
    log.info("LIDC-IDRI-0314: right %.0f ml, left %.0f ml in %.1f s", right, left, dt)
    assert 3000 < right + left < 8000
    assert 0.55 * left < right < left
    lab = lungs.labels.array
    for p in LIDC_OPACIFIED_RIGHT_UPPER:
        k, r, c = np.round(ct.lps_to_index([p])[0]).astype(int)
        assert -100 < ct.array[k, r, c] < 150  # dense ...
        assert lab[k, r, c] == LUNG_LABELS[Side.RIGHT], f"opacified lung at {p} left out"
    for name, p in LIDC_NOT_LUNG.items():
        k, r, c = np.round(ct.lps_to_index([p])[0]).astype(int)
        assert not lab[k, r - 3:r + 4, c - 3:c + 4].any(), f"{name} labelled lung"
    assert lung_mask_warnings(lungs) == ()
    for side, sign in ((Side.LEFT, 1.0), (Side.RIGHT, -1.0)):
        x = ct.index_to_lps(np.argwhere(lungs.mask(side)[::4, ::4, ::4]).mean(axis=0) * 4)[0, 0]
        assert (x - ct.index_to_lps(np.array(ct.shape) / 2)[0, 0]) * sign > 30
    print(f"lungs on LIDC: {dt:.1f} s")  # a figure, not a test: benchmarks judge speed


@pytest.mark.slow
@pytest.mark.shared_data
def test_lidc_without_mirror_recovery_is_flagged(shared_data: Path) -> None:
    """The threshold-only mask (opacified right upper lung left out) is caught by the QA."""
    lungs = segment_lungs(read_lidc(shared_data),
                          LungsConfig(method="classical", mirror_recovery=False))
    assert lung_mask_warnings(lungs) == ("lung-asymmetry:right=0.49",)


def test_bounding_box_matches_find_objects() -> None:
    from scipy import ndimage as ndi

    from pipeline.artefacts import bounding_box

    rng = np.random.default_rng(7)
    for _ in range(20):
        m = np.zeros((9, 11, 13), dtype=np.uint8)
        pts = rng.integers(0, (9, 11, 13), size=(int(rng.integers(1, 5)), 3))
        m[tuple(pts.T)] = rng.integers(1, 3)
        assert bounding_box(m) == ndi.find_objects((m > 0).astype(np.uint8))[0]
        box = ndi.find_objects((m > 0).astype(np.uint8))[0]
        wider = bounding_box(m > 0, margin=(0, 2, 1))
        assert wider is not None and wider[0] == box[0]
        assert wider[1] == slice(max(0, box[1].start - 2), min(11, box[1].stop + 2))
        assert wider[2] == slice(max(0, box[2].start - 1), min(13, box[2].stop + 1))
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool)) is None
