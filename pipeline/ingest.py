"""Archive -> the studies it holds, from headers only (no pixel data is read here).

Every kind of archive (folder, DICOMweb, DIMSE) yields pydicom header datasets with a
locator; this module turns them into ``InstanceHeader`` records and groups them into
``StudyRef`` objects that selection can judge.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from typing import Any

from pydicom.dataset import Dataset

from .archive import Archive
from .artefacts import READ_PROBLEM_ATTRIBUTE, InstanceHeader, QueryWindow, SeriesRef, StudyRef

log = logging.getLogger(__name__)

NO_UID_PREFIX = "no-uid-"


def find_studies(
    archive: Archive, since: date | None = None, window: QueryWindow | None = None
) -> list[StudyRef]:
    """All studies of the archive inside the query window (or on or after ``since``).

    A study without a StudyDate is kept (and logged): dropping it would lose it silently.
    """
    if window is None:
        window = QueryWindow.since(since)
    studies = group_studies(archive.headers(window), query_based=archive.query_based)
    if window.unbounded:
        return studies
    kept = []
    for s in studies:
        inside = window.holds(s.study_date, s.study_time)
        if inside is None:
            log.info("study %s has no StudyDate; kept despite the query window", s.study_uid)
            kept.append(s)
        elif inside:
            kept.append(s)
    log.info("%d of %d studies from %s", len(kept), len(studies), window)
    return kept


def instance_header(ds: Dataset, locator: str, query_based: bool = False) -> InstanceHeader:
    """Pick what selection needs out of one header dataset.

    ``query_based``: the dataset is a query answer (C-FIND identifier, QIDO or WADO-RS
    metadata), which never carries pixel data; an image is then known by Rows and Columns.

    Where the dataset's SOP Class/Instance UID is empty but the file meta holds one
    (seen in anonymised exports), the file meta value is used: PS3.10 7.1 requires the
    two to be equal, so this is not a guess.
    """
    meta = getattr(ds, "file_meta", None)
    sop_uid = _text(ds, "SOPInstanceUID") or (
        str(meta.get("MediaStorageSOPInstanceUID", "")) if meta is not None else ""
    )
    sop_class = _text(ds, "SOPClassUID") or (
        str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    )
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return InstanceHeader(
        locator=locator,
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=tsyntax,
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(str(v).strip().upper() for v in _multi(ds, "ImageType")),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined").upper(),
        convolution_kernel="\\".join(str(v) for v in _multi(ds, "ConvolutionKernel")),
        slice_thickness=_float(ds, "SliceThickness"),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),  # type: ignore[arg-type]
        image_orientation=_floats(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
        image_position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        gantry_tilt=_float(ds, "GantryDetectorTilt"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        has_pixel_data=any(
            t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
        )
        or (query_based and bool(_int(ds, "Rows")) and bool(_int(ds, "Columns"))),
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
        read_problem=str(getattr(ds, READ_PROBLEM_ATTRIBUTE, "") or ""),
    )


def group_studies(
    items: Iterable[tuple[Dataset, str]], query_based: bool = False
) -> list[StudyRef]:
    """Group (header, locator) pairs by study and series, in a stable order.

    Instances without a StudyInstanceUID (or SeriesInstanceUID) cannot be written back
    into a study; they are grouped by the folder they came from under a placeholder key
    starting with ``no-uid-`` so that they still reach the worklist with a reason.
    """
    by_study: dict[str, dict[str, list[InstanceHeader]]] = defaultdict(lambda: defaultdict(list))
    # PatientName / PatientID of each study: the first instance that has them (never logged)
    patient: dict[str, tuple[str, str]] = {}
    for ds, locator in items:
        h = instance_header(ds, locator, query_based)
        folder = locator.rsplit("/", 1)[0]
        study_key = h.study_uid or NO_UID_PREFIX + _short_hash(folder)
        series_key = h.series_uid or NO_UID_PREFIX + _short_hash(folder + "|" + h.modality)
        by_study[study_key][series_key].append(h)
        if not any(patient.get(study_key, ("", ""))):
            patient[study_key] = (_single(ds, "PatientName"), _single(ds, "PatientID"))
    studies = []
    for study_key in sorted(by_study):
        series = []
        for series_key in sorted(by_study[study_key]):
            inst = sorted(
                by_study[study_key][series_key],
                key=lambda h: (h.instance_number or 0, h.locator),
            )
            series.append(SeriesRef(study_key, series_key, tuple(inst)))
        first = series[0].first
        studies.append(
            StudyRef(
                study_uid=study_key,
                series=tuple(series),
                study_date=first.study_date,
                study_time=first.study_time,
                accession_number=first.accession_number,
                uid_valid=not study_key.startswith(NO_UID_PREFIX),
                patient_name=patient.get(study_key, ("", ""))[0],
                patient_id=patient.get(study_key, ("", ""))[1],
            )
        )
    return studies


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    if v is None:
        return ""
    if not isinstance(v, str | bytes) and hasattr(v, "__iter__"):
        return "\\".join(str(x) for x in v).strip()
    return str(v).strip()


def _single(ds: Dataset, keyword: str) -> str:
    """A one-valued text attribute (a PersonName too, which iterates by character)."""
    v = ds.get(keyword)
    return "" if v is None else str(v).strip()


def _multi(ds: Dataset, keyword: str) -> list[Any]:
    v = ds.get(keyword)
    if v is None or v == "":
        return []
    if isinstance(v, str | bytes):
        return [v]
    try:
        return list(v)
    except TypeError:
        return [v]


def _float(ds: Dataset, keyword: str) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _int(ds: Dataset, keyword: str) -> int | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    vals = _multi(ds, keyword)
    if len(vals) != n:
        return None
    try:
        return tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        return None
