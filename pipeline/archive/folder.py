"""A folder archive: any tree of DICOM files with any file names.

Non-DICOM files, DICOMDIR and vendor index files (which are Media Storage Directory
objects) are skipped with a log line.  Results are written under
``<root>/ctscreen/<StudyInstanceUID>/`` atomically: a temporary file in the same folder,
flushed and fsynced, then renamed over the final name, so a reader never sees half a file
and a re-run replaces rather than duplicates.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from ..artefacts import OutputRef, QueryWindow
from ..durable import write_dataset_atomically
from ..errors import ArchiveError, NotAnalysable

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
RESULTS_DIR = "ctscreen"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# A header read never loads values larger than this: pixel data stays on disk.
_DEFER = 4096
# pydicom raises these on a file that is not (valid) DICOM.
READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    OverflowError,
    NotImplementedError,
    BytesLengthException,
    struct.error,
    RecursionError,
)
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def drop_unparseable(ds: Dataset, name: str) -> None:
    """Parse every element now (pydicom converts values lazily, on first access), so that a
    malformed value cannot raise later inside a stage; elements that do not parse are
    removed and logged by tag (never by value).  Sequences are walked iteratively, so deep
    nesting cannot exhaust the stack.  Pixel data is left for the volume stage to judge."""
    stack: list[Dataset] = [ds]
    while stack:
        current = stack.pop()
        for tag in list(current.keys()):
            if tag in _PIXEL_TAGS:
                continue
            try:
                elem = current[tag]
                if elem.VR == "SQ":
                    stack.extend(item for item in elem.value if isinstance(item, Dataset))
                else:
                    _ = elem.value
            except READ_ERRORS as e:
                log.info("%s: dropped unparseable element %s (%s)", name, tag, type(e).__name__)
                del current[tag]


class FolderArchive:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ArchiveError(f"archive folder {self.root} does not exist or is not a folder")

    @property
    def name(self) -> str:
        return f"folder:{self.root.name}"

    @property
    def query_based(self) -> bool:
        return False

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        """Every file's header (``window`` is applied by ingest: files carry no index)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fn in sorted(filenames):
                path = Path(dirpath) / fn
                if fn.startswith(".ctscreen-tmp"):
                    continue
                ds = self._read_header(path)
                if ds is not None:
                    yield ds, str(path)

    def _read_header(self, path: Path) -> Dataset | None:
        rel = path.relative_to(self.root)
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
            drop_unparseable(ds, str(rel))
        except READ_ERRORS as e:
            log.info("skipped %s: not a readable DICOM file (%s)", rel, type(e).__name__)
            return None
        sop_class = str(
            ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")
        )
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            log.info("skipped %s: DICOMDIR / vendor index file", rel)
            return None
        return ds

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        out: list[Dataset] = []
        for loc in locators:
            try:
                ds = pydicom.dcmread(loc)
                drop_unparseable(ds, Path(loc).name)
            except READ_ERRORS as e:
                raise NotAnalysable(
                    "unreadable-instance",
                    f"{Path(loc).name} could not be read whole ({type(e).__name__}: {e})",
                ) from e
            # pydicom returns what it parsed of a file cut short inside its header: a
            # dataset without pixel data where the header promised some is a cut file.
            if "PixelData" not in ds:
                raise NotAnalysable(
                    "truncated-file", f"{Path(loc).name} ends before its pixel data"
                )
            out.append(ds)
        return out

    def result_path(self, ds: Dataset) -> Path:
        """Where a result object lives: only UID-shaped names, never outside the root."""
        study = _safe_uid(str(ds.StudyInstanceUID))
        sop = _safe_uid(str(ds.SOPInstanceUID))
        path = (self.root / RESULTS_DIR / study / f"{sop}.dcm").resolve()
        if self.root not in path.parents:
            raise ArchiveError(f"refused to write outside the archive: {path}")
        return path

    def store(self, ds: Dataset) -> str:
        path = self.result_path(ds)
        write_dataset_atomically(ds, path)
        return str(path)

    def remove(self, ref: OutputRef) -> None:
        """Delete a result object this program wrote earlier (only under ctscreen/)."""
        path = Path(ref.locator).resolve()
        if (self.root / RESULTS_DIR) not in path.parents:
            raise ArchiveError(f"refused to remove {path}: not a ctscreen result of this archive")
        path.unlink(missing_ok=True)

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        path = self.root / RESULTS_DIR / _safe_uid(study_uid) / f"{_safe_uid(sop_instance_uid)}.dcm"
        if not path.is_file():
            return False
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except READ_ERRORS:
            return False
        return str(ds.SOPInstanceUID) == sop_instance_uid


def _safe_uid(uid: str) -> str:
    if not _UID_RE.match(uid) or len(uid) > 64:
        raise ArchiveError(f"expected a DICOM UID (digits and dots, at most 64), got {uid[:80]!r}")
    return uid

