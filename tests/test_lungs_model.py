"""The learned lung segmenter: input recipe, geometry, real CT, series without lungs."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tiers import quick_one

from pipeline.artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Side, Volume
from pipeline.config import LungsConfig
from pipeline.errors import NotAnalysable
from pipeline.lungs import ClassicalLungSegmenter, LearnedLungSegmenter, segmenter_for
from pipeline.phantom.model import LUNG_CENTRES, LesionSpec, PhantomSpec, make_grid, render
from pipeline.representation import (
    canonical_inplane,
    crop_input,
    from_canonical,
    low_grid_to_index,
    ma20_input,
    to_canonical,
)

log = logging.getLogger(__name__)
MODEL = Path(__file__).resolve().parents[1] / "models" / "ctscreen-lungs-unet2d"
SHAPE = (110, 160, 160)
SPACING = (2.5, 2.2, 2.2)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def _dihedral() -> list[npt.NDArray[np.float64]]:
    """The 8 in-plane orientations of an axial slice as direction matrices (k = +z)."""
    out = []
    for transpose, sr, sc in itertools.product((False, True), (1, -1), (1, -1)):
        r, c = np.array([0.0, sr, 0.0]), np.array([sc, 0.0, 0.0])
        if transpose:
            r, c = np.array([sc, 0.0, 0.0]), np.array([0.0, sr, 0.0])
        out.append(np.stack([np.array([0.0, 0.0, 1.0]), r, c], axis=1))
    return out


@pytest.mark.parametrize("direction", _dihedral())
def test_canonical_view_puts_posterior_down_and_left_right(direction) -> None:  # type: ignore[no-untyped-def]
    """Whatever the stored orientation, the canonical view's rows run towards P and its
    columns towards the patient's left; and the inverse restores the array."""
    shape = (2, 6, 9)
    aff = np.eye(4)
    aff[:3, :3] = direction
    vol = Volume(np.zeros(shape), aff)
    y, x = vol.lps_grid(1), vol.lps_grid(0)
    how = canonical_inplane(vol.direction)
    yc, xc = to_canonical(y, how), to_canonical(x, how)
    assert np.all(np.diff(yc, axis=1) > 0) and np.all(np.diff(xc, axis=2) > 0)
    a = np.arange(np.prod(shape)).reshape(shape)
    assert np.array_equal(from_canonical(to_canonical(a, how), how), a)


@pytest.mark.parametrize("direction", _dihedral())
@pytest.mark.parametrize("shape_rc", [(64, 64), (48, 80)])
def test_network_grid_maps_to_the_right_voxels(direction, shape_rc) -> None:  # type: ignore[no-untyped-def]
    """A bright square in the stored slice lands, through the recipe, on the network-grid
    pixels that low_grid_to_index maps back onto it."""
    aff = np.eye(4)
    aff[:3, :3] = direction
    arr = np.full((1, *shape_rc), -1000.0, np.float32)
    arr[0, 10:18, 20:30] = 500.0
    how = canonical_inplane(Volume(arr, aff).direction)
    img = ma20_input(to_canonical(arr, how), size=32).astype(np.float32)
    bright = np.argwhere(img[0] > img[0].mean() + 2 * img[0].std())
    m = low_grid_to_index(shape_rc, how, 32)
    idx = np.c_[np.zeros(len(bright)), bright, np.ones(len(bright))] @ m.T
    r, c = idx[:, 1].mean(), idx[:, 2].mean()
    assert abs(r - 13.5) < 2.5 and abs(c - 24.5) < 2.5, (r, c)


def test_crop_input_tiles_follow_physical_size() -> None:
    crop = np.random.default_rng(0).normal(-700, 100, (200, 300)).astype(np.float32)
    img, px = crop_input(crop, (1.5, 1.5))
    assert img.dtype == np.uint8 and abs(px - 360 / 256) < 1e-9
    assert img.shape == (round(200 * 1.5 / px), round(300 * 1.5 / px))


# ----------------------------------------------------------------- the committed model

needs_model = pytest.mark.skipif(not (MODEL / "model.yaml").is_file(),
                                 reason=f"no trained lung model at {MODEL}")


# the lung model with an infection class (lesions.detector lung-model) must hold the same
# lung checks on real CT; it is the slow tier's
INFECTION_MODEL = MODEL.parent / "ctscreen-lungs-infection-unet2d"


@pytest.fixture(scope="module", params=[MODEL, pytest.param(INFECTION_MODEL,
                                                            marks=pytest.mark.slow)],
                ids=["lungs", "lungs-infection"])
def learned(request: pytest.FixtureRequest) -> LearnedLungSegmenter:
    model = request.param
    if not (model / "model.yaml").is_file():
        pytest.skip(f"no trained lung model at {model}")
    seg = segmenter_for(LungsConfig(method="model", model=str(model), cross_check=False))
    assert isinstance(seg, LearnedLungSegmenter)
    return seg


@pytest.fixture(scope="module")
def lidc(shared_data: Path) -> Volume:
    from pipeline.train.dataset import read_dicom_series

    return read_dicom_series(shared_data / "chest-ct" / "lidc-idri-0314")[0]


@pytest.mark.slow
@pytest.mark.shared_data
def test_lidc_lungs_left_is_left_in_any_orientation(learned, lidc, request) -> None:  # type: ignore[no-untyped-def]
    """Real CT: both lungs, plausible volumes, right lung at smaller LPS x; the same series
    stored mirrored (columns reversed, affine adjusted) gives the mirrored labels: left
    stays left."""
    if learned.infection:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=(
            "known limit of ctscreen-lungs-infection-unet2d 1.0.0: without the cross-check it "
            "leaves part of LIDC-IDRI-0314's opacified right upper lobe out (right lung 927 ml)")))
    masks = learned(lidc)
    lab = masks.labels.array
    ml = {s: np.count_nonzero(lab == LUNG_LABELS[s]) * lidc.voxel_volume_ml for s in Side}
    log.info("LIDC-IDRI-0314 learned lungs: %s ml", {k: round(v) for k, v in ml.items()})
    assert 1000 < ml[Side.RIGHT] < 3500 and 1000 < ml[Side.LEFT] < 3500
    x = {s: lidc.index_to_lps(np.argwhere(lab[::8] == LUNG_LABELS[s]).mean(axis=0)
                              * np.array([8, 1, 1]))[0, 0] for s in Side}
    assert x[Side.RIGHT] < x[Side.LEFT]
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = lidc.shape[2] - 1
    mirrored = Volume(np.ascontiguousarray(lidc.array[:, :, ::-1]), lidc.affine @ flip)
    lab2 = learned(mirrored).labels.array[:, :, ::-1]
    for s in Side:
        d = dice(lab == LUNG_LABELS[s], lab2 == LUNG_LABELS[s])
        assert d > 0.99, f"{s}: Dice {d:.4f} between the series and its mirrored copy"


@pytest.mark.slow
@pytest.mark.shared_data
def test_lidc_agrees_with_classical_and_marks_nothing_below_the_lungs(learned, lidc) -> None:  # type: ignore[no-untyped-def]
    classical = ClassicalLungSegmenter(LungsConfig())(lidc).labels.array
    lab = learned(lidc).labels.array
    d = dice(lab > 0, classical > 0)
    log.info("LIDC-IDRI-0314: learned vs classical lung Dice %.3f", d)
    assert d > 0.9
    empty = ~(classical > 0).any(axis=(1, 2))
    below = np.nonzero(empty)[0]
    ml = np.count_nonzero(lab[below] > 0) * lidc.voxel_volume_ml
    assert below.size > 20 and ml < 1.0, f"{ml:.2f} ml marked on {below.size} slices without lung"


@pytest.mark.slow
@pytest.mark.shared_data
def test_series_without_lungs_is_refused(learned, lidc) -> None:  # type: ignore[no-untyped-def]
    """LIDC-IDRI-0314's upper abdomen on its own (the slices below the lung bases)."""
    classical = ClassicalLungSegmenter(LungsConfig())(lidc).labels.array
    below = np.nonzero(~(classical > 0).any(axis=(1, 2)))[0]
    sub = Volume(np.ascontiguousarray(lidc.array[below]),
                 lidc.affine @ _shift_k(int(below[0])))
    with pytest.raises(NotAnalysable) as e:
        learned(sub)
    assert e.value.code == "no-lungs-found"


@pytest.mark.shared_data
def test_abdominal_j2k_series_marks_under_1ml_per_lungless_slice(learned, shared_data) -> None:  # type: ignore[no-untyped-def]
    """The JPEG 2000 upper-abdomen series (never trained on): on the slices where the
    classical method finds no lung the segmenter's mask holds under 1 ml in all."""
    from pipeline.train.dataset import read_dicom_series

    ct = read_dicom_series(shared_data / "codecs" / "j2k-lossless-series")[0]
    seg = LearnedLungSegmenter(replace(learned.config, min_lung_volume_ml=0.0))
    lab = seg(ct).labels.array
    classical = ClassicalLungSegmenter(LungsConfig(min_lung_volume_ml=0.0))(ct).labels.array
    empty = np.nonzero(~(classical > 0).any(axis=(1, 2)))[0]
    per_slice = [np.count_nonzero(lab[k]) * ct.voxel_volume_ml for k in empty]
    log.info("j2k series: %d slices without lung, at most %.2f ml marked on one", len(empty),
             max(per_slice, default=0.0))
    assert len(empty) >= 5 and max(per_slice) < 1.0


def _shift_k(k0: int) -> npt.NDArray[np.float64]:
    m = np.eye(4)
    m[0, 3] = k0
    return m


@needs_model
@pytest.mark.parametrize("orient", quick_one(["axial", "flipped", "oblique"], "oblique"))
def test_phantom_lobar_consolidation_stays_in_its_lung(orient) -> None:  # type: ignore[no-untyped-def]
    """A dense upper-lobe consolidation of the right lung is kept inside the right lung by
    the configured segmenter (the model with its classical cross-check, whose dense lung
    joins the model's mask); the model alone leaves this homogeneous phantom blob out."""
    learned = segmenter_for(LungsConfig(method="model", model=str(MODEL)))
    cx, cy, _ = LUNG_CENTRES[Side.RIGHT]
    les = LesionSpec(LesionKind.CONSOLIDATION, (cx, cy, 95.0), (45.0, 40.0, 45.0))
    thickness = 2.5 if orient == "oblique" else None
    ct, truth = render(PhantomSpec(lesions=(les,)), make_grid(SHAPE, SPACING, orient), SHAPE,
                       thickness)
    lungs = learned(ct)
    cons = truth.lesions.array == LESION_LABELS[LesionKind.CONSOLIDATION]
    frac = np.count_nonzero(cons & lungs.mask(Side.RIGHT)) / np.count_nonzero(cons)
    for s in Side:
        d = dice(lungs.mask(s), truth.lungs.array == LUNG_LABELS[s])
        log.info("%s phantom %s lung Dice %.3f; consolidation inside %.1f%%", orient, s, d,
                 100 * frac)
        assert d > 0.88, f"{orient} {s}: Dice {d:.3f}"
    assert frac > 0.8
    alone = LearnedLungSegmenter(LungsConfig(method="model", model=str(MODEL),
                                             cross_check=False))(ct)
    assert np.count_nonzero(cons & alone.mask(Side.RIGHT)) / np.count_nonzero(cons) < frac


def test_body_excludes_the_air_around_the_patient_not_the_lungs() -> None:
    from pipeline.lungs import _body_slice

    rr, cc = np.mgrid[:128, :128]
    hu = np.full((128, 128), -1000.0)
    body = ((rr - 64) / 50.0) ** 2 + ((cc - 64) / 58.0) ** 2 <= 1
    hu[body] = 40.0
    lung = ((rr - 60) / 25.0) ** 2 + ((cc - 40) / 12.0) ** 2 <= 1
    hu[lung] = -850.0
    got = _body_slice(hu)
    assert got[lung].all()  # the lung is inside the body
    assert not got[~ndi_dilate(body, 2)].any()  # the air around it is not
    assert not got[5, 5] and not got[120, 64]


def ndi_dilate(m: npt.NDArray[np.bool_], n: int) -> npt.NDArray[np.bool_]:
    from scipy import ndimage as ndi

    return np.asarray(ndi.binary_dilation(m, iterations=n))


@needs_model
def test_model_lung_never_lies_outside_the_body() -> None:
    """The phantom's air around the body (its table gap included) is never lung."""
    from pipeline.lungs import _body_slice

    ct, _ = render(PhantomSpec(), make_grid(SHAPE, SPACING, "axial"), SHAPE)
    lab = LearnedLungSegmenter(LungsConfig(method="model", model=str(MODEL),
                                           cross_check=False))(ct).labels.array
    assert lab.any()
    for k in range(0, SHAPE[0], 5):
        body = _body_slice(ct.array[k])
        assert not (lab[k] > 0)[~body].any(), k


def test_pseudo_hu_maps_lung_and_soft_tissue_anchors() -> None:
    from pipeline.representation import ma20_pseudo_hu

    img = np.full((1, 64, 64), 10, np.uint8)  # outside the body
    img[0, 8:56, 8:56] = 180  # soft tissue
    img[0, 16:48, 12:30] = 50  # lung
    img[0, 40:48, 12:30] = 120  # a lesion in the lung's lower part
    lung = np.zeros((1, 64, 64), bool)
    lung[0, 16:48, 12:30] = True
    hu = ma20_pseudo_hu(img, lung)
    assert hu[0, 20, 20] == pytest.approx(-860.0, abs=1.0)
    assert hu[0, 10, 40] == pytest.approx(40.0, abs=1.0)
    assert -860.0 < hu[0, 44, 20] < 40.0  # the lesion lies between lung and soft tissue
    assert hu[0, 0, 0] < -900.0  # air
