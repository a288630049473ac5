"""pipeline.phantom.dicom: any Volume -> a valid CT Image Storage series, and back."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geometry
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from geometry import rotation
from pydicom import uid as dcm_uid

from pipeline.artefacts import Volume
from pipeline.config import VolumeConfig
from pipeline.phantom.dicom import write_ct_series
from pipeline.volume import build_volume

CONFIG = VolumeConfig()


def make_affine(**kw: Any) -> npt.NDArray[np.float64]:
    """The shared affine with this file's pixel, step and origin as defaults."""
    return geometry.make_affine(**{"pixel": (0.75, 0.65), "step": 1.0,
                                   "origin": (-31.5, -12.25, -101.0), **kw})


CASES: dict[str, dict[str, object]] = {
    "axial-1.0mm": {"step": 1.0},
    "axial-2.5mm": {"step": 2.5},
    "iop-row-flipped": {"row_cos": (-1, 0, 0), "col_cos": (0, 1, 0)},
    "iop-column-flipped": {"row_cos": (1, 0, 0), "col_cos": (0, -1, 0)},
    "reversed-k": {"reverse": True, "step": 2.5},
    "oblique-in-plane-10deg": {"frame": rotation((0, 0, 1), 10.0)},
    "oblique-out-of-plane-5deg": {"frame": rotation((1, 0, 0), 5.0), "step": 2.5},
}


def source_volume(
    affine: npt.NDArray[np.float64], shape: tuple[int, int, int] = (6, 28, 34)
) -> Volume:
    rng = np.random.default_rng(7)
    arr = rng.integers(-1024, 2000, size=shape).astype(np.int16)
    return Volume(arr, affine, "1.2.826.0.1.3680043.8.498.1")


def canonical(vol: Volume) -> Volume:
    """``vol`` with k running along +normal, as build_volume returns every series."""
    a = vol.affine
    normal = np.cross(a[:3, 2], a[:3, 1])
    if float(a[:3, 0] @ normal) >= 0:
        return vol
    flipped = a.copy()
    flipped[:3, 3] = a[:3, 3] + a[:3, 0] * (vol.shape[0] - 1)
    flipped[:3, 0] = -a[:3, 0]
    return Volume(vol.array[::-1].copy(), flipped, vol.frame_of_reference_uid)


def read(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_gives_the_same_array_and_affine(tmp_path: Path, name: str) -> None:
    src = source_volume(make_affine(**CASES[name]))  # type: ignore[arg-type]
    paths = write_ct_series(src, tmp_path, file_names="random", seed=3)
    vol, ordered = build_volume(read(paths), CONFIG)
    want = canonical(src)
    np.testing.assert_array_equal(vol.array, want.array)
    np.testing.assert_allclose(vol.affine, want.affine, atol=1e-4)
    assert vol.frame_of_reference_uid == src.frame_of_reference_uid
    if name == "reversed-k":
        assert not np.array_equal(want.array, src.array)  # the case really is reversed
        assert [p.name for p in paths][::-1] == [Path(ds.filename).name for ds in ordered]


@pytest.mark.parametrize("name", list(CASES))
def test_marker_on_patient_left_is_found_at_the_same_lps_point(tmp_path: Path, name: str) -> None:
    affine = make_affine(**CASES[name])  # type: ignore[arg-type]
    shape = (6, 28, 34)
    # centre the grid at (4, -3, -100) LPS so that it spans both sides of the patient
    affine[:3, 3] = np.array([4.0, -3.0, -100.0]) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    src = source_volume(affine, shape)
    arr = np.full(src.shape, -800, np.int16)
    grid_x = src.lps_grid(0)
    k, r, c = np.unravel_index(np.argmax(grid_x), src.shape)  # the most leftward voxel
    point = src.index_to_lps((k, r, c))[0]
    assert point[0] > 0, "the marker must sit on the patient's left (x > 0 in LPS)"
    arr[k, r, c] = 1200
    paths = write_ct_series(Volume(arr, affine), tmp_path)
    vol, _ = build_volume(read(paths), CONFIG)
    found = vol.index_to_lps(np.argwhere(vol.array == 1200))
    assert found.shape == (1, 3)
    np.testing.assert_allclose(found[0], point, atol=1e-4)


@pytest.mark.parametrize("name", ["axial-2.5mm", "iop-row-flipped", "oblique-out-of-plane-5deg"])
def test_simpleitk_reads_the_same_geometry(tmp_path: Path, name: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    src = source_volume(make_affine(**CASES[name]))  # type: ignore[arg-type]
    write_ct_series(src, tmp_path, file_names="uid")
    want = canonical(src)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    reader.SetOutputPixelType(sitk.sitkInt16)
    img = reader.Execute()
    np.testing.assert_allclose(img.GetOrigin(), want.origin, atol=1e-4)
    sx, sy, sz = img.GetSpacing()  # ITK: i = column c, j = row r, k = slice
    np.testing.assert_allclose((sz, sy, sx), want.spacing, atol=1e-4)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d[:, [2, 1, 0]], want.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), want.array)


def test_written_slice_passes_dciodvfy(tmp_path: Path) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    src = source_volume(make_affine(frame=rotation((0, 0, 1), 10.0)), shape=(3, 16, 16))
    paths = write_ct_series(src, tmp_path, accession_number="A123")
    out = subprocess.run([exe, str(paths[1])], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "CTImage" in text, text  # it recognised the IOD
    assert "Error" not in text, text


@pytest.mark.parametrize(
    "syntax",
    [
        dcm_uid.ImplicitVRLittleEndian,
        dcm_uid.ExplicitVRBigEndian,
        dcm_uid.DeflatedExplicitVRLittleEndian,
        dcm_uid.JPEGLSLossless,
        dcm_uid.JPEG2000Lossless,
        dcm_uid.RLELossless,
    ],
    ids=lambda x: str(x),
)
def test_transfer_syntaxes_round_trip_losslessly(tmp_path: Path, syntax: str) -> None:
    src = source_volume(make_affine(), shape=(3, 40, 48))
    paths = write_ct_series(src, tmp_path, transfer_syntax=syntax)
    dss = read(paths)
    assert all(ds.file_meta.TransferSyntaxUID == syntax for ds in dss)
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in dss)
    vol, _ = build_volume(dss, CONFIG)
    np.testing.assert_array_equal(vol.array, src.array)


def test_near_lossless_is_marked_lossy(tmp_path: Path) -> None:
    src = source_volume(make_affine(), shape=(3, 40, 48))
    ds = read(write_ct_series(src, tmp_path, transfer_syntax=dcm_uid.JPEGLSNearLossless))[0]
    assert ds.LossyImageCompression == "01" and ds.ImageType[0] == "DERIVED"


def test_headers_and_deterministic_uids(tmp_path: Path) -> None:
    src = source_volume(make_affine(step=2.5), shape=(4, 8, 8))
    a = read(write_ct_series(src, tmp_path / "a", seed=5, series_number=7, kernel="B70f"))
    b = read(write_ct_series(src, tmp_path / "b", seed=5, series_number=7, kernel="B70f"))
    c = read(write_ct_series(src, tmp_path / "c", seed=6))
    assert [ds.SOPInstanceUID for ds in a] == [ds.SOPInstanceUID for ds in b]
    assert a[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert len({ds.SOPInstanceUID for ds in a}) == 4
    ds = a[0]
    assert ds.SOPClassUID == dcm_uid.CTImageStorage
    assert ds.Modality == "CT" and ds.PatientPosition == "HFS"
    assert ds.PatientName == "Phantom^Chest" and ds.PatientID == "PHANTOM-001"
    assert ds.SeriesNumber == 7 and ds.ConvolutionKernel == "B70f"
    assert ds.BodyPartExamined == "CHEST" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(ds.SliceThickness) == pytest.approx(2.5)
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert float(ds.WindowCenter[0]) == -600 and float(ds.WindowWidth[0]) == 1500
    fixed = read(write_ct_series(src, tmp_path / "d", study_uid="1.2.3", series_uid="1.2.3.4"))
    assert fixed[0].StudyInstanceUID == "1.2.3" and fixed[0].SeriesInstanceUID == "1.2.3.4"


def test_file_name_styles(tmp_path: Path) -> None:
    src = source_volume(make_affine(), shape=(5, 8, 8))
    seq = write_ct_series(src, tmp_path / "s", file_names="sequential")
    assert [p.name for p in seq] == sorted(p.name for p in seq)
    by_uid = write_ct_series(src, tmp_path / "u", file_names="uid")
    assert all(p.stem == pydicom.dcmread(p).SOPInstanceUID for p in by_uid)
    rnd = write_ct_series(src, tmp_path / "r", file_names="random")
    assert [p.name for p in rnd] != sorted(p.name for p in rnd)
    with pytest.raises(ValueError, match="file_names"):
        write_ct_series(src, tmp_path / "x", file_names="alphabetical")  # type: ignore[arg-type]


def test_refuses_what_dicom_cannot_hold(tmp_path: Path) -> None:
    sheared = make_affine()
    sheared[:3, 2] = [0.6, 0.1, 0.0]  # c not orthogonal to r
    with pytest.raises(ValueError, match="orthogonal"):
        write_ct_series(source_volume(sheared, shape=(3, 4, 4)), tmp_path)
    with pytest.raises(ValueError, match="whole HU"):
        write_ct_series(Volume(np.full((3, 4, 4), 0.5), make_affine()), tmp_path)
