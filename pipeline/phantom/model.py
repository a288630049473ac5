"""An analytic chest phantom defined in patient coordinates (DICOM LPS, mm).

The phantom is a set of analytic shapes (elliptic body cylinder with a fat layer, two
ellipsoid-like lungs, a heart that indents the left lung, trachea and main bronchi, a tree
of vessels, spine, sternum and ribs) plus inserted lesions (ground-glass opacity and
consolidation ellipsoids at given LPS centres).  Because it lives in patient space it can be
sampled on *any* grid: axial, flipped, oblique, any spacing, and a slice thickness larger
than the spacing is simulated by averaging sub-samples along the slice normal.

``render`` returns the CT volume (int16 HU) and a :class:`PhantomTruth` with the lung label
volume (``LUNG_LABELS``), the lesion label volume (``LESION_LABELS``) and, per lesion, the
inserted volume inside the lungs computed on a fine (0.4 mm) grid independent of the
sampling grid.

Patient LEFT is +x, POSTERIOR is +y, SUPERIOR is +z; the phantom's centre is LPS (0, 0, 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Side, Volume

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Vec3 = tuple[float, float, float]

# --------------------------------------------------------------------------- anatomy (mm)

BODY_RADII = (160.0, 125.0)  # x, y semi-axes of the elliptic body cylinder
FAT_RHO = 0.92  # normalised body radius beyond which tissue is subcutaneous fat
RIB_RHO = (0.865, 0.915)  # normalised radius band occupied by the ribs
LUNG_CENTRES: dict[Side, Vec3] = {Side.RIGHT: (-70.0, 5.0, 0.0), Side.LEFT: (70.0, 5.0, 0.0)}
LUNG_RADII = (60.0, 75.0, 125.0)
HEART_CENTRE = (20.0, -28.0, -45.0)
HEART_RADII = (50.0, 45.0, 50.0)
SPINE_CENTRE_XY = (0.0, 92.0)
SPINE_RADIUS = 18.0
STERNUM = ((0.0, -112.0), (15.0, 6.0), (-80.0, 100.0))  # centre xy, radii xy, z range
CARINA = (0.0, 10.0, 70.0)
TRACHEA_TOP = (0.0, 10.0, 450.0)
BRONCHUS_ENDS: dict[Side, Vec3] = {Side.RIGHT: (-45.0, 10.0, 30.0), Side.LEFT: (45.0, 10.0, 30.0)}
TRACHEA_RADII = (10.0, 8.0)  # outer (wall), inner (lumen)
BRONCHUS_RADII = (8.0, 6.0)

HU_AIR = -1000.0
HU_TISSUE = 40.0
HU_FAT = -100.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
HU_BONE = 600.0
HU_SPINE = 450.0
HU_GGO = -600.0
HU_CONSOLIDATION = 15.0
TEXTURE_AMPLITUDE = {LesionKind.GGO: 45.0, LesionKind.CONSOLIDATION: 15.0}


@dataclass(frozen=True)
class LesionSpec:
    """One inserted lesion: an ellipsoid (axis-aligned in LPS) of one kind, clipped to the lungs."""

    kind: LesionKind
    centre_lps: Vec3
    radii_mm: Vec3


def default_lesions() -> tuple[LesionSpec, ...]:
    """Three lesions at typical COVID-19 sites.

    1. a ground-glass opacity, right lower zone, posterior and peripheral;
    2. a consolidation in the LEFT lung touching the lateral costal pleura (subpleural; part
       of the ellipsoid lies in the chest wall and is not inserted);
    3. a small ground-glass opacity, left upper zone, anterior.
    """
    return (
        LesionSpec(LesionKind.GGO, (-95.0, 35.0, -45.0), (18.0, 22.0, 20.0)),
        LesionSpec(LesionKind.CONSOLIDATION, (118.0, 20.0, -20.0), (15.0, 20.0, 18.0)),
        LesionSpec(LesionKind.GGO, (80.0, -30.0, 70.0), (12.0, 12.0, 12.0)),
    )


def lung_surface_point(side: Side, direction: Vec3, depth_mm: float = 0.0) -> Vec3:
    """The point of ``side``'s lung ellipsoid surface seen from its centre in ``direction``
    (LPS), moved ``depth_mm`` back towards the centre: where a subpleural lesion sits."""
    c, r = np.asarray(LUNG_CENTRES[side]), np.asarray(LUNG_RADII)
    u = np.asarray(direction, dtype=np.float64)
    u /= np.linalg.norm(u)
    t = 1.0 / math.sqrt(float(np.sum((u / r) ** 2))) - depth_mm
    p = c + t * u
    return (float(p[0]), float(p[1]), float(p[2]))


def subpleural_ggo_lesions() -> tuple[LesionSpec, ...]:
    """Bilateral, multifocal, peripheral ground glass: the RSNA "typical" appearance.

    Five ground-glass ellipsoids, each centred 6 mm under the costal pleura (the outer part
    of each ellipsoid lies in the chest wall and is not inserted): right lower posterior,
    right upper lateral, right middle anterior, left lower posterior, left middle lateral.
    """
    where = (
        (Side.RIGHT, (-0.6, 0.8, -0.45)),
        (Side.RIGHT, (-1.0, 0.1, 0.55)),
        (Side.RIGHT, (-0.7, -0.7, 0.0)),
        (Side.LEFT, (0.6, 0.8, -0.5)),
        (Side.LEFT, (1.0, -0.2, 0.15)),
    )
    return tuple(
        LesionSpec(LesionKind.GGO, lung_surface_point(side, d, 6.0), (16.0, 16.0, 20.0))
        for side, d in where
    )


def central_ggo_lesions() -> tuple[LesionSpec, ...]:
    """Bilateral perihilar (central) ground glass, far from the costal pleura: the RSNA
    "indeterminate" appearance (ground glass without the typical peripheral distribution)."""
    return (
        LesionSpec(LesionKind.GGO, (-42.0, 12.0, 15.0), (14.0, 18.0, 20.0)),
        LesionSpec(LesionKind.GGO, (-50.0, 20.0, -25.0), (14.0, 16.0, 16.0)),
        LesionSpec(LesionKind.GGO, (42.0, 18.0, 20.0), (14.0, 18.0, 20.0)),
    )


def lobar_consolidation_lesions() -> tuple[LesionSpec, ...]:
    """One dense consolidation filling the upper part of the right lung (an upper-lobe-like
    region, apex to about 25 mm above the lung's equator, costal to mediastinal surface):
    unilateral lobar consolidation, which the RSNA statement calls "atypical"."""
    return (LesionSpec(LesionKind.CONSOLIDATION, (-70.0, 5.0, 95.0), (70.0, 85.0, 70.0)),)


@dataclass(frozen=True)
class PhantomSpec:
    """What to render.  ``seed`` drives the image noise; ``anatomy_seed`` the vessel tree
    and the lesion textures (so that the anatomy is the same for every noise seed)."""

    lesions: tuple[LesionSpec, ...] = field(default_factory=default_lesions)
    seed: int = 0
    anatomy_seed: int = 7
    noise_hu: float = 12.0
    vessels: bool = True


@dataclass(frozen=True, eq=False)
class PhantomTruth:
    """Ground truth on the rendered grid, plus analytic per-lesion figures."""

    lungs: Volume  # uint8, LUNG_LABELS (1 right, 2 left)
    lesions: Volume  # uint8, LESION_LABELS (1 GGO, 2 consolidation)
    lesion_ml: tuple[float, ...]  # inserted volume inside the lungs, per spec.lesions
    lesion_sides: tuple[Side, ...]  # the lung holding most of each lesion

    def lung_ml(self, side: Side | None = None) -> float:
        """Volume of the labelled lung(s) on the grid."""
        a = self.lungs.array
        n = np.count_nonzero(a > 0) if side is None else np.count_nonzero(a == LUNG_LABELS[side])
        return float(n * self.lungs.voxel_volume_ml)


# --------------------------------------------------------------------------- grids

Orientation = Literal["axial", "flipped", "oblique"]


def _rot(axis: int, deg: float) -> npt.NDArray[np.float64]:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def make_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: Orientation = "axial",
    centre_lps: Vec3 = (0.0, 0.0, 0.0),
    in_plane_deg: float = 10.0,
    out_of_plane_deg: float = 5.0,
) -> npt.NDArray[np.float64]:
    """A 4x4 affine (k, r, c, 1) -> LPS whose grid centre lies at ``centre_lps``.

    ``shape`` and ``spacing`` are (k, r, c) = (slices, rows, columns).

    - ``axial``: columns run to patient left (+x), rows to posterior (+y), slices to
      superior (+z) — IOP (1, 0, 0, 0, 1, 0);
    - ``flipped``: IOP (-1, 0, 0, 0, -1, 0) and slices running inferior (-z);
    - ``oblique``: axial rotated ``in_plane_deg`` about z, then ``out_of_plane_deg`` about x.
    """
    dir_c = np.array([1.0, 0.0, 0.0])
    dir_r = np.array([0.0, 1.0, 0.0])
    dir_k = np.array([0.0, 0.0, 1.0])
    if orientation == "flipped":
        dir_c, dir_r, dir_k = -dir_c, -dir_r, -dir_k
    elif orientation == "oblique":
        rot = _rot(0, out_of_plane_deg) @ _rot(2, in_plane_deg)
        dir_c, dir_r, dir_k = rot @ dir_c, rot @ dir_r, rot @ dir_k
    elif orientation != "axial":
        raise ValueError(f"orientation: expected axial, flipped or oblique, got {orientation!r}")
    m = np.column_stack([dir_k * spacing[0], dir_r * spacing[1], dir_c * spacing[2]])
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = np.asarray(centre_lps, dtype=np.float64) - m @ half
    return affine


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Tube:
    a: npt.NDArray[np.float64]
    b: npt.NDArray[np.float64]
    radius: float

    def bounds(self, pad: float = 0.0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        r = self.radius + pad
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r


def _tube_dist(x: F32, y: F32, z: F32, a: npt.NDArray[np.float64],
               b: npt.NDArray[np.float64]) -> F32:
    """Distance of each point to the segment a-b."""
    d = b - a
    length2 = float(d @ d)
    px, py, pz = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
    t = (px * np.float32(d[0]) + py * np.float32(d[1]) + pz * np.float32(d[2]))
    t /= np.float32(length2)
    np.clip(t, 0.0, 1.0, out=t)
    px -= t * np.float32(d[0])
    py -= t * np.float32(d[1])
    pz -= t * np.float32(d[2])
    return np.asarray(np.sqrt(px * px + py * py + pz * pz), dtype=np.float32)


def _ellipsoid(x: F32, y: F32, z: F32, c: Vec3, r: Vec3) -> npt.NDArray[np.bool_]:
    q = ((x - np.float32(c[0])) / np.float32(r[0])) ** 2
    q += ((y - np.float32(c[1])) / np.float32(r[1])) ** 2
    q += ((z - np.float32(c[2])) / np.float32(r[2])) ** 2
    return np.asarray(q <= 1.0)


def _airway_tubes() -> list[tuple[_Tube, float]]:
    """(tube with the outer radius, lumen radius) for the trachea and both main bronchi."""
    carina = np.asarray(CARINA)
    out = [(_Tube(np.asarray(TRACHEA_TOP), carina, TRACHEA_RADII[0]), TRACHEA_RADII[1])]
    for side in (Side.RIGHT, Side.LEFT):
        out.append((_Tube(carina, np.asarray(BRONCHUS_ENDS[side]), BRONCHUS_RADII[0]),
                    BRONCHUS_RADII[1]))
    return out


def _vessel_tree(seed: int) -> list[_Tube]:
    """A deterministic branching vessel tree per lung: radius 4 mm at the hilum to ~1 mm."""
    rng = np.random.default_rng(seed)
    tubes: list[_Tube] = []

    def grow(p: npt.NDArray[np.float64], d: npt.NDArray[np.float64], length: float,
             radius: float, depth: int) -> None:
        q = p + d * length
        tubes.append(_Tube(p, q, radius))
        if depth == 0:
            return
        perp = np.cross(d, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        for sign in (-1.0, 1.0):
            ang = math.radians(28.0 + rng.uniform(-8.0, 8.0)) * sign
            nd = d * math.cos(ang) + perp * math.sin(ang)
            nd /= np.linalg.norm(nd)
            grow(q, nd, length * 0.8, max(radius * 0.72, 1.0), depth - 1)

    for s in (-1.0, 1.0):  # right lung (-x), left lung (+x)
        root = np.array([s * 30.0, 5.0, 5.0])
        for d in ((s * 0.6, 0.0, 0.8), (s * 1.0, 0.1, 0.0), (s * 0.6, 0.35, -0.75)):
            dv = np.asarray(d, dtype=np.float64)
            grow(root, dv / np.linalg.norm(dv), 32.0, 4.0, 3)
    return tubes


def _lung_regions(x: F32, y: F32, z: F32) -> dict[Side, npt.NDArray[np.bool_]]:
    """Where each lung is: its ellipsoid minus the heart and the airway walls."""
    outside = _ellipsoid(x, y, z, HEART_CENTRE, HEART_RADII)
    for tube, _ in _airway_tubes():
        outside |= _tube_dist(x, y, z, tube.a, tube.b) <= tube.radius
    return {
        side: _ellipsoid(x, y, z, LUNG_CENTRES[side], LUNG_RADII) & ~outside
        for side in (Side.RIGHT, Side.LEFT)
    }


def _texture(x: F32, y: F32, z: F32, seed: int) -> F32:
    """Smooth, grid-independent texture in [-1, 1]: three plane waves (~7-10 mm)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros(x.shape, dtype=np.float32)
    for _ in range(3):
        w = rng.normal(size=3)
        w *= 2.0 * math.pi / (rng.uniform(7.0, 10.0) * np.linalg.norm(w))
        phase = rng.uniform(0.0, 2.0 * math.pi)
        acc += np.sin(x * np.float32(w[0]) + y * np.float32(w[1]) + z * np.float32(w[2])
                      + np.float32(phase))
    return acc / np.float32(3.0)


# --------------------------------------------------------------------------- rendering


class _Block:
    """LPS coordinates of a slab of the grid, with object bounding boxes in index space."""

    def __init__(self, affine: npt.NDArray[np.float64], shape: tuple[int, int, int],
                 k0: int, k1: int, offset: npt.NDArray[np.float64]) -> None:
        self.inv = np.linalg.inv(affine)
        self.shape = shape
        self.k0, self.k1 = k0, k1
        self.offset = offset
        k = np.arange(k0, k1, dtype=np.float32)[:, None, None]
        r = np.arange(shape[1], dtype=np.float32)[None, :, None]
        c = np.arange(shape[2], dtype=np.float32)[None, None, :]
        a = affine.astype(np.float32)
        o = offset.astype(np.float32)
        self.xyz = tuple(
            np.asarray(a[i, 0] * k + a[i, 1] * r + a[i, 2] * c + (a[i, 3] + o[i]), dtype=np.float32)
            for i in range(3)
        )

    def window(self, lo: npt.ArrayLike, hi: npt.ArrayLike) -> tuple[slice, slice, slice] | None:
        """Local index slices covering the LPS box [lo, hi] (None when outside the slab)."""
        lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        corners = np.array([[lo_a[0] if i & 1 == 0 else hi_a[0],
                             lo_a[1] if i & 2 == 0 else hi_a[1],
                             lo_a[2] if i & 4 == 0 else hi_a[2]] for i in range(8)])
        corners = corners - self.offset
        idx = corners @ self.inv[:3, :3].T + self.inv[:3, 3]
        lo_i = np.floor(idx.min(axis=0)).astype(int)
        hi_i = np.ceil(idx.max(axis=0)).astype(int) + 1
        lo_i[0], hi_i[0] = max(lo_i[0], self.k0) - self.k0, min(hi_i[0], self.k1) - self.k0
        for ax in (1, 2):
            lo_i[ax], hi_i[ax] = max(lo_i[ax], 0), min(hi_i[ax], self.shape[ax])
        if np.any(hi_i <= lo_i):
            return None
        return (slice(int(lo_i[0]), int(hi_i[0])), slice(int(lo_i[1]), int(hi_i[1])),
                slice(int(lo_i[2]), int(hi_i[2])))

    def coords(self, w: tuple[slice, slice, slice]) -> tuple[F32, F32, F32]:
        return self.xyz[0][w], self.xyz[1][w], self.xyz[2][w]


def _lung_bounds() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    cs = np.array(list(LUNG_CENTRES.values()))
    r = np.asarray(LUNG_RADII)
    return cs.min(axis=0) - r, cs.max(axis=0) + r


def _paint(blk: _Block, spec: PhantomSpec, vessels: list[_Tube],
           labels: bool) -> tuple[F32, npt.NDArray[np.uint8] | None, npt.NDArray[np.uint8] | None]:
    """HU (without noise) of one slab; lung and lesion labels where ``labels``."""
    x, y, z = blk.xyz
    rho = np.sqrt((x / np.float32(BODY_RADII[0])) ** 2 + (y / np.float32(BODY_RADII[1])) ** 2)
    hu = np.full(x.shape, HU_AIR, dtype=np.float32)
    hu[rho < 1.0] = HU_TISSUE
    hu[(rho >= FAT_RHO) & (rho < 1.0)] = HU_FAT
    # ribs: a band of the body ring, 10 mm high every 28 mm, sloping down anteriorly
    band = (rho >= RIB_RHO[0]) & (rho <= RIB_RHO[1])
    if band.any():
        xb, yb, zb = x[band], y[band], z[band]
        theta = np.arctan2(yb / np.float32(BODY_RADII[1]), xb / np.float32(BODY_RADII[0]))
        sin_t = np.sin(theta)
        zr = zb + np.float32(25.0) * (np.float32(1.0) - sin_t) / np.float32(2.0)
        rib = (np.mod(zr + np.float32(1000.0), np.float32(28.0)) < 10.0) & (zr > -150.0) \
            & (zr < 150.0) & (sin_t > -0.87)  # no ribs within ~30 deg of the sternum
        vals = hu[band]
        vals[rib] = HU_BONE
        hu[band] = vals
    spine = (x - np.float32(SPINE_CENTRE_XY[0])) ** 2 + (y - np.float32(SPINE_CENTRE_XY[1])) ** 2 \
        <= np.float32(SPINE_RADIUS ** 2)
    hu[spine] = HU_SPINE
    (sx, sy), (srx, sry), (sz0, sz1) = STERNUM
    sternum = (((x - np.float32(sx)) / np.float32(srx)) ** 2
               + ((y - np.float32(sy)) / np.float32(sry)) ** 2 <= 1.0) & (z >= sz0) & (z <= sz1)
    hu[sternum] = HU_BONE

    lung_lab = np.zeros(x.shape, dtype=np.uint8) if labels else None
    les_lab = np.zeros(x.shape, dtype=np.uint8) if labels else None
    lo, hi = _lung_bounds()
    w = blk.window(lo, hi)
    if w is not None:
        xs, ys, zs = blk.coords(w)
        regions = _lung_regions(xs, ys, zs)
        lung = regions[Side.RIGHT] | regions[Side.LEFT]
        sub = hu[w]
        sub[lung] = HU_LUNG
        if lung_lab is not None:
            ll = lung_lab[w]
            for side, m in regions.items():
                ll[m] = LUNG_LABELS[side]
        hu[w] = sub
        if spec.vessels:
            for tube in vessels:
                _paint_in_lung(blk, hu, tube.bounds(), lambda xs, ys, zs, t=tube: (
                    _tube_dist(xs, ys, zs, t.a, t.b) <= t.radius), HU_VESSEL, None, 0)
        for i, les in enumerate(spec.lesions):
            c, r = np.asarray(les.centre_lps), np.asarray(les.radii_mm)
            _paint_lesion(blk, hu, les_lab, c - r, c + r, les, spec.anatomy_seed * 1000 + i)
    for tube, lumen in _airway_tubes():
        wa = blk.window(*tube.bounds())
        if wa is None:
            continue
        d = _tube_dist(*blk.coords(wa), tube.a, tube.b)
        sub = hu[wa]
        sub[d <= tube.radius] = HU_TISSUE
        sub[d <= lumen] = HU_AIR
        hu[wa] = sub
    return hu, lung_lab, les_lab


def _paint_in_lung(blk: _Block, hu: F32, bounds: tuple[npt.NDArray[np.float64],
                   npt.NDArray[np.float64]], inside: object, value: float,
                   lab: npt.NDArray[np.uint8] | None, label_value: int) -> None:
    w = blk.window(*bounds)
    if w is None:
        return
    xs, ys, zs = blk.coords(w)
    regions = _lung_regions(xs, ys, zs)
    m = (regions[Side.RIGHT] | regions[Side.LEFT]) & inside(xs, ys, zs)  # type: ignore[operator]
    sub = hu[w]
    sub[m] = value
    hu[w] = sub
    if lab is not None:
        sl = lab[w]
        sl[m] = label_value
        lab[w] = sl


def _paint_lesion(blk: _Block, hu: F32, lab: npt.NDArray[np.uint8] | None,
                  lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64],
                  les: LesionSpec, seed: int) -> None:
    w = blk.window(lo, hi)
    if w is None:
        return
    xs, ys, zs = blk.coords(w)
    regions = _lung_regions(xs, ys, zs)
    m = (regions[Side.RIGHT] | regions[Side.LEFT]) & _ellipsoid(xs, ys, zs, les.centre_lps,
                                                                 les.radii_mm)
    if not m.any():
        return
    base = HU_GGO if les.kind == LesionKind.GGO else HU_CONSOLIDATION
    tex = _texture(xs[m], ys[m], zs[m], seed)
    sub = hu[w]
    sub[m] = np.float32(base) + np.float32(TEXTURE_AMPLITUDE[les.kind]) * tex
    hu[w] = sub
    if lab is not None:
        sl = lab[w]
        sl[m] = LESION_LABELS[les.kind]
        lab[w] = sl


def inserted_volume_ml(lesion: LesionSpec, step_mm: float = 0.4) -> tuple[float, Side]:
    """Volume of ``lesion`` inside the lungs (fine-grid quadrature) and the lung holding most."""
    c, r = np.asarray(lesion.centre_lps), np.asarray(lesion.radii_mm)
    axes = [np.arange(c[i] - r[i] + step_mm / 2, c[i] + r[i], step_mm, dtype=np.float32)
            for i in range(3)]
    counts = {Side.RIGHT: 0, Side.LEFT: 0}
    for zv in np.array_split(axes[2], max(1, len(axes[2]) // 16)):
        x, y, z = np.meshgrid(axes[0], axes[1], zv, indexing="ij")
        m = _ellipsoid(x, y, z, lesion.centre_lps, lesion.radii_mm)
        regions = _lung_regions(x, y, z)
        for side in counts:
            counts[side] += int(np.count_nonzero(m & regions[side]))
    side = max(counts, key=lambda s: counts[s])
    return (counts[Side.RIGHT] + counts[Side.LEFT]) * step_mm ** 3 / 1000.0, side


def _slabs(n: int, size: int) -> Iterator[tuple[int, int]]:
    for k0 in range(0, n, size):
        yield k0, min(n, k0 + size)


def render(
    spec: PhantomSpec,
    affine: npt.ArrayLike,
    shape: tuple[int, int, int],
    slice_thickness_mm: float | None = None,
) -> tuple[Volume, PhantomTruth]:
    """Sample the phantom on the grid (``affine``: (k, r, c, 1) -> LPS, ``shape``: (k, r, c)).

    Where ``slice_thickness_mm`` is given, each voxel averages sub-samples spread over that
    thickness along the slice normal (the truth labels are sampled at the slice centre).
    Returns the CT (int16 HU, noise seeded by ``spec.seed``) and the truth.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {aff.shape}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape: expected 3 positive sizes (k, r, c), got {shape}")
    normal = np.cross(aff[:3, 2], aff[:3, 1])  # row direction x column direction
    normal /= np.linalg.norm(normal)
    offsets = [0.0]
    if slice_thickness_mm is not None and slice_thickness_mm > 0:
        n_sub = int(min(7, max(2, math.ceil(slice_thickness_mm / 0.75))))
        offsets = [slice_thickness_mm * ((i + 0.5) / n_sub - 0.5) for i in range(n_sub)]
    vessels = _vessel_tree(spec.anatomy_seed)
    rng = np.random.default_rng(spec.seed)
    hu_out = np.empty(shape, dtype=np.int16)
    lung_out = np.zeros(shape, dtype=np.uint8)
    les_out = np.zeros(shape, dtype=np.uint8)
    slab = max(1, int(2_000_000 // (shape[1] * shape[2])))
    zero = np.zeros(3)
    for k0, k1 in _slabs(shape[0], slab):
        blk = _Block(aff, shape, k0, k1, zero)
        acc, lung_lab, les_lab = _paint(blk, spec, vessels, labels=True)
        assert lung_lab is not None and les_lab is not None
        lung_out[k0:k1], les_out[k0:k1] = lung_lab, les_lab
        if len(offsets) > 1:
            acc = np.zeros_like(acc)
            for off in offsets:
                acc += _paint(_Block(aff, shape, k0, k1, normal * off), spec, vessels, False)[0]
            acc /= np.float32(len(offsets))
        if spec.noise_hu > 0:
            acc += rng.standard_normal(acc.shape, dtype=np.float32) * np.float32(spec.noise_hu)
        hu_out[k0:k1] = np.clip(np.rint(acc), -1024, 3071).astype(np.int16)
    ml_sides = [inserted_volume_ml(les) for les in spec.lesions]
    truth = PhantomTruth(
        lungs=Volume(lung_out, aff),
        lesions=Volume(les_out, aff),
        lesion_ml=tuple(m for m, _ in ml_sides),
        lesion_sides=tuple(s for _, s in ml_sides),
    )
    return Volume(hu_out, aff), truth
