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
   array index.

Fewer than ``min_lung_volume_ml`` of lung: ``NotAnalysable("no-lungs-found")``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_object

from .artefacts import LUNG_LABELS, LungMasks, Side, Volume
from .config import LungsConfig
from .errors import ConfigError, NotAnalysable

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)  # 4-connectivity within one slice


class LungSegmenter(Protocol):
    """Anything that turns a CT volume (HU) into left/right lung labels on the same grid."""

    def __call__(self, ct: Volume) -> LungMasks: ...


# --------------------------------------------------------------------------- resampling


def working_factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer in-plane block sizes (1, r, c) that bring the pixel size close to ``target_mm``.

    Slices are never merged: thin slices keep their craniocaudal detail.
    """
    return (1, max(1, round(target_mm / spacing[1])), max(1, round(target_mm / spacing[2])))


def block_mean(a: npt.NDArray[np.generic], f: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    """Mean over (f0, f1, f2) blocks; the array is edge-padded to a multiple of the blocks."""
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


def working_affine(affine: npt.NDArray[np.float64],
                   f: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    """Affine of the block-mean grid: block centres in LPS."""
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * np.asarray(f, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ ((np.asarray(f, dtype=np.float64) - 1.0) / 2.0) + affine[:3, 3]
    return out


# --------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class _Grid:
    affine: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]
    voxel_ml: float

    def lps(self, idx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        i = np.atleast_2d(np.asarray(idx, dtype=np.float64))
        return np.asarray(i @ self.affine[:3, :3].T + self.affine[:3, 3])


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
        aff = working_affine(ct.affine, f)
        grid = _Grid(aff, tuple(float(s) for s in np.linalg.norm(aff[:3, :3], axis=0)),  # type: ignore[arg-type]
                     float(abs(np.linalg.det(aff[:3, :3])) / 1000.0))
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
        return LungMasks(labels=ct.with_array(full), method=self.method)


def _segment(hu: npt.NDArray[np.float32], grid: _Grid, cfg: LungsConfig) -> npt.NDArray[np.uint8]:
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
    if airway is not None:
        cand &= ~ndi.binary_dilation(airway)
    # 3. lung components
    lab, n = ndi.label(cand)
    if n == 0:
        return np.zeros(hu.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    min_vox = cfg.min_component_ml / grid.voxel_ml
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
    return out


def _centroid_x(mask: BoolArray, grid: _Grid) -> float:
    """LPS x of the centroid of ``mask`` (0 for an empty mask)."""
    n = np.count_nonzero(mask)
    if n == 0:
        return 0.0
    com = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        prof = np.count_nonzero(mask, axis=other)
        com.append(float(prof @ np.arange(prof.size)) / n)
    return float(grid.lps(com)[0, 0])


def _straddles(mask: BoolArray, grid: _Grid, mid_x: float) -> bool:
    """True when a component has a substantial volume on both sides of the body midline."""
    idx = np.nonzero(mask)
    step = max(1, idx[0].size // 200_000)
    pts = np.stack([i[::step] for i in idx], axis=1)
    x = grid.lps(pts)[:, 0]
    frac = float(np.mean(x > mid_x))
    return min(frac, 1.0 - frac) > 0.2


def _split(mask: BoolArray, grid: _Grid) -> list[BoolArray]:
    """Split joined lungs: erode (distance map) until two large cores appear, grow them back."""
    sl = ndi.find_objects(mask.astype(np.uint8))[0]
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


def _airway(hu: npt.NDArray[np.float32], cand: BoolArray, grid: _Grid, cfg: LungsConfig,
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
            x = float(grid.lps([k, r0, c0])[0, 0])
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
        ml = grown.sum() * grid.voxel_ml
        if ml <= cfg.airway_max_ml:
            log.debug("lungs: airway %.0f ml grown below %.0f HU", ml, thr)
            return grown
    log.warning("lungs: the airway region leaked at every threshold; airways not removed")
    return None


def _repair(mask: BoolArray, hu: npt.NDArray[np.float32], grid: _Grid,
            cfg: LungsConfig, side: Side) -> BoolArray:
    """Fill holes per slice and recover dense pathology against the costal pleura.

    Per slice, each component of (convex hull of each 2-D piece - lung) is added when it is
    shallow (at most ``pleural_max_depth_mm`` below the hull), small (at most
    ``pleural_max_area_fraction`` of the slice's lung area, and not holding the lung's own
    centroid: a crescent of lung around the diaphragm dome is not pathology), dense (mean HU
    above ``pleural_min_mean_hu``) and not on the mediastinal side: a component whose
    centroid is medial to the slice's lung centroid by more than ``mediastinal_margin`` x
    the lung width *and* lies in the anterior three quarters of the lung is where the heart
    and mediastinum indent the lung (posterior paravertebral additions are kept).
    """
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return mask
    sl0 = found[0]
    sl = (sl0[0],
          slice(max(0, sl0[1].start - 1), min(mask.shape[1], sl0[1].stop + 1)),
          slice(max(0, sl0[2].start - 1), min(mask.shape[2], sl0[2].stop + 1)))
    filled = ndi.binary_fill_holes(mask[sl], structure=_INPLANE)
    h = hu[sl]
    out = filled.copy()
    a = grid.affine
    rr = np.arange(sl[1].start, sl[1].stop, dtype=np.float64)[:, None]
    cc = np.arange(sl[2].start, sl[2].stop, dtype=np.float64)[None, :]
    lateral = 1.0 if side == Side.LEFT else -1.0  # LPS +x is lateral for the left lung
    for i in range(filled.shape[0]):
        s = filled[i]
        if np.count_nonzero(s) < 10:
            continue
        hull = convex_hull_object(s, connectivity=2)  # per piece: never bridge two pieces
        add = hull & ~s
        if not add.any():
            continue
        k = i + sl[0].start
        x = np.broadcast_to(a[0, 0] * k + a[0, 1] * rr + a[0, 2] * cc + a[0, 3], s.shape)
        y = np.broadcast_to(a[1, 0] * k + a[1, 1] * rr + a[1, 2] * cc + a[1, 3], s.shape)
        xs, ys = x[s], y[s]
        n_lung = int(xs.size)
        rr_s, cc_s = np.nonzero(s)
        gr, gc = round(float(rr_s.mean())), round(float(cc_s.mean()))
        gx = float(xs.mean())
        width = max(float(xs.max() - xs.min()), 1.0)
        y_lo, y_hi = float(ys.min()), float(ys.max())
        depth = ndi.distance_transform_edt(hull, sampling=grid.spacing[1:])
        lab, _ = ndi.label(add)
        for j, csl in enumerate(ndi.find_objects(lab), start=1):
            if csl is None:
                continue
            comp = lab[csl] == j
            if float(depth[csl][comp].max()) > cfg.pleural_max_depth_mm:
                continue
            if np.count_nonzero(comp) > cfg.pleural_max_area_fraction * n_lung:
                continue  # a crescent of lung around an organ (diaphragm dome, heart)
            if csl[0].start <= gr < csl[0].stop and csl[1].start <= gc < csl[1].stop \
                    and comp[gr - csl[0].start, gc - csl[1].start]:
                continue  # holds the lung's own centroid: the lung wraps around it
            if float(h[i][csl][comp].mean()) < cfg.pleural_min_mean_hu:
                continue
            cx, cy = float(x[csl][comp].mean()), float(y[csl][comp].mean())
            medial = (cx - gx) * lateral < -cfg.mediastinal_margin * width
            anterior = cy < y_lo + 0.75 * (y_hi - y_lo)
            if medial and anterior:
                continue
            view = out[i][csl]
            view[comp] = True
    res = mask.copy()
    res[sl] = out
    return res


def segmenter_for(config: LungsConfig) -> LungSegmenter:
    """The segmenter named by ``config.method``."""
    if config.method == "classical":
        return ClassicalLungSegmenter(config)
    raise ConfigError(f"lungs.method: expected one of ['classical'], got {config.method!r}")


def segment_lungs(ct: Volume, config: LungsConfig | None = None) -> LungMasks:
    """Convenience: segment with the configured method."""
    return segmenter_for(config or LungsConfig())(ct)
