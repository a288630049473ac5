"""Write any :class:`~pipeline.artefacts.Volume` as a CT Image Storage series (one file per slice).

The inverse of :func:`pipeline.volume.build_volume`, for fixtures and demos.  The volume's
affine maps ``(k, r, c, 1)`` to LPS mm; slice ``k`` becomes one CT Image (PS3.3 A.3) whose
Image Plane module (C.7.6.2) is derived from it:

* Image Orientation (Patient) = (row cosine, column cosine) = unit vectors of the affine's
  ``c`` and ``r`` columns (the row direction is the direction of increasing column index);
* Pixel Spacing = (spacing between rows, spacing between columns) = norms of the ``r`` and
  ``c`` columns;
* Image Position (Patient) = ``affine @ (k, 0, 0, 1)``, the centre of the first voxel.

Any affine with orthogonal ``r`` and ``c`` columns can be written: flipped, oblique, any
slice spacing, slices in either order along the normal (and even a ``k`` column that is not
along the normal, which makes a gantry-tilted series).  Pixel values are stored signed
16-bit with Rescale Intercept -1024 and Slope 1 (C.8.2.1), so stored = HU + 1024.

UIDs not given are derived deterministically from ``seed`` (the same seed and arguments
give the same files).  Compressed transfer syntaxes use ``Dataset.compress(...,
generate_instance_uid=False)`` with the encoders recommended in FIELD-NOTES.md.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from ..artefacts import Volume

log = logging.getLogger(__name__)

__all__ = ["derive_uid", "write_ct_series"]

RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1
LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width)
MEDIASTINUM_WINDOW = (40.0, 400.0)

# Encoding plugin per compressed transfer syntax (FIELD-NOTES.md) and fixed lossy settings.
_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    JPEGLSLossless: ("pyjpegls", {}),
    JPEGLSNearLossless: ("pyjpegls", {"jls_error": 2}),
    JPEG2000Lossless: ("pylibjpeg", {}),
    JPEG2000: ("pylibjpeg", {"j2k_cr": [10.0]}),
    RLELossless: ("pylibjpeg", {}),
}
_NATIVE = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
_LOSSY = {JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1"}

FileNames = Literal["sequential", "uid", "random"]


def derive_uid(seed: int, *parts: object) -> str:
    """A valid UID derived deterministically from ``seed`` and ``parts`` (pydicom root)."""
    return str(generate_uid(entropy_srcs=["ctscreen-phantom", str(seed), *map(str, parts)]))


def _ds(value: float) -> DSfloat:
    """A Decimal String of at most 16 characters holding ``value`` as precisely as fits."""
    return DSfloat(float(value), auto_format=True)


def _plane_vectors(
    affine: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float]:
    """(row cosine, column cosine, row spacing, column spacing) from an affine."""
    r_col, c_col = affine[:3, 1], affine[:3, 2]
    dr, dc = float(np.linalg.norm(r_col)), float(np.linalg.norm(c_col))
    if dr <= 0 or dc <= 0:
        raise ValueError(f"affine has a zero in-plane column: r={r_col}, c={c_col}")
    col_cos, row_cos = r_col / dr, c_col / dc
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise ValueError(
            f"expected orthogonal r and c axes (DICOM pixels are rectangular), got "
            f"cosine {float(row_cos @ col_cos):.2e} between {r_col} and {c_col}"
        )
    return row_cos, col_cos, dr, dc


def _stored(volume: Volume) -> npt.NDArray[np.int16]:
    a = volume.array
    if not np.issubdtype(a.dtype, np.integer):
        rounded = np.rint(a)
        if not np.array_equal(rounded, a):
            raise ValueError(f"expected whole HU values, got non-integral {a.dtype} data")
        a = rounded
    lo, hi = float(a.min()), float(a.max())
    if lo - RESCALE_INTERCEPT < -32768 or hi - RESCALE_INTERCEPT > 32767:
        raise ValueError(
            f"expected HU within [{-32768 + RESCALE_INTERCEPT}, {32767 + RESCALE_INTERCEPT}], "
            f"got [{lo}, {hi}]"
        )
    return np.asarray((a.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16))


def _file_names(n: int, style: str, sop_uids: Sequence[str], seed: int) -> list[str]:
    if style == "sequential":
        return [f"IM{k + 1:05d}.dcm" for k in range(n)]
    if style == "uid":
        return [f"{u}.dcm" for u in sop_uids]
    if style == "random":
        rng = random.Random(seed)
        names: set[str] = set()
        while len(names) < n:
            names.add(f"{rng.getrandbits(48):012x}")
        out = sorted(names)  # lexical order unrelated to slice order
        rng.shuffle(out)
        return out
    raise ValueError(f"file_names: expected 'sequential', 'uid' or 'random', got {style!r}")


def write_ct_series(
    volume: Volume,
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM-001",
    patient_name: str = "Phantom^Chest",
    study_date: str = "20200301",
    study_time: str = "020000",
    accession_number: str = "",
    series_description: str = "Chest phantom 1.0",
    series_number: int = 1,
    slice_thickness: float | None = None,
    kernel: str = "LUNG",
    body_part: str = "CHEST",
    transfer_syntax: str = ExplicitVRLittleEndian,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    file_names: FileNames = "sequential",
    seed: int = 0,
) -> list[Path]:
    """Write ``volume`` (whole HU) as a CT Image Storage series, one file per slice k.

    Returns the paths in slice order k.  Modules (PS3.3 A.3.3): Patient (C.7.1.1), General
    Study (C.7.2.1), General Series (C.7.3.1, PatientPosition HFS), Frame of Reference
    (C.7.4.1; the volume's UID where it has one), General Equipment (C.7.5.1), General
    Image (C.7.6.1), Image Plane (C.7.6.2), Image Pixel (C.7.6.3), CT Image (C.8.2.1),
    VOI LUT (C.11.2; lung and mediastinal windows) and SOP Common (C.12.1).
    ``slice_thickness`` defaults to the slice step.  ``transfer_syntax`` may be any native
    syntax, JPEG-LS (lossless or near-lossless), JPEG 2000 (lossless or lossy) or RLE.
    """
    ts = UID(str(transfer_syntax))
    if ts not in _NATIVE and ts not in _ENCODERS:
        raise ValueError(
            f"transfer_syntax: expected one of {sorted(map(str, (*_NATIVE, *_ENCODERS)))}, got {ts}"
        )
    affine = np.asarray(volume.affine, dtype=np.float64)
    row_cos, col_cos, dr, dc = _plane_vectors(affine)
    stored = _stored(volume)
    n_slices, rows, columns = volume.shape
    step = float(np.linalg.norm(affine[:3, 0]))
    thickness = step if slice_thickness is None else float(slice_thickness)
    normal = np.cross(row_cos, col_cos)

    study_uid = study_uid or derive_uid(seed, "study")
    series_uid = series_uid or derive_uid(seed, "series", series_number, study_uid)
    for_uid = volume.frame_of_reference_uid or derive_uid(seed, "frame-of-reference", study_uid)
    sop_uids = [derive_uid(seed, "instance", series_uid, k) for k in range(n_slices)]
    names = _file_names(n_slices, file_names, sop_uids, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    base = Dataset()
    # Patient (C.7.1.1)
    base.PatientName = patient_name
    base.PatientID = patient_id
    base.PatientBirthDate = ""
    base.PatientSex = "O"
    # General Study (C.7.2.1)
    base.StudyInstanceUID = study_uid
    base.StudyDate = study_date
    base.StudyTime = study_time
    base.ReferringPhysicianName = ""
    base.StudyID = "1"
    base.AccessionNumber = accession_number
    base.StudyDescription = "CT chest phantom"
    # General Series (C.7.3.1)
    base.Modality = "CT"
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = series_number
    base.SeriesDescription = series_description
    base.BodyPartExamined = body_part
    base.PatientPosition = "HFS"
    base.SeriesDate = study_date
    base.SeriesTime = study_time
    # Frame of Reference (C.7.4.1)
    base.FrameOfReferenceUID = for_uid
    base.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    base.Manufacturer = "ctscreen phantom"
    base.ManufacturerModelName = "pipeline.phantom.dicom"
    base.SoftwareVersions = pydicom.__version__
    # General Image (C.7.6.1) and CT Image (C.8.2.1)
    base.ImageType = list(image_type)
    base.AcquisitionNumber = 1
    base.ContentDate = study_date
    base.ContentTime = study_time
    base.BurnedInAnnotation = "NO"
    base.KVP = 120
    base.ConvolutionKernel = kernel
    base.RescaleIntercept = RESCALE_INTERCEPT
    base.RescaleSlope = RESCALE_SLOPE
    base.RescaleType = "HU"
    # Image Plane (C.7.6.2), the parts common to every slice
    base.PixelSpacing = [_ds(dr), _ds(dc)]
    base.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    base.SliceThickness = _ds(thickness)
    # Image Pixel (C.7.6.3)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = rows
    base.Columns = columns
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    # VOI LUT (C.11.2)
    base.WindowCenter = [_ds(LUNG_WINDOW[0]), _ds(MEDIASTINUM_WINDOW[0])]
    base.WindowWidth = [_ds(LUNG_WINDOW[1]), _ds(MEDIASTINUM_WINDOW[1])]
    base.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    # SOP Common (C.12.1)
    base.SpecificCharacterSet = "ISO_IR 100"
    base.SOPClassUID = CTImageStorage

    paths: list[Path] = []
    for k in range(n_slices):
        ds = Dataset()
        ds.update(base)
        position = affine[:3, :3] @ np.array([k, 0.0, 0.0]) + affine[:3, 3]
        ds.SOPInstanceUID = sop_uids[k]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        frame = stored[k]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uids[k])
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        if ts in _ENCODERS:
            plugin, options = _ENCODERS[ts]
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = frame.tobytes()
            ds.compress(ts, encoding_plugin=plugin, generate_instance_uid=False, **options)
            if ts in _LOSSY:
                ds.ImageType = ["DERIVED", *list(image_type)[1:]]
                ds.LossyImageCompression = "01"
                ds.LossyImageCompressionMethod = _LOSSY[ts]
        else:
            ds.file_meta.TransferSyntaxUID = ts
            big = ts == ExplicitVRBigEndian
            ds.PixelData = frame.astype(">i2" if big else "<i2").tobytes()
            ds["PixelData"].VR = "OW"
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.info("wrote %d CT slices (%s) of series %s to %s", n_slices, ts.name, series_uid, folder)
    return paths
