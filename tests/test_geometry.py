"""Grid, the one home of the voxel <-> LPS geometry: round trips on flipped, oblique and
sheared grids, crops and block-mean grids against brute force, and Volume's delegation."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
from geometry import make_affine, rotation

from pipeline.artefacts import Grid, Volume
from pipeline.lungs import block_mean
from pipeline.phantom.model import make_grid

SHAPE = (7, 11, 13)


def _affines() -> dict[str, npt.NDArray[np.float64]]:
    """Axial, flipped (every axis reversed), oblique, a transposed in-plane order, a reversed
    stack, and a sheared (gantry-tilt-like) grid."""
    sheared = make_affine(pixel=(0.7, 0.7), step=2.5)
    sheared[:3, 0] += np.array([0.0, 0.17, 0.0])  # the stack leans about 4 degrees
    return {
        "axial": make_grid(SHAPE, (2.5, 0.8, 0.7), "axial"),
        "flipped": make_grid(SHAPE, (2.5, 0.8, 0.7), "flipped"),
        "oblique": make_grid(SHAPE, (1.25, 0.6, 0.9), "oblique", in_plane_deg=17.0,
                             out_of_plane_deg=23.0),
        "transposed": make_affine((0, 1, 0), (1, 0, 0), pixel=(0.9, 0.6), step=3.0),
        "reversed-oblique": make_affine(pixel=(0.75, 0.8), step=1.0, reverse=True,
                                        frame=rotation((1, 2, 3), 31.0)),
        "sheared": sheared,
    }


AFFINES = _affines()


@pytest.fixture(params=sorted(AFFINES))
def grid(request: pytest.FixtureRequest) -> Grid:
    return Grid(SHAPE, AFFINES[request.param])


def _all_indices(shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    return np.argwhere(np.ones(shape, dtype=bool)).astype(np.float64)


def _brute_lps(affine: npt.NDArray[np.float64], kji: npt.NDArray[np.float64]
               ) -> npt.NDArray[np.float64]:
    """affine @ (k, r, c, 1), one point at a time."""
    return np.array([(affine @ np.r_[p, 1.0])[:3] for p in kji])


# --------------------------------------------------------------------------- index <-> LPS


def test_index_to_lps_is_the_affine_on_the_homogeneous_index(grid: Grid) -> None:
    kji = _all_indices(SHAPE)
    np.testing.assert_allclose(grid.index_to_lps(kji), _brute_lps(grid.affine, kji),
                               rtol=0, atol=1e-9)
    # one point, as a plain sequence, gives one row
    assert grid.index_to_lps([1, 2, 3]).shape == (1, 3)


def test_round_trip_index_lps_index(grid: Grid) -> None:
    rng = np.random.default_rng(13)
    kji = rng.uniform(-2.0, 15.0, size=(500, 3))  # fractional, also outside the grid
    back = grid.lps_to_index(grid.index_to_lps(kji))
    np.testing.assert_allclose(back, kji, rtol=0, atol=1e-9)
    xyz = rng.uniform(-300.0, 300.0, size=(500, 3))
    np.testing.assert_allclose(grid.index_to_lps(grid.lps_to_index(xyz)), xyz, rtol=0,
                               atol=1e-9)


def test_spacing_direction_origin_and_voxel_volume(grid: Grid) -> None:
    a = grid.affine[:3, :3]
    for j in range(3):  # the distance between neighbours along each axis
        p = grid.index_to_lps([[2, 3, 4], [2 + (j == 0), 3 + (j == 1), 4 + (j == 2)]])
        assert grid.spacing[j] == pytest.approx(float(np.linalg.norm(p[1] - p[0])), abs=1e-12)
        np.testing.assert_allclose(grid.direction[:, j] * grid.spacing[j], a[:, j], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(grid.direction, axis=0), 1.0, atol=1e-12)
    np.testing.assert_array_equal(grid.origin, grid.index_to_lps([0, 0, 0])[0])
    # the volume of the parallelepiped spanned by the three steps (a sheared grid's voxel is
    # smaller than the product of its spacings)
    assert grid.voxel_volume_ml == pytest.approx(abs(np.linalg.det(a)) / 1000.0, rel=1e-12)


def test_lps_coordinate_is_the_lps_of_every_voxel(grid: Grid) -> None:
    kji = _all_indices(SHAPE)
    lps = _brute_lps(grid.affine, kji)
    box = (slice(1, 6), slice(2, 9), slice(4, 13))
    for axis in range(3):
        full = grid.lps_coordinate(axis)
        assert full.shape == SHAPE and full.dtype == np.float64
        np.testing.assert_allclose(full.ravel(), lps[:, axis], rtol=0, atol=1e-9)
        part = grid.lps_coordinate(axis, box)
        np.testing.assert_array_equal(part, full[box])  # the same numbers, bit for bit
        part32 = grid.lps_coordinate(axis, box, np.float32)
        assert part32.dtype == np.float32
        np.testing.assert_allclose(part32, full[box], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="unit steps"):
        grid.lps_coordinate(0, (slice(None), slice(None, None, 2), slice(None)))


def test_left_stays_left() -> None:
    """Patient left is +x in LPS whatever the array order: on the flipped grid the column
    index runs to patient right, and crops and block means keep that."""
    axial, flipped = Grid(SHAPE, AFFINES["axial"]), Grid(SHAPE, AFFINES["flipped"])
    for g, sign in ((axial, 1.0), (flipped, -1.0)):
        left_of = g.index_to_lps([3, 5, 12])[0, 0] - g.index_to_lps([3, 5, 0])[0, 0]
        assert np.sign(left_of) == sign
        for derived in (g.crop((slice(1, 5), slice(2, 9), slice(3, 12))),
                        g.downsample((1, 2, 3)), g.crop((slice(None),) * 2 + (slice(1, None, 2),))):
            np.testing.assert_allclose(derived.direction, g.direction, atol=1e-12)
            d = derived.index_to_lps([0, 0, 1])[0, 0] - derived.index_to_lps([0, 0, 0])[0, 0]
            assert np.sign(d) == sign


# --------------------------------------------------------------------------- derived grids


BOXES = [
    (slice(0, 7), slice(0, 11), slice(0, 13)),  # all of it
    (slice(2, 5), slice(3, 10), slice(1, 2)),
    (slice(None), slice(4, None), slice(None, -3)),  # open and negative bounds
    (slice(1, 7, 2), slice(0, 11, 3), slice(5, 13, 4)),  # every n-th voxel
    (slice(3, 99), slice(-4, None), slice(0, 13, 5)),  # bounds beyond the grid, as numpy
]


@pytest.mark.parametrize("box", BOXES, ids=[str(i) for i in range(len(BOXES))])
def test_crop_against_brute_force(grid: Grid, box: tuple[slice, ...]) -> None:
    whole = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    sub = whole[box]
    cropped = grid.crop(box)
    assert cropped.shape == sub.shape
    # voxel i of the crop is the voxel of the full grid that array[box] puts there
    full_idx = np.stack(np.unravel_index(sub.ravel(), SHAPE), axis=1).astype(np.float64)
    np.testing.assert_allclose(cropped.index_to_lps(_all_indices(sub.shape)),
                               _brute_lps(grid.affine, full_idx), rtol=0, atol=1e-9)


def test_crop_refuses_what_is_no_box(grid: Grid) -> None:
    with pytest.raises(ValueError, match="empty"):
        grid.crop((slice(3, 3), slice(None), slice(None)))
    with pytest.raises(ValueError, match="positive steps"):
        grid.crop((slice(None, None, -1), slice(None), slice(None)))
    with pytest.raises(ValueError, match="three slices"):
        grid.crop((slice(None), slice(None)))


FACTORS = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 4), (3, 5, 2), (7, 11, 13), (1, 6, 6)]


@pytest.mark.parametrize("f", FACTORS, ids=["x".join(map(str, f)) for f in FACTORS])
def test_downsample_is_the_grid_of_block_means(grid: Grid, f: tuple[int, int, int]) -> None:
    """The down-sampled grid's voxels lie at the mean LPS position of their block's voxels
    (the block centres, half a block minus half a voxel past the block's first voxel), and
    its shape is that of ``block_mean`` (rounded up: the last block is edge-padded)."""
    coarse = grid.downsample(f)
    assert coarse.shape == block_mean(np.zeros(SHAPE, dtype=np.float32), f).shape
    full = [grid.lps_coordinate(a) for a in range(3)]
    for idx in itertools.product(*(range(n) for n in coarse.shape)):
        lo = [i * b for i, b in zip(idx, f, strict=True)]
        if any(s + b > n for s, b, n in zip(lo, f, SHAPE, strict=True)):
            continue  # a padded block: its mean is not its centre
        block = tuple(slice(s, s + b) for s, b in zip(lo, f, strict=True))
        want = [float(full[a][block].mean()) for a in range(3)]
        np.testing.assert_allclose(coarse.index_to_lps(idx)[0], want, rtol=0, atol=1e-9)
    for a in range(3):  # and the block mean of each LPS coordinate map, on the full blocks
        means = block_mean(full[a], f)
        whole = tuple(slice(0, n // b) for n, b in zip(SHAPE, f, strict=True))
        np.testing.assert_allclose(coarse.lps_coordinate(a)[whole], means[whole], rtol=0,
                                   atol=1e-3)  # block_mean sums in float32
    np.testing.assert_allclose(coarse.spacing, np.multiply(grid.spacing, f), rtol=1e-12)
    assert coarse.voxel_volume_ml == pytest.approx(grid.voxel_volume_ml * np.prod(f),
                                                   rel=1e-12)


def test_downsample_keeps_the_exact_block_centre_formula() -> None:
    """The lung and lesion stages' results depend on the block-mean grid to the last bit:
    column j scaled by f_j, origin moved by the affine times (f - 1) / 2."""
    a = AFFINES["oblique"]
    f = (1, 3, 2)
    fa = np.asarray(f, dtype=np.float64)
    want = a.copy()
    want[:3, :3] = a[:3, :3] * fa
    want[:3, 3] = a[:3, :3] @ ((fa - 1.0) / 2.0) + a[:3, 3]
    np.testing.assert_array_equal(Grid(SHAPE, a).downsample(f).affine, want)


def test_downsample_refuses_bad_factors(grid: Grid) -> None:
    for bad in ((0, 1, 1), (1, 2), (1, -2, 1)):
        with pytest.raises(ValueError, match="three factors"):
            grid.downsample(bad)  # type: ignore[arg-type]


def test_crop_then_downsample_is_the_block_means_of_the_crop(grid: Grid) -> None:
    """What the density lesion detector works on: block means of a box of the CT."""
    box = (slice(1, 6), slice(2, 11), slice(3, 10))
    f = (1, 2, 3)
    work = grid.crop(box).downsample(f)
    assert work.shape == block_mean(np.zeros(SHAPE, dtype=np.float32)[box], f).shape
    first = [b.start + (n - 1) / 2.0 for b, n in zip(box, f, strict=True)]
    np.testing.assert_allclose(work.origin, grid.index_to_lps(first)[0], rtol=0, atol=1e-9)


def test_resampled_maps_through_the_index_map(grid: Grid) -> None:
    m = np.eye(4)
    m[1, 1], m[1, 3] = 0.5, 0.25  # a finer grid, half-pixel centres
    m[2, 2], m[2, 3] = 0.5, 0.25
    fine = grid.resampled(m, (SHAPE[0], 22, 26))
    assert fine.shape == (SHAPE[0], 22, 26)
    idx = _all_indices(fine.shape)
    np.testing.assert_allclose(fine.index_to_lps(idx),
                               grid.index_to_lps(np.c_[idx, np.ones(len(idx))] @ m[:3].T),
                               rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- the type


def test_grid_is_frozen_and_compares_by_value() -> None:
    a = AFFINES["oblique"].copy()
    g = Grid(SHAPE, a)
    a[0, 3] += 1.0  # the caller's array is not the grid's
    assert g.affine[0, 3] == AFFINES["oblique"][0, 3]
    with pytest.raises(ValueError):
        g.affine[0, 0] = 1.0  # read-only
    assert g == Grid(SHAPE, AFFINES["oblique"]) and hash(g) == hash(Grid(SHAPE,
                                                                          AFFINES["oblique"]))
    assert g != Grid(SHAPE, a) and g != Grid((7, 11, 14), AFFINES["oblique"])
    assert isinstance(g.shape[0], int)
    with pytest.raises(ValueError, match="4x4"):
        Grid(SHAPE, np.eye(3))
    with pytest.raises(ValueError, match="3-D shape"):
        Grid((7, 0, 3), np.eye(4))


def test_volume_geometry_is_its_grid(grid: Grid) -> None:
    v = Volume(np.zeros(SHAPE, dtype=np.int16), np.array(grid.affine))
    assert v.grid == grid
    assert v.spacing == grid.spacing and v.voxel_volume_ml == grid.voxel_volume_ml
    np.testing.assert_array_equal(v.direction, grid.direction)
    np.testing.assert_array_equal(v.origin, grid.origin)
    pts = _all_indices(SHAPE)[::7]
    np.testing.assert_array_equal(v.index_to_lps(pts), grid.index_to_lps(pts))
    np.testing.assert_array_equal(v.lps_to_index(v.index_to_lps(pts)),
                                  grid.lps_to_index(grid.index_to_lps(pts)))
    for a in range(3):
        np.testing.assert_array_equal(v.lps_grid(a), grid.lps_coordinate(a))
    assert v.with_array(np.ones(SHAPE, dtype=np.uint8)).grid == grid
