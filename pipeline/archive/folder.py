"""A folder archive: any tree of DICOM files with any file names.

Non-DICOM files, DICOMDIR and vendor index files (which are Media Storage Directory
objects) are skipped with a log line.  A DICOM file that is damaged (cut short, a length
field running past its end, elements that do not parse) is not skipped: what could be read
of its header is kept and marked with a coded reason (``truncated-file``,
``unreadable-instance``) that selection turns into a refusal, so a damaged slice never
silently vanishes from its series.  Sequences nested deeper than ``MAX_SEQUENCE_DEPTH``
are dropped (logged by tag): nothing the pipeline reads lives that deep, and walking them
would exhaust the stack.  Results are written under
``<root>/ctscreen/<StudyInstanceUID>/`` atomically: a temporary file in the same folder,
flushed and fsynced, then renamed over the final name, so a reader never sees half a file
and a re-run replaces rather than duplicates.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.tag import BaseTag

from ..artefacts import HEADER_KEYWORDS, READ_PROBLEM_ATTRIBUTE, OutputRef, QueryWindow
from ..durable import TMP_PREFIX, write_dataset_atomically
from ..errors import ArchiveError, ArchiveUnavailable, NotAnalysable

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
_HEADER_TAGS = frozenset(
    int(tag_for_keyword(k)) for k in HEADER_KEYWORDS | {"DirectoryRecordSequence"}  # type: ignore[arg-type]
)
# Sequences nested deeper than this are dropped: no attribute the pipeline reads is nested
# more than a few levels, and pydicom parses and copies sequences recursively.
MAX_SEQUENCE_DEPTH = 32


def drop_unparseable(ds: Dataset, name: str, only: frozenset[int] | None = None) -> None:
    """Parse every element now (pydicom converts values lazily, on first access), so that a
    malformed value cannot raise later inside a stage; elements that do not parse are
    removed and logged by tag (never by value).  Sequences are walked iteratively, so deep
    nesting cannot exhaust the stack, and a sequence nested deeper than
    ``MAX_SEQUENCE_DEPTH`` is removed (later copies and writes of a dataset recurse).
    Pixel data is left for the volume stage to judge.

    ``only``: parse just these top-level tags (the rest stay unparsed): for a header that
    is read for a few attributes and then dropped."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        tags = list(current.keys())
        if only is not None and current is ds:
            tags = [t for t in tags if t in only]
        for tag in tags:
            if tag in _PIXEL_TAGS:
                continue
            try:
                elem = current[tag]
                if elem.VR == "SQ":
                    if depth >= MAX_SEQUENCE_DEPTH:
                        log.info(
                            "%s: dropped element %s: sequences nested deeper than %d levels",
                            name, tag, MAX_SEQUENCE_DEPTH,
                        )
                        del current[tag]
                        continue
                    stack.extend(
                        (item, depth + 1) for item in elem.value if isinstance(item, Dataset)
                    )
                else:
                    _ = elem.value
            except READ_ERRORS as e:
                log.info("%s: dropped unparseable element %s (%s)", name, tag, type(e).__name__)
                del current[tag]


def read_instance(path: Path, name: str, header_only: bool) -> Dataset | None:
    """One file as a dataset, or None where it is not DICOM at all (no ``DICM`` prefix and
    nothing pydicom can read).

    ``header_only``: values longer than 4 KiB (the pixel data) stay on disk, and only the
    attributes discovery reads (``HEADER_KEYWORDS``) are parsed.  A damaged
    DICOM file gives what could be read of it, marked with ``READ_PROBLEM_ATTRIBUTE``:
    ``truncated-file`` where the file ends before an element it announces (a cut file, or
    a length field larger than the file), ``unreadable-instance`` where it does not parse.
    Every element of a whole read has been parsed (:func:`drop_unparseable`).
    """
    size = path.stat().st_size
    ds: Dataset | None
    try:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER if header_only else None)
        except RecursionError:
            # Sequences of undefined length are parsed eagerly and recursively by pydicom:
            # read again without the top-level elements that nest too deep.
            data = _without_deep_sequences(path.read_bytes(), name)
            ds, size = pydicom.dcmread(io.BytesIO(data)), len(data)
    except READ_ERRORS as e:
        ds = _salvage(path, name, e)
        if ds is None:
            return None
    else:
        cut, partial = _cut_short(ds, size)
        if cut:
            log.info("%s: the file ends before the element it announces: truncated", name)
            if partial is not None:
                del ds[partial]  # never keep half a value (half a UID is another UID)
            setattr(ds, READ_PROBLEM_ATTRIBUTE, "truncated-file")
    drop_unparseable(ds, name, _HEADER_TAGS if header_only else None)
    return ds


def read_problem(ds: Dataset) -> str:
    """The coded reason :func:`read_instance` marked ``ds`` with, or ``""``."""
    return str(getattr(ds, READ_PROBLEM_ATTRIBUTE, "") or "")


_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _cut_short(ds: Dataset, size: int) -> tuple[bool, BaseTag | None]:
    """Whether the file ends before the elements pydicom read from it say it should, and
    the element read in part where there is one.

    pydicom reads what is there: a value cut short is returned short, a deferred value is
    not read at all, and a file cut inside an encapsulated (undefined-length) value loses
    that element silently.  So: a value shorter than its length field, or the last
    element's end (value position + length) beyond the file, or 8 bytes or more after it
    left unread (fewer may be padding).  Not judged for the deflated transfer syntax,
    whose positions are those of the inflated stream.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return False, None
    last_tell, last_end, last_tag = -1, None, None
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)  # never read a deferred value here
        end: int | None = None
        if isinstance(elem, RawDataElement):
            tell, value = elem.value_tell, elem.value
            if elem.length == _UNDEFINED:
                if isinstance(value, bytes):
                    end = tell + len(value) + 8  # the value, then a sequence delimiter
            else:
                if isinstance(value, bytes) and len(value) < elem.length:
                    return True, elem.tag
                end = tell + elem.length
        elif isinstance(elem, DataElement):
            tell = elem.file_tell if elem.file_tell is not None else -1
        else:
            continue
        if tell > last_tell:
            last_tell, last_end, last_tag = tell, end, elem.tag
    if last_end is None:
        return False, None
    if last_end > size:
        return True, last_tag
    return size - last_end >= 8, None


def _salvage(path: Path, name: str, error: BaseException) -> Dataset | None:
    """What can be read of a DICOM file that pydicom refuses: the file meta, then every
    element up to the one that fails, marked ``truncated-file`` (the file ended) or
    ``unreadable-instance``.  None where the file is not DICOM (no ``DICM`` prefix) or
    not even its file meta can be read."""
    problem = (
        "truncated-file"
        if isinstance(error, EOFError | struct.error | BytesLengthException)
        else "unreadable-instance"
    )
    try:
        with open(path, "rb") as fp:
            fp.seek(128)
            if fp.read(4) != b"DICM":
                log.info("skipped %s: not a readable DICOM file (%s)", name, type(error).__name__)
                return None
            meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
            ts = str(meta.get("TransferSyntaxUID", "") or "")
            if ts == _DEFLATED or not ts:
                raise ValueError(f"cannot read past the file meta of transfer syntax {ts!r}")
            elements: dict[BaseTag, RawDataElement | DataElement] = {}
            try:
                for elem in data_element_generator(
                    fp, ts == "1.2.840.10008.1.2", ts != "1.2.840.10008.1.2.2"
                ):
                    elements[elem.tag] = elem
            except READ_ERRORS as e:
                if isinstance(e, EOFError | struct.error | BytesLengthException):
                    problem = "truncated-file"
        ds = Dataset(elements)
        ds.file_meta = FileMetaDataset(meta)
    except READ_ERRORS as e:
        log.info("skipped %s: DICOM file whose header cannot be read (%s)", name, type(e).__name__)
        return None
    log.info(
        "%s: damaged DICOM file (%s: %s); kept %d elements read before the damage",
        name, problem, type(error).__name__, len(elements),
    )
    # The last element read may be the one cut short: drop it rather than keep half a value.
    _, partial = _cut_short(ds, path.stat().st_size)
    if partial is not None:
        del ds[partial]
    setattr(ds, READ_PROBLEM_ATTRIBUTE, problem)
    return ds


def _without_deep_sequences(data: bytes, name: str) -> bytes:
    """``data`` (a DICOM file) without its top-level elements whose sequences of undefined
    length nest deeper than ``MAX_SEQUENCE_DEPTH``, found by an iterative scan of the
    encoding (PS3.5 7.1, 7.5).  Raises ValueError where the file cannot be scanned or
    nothing nests that deep (the recursion came from elsewhere)."""
    if data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    p, ts = 132, ""
    while p + 8 <= len(data) and struct.unpack_from("<H", data, p)[0] == 2:
        tag, value_at, length, _ = _element_header(data, p, False, "<")
        if length == _UNDEFINED:
            raise ValueError("undefined length in the file meta")
        if tag == 0x00020010:
            ts = data[value_at : value_at + length].decode("ascii", "replace").strip("\0 ")
        p = value_at + length
    if ts == _DEFLATED:
        raise ValueError("deflated data set")
    implicit, order = ts == "1.2.840.10008.1.2", ">" if ts == "1.2.840.10008.1.2.2" else "<"
    kept, dropped = [data[:p]], []
    while p + 8 <= len(data):
        tag, value_at, length, vr = _element_header(data, p, implicit, order)
        if length == _UNDEFINED:
            sequence = vr in (b"SQ", b"UN") if vr else tag != 0x7FE00010
            end, depth = _skip_undefined(
                data, value_at, implicit or vr == b"UN", order, datasets=sequence
            )
            depth = depth if sequence else 0
        else:
            end, depth = value_at + length, 0
        if depth > MAX_SEQUENCE_DEPTH:
            dropped.append(tag)
        else:
            kept.append(data[p:end])
        p = end
    kept.append(data[p:])
    if not dropped:
        raise ValueError("no sequence nests deeper than the limit")
    for tag in dropped:
        log.info(
            "%s: dropped element (%04X,%04X): sequences nested deeper than %d levels",
            name, tag >> 16, tag & 0xFFFF, MAX_SEQUENCE_DEPTH,
        )
    return b"".join(kept)


def _element_header(
    data: bytes, p: int, implicit: bool, order: str
) -> tuple[int, int, int, bytes]:
    """(tag, position of the value, length, VR or b"") of the element header at ``p``."""
    group, element = struct.unpack_from(order + "HH", data, p)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # items and delimiters carry no VR
        return tag, p + 8, struct.unpack_from(order + "I", data, p + 4)[0], b""
    vr = data[p + 4 : p + 6]
    if vr in _LONG_VRS:
        return tag, p + 12, struct.unpack_from(order + "I", data, p + 8)[0], vr
    return tag, p + 8, struct.unpack_from(order + "H", data, p + 6)[0], vr


def _skip_undefined(
    data: bytes, p: int, implicit: bool, order: str, datasets: bool = True
) -> tuple[int, int]:
    """From the value of an undefined-length element at ``p``: (its end, how deep pydicom
    would recurse to parse it, in sequences), without recursion.  ``datasets``: its items
    are data sets (a sequence), not fragments (encapsulated pixel data).  pydicom parses
    undefined-length sequences and every item inside them at once, while a defined-length
    sequence stays bytes until its value is used, so only the former count.  Raises
    ValueError or struct.error on bad input."""
    # Frames: ("S", implicit, holds data sets, -1) reads items up to a sequence delimiter;
    # ("I", implicit, True, end) reads elements up to an item delimiter (end -1) or to
    # ``end`` (an item of defined length).
    stack: list[tuple[str, bool, bool, int]] = [("S", implicit, datasets, -1)]
    depth = max_depth = 1
    while stack:
        kind, imp, holds_datasets, end = stack[-1]
        if kind == "I" and end >= 0 and p >= end:
            if p > end:
                raise ValueError("an element runs past the end of its item")
            stack.pop()
            continue
        if p + 8 > len(data):
            raise ValueError("the file ends inside a sequence")
        if kind == "S":
            tag, value_at, length, _ = _element_header(data, p, True, order)
            p = value_at
            if tag == _SEQUENCE_END:
                stack.pop()
                depth -= 1
            elif tag != _ITEM:
                raise ValueError(f"expected an item, got tag {tag:08X}")
            elif holds_datasets:
                stack.append(("I", imp, True, -1 if length == _UNDEFINED else p + length))
            elif length == _UNDEFINED:
                raise ValueError("a fragment of undefined length")
            else:
                p += length
        else:
            tag, value_at, length, vr = _element_header(data, p, imp, order)
            p = value_at
            if tag == _ITEM_END:
                stack.pop()
            elif length == _UNDEFINED:
                sequence = vr in (b"SQ", b"UN") if vr else tag != 0x7FE00010
                stack.append(("S", imp or vr == b"UN", sequence, -1))
                depth += 1
                max_depth = max(max_depth, depth)
            else:
                p += length
    return p, max_depth


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
                if fn.startswith(TMP_PREFIX):
                    continue
                ds = self._read_header(path)
                if ds is not None:
                    yield ds, str(path)

    def _read_header(self, path: Path) -> Dataset | None:
        rel = path.relative_to(self.root)
        try:
            ds = read_instance(path, str(rel), header_only=True)
        except READ_ERRORS as e:
            log.info("skipped %s: not a readable DICOM file (%s)", rel, type(e).__name__)
            return None
        if ds is None:
            return None
        try:  # elements are decoded on first access: a damaged one raises here
            meta = getattr(ds, "file_meta", None)
            for _ in meta if meta is not None else ():  # the few file meta elements, all
                pass
            sop_class = str(
                ds.get("SOPClassUID", "")
                or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
            )
        except READ_ERRORS as e:
            log.info("skipped %s: not a readable DICOM file (%s)", rel, type(e).__name__)
            return None
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            log.info("skipped %s: DICOMDIR / vendor index file", rel)
            return None
        return ds

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        out: list[Dataset] = []
        for loc in locators:
            name = Path(loc).name
            try:
                ds = read_instance(Path(loc), name, header_only=False)
            except READ_ERRORS as e:
                raise NotAnalysable(
                    "unreadable-instance",
                    f"{name} could not be read whole ({type(e).__name__}: {e})",
                ) from e
            if ds is None:
                raise NotAnalysable("unreadable-instance", f"{name} is no longer a DICOM file")
            problem = read_problem(ds)
            if problem:
                raise NotAnalysable(problem, f"{name} could not be read whole ({problem})")
            # pydicom returns what it parsed of a file cut short inside its header: a
            # dataset without pixel data where the header promised some is a cut file.
            if "PixelData" not in ds:
                raise NotAnalysable(
                    "truncated-file", f"{name} ends before its pixel data"
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
        try:
            write_dataset_atomically(ds, path)
        except OSError as e:  # a full disk, a read-only mount: the object waits in the outbox
            raise ArchiveUnavailable(
                f"cannot write {path.name} under {self.root}: {e.strerror or e}"
            ) from e
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

