"""How a learned model's input is made from a CT slice: one place, for training and serving.

The learned lung and lesion models are trained mostly on the COVID-19 CT Lung and Infection
Segmentation set (Ma et al. 2020, ``ma20``), whose slices were made from Hounsfield units by a
known recipe (the converter's source, see ``../shared/data/README.md``).  A model that sees
that recipe applied to a batch's HU slices sees what it was trained on, so inference makes
its input from HU in exactly the same way (:func:`ma20_input`):

1. the slice is turned to the canonical in-plane orientation (:func:`canonical_inplane`:
   rows run anterior -> posterior, columns patient right -> left, as on a radiologist's
   screen), so that the network never has to guess which way the patient lies;
2. HU are clipped to ``[-1024, 3071]``; a non-square slice is padded to a square with -1024;
3. ``cv2.resize`` to 256 x 256 (bicubic), as the converter did;
4. per-slice min-max scaling to 0..1, then ``uint8(x * 255)`` (truncation, as numpy does);
5. OpenCV CLAHE with clip limit 7 and the default 8 x 8 tiles.

The result is an 8-bit image on a 256 x 256 grid that spans the slice's field of view
(pixel size = field of view / 256, about 1.4 mm for a 360 mm field).  The ma20 slices are
already in this form; the Radiopaedia ones were made from 8-bit windowed slices, which is why
the same recipe also holds for windowed 8-bit input (min-max and CLAHE undo most of a window).

Lung-cropped slices (the semiseg layout: 8-bit, windowed, cropped to the lungs) cannot be
put on the full-field grid.  :func:`crop_input` applies steps 3-5 to the crop with tiles
of the same physical size (a 360 mm field in 8 tiles: 45 mm a tile), the crop resampled to
the same nominal pixel size (:data:`NOMINAL_FIELD_MM` / 256).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

SIZE = 256
HU_CLIP = (-1024.0, 3071.0)
CLAHE_CLIP = 7.0
CLAHE_TILES = 8
NOMINAL_FIELD_MM = 360.0  # a typical chest field of view: the nominal pixel is 360/256 mm
U8 = npt.NDArray[np.uint8]


def _cv2() -> Any:
    import cv2  # opencv-python-headless: the converter's own resize and CLAHE

    cv2.setNumThreads(1)
    return cv2


def load() -> None:
    """Import OpenCV now: a stage that will make model input calls this when it is built, so
    the library is loaded before a worker caps its memory (an import under the cap fails)."""
    _cv2()


def canonical_inplane(direction: npt.NDArray[np.float64]) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that bring a slice's (rows, columns) to the
    canonical display: rows towards +P (posterior), columns towards +L (patient left).

    ``direction`` is the volume's 3x3 direction matrix (columns: the k, r, c unit vectors in
    LPS).  Applied in the order transpose, then flips (see :func:`to_canonical`).
    """
    r = np.asarray(direction[:, 1], dtype=np.float64)
    c = np.asarray(direction[:, 2], dtype=np.float64)
    # which array axis runs closest to P (LPS y): that one becomes the rows
    transpose = abs(c[1]) > abs(r[1])
    rows, cols = (c, r) if transpose else (r, c)
    return transpose, bool(rows[1] < 0), bool(cols[0] < 0)


def to_canonical(a: npt.NDArray[Any], how: tuple[bool, bool, bool]) -> npt.NDArray[Any]:
    """(..., H, W) -> the canonical in-plane view (a view, no copy)."""
    transpose, fr, fc = how
    out = np.swapaxes(a, -1, -2) if transpose else a
    if fr:
        out = out[..., ::-1, :]
    if fc:
        out = out[..., :, ::-1]
    return out


def from_canonical(a: npt.NDArray[Any], how: tuple[bool, bool, bool]) -> npt.NDArray[Any]:
    """Inverse of :func:`to_canonical`."""
    transpose, fr, fc = how
    out = a
    if fc:
        out = out[..., :, ::-1]
    if fr:
        out = out[..., ::-1, :]
    return np.swapaxes(out, -1, -2) if transpose else out


def square_pad(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(side, row offset, column offset) of the square a (H, W) slice is padded into."""
    h, w = shape
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def clahe_u8(x01: npt.NDArray[np.float32], tiles: int | tuple[int, int] = CLAHE_TILES) -> U8:
    """Min-max (already done by the caller) 0..1 float -> uint8 -> OpenCV CLAHE (clip 7)."""
    cv2 = _cv2()
    t = (tiles, tiles) if isinstance(tiles, int) else (tiles[1], tiles[0])  # cv2: (x, y)
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=t)
    u8 = (np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.asarray(clahe.apply(np.ascontiguousarray(u8)), dtype=np.uint8)


def minmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.asarray((x - lo) / (hi - lo), dtype=np.float32)


def ma20_input(slices: npt.NDArray[Any], size: int = SIZE) -> U8:
    """(K, H, W) full-field slices (HU, already canonical) -> (K, size, size) uint8, the
    ma20 recipe (module docstring, steps 2-5)."""
    cv2 = _cv2()
    k, h, w = slices.shape
    side, r0, c0 = square_pad((h, w))
    out = np.empty((k, size, size), dtype=np.uint8)
    sq = np.full((side, side), HU_CLIP[0], dtype=np.float32)
    for i in range(k):
        sq[r0:r0 + h, c0:c0 + w] = np.clip(slices[i], *HU_CLIP)
        x = cv2.resize(sq, (size, size), interpolation=cv2.INTER_CUBIC)
        out[i] = clahe_u8(minmax(np.asarray(x, dtype=np.float32)))
    return out


def crop_input(crop: npt.NDArray[Any], pixel_mm: tuple[float, float]) -> tuple[U8, float]:
    """One lung-cropped slice (any intensity scale) -> (uint8 CLAHE image at the nominal
    pixel size, that pixel size in mm); tiles of the full-field recipe's physical size."""
    cv2 = _cv2()
    px = NOMINAL_FIELD_MM / SIZE
    h = max(8, round(crop.shape[0] * pixel_mm[0] / px))
    w = max(8, round(crop.shape[1] * pixel_mm[1] / px))
    x = cv2.resize(np.asarray(crop, dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    tile_px = SIZE / CLAHE_TILES
    tiles = (max(1, round(h / tile_px)), max(1, round(w / tile_px)))
    return clahe_u8(minmax(np.asarray(x, dtype=np.float32)), tiles), px


def resize2d(a: npt.NDArray[Any], shape: tuple[int, int], linear: bool = True) -> npt.NDArray[Any]:
    """(H, W) or (K, H, W) -> ``shape`` in-plane: bilinear (``linear``) or area-averaged when
    shrinking; nearest for label images (``linear=False``)."""
    cv2 = _cv2()
    if a.shape[-2:] == shape:
        return a
    if not linear:
        interp = cv2.INTER_NEAREST
    elif shape[0] < a.shape[-2] and shape[1] < a.shape[-1]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    if a.ndim == 2:
        return np.asarray(cv2.resize(a, (shape[1], shape[0]), interpolation=interp))
    return np.stack([cv2.resize(s, (shape[1], shape[0]), interpolation=interp) for s in a])


def low_grid_to_index(shape_rc: tuple[int, int], how: tuple[bool, bool, bool],
                      size: int) -> npt.NDArray[np.float64]:
    """4x4 map from (k, i, j) on the network's ``size`` x ``size`` canonical square grid to
    the original (k, r, c) voxel indices of a slice of shape ``shape_rc`` (pixel centres)."""
    transpose, fr, fc = how
    h1, w1 = (shape_rc[1], shape_rc[0]) if transpose else shape_rc
    side, r0, c0 = square_pad((h1, w1))
    f = side / size
    da, db = 0.5 * f - 0.5 - r0, 0.5 * f - 0.5 - c0
    sa, oa = (-1.0, h1 - 1.0) if fr else (1.0, 0.0)
    sb, ob = (-1.0, w1 - 1.0) if fc else (1.0, 0.0)
    a_coef, a_off = sa * f, sa * da + oa  # canonical-view row (before flips) from i
    b_coef, b_off = sb * f, sb * db + ob  # canonical-view column (before flips) from j
    m = np.eye(4)
    m[1, 1:] = 0.0
    m[2, 1:] = 0.0
    if transpose:  # r = b1(j), c = a1(i)
        m[1, 2], m[1, 3] = b_coef, b_off
        m[2, 1], m[2, 3] = a_coef, a_off
    else:
        m[1, 1], m[1, 3] = a_coef, a_off
        m[2, 2], m[2, 3] = b_coef, b_off
    return m


def square_to_slice(a: npt.NDArray[Any], shape_c: tuple[int, int],
                    linear: bool = True) -> npt.NDArray[Any]:
    """(size, size) network-grid image -> the canonical slice (``shape_c``): the padded square
    is brought to the slice's square side, then its padding is cut away."""
    side, r0, c0 = square_pad(shape_c)
    sq = resize2d(np.ascontiguousarray(a), (side, side), linear=linear)
    return sq[r0:r0 + shape_c[0], c0:c0 + shape_c[1]]


def ma20_pseudo_hu(images: npt.NDArray[Any],
                   lungs: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Approximate HU for 8-bit recipe images (K, H, W) whose lung region is known, for a
    model that reads HU (a window): per slice, a linear map through two anchors, as the
    semiseg import does for its windowed slices: the 30th percentile of the lung region
    (aerated lung, even in a slice half filled with lesion) -> -860 HU, and the median of the
    bright tissue outside it (above 40% of the way from that anchor to 255) -> 40 HU.  CLAHE
    is local, so this is an approximation; training augments intensity around it.  A slice
    without lung region keeps the map of the nearest anchors used (or a fixed default)."""
    out = np.empty(images.shape, dtype=np.float32)
    lo, hi = 45.0, 175.0  # typical anchors of the ma20 data, used where a slice has no lung
    for k in range(images.shape[0]):
        im = images[k].astype(np.float32)
        reg = lungs[k]
        if reg.any():
            lo = float(np.percentile(im[reg], 30))
            soft = im[~reg & (im > lo + 0.4 * (255.0 - lo))]
            if soft.size:
                hi = max(lo + 30.0, float(np.median(soft)))
        out[k] = -860.0 + (im - lo) * (900.0 / (hi - lo))
    return out
