"""Pure: one series of CT datasets -> a :class:`~pipeline.artefacts.Volume` in Hounsfield units.

The geometry comes only from the Image Plane module (PS3.3 C.7.6.2): Image Position
(Patient) (0020,0032), Image Orientation (Patient) (0020,0037) and Pixel Spacing
(0028,0030), all in the DICOM patient coordinate system (LPS, mm).  Slices are ordered by
their position projected on the slice normal (row cosine x column cosine), never by
Instance Number or file name, and the slice step is the median of all steps after the
stack has been checked to be evenly spaced, untilted and complete.  Anything that would
need a guess is refused with a coded :class:`~pipeline.errors.NotAnalysable` reason:

==============================================  =============================================
``missing-geometry``                            IPP, IOP or Pixel Spacing absent / malformed
``mixed-geometry``                              Rows, Columns, Pixel Spacing or IOP differ
``duplicate-slice-position``                    two slices at the same position on the normal
``missing-slices:gap=X.Xmm``                    a step close to a multiple (>=2) of the median
``uneven-spacing:min=A.AA,max=B.BBmm``          any other step deviation
``gantry-tilt:X.Xdeg``                          stack direction not along the slice normal
``too-few-slices:N``                            fewer than three slices
``missing-pixel-data``                          no (7FE0,0010) Pixel Data
``truncated-pixel-data``                        native Pixel Data shorter than expected
``pixel-data-mismatch``                         Pixel Data (or decoded frame) of the wrong size
``undecodable:<TransferSyntaxUID>``             no decoder, or the decoder failed
``multiframe-unsupported``                      Number of Frames > 1
``not-monochrome``                              not MONOCHROME1/2 with one sample per pixel
``missing-rescale``                             no Rescale Slope / Intercept (C.8.2.1, Type 1)
==============================================  =============================================

Hounsfield units (PS3.3 C.11.1 Modality LUT, C.8.2.1 CT Image): ``HU = stored *
RescaleSlope + RescaleIntercept``.  Two explicit, documented steps follow: pixels equal to
Pixel Padding Value (C.7.5.1.1.2; up to Pixel Padding Range Limit where present) are set
to ``config.hu_min``, and every value is then clipped to ``[config.hu_min,
config.hu_max]`` (the outside of the reconstruction circle is usually stored as a value
far below air).  The result is int16, or float32 when a slope or intercept is not a whole
number.

Decoding is one dataset at a time (:func:`decode_hu_slice`, a top-level function that a
process pool can call), with the fastest installed pydicom plugin for each transfer
syntax (:func:`decoding_plugin_for`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import uid as dcm_uid
from pydicom.pixels import get_decoder
from pydicom.pixels import pixel_array as _pixel_array

from .artefacts import Volume
from .config import VolumeConfig
from .errors import NotAnalysable

log = logging.getLogger(__name__)

__all__ = [
    "PREFERRED_PLUGINS",
    "StackGeometry",
    "build_volume",
    "decode_hu_slice",
    "decoding_plugin_for",
    "hu_dtype",
    "stack_geometry",
]

# Fastest pydicom decoding plugin per transfer syntax, measured on 512x512 CT slices
# (FIELD-NOTES.md and this module's report): pyjpegls is ~4x faster than pylibjpeg for
# JPEG-LS, pylibjpeg-rle ~6x faster than pydicom's numpy RLE decoder, pylibjpeg-openjpeg
# a little faster than Pillow for JPEG 2000.  Native (uncompressed, deflated, big endian)
# syntaxes need no plugin.  A missing preferred plugin falls back to pydicom's own choice.
PREFERRED_PLUGINS: dict[str, str] = {
    dcm_uid.JPEGLSLossless: "pyjpegls",
    dcm_uid.JPEGLSNearLossless: "pyjpegls",
    dcm_uid.JPEG2000Lossless: "pylibjpeg",
    dcm_uid.JPEG2000: "pylibjpeg",
    dcm_uid.HTJ2KLossless: "pylibjpeg",
    dcm_uid.HTJ2KLosslessRPCL: "pylibjpeg",
    dcm_uid.HTJ2K: "pylibjpeg",
    dcm_uid.JPEGLossless: "pylibjpeg",
    dcm_uid.JPEGLosslessSV1: "pylibjpeg",
    dcm_uid.JPEGBaseline8Bit: "pylibjpeg",
    dcm_uid.JPEGExtended12Bit: "pylibjpeg",
    dcm_uid.RLELossless: "pylibjpeg",
}

_DUPLICATE_TOLERANCE_MM = 1e-3  # two slices closer than this on the normal are one position
_COSINE_TOLERANCE = 1e-4  # IOP values differing by less are the same orientation
_SPACING_TOLERANCE_MM = 1e-4  # Pixel Spacing values differing by less are the same


@functools.cache
def decoding_plugin_for(transfer_syntax_uid: str) -> str:
    """The pydicom decoding plugin used for ``transfer_syntax_uid``.

    ``""`` means "pydicom's default choice" (always so for native syntaxes, and the
    fallback when the preferred plugin is not installed).  Raises ``NotImplementedError``
    when pydicom knows no decoder for the syntax at all.
    """
    decoder = get_decoder(transfer_syntax_uid)
    if decoder.is_native:
        return ""
    preferred = PREFERRED_PLUGINS.get(transfer_syntax_uid, "")
    if preferred and preferred in decoder.available_plugins:
        return preferred
    if preferred:
        log.info(
            "decoding plugin %r for %s is not available; using pydicom's choice among %s",
            preferred,
            transfer_syntax_uid,
            decoder.available_plugins,
        )
    return ""


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Plane:
    position: npt.NDArray[np.float64]  # IPP
    orientation: npt.NDArray[np.float64]  # IOP, 6 values
    spacing: npt.NDArray[np.float64]  # Pixel Spacing: (row spacing, column spacing)
    rows: int
    columns: int


@dataclass(frozen=True, eq=False)
class StackGeometry:
    """The checked geometry of one series, from headers only (nothing decoded).

    ``order[k]`` is the index, in the input sequence, of the dataset at slice ``k``;
    ``affine`` maps ``(k, r, c, 1)`` to LPS mm.  ``tilt_deg`` and ``steps_mm`` are kept
    for logging and QA.
    """

    order: tuple[int, ...]
    affine: npt.NDArray[np.float64]
    shape: tuple[int, int, int]
    tilt_deg: float
    steps_mm: npt.NDArray[np.float64]


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> npt.NDArray[np.float64] | None:
    value: Any = ds.get(keyword)
    if value is None:
        return None
    try:
        values = [float(v) for v in value] if not isinstance(value, str | bytes) else []
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _plane(ds: pydicom.Dataset, index: int) -> _Plane:
    """Image Plane module (PS3.3 C.7.6.2) of one dataset, or ``missing-geometry``."""
    ipp = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    rows, columns = ds.get("Rows"), ds.get("Columns")
    missing = [
        name
        for name, v in (
            ("ImagePositionPatient", ipp),
            ("ImageOrientationPatient", iop),
            ("PixelSpacing", spacing),
            ("Rows", rows),
            ("Columns", columns),
        )
        if v is None
    ]
    if missing or ipp is None or iop is None or spacing is None:
        raise NotAnalysable(
            "missing-geometry",
            f"slice {index}: expected ImagePositionPatient (3 numbers), "
            f"ImageOrientationPatient (6), PixelSpacing (2), Rows and Columns; "
            f"missing or malformed: {', '.join(missing)}",
        )
    row_cos, col_cos = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row_cos)), float(np.linalg.norm(col_cos))
    if (
        abs(nr - 1.0) > 1e-2
        or abs(nc - 1.0) > 1e-2
        or abs(float(row_cos @ col_cos)) > 1e-2
        or np.any(spacing <= 0)
    ):
        raise NotAnalysable(
            "missing-geometry",
            f"slice {index}: expected orthonormal ImageOrientationPatient and positive "
            f"PixelSpacing, got IOP {iop.tolist()} and spacing {spacing.tolist()}",
        )
    return _Plane(ipp, iop, spacing, int(rows), int(columns))


def stack_geometry(datasets: Sequence[pydicom.Dataset], config: VolumeConfig) -> StackGeometry:
    """Order the slices and derive the affine, refusing what cannot be stacked.

    Checks, in order: geometry present (C.7.6.2), at least three slices, identical
    Rows/Columns/Pixel Spacing/IOP, no duplicate position, no gantry tilt (the stacking
    direction, measured from the positions, must be parallel to the slice normal within
    ``config.max_tilt_deg``), even spacing (every step within ``max(gap_tolerance_mm,
    gap_tolerance_fraction * median)`` of the median step).

    Affine columns: k = mean step vector of the sorted stack, (IPP[last] - IPP[0]) / (n - 1),
    once every step is known to be even (along +normal);
    r = column cosine (IOP[3:6]) * PixelSpacing[0]; c = row cosine (IOP[0:3]) *
    PixelSpacing[1]; origin = IPP of slice k = 0.
    """
    planes = [_plane(ds, i) for i, ds in enumerate(datasets)]
    n = len(planes)
    if n < 3:
        raise NotAnalysable(
            f"too-few-slices:{n}", f"expected at least 3 slices to build a volume, got {n}"
        )
    first = planes[0]
    for i, p in enumerate(planes[1:], start=1):
        if (p.rows, p.columns) != (first.rows, first.columns):
            raise NotAnalysable(
                "mixed-geometry",
                f"slice {i}: expected {first.rows}x{first.columns} pixels like slice 0, "
                f"got {p.rows}x{p.columns}",
            )
        if np.max(np.abs(p.spacing - first.spacing)) > _SPACING_TOLERANCE_MM:
            raise NotAnalysable(
                "mixed-geometry",
                f"slice {i}: expected PixelSpacing {first.spacing.tolist()} like slice 0, "
                f"got {p.spacing.tolist()}",
            )
        if np.max(np.abs(p.orientation - first.orientation)) > _COSINE_TOLERANCE:
            raise NotAnalysable(
                "mixed-geometry",
                f"slice {i}: expected ImageOrientationPatient {first.orientation.tolist()} "
                f"like slice 0, got {p.orientation.tolist()}",
            )

    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)

    positions = np.stack([p.position for p in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]
    pos_sorted = positions[order]
    steps = np.diff(along_sorted)

    dup = np.flatnonzero(steps < _DUPLICATE_TOLERANCE_MM)
    if dup.size:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        raise NotAnalysable(
            "duplicate-slice-position",
            f"expected one slice per position, got slices {a} and {b} both at "
            f"{along_sorted[dup[0]]:.3f} mm along the slice normal",
        )

    step_vectors = np.diff(pos_sorted, axis=0)
    median_vector = np.median(step_vectors, axis=0)
    overall = pos_sorted[-1] - pos_sorted[0]

    def angle(v: npt.NDArray[np.float64]) -> float:
        cos = abs(float(v @ normal)) / float(np.linalg.norm(v))
        return math.degrees(math.acos(min(1.0, cos)))

    tilt = max(angle(median_vector), angle(overall))
    if tilt > config.max_tilt_deg:
        tag = datasets[int(order[0])].get("GantryDetectorTilt")
        raise NotAnalysable(
            f"gantry-tilt:{tilt:.1f}deg",
            f"expected slices stacked along the slice normal (within {config.max_tilt_deg} "
            f"deg), got {tilt:.2f} deg from the positions (GantryDetectorTilt tag: {tag})",
        )

    median = float(np.median(steps))
    tolerance = max(config.gap_tolerance_mm, config.gap_tolerance_fraction * median)
    deviating = np.flatnonzero(np.abs(steps - median) > tolerance)
    if deviating.size:
        multiples = np.rint(steps[deviating] / median)
        is_gap = (multiples >= 2) & (np.abs(steps[deviating] - multiples * median) <= tolerance)
        if bool(np.all(is_gap)):
            gap = float(steps[deviating].max())
            raise NotAnalysable(
                f"missing-slices:gap={gap:.1f}mm",
                f"expected every step to be {median:.3f} mm (the median), got "
                f"{deviating.size} step(s) of up to {gap:.3f} mm, i.e. missing slices",
            )
        lo, hi = float(steps.min()), float(steps.max())
        raise NotAnalysable(
            f"uneven-spacing:min={lo:.2f},max={hi:.2f}mm",
            f"expected every step within {tolerance:.3f} mm of the median {median:.3f} mm, "
            f"got steps from {lo:.3f} to {hi:.3f} mm",
        )

    affine = np.eye(4, dtype=np.float64)
    # The mean step (first to last slice), not the median: with positions rounded in the
    # header, a median step lets the far end of a long stack drift from its IPP.
    affine[:3, 0] = overall / (n - 1)
    affine[:3, 1] = col_cos * first.spacing[0]
    affine[:3, 2] = row_cos * first.spacing[1]
    affine[:3, 3] = pos_sorted[0]
    return StackGeometry(
        order=tuple(int(i) for i in order),
        affine=affine,
        shape=(n, first.rows, first.columns),
        tilt_deg=tilt,
        steps_mm=steps,
    )


# ---------------------------------------------------------------- pixels


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:
        if slope is None or intercept is None:
            raise ValueError("absent")
        s, i = float(slope), float(intercept)
    except (TypeError, ValueError) as e:
        raise NotAnalysable(
            "missing-rescale",
            f"expected numeric RescaleSlope and RescaleIntercept (CT Image, C.8.2.1), "
            f"got {slope!r} and {intercept!r}",
        ) from e
    if not (math.isfinite(s) and math.isfinite(i)) or s == 0:
        raise NotAnalysable(
            "missing-rescale",
            f"expected a finite non-zero RescaleSlope, got {slope!r} (intercept {intercept!r})",
        )
    return s, i


def hu_dtype(ds: pydicom.Dataset) -> np.dtype[Any]:
    """int16, or float32 where the slope or intercept is not a whole number."""
    s, i = _rescale(ds)
    return np.dtype(np.int16 if s.is_integer() and i.is_integer() else np.float32)


def _transfer_syntax(ds: pydicom.Dataset) -> dcm_uid.UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise NotAnalysable(
            "undecodable:unknown",
            "expected a TransferSyntaxUID in the file meta information, got none",
        )
    uid = dcm_uid.UID(str(ts))
    if not uid.is_transfer_syntax:  # found by the fuzzer: pydicom reads such files anyway
        shown = str(uid) if uid.is_valid else "invalid"
        raise NotAnalysable(
            f"undecodable:{shown}",
            f"expected a transfer syntax UID in the file meta information, got {shown}",
        )
    return uid


def check_pixel_header(ds: pydicom.Dataset, index: int = 0) -> None:
    """Refuse a slice whose Image Pixel module (C.7.6.3) cannot give one CT frame."""
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        raise NotAnalysable(
            "multiframe-unsupported",
            f"slice {index}: expected single-frame images, got NumberOfFrames={n_frames}",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise NotAnalysable(
            "not-monochrome",
            f"slice {index}: expected MONOCHROME1/2 with 1 sample per pixel, got "
            f"{photometric or 'none'} with {samples}",
        )
    if "PixelData" not in ds:
        raise NotAnalysable(
            "missing-pixel-data", f"slice {index}: expected (7FE0,0010) Pixel Data, got none"
        )
    ts = _transfer_syntax(ds)
    if ts.is_compressed:
        return
    value = ds.PixelData
    length = len(value) if value is not None else 0
    bits = int(ds.get("BitsAllocated", 0) or 0)
    expected = int(ds.Rows) * int(ds.Columns) * bits // 8
    if bits not in (8, 16, 32):
        raise NotAnalysable(
            "pixel-data-mismatch",
            f"slice {index}: expected BitsAllocated 8, 16 or 32, got {bits}",
        )
    if length < expected:
        raise NotAnalysable(
            "truncated-pixel-data",
            f"slice {index}: expected {expected} bytes of Pixel Data "
            f"({ds.Rows}x{ds.Columns}x{bits} bits), got {length}",
        )
    if length > expected + expected % 2:  # one trailing pad byte for odd lengths
        raise NotAnalysable(
            "pixel-data-mismatch",
            f"slice {index}: expected {expected} bytes of Pixel Data "
            f"({ds.Rows}x{ds.Columns}x{bits} bits), got {length}",
        )


def _padding_mask(ds: pydicom.Dataset, stored: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    """Pixels flagged as padding by Pixel Padding Value / Range Limit (C.7.5.1.1.2)."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):
        return None
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1

    def as_stored(v: int) -> int:
        # An ambiguous US/SS element read as unsigned for signed data: two's complement.
        if signed and v >= 2 ** (bits - 1):
            v -= 2**bits
        return v

    pad = as_stored(int(value))
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        return np.asarray(stored == pad)
    lim = as_stored(int(limit))
    lo, hi = min(pad, lim), max(pad, lim)
    return np.asarray((stored >= lo) & (stored <= hi))


def decode_hu_slice(ds: pydicom.Dataset, config: VolumeConfig, index: int = 0) -> npt.NDArray[Any]:
    """Decode one single-frame CT dataset to a 2-D Hounsfield-unit array (rows, columns).

    Steps: check the Image Pixel module; decode once with the plugin chosen by
    :func:`decoding_plugin_for` (BitsStored and PixelRepresentation are honoured by the
    decoder: unused high bits are masked and the sign is extended); apply the Modality
    LUT (C.11.1.1.2) ``stored * slope + intercept``; set Pixel Padding pixels to
    ``config.hu_min``; clip to ``[config.hu_min, config.hu_max]``.  Returns int16, or
    float32 when the rescale is not integral.  ``index`` only labels error messages.
    """
    check_pixel_header(ds, index)
    ts = _transfer_syntax(ds)
    slope, intercept = _rescale(ds)
    try:
        plugin = decoding_plugin_for(ts)
        stored = _pixel_array(ds, decoding_plugin=plugin)
    except NotImplementedError as e:
        raise NotAnalysable(
            f"undecodable:{ts}", f"slice {index}: no decoder for {ts.name} ({ts}): {e}"
        ) from e
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise NotAnalysable(
            f"undecodable:{ts}",
            f"slice {index}: expected decodable {ts.name} pixel data, the decoder said: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
        ) from e
    rows, columns = int(ds.Rows), int(ds.Columns)
    if stored.shape != (rows, columns):
        raise NotAnalysable(
            "pixel-data-mismatch",
            f"slice {index}: expected a {rows}x{columns} frame, decoded {stored.shape}",
        )
    padding = _padding_mask(ds, stored)
    out_dtype = hu_dtype(ds)
    if out_dtype == np.int16:
        hu: npt.NDArray[Any] = stored.astype(np.int32)
        if slope != 1:
            hu *= int(slope)
        if intercept != 0:
            hu += int(intercept)
    else:
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        hu[padding] = config.hu_min
    np.clip(hu, config.hu_min, config.hu_max, out=hu)
    return hu.astype(out_dtype, copy=False)


# JPEG 2000 and JPEG-LS slices decode in a pool of processes that lives as long as this
# process (the decoders hold the GIL: threads do not help, FIELD-NOTES).  Each slice
# travels as the few attributes decoding reads (:func:`_for_decoding`), not its whole
# header.  Measured on the 275 LIDC slices with 2 processes: JPEG 2000 7.9 s in place vs
# 4.2 s in the pool, JPEG-LS 1.7 s vs 0.9 s.  RLE and native data decode in place (1.4 ms
# a slice: the copies to and from another process would cost as much).
_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_POOL_SIZE = 0
_MIN_SLICES_FOR_POOL = 16
_SLOW_SYNTAXES = frozenset(
    {
        str(dcm_uid.JPEGLSLossless),
        str(dcm_uid.JPEGLSNearLossless),
        str(dcm_uid.JPEG2000Lossless),
        str(dcm_uid.JPEG2000),
        str(dcm_uid.HTJ2KLossless),
        str(dcm_uid.HTJ2KLosslessRPCL),
        str(dcm_uid.HTJ2K),
    }
)


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        if _POOL is not None:
            _POOL.shutdown()
        # forkserver: workers never inherit the threads of a loaded model runtime.
        ctx = multiprocessing.get_context("forkserver")
        _POOL = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        _POOL_SIZE = workers
    return _POOL


def _for_decoding(ds: pydicom.Dataset) -> pydicom.Dataset:
    """What :func:`decode_hu_slice` reads of a slice, to send to a decoding process: the
    Image Pixel, Modality LUT and padding attributes (group 0028), the pixel data (group
    7FE0) and the file meta (transfer syntax).  The elements are shared, not copied."""
    out = pydicom.Dataset()
    for group in (0x0028, 0x7FE0):
        for elem in ds.group_dataset(group):
            out.add(elem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = meta
    return out


def _decode_chunk(
    chunk: list[tuple[int, pydicom.Dataset]], config: VolumeConfig
) -> list[tuple[int, npt.NDArray[Any]]]:
    return [(k, decode_hu_slice(ds, config, k)) for k, ds in chunk]


def _decode_all(
    ordered: Sequence[pydicom.Dataset], config: VolumeConfig
) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """Every slice decoded once, as (k, HU slice); in parallel where it pays."""
    workers = config.decode_workers or os.cpu_count() or 1
    slow = str(_transfer_syntax(ordered[0])) in _SLOW_SYNTAXES
    if workers <= 1 or not slow or len(ordered) < _MIN_SLICES_FOR_POOL:
        for k, ds in enumerate(ordered):
            yield k, decode_hu_slice(ds, config, k)
        return
    items = [(k, _for_decoding(ds)) for k, ds in enumerate(ordered)]
    n_chunks = workers * 16
    chunks = [items[i::n_chunks] for i in range(n_chunks) if items[i::n_chunks]]
    pool = _pool(workers)
    for result in pool.map(_decode_chunk, chunks, [config] * len(chunks)):
        yield from result


def build_volume(
    datasets: Sequence[pydicom.Dataset], config: VolumeConfig
) -> tuple[Volume, list[pydicom.Dataset]]:
    """One series of CT datasets (with pixel data) -> (HU volume, datasets in slice order k).

    The geometry is checked and derived from the headers first (:func:`stack_geometry`),
    so a refusal costs no decoding; then every slice is decoded once
    (:func:`decode_hu_slice`), JPEG 2000 and JPEG-LS slices in ``config.decode_workers``
    processes.
    The volume's Frame of Reference UID is the series' (C.7.4.1); where the slices
    disagree (a de-identification artefact of LIDC-IDRI) it is left empty and a warning
    is logged.
    Nothing here depends on SOP Instance/Class UIDs, Instance Number or file names.
    """
    geometry = stack_geometry(datasets, config)
    ordered = [datasets[i] for i in geometry.order]
    for k, ds in enumerate(ordered):
        check_pixel_header(ds, k)
    for_uids = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in ordered}
    for_uid = next(iter(for_uids)) if len(for_uids) == 1 else ""
    if len(for_uids) > 1:
        # Seen in real de-identified data (LIDC-IDRI: one UID per slice) while the
        # positions agree; the checked positions, not the UID, carry the geometry.
        log.warning(
            "series %s carries %d different FrameOfReferenceUIDs; volume gets none",
            ordered[0].get("SeriesInstanceUID", ""),
            len(for_uids),
        )
    dtypes = {hu_dtype(ds) for ds in ordered}
    dtype = np.dtype(np.float32) if np.dtype(np.float32) in dtypes else np.dtype(np.int16)
    array = np.empty(geometry.shape, dtype=dtype)
    for k, hu in _decode_all(ordered, config):
        array[k] = hu
    volume = Volume(array, geometry.affine, for_uid)
    ts = {str(_transfer_syntax(ds)) for ds in ordered}
    log.info(
        "built volume %s of %s, spacing %s mm, tilt %.3f deg, transfer syntax %s, series %s",
        geometry.shape,
        dtype,
        tuple(round(s, 4) for s in volume.spacing),
        geometry.tilt_deg,
        ",".join(sorted(ts)),
        ordered[0].get("SeriesInstanceUID", ""),
    )
    return volume, ordered
