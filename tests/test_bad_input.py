"""Bad input through the whole command: one named fixture per kind of damage.

Each fixture builds a small folder archive (a synthetic phantom chest CT study, written as
real DICOM in ``tmp_path``) and damages it in exactly one way; each test runs
``ctscreen run --archive ROOT --json`` and checks that the command does not crash (exit
status 0), that the study gets one worklist row with the specific coded reason (or, for
harmless damage, is analysed), that nothing was written outside ``ROOT/ctscreen/`` and the
worklist beside the root, and that no patient identifier reached the logs.  A SIGALRM
guard fails a test that runs past ``TIME_LIMIT_S`` instead of letting it hang.

Most run the command with ``--workers 0`` (the same stages, screened in this process: no
worker process to start, the models loaded once for all tests); a few (``screened_in_worker``)
run it as configured, with a worker process, whose output is checked for identifiers too.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import shutil
import signal
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.artefacts import Volume
from pipeline.cli import main
from pipeline.phantom.dicom import derive_uid, write_ct_series
from pipeline.phantom.model import PhantomSpec, make_grid, render

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

# 110 slices of 1.5 mm (165 mm) of 128 x 128 pixels of 2.8 mm: the smallest phantom that
# selection accepts as a chest (>= 40 slices, >= 150 mm) and that screens in about 2 s.
SHAPE = (110, 128, 128)
SPACING = (1.5, 2.8, 2.8)
STUDY_UID = derive_uid(7, "bad-input-study")
SERIES_UID = derive_uid(7, "bad-input-series")
PATIENT_ID, PATIENT_NAME = "PID-SECRET-7", "Secret^Patient"
ACCESSION = "BAD1"
MIDDLE = 55  # index of the damaged slice, well inside the stack
TIME_LIMIT_S = 60

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PIXEL_DATA, PIXEL_SPACING, ROWS, COLUMNS = 0x7FE00010, 0x00280030, 0x00280010, 0x00280011
SERIES_DESCRIPTION, SERIES_INSTANCE_UID = 0x0008103E, 0x0020000E
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail (rather than hang) past TIME_LIMIT_S; pytest-timeout is not a dependency."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"a bad-input test ran past {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- building and damaging


@functools.cache
def _phantom() -> Volume:
    affine = make_grid(SHAPE, SPACING, "axial")
    ct, _ = render(PhantomSpec(seed=7), affine, SHAPE, slice_thickness_mm=SPACING[0])
    return ct


_WRITTEN: dict[str, tuple[Path, list[str]]] = {}  # overrides -> (template folder, file names)
_TEMPLATES: list[Path] = []  # where the templates are written (this session's)


@pytest.fixture(scope="session", autouse=True)
def _written_studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each variant of the study is encoded once per session and copied for each test."""
    _TEMPLATES.append(tmp_path_factory.mktemp("bad-input-studies"))
    yield
    _TEMPLATES.clear()
    _WRITTEN.clear()


def write_study(folder: Path, **overrides: Any) -> list[Path]:
    """The phantom as one CT series (one file per slice, in slice order): a fresh copy of
    the files written once per session for these ``overrides``."""
    key = repr(sorted(overrides.items()))
    if key not in _WRITTEN:
        template = _TEMPLATES[0] / f"study{len(_WRITTEN)}"
        paths = _write_study(template, **overrides)
        _WRITTEN[key] = (template, [str(p.relative_to(template)) for p in paths])
    template, names = _WRITTEN[key]
    shutil.copytree(template, folder, dirs_exist_ok=True)
    return [folder / name for name in names]


def _write_study(folder: Path, **overrides: Any) -> list[Path]:
    args: dict[str, Any] = {
        "study_uid": STUDY_UID,
        "series_uid": SERIES_UID,
        "patient_id": PATIENT_ID,
        "patient_name": PATIENT_NAME,
        "accession_number": ACCESSION,
        "slice_thickness": SPACING[0],
        "seed": 7,
    }
    args.update(overrides)
    return write_ct_series(_phantom(), folder, **args)


def archive_root(tmp_path: Path) -> Path:
    """Two levels below tmp_path, so that "../../x" in a UID would still land inside
    tmp_path, where the tests look."""
    root = tmp_path / "site" / "night" / "archive"
    root.mkdir(parents=True)
    return root


def rewrite(
    paths: list[Path], change: Callable[[Dataset], None], enforce_file_format: bool = True
) -> None:
    """Read each file with pydicom, apply ``change``, write it back (invalid values are
    wanted here: pydicom's warnings about them are silenced; ``enforce_file_format=False``
    lets an empty file meta UID through)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            ds = pydicom.dcmread(p)
            change(ds)
            ds.save_as(p, enforce_file_format=enforce_file_format)


def elements(data: bytes) -> dict[int, tuple[int, int, int]]:
    """{tag: (element start, value start, value end)} of the top-level elements of an
    explicit VR little endian file as write_ct_series writes it (no sequences)."""
    out: dict[int, tuple[int, int, int]] = {}
    p = 132
    while p + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, p)
        vr = data[p + 4 : p + 6]
        if vr in _LONG_VRS:
            value_at, length = p + 12, struct.unpack_from("<I", data, p + 8)[0]
        else:
            value_at, length = p + 8, struct.unpack_from("<H", data, p + 6)[0]
        out[group << 16 | element] = (p, value_at, value_at + length)
        p = value_at + length
    return out


def insert_element(path: Path, tag: int, encoded: bytes) -> None:
    """Insert an encoded top-level element in tag order."""
    data = path.read_bytes()
    at = min(start for t, (start, _, _) in elements(data).items() if t > tag)
    path.write_bytes(data[:at] + encoded + data[at:])


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def nested_sequences(tag: int, depth: int, sequence_length: str, item_length: str) -> bytes:
    """An SQ element ``tag`` holding one item that holds the same SQ, ``depth`` deep; each
    length "defined" or "undefined" (then closed by a delimiter)."""
    body = b""
    for _ in range(depth):
        if item_length == "undefined":
            item = _tag(0xFFFEE000) + b"\xff\xff\xff\xff" + body + _tag(0xFFFEE00D) + bytes(4)
        else:
            item = _tag(0xFFFEE000) + struct.pack("<I", len(body)) + body
        if sequence_length == "undefined":
            body = (
                _tag(tag) + b"SQ\0\0\xff\xff\xff\xff" + item + _tag(0xFFFEE0DD) + bytes(4)
            )
        else:
            body = _tag(tag) + b"SQ\0\0" + struct.pack("<I", len(item)) + item
    return body


def _set_sop_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _non_ct_instance(folder: Path, sop_class: str, modality: str, k: int) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derive_uid(7, "non-ct", modality, k)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, derive_uid(7, "non-ct", modality)
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = ACCESSION, "20200301", "020000"
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = modality, k + 1, 90
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"SR{k:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- running the command


def _files(tmp_path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(tmp_path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in tmp_path.rglob("*")
        if p.is_file()
    }


def screen(
    root: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    in_worker: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """Run the whole command on ``root`` (``in_worker``: with the configured worker process,
    else ``--workers 0``); check the exit status, that nothing changed outside
    ROOT/ctscreen/ but the worklist beside the root, and that no patient identifier was
    logged (``capfd``: worker processes' output too); return the worklist rows and what
    the run logged (this process and its workers)."""
    top = root.parents[2]  # tmp_path
    before = _files(top)
    caplog.set_level(logging.INFO)
    capfd.readouterr()
    rc = main(["run", "--archive", str(root), "--json", *([] if in_worker else ["--workers", "0"])])
    run = capfd.readouterr()
    assert rc == 0, run.err[-3000:]
    json.loads(run.out)  # a summary, not a traceback
    after = _files(top)
    results = str((root / "ctscreen").relative_to(top)) + "/"
    # the worklist and what the run keeps beside it (-wal, -shm, .outbox/, .last-run.json)
    worklist = str(root.relative_to(top)) + ".ctscreen"
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    stray = sorted(p for p in changed if not p.startswith((results, worklist)))
    assert not stray, f"written outside the archive's results and worklist: {stray}"
    for p in (root / "ctscreen").rglob("*"):
        assert p.resolve().is_relative_to(root.resolve() / "ctscreen"), p
    assert main(["worklist", "--archive", str(root), "--json"]) == 0
    listing = capfd.readouterr()
    for text in (caplog.text, run.err, run.out, listing.err):
        assert PATIENT_ID not in text and PATIENT_NAME not in text and "Secret" not in text
    rows: list[dict[str, Any]] = json.loads(listing.out)
    for row in rows:
        assert row["status"] in ("analysed", "not-analysed"), row  # never "failed"
    return rows, caplog.text + run.err


class Screen:
    """:func:`screen` bound to one test's captured output and log; ``log`` holds what the
    last run logged, in this process and in its worker processes."""

    def __init__(self, capfd: pytest.CaptureFixture[str],
                 caplog: pytest.LogCaptureFixture, in_worker: bool = False) -> None:
        self.capfd, self.caplog, self.log = capfd, caplog, ""
        self.in_worker = in_worker

    def __call__(self, root: Path) -> list[dict[str, Any]]:
        rows, self.log = screen(root, self.capfd, self.caplog, self.in_worker)
        return rows


@pytest.fixture
def screened(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Screen:
    """:func:`screen` bound to this test's captured output and log, in this process."""
    return Screen(capfd, caplog)


@pytest.fixture
def screened_in_worker(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Screen:
    """:func:`screen` bound to this test's captured output and log, with a worker process."""
    return Screen(capfd, caplog, in_worker=True)


def refused(rows: list[dict[str, Any]], code: str) -> dict[str, Any]:
    """The study's only row, not analysed with exactly ``code``; nothing written."""
    (row,) = rows
    assert row["status"] == "not-analysed", row
    assert row["reasons"] == [code], row
    assert not any((row["result_uids"] or {}).values()), row
    return row


def analysed(rows: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """The study's only row, analysed, its results filed under ROOT/ctscreen/<study>/."""
    (row,) = rows
    assert row["status"] == "analysed", row
    assert row["reasons"] == [], row
    outputs = sorted((root / "ctscreen").rglob("*.dcm"))
    assert outputs and all(p.parent == root / "ctscreen" / STUDY_UID for p in outputs), outputs
    return row


# ---------------------------------------------------------------- 1. truncated files


def cut_middle_slice(tmp_path: Path, tag: int, keep: int, from_value: bool = True) -> Path:
    """An archive whose middle slice ends ``keep`` bytes after the start of ``tag``'s value
    (``from_value``) or of its element header."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    data = path.read_bytes()
    start, value_at, _ = elements(data)[tag]
    path.write_bytes(data[: (value_at if from_value else start) + keep])
    return root


@pytest.fixture
def truncated_in_pixel_data(tmp_path: Path) -> Path:
    """One slice cut short 1000 bytes into its pixel data."""
    return cut_middle_slice(tmp_path, PIXEL_DATA, 1000)


@pytest.fixture
def truncated_in_header(tmp_path: Path) -> Path:
    """One slice cut short inside a header value (PixelSpacing), after the UIDs."""
    return cut_middle_slice(tmp_path, PIXEL_SPACING, 3)


@pytest.fixture
def truncated_in_element_header(tmp_path: Path) -> Path:
    """One slice cut inside the 4-byte length of its Pixel Data element header."""
    return cut_middle_slice(tmp_path, PIXEL_DATA, 10, from_value=False)


@pytest.fixture
def truncated_in_series_uid(tmp_path: Path) -> Path:
    """One slice cut inside its SeriesInstanceUID value: the study is known, the series
    (the half UID read is another UID) is not."""
    return cut_middle_slice(tmp_path, SERIES_INSTANCE_UID, 20)


@pytest.fixture
def truncated_before_study_uid(tmp_path: Path) -> Path:
    """One slice cut inside its SeriesDescription, before any UID but its SOP's."""
    return cut_middle_slice(tmp_path, SERIES_DESCRIPTION, 5)


def test_truncated_in_pixel_data(
    truncated_in_pixel_data: Path, screened_in_worker: Screen
) -> None:
    refused(screened_in_worker(truncated_in_pixel_data), "truncated-file")


def test_truncated_in_header(truncated_in_header: Path, screened: Screen) -> None:
    refused(screened(truncated_in_header), "truncated-file")


def test_truncated_in_element_header(truncated_in_element_header: Path, screened: Screen) -> None:
    refused(screened(truncated_in_element_header), "truncated-file")


def test_truncated_in_series_uid(truncated_in_series_uid: Path, screened: Screen) -> None:
    """The cut slice may belong to any series of the study: the study is refused."""
    refused(screened(truncated_in_series_uid), "truncated-file")


def test_truncated_before_study_uid(truncated_before_study_uid: Path, screened: Screen) -> None:
    """The cut slice cannot be told to belong to the study: it gets its own row (keyed by
    its folder) saying why, and the study, one slice short, is refused for the gap."""
    rows = screened(truncated_before_study_uid)
    by_uid = {r["study_uid"]: r for r in rows}
    assert len(rows) == 2, rows
    study = by_uid.pop(STUDY_UID)
    assert study["status"] == "not-analysed" and study["reasons"] == ["missing-slices:gap=3.0mm"]
    ((key, orphan),) = by_uid.items()
    assert key.startswith("no-uid-"), key
    assert orphan["status"] == "not-analysed", orphan
    assert orphan["reasons"] == ["truncated-file", "missing-study-uid"], orphan


# ---------------------------------------------------------------- 2. missing pixel data


@pytest.fixture
def missing_pixel_data(tmp_path: Path) -> Path:
    """The Pixel Data element removed from one slice (the file is otherwise whole)."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    rewrite([path], lambda ds: delattr(ds, "PixelData"))
    return root


def test_missing_pixel_data(missing_pixel_data: Path, screened: Screen) -> None:
    refused(screened(missing_pixel_data), "missing-pixel-data")


# ---------------------------------------------------------------- 3. Rows / Columns


def _patch_rows_columns(paths: list[Path], rows: int, columns: int) -> None:
    for path in paths:
        data = bytearray(path.read_bytes())
        found = elements(bytes(data))
        struct.pack_into("<H", data, found[ROWS][1], rows)
        struct.pack_into("<H", data, found[COLUMNS][1], columns)
        path.write_bytes(bytes(data))


@pytest.fixture
def rows_columns_smaller_than_pixel_data(tmp_path: Path) -> Path:
    """Every slice says 120 x 120 over 128 x 128 pixels of data."""
    root = archive_root(tmp_path)
    _patch_rows_columns(write_study(root / "study"), 120, 120)
    return root


@pytest.fixture
def rows_columns_larger_than_pixel_data(tmp_path: Path) -> Path:
    """Every slice says 136 x 136 over 128 x 128 pixels of data."""
    root = archive_root(tmp_path)
    _patch_rows_columns(write_study(root / "study"), 136, 136)
    return root


@pytest.fixture
def rows_differ_in_one_slice(tmp_path: Path) -> Path:
    """One slice says 120 rows over 128 x 128 pixels of data; the others are right."""
    root = archive_root(tmp_path)
    _patch_rows_columns([write_study(root / "study")[MIDDLE]], 120, 128)
    return root


def test_rows_columns_smaller_than_pixel_data(
    rows_columns_smaller_than_pixel_data: Path,
    screened: Screen,
) -> None:
    rows = screened(rows_columns_smaller_than_pixel_data)
    refused(rows, "pixel-data-mismatch")


def test_rows_columns_larger_than_pixel_data(
    rows_columns_larger_than_pixel_data: Path,
    screened: Screen,
) -> None:
    rows = screened(rows_columns_larger_than_pixel_data)
    refused(rows, "truncated-pixel-data")


def test_rows_differ_in_one_slice(rows_differ_in_one_slice: Path, screened: Screen) -> None:
    refused(screened(rows_differ_in_one_slice), "mixed-geometry")


# ---------------------------------------------------------------- 4. length past the end


@pytest.fixture
def length_field_beyond_file(tmp_path: Path) -> Path:
    """One slice's PixelSpacing length field says 65535 bytes: more than is left."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    data = bytearray(path.read_bytes())
    start, _, _ = elements(bytes(data))[PIXEL_SPACING]
    struct.pack_into("<H", data, start + 6, 0xFFFF)
    assert 0xFFFF > len(data) - (start + 8)
    path.write_bytes(bytes(data))
    return root


@pytest.fixture
def pixel_data_length_beyond_file(tmp_path: Path) -> Path:
    """One slice's Pixel Data length field says 1 GiB."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    data = bytearray(path.read_bytes())
    start, _, _ = elements(bytes(data))[PIXEL_DATA]
    struct.pack_into("<I", data, start + 8, 1 << 30)
    path.write_bytes(bytes(data))
    return root


def test_length_field_beyond_file(length_field_beyond_file: Path, screened: Screen) -> None:
    refused(screened(length_field_beyond_file), "truncated-file")


def test_pixel_data_length_beyond_file(
    pixel_data_length_beyond_file: Path, screened: Screen
) -> None:
    refused(screened(pixel_data_length_beyond_file), "truncated-file")


# ---------------------------------------------------------------- 5. deep nesting

DEPTH = 10_000


@pytest.fixture(
    params=[("undefined", "undefined"), ("undefined", "defined"), ("defined", "defined")],
    ids=lambda p: f"sequences-{p[0]}-items-{p[1]}",
)
def deeply_nested_sequences(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """One slice carries a private sequence nested 10000 levels deep.  pydicom parses
    sequences of undefined length (and the items inside them) eagerly and recursively,
    those of defined length lazily, one level per access: each way is tried."""
    sequence_length, item_length = request.param
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    creator = _tag(0x00090010) + b"LO" + struct.pack("<H", 8) + b"CTSCREEN"
    nested = nested_sequences(0x00091001, DEPTH, sequence_length, item_length)
    insert_element(path, 0x00090010, creator + nested)
    return root


@pytest.fixture
def deeply_nested_standard_sequence(tmp_path: Path) -> Path:
    """One slice's Referenced Image Sequence nested 10000 levels deep (undefined lengths)."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    nested = nested_sequences(0x00081140, DEPTH, "undefined", "undefined")
    insert_element(path, 0x00081140, nested)
    return root


def test_deeply_nested_sequences(
    deeply_nested_sequences: Path,
    screened: Screen,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Harmless to the image: the too-deep element is dropped (logged by tag) and the
    study analysed."""
    analysed(screened(deeply_nested_sequences), deeply_nested_sequences)
    assert "nested deeper than" in screened.log


def test_deeply_nested_standard_sequence(
    deeply_nested_standard_sequence: Path,
    screened_in_worker: Screen,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a worker process: its log (where the element is dropped) is read from its output."""
    root = deeply_nested_standard_sequence
    analysed(screened_in_worker(root), root)
    assert "nested deeper than" in screened_in_worker.log


# ---------------------------------------------------------------- 6. invalid UIDs

BAD_UIDS = {
    "letters": "1.2.840.10008.abc",
    "leading-zero": "1.2.840.010008.1",
    "empty": "",
    "too-long": "1.2." + "3" * 70,
}
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
EMPTY_UID_CODES = {
    "StudyInstanceUID": "missing-study-uid",
    "SeriesInstanceUID": "missing-tag:SeriesInstanceUID",
    "SOPInstanceUID": "missing-tag:SOPInstanceUID",
}


def _damage_uid(paths: list[Path], keyword: str, value: str) -> None:
    """Study and Series UIDs on every slice (they define the study, the series), the
    SOP Instance UID (and the file meta's copy) on one slice."""
    if keyword == "SOPInstanceUID":
        rewrite([paths[MIDDLE]], lambda ds: _set_sop_uid(ds, value), enforce_file_format=False)
    else:
        rewrite(paths, lambda ds: setattr(ds, keyword, value))


@pytest.fixture(
    params=[(k, name) for k in UID_KEYWORDS for name in BAD_UIDS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def invalid_uid(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A malformed, empty or over-long UID; returns (root, the expected code)."""
    keyword, name = request.param
    root = archive_root(tmp_path)
    _damage_uid(write_study(root / "study"), keyword, BAD_UIDS[name])
    code = EMPTY_UID_CODES[keyword] if name == "empty" else f"invalid-uid:{keyword}"
    return root, code


def test_invalid_uid(invalid_uid: tuple[Path, str], screened: Screen) -> None:
    root, code = invalid_uid
    refused(screened(root), code)
    assert not (root / "ctscreen").exists()


# ---------------------------------------------------------------- 7. path separators

SEPARATORS = ("../../etc", "a/b", "..\\x")


@pytest.fixture(
    params=[(k, v) for k in UID_KEYWORDS for v in SEPARATORS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def path_separator_uid(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A UID holding a path; returns (root, the UID's keyword)."""
    keyword, value = request.param
    root = archive_root(tmp_path)
    _damage_uid(write_study(root / "study"), keyword, value)
    return root, keyword


@pytest.fixture(
    params=[("PatientID", "../../etc"), ("AccessionNumber", "a/b"), ("AccessionNumber", "..\\x")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def path_separator_id(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, str]:
    """A patient ID or accession number holding a path; returns (root, keyword, value)."""
    keyword, value = request.param
    root = archive_root(tmp_path)
    rewrite(write_study(root / "study"), lambda ds: setattr(ds, keyword, value))
    return root, keyword, value


def test_path_separator_uid(path_separator_uid: tuple[Path, str], screened: Screen) -> None:
    root, keyword = path_separator_uid
    refused(screened(root), f"invalid-uid:{keyword}")
    assert not (root / "ctscreen").exists()


def test_path_separator_id(
    path_separator_id: tuple[Path,
    str,
    str],
    screened_in_worker: Screen,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Identifiers are not UIDs and name no file: analysed, results under ROOT/ctscreen
    (with a worker process: the patient ID is not in its log either)."""
    root, keyword, value = path_separator_id
    row = analysed(screened_in_worker(root), root)
    if keyword == "PatientID":
        assert value not in screened_in_worker.log  # never logged
    else:
        assert row["accession_number"] == value


# ---------------------------------------------------------------- 8. non-CT objects


@pytest.fixture(params=["mr", "secondary-capture", "sr"])
def non_ct_objects(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A study holding only MR images, only Secondary Captures (of CT), or only SRs."""
    root = archive_root(tmp_path)
    if request.param == "sr":
        for k in range(3):
            _non_ct_instance(root / "study", COMPREHENSIVE_SR, "SR", k)
        return root
    sop_class, modality = (
        (MR_IMAGE, "MR") if request.param == "mr" else (SECONDARY_CAPTURE, "CT")
    )

    def to_other(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = modality

    rewrite(write_study(root / "study"), to_other)
    return root


def test_non_ct_objects(non_ct_objects: Path, screened: Screen) -> None:
    refused(screened(non_ct_objects), "no-ct-series")


# ---------------------------------------------------------------- 9. duplicates, gaps, order


@pytest.fixture
def duplicate_sop_instance(tmp_path: Path) -> Path:
    """One slice's file stored twice (same SOP Instance UID) under another name."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    (root / "study" / "again").mkdir()
    shutil.copy(path, root / "study" / "again" / "IM99999.dcm")
    return root


@pytest.fixture
def duplicate_slice_position(tmp_path: Path) -> Path:
    """A second slice at one slice's position, with its own SOP Instance UID."""
    root = archive_root(tmp_path)
    path = write_study(root / "study")[MIDDLE]
    extra = root / "study" / "IM99999.dcm"
    shutil.copy(path, extra)

    def other_instance(ds: Dataset) -> None:
        _set_sop_uid(ds, derive_uid(7, "duplicate-position"))
        ds.InstanceNumber = 999

    rewrite([extra], other_instance)
    return root


@pytest.fixture
def missing_slice(tmp_path: Path) -> Path:
    """One slice in the middle of the stack deleted: a 3.0 mm gap in 1.5 mm steps."""
    root = archive_root(tmp_path)
    write_study(root / "study")[MIDDLE].unlink()
    return root


@pytest.fixture
def shuffled_slices(tmp_path: Path) -> tuple[Path, Path]:
    """(the series with random file names and shuffled InstanceNumbers, the same series
    written plainly in another archive for comparison)."""
    plain = archive_root(tmp_path / "plain")
    write_study(plain / "study")
    root = archive_root(tmp_path / "shuffled")
    paths = write_study(root / "study", file_names="random")
    numbers = list(range(1, len(paths) + 1))
    random.Random(7).shuffle(numbers)
    order = iter(numbers)
    rewrite(paths, lambda ds: setattr(ds, "InstanceNumber", next(order)))
    return root, plain


def test_duplicate_sop_instance(duplicate_sop_instance: Path, screened: Screen) -> None:
    refused(screened(duplicate_sop_instance), "duplicate-sop-instance-uid")


def test_duplicate_slice_position(duplicate_slice_position: Path, screened: Screen) -> None:
    refused(screened(duplicate_slice_position), "duplicate-slice-position")


def test_missing_slice(missing_slice: Path, screened: Screen) -> None:
    refused(screened(missing_slice), "missing-slices:gap=3.0mm")


def test_shuffled_slices_give_the_same_result(
    shuffled_slices: tuple[Path, Path],
    screened: Screen,
) -> None:
    root, plain = shuffled_slices
    got = analysed(screened(root), root)
    expected = analysed(screened(plain), plain)
    for key in (
        "lung_right_ml", "lung_left_ml", "involved_pct", "severity_score", "suspicion",
        "pattern", "n_findings", "series_uid",
    ):
        assert got[key] == expected[key], key

    def by_kind(where: Path) -> dict[str, list[pydicom.Dataset]]:
        out: dict[str, list[pydicom.Dataset]] = {}
        for p in sorted((where / "ctscreen").rglob("*.dcm")):
            ds = pydicom.dcmread(p)
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
        return out

    a, b = by_kind(root), by_kind(plain)
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}
    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    assert a[seg][0].PixelData == b[seg][0].PixelData  # the masks, frame for frame
    # The key images name their source image by InstanceNumber, which differs here (under
    # the same SOP Instance UIDs): their content differs, and so do all the result UIDs.
    assert not set(got["result_uids"]["sc"]) & set(expected["result_uids"]["sc"])


# ---------------------------------------------------------------- 10. one UID, two series


@pytest.fixture(params=["other-reconstruction", "same-header"])
def shared_series_uid(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """Two reconstructions of one acquisition under one SeriesInstanceUID: a soft-tissue
    kernel series numbered 2 beside the lung series, or a second copy whose instances
    differ only in their SOP Instance UIDs.  Returns (root, the expected code)."""
    root = archive_root(tmp_path)
    write_study(root / "study" / "lung")
    if request.param == "other-reconstruction":
        write_study(
            root / "study" / "soft", seed=8, kernel="SOFT", series_number=2,
            series_description="Chest soft 1.0",
        )
        return root, "mixed-series:SeriesNumber"
    write_study(root / "study" / "copy", seed=8)
    return root, "duplicate-slice-position"


def test_shared_series_uid(shared_series_uid: tuple[Path, str], screened: Screen) -> None:
    root, code = shared_series_uid
    refused(screened(root), code)


# ---------------------------------------------------------------- 11. junk with a DICOM name

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@pytest.fixture
def junk_with_dicom_name(tmp_path: Path) -> tuple[Path, dict[Path, bytes]]:
    """A PNG, a text and an empty file named like slices inside the study folder.
    Returns (root, {junk file: its bytes})."""
    root = archive_root(tmp_path)
    folder = root / "study"
    write_study(folder)
    junk = {
        folder / "IM0001.dcm": PNG,
        folder / "IM0002.dcm": b"scanner notes: nothing to see here\n",
        folder / "IM0003.dcm": b"",
    }
    for path, data in junk.items():
        path.write_bytes(data)
    return root, junk


def test_junk_with_dicom_name(
    junk_with_dicom_name: tuple[Path,
    dict[Path, bytes]],
    screened: Screen,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, junk = junk_with_dicom_name
    analysed(screened(root), root)
    for path, data in junk.items():
        assert path.read_bytes() == data
        assert f"skipped study/{path.name}" in caplog.text
