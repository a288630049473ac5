"""The typed, immutable objects that cross stage boundaries.

Geometry convention (the only one in this package): DICOM patient coordinates, LPS,
in millimetres.  A ``Volume`` array is indexed ``[k, r, c]`` = (slice, row, column);
its ``affine`` maps the homogeneous index ``(k, r, c, 1)`` to LPS.  Stages never flip or
permute arrays to "make them look right": sides and positions are computed in LPS.
That geometry has one home, :class:`Grid` (shape and affine, no voxels): index <-> LPS,
and the grids of a crop, of block means and of a resampling; stages take theirs from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

import numpy as np
import numpy.typing as npt

# ---------------------------------------------------------------- archive headers


@dataclass(frozen=True)
class QueryWindow:
    """The studies a run looks at, by StudyDate/StudyTime: ``start <= t < end`` (either open).

    Archives query by the date range (``StudyDate`` range matching, PS3.4 C.2.2.2.5); the
    exact time bounds are applied to the answers by ``ingest``, because separate StudyDate
    and StudyTime ranges do not combine into a date-time range in a C-FIND.
    """

    start: datetime | None = None
    end: datetime | None = None

    @classmethod
    def since(cls, day: date | None) -> QueryWindow:
        return cls(None if day is None else datetime.combine(day, time.min))

    @property
    def unbounded(self) -> bool:
        return self.start is None and self.end is None

    def date_range(self) -> str:
        """The StudyDate matching key: ``YYYYMMDD-YYYYMMDD``, open ends empty; '' if unbounded."""
        if self.unbounded:
            return ""
        lo = self.start.strftime("%Y%m%d") if self.start else ""
        hi = self.end.strftime("%Y%m%d") if self.end else ""
        return f"{lo}-{hi}"

    def holds(self, study_date: str, study_time: str) -> bool | None:
        """Whether a study at this date/time is inside; None where it has no StudyDate."""
        if not study_date:
            return None
        try:
            day = datetime.strptime(study_date[:8], "%Y%m%d")
        except ValueError:
            return None
        digits = "".join(ch for ch in study_time.split(".")[0] if ch.isdigit())[:6]
        digits = digits.ljust(6, "0") if digits else "000000"
        try:
            t = datetime.combine(day.date(), datetime.strptime(digits, "%H%M%S").time())
        except ValueError:
            t = day
        if self.start is not None and t < self.start:
            return False
        return not (self.end is not None and t >= self.end)

    def __str__(self) -> str:
        lo = self.start.isoformat(sep=" ") if self.start else "the beginning"
        hi = self.end.isoformat(sep=" ") if self.end else "now"
        return f"{lo} to {hi}"


@dataclass(frozen=True)
class InstanceHeader:
    """What selection needs to know about one stored instance, read from headers only.

    ``locator`` says where the archive keeps it (a file path for a folder archive).
    Patient names and IDs are deliberately absent: they never travel through the pipeline
    except inside the source datasets that the report copies from.
    """

    locator: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    series_number: int | None = None
    instance_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    convolution_kernel: str = ""
    slice_thickness: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    image_orientation: tuple[float, float, float, float, float, float] | None = None
    image_position: tuple[float, float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    gantry_tilt: float | None = None
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    has_pixel_data: bool = False
    number_of_frames: int = 1
    # A coded reason the archive found while reading this instance's file (a file cut
    # short: ``truncated-file``; a DICOM file that does not parse: ``unreadable-instance``);
    # its header holds only what could be read before the damage.
    read_problem: str = ""


# The attributes :func:`pipeline.ingest.instance_header` reads from a header dataset (and a
# folder archive to recognise a DICOMDIR): a header read need parse only these.
HEADER_KEYWORDS = frozenset({
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "ImageType", "SeriesNumber", "InstanceNumber", "SeriesDescription", "BodyPartExamined",
    "ConvolutionKernel", "SliceThickness", "PixelSpacing", "ImageOrientationPatient",
    "ImagePositionPatient", "Rows", "Columns", "GantryDetectorTilt", "StudyDate", "StudyTime",
    "AccessionNumber", "NumberOfFrames", "PatientName", "PatientID",
})


# The attribute by which an archive marks a header dataset it could read only in part
# (value: a coded reason); ingest copies it into ``InstanceHeader.read_problem``.
READ_PROBLEM_ATTRIBUTE = "ctscreen_read_problem"


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    instances: tuple[InstanceHeader, ...]

    @property
    def first(self) -> InstanceHeader:
        return self.instances[0]

    @property
    def modality(self) -> str:
        return self.first.modality

    @property
    def description(self) -> str:
        return self.first.series_description


@dataclass(frozen=True)
class StudyRef:
    """One study as found in the archive.  ``uid_valid`` is False where the instances
    carried no StudyInstanceUID and ``study_uid`` is a placeholder key made by ingest."""

    study_uid: str
    series: tuple[SeriesRef, ...]
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    uid_valid: bool = True
    # What an earlier run delivered for this study (from the worklist): the SR that a new
    # result replaces names them as its predecessors.
    previous_results: tuple[OutputRef, ...] = ()
    # PatientName / PatientID as the archive gave them (headers, C-FIND, QIDO-RS), for the
    # worklist's web pages only: kept out of repr, so never in a log line or traceback
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)

    @property
    def n_instances(self) -> int:
        return sum(len(s.instances) for s in self.series)


@dataclass(frozen=True)
class SeriesDecision:
    """Selection's verdict on one series: chosen, or the coded reasons it was not."""

    series_uid: str
    description: str
    n_instances: int
    reasons: tuple[str, ...]
    rank_key: tuple[float, ...] = ()


@dataclass(frozen=True)
class Selection:
    """The series to analyse (or None) and the verdict on every series of the study."""

    study_uid: str
    chosen: SeriesRef | None
    decisions: tuple[SeriesDecision, ...]
    reasons: tuple[str, ...] = ()  # study-level reasons where nothing was chosen


# ---------------------------------------------------------------- volumes


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid without voxels: ``shape`` (k, r, c) and the 4x4 ``affine`` that maps the
    homogeneous index ``(k, r, c, 1)`` to LPS mm.

    The one home of index <-> LPS geometry: a :class:`Volume` has one (:attr:`Volume.grid`),
    and a stage that works on part of a volume or on a coarser grid derives that grid with
    :meth:`crop`, :meth:`downsample` or :meth:`resampled`, never with an affine of its own.
    The affine is a read-only copy; two grids are equal when shape and affine are.
    """

    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(int(n) for n in self.shape) < 1:
            raise ValueError(f"Grid needs a 3-D shape of positive sizes, got {self.shape}")
        affine = np.array(self.affine, dtype=np.float64)  # a copy: the grid never changes
        if affine.shape != (4, 4):
            raise ValueError(f"Grid needs a 4x4 affine, got {affine.shape}")
        affine.setflags(write=False)
        k, r, c = self.shape
        object.__setattr__(self, "shape", (int(k), int(r), int(c)))
        object.__setattr__(self, "affine", affine)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return self.shape == other.shape and bool(np.array_equal(self.affine, other.affine))

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes()))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (k, r, c) in mm: the length of each affine column."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3, columns = unit LPS vectors of the k, r and c axes."""
        return np.asarray(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> npt.NDArray[np.float64]:
        """LPS position of voxel (0, 0, 0)."""
        return np.asarray(self.affine[:3, 3])

    @property
    def voxel_volume_ml(self) -> float:
        """One voxel's volume: |det| of the affine's 3x3 part (right for a sheared grid too)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def index_to_lps(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, 3) voxel indices (k, r, c), fractional allowed -> (N, 3) LPS mm."""
        idx = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        return np.asarray(idx @ self.affine[:3, :3].T + self.affine[:3, 3])

    def lps_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, 3) LPS mm -> (N, 3) fractional voxel indices (k, r, c)."""
        pts = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return np.asarray(pts @ inv[:3, :3].T + inv[:3, 3])

    def lps_coordinate(self, axis: int, box: tuple[slice, ...] | None = None,
                       dtype: npt.DTypeLike = np.float64) -> npt.NDArray[Any]:
        """LPS coordinate ``axis`` (0=x/L, 1=y/P, 2=z/S) of every voxel of ``box`` (three
        slices of unit step in this grid's indices; None: the whole grid), an array of the
        box's shape computed in ``dtype`` (float32 halves the memory of a big box)."""
        bounds = self._bounds(box)
        if any(step != 1 for _, _, step in bounds):
            raise ValueError(f"lps_coordinate needs a box of unit steps, got {box}")
        a = self.affine[axis].astype(dtype)
        k, r, c = (np.arange(lo, hi, dtype=dtype) for lo, hi, _ in bounds)
        return np.asarray(a[0] * k[:, None, None] + a[1] * r[None, :, None]
                          + a[2] * c[None, None, :] + a[3], dtype=dtype)

    def crop(self, box: tuple[slice, ...]) -> Grid:
        """The grid of ``array[box]`` for an array on this grid: ``box`` is three slices, read
        as numpy reads them (open or negative bounds; a step n > 1 keeps every n-th voxel)."""
        bounds = self._bounds(box)
        k, r, c = (len(range(lo, hi, step)) for lo, hi, step in bounds)
        if min(k, r, c) < 1:
            raise ValueError(f"crop {box} of a grid of shape {self.shape} is empty")
        start = np.array([lo for lo, _, _ in bounds], dtype=np.float64)
        steps = np.array([step for _, _, step in bounds], dtype=np.float64)
        out = np.array(self.affine)
        out[:3, :3] = self.affine[:3, :3] * steps
        out[:3, 3] = self.affine[:3, :3] @ start + self.affine[:3, 3]
        return Grid((k, r, c), out)

    def downsample(self, factors: tuple[int, int, int]) -> Grid:
        """The grid of the means over (f0, f1, f2) blocks of voxels (``lungs.block_mean``:
        the last block of an axis is edge-padded, so each size is rounded up).  Its voxel i
        is the block ``f * i .. f * i + f - 1`` and lies at the block's centre, index
        ``f * i + (f - 1) / 2`` of this grid."""
        if len(factors) != 3 or min(int(n) for n in factors) < 1:
            raise ValueError(f"downsample needs three factors >= 1, got {factors}")
        f = np.asarray(factors, dtype=np.float64)
        k, r, c = (-(-n // int(b)) for n, b in zip(self.shape, factors, strict=True))
        out = np.array(self.affine)
        out[:3, :3] = self.affine[:3, :3] * f
        out[:3, 3] = self.affine[:3, :3] @ ((f - 1.0) / 2.0) + self.affine[:3, 3]
        return Grid((k, r, c), out)

    def resampled(self, to_index: npt.NDArray[np.float64],
                  shape: tuple[int, int, int]) -> Grid:
        """A grid of ``shape`` whose voxel i lies at this grid's fractional index
        ``to_index @ (i, 1)`` (``to_index``: 4x4, e.g. a network's square grid per slice)."""
        return Grid(shape, self.affine @ np.asarray(to_index, dtype=np.float64))

    def _bounds(self, box: tuple[slice, ...] | None) -> list[tuple[int, int, int]]:
        """(start, stop, step) per axis of ``box`` on this grid."""
        if box is None:
            return [(0, n, 1) for n in self.shape]
        if len(box) != 3 or not all(isinstance(s, slice) for s in box):
            raise ValueError(f"expected a box of three slices, got {box}")
        out = [s.indices(n) for s, n in zip(box, self.shape, strict=True)]
        if any(step < 1 for _, _, step in out):
            raise ValueError(f"expected positive steps, got {box}")
        return out


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels with their geometry.  ``array[k, r, c]``; ``affine @ (k, r, c, 1)`` = LPS mm;
    the geometry is the :class:`Grid` of :attr:`grid` (the methods below delegate to it)."""

    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    frame_of_reference_uid: str = ""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3-D array, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume needs a 4x4 affine, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, r, c = self.array.shape
        return (int(k), int(r), int(c))

    @property
    def grid(self) -> Grid:
        """The volume's grid (shape and affine, no voxels): all of its geometry."""
        return Grid(self.shape, self.affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (k, r, c) in mm."""
        return self.grid.spacing

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3, columns = unit LPS vectors of the k, r and c axes."""
        return self.grid.direction

    @property
    def origin(self) -> npt.NDArray[np.float64]:
        """LPS position of voxel (0, 0, 0)."""
        return self.grid.origin

    @property
    def voxel_volume_ml(self) -> float:
        return self.grid.voxel_volume_ml

    def index_to_lps(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, 3) voxel indices (k, r, c) -> (N, 3) LPS mm."""
        return self.grid.index_to_lps(kji)

    def lps_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, 3) LPS mm -> (N, 3) fractional voxel indices (k, r, c)."""
        return self.grid.lps_to_index(xyz)

    def lps_grid(self, axis: int) -> npt.NDArray[np.float64]:
        """LPS coordinate ``axis`` (0=x/L, 1=y/P, 2=z/S) of every voxel, same shape as array."""
        return self.grid.lps_coordinate(axis)

    def with_array(self, array: npt.NDArray[Any]) -> Volume:
        """A volume on the same grid holding ``array`` (a mask, a probability map...)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.affine, self.frame_of_reference_uid)


# ---------------------------------------------------------------- lungs and lesions


class Side(enum.StrEnum):
    RIGHT = "right"
    LEFT = "left"


class Zone(enum.StrEnum):
    """Craniocaudal thirds of one lung (by its own superior-inferior extent)."""

    UPPER = "upper"
    MIDDLE = "middle"
    LOWER = "lower"


class LesionKind(enum.StrEnum):
    GGO = "ground-glass opacity"
    CONSOLIDATION = "consolidation"


class Pattern(enum.StrEnum):
    """The study-level call: the CT appearance category for COVID-19 pneumonia of the RSNA
    expert consensus statement (Simpson S et al., Radiol Cardiothorac Imaging
    2020;2(2):e200152).  The rule that assigns it is :func:`pipeline.lesions.rsna_category`."""

    TYPICAL = "typical"
    INDETERMINATE = "indeterminate"
    ATYPICAL = "atypical"
    NEGATIVE = "negative"  # negative for pneumonia


# Label values, fixed across the package, the SEG and the models.
LUNG_LABELS = {Side.RIGHT: 1, Side.LEFT: 2}
LESION_LABELS = {LesionKind.GGO: 1, LesionKind.CONSOLIDATION: 2}


@dataclass(frozen=True, eq=False)
class LungMasks:
    """``labels``: uint8 on the CT grid, 0 outside, 1 right lung, 2 left lung (LUNG_LABELS)."""

    labels: Volume
    method: str
    # coded quality warnings the segmenter itself raised (e.g. its cross-check disagreed)
    warnings: tuple[str, ...] = ()
    # a lung model with an infection class: its infected lung (uint8 0/1 on the CT grid,
    # inside ``labels``), which the lesion detector "lung-model" turns into lesions
    infection: Volume | None = None

    def mask(self, side: Side | None = None) -> npt.NDArray[np.bool_]:
        a = self.labels.array
        return np.asarray(a > 0) if side is None else np.asarray(a == LUNG_LABELS[side])


@dataclass(frozen=True)
class Finding:
    """One connected lesion of one kind, ranked by volume (index 1 = largest)."""

    index: int
    kind: LesionKind
    volume_ml: float
    side: Side
    zone: Zone
    mean_hu: float
    centroid_lps: tuple[float, float, float]
    bbox_min_lps: tuple[float, float, float]
    bbox_max_lps: tuple[float, float, float]
    voxel_count: int
    # Share of its voxels within ``LesionsConfig.peripheral_depth_mm`` of the pleura (the
    # chest's outer lung surface, not the mediastinal one): 1 subpleural, 0 central.
    peripheral_fraction: float = 0.0
    # Where its voxels are on the CT grid: the index box (k0, r0, c0, k1, r1, c1; stops
    # exclusive) and one voxel of it (k, r, c); ``lesions.finding_mask`` gives its voxels.
    voxel_box: tuple[int, ...] = ()
    seed_index: tuple[int, ...] = ()


@dataclass(frozen=True)
class ZoneFigure:
    side: Side
    zone: Zone
    lung_ml: float
    involved_ml: float
    involved_pct: float
    score: int  # 0..5 on the severity scale


@dataclass(frozen=True)
class LungFigure:
    side: Side
    volume_ml: float
    ggo_ml: float
    consolidation_ml: float
    involved_pct: float


@dataclass(frozen=True, eq=False)
class LesionAnalysis:
    """What the lesion stage found.  ``labels``: uint8 on the CT grid, LESION_LABELS."""

    labels: Volume
    findings: tuple[Finding, ...]
    lungs: tuple[LungFigure, ...]  # (right, left)
    zones: tuple[ZoneFigure, ...]  # six: right/left x upper/middle/lower
    involved_pct: float  # both lungs together
    severity_score: int
    severity_max: int
    severity_scale: str
    suspicion: float  # 0..1, used to rank the worklist
    pattern: Pattern
    detector: str  # name and version of the detector that produced it
    n_findings_total: int = 0  # before the report cap; findings may list fewer


# ---------------------------------------------------------------- results


class Status(enum.StrEnum):
    ANALYSED = "analysed"
    NOT_ANALYSED = "not-analysed"
    FAILED = "failed"  # an unexpected error: a defect, reported as such, never as negative


@dataclass(frozen=True)
class OutputRef:
    kind: str  # "sr", "seg", "sc"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    locator: str = ""


@dataclass(frozen=True)
class ScreeningResult:
    """The outcome for one study: what the worklist stores and shows."""

    study_uid: str
    accession_number: str
    study_date: str
    status: Status
    reasons: tuple[str, ...] = ()
    # Quality warnings on an analysed study (e.g. an implausible lung mask): such a study
    # is never shown as plainly negative.
    warnings: tuple[str, ...] = ()
    series_uid: str = ""
    series_description: str = ""
    n_slices: int = 0
    lung_volume_ml: tuple[float, float] | None = None  # (right, left)
    involved_pct: float | None = None
    severity_score: int | None = None
    severity_max: int | None = None
    suspicion: float | None = None
    pattern: Pattern | None = None
    n_findings: int = 0
    outputs: tuple[OutputRef, ...] = ()
    algorithm_version: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    # from the StudyRef, for the worklist's web pages only (never logged: not in repr)
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)


# ---------------------------------------------------------------- SimpleITK bridge
# The only place where ITK's (x=column, y=row, z=slice) index order meets ours.


def volume_from_sitk(img: Any) -> Volume:
    """SimpleITK image -> Volume.  ITK index order is (x=col, y=row, z=slice) and
    GetArrayFromImage gives [k, r, c], so affine column j = direction[:, axis] * spacing[axis]
    with axis = (2, 1, 0)[j].  ITK's physical space is LPS, like ours."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    sp = np.asarray(img.GetSpacing(), dtype=np.float64)
    aff = np.eye(4)
    for j, axis in enumerate((2, 1, 0)):
        aff[:3, j] = d[:, axis] * sp[axis]
    aff[:3, 3] = img.GetOrigin()
    return Volume(arr, aff)


def volume_to_sitk(volume: Volume) -> Any:
    """Volume -> SimpleITK image (the inverse of :func:`volume_from_sitk`), e.g. to write a
    label map as NIfTI on a CT's grid."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    sp = volume.spacing  # (k, r, c)
    d = volume.direction  # columns: k, r, c
    img.SetSpacing((sp[2], sp[1], sp[0]))
    img.SetDirection(tuple(np.stack([d[:, 2], d[:, 1], d[:, 0]], axis=1).ravel().tolist()))
    img.SetOrigin(tuple(float(v) for v in volume.origin))
    return img


def bounding_box(mask: npt.NDArray[Any],
                 margin: int | tuple[int, ...] = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of ``mask`` (``margin`` voxels wider on
    each side, per axis where a tuple, within the grid), or None where there is none.

    A reduction per axis over the array (and over the occupied slices only for the other
    two): about ten times faster than ``scipy.ndimage.find_objects`` on a whole CT grid.
    """
    reduce_over = tuple(range(1, mask.ndim))
    ks = np.flatnonzero(mask.any(axis=reduce_over))
    if ks.size == 0:
        return None
    sub = mask[ks[0]: ks[-1] + 1]
    bounds = [(int(ks[0]), int(ks[-1]) + 1)]
    for ax in range(1, mask.ndim):
        idx = np.flatnonzero(sub.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        bounds.append((int(idx[0]), int(idx[-1]) + 1))
    wider = (margin,) * mask.ndim if isinstance(margin, int) else margin
    return tuple(slice(max(0, lo - m), min(n, hi + m))
                 for (lo, hi), m, n in zip(bounds, wider, mask.shape, strict=True))
