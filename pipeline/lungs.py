"""CT volume -> lung masks (right / left) on the same grid.

Behind the :class:`LungSegmenter` protocol so that a learned model can serve later.  The
classical method (:class:`ClassicalLungSegmenter`) works at a reduced in-plane resolution
(``LungsConfig.working_spacing_mm``) and upsamples the labels:

1. air = HU below ``air_threshold_hu``; air connected to the in-plane image border of a
   slice (outside the body) is removed;
2. the trachea and main bronchi are found (a dark, round, medial component in the most
   superior slices) and region-grown with the highest threshold that does not leak;
3. the lungs are the largest remaining components; lungs joined at the anterior / posterior
   junction line are split by eroding until two cores appear and growing them back;
4. per slice, holes are filled (vessels, enclosed lesions), and dense pathology touching
   the costal pleura (a subpleural consolidation) is recovered from the slice's convex hull:
   a hull addition is accepted when it is shallow (``pleural_max_depth_mm``) and lies on the
   costal side, i.e. not medial-anterior where the heart and mediastinum indent the lung;
5. left and right are decided by each lung's LPS centroid x (left = larger x), never by
   array index;
6. mirror recovery of large dense regions (lobar consolidation, collapse) that the
   threshold misses and that are too large or deep for step 4: the mid-sagittal plane is
   fitted to the bones (ribs, spine, sternum are near symmetric; the lungs may not be);
   where a slice's lung is much smaller than the other lung mirrored about that plane,
   soft-tissue-density, non-fat, non-bone voxels inside the mirrored lung are added when
   they are 3-D connected to the lung and have aerated lung of the same side inferior to
   them in the same column (the diaphragm is close to a height map: liver, spleen and the
   heart on it have no lung below).  See :func:`_mirror_recovery`.

Fewer than ``min_lung_volume_ml`` of lung: ``NotAnalysable("no-lungs-found")``.  An
implausible result that is still analysable (one lung much smaller than the other, a low
total) is reported by :func:`lung_mask_warnings` as coded warnings, for the worklist.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

from .artefacts import LUNG_LABELS, Grid, LungMasks, Side, Volume, bounding_box
from .config import LungsConfig
from .errors import ConfigError, NotAnalysable

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)  # 4-connectivity within one slice
_FULL2D = ndi.generate_binary_structure(2, 2)  # 8-connectivity in a 2-D slice


class LungSegmenter(Protocol):
    """Anything that turns a CT volume (HU) into left/right lung labels on the same grid."""

    name: str
    version: str

    def __call__(self, ct: Volume) -> LungMasks: ...


# --------------------------------------------------------------------------- resampling


def working_factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer in-plane block sizes (1, r, c) that bring the pixel size close to ``target_mm``.

    Slices are never merged: thin slices keep their craniocaudal detail.
    """
    return (1, max(1, round(target_mm / spacing[1])), max(1, round(target_mm / spacing[2])))


def block_mean(a: npt.NDArray[np.generic], f: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    """Mean over (f0, f1, f2) blocks; the array is edge-padded to a multiple of the blocks.
    The result lies on ``grid.downsample(f)`` of ``a``'s grid (:meth:`Grid.downsample`)."""
    if f == (1, 1, 1):
        return np.asarray(a, dtype=np.float32)
    pad = [(0, (-n) % b) for n, b in zip(a.shape, f, strict=True)]
    p = np.pad(a, pad, mode="edge") if any(w for _, w in pad) else a
    s = p.shape
    out = np.zeros((s[0] // f[0], s[1] // f[1], s[2] // f[2]), dtype=np.float32)
    for i in range(f[0]):
        for j in range(f[1]):
            for k in range(f[2]):
                out += p[i::f[0], j::f[1], k::f[2]]
    out /= np.float32(f[0] * f[1] * f[2])
    return out


def block_upsample(a: npt.NDArray[np.generic], f: tuple[int, int, int],
                   shape: tuple[int, int, int]) -> npt.NDArray[np.generic]:
    """Nearest-neighbour inverse of :func:`block_mean`, cropped to ``shape``."""
    if f == (1, 1, 1):
        return a
    out = a
    for ax, n in enumerate(f):
        if n > 1:
            out = np.repeat(out, n, axis=ax)
    return out[: shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------- the method


class ClassicalLungSegmenter:
    """Threshold, airway removal, left/right split and pleural-side repair (see module doc)."""

    name = "classical-threshold"
    version = "1.0"

    def __init__(self, config: LungsConfig) -> None:
        self.config = config

    @property
    def method(self) -> str:
        return f"{self.name} {self.version}"

    def __call__(self, ct: Volume) -> LungMasks:
        cfg = self.config
        t0 = time.perf_counter()
        f = working_factors(ct.spacing, cfg.working_spacing_mm)
        hu = block_mean(ct.array, f)
        grid = ct.grid.downsample(f)  # the block means' grid: block centres in LPS
        labels = _segment(hu, grid, cfg)
        full = np.asarray(block_upsample(labels, f, ct.shape), dtype=np.uint8)
        total_ml = float(np.count_nonzero(full) * ct.voxel_volume_ml)
        if total_ml < cfg.min_lung_volume_ml:
            raise NotAnalysable(
                "no-lungs-found",
                f"expected at least {cfg.min_lung_volume_ml:.0f} ml of lung, got {total_ml:.0f} ml",
            )
        log.info("lungs: %.0f ml (right %.0f, left %.0f) in %.2f s (working grid %s, blocks %s)",
                 total_ml,
                 np.count_nonzero(full == LUNG_LABELS[Side.RIGHT]) * ct.voxel_volume_ml,
                 np.count_nonzero(full == LUNG_LABELS[Side.LEFT]) * ct.voxel_volume_ml,
                 time.perf_counter() - t0, hu.shape, f)
        masks = LungMasks(labels=ct.with_array(full), method=self.method)
        warnings = lung_mask_warnings(masks, cfg)
        if warnings:
            log.warning("lungs: implausible lung mask: %s", ", ".join(warnings))
        return masks


def _segment(hu: npt.NDArray[np.float32], grid: Grid, cfg: LungsConfig) -> npt.NDArray[np.uint8]:
    """The classical pipeline on the working grid; returns LUNG_LABELS."""
    air = hu < cfg.air_threshold_hu
    # 1. outside-body air: in-plane components touching the slice border
    lab2d, n2d = ndi.label(air, structure=_INPLANE)
    touching = np.zeros(n2d + 1, dtype=bool)
    for edge in (lab2d[:, 0, :], lab2d[:, -1, :], lab2d[:, :, 0], lab2d[:, :, -1]):
        touching[edge.ravel()] = True
    touching[0] = False
    outside = touching[lab2d]
    del lab2d
    body_x = _centroid_x(~outside, grid)  # the body's midline (LPS x)
    cand = air & ~outside
    del outside
    # 2. airways
    airway = _airway(hu, cand, grid, cfg, body_x)
    if airway is not None:  # dilated within its own box, one voxel wider: same result
        box = bounding_box(airway, margin=1)
        assert box is not None  # the airway is grown from a seed voxel
        cand[box] &= ~ndi.binary_dilation(airway[box])
    # 3. lung components
    lab, n = ndi.label(cand)
    if n == 0:
        return np.zeros(hu.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    min_vox = cfg.min_component_ml / grid.voxel_volume_ml
    lungs: list[BoolArray] = []
    largest = lab == order[0]
    if sizes[order[0]] >= min_vox and _straddles(largest, grid, body_x):
        lungs = _split(largest, grid)
    else:
        if sizes[order[0]] >= min_vox:
            lungs.append(largest)
            x0 = _centroid_x(largest, grid)
            for i in order[1:6]:
                if sizes[i] < max(min_vox, 0.1 * sizes[order[0]]):
                    break
                comp = lab == i
                if (_centroid_x(comp, grid) - body_x) * (x0 - body_x) < 0:
                    lungs.append(comp)
                    break
    out = np.zeros(hu.shape, dtype=np.uint8)
    for m in lungs:
        side = Side.LEFT if _centroid_x(m, grid) > body_x else Side.RIGHT
        if len(lungs) == 2:  # decide by comparing the two, robust to an off-centre body
            other = lungs[1] if m is lungs[0] else lungs[0]
            side = Side.LEFT if _centroid_x(m, grid) > _centroid_x(other, grid) else Side.RIGHT
        repaired = _repair(m, hu, grid, cfg, side)
        out[repaired & (out == 0)] = LUNG_LABELS[side]
    if cfg.mirror_recovery and len(lungs) == 2:
        _mirror_recovery(out, hu, grid, cfg, airway)
    return out


def _centroid_x(mask: BoolArray, grid: Grid) -> float:
    """LPS x of the centroid of ``mask`` (0 for an empty mask)."""
    n = np.count_nonzero(mask)
    if n == 0:
        return 0.0
    com = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        prof = np.count_nonzero(mask, axis=other)
        com.append(float(prof @ np.arange(prof.size)) / n)
    return float(grid.index_to_lps(com)[0, 0])


def _straddles(mask: BoolArray, grid: Grid, mid_x: float) -> bool:
    """True when a component has a substantial volume on both sides of the body midline."""
    idx = np.nonzero(mask)
    step = max(1, idx[0].size // 200_000)
    pts = np.stack([i[::step] for i in idx], axis=1)
    x = grid.index_to_lps(pts)[:, 0]
    frac = float(np.mean(x > mid_x))
    return min(frac, 1.0 - frac) > 0.2


def _split(mask: BoolArray, grid: Grid) -> list[BoolArray]:
    """Split joined lungs: erode (distance map) until two large cores appear, grow them back."""
    sl = bounding_box(mask)
    assert sl is not None  # the largest air component
    m = mask[sl]
    dist = ndi.distance_transform_edt(m, sampling=grid.spacing)
    total = int(m.sum())
    for level in np.arange(1.0, 25.0, 1.0):
        cores, n = ndi.label(dist > level)
        if n < 2:
            continue
        sizes = np.bincount(cores.ravel())
        sizes[0] = 0
        big = np.argsort(sizes)[::-1][:2]
        if sizes[big[1]] < 0.1 * sizes[big[0]] or sizes[big[1]] * 20 < total * 0.1:
            continue
        seeds = np.where(cores == big[0], 1, np.where(cores == big[1], 2, 0)).astype(np.uint8)
        _, near = ndi.distance_transform_edt(seeds == 0, sampling=grid.spacing,
                                             return_indices=True)
        assigned = seeds[tuple(near)]
        log.info("lungs: joined lungs split at erosion depth %.0f mm", level)
        out = []
        for v in (1, 2):
            full = np.zeros(mask.shape, dtype=bool)
            full[sl] = m & (assigned == v)
            out.append(full)
        return out
    log.warning("lungs: one air component straddles the midline and could not be split")
    return [mask]


def _airway(hu: npt.NDArray[np.float32], cand: BoolArray, grid: Grid, cfg: LungsConfig,
            body_x: float) -> BoolArray | None:
    """Trachea and main bronchi: seed in a superior slice, grow below the highest safe threshold."""
    aff = grid.affine
    sup_first = aff[2, 0] < 0  # slice index 0 is the most superior one
    nk = hu.shape[0]
    area_px = grid.spacing[1] * grid.spacing[2]
    ks = range(0, nk) if sup_first else range(nk - 1, -1, -1)
    seed: tuple[int, int, int] | None = None
    for n_seen, k in enumerate(ks):
        if n_seen > max(3, nk // 6):
            break
        dark = cand[k] & (hu[k] < cfg.airway_threshold_hu)
        lab, _ = ndi.label(dark)
        best: tuple[float, int, int] | None = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            comp = lab[sl] == i
            area = comp.sum() * area_px
            if not (cfg.trachea_min_area_mm2 <= area <= cfg.trachea_max_area_mm2):
                continue
            rr, cc = np.nonzero(comp)
            r0, c0 = rr.mean() + sl[0].start, cc.mean() + sl[1].start
            x = float(grid.index_to_lps([k, r0, c0])[0, 0])
            if abs(x - body_x) > cfg.trachea_max_offset_mm:
                continue
            if best is None or abs(x - body_x) < best[0]:
                darkest = int(np.argmin(hu[k][sl][comp]))  # survives the lowest thresholds
                best = (abs(x - body_x), int(rr[darkest] + sl[0].start),
                        int(cc[darkest] + sl[1].start))
        if best is not None:
            seed = (k, best[1], best[2])
            break
    if seed is None:
        log.warning("lungs: no trachea found in the superior slices; airways not removed")
        return None
    for thr in np.arange(cfg.airway_threshold_hu, -1001.0, -15.0):
        lab, _ = ndi.label(cand & (hu < thr))
        v = lab[seed]
        if v == 0:
            break
        grown = lab == v
        ml = grown.sum() * grid.voxel_volume_ml
        if ml <= cfg.airway_max_ml:
            log.debug("lungs: airway %.0f ml grown below %.0f HU", ml, thr)
            return grown
    log.warning("lungs: the airway region leaked at every threshold; airways not removed")
    return None


def _piece_hulls(s: BoolArray) -> BoolArray:
    """The convex hull of each 8-connected piece of one slice, ORed (never bridging two
    pieces); each hull is computed on the piece's own bounding box, one pixel wider."""
    lab, _ = ndi.label(s, structure=_FULL2D)
    hull = np.zeros(s.shape, dtype=bool)
    for j, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        r0, c0 = max(0, box[0].start - 1), max(0, box[1].start - 1)
        r1, c1 = min(s.shape[0], box[0].stop + 1), min(s.shape[1], box[1].stop + 1)
        hull[r0:r1, c0:c1] |= convex_hull_image(lab[r0:r1, c0:c1] == j)
    return hull


def _repair(mask: BoolArray, hu: npt.NDArray[np.float32], grid: Grid,
            cfg: LungsConfig, side: Side) -> BoolArray:
    """Fill holes per slice and recover dense pathology against the costal pleura.

    Per slice, each component of (convex hull of each 2-D piece - lung) is added when it is
    shallow (at most ``pleural_max_depth_mm`` below the hull), small (at most
    ``pleural_max_area_fraction`` of the slice's lung area, and not holding the lung's own
    centroid: a crescent of lung around the diaphragm dome is not pathology), dense (mean HU
    above ``pleural_min_mean_hu``) and not on the mediastinal side: a component whose
    centroid is medial to the slice's lung centroid by more than ``mediastinal_margin`` x
    the lung width *and* lies in the anterior three quarters of the lung is where the heart
    and mediastinum indent the lung (posterior paravertebral additions are kept).  The
    components of a slice are judged together (per-label sums), not one by one.
    """
    sl = bounding_box(mask, margin=(0, 1, 1))  # one pixel wider in-plane
    if sl is None:
        return mask
    filled = ndi.binary_fill_holes(mask[sl], structure=_INPLANE)
    h = hu[sl]
    out = filled.copy()
    lateral = 1.0 if side == Side.LEFT else -1.0  # LPS +x is lateral for the left lung

    for i in range(filled.shape[0]):
        s = filled[i]
        rr_s, cc_s = np.nonzero(s)
        n_lung = int(rr_s.size)
        if n_lung < 10:
            continue
        hull = _piece_hulls(s)
        add = hull & ~s
        if not add.any():
            continue
        k = i + sl[0].start
        plane = (slice(k, k + 1), sl[1], sl[2])  # LPS x and y of the crop's pixels, slice k
        x_k, y_k = grid.lps_coordinate(0, plane)[0], grid.lps_coordinate(1, plane)[0]
        xs, ys = x_k[rr_s, cc_s], y_k[rr_s, cc_s]
        gr, gc = round(float(rr_s.mean())), round(float(cc_s.mean()))
        gx = float(xs.mean())
        width = max(float(xs.max() - xs.min()), 1.0)
        y_lo, y_hi = float(ys.min()), float(ys.max())
        depth = ndi.distance_transform_edt(hull, sampling=grid.spacing[1:])
        lab, n = ndi.label(add)
        ra, ca = np.nonzero(add)
        which = lab[ra, ca]
        count = np.bincount(which, minlength=n + 1)[1:].astype(np.float64)
        deepest = np.zeros(n + 1)
        np.maximum.at(deepest, which, depth[ra, ca])
        mean_hu = np.bincount(which, weights=h[i][ra, ca], minlength=n + 1)[1:] / count
        xa, ya = x_k[ra, ca], y_k[ra, ca]
        cx = np.bincount(which, weights=xa, minlength=n + 1)[1:] / count
        cy = np.bincount(which, weights=ya, minlength=n + 1)[1:] / count
        medial = (cx - gx) * lateral < -cfg.mediastinal_margin * width
        anterior = cy < y_lo + 0.75 * (y_hi - y_lo)
        keep = ((deepest[1:] <= cfg.pleural_max_depth_mm)
                & (count <= cfg.pleural_max_area_fraction * n_lung)
                & (mean_hu >= cfg.pleural_min_mean_hu)
                & ~(medial & anterior))
        holds = int(lab[gr, gc])  # holds the lung's own centroid: the lung wraps around it
        if holds:
            keep[holds - 1] = False
        take = keep[which - 1]
        out[i][ra[take], ca[take]] = True
    res = mask.copy()
    res[sl] = out
    return res


# --------------------------------------------------------------------------- mirror recovery


@dataclass(frozen=True)
class _Mirror:
    """The mid-sagittal plane as a per-slice reflection of (row, column) indices.

    ``normal`` is an LPS unit vector lying in the slice plane; the plane holds the points
    whose offset from their slice's origin has ``offset`` mm along ``normal``.  ``rows`` /
    ``cols`` give, for each in-plane index, the index of its mirror image (``valid`` False
    where that falls outside the grid).  ``score`` is the bone self-overlap (0-1) at the fit.
    """

    normal: npt.NDArray[np.float64]
    offset: float
    score: float
    rows: npt.NDArray[np.intp]
    cols: npt.NDArray[np.intp]
    valid: BoolArray

    def reflect(self, mask: BoolArray) -> BoolArray:
        """``mask`` mirrored slice by slice about the plane."""
        return np.asarray(mask[:, self.rows, self.cols] & self.valid[None])


def _inplane_basis(affine: npt.NDArray[np.float64]
                   ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Orthonormal LPS vectors (ex, ey) of the slice plane: ex is LPS x projected into it."""
    a = affine[:3, 1:3]
    e1 = a[:, 0] / np.linalg.norm(a[:, 0])
    e2 = a[:, 1] - (a[:, 1] @ e1) * e1
    e2 /= np.linalg.norm(e2)
    x = np.array([1.0, 0.0, 0.0])
    ex = (x @ e1) * e1 + (x @ e2) * e2
    ex /= np.linalg.norm(ex)
    ey = np.cross(np.cross(e1, e2), ex)
    return ex, ey


def _symmetry_plane(hu: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8], grid: Grid,
                    cfg: LungsConfig, bin_mm: float = 2.0) -> _Mirror | None:
    """The mid-sagittal plane about which the thoracic bones (ribs, spine, sternum,
    shoulder girdles) are most symmetric.

    The bone voxels of the lungs' slices are projected along the slice axis onto the slice
    plane.  For each candidate normal (``ex`` turned by up to ``mirror_max_yaw_deg``) the
    projection is binned along the normal ``s`` and along the plane ``t``; the overlap of the
    bone map with its reflection about ``s = d`` is sum_i H[i] H[2d - i], an
    autoconvolution along ``s`` that one FFT gives for every ``d`` at once.  The lungs
    themselves are not used: they are what may be asymmetric.
    """
    ks = np.nonzero(labels.any(axis=(1, 2)))[0]
    if ks.size == 0:
        return None
    proj = np.count_nonzero(hu[ks[0]:ks[-1] + 1] > cfg.bone_min_hu, axis=0)
    rr, cc = np.nonzero(proj)
    if rr.size < 10:
        log.warning("lungs: too little bone for a symmetry plane; mirror recovery skipped")
        return None
    w = proj[rr, cc].astype(np.float64)
    a = grid.affine[:3, 1:3]
    pts = np.stack([rr, cc], axis=1).astype(np.float64) @ a.T  # mm from the slice origin
    ex, ey = _inplane_basis(grid.affine)
    u, v = pts @ ex, pts @ ey
    best = (-1.0, 0.0, 0.0)
    for th in np.deg2rad(np.arange(-cfg.mirror_max_yaw_deg, cfg.mirror_max_yaw_deg + 1e-9, 1.0)):
        s = u * np.cos(th) + v * np.sin(th)
        t = -u * np.sin(th) + v * np.cos(th)
        si = ((s - s.min()) / bin_mm).astype(np.intp)
        ti = ((t - t.min()) / bin_mm).astype(np.intp)
        ns, nt = int(si.max()) + 1, int(ti.max()) + 1
        h = np.bincount(si * nt + ti, weights=w, minlength=ns * nt).reshape(ns, nt)
        spec = np.fft.rfft(h, n=2 * ns, axis=0)
        overlap = np.fft.irfft(spec * spec, n=2 * ns, axis=0).sum(axis=1)
        j = int(np.argmax(overlap))
        score = float(overlap[j] / (h * h).sum())
        if score > best[0]:  # bins i + i' = j reflect into each other: centre (j + 1) / 2 bins
            best = (score, float(th), float(s.min() + (j + 1) * bin_mm / 2.0))
    score, th, d = best
    n = np.cos(th) * ex + np.sin(th) * ey
    # per-slice reflection of in-plane offsets, back to (row, column) by least squares
    r, c = np.mgrid[0:hu.shape[1], 0:hu.shape[2]].astype(np.float64)
    p = r[..., None] * a[:, 0] + c[..., None] * a[:, 1]
    p -= 2.0 * ((p @ n) - d)[..., None] * n
    rc = p @ np.linalg.pinv(a).T
    ri, ci = np.rint(rc[..., 0]).astype(np.intp), np.rint(rc[..., 1]).astype(np.intp)
    valid = (ri >= 0) & (ri < hu.shape[1]) & (ci >= 0) & (ci < hu.shape[2])
    x_mid = float((grid.affine[:3, 3] + d * n)[0])
    log.debug("lungs: symmetry plane yaw %.0f deg, through LPS x %.1f mm, bone overlap %.2f",
              np.rad2deg(th), x_mid, score)
    return _Mirror(n, d, score, np.where(valid, ri, 0), np.where(valid, ci, 0), valid)


def _deficient_slices(a_own: npt.NDArray[np.intp], a_twin: npt.NDArray[np.intp],
                      cfg: LungsConfig) -> BoolArray:
    """Slices where a lung is much smaller than its mirrored twin, by hysteresis.

    A slice is deficient when its lung area is under ``mirror_deficit_ratio`` x the twin's;
    runs of consecutive slices under ``mirror_extend_ratio`` x the twin's that hold a
    deficient slice are deficient too (the partly opacified slices at the border of a
    lobar consolidation).
    """
    strong = a_own < cfg.mirror_deficit_ratio * a_twin
    weak = a_own < cfg.mirror_extend_ratio * a_twin
    runs, n = ndi.label(weak)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(runs[strong])] = True
    keep[0] = False
    return np.asarray(keep[runs])


def _mirror_recovery(out: npt.NDArray[np.uint8], hu: npt.NDArray[np.float32], grid: Grid,
                     cfg: LungsConfig, airway: BoolArray | None) -> None:
    """Recover a large dense region (lobar consolidation, collapse) of one lung, in place.

    Where a slice's lung is smaller than ``mirror_deficit_ratio`` x the other lung mirrored
    about the mid-sagittal plane, the missing part may be pathology of lung density close to
    soft tissue.  There, voxels are added to that lung when they are

    - inside the mirrored other lung (the expected extent of the pleural cavity);
    - dense: from ``air_threshold_hu`` to ``dense_max_hu`` (not bone), and not fat (a
      ``fat_min_hu``..``fat_max_hu`` band that survives an in-plane opening: mediastinal
      and extrapleural fat);
    - above the diaphragm: the same lung has aerated voxels further inferior in the same
      (row, column) column.  The diaphragm is close to a height map, so liver and spleen
      under a raised hemidiaphragm, and the heart resting on it, have no lung below them;
    - 3-D connected to the lung.

    The airways (and their walls) and bone are never added; enclosed holes of the additions'
    slices (air bronchograms) are filled.  Each run of deficient slices is handled on its own.
    """
    mirror = _symmetry_plane(hu, out, grid, cfg)
    if mirror is None:
        return
    for side, other in ((Side.RIGHT, Side.LEFT), (Side.LEFT, Side.RIGHT)):
        own = out == LUNG_LABELS[side]
        # the mirror keeps in-plane areas: the twin's area is the other lung's area
        a_twin = np.count_nonzero(out == LUNG_LABELS[other], axis=(1, 2))
        runs, _ = ndi.label(_deficient_slices(np.count_nonzero(own, axis=(1, 2)),
                                                   a_twin, cfg))
        for run in ndi.find_objects(runs):
            if run is not None:
                _recover_run(out, own, hu, grid, cfg, airway, mirror, side, other,
                             run[0].start, run[0].stop)


def _recover_run(out: npt.NDArray[np.uint8], own: BoolArray, hu: npt.NDArray[np.float32],
                 grid: Grid, cfg: LungsConfig, airway: BoolArray | None, mirror: _Mirror,
                 side: Side, other: Side, k0: int, k1: int) -> None:
    """:func:`_mirror_recovery` on one run of deficient slices ``k0:k1`` of ``side``."""
    nk = hu.shape[0]
    kb0, kb1 = max(0, k0 - 1), min(nk, k1 + 1)  # one slice wider: where the run meets the lung
    twin = mirror.reflect(out[kb0:kb1] == LUNG_LABELS[other])
    twin[: k0 - kb0] = False
    twin[twin.shape[0] - (kb1 - k1):] = False
    found = bounding_box(twin)
    if found is None:
        return
    box = (slice(kb0, kb1), found[1], found[2])
    twin = twin[:, box[1], box[2]]
    h = hu[box]
    own_b = own[box]
    # same-side lung strictly inferior in the same column
    sup_up = grid.affine[2, 0] > 0  # slice index grows towards superior
    if sup_up:
        seen = np.any(own[:kb0], axis=0)[box[1], box[2]]
        below = np.logical_or.accumulate(np.concatenate([seen[None], own_b[:-1]]), axis=0)
    else:
        seen = np.any(own[kb1:], axis=0)[box[1], box[2]]
        below = np.logical_or.accumulate(np.concatenate([seen[None], own_b[:0:-1]]),
                                         axis=0)[::-1]
    bone_or_airway = h > cfg.dense_max_hu
    if airway is not None:
        bone_or_airway |= ndi.binary_dilation(airway[box], structure=_INPLANE, iterations=2)
    fat = ndi.binary_opening((h >= cfg.fat_min_hu) & (h <= cfg.fat_max_hu),
                             structure=_INPLANE)
    cand = (twin & (out[box] == 0) & (h >= cfg.air_threshold_hu) & ~bone_or_airway
            & ~fat & below)
    lab, n = ndi.label(cand)
    if n == 0:
        return
    touching = np.zeros(n + 1, dtype=bool)
    touching[lab[ndi.binary_dilation(own_b) & (lab > 0)]] = True
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = touching & (sizes * grid.voxel_volume_ml >= cfg.mirror_min_ml)
    keep[0] = False
    if not keep.any():
        return
    rec = keep[lab]
    filled = ndi.binary_fill_holes(own_b | rec, structure=_INPLANE)
    add = filled & (out[box] == 0) & ~bone_or_airway
    add[: k0 - kb0] = False
    add[add.shape[0] - (kb1 - k1):] = False
    view = out[box]
    view[add] = LUNG_LABELS[side]
    log.info("lungs: %s lung: %.0f ml of dense lung recovered from the mirrored %s lung "
             "(slices %d-%d)", side, np.count_nonzero(add) * grid.voxel_volume_ml, other, k0,
             k1 - 1)


# --------------------------------------------------------------------------- QA


def lung_mask_warnings(masks: LungMasks, config: LungsConfig | None = None) -> tuple[str, ...]:
    """Coded warnings about an implausible final lung mask; empty when it looks plausible.

    The segmentation is not second-guessed here: a study with such a warning must not be
    shown as plainly negative (its involvement figures may be wrong).  Codes:

    - ``lung-missing:<side>``: no voxel of that lung;
    - ``lung-asymmetry:<side>=<ratio>``: that lung is under ``qa_min_side_ratio`` x the
      other (ratio of the smaller to the larger volume, two decimals);
    - ``lung-volume-low:total_ml=<ml>``: both lungs together under ``qa_min_total_ml``.
    """
    cfg = config or LungsConfig()
    labels = masks.labels
    ml = {side: float(np.count_nonzero(labels.array == LUNG_LABELS[side]) * labels.voxel_volume_ml)
          for side in Side}
    out: list[str] = [f"lung-missing:{side}" for side in Side if ml[side] == 0.0]
    out.extend(masks.warnings)
    small, large = sorted(Side, key=lambda s: ml[s])
    if ml[small] > 0.0 and ml[small] < cfg.qa_min_side_ratio * ml[large]:
        out.append(f"lung-asymmetry:{small}={ml[small] / ml[large]:.2f}")
    total = ml[Side.RIGHT] + ml[Side.LEFT]
    if total < cfg.qa_min_total_ml:
        out.append(f"lung-volume-low:total_ml={total:.0f}")
    return tuple(out)


# --------------------------------------------------------------------------- learned


class LearnedLungSegmenter:
    """A 2D lung model served by ONNX Runtime (``lungs.method: model``).

    1. The model's input is made from HU by the recipe its ``model.yaml`` names
       (:mod:`pipeline.representation`: canonical in-plane orientation, 256 x 256, min-max,
       CLAHE), on slices about ``z_step_mm`` apart (always the first and the last);
    2. lung probabilities on the network's grid are interpolated linearly between those
       slices; voxels >= 0.5 are lung, but a voxel denser than ``dense_hu`` only at
       ``dense_min_probability`` (solid tissue next to the lung: liver dome, chest wall) and
       never one in the air around the patient; 3-D pieces under ``min_component_ml``, less
       than ``min_aerated_fraction`` aerated, or under ``small_piece_ml`` and less than
       ``small_piece_min_aerated_fraction`` aerated are dropped;
    3. right and left are decided by patient geometry: each piece by its LPS x against the
       body's midline (left = larger x); a piece that straddles the midline (lungs joined at
       the junction lines) is split by the classical method's erosion split; per slice, what
       one lung encloses is lung (holes filled);
    4. the labels are brought to the CT grid (bilinear probabilities per side);
    5. with the cross-check on and ``dense_from_classical``, dense lung that the classical
       method keeps (its pleural repair and mirror recovery) and the model does not joins the
       lung it touches (:func:`_dense_from_classical`).

    Less than ``min_lung_volume_ml`` of lung: ``NotAnalysable("no-lungs-found")``.  Where
    ``cross_check`` is on, the classical segmenter runs too (at ``cross_check_spacing_mm``)
    and a Dice under ``cross_check_min_dice`` adds the warning
    ``lung-methods-disagree:dice=<d>`` (``classical=none`` where it found no lungs).
    """

    def __init__(self, config: LungsConfig) -> None:
        from .inference import OnnxPredictor, load_model_spec

        self.config = config
        self.spec = load_model_spec(config.model)
        if config.z_step_mm > 0:
            self.spec = replace(self.spec, z_step_mm=config.z_step_mm)
        labels = tuple(self.spec.labels)
        if self.spec.task != "lungs" or labels not in (("background", "lung"),
                                                        ("background", "lung", "infection")):
            raise ConfigError(f"lungs.model {config.model}: expected a lungs model with the "
                              f"labels background, lung (and infection), got task "
                              f"{self.spec.task!r} with labels {list(self.spec.labels)}")
        # the model's third class, infected lung, becomes LungMasks.infection
        self.infection = len(labels) == 3
        self.predictor = OnnxPredictor(self.spec, config.threads, config.providers)
        self.name = self.spec.name
        self.version = self.spec.version
        from . import representation

        representation.load()
        self.cross = (ClassicalLungSegmenter(replace(
            config, working_spacing_mm=config.cross_check_spacing_mm, qa_min_total_ml=0.0,
            min_lung_volume_ml=0.0)) if config.cross_check else None)

    @property
    def method(self) -> str:
        return f"{self.name} {self.version}"

    def probabilities(self, ct: Volume) -> tuple[npt.NDArray[np.float32],
                                                 tuple[bool, bool, bool],
                                                 npt.NDArray[np.float32] | None]:
        """Lung probability (K, S, S) on the network's canonical square grid, every slice,
        the in-plane turn, and the infection probability where the model has that class."""
        from .representation import canonical_inplane, ma20_input, to_canonical
        from .train.lungs import predict_prob

        how = canonical_inplane(ct.direction)
        n = ct.shape[0]
        step = max(1, round(self.spec.z_step_mm / max(ct.spacing[0], 1e-3)))
        ks = sorted(set(range(0, n, step)) | {n - 1})
        size = self.spec.network_size
        x = ma20_input(to_canonical(ct.array[ks], how))
        p, q = predict_prob(self.predictor, x, size, self.config.threads * 8 or 16,
                            infection=True)
        lung = _between_slices(p, ks, n)
        return lung, how, (_between_slices(q, ks, n) if self.infection else None)

    def segment_recipe(self, images: npt.NDArray[np.uint8]) -> BoolArray:
        """Lung masks (K, 256, 256) of images already made by the recipe (the ma20 layout:
        full-field slices, no HU, not a contiguous stack): the network's probability per
        slice, upsampled bilinearly, >= 0.5; no 3-D clean-up and no left/right (slices of
        unknown spacing and order)."""
        from .representation import SIZE, resize2d
        from .train.lungs import predict_prob

        p = predict_prob(self.predictor, images, self.spec.network_size)
        out = np.asarray(resize2d(p, (SIZE, SIZE)) >= 0.5)
        for k in range(out.shape[0]):  # what one lung encloses is lung, as in a volume
            lab, n = ndi.label(out[k])
            for i in range(1, n + 1):
                out[k] |= ndi.binary_fill_holes(lab == i)
        return out

    def infection_recipe(self, images: npt.NDArray[np.uint8]) -> BoolArray:
        """Infected lung (K, 256, 256) of recipe images (see :meth:`segment_recipe`): the
        infection probability upsampled bilinearly, >= 0.5; not yet cut to a lung region."""
        from .representation import SIZE, resize2d
        from .train.lungs import predict_prob

        if not self.infection:
            raise ConfigError(f"lungs.model {self.config.model}: the model has no infection "
                              "class")
        _, q = predict_prob(self.predictor, images, self.spec.network_size, infection=True)
        return np.asarray(resize2d(q, (SIZE, SIZE)) >= 0.5)

    def __call__(self, ct: Volume) -> LungMasks:
        from .representation import (
            from_canonical,
            low_grid_to_index,
            square_to_slice,
            to_canonical,
        )

        cfg = self.config
        t0 = time.perf_counter()
        prob, how, inf_prob = self.probabilities(ct)
        size = prob.shape[1]
        m = low_grid_to_index(ct.shape[1:], how, size)
        grid = ct.grid.resampled(m, (prob.shape[0], prob.shape[1], prob.shape[2]))
        mask = prob >= 0.5
        hu = _hu_at(mask, ct, m)
        if cfg.dense_min_probability > 0.5:  # solid tissue needs a confident model
            weak = mask & (hu > cfg.dense_hu) & (prob < cfg.dense_min_probability)
            mask &= ~weak
            prob = np.where(weak, np.float32(0.0), prob)
        low = _sides(mask, hu, ct, grid, cfg)
        # what a lung encloses (filled per slice in _sides) is lung on the CT grid too
        prob = np.where((low > 0) & (prob < 0.5), np.float32(1.0), prob)
        # to the CT grid: per side, the probability where that side's pieces are (one
        # network pixel wider), upsampled bilinearly, >= 0.5
        near = ndi.grey_dilation(low, size=(1, 3, 3))
        low = np.where(low > 0, low, near)
        shape_c = to_canonical(np.empty(ct.shape[1:], dtype=bool), how).shape
        full_c = np.zeros((ct.shape[0], *shape_c), dtype=np.uint8)
        for k in range(ct.shape[0]):
            if not low[k].any():
                continue
            for side in Side:
                v = LUNG_LABELS[side]
                sel = low[k] == v
                if not sel.any():
                    continue
                p = square_to_slice(np.where(sel, prob[k], 0.0).astype(np.float32), shape_c)
                full_c[k][p >= 0.5] = v
        full = np.ascontiguousarray(from_canonical(full_c, how))
        infection = None
        if inf_prob is not None:  # infected lung on the CT grid, bilinear, >= 0.5
            inf_c = np.zeros(full_c.shape, dtype=np.uint8)
            for k in range(ct.shape[0]):
                if full_c[k].any() and (inf_prob[k] >= 0.5).any():
                    q = square_to_slice(inf_prob[k].astype(np.float32), shape_c)
                    inf_c[k] = (q >= 0.5) & (full_c[k] > 0)
            infection = np.ascontiguousarray(from_canonical(inf_c, how))
        total_ml = float(np.count_nonzero(full) * ct.voxel_volume_ml)
        if total_ml < cfg.min_lung_volume_ml:
            raise NotAnalysable(
                "no-lungs-found",
                f"expected at least {cfg.min_lung_volume_ml:.0f} ml of lung, got {total_ml:.0f} ml",
            )
        t1 = time.perf_counter()
        warnings = self._cross_check(ct, full)
        masks = LungMasks(labels=ct.with_array(full), method=self.method,
                          infection=None if infection is None else ct.with_array(infection))
        log.info("lungs: %.0f ml (right %.0f, left %.0f) by %s in %.2f s (cross-check %.2f s)",
                 total_ml,
                 np.count_nonzero(full == LUNG_LABELS[Side.RIGHT]) * ct.voxel_volume_ml,
                 np.count_nonzero(full == LUNG_LABELS[Side.LEFT]) * ct.voxel_volume_ml,
                 self.method, t1 - t0, time.perf_counter() - t1)
        return replace(masks, warnings=warnings)

    def _cross_check(self, ct: Volume, full: npt.NDArray[np.uint8]) -> tuple[str, ...]:
        """The classical segmenter's opinion: a coded warning where the two disagree, and
        (``dense_from_classical``) the dense lung it keeps that the model does not, added
        to ``full`` in place (see :func:`_dense_from_classical`)."""
        if self.cross is None:
            return ()
        other = self.cross(ct).labels.array
        if not other.any():
            return ("lung-methods-disagree:classical=none",)
        sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
        a, b = full[sub] > 0, other[sub] > 0
        n = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        d = 2.0 * int(np.count_nonzero(a & b)) / max(1, n)
        if self.config.dense_from_classical:
            added = _dense_from_classical(full, other, ct.array, self.config)
            if added:
                log.info("lungs: %.0f ml of dense lung kept by the classical cross-check added",
                         added * ct.voxel_volume_ml)
        if d < self.config.cross_check_min_dice:
            log.warning("lungs: the classical cross-check disagrees (Dice %.2f)", d)
            return (f"lung-methods-disagree:dice={d:.2f}",)
        return ()


def _between_slices(p: npt.NDArray[np.float32], ks: list[int], n: int
                    ) -> npt.NDArray[np.float32]:
    """Probabilities of the slices ``ks`` (sorted, first 0, last n - 1) -> all ``n`` slices,
    linear in between."""
    out = np.empty((n, *p.shape[1:]), dtype=np.float32)
    for a, b, pa, pb in zip(ks[:-1], ks[1:], p[:-1], p[1:], strict=True):
        t = (np.arange(a, b, dtype=np.float32) - a) / (b - a)
        out[a:b] = pa[None] * (1 - t)[:, None, None] + pb[None] * t[:, None, None]
    out[ks[-1]] = p[-1]
    return out


def _sides(mask: BoolArray, hu: npt.NDArray[np.float32], ct: Volume, grid: Grid,
           cfg: LungsConfig) -> npt.NDArray[np.uint8]:
    """Lung pieces of a mask on ``grid`` -> LUNG_LABELS by patient geometry (see
    :class:`LearnedLungSegmenter`).  A piece is kept when it holds ``min_component_ml`` and
    at least ``min_aerated_fraction`` of it is aerated (below ``air_threshold_hu`` on the
    CT): a piece of solid tissue alone (bowel, liver, a neck) is not a lung; a piece under
    ``small_piece_ml`` must be at least ``small_piece_min_aerated_fraction`` aerated (the
    stomach with its gas and the organs around it is small and mostly solid; a diseased lung
    is large)."""
    out = np.zeros(mask.shape, dtype=np.uint8)
    mask = mask & (hu > -2000.0)  # outside the body (see _hu_at) is never lung
    lab, n = ndi.label(mask)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    vml = grid.voxel_volume_ml
    big = [i for i in np.argsort(sizes)[::-1] if sizes[i] * vml >= cfg.min_component_ml]
    keep = []
    for i in big:
        aerated = float(np.mean(hu[lab == i] < cfg.air_threshold_hu))
        need = (cfg.small_piece_min_aerated_fraction
                if sizes[i] * vml < cfg.small_piece_ml else cfg.min_aerated_fraction)
        if aerated >= need:
            keep.append(i)
        else:
            log.info("lungs: a %.0f ml piece of the model's mask dropped: %.1f%% aerated",
                     sizes[i] * vml, 100 * aerated)
    if not keep:
        return out
    mid_x = _body_midline_x(ct)
    for i in keep:
        piece = lab == i
        parts = _split(piece, grid) if _straddles(piece, grid, mid_x) else [piece]
        for part in parts:
            side = Side.LEFT if _centroid_x(part, grid) > mid_x else Side.RIGHT
            out[part & (out == 0)] = LUNG_LABELS[side]
    fill_holes_per_slice(out)
    return out


def _hu_at(mask: BoolArray, ct: Volume,
           to_index: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The CT's HU (nearest voxel) at each voxel of ``mask`` on the network's grid, -3000
    where that voxel lies outside the body (the air connected to the image border, per slice,
    found on every 4th CT pixel), 0 off the mask."""
    out = np.zeros(mask.shape, dtype=np.float32)
    pts = np.argwhere(mask)
    if pts.size == 0:
        return out
    idx = np.c_[pts, np.ones(len(pts))] @ to_index[:3].T
    kk, rr, cc = (np.clip(np.rint(idx[:, a]), 0, ct.shape[a] - 1).astype(np.intp)
                  for a in range(3))
    vals = ct.array[kk, rr, cc].astype(np.float32)
    outside = np.zeros(len(pts), dtype=bool)
    for k in np.unique(kk):
        sel = kk == k
        body = _body_slice(ct.array[k, ::4, ::4])
        outside[sel] = ~body[rr[sel] // 4, cc[sel] // 4]
    vals[outside] = -3000.0
    out[tuple(pts.T)] = vals
    return out


def _body_slice(hu: npt.NDArray[np.floating]) -> BoolArray:
    """One slice's body: everything not reached from the image border through air (below
    -500 HU), one pixel wider (a lung never touches the skin)."""
    air = hu < -500
    lab, _ = ndi.label(air)
    edge = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    outside = np.isin(lab, edge[edge > 0])
    return np.asarray(~ndi.binary_erosion(outside, iterations=1, border_value=1))


def fill_holes_per_slice(labels: npt.NDArray[np.uint8]) -> None:
    """In place: per slice and per lung, what the lung encloses is lung (a dense lesion or a
    vessel surrounded by aerated lung), as the classical method does."""
    for k in range(labels.shape[0]):
        sl = labels[k]
        if not sl.any():
            continue
        for v in LUNG_LABELS.values():
            box = bounding_box((sl == v)[None])
            if box is None:
                continue
            s = sl[box[1:]]  # a view: the hole filling works on the piece's own box
            s[ndi.binary_fill_holes(s == v) & (s == 0)] = v


def _dense_from_classical(full: npt.NDArray[np.uint8], other: npt.NDArray[np.uint8],
                          hu: npt.NDArray[np.signedinteger[Any] | np.floating[Any]],
                          cfg: LungsConfig) -> int:
    """In place: voxels the classical mask holds and the learned one does not, denser than
    ``pleural_min_mean_hu`` (dense lung: the classical method's pleural repair and mirror
    recovery), in 3-D pieces that touch the learned lung of the same side, join it with that
    side's label.  Aerated lung the model left out is not added (that is the model's call,
    and the cross-check warning's).  Returns the number of voxels added."""
    cand = (other > 0) & (full == 0) & (hu > cfg.pleural_min_mean_hu)
    box = bounding_box(cand, margin=1)
    if box is None:
        return 0
    c, f, o = cand[box], full[box], other[box]
    lab, n = ndi.label(c)
    if n == 0:
        return 0
    added = 0
    for v in LUNG_LABELS.values():
        fv = f == v
        touch = np.zeros(n + 1, dtype=bool)  # pieces with a 6-neighbour in the model's lung v
        for ax in range(3):
            fwd, back = slice(1, None), slice(None, -1)
            for a_sl, b_sl in ((fwd, back), (back, fwd)):
                ia, ib = [slice(None)] * 3, [slice(None)] * 3
                ia[ax], ib[ax] = a_sl, b_sl
                nb = lab[tuple(ib)]
                touch[nb[fv[tuple(ia)] & (nb > 0)]] = True
        touch[0] = False
        if touch.any():
            sel = touch[lab] & (o == v)
            f[sel] = v
            added += int(np.count_nonzero(sel))
    full[box] = f
    return added


def _body_midline_x(ct: Volume) -> float:
    """LPS x of the centroid of the body (HU above -500, sampled every 4th voxel in-plane
    and every 4th slice)."""
    sub = ct.array[::4, ::4, ::4]
    idx = np.nonzero(sub > -500)
    if idx[0].size == 0:
        return float(ct.index_to_lps([[0.0, ct.shape[1] / 2, ct.shape[2] / 2]])[0, 0])
    pts = np.stack(idx, axis=1).astype(np.float64) * 4.0
    return float(ct.index_to_lps(pts.mean(axis=0))[0, 0])


def segmenter_for(config: LungsConfig) -> LungSegmenter:
    """The segmenter named by ``config.method``."""
    if config.method == "classical":
        return ClassicalLungSegmenter(config)
    if config.method == "model":
        return LearnedLungSegmenter(config)
    raise ConfigError(f"lungs.method: expected one of ['classical', 'model'], "
                      f"got {config.method!r}")


def segment_lungs(ct: Volume, config: LungsConfig | None = None) -> LungMasks:
    """Convenience: segment with the configured method."""
    return segmenter_for(config or LungsConfig())(ct)
