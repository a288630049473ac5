"""The per-study view store: what the worklist's study page shows, written at screening time.

Each analysed study gets a folder ``<root>/<sha256(study_uid)[:32]>/`` holding

- ``view.zip``: everything the web reads, as one file (PNG members, stored uncompressed:
  PNG is compressed already): ``view.json``; ``gray/NNNN.png``, the axial slices in a lung
  window (uint8); ``labels/NNNN.png``, the lung and lesion labels resampled (nearest) to the
  same grid, one byte per pixel: lung (0 none, 1 right, 2 left) + 4 x lesion (0 none, 1 ground
  glass, 2 consolidation); ``key/NN.png``, the report's key images (RGB, as stored in the SC
  objects);
- ``view.json``: a copy of the zip's, for people and tools.

Display orientation (radiological convention), from the volume's direction cosines and never
from the array index: image columns run from patient right to patient left (patient right on
the image's left), rows from anterior to posterior (anterior up), slices from superior to
inferior.  A volume whose axes are a signed permutation of those (any axial, flipped or
transposed series) is only transposed and flipped, exactly; an oblique one is resampled
(linear for HU, nearest for labels) onto the axis-aligned grid at its own voxel size.  Slices
are then downsampled (area average; labels nearest) so that the longer side is at most
``max_px`` pixels, with square pixels.

``view.json`` holds UIDs, geometry, the findings (with the view slice where each is largest)
and the stage versions: never a patient's name or ID (those live in the worklist database).

Writes are atomic: a new study's folder is built under a temporary name and renamed into place;
a re-screen's ``view.zip`` replaces the old one with ``os.replace``, so a reader opens either the
old view or the new one, whole.  A :class:`StudyView` reads only ``view.zip`` and keeps it open,
so a view opened before a replacement stays consistent until closed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from ..artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Side, Volume
from ..config import Config, ReportConfig
from ..errors import CtscreenError
from ..lesions import finding_mask

if TYPE_CHECKING:
    from ..report import ReportObjects
    from ..run import StudyAnalysis

log = logging.getLogger(__name__)

VIEW_FORMAT = 1
OVERLAYS = frozenset({"lungs", "lesions"})
ZIP_NAME = "view.zip"
JSON_NAME = "view.json"
TMP_PREFIX = ".tmp-"
LESION_SHIFT = 4  # labels byte = lung + LESION_SHIFT * lesion
AIR_HU = -1024.0  # what lies outside an oblique volume's grid
_ALIGNED_TOL = 1e-4  # direction cosines closer than this to the display axes need no resampling
_TMP_MAX_AGE_S = 3600.0  # prune removes temporary folders older than this (a killed writer's)

# The display axes in LPS: slices superior -> inferior, rows anterior -> posterior, columns
# patient right -> patient left.
DISPLAY_AXES = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T  # columns
ORIENTATION = {"slices": "superior to inferior", "rows": "anterior to posterior",
               "columns": "patient right to patient left"}

# Overlay colours (RGB), those of the key images (pipeline/report/codes.py COLOURS).
_LUNG_RGB = {LUNG_LABELS[Side.RIGHT]: (0, 200, 255), LUNG_LABELS[Side.LEFT]: (70, 220, 110)}
_LESION_RGB = {LESION_LABELS[LesionKind.GGO]: (255, 230, 0),
               LESION_LABELS[LesionKind.CONSOLIDATION]: (255, 40, 40)}
LESION_ALPHA = 0.45


def study_key(study_uid: str) -> str:
    """The folder name of a study's view: the first 32 hex digits of sha256(study_uid)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:32]


def view_root(config: Config, worklist: str | Path | None = None) -> Path:
    """Where views are stored: ``web.view_store``, else ``<worklist db stem>.views`` beside
    the worklist (``worklist``, else ``worklist.path`` of the config)."""
    if config.web.view_store:
        return Path(config.web.view_store)
    db = worklist or config.worklist.path
    if not db:
        raise CtscreenError("no view store: set web.view_store or give the worklist path "
                            "(worklist.path in the config, or --worklist)")
    p = Path(db)
    return p.with_name(p.stem + ".views")


# ------------------------------------------------------------------ the display grid


@dataclass(frozen=True, eq=False)
class DisplayVolume:
    """A volume's HU and labels on the display grid (``affine`` maps (k, r, c) to LPS)."""

    gray: npt.NDArray[np.uint8]  # (n, h, w), lung window
    labels: npt.NDArray[np.uint8]  # (n, h, w), lung + LESION_SHIFT * lesion
    affine: npt.NDArray[np.float64]
    resampled: bool  # True where the source was oblique


def _display_permutation(direction: npt.NDArray[np.float64]) -> tuple[tuple[int, ...],
                                                                       tuple[int, ...]]:
    """(perm, signs): display axis i is array axis ``perm[i]``, reversed where ``signs[i]``
    is -1; the permutation that brings the array axes closest to the display axes."""
    best: tuple[float, tuple[int, ...]] | None = None
    dots = DISPLAY_AXES.T @ direction  # [display i, array j]
    for perm in itertools.permutations(range(3)):
        score = sum(abs(dots[i, perm[i]]) for i in range(3))
        if best is None or score > best[0] + 1e-12:
            best = (score, perm)
    assert best is not None
    perm = best[1]
    signs = tuple(1 if dots[i, perm[i]] >= 0 else -1 for i in range(3))
    return perm, signs


def _reorient(a: npt.NDArray[Any], perm: Sequence[int], signs: Sequence[int]) -> npt.NDArray[Any]:
    out = np.transpose(a, perm)
    flips = tuple(i for i in range(3) if signs[i] < 0)
    return np.flip(out, flips) if flips else out


def _reoriented_affine(affine: npt.NDArray[np.float64], shape: Sequence[int],
                       perm: Sequence[int], signs: Sequence[int]) -> npt.NDArray[np.float64]:
    out = np.eye(4)
    first = np.zeros(3)  # the source index of the new voxel (0, 0, 0)
    for i, (j, s) in enumerate(zip(perm, signs, strict=True)):
        out[:3, i] = affine[:3, j] * s
        if s < 0:
            first[j] = shape[j] - 1
    out[:3, 3] = affine[:3, :3] @ first + affine[:3, 3]
    return out


def _window(hu: npt.NDArray[Any], center: float, width: float) -> npt.NDArray[np.uint8]:
    lo = center - width / 2.0
    g = (hu.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / width) + np.float32(0.5)
    return np.clip(g, 0, 255).astype(np.uint8)


def display_volume(ct: Volume, lungs: npt.NDArray[Any], lesions: npt.NDArray[Any], max_px: int,
                   window: tuple[float, float]) -> DisplayVolume:
    """``ct`` (HU) and its labels on the display grid, windowed and downsampled."""
    if max_px < 16:
        raise ValueError(f"max_px: expected at least 16, got {max_px}")
    for name, a in (("lung labels", lungs), ("lesion labels", lesions)):
        if a.shape != ct.shape:
            raise ValueError(f"{name} shape {a.shape} is not the CT's {ct.shape}")
    perm, signs = _display_permutation(ct.direction)
    shape = tuple(ct.shape[j] for j in perm)
    affine = _reoriented_affine(ct.affine, ct.shape, perm, signs)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    combined = (np.asarray(lungs, dtype=np.uint8)
                + np.uint8(LESION_SHIFT) * np.asarray(lesions, dtype=np.uint8))
    direction = affine[:3, :3] / spacing
    oblique = not np.allclose(direction, DISPLAY_AXES, atol=_ALIGNED_TOL)
    # the display grid at full resolution: the reoriented one where aligned, else the
    # axis-aligned box around the volume at its own voxel size
    if oblique:
        corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), float)
        lps = corners @ affine[:3, :3].T + affine[:3, 3]
        along = lps @ DISPLAY_AXES  # coordinate along each display axis
        lo, hi = along.min(axis=0), along.max(axis=0)
        full_shape = tuple(int(np.floor((hi[i] - lo[i]) / spacing[i] + 1e-6)) + 1
                           for i in range(3))
        full_affine = np.eye(4)
        full_affine[:3, :3] = DISPLAY_AXES * spacing
        full_affine[:3, 3] = DISPLAY_AXES @ lo
    else:
        full_shape = shape
        full_affine = affine
    n, rows, cols = full_shape
    sy, sx = float(spacing[1]), float(spacing[2])
    pixel = max(min(sy, sx), max(rows * sy, cols * sx) / max_px)
    h = max(1, min(max_px, round(rows * sy / pixel)))
    w = max(1, min(max_px, round(cols * sx / pixel)))
    fy, fx = rows / h, cols / w  # full-grid pixels per view pixel
    view_affine = full_affine.copy()
    view_affine[:3, 1] = full_affine[:3, 1] * fy
    view_affine[:3, 2] = full_affine[:3, 2] * fx
    # the centre of view pixel (0, 0) lies at full-grid index ((fy - 1) / 2, (fx - 1) / 2)
    view_affine[:3, 3] = full_affine[:3, :3] @ np.array([0.0, (fy - 1) / 2, (fx - 1) / 2]) \
        + full_affine[:3, 3]

    gray = np.empty((n, h, w), np.uint8)
    labels = np.empty((n, h, w), np.uint8)
    wc, ww = window
    if oblique:
        to_src = np.linalg.inv(ct.affine) @ full_affine  # full-grid index -> source index
        rr, cc = np.meshgrid(np.arange(rows, dtype=np.float64),
                             np.arange(cols, dtype=np.float64), indexing="ij")
        src_hu = np.asarray(ct.array)
    else:
        hu_view = _reorient(np.asarray(ct.array), perm, signs)
        lab_view = _reorient(combined, perm, signs)
    for k in range(n):
        if oblique:
            pts = np.stack([np.full_like(rr, k), rr, cc, np.ones_like(rr)], axis=0)
            src = np.tensordot(to_src[:3], pts, axes=1)
            hu_k = ndi.map_coordinates(src_hu, src, order=1, mode="constant", cval=AIR_HU,
                                       output=np.float32, prefilter=False)
            lab_k = ndi.map_coordinates(combined, src, order=0, mode="constant",
                                        cval=0, output=np.uint8, prefilter=False)
        else:
            hu_k = np.ascontiguousarray(hu_view[k], dtype=np.float32)
            lab_k = np.ascontiguousarray(lab_view[k])
        if (h, w) != (rows, cols):
            hu_k = cv2.resize(hu_k, (w, h), interpolation=cv2.INTER_AREA)
            lab_k = cv2.resize(lab_k, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        gray[k] = _window(hu_k, wc, ww)
        labels[k] = lab_k
    return DisplayVolume(gray, labels, view_affine, oblique)


def _finding_view(ct: Volume, lesion_labels: npt.NDArray[np.uint8], finding: Any,
                  view_affine: npt.NDArray[np.float64], n_slices: int) -> dict[str, Any]:
    """Where a finding is largest in the view: its slice and its centre there (x, y)."""
    out: dict[str, Any] = {
        "index": int(finding.index), "kind": str(finding.kind), "side": str(finding.side),
        "zone": str(finding.zone), "volume_ml": round(float(finding.volume_ml), 3),
        "mean_hu": round(float(finding.mean_hu), 1),
    }
    try:
        box, mask = finding_mask(lesion_labels, finding)
        idx = np.argwhere(mask).astype(np.float64) + [b.start for b in box]
    except ValueError:  # no voxels recorded: its centroid
        idx = ct.lps_to_index(finding.centroid_lps)
    lps = ct.index_to_lps(idx)
    inv = np.linalg.inv(view_affine)
    kij = lps @ inv[:3, :3].T + inv[:3, 3]
    ks = np.clip(np.rint(kij[:, 0]).astype(np.int64), 0, n_slices - 1)
    k = int(np.argmax(np.bincount(ks, minlength=n_slices)))
    on = kij[ks == k]
    out["slice"] = k
    out["x"] = round(float(on[:, 2].mean()), 1)
    out["y"] = round(float(on[:, 1].mean()), 1)
    return out


# ------------------------------------------------------------------ writing


def _png(a: npt.NDArray[np.uint8], level: int = 6) -> bytes:
    """PNG of a gray or RGB image; ``level`` 6 for what is stored, 1 for what is made per
    request (a 256 px RGB slice: 9 ms instead of 27, 8% larger)."""
    img = cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if a.ndim == 3 else a
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {a.shape}")
    return bytes(buf)


def _key_images(analysis: StudyAnalysis, objects: Any) -> list[Dataset]:
    """The key images (Secondary Capture datasets): ``objects.key_images`` where ``objects``
    is a ReportObjects, the "sc" ones of (kind, dataset) pairs, else of ``analysis.objects``."""
    if objects is not None and hasattr(objects, "key_images"):
        return list(objects.key_images)
    pairs = analysis.objects if objects is None else objects
    return [ds for kind, ds in pairs if kind == "sc"]


def _key_pixels(ds: Dataset) -> npt.NDArray[np.uint8]:
    a = np.asarray(ds.pixel_array)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] != 3:
        raise ValueError(f"key image {ds.SOPInstanceUID}: expected RGB, got shape {a.shape}")
    return a


def save_view(root: Path, analysis: StudyAnalysis,
              objects: ReportObjects | Sequence[tuple[str, Dataset]] | None, max_px: int,
              *, window: tuple[float, float] | None = None) -> Path:
    """Store the view of one analysed study under ``root`` and return its folder.

    ``analysis`` is ``pipeline.run.StudyAnalysis`` (its volume, lungs and lesion analysis);
    ``objects`` the report's ``ReportObjects`` (or its (kind, dataset) pairs; None: those of
    ``analysis.objects``), whose key images are stored as PNG.  ``window`` is (centre, width)
    in HU, default the report's lung window.  Replaces an earlier view of the study, atomically.
    """
    ct, lungs, lesions = analysis.ct, analysis.lungs, analysis.analysis
    if ct is None or lungs is None or lesions is None:
        raise ValueError(f"study {analysis.result.study_uid}: not analysed, it has no view")
    if window is None:
        rc = ReportConfig()
        window = (rc.window_center, rc.window_width)
    t0 = time.perf_counter()
    disp = display_volume(ct, lungs.labels.array, lesions.labels.array, max_px, window)
    n, h, w = disp.gray.shape
    findings = [_finding_view(ct, lesions.labels.array, f, disp.affine, n)
                for f in lesions.findings]
    keys = [_key_pixels(ds) for ds in _key_images(analysis, objects)]
    result = analysis.result
    spacing = np.linalg.norm(disp.affine[:3, :3], axis=0)
    meta: dict[str, Any] = {
        "format": VIEW_FORMAT,
        "study_uid": result.study_uid,
        "series_uid": result.series_uid,
        "frame_of_reference_uid": ct.frame_of_reference_uid,
        "n_slices": n,
        "rows": h,
        "columns": w,
        "pixel_mm": round(float(spacing[1]), 4),
        "slice_mm": round(float(spacing[0]), 4),
        "orientation": ORIENTATION,
        "resampled": disp.resampled,
        "affine": np.round(disp.affine, 5).tolist(),
        "window": list(window),
        "labels": {"lungs": {"right": LUNG_LABELS[Side.RIGHT], "left": LUNG_LABELS[Side.LEFT]},
                   "lesions": {"ground-glass opacity": LESION_LABELS[LesionKind.GGO],
                               "consolidation": LESION_LABELS[LesionKind.CONSOLIDATION]},
                   "lesion_shift": LESION_SHIFT},
        "findings": findings,
        "n_findings_total": int(lesions.n_findings_total or len(lesions.findings)),
        "n_key_images": len(keys),
        "versions": {"algorithm": result.algorithm_version, "lungs": lungs.method,
                     "lesions": lesions.detector},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / study_key(result.study_uid)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with zipfile.ZipFile(tmp / ZIP_NAME, "w", zipfile.ZIP_STORED) as z:
            z.writestr(JSON_NAME, text, compress_type=zipfile.ZIP_DEFLATED)
            for k in range(n):
                z.writestr(f"gray/{k:04d}.png", _png(disp.gray[k]))
                z.writestr(f"labels/{k:04d}.png", _png(disp.labels[k]))
            for i, pixels in enumerate(keys):
                z.writestr(f"key/{i:02d}.png", _png(pixels))
        (tmp / JSON_NAME).write_bytes(text)
        for p in (tmp / ZIP_NAME, tmp / JSON_NAME):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (final / ZIP_NAME).stat().st_size
    log.info("view of study %s: %d slices of %dx%d, %d key images, %d bytes (%.2f s)",
             result.study_uid, n, h, w, len(keys), size, time.perf_counter() - t0)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Move the complete view in ``tmp`` to ``final``: a rename of the folder where there is
    none yet, else ``view.zip`` then ``view.json`` replaced one by one (each atomic; readers
    read ``view.zip`` only)."""
    try:
        tmp.rename(final)
        _fsync_dir(final.parent)
        return
    except OSError:
        if not final.is_dir():
            raise
    os.replace(tmp / ZIP_NAME, final / ZIP_NAME)
    os.replace(tmp / JSON_NAME, final / JSON_NAME)
    _fsync_dir(final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_view(root: Path, study_uid: str) -> bool:
    """Delete the study's view (a re-screen that did not analyse it must not leave the old
    one on its page); returns whether there was one."""
    folder = Path(root) / study_key(study_uid)
    if not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def prune_views(root: Path, keep_days: float, *, now: float | None = None) -> int:
    """Delete the views written more than ``keep_days`` days ago (by ``view.zip``'s time),
    and temporary folders of writers gone for an hour; returns how many views went."""
    if keep_days < 0:
        raise ValueError(f"keep_days: expected 0 or more, got {keep_days}")
    root = Path(root)
    if not root.is_dir():
        return 0
    t = time.time() if now is None else now
    removed = 0
    for p in root.iterdir():
        if not p.is_dir():
            continue
        try:
            if p.name.startswith(TMP_PREFIX):
                if t - p.stat().st_mtime > _TMP_MAX_AGE_S:
                    shutil.rmtree(p, ignore_errors=True)
                continue
            if len(p.name) != 32 or not all(ch in "0123456789abcdef" for ch in p.name):
                continue
            z = p / ZIP_NAME
            written = z.stat().st_mtime if z.exists() else p.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile
            continue
        if t - written > keep_days * 86400.0:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    if removed:
        log.info("pruned %d views older than %s days from %s", removed, keep_days, root)
    return removed


# ------------------------------------------------------------------ reading


def _decode(data: bytes) -> npt.NDArray[np.uint8]:
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ValueError("a stored PNG does not decode")
    return np.asarray(a, dtype=np.uint8)


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The pixels of ``mask`` with a 4-neighbour outside it (a one-pixel inner outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    return np.asarray(mask & ~inner)


class StudyView:
    """One study's stored view, read from its ``view.zip`` (kept open: close it, or use it
    as a context manager)."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, meta: dict[str, Any]) -> None:
        self.path = path
        self._zip = archive
        self.meta = meta
        self.study_uid: str = meta["study_uid"]
        self.series_uid: str = meta.get("series_uid", "")
        self.n_slices: int = int(meta["n_slices"])
        self.n_key_images: int = int(meta.get("n_key_images", 0))
        self.findings: list[dict[str, Any]] = list(meta.get("findings", []))
        self.shape: tuple[int, int] = (int(meta["rows"]), int(meta["columns"]))

    @classmethod
    def open(cls, root: Path, study_uid: str) -> StudyView | None:
        """The view of ``study_uid`` under ``root``, or None where there is none (or it is
        of another format or another study)."""
        folder = Path(root) / study_key(study_uid)
        try:
            archive = zipfile.ZipFile(folder / ZIP_NAME)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except zipfile.BadZipFile:
            log.warning("view of study %s: %s is not a zip file", study_uid, folder / ZIP_NAME)
            return None
        try:
            meta = json.loads(archive.read(JSON_NAME))
        except (KeyError, ValueError):
            archive.close()
            log.warning("view of study %s: %s has no readable %s", study_uid, folder, JSON_NAME)
            return None
        if meta.get("format") != VIEW_FORMAT or meta.get("study_uid") != study_uid:
            archive.close()
            return None
        return cls(folder, archive, meta)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> StudyView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slice(self, k: int) -> int:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"slice index: expected an int, got {type(k).__name__}")
        if not 0 <= k < self.n_slices:
            raise IndexError(f"slice {k}: expected 0 to {self.n_slices - 1}")
        return int(k)

    def gray(self, k: int) -> npt.NDArray[np.uint8]:
        """Slice ``k`` in the lung window, (rows, columns) uint8."""
        return _decode(self._zip.read(f"gray/{self._slice(k):04d}.png"))

    def labels(self, k: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """The lung and lesion labels of slice ``k`` (LUNG_LABELS, LESION_LABELS)."""
        lab = _decode(self._zip.read(f"labels/{self._slice(k):04d}.png"))
        return lab % LESION_SHIFT, lab // LESION_SHIFT

    def slice_rgb(self, k: int, overlays: frozenset[str] = frozenset()) -> npt.NDArray[np.uint8]:
        """Slice ``k`` as RGB with the chosen overlays: "lungs" (one-pixel outlines, right and
        left in two colours), "lesions" (translucent fills, ground glass and consolidation in
        two colours)."""
        unknown = set(overlays) - OVERLAYS
        if unknown:
            raise ValueError(f"overlays: expected a subset of {sorted(OVERLAYS)}, "
                             f"got {sorted(unknown)}")
        rgb = np.repeat(self.gray(k)[..., None], 3, axis=2)
        if not overlays:
            return rgb
        lung, lesion = self.labels(k)
        if "lesions" in overlays:
            out = rgb.astype(np.float32)
            for value, colour in _LESION_RGB.items():
                m = lesion == value
                out[m] = (1 - LESION_ALPHA) * out[m] + LESION_ALPHA * np.asarray(colour, np.float32)
            rgb = np.clip(out + 0.5, 0, 255).astype(np.uint8)
        if "lungs" in overlays:
            for value, colour in _LUNG_RGB.items():
                rgb[_outline(lung == value)] = colour
        return rgb

    def slice_png(self, k: int, overlays: frozenset[str] = frozenset()) -> bytes:
        """Slice ``k`` as PNG: the stored grayscale PNG as it is without overlays, else RGB."""
        if not overlays:
            return self._zip.read(f"gray/{self._slice(k):04d}.png")
        return _png(self.slice_rgb(k, overlays), level=1)

    def key_image_png(self, i: int) -> bytes:
        """Key image ``i`` (0-based, the report's order) as PNG."""
        if not 0 <= i < self.n_key_images:
            raise IndexError(f"key image {i}: expected 0 to {self.n_key_images - 1}")
        return self._zip.read(f"key/{i:02d}.png")

    def stored_bytes(self) -> int:
        return (self.path / ZIP_NAME).stat().st_size


def view_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG (for tests and the pages' <img> sizes)."""
    img = _decode(data)
    return int(img.shape[1]), int(img.shape[0])


__all__ = ["OVERLAYS", "StudyView", "display_volume", "prune_views", "remove_view", "save_view",
           "study_key", "view_root"]
