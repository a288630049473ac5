"""Which slices the key images and the SR's regions show: key slices, and where each finding
is largest (its ``LesionView``, with its outline as SCOORD image coordinates)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from skimage import measure

from ..artefacts import Finding
from ..lesions import finding_mask

KEY_IMAGE_MIN_GAP_MM = 10.0  # prefer key slices at least this far apart


def choose_key_slices(
    lungs: npt.NDArray[Any], lesions: npt.NDArray[Any], n: int, min_gap: int = 1
) -> list[int]:
    """Up to ``n`` slice indices with the largest lesion area, at least ``min_gap`` apart
    where possible; without lesions, the one slice with the largest lung area."""
    area = np.count_nonzero(lesions.reshape(lesions.shape[0], -1), axis=1)
    if n <= 0:
        return []
    if not area.any():
        lung_area = np.count_nonzero(lungs.reshape(lungs.shape[0], -1), axis=1)
        return [int(np.argmax(lung_area))]
    ranked = [int(k) for k in np.lexsort((np.arange(area.size), -area)) if area[k] > 0]
    chosen: list[int] = []
    for k in ranked:
        if all(abs(k - c) >= min_gap for c in chosen):
            chosen.append(k)
        if len(chosen) == n:
            return chosen
    for k in ranked:  # not enough well-separated slices: fill with the next largest
        if k not in chosen:
            chosen.append(k)
        if len(chosen) == n:
            break
    return chosen


def choose_finding_slices(
    ranked: Sequence[Sequence[int]], areas: Sequence[Sequence[int]], n: int, min_gap: int = 1
) -> list[tuple[int, int]]:
    """One key slice per finding, for the first ``n`` findings (largest first) that still
    have a slice of their own: ``(position of the finding, slice)``.

    ``ranked[i]`` are finding i's slices by decreasing area ``areas[i]``.  Each finding gets
    its largest slice not yet taken; where that lies within ``min_gap`` of a chosen slice (it
    would show nearly the same image), a slice at least that far away is preferred if it
    still holds half the finding's largest area."""
    chosen: list[tuple[int, int]] = []
    for i, (slices, area) in enumerate(zip(ranked, areas, strict=True)):
        if len(chosen) == n:
            break
        taken = {k for _, k in chosen}
        free = [(k, a) for k, a in zip(slices, area, strict=True) if k not in taken and a > 0]
        if not free:
            continue  # every slice of it is shown already
        far = [(k, a) for k, a in free if all(abs(k - c) >= min_gap for _, c in chosen)
               and 2 * a >= area[0]]
        chosen.append((i, (far or free)[0][0]))
    return chosen


@dataclass(frozen=True)
class LesionView:
    """Where to show one finding: its slices by decreasing area, and the outline of it on
    its largest slice as SCOORD image coordinates ((column, row), pixel centres at +0.5;
    closed: the first point is repeated at the end), or one point where it is too small
    for an outline."""

    ranked_slices: tuple[int, ...]
    ranked_areas: tuple[int, ...]
    outline: npt.NDArray[np.float32]

    @property
    def slice(self) -> int:
        return self.ranked_slices[0]


def lesion_view(labels: npt.NDArray[np.uint8], f: Finding) -> LesionView:
    box, mask = finding_mask(labels, f)
    area = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    order = np.lexsort((np.arange(area.size), -area))
    order = order[area[order] > 0]
    k = int(order[0])
    plane = mask[k]
    pieces, n = ndi.label(plane)
    if n > 1:  # the largest piece of it on that slice
        plane = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    r0, c0 = box[1].start, box[2].start
    contours = measure.find_contours(np.pad(plane, 1).astype(np.float32), 0.5)
    ring = max(contours, key=len) if contours else np.zeros((0, 2))
    if len(ring) >= 4 and np.allclose(ring[0], ring[-1]):
        # fewer points, within half a pixel (OpenCV's Douglas-Peucker: skimage's
        # approximate_polygon imports scipy.signal, 2 s on the first report of a process)
        import cv2

        kept = cv2.approxPolyDP(ring[:-1].astype(np.float32).reshape(-1, 1, 2), 0.5, True)
        ring = np.concatenate([kept.reshape(-1, 2), kept.reshape(-1, 2)[:1]]).astype(np.float64)
    if len(ring) >= 4 and np.allclose(ring[0], ring[-1]):
        # padded (row, col) -> image (column, row): -1 for the pad, +0.5 to pixel centres
        xy = np.stack([ring[:, 1] - 0.5 + c0, ring[:, 0] - 0.5 + r0], axis=1)
    else:
        rr, cc = np.nonzero(plane)
        xy = np.array([[cc.mean() + 0.5 + c0, rr.mean() + 0.5 + r0]])
    return LesionView(
        ranked_slices=tuple(int(i) + box[0].start for i in order),
        ranked_areas=tuple(int(area[i]) for i in order),
        outline=xy.astype(np.float32),
    )
