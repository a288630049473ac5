"""Layout (c): realistic synthetic lesions inserted into real, lesion-free lung parenchyma.

Source: one real thin-slice chest CT as a DICOM series (LIDC-IDRI-0314 in ../shared/data).
Its lungs are segmented with the pipeline's classical method, and everything the density
detector finds dense there (LIDC-IDRI-0314's opacified right upper lobe, its nodule), dilated
by 5 mm, is EXCLUDED: nothing is inserted there and it is labelled 255 (ignore), so the model
is never taught that a real opacity is background.

The lung slices are split along the body axis (LPS z): the inferior 30% are never modified
or trained on and form ``negative`` cases (blocks of 10 slices, labels all background, no
ignore) for measuring false positives of both detectors; the superior 70% feed the
``synthetic`` training cases.  Both come from one patient: the negative blocks are unseen
slices, not an unseen patient.

One lesion (:func:`insert_lesion`), at native resolution, in HU:

- centre: a random lung voxel at least 3 mm inside the lung, 70% of them within 25 mm of
  the pleura (COVID-19 opacities are mostly peripheral);
- shape: an ellipsoid (radii 6-25 mm for ground glass, 5-18 mm for consolidation) whose
  boundary is perturbed by smooth noise (sigma 3 mm); a soft 0..1 weight ``w`` rises over
  the outer quarter of the shape;
- density: a target ``t`` (ground glass -700..-450 HU, consolidation -80..+30 HU) plus smooth
  texture (sigma 1.5 mm; +-50 HU ground glass, +-20 HU consolidation).  The voxel becomes
  ``max(hu, hu + w * (t - smooth(hu)))``
(computed from the unmodified CT): the CT's own noise and fine structure survive,
  vessels stay at least as dense as they were (ground glass does not erase vessels); in a
  consolidation, airway voxels (below -950 HU) keep half their air (air bronchograms);
- a consolidation gets a ground-glass halo (the same shape, radii x 1.4, -550 HU);
- label: the kind where ``w >= 0.5``, consolidation over ground glass.

Realism check, stored in the manifest: HU percentiles of the inserted lesion voxels next to
those of the real annotated lesions of the 8-bit set (through the fixed intensity map).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from ..config import LesionsConfig, LungsConfig
from ..lesions import DensityLesionDetector
from ..lungs import segment_lungs
from .dataset import IGNORE, CaseRecord, _hu_summary, read_dicom_series, save_case

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
HELD_OUT_INFERIOR_FRACTION = 0.3
NEGATIVE_BLOCK = 10


def _smooth_noise(shape: tuple[int, ...], sigma_vox: tuple[float, ...],
                  rng: np.random.Generator) -> F32:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return np.asarray(n / max(float(n.std()), 1e-6), dtype=np.float32)


def insert_lesion(hu: F32, base: F32, smooth: F32, lung: npt.NDArray[np.bool_],
                  allowed: npt.NDArray[np.bool_], label: npt.NDArray[np.uint8], kind: int,
                  spacing: tuple[float, float, float], rng: np.random.Generator,
                  centre: tuple[int, int, int] | None = None,
                  radii_mm: tuple[float, float, float] | None = None,
                  target_hu: float | None = None) -> int:
    """Insert one lesion of ``kind`` (1 GGO, 2 consolidation) into ``hu`` in place.

    ``base`` is the unmodified CT and ``smooth`` its smoothed copy: lesions never compound
    (an overlap takes the denser of the two).  Returns the lesion's labelled voxels."""
    if centre is None:
        dist = ndi.distance_transform_edt(lung, sampling=spacing)
        cand = allowed & (dist >= 3.0)
        if rng.random() < 0.7:
            cand &= dist <= 25.0
        idx = np.argwhere(cand)
        if len(idx) == 0:
            return 0
        centre = tuple(int(v) for v in idx[rng.integers(len(idx))])  # type: ignore[assignment]
    assert centre is not None
    if radii_mm is None:
        lo, hi = (6.0, 25.0) if kind == 1 else (5.0, 18.0)
        radii_mm = tuple(float(v) for v in rng.uniform(lo, hi, 3))  # type: ignore[assignment]
    assert radii_mm is not None
    if target_hu is None:
        target_hu = float(rng.uniform(-700, -450) if kind == 1 else rng.uniform(-80, 30))
    reach = 1.4 * np.asarray(radii_mm) * (1.4 if kind == 2 else 1.0)
    win = tuple(slice(max(0, c - int(np.ceil(r / s))), min(n, c + int(np.ceil(r / s)) + 1))
                for c, r, s, n in zip(centre, reach, spacing, hu.shape, strict=True))
    shape = tuple(w.stop - w.start for w in win)
    grids = np.meshgrid(*[(np.arange(w.start, w.stop) - c) * s
                          for w, c, s in zip(win, centre, spacing, strict=True)], indexing="ij")
    sig = tuple(3.0 / s for s in spacing)
    bump = _smooth_noise(shape, sig, rng)
    tex = _smooth_noise(shape, tuple(1.5 / s for s in spacing), rng)
    n_vox = 0
    delta = np.zeros(shape, dtype=np.float32)
    layers = [(1, 1.4, -550.0, 50.0), (2, 1.0, target_hu, 20.0)] if kind == 2 else \
        [(1, 1.0, target_hu, 50.0)]
    for lab_value, scale, t_hu, amp in layers:
        q = sum((g / (r * scale)) ** 2 for g, r in zip(grids, radii_mm, strict=True))
        field = 1.0 - q + 0.35 * bump
        w = np.clip(field / 0.25, 0.0, 1.0).astype(np.float32)
        w = ndi.gaussian_filter(w, 0.7)
        ok = lung[win] & allowed[win]
        w[~ok] = 0.0
        if lab_value == 2:
            w[hu[win] < -950.0] *= 0.5  # air bronchograms
        target = np.float32(t_hu) + np.float32(amp) * tex
        delta = np.maximum(delta, w * (target - smooth[win]))
        hu[win] = np.maximum(hu[win], base[win] + delta)
        on = (w >= 0.5) & ok
        lab = label[win]
        lab[on & (lab < lab_value)] = lab_value
        label[win] = lab
        n_vox += int(np.count_nonzero(on))
    return n_vox


def import_synthetic(ct_dir: Path, out: Path, n_cases: int, seed: int,
                     lesions_per_case: tuple[int, int] = (3, 8),
                     keep_every: int = 4) -> tuple[list[CaseRecord], dict[str, Any]]:
    """Layout (c): ``n_cases`` training cases with inserted lesions + held-out negatives."""
    ct, _ = read_dicom_series(ct_dir)
    name = ct_dir.name
    lungs = segment_lungs(ct, LungsConfig(method="classical"))
    lung = lungs.mask()
    dense = DensityLesionDetector(LesionsConfig())(ct, lungs).array > 0
    sp = ct.spacing
    exclusion = ndi.binary_dilation(dense, iterations=max(1, round(5.0 / sp[1]))) if \
        dense.any() else dense
    log.info("synthetic: %s: %.0f ml found dense by the density detector excluded (ignore)",
             name, np.count_nonzero(dense) * ct.voxel_volume_ml)
    ks, rs, cs = ndi.find_objects(lung.astype(np.uint8))[0]
    m = 15
    box_rc = (slice(max(0, rs.start - m), rs.stop + m), slice(max(0, cs.start - m), cs.stop + m))
    lung_k = [k for k in range(ks.start, ks.stop) if lung[k].any()]
    z = ct.index_to_lps(np.array([[k, 0, 0] for k in lung_k]))[:, 2]
    order = [lung_k[i] for i in np.argsort(z)]  # inferior first
    n_neg = round(HELD_OUT_INFERIOR_FRACTION * len(order))
    neg_k = sorted(order[:n_neg])
    train_k = sorted(order[n_neg:])
    records: list[CaseRecord] = []
    for b in range(0, len(neg_k), NEGATIVE_BLOCK):
        kk = neg_k[b:b + NEGATIVE_BLOCK]
        if len(kk) < 3:
            continue
        sub = (kk, *box_rc)
        records.append(save_case(
            out, id=f"{name}-negative-{b // NEGATIVE_BLOCK:02d}", site=name, source="negative",
            group=f"{name}-negative-{b // NEGATIVE_BLOCK:02d}", hu=ct.array[sub],
            label=np.zeros((len(kk), *ct.array[sub].shape[1:]), np.uint8),
            region=lung[sub], spacing_rc=(sp[1], sp[2]), slice_mm=sp[0], fixed_split="test",
            note="inferior lung slices, never trained on; no COVID-19 findings (one patient "
                 "whose other slices are used for synthetic training cases)"))
    t0, t1 = min(train_k), max(train_k) + 1
    base = ct.array[t0:t1, box_rc[0], box_rc[1]].astype(np.float32)
    lung_t = lung[t0:t1, box_rc[0], box_rc[1]]
    excl_t = exclusion[t0:t1, box_rc[0], box_rc[1]]
    in_train = np.zeros(base.shape[0], dtype=bool)
    in_train[[k - t0 for k in train_k]] = True
    allowed = lung_t & ~excl_t & in_train[:, None, None]
    smooth = ndi.gaussian_filter(base, (1.0, 1.5 / sp[1], 1.5 / sp[2]))
    rng = np.random.default_rng(seed)
    hu_ins: dict[int, list[F32]] = {1: [], 2: []}
    for i in range(n_cases):
        hu = base.copy()
        label = np.zeros(hu.shape, dtype=np.uint8)
        n_les = int(rng.integers(lesions_per_case[0], lesions_per_case[1] + 1))
        for _ in range(n_les):
            kind = 1 if rng.random() < 0.6 else 2
            insert_lesion(hu, base, smooth, lung_t, allowed, label, kind, sp, rng)
        label[excl_t & lung_t] = IGNORE
        for kv in (1, 2):
            hu_ins[kv].append(hu[label == kv][::5])
        has = (label == 1).any(axis=(1, 2)) | (label == 2).any(axis=(1, 2))
        keep = [k for k in range(hu.shape[0])
                if in_train[k] and (has[k] or (k + i) % keep_every == 0)]
        records.append(save_case(
            out, id=f"{name}-synthetic-{i:02d}", site=name, source="synthetic", group=name,
            hu=hu[keep], label=label[keep], region=lung_t[keep], spacing_rc=(sp[1], sp[2]),
            slice_mm=sp[0], fixed_split="train",
            note=f"{n_les} inserted lesions, seed {seed}, case {i}"))
        log.info("synthetic case %d: %d lesions, %d slices kept", i, n_les, len(keep))
    realism = {"inserted": {"ggo": _hu_summary(np.concatenate(hu_ins[1])) if hu_ins[1] else {},
                            "consolidation": _hu_summary(np.concatenate(hu_ins[2]))
                            if hu_ins[2] else {}},
               "excluded_dense_ml": round(float(np.count_nonzero(dense) * ct.voxel_volume_ml), 1),
               "negative_slices": len(neg_k)}
    log.info("synthetic realism (inserted HU): %s", realism["inserted"])
    return records, realism
