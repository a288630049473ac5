"""CT + lungs -> lesion labels (GGO / consolidation) -> findings, figures and scores.

Two parts, so that a learned model can replace the first without touching the second:

- a :class:`LesionDetector` turns (CT, lungs) into a label volume (``LESION_LABELS``);
  :class:`DensityLesionDetector` is the first, honest, density-based one;
- :func:`analyse` measures any label volume: per-lesion findings, per-lung and per-zone
  involvement, a severity score, a suspicion score and the study-level call.

The density detector (all thresholds in :class:`~pipeline.config.LesionsConfig`):

1. works on the lungs' bounding box at about ``working_spacing_mm`` in-plane, smoothed with
   a Gaussian of ``smoothing_sigma_mm``;
2. abnormal = lung voxels denser than ``ggo_min_hu``; consolidation = denser than
   ``consolidation_min_hu``; voxels above ``consolidation_max_hu`` (calcification, contrast
   filled vessels) are neither;
3. vessel suppression: each mask is opened with a cube of half-side
   ``vessel_opening_mm`` (separable box filters).  A cube of half-side a removes tubes of
   radius below a*sqrt(2) and keeps blobs of radius above a*sqrt(3): vessels go, lesions stay;
4. partial-volume suppression at the pleura: a component is kept only if it reaches into
   the lung eroded by ``edge_erosion_mm``; the kept lesions then grow back
   ``regrow_voxels`` voxels into abnormal neighbours (the corners the opening shaved off),
   and consolidation seeds grow one voxel into neighbours above ``consolidation_edge_hu``
   (the partial-volume rim of a dense lesion);
5. lesions smaller than ``min_lesion_ml`` are dropped; the result is restricted to the
   lung mask (no finding ever lies outside the lungs).

Severity: the CT severity score of Pan F. et al., Radiology 2020;295(3):715-721 scores each of
five lobes 0-5 by the percentage involved; without a lobe segmentation we score six zones
(each lung's upper / middle / lower third of its own craniocaudal extent), total 0-30.

Suspicion (0..1, for ranking only, not a probability):
``s = 1 - exp(-p / 5)`` with ``p`` the involved percentage of both lungs, raised to the
power ``1 / (1 + 0.1 * (zones - 1) + 0.25 * bilateral)`` where ``zones`` counts zones with
a non-zero score and ``bilateral`` is 1 when both lungs are involved.  The exponent is at
most 1, so spread across zones and lungs raises the score; for a fixed spread it increases
monotonically with involvement, and it is 0 without involvement.

The study-level call (:func:`rsna_category`) follows the pattern, not only the amount: the
four CT categories of the RSNA expert consensus statement (Simpson S et al., Radiol
Cardiothorac Imaging 2020;2(2):e200152).  The statement's typical appearance is peripheral,
bilateral ground glass with or without consolidation (or multifocal rounded ground glass);
indeterminate is ground glass without that distribution (unilateral, central, perihilar,
diffuse, or a few small foci); atypical is isolated lobar or segmental consolidation without
ground glass, discrete nodules, cavitation; negative is no feature of pneumonia.  From the
findings (every one, not only the reported ones) the rule reads, as shares of the involved
volume: the share in the less involved lung, the peripheral share (voxels within
``peripheral_depth_mm`` of the pleura, :class:`PleuralDepth`), the ground-glass share and
the largest focus's share.  In order, the first that holds (thresholds in LesionsConfig):

=============  ==========================================================================
negative       involvement of both lungs < ``indeterminate_min_pct`` (0.1%), or no finding
typical        bilateral (less involved lung >= ``bilateral_min_share``, 0.1) and
               peripheral (>= ``peripheral_min_share``, 0.5) and ground glass
               (>= ``typical_min_ggo_share``, 0.25) and involvement >= ``typical_min_pct``
               (1%): bilateral, multifocal, predominantly peripheral GGO
atypical       consolidation-dominant (>= ``atypical_min_consolidation_share``, 0.7) and
               either unilateral or solitary (largest focus >= ``solitary_min_share``,
               0.8): a lobar or segmental consolidation, a mass, a dense nodule
indeterminate  the rest: unilateral or central or diffuse ground glass, bilateral disease
               below 1% or without the typical distribution, mixed findings
=============  ==========================================================================

Multifocality enters through laterality (bilateral involvement is at least two foci) and
the largest focus's share (solitary).  Nodules, cavitation, septal thickening, effusion,
crazy paving and the reversed halo are not detected, so a solitary ground-glass nodule is
indeterminate, and a consolidation that is not dense enough to be marked as consolidation
counts as ground glass.  The peripheral depth of 25 mm is about the outer third of an
adult chest (whose deepest point lies 75-100 mm under the pleura).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from .artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    Finding,
    LesionAnalysis,
    LesionKind,
    LungFigure,
    LungMasks,
    Pattern,
    Side,
    Volume,
    Zone,
    ZoneFigure,
    bounding_box,
)
from .config import LesionsConfig
from .errors import ConfigError
from .lungs import block_mean, block_upsample, working_factors

log = logging.getLogger(__name__)

SEVERITY_SCALE = (
    "CT severity score (Pan F et al., Radiology 2020;295(3):715-721), "
    "adapted to six lung zones, 0-30"
)
SEVERITY_MAX = 30
ZONES = (Zone.UPPER, Zone.MIDDLE, Zone.LOWER)
SIDES = (Side.RIGHT, Side.LEFT)
BoolArray = npt.NDArray[np.bool_]


class LesionDetector(Protocol):
    """Anything that marks lesions: (CT in HU, lungs) -> uint8 LESION_LABELS on the CT grid."""

    name: str
    version: str

    def __call__(self, ct: Volume, lungs: LungMasks) -> Volume: ...


# --------------------------------------------------------------------------- detector


def _box_erode(mask: BoolArray, half: tuple[int, int, int]) -> BoolArray:
    """Erosion by a (2h+1)-voxel cuboid, with separable box filters (outside counts as 0)."""
    size = tuple(2 * h + 1 for h in half)
    f = ndi.uniform_filter(mask.astype(np.float32), size=size, mode="constant", cval=0.0)
    return np.asarray(f > 1.0 - 1e-4)


def _box_dilate(mask: BoolArray, half: tuple[int, int, int]) -> BoolArray:
    size = tuple(2 * h + 1 for h in half)
    f = ndi.uniform_filter(mask.astype(np.float32), size=size, mode="constant", cval=0.0)
    return np.asarray(f > 1e-4)


def _box_open(mask: BoolArray, half: tuple[int, int, int]) -> BoolArray:
    return _box_dilate(_box_erode(mask, half), half) & mask


def _keep_touching(mask: BoolArray, seeds: BoolArray) -> BoolArray:
    """Components of ``mask`` (26-connected) that contain at least one seed voxel."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(lab[seeds & mask])] = True
    keep[0] = False
    return np.asarray(keep[lab])


def _drop_small(mask: BoolArray, min_voxels: float) -> BoolArray:
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return np.asarray(keep[lab])


def settle_kinds(labels: npt.NDArray[np.uint8], min_voxels: float) -> npt.NDArray[np.uint8]:
    """Labels whose pieces of one kind are not smaller than ``min_voxels`` where they touch
    the other kind: such a piece (26-connected) takes the kind around it, consolidation
    first.  ``min_lesion_ml`` applies to lesions of both kinds together; without this a
    one-voxel speck of one kind on the edge of the other would be a finding of its own.
    Where a lesion is does not change."""
    out = labels
    st = np.ones((3, 3, 3), dtype=bool)
    for kind, other in ((2, 1), (1, 2)):
        box = bounding_box(out == kind)
        if box is None:
            continue
        sub = out[box]
        lab, n = ndi.label(sub == kind, structure=st)
        small = np.bincount(lab.ravel(), minlength=n + 1) < min_voxels
        small[0] = False
        if not small.any():
            continue
        near_other = ndi.binary_dilation(sub == other, structure=st)
        touches = np.zeros(n + 1, dtype=bool)
        touches[np.unique(lab[near_other])] = True
        flip = small & touches
        flip[0] = False
        if flip.any():
            out = out.copy() if out is labels else out
            view = out[box]
            view[flip[lab]] = other
    return out


class DensityLesionDetector:
    """Density bands + vessel and partial-volume suppression (see the module docstring)."""

    name = "density-threshold"
    version = "1.0"

    def __init__(self, config: LesionsConfig) -> None:
        self.config = config

    def __call__(self, ct: Volume, lungs: LungMasks) -> Volume:
        cfg = self.config
        t0 = time.perf_counter()
        if lungs.labels.shape != ct.shape:
            raise ValueError(f"lung labels shape {lungs.labels.shape} does not match the CT "
                             f"grid {ct.shape}")
        lung_full = lungs.mask()
        out = np.zeros(ct.shape, dtype=np.uint8)
        sl = bounding_box(lung_full)
        if sl is None:
            return ct.with_array(out)
        f = working_factors(ct.spacing, cfg.working_spacing_mm)
        hu = block_mean(ct.array[sl], f)
        lung = block_mean(lung_full[sl], f) >= 0.5
        work = ct.grid.crop(sl).downsample(f)  # the grid of hu and lung
        sp, voxel_ml = work.spacing, work.voxel_volume_ml
        s = ndi.gaussian_filter(hu, sigma=[cfg.smoothing_sigma_mm / v for v in sp], truncate=2.0)

        def half(mm: float) -> tuple[int, int, int]:
            return (max(1, math.ceil(mm / sp[0] - 1e-6)), max(1, math.ceil(mm / sp[1] - 1e-6)),
                    max(1, math.ceil(mm / sp[2] - 1e-6)))

        h_open = half(cfg.vessel_opening_mm)
        core = _box_erode(lung, half(cfg.edge_erosion_mm))
        dense = lung & (s > cfg.ggo_min_hu)
        abnormal = _box_open(dense, h_open)
        abnormal = _keep_touching(abnormal, core)
        for _ in range(cfg.regrow_voxels):  # give back the corners the opening shaved off
            abnormal |= _box_dilate(abnormal, (1, 1, 1)) & dense
        cons = _box_open(lung & (s > cfg.consolidation_min_hu), h_open) & abnormal
        cons |= _box_dilate(cons, (1, 1, 1)) & abnormal & (s > cfg.consolidation_edge_hu)
        too_dense = s > cfg.consolidation_max_hu
        cons &= ~too_dense
        ggo = abnormal & ~cons & ~too_dense
        ggo = _box_open(ggo, half(cfg.ggo_shell_opening_mm))
        keep = _drop_small(ggo | cons, cfg.min_lesion_ml / voxel_ml)
        small = np.zeros(hu.shape, dtype=np.uint8)
        small[ggo & keep] = LESION_LABELS[LesionKind.GGO]
        small[cons & keep] = LESION_LABELS[LesionKind.CONSOLIDATION]
        crop_shape = tuple(x.stop - x.start for x in sl)
        up = np.asarray(block_upsample(small, f, crop_shape))
        out[sl] = np.where(lung_full[sl], up, 0)
        log.info("lesions: %s %s on %s voxels in %.2f s", self.name, self.version,
                 hu.shape, time.perf_counter() - t0)
        return ct.with_array(out)


def detector_for(config: LesionsConfig) -> LesionDetector:
    """The detector named by ``config.detector``."""
    if config.detector == "density":
        return DensityLesionDetector(config)
    if config.detector == "onnx":
        from .inference import OnnxLesionDetector

        return OnnxLesionDetector(config)
    if config.detector == "lung-model":
        from .inference import LungModelLesionDetector

        return LungModelLesionDetector(config)
    raise ConfigError(f"lesions.detector: expected one of ['density', 'onnx', 'lung-model'], "
                      f"got {config.detector!r}")


# --------------------------------------------------------------------------- measurement


def severity_zone_score(involved_pct: float) -> int:
    """Pan et al. 2020 per-region score: 0 none, 1 <5%, 2 5-25%, 3 26-49%, 4 50-75%, 5 >75%."""
    if involved_pct <= 0.0:
        return 0
    if involved_pct < 5.0:
        return 1
    if involved_pct <= 25.0:
        return 2
    if involved_pct < 50.0:
        return 3
    if involved_pct <= 75.0:
        return 4
    return 5


def suspicion_score(involved_pct: float, n_zones: int, bilateral: bool) -> float:
    """Ranking score in [0, 1]; see the module docstring for the formula."""
    if involved_pct <= 0.0:
        return 0.0
    base = 1.0 - math.exp(-involved_pct / 5.0)
    exponent = 1.0 / (1.0 + 0.1 * max(0, n_zones - 1) + 0.25 * float(bilateral))
    return float(min(1.0, base ** exponent))


def analyse(ct: Volume, lungs: LungMasks, labels: Volume, config: LesionsConfig,
            detector_name: str) -> LesionAnalysis:
    """Measure a lesion label volume against the lungs (see the module docstring)."""
    if labels.shape != ct.shape or lungs.labels.shape != ct.shape:
        raise ValueError(f"grids differ: CT {ct.shape}, lungs {lungs.labels.shape}, "
                         f"lesions {labels.shape}")
    lung_lab = lungs.labels.array
    les = np.where(lung_lab > 0, labels.array, 0).astype(np.uint8)  # never outside the lungs
    vml = ct.voxel_volume_ml
    # min_lesion_ml holds for what is inside the lungs (a detector's lesion cut by the lung
    # boundary can leave a speck); then no piece of one kind smaller than that either
    les_box = bounding_box(les > 0)
    if les_box is not None:
        sub = les[les_box]
        sub[~_drop_small(sub > 0, config.min_lesion_ml / vml)] = 0
    les = settle_kinds(les, config.min_lesion_ml / vml)
    # per side and zone: lung, GGO and consolidation voxel counts (slab-wise LPS z, float32)
    grid = ct.grid
    box = bounding_box(lung_lab)
    z_ext = {s: (math.inf, -math.inf) for s in SIDES}
    counts = {(s, z, what): 0 for s in SIDES for z in ZONES for what in ("lung", 1, 2)}
    slabs: list[tuple[int, int]] = []
    if box is not None:
        step = max(1, 4_000_000 // ((box[1].stop - box[1].start) * (box[2].stop - box[2].start)))
        slabs = [(k, min(box[0].stop, k + step)) for k in range(box[0].start, box[0].stop, step)]
        for k0, k1 in slabs:
            z = grid.lps_coordinate(2, (slice(k0, k1), box[1], box[2]), np.float32)
            lab = lung_lab[k0:k1, box[1], box[2]]
            for s in SIDES:
                zs = z[lab == LUNG_LABELS[s]]
                if zs.size:
                    lo, hi = z_ext[s]
                    z_ext[s] = (min(lo, float(zs.min())), max(hi, float(zs.max())))
        for k0, k1 in slabs:
            z = grid.lps_coordinate(2, (slice(k0, k1), box[1], box[2]), np.float32)
            lab = lung_lab[k0:k1, box[1], box[2]]
            ls = les[k0:k1, box[1], box[2]]
            for s in SIDES:
                m = lab == LUNG_LABELS[s]
                if not m.any():
                    continue
                zone_idx = _zone_index(z[m], z_ext[s])
                lsm = ls[m]
                for zi, zone in enumerate(ZONES):
                    inz = zone_idx == zi
                    counts[(s, zone, "lung")] += int(np.count_nonzero(inz))
                    counts[(s, zone, 1)] += int(np.count_nonzero(inz & (lsm == 1)))
                    counts[(s, zone, 2)] += int(np.count_nonzero(inz & (lsm == 2)))
    zones: list[ZoneFigure] = []
    for s in SIDES:
        for zone in ZONES:
            lung_ml = counts[(s, zone, "lung")] * vml
            inv_ml = (counts[(s, zone, 1)] + counts[(s, zone, 2)]) * vml
            pct = 100.0 * inv_ml / lung_ml if lung_ml > 0 else 0.0
            zones.append(ZoneFigure(s, zone, lung_ml, inv_ml, pct, severity_zone_score(pct)))
    lung_figs: list[LungFigure] = []
    for s in SIDES:
        vol = sum(counts[(s, z, "lung")] for z in ZONES) * vml
        g = sum(counts[(s, z, 1)] for z in ZONES) * vml
        c = sum(counts[(s, z, 2)] for z in ZONES) * vml
        lung_figs.append(LungFigure(s, vol, g, c, 100.0 * (g + c) / vol if vol > 0 else 0.0))
    total_lung = sum(f.volume_ml for f in lung_figs)
    total_inv = sum(f.ggo_ml + f.consolidation_ml for f in lung_figs)
    involved_pct = 100.0 * total_inv / total_lung if total_lung > 0 else 0.0
    every = _findings(ct, lung_lab, les, z_ext, box, config.peripheral_depth_mm)
    severity = sum(zf.score for zf in zones)
    n_zones = sum(1 for zf in zones if zf.score > 0)
    bilateral = all(f.ggo_ml + f.consolidation_ml > 0 for f in lung_figs)
    pattern = rsna_category(every, involved_pct, config)
    features = pattern_features(every)
    log.info("lesions: %d findings, %.2f%% involved -> %s (less involved lung %.2f, "
             "peripheral %.2f, ground glass %.2f, largest focus %.2f of the involvement)",
             len(every), involved_pct, pattern, features.minor_lung_share,
             features.peripheral_share, features.ggo_share, features.largest_share)
    return LesionAnalysis(
        labels=ct.with_array(les),
        findings=every[: config.max_reported_findings],
        lungs=(lung_figs[0], lung_figs[1]),
        zones=tuple(zones),
        involved_pct=involved_pct,
        severity_score=severity,
        severity_max=SEVERITY_MAX,
        severity_scale=SEVERITY_SCALE,
        suspicion=suspicion_score(involved_pct, n_zones, bilateral),
        pattern=pattern,
        detector=detector_name,
        n_findings_total=len(every),
    )


def _zone_index(z: npt.NDArray[np.floating], ext: tuple[float, float]) -> npt.NDArray[np.intp]:
    """0 upper, 1 middle, 2 lower third of the lung's own extent in LPS z (superior = +z)."""
    lo, hi = ext
    span = max(hi - lo, 1e-6)
    frac = (hi - np.asarray(z, dtype=np.float64)) / span  # 0 at the apex, 1 at the base
    return np.asarray(np.clip((frac * 3.0).astype(np.intp), 0, 2))


def _findings(ct: Volume, lung_lab: npt.NDArray[np.uint8], les: npt.NDArray[np.uint8],
              z_ext: dict[Side, tuple[float, float]], lung_box: tuple[slice, ...] | None,
              peripheral_mm: float) -> tuple[Finding, ...]:
    """Connected components (26-connected) per kind, every one, ranked by volume."""
    rows = []
    box = bounding_box(les)  # work on the lesions' bounding box only
    if box is None or lung_box is None:
        return ()
    start = np.array([b.start for b in box])
    depth = PleuralDepth.around(lung_lab, ct, box, lung_box, peripheral_mm)
    les_b, lung_b, hu_b = les[box], lung_lab[box], ct.array[box]
    for kind, value in LESION_LABELS.items():
        lab, n = ndi.label(les_b == value, structure=np.ones((3, 3, 3), dtype=bool))
        if n == 0:
            continue
        idx = np.nonzero(lab)
        comp = lab[idx] - 1
        cnt = np.bincount(comp, minlength=n)
        hu_sum = np.bincount(comp, weights=hu_b[idx].astype(np.float64), minlength=n)
        kji = np.stack(idx, axis=1) + start
        lps = ct.index_to_lps(kji)
        sums = [np.bincount(comp, weights=lps[:, a], minlength=n) for a in range(3)]
        near = np.bincount(comp, weights=(depth.at(kji) <= peripheral_mm).astype(np.float64),
                           minlength=n)
        lo = np.full((n, 3), np.inf)
        hi = np.full((n, 3), -np.inf)
        for a in range(3):
            np.minimum.at(lo[:, a], comp, lps[:, a])
            np.maximum.at(hi[:, a], comp, lps[:, a])
        k_lo = np.full((n, 3), np.iinfo(np.int64).max)
        k_hi = np.full((n, 3), -1)
        for a in range(3):
            np.minimum.at(k_lo[:, a], comp, kji[:, a])
            np.maximum.at(k_hi[:, a], comp, kji[:, a])
        _, first = np.unique(comp, return_index=True)  # one voxel of each component
        side_votes = np.zeros((n, 3), dtype=np.int64)
        np.add.at(side_votes, (comp, lung_b[idx].astype(np.intp)), 1)
        for i in range(n):
            centroid = (sums[0][i] / cnt[i], sums[1][i] / cnt[i], sums[2][i] / cnt[i])
            side = (Side.LEFT if side_votes[i, LUNG_LABELS[Side.LEFT]]
                    > side_votes[i, LUNG_LABELS[Side.RIGHT]] else Side.RIGHT)
            zone = ZONES[int(_zone_index(np.array([centroid[2]]), z_ext[side])[0])]
            rows.append((int(cnt[i]), kind, side, zone, float(hu_sum[i] / cnt[i]),
                         centroid, tuple(lo[i]), tuple(hi[i]), float(near[i] / cnt[i]),
                         (*(int(v) for v in k_lo[i]), *(int(v) + 1 for v in k_hi[i])),
                         tuple(int(v) for v in kji[first[i]])))
    rows.sort(key=lambda r: -r[0])
    vml = ct.voxel_volume_ml
    return tuple(
        Finding(index=j + 1, kind=r[1], volume_ml=r[0] * vml, side=r[2], zone=r[3],
                mean_hu=r[4], centroid_lps=tuple(float(v) for v in r[5]),  # type: ignore[arg-type]
                bbox_min_lps=tuple(float(v) for v in r[6]),  # type: ignore[arg-type]
                bbox_max_lps=tuple(float(v) for v in r[7]),  # type: ignore[arg-type]
                voxel_count=r[0], peripheral_fraction=r[8], voxel_box=r[9], seed_index=r[10])
        for j, r in enumerate(rows)
    )


def finding_mask(labels: npt.NDArray[np.uint8], finding: Finding
                 ) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_]]:
    """The voxels of one finding: its index box and, inside it, the 26-connected component
    of its kind that holds its seed voxel (as ``_findings`` found it).  Raises ValueError
    where the labels do not hold that finding (no box, or another voxel count)."""
    if len(finding.voxel_box) != 6 or len(finding.seed_index) != 3:
        raise ValueError(f"finding {finding.index} has no voxel box / seed on the CT grid")
    k0, r0, c0, k1, r1, c1 = finding.voxel_box
    box = (slice(k0, k1), slice(r0, r1), slice(c0, c1))
    lab, _ = ndi.label(labels[box] == LESION_LABELS[finding.kind],
                       structure=np.ones((3, 3, 3), dtype=bool))
    seed = tuple(int(i - b.start) for i, b in zip(finding.seed_index, box, strict=True))
    mask = (lab == lab[seed]) & (lab[seed] > 0)
    n = int(np.count_nonzero(mask))
    if n != finding.voxel_count:
        raise ValueError(f"finding {finding.index}: expected {finding.voxel_count} voxels of "
                         f"{finding.kind} at its seed, the labels hold {n}")
    return box, mask


# --------------------------------------------------------------------------- position


DEPTH_GRID_MM = 3.0  # the pleural depth is computed on a grid of about this spacing


@dataclass(frozen=True, eq=False)
class PleuralDepth:
    """Depth below the pleura (mm) on a coarse grid around the lesions.

    The chest cavity is the lung mask with, along each line of the axis that runs closest
    to patient left-right (LPS x, found from the grid's direction), everything between the
    line's first and last lung voxel filled in: the mediastinum, heart and spine between the
    lungs become inside, so that the lungs' mediastinal surfaces do not count as "pleura"
    and a perihilar lesion is central.  The depth of a voxel is its distance to the nearest
    voxel outside that cavity (costal, diaphragmatic and apical pleura).  Only depths up to
    ``cap_mm`` are exact: the grid spans the lesions' box widened by ``cap_mm`` (the whole
    lung extent along x, where the fill needs whole lines); deeper is "deeper than cap_mm".
    """

    depth_mm: npt.NDArray[np.float32]
    start: npt.NDArray[np.intp]  # full-grid index of coarse voxel (0, 0, 0)
    step: npt.NDArray[np.intp]  # full-grid voxels per coarse voxel, per axis

    @classmethod
    def around(cls, lung_lab: npt.NDArray[np.uint8], ct: Volume, lesion_box: tuple[slice, ...],
               lung_box: tuple[slice, ...], cap_mm: float) -> PleuralDepth:
        sp = ct.spacing
        x_axis = int(np.argmax(np.abs(ct.direction[0])))
        crop = []
        for a in range(3):
            if a == x_axis:
                crop.append(lung_box[a])
            else:
                m = math.ceil(cap_mm / sp[a]) + 1
                crop.append(slice(max(0, lesion_box[a].start - m),
                                  min(lung_lab.shape[a], lesion_box[a].stop + m)))
        step = [max(1, round(DEPTH_GRID_MM / v)) for v in sp]
        coarse = tuple(slice(c.start, c.stop, f) for c, f in zip(crop, step, strict=True))
        lung = np.asarray(lung_lab[coarse] > 0)
        fwd = np.logical_or.accumulate(lung, axis=x_axis)
        bwd = np.flip(np.logical_or.accumulate(np.flip(lung, axis=x_axis), axis=x_axis),
                      axis=x_axis)
        pad = [(1, 1) if a == x_axis else (0, 0) for a in range(3)]
        cavity = np.pad(fwd & bwd, pad, constant_values=False)  # outside beyond the lungs
        depth = ndi.distance_transform_edt(cavity, sampling=ct.grid.crop(coarse).spacing)
        inner = tuple(slice(1, -1) if a == x_axis else slice(None) for a in range(3))
        return cls(np.asarray(depth[inner], dtype=np.float32),
                   np.array([c.start for c in crop], dtype=np.intp),
                   np.asarray(step, dtype=np.intp))

    def at(self, kji: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """Depth (mm) at full-grid voxel indices (N, 3), from the nearest coarse voxel."""
        idx = np.rint((kji - self.start) / self.step).astype(np.intp)
        np.clip(idx, 0, np.asarray(self.depth_mm.shape) - 1, out=idx)
        return np.asarray(self.depth_mm[idx[:, 0], idx[:, 1], idx[:, 2]])


# --------------------------------------------------------------------------- the call


@dataclass(frozen=True)
class PatternFeatures:
    """What the study-level call reads, as shares of the involved volume (0..1)."""

    involved_ml: float
    minor_lung_share: float  # held by the less involved lung (0: unilateral)
    peripheral_share: float  # within LesionsConfig.peripheral_depth_mm of the pleura
    ggo_share: float  # ground glass (the rest is consolidation)
    largest_share: float  # held by the largest focus (1: solitary)
    n_foci: int


def pattern_features(findings: Sequence[Finding]) -> PatternFeatures:
    """The figures :func:`rsna_category` decides on, from every finding of the study."""
    total = sum(f.volume_ml for f in findings)
    if total <= 0:
        return PatternFeatures(0.0, 0.0, 0.0, 0.0, 0.0, 0)
    per_side = {s: sum(f.volume_ml for f in findings if f.side == s) for s in SIDES}
    return PatternFeatures(
        involved_ml=total,
        minor_lung_share=min(per_side.values()) / total,
        peripheral_share=sum(f.volume_ml * f.peripheral_fraction for f in findings) / total,
        ggo_share=sum(f.volume_ml for f in findings if f.kind is LesionKind.GGO) / total,
        largest_share=max(f.volume_ml for f in findings) / total,
        n_foci=len(findings),
    )


def rsna_category(findings: Sequence[Finding], involved_pct: float,
                  config: LesionsConfig) -> Pattern:
    """The study's RSNA category for COVID-19 pneumonia (see the module docstring).

    ``findings``: every finding of the study (not only the reported ones);
    ``involved_pct``: both lungs together.  Pure: the same inputs give the same call.
    """
    f = pattern_features(findings)
    if f.involved_ml <= 0 or involved_pct < config.indeterminate_min_pct:
        return Pattern.NEGATIVE
    bilateral = f.minor_lung_share >= config.bilateral_min_share
    if (bilateral and f.peripheral_share >= config.peripheral_min_share
            and f.ggo_share >= config.typical_min_ggo_share
            and involved_pct >= config.typical_min_pct):
        return Pattern.TYPICAL
    consolidation_dominant = 1.0 - f.ggo_share >= config.atypical_min_consolidation_share
    if consolidation_dominant and (not bilateral or f.largest_share >= config.solitary_min_share):
        return Pattern.ATYPICAL
    return Pattern.INDETERMINATE


def detect_and_analyse(ct: Volume, lungs: LungMasks, config: LesionsConfig) -> LesionAnalysis:
    """Run the configured detector and measure its output."""
    det = detector_for(config)
    labels = det(ct, lungs)
    return analyse(ct, lungs, labels, config, f"{det.name} {det.version}")
