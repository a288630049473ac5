"""Shared test helpers: rotations and voxel-to-patient affines for synthetic series (the
conventions of ``pipeline.artefacts.Volume``: index (k, r, c), LPS millimetres)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def rotation(axis: Sequence[float], deg: float) -> npt.NDArray[np.float64]:
    """The rotation by ``deg`` degrees about ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a /= np.linalg.norm(a)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def make_affine(
    row_cos: Sequence[float] = (1, 0, 0),
    col_cos: Sequence[float] = (0, 1, 0),
    *,
    pixel: tuple[float, float] = (0.8, 0.7),  # (between rows, between columns)
    step: float = 2.0,
    reverse: bool = False,
    origin: Sequence[float] = (-20.0, -25.0, -40.0),
    frame: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """The affine of a series with ImageOrientationPatient (``row_cos``, ``col_cos``),
    both turned by ``frame`` where given: k along +normal (-normal with ``reverse``) in
    ``step`` mm, r along col_cos, c along row_cos (``pixel`` mm), voxel 0 at ``origin``."""
    rc, cc = np.asarray(row_cos, float), np.asarray(col_cos, float)
    if frame is not None:
        rc, cc = frame @ rc, frame @ cc
    normal = np.cross(rc, cc)
    a = np.eye(4)
    a[:3, 0] = normal * step * (-1 if reverse else 1)
    a[:3, 1] = cc * pixel[0]
    a[:3, 2] = rc * pixel[1]
    a[:3, 3] = origin
    return a
