"""Patient direction letters of an image's edges (the key images' markers and Patient
Orientation).

highdicom 0.28 has ``highdicom.spatial.get_closest_patient_orientation``, but it is not used
here: it takes a whole orthogonal direction matrix (not one vector) and never gives two axes
the same letter, taking the next-closest axis for the second one, where
``patient_direction_letter`` takes each vector's own largest component.  The two disagree
wherever the row and column directions lean most towards the same patient axis (about 5% of
random rotations, and any 45 degree in-plane rotation), so the letters this module gives
are kept as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class EdgeLabels:
    """Patient direction letters ("L", "R", "A", "P", "H", "F") at each edge of an image."""

    left: str
    right: str
    top: str
    bottom: str


_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS: -x right, +x left, -y ant., ...


def patient_direction_letter(vector: npt.ArrayLike) -> str:
    """The patient direction (DICOM PS3.3 C.7.6.1.1.1) that an LPS vector points to most.

    ``[1, 0, 0]`` -> "L", ``[0, -1, 0]`` -> "A", ``[0, 0, 1]`` -> "H".
    """
    v = np.asarray(vector, dtype=np.float64).reshape(3)
    axis = int(np.argmax(np.abs(v)))
    if abs(v[axis]) < 1e-6:
        raise ValueError(f"direction vector {v.tolist()} has no length")
    return _LETTERS[axis][1 if v[axis] > 0 else 0]


def image_edge_labels(row_cosine: npt.ArrayLike, column_cosine: npt.ArrayLike) -> EdgeLabels:
    """Which patient direction lies at each edge of a displayed image.

    ``row_cosine`` is the LPS direction of increasing column index (the first three values of
    ImageOrientationPatient), ``column_cosine`` that of increasing row index (the last three).
    For IOP ``[1,0,0,0,1,0]`` the image's right edge is patient left ("L").
    """
    r = np.asarray(row_cosine, dtype=np.float64)
    c = np.asarray(column_cosine, dtype=np.float64)
    return EdgeLabels(
        left=patient_direction_letter(-r),
        right=patient_direction_letter(r),
        top=patient_direction_letter(-c),
        bottom=patient_direction_letter(c),
    )
