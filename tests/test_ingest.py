"""Folder ingest: any tree, any file names, headers only, junk skipped with a log line."""

from __future__ import annotations

import logging
import shutil
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.archive.folder import FolderArchive
from pipeline.errors import ArchiveError, NotAnalysable
from pipeline.ingest import find_studies


def _ct(
    folder: Path, name: str, study: str, series: str, z: float, date_: str = "20200301"
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.StudyDate = "CT", date_
    ds.PatientName, ds.PatientID = "Secret^Name", "SECRET-ID-42"
    ds.ImagePositionPatient = [0, 0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 32
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_any_tree_any_names_grouped_by_study_and_series(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s1, s2 = generate_uid(), generate_uid()
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    _ct(tmp_path / "x" / "deep" / "er", "IM0001", s1, a, 0)
    _ct(tmp_path / "x", "weird name.bin", s1, a, 1)
    _ct(tmp_path, "zzz", s1, b, 0)
    _ct(tmp_path / "other", "1.dcm", s2, c, 0, date_="20190101")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "x" / "empty.dcm").write_bytes(b"")
    shutil.copy(Path(__file__), tmp_path / "fake.dcm")  # a non-DICOM file with a DICOM name
    caplog.set_level(logging.INFO)
    studies = find_studies(FolderArchive(tmp_path))
    assert sorted(s.study_uid for s in studies) == sorted([s1, s2])
    by = {s.study_uid: s for s in studies}
    assert sorted(len(se.instances) for se in by[s1].series) == [1, 2]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3, skipped
    log_text = caplog.text
    assert "SECRET-ID-42" not in log_text and "Secret" not in log_text
    # --since keeps only the newer study
    assert [s.study_uid for s in find_studies(FolderArchive(tmp_path), date(2020, 1, 1))] == [s1]


def test_headers_are_read_without_pixel_data(tmp_path: Path) -> None:
    p = _ct(tmp_path, "a", generate_uid(), generate_uid(), 0)
    ((ds, loc),) = list(FolderArchive(tmp_path).headers())
    assert loc == str(p)
    # the pixel value is deferred (not loaded) but its presence is known
    assert "PixelData" in ds
    assert ds["PixelData"].is_undefined_length is False


def test_dicomdir_and_vendor_index_files_are_skipped(
    shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    studies = find_studies(FolderArchive(shared_data / "bad-input" / "gantry-tilt"))
    assert sum(s.n_instances for s in studies) == 54
    assert any("DIRFILE" in r.getMessage() and "index" in r.getMessage() for r in caplog.records)


def test_load_refuses_an_unreadable_instance(tmp_path: Path) -> None:
    p = _ct(tmp_path, "a", generate_uid(), generate_uid(), 0)
    data = p.read_bytes()
    p.write_bytes(data[:400])  # cut inside the header (short pixel data is volume's job)
    with pytest.raises(NotAnalysable) as e:
        FolderArchive(tmp_path).load([str(p)])
    assert e.value.code == "truncated-file"
    p.write_bytes(b"")
    with pytest.raises(NotAnalysable) as e:
        FolderArchive(tmp_path).load([str(p)])
    assert e.value.code == "unreadable-instance"


def test_missing_archive_folder_is_an_archive_error(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        FolderArchive(tmp_path / "nope")


def test_results_never_written_outside_the_root(tmp_path: Path) -> None:
    archive = FolderArchive(tmp_path)
    ds = pydicom.dcmread(_ct(tmp_path / "src", "a", generate_uid(), generate_uid(), 0))
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.StudyInstanceUID = "../../etc"
    with pytest.raises(ArchiveError, match="expected a DICOM UID"):
        archive.store(ds)
    ds.StudyInstanceUID = generate_uid()
    loc = archive.store(ds)
    assert Path(loc).parent.parent == tmp_path / "ctscreen"
    assert archive.contains(ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert not list(tmp_path.rglob(".ctscreen-tmp*"))


def test_a_malformed_value_is_dropped_not_raised_later(tmp_path: Path) -> None:
    """pydicom converts values lazily; a malformed one must not blow up inside a stage."""
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import BytesLengthException
    from pydicom.tag import Tag

    p = _ct(tmp_path, "a", generate_uid(), generate_uid(), 0)
    ds = pydicom.dcmread(p)
    # Rows (US) stored with 3 bytes: invalid, found only when the value is converted
    rows = Tag(0x00280010)
    ds._dict[rows] = RawDataElement(rows, "US", 3, b"\x01\x02\x03", 0, False, True)
    ds.save_as(p, enforce_file_format=True)
    raw = pydicom.dcmread(p, defer_size=4096)
    with pytest.raises(BytesLengthException):  # what a stage would have met
        raw.get("Rows")
    ((header, _),) = list(FolderArchive(tmp_path).headers())
    assert "Rows" not in header  # dropped and logged, so selection sees a missing tag
    (study,) = find_studies(FolderArchive(tmp_path))
    assert study.series[0].first.rows is None


def test_a_file_meta_element_of_unknown_vr_is_skipped_as_unreadable(tmp_path: Path) -> None:
    """Found by the fuzz run: (0002,0002) with a VR pydicom does not know raised
    NotImplementedError when the folder archive looked up the SOP class."""
    p = _ct(tmp_path, "a", generate_uid(), generate_uid(), 0)
    data = bytearray(p.read_bytes())
    at = data.index(b"\x02\x00\x02\x00UI")  # MediaStorageSOPClassUID, explicit VR
    data[at + 4:at + 6] = b"\x55\xb3"
    p.write_bytes(bytes(data))
    assert list(FolderArchive(tmp_path).headers()) == []  # skipped, not raised
    assert find_studies(FolderArchive(tmp_path)) == []
