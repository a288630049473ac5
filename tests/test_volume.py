"""pipeline.volume: series -> HU volume with LPS geometry, or a coded refusal.

Synthetic series are written with pipeline.phantom.dicom and read back with pydicom, so
every case goes through real DICOM encoding.  Real public data in ``../shared/data`` (or
``$CTSCREEN_SHARED_DATA``) is used where present and skipped with a reason otherwise.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from geometry import make_affine, rotation
from pydicom import uid as dcm_uid
from pydicom.errors import InvalidDicomError

from pipeline import volume as volume_mod
from pipeline.artefacts import Volume
from pipeline.config import VolumeConfig
from pipeline.errors import NotAnalysable
from pipeline.phantom.dicom import write_ct_series
from pipeline.volume import build_volume, decode_hu_slice, decoding_plugin_for

CONFIG = VolumeConfig()
SHARED = Path(
    os.environ.get(
        "CTSCREEN_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
)


def shared(sub: str) -> Path:
    """A folder of the shared real data, or skip the test saying what is missing."""
    p = SHARED / sub
    if not p.is_dir():
        pytest.skip(f"real data {p} absent (set CTSCREEN_SHARED_DATA to ../shared/data)")
    return p


def read_folder(folder: Path) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for f in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            continue
        if "PixelData" in ds:  # not the Philips DIRFILE (a directory record) beside them
            out.append(ds)
    return out


# ---------------------------------------------------------------- synthetic series


def phantom(shape: tuple[int, int, int] = (6, 32, 40), seed: int = 1) -> npt.NDArray[np.int16]:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=shape).astype(np.int16)


def write_read(
    tmp: Path, vol: Volume, **kwargs: object
) -> tuple[list[Path], list[pydicom.Dataset]]:
    paths = write_ct_series(vol, tmp, **kwargs)  # type: ignore[arg-type]
    return paths, [pydicom.dcmread(p) for p in paths]


@pytest.fixture
def series(tmp_path: Path) -> list[pydicom.Dataset]:
    """Six 32x40 slices, 2 mm apart, standard axial orientation."""
    _, dss = write_read(tmp_path, Volume(phantom(), make_affine()))
    return dss


def refused(datasets: Sequence[pydicom.Dataset]) -> str:
    with pytest.raises(NotAnalysable) as exc:
        build_volume(datasets, CONFIG)
    assert "\n" not in str(exc.value), "error messages are one line"
    return exc.value.code


def same_voxels_in_lps(a: Volume, b: Volume) -> bool:
    """True where both volumes hold the same values at the same LPS points (any k order)."""
    m = np.linalg.inv(a.affine) @ b.affine  # b index -> a index
    perm = np.rint(m[:3, :3])
    if not np.allclose(m[:3, :3], perm, atol=1e-6) or not np.allclose(
        m[:3, 3], np.rint(m[:3, 3]), atol=1e-6
    ):
        return False
    idx = np.indices(b.shape).reshape(3, -1)
    mapped = np.rint(perm @ idx + m[:3, 3:4]).astype(int)
    if np.any(mapped < 0) or np.any(mapped >= np.array(a.shape)[:, None]):
        return False
    return bool(np.array_equal(a.array[tuple(mapped)], b.array.reshape(-1)))


# ---------------------------------------------------------------- geometry


ORIENTATIONS: dict[str, dict[str, object]] = {
    "axial": {},
    "row-flipped-iop": {"row_cos": (-1, 0, 0), "col_cos": (0, 1, 0)},
    "column-flipped-iop": {"row_cos": (1, 0, 0), "col_cos": (0, -1, 0)},
    "reversed-k": {"reverse": True},
    "feet-first": {"row_cos": (-1, 0, 0), "col_cos": (0, 1, 0), "reverse": True},
    "oblique-in-plane-10deg": {"frame": rotation((0, 0, 1), 10.0)},
    "oblique-out-of-plane-4deg": {"frame": rotation((1, 0.3, 0), 4.0) @ rotation((0, 0, 1), 7.0)},
    "coronal": {"row_cos": (1, 0, 0), "col_cos": (0, 0, -1), "step": 1.5},
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_marker_on_patient_left_keeps_its_lps_position(tmp_path: Path, name: str) -> None:
    affine = make_affine(**ORIENTATIONS[name])  # type: ignore[arg-type]
    src = Volume(np.full((7, 24, 28), -1000, np.int16), affine, "1.2.3.4")
    left = src.index_to_lps((2, 5, 21))[0]
    right = src.index_to_lps((5, 17, 3))[0]
    if left[0] < right[0]:  # make the marker the one on the patient's left (x > 0 side)
        left, right = right, left
    arr = src.array.copy()
    (kl, rl, cl), (kr, rr, cr) = (
        np.rint(src.lps_to_index(p)[0]).astype(int) for p in (left, right)
    )
    arr[kl, rl, cl] = 900  # left marker
    arr[kr, rr, cr] = 300  # right marker
    _, dss = write_read(tmp_path, Volume(arr, affine, "1.2.3.4"), file_names="random")
    for i, ds in enumerate(reversed(dss)):  # instance numbers lie: order must not use them
        ds.InstanceNumber = i + 1
        if name == "feet-first":
            ds.PatientPosition = "FFS"
    rng = np.random.default_rng(3)
    shuffled = [dss[i] for i in rng.permutation(len(dss))]
    vol, ordered = build_volume(shuffled, CONFIG)

    found_left = vol.index_to_lps(np.argwhere(vol.array == 900))
    found_right = vol.index_to_lps(np.argwhere(vol.array == 300))
    np.testing.assert_allclose(found_left, [left], atol=1e-6)
    np.testing.assert_allclose(found_right, [right], atol=1e-6)
    assert found_left[0, 0] > found_right[0, 0]  # left stays on the left (x larger in LPS)
    assert same_voxels_in_lps(Volume(arr, affine), vol)
    assert vol.frame_of_reference_uid == "1.2.3.4"
    # k runs along +normal; the datasets come back in that order
    normal = np.cross(
        np.asarray(ordered[0].ImageOrientationPatient[:3], float),
        np.asarray(ordered[0].ImageOrientationPatient[3:], float),
    )
    along = [float(np.asarray(ds.ImagePositionPatient, float) @ normal) for ds in ordered]
    assert along == sorted(along)
    for k, ds in enumerate(ordered):
        np.testing.assert_allclose(
            vol.index_to_lps((k, 0, 0))[0], np.asarray(ds.ImagePositionPatient, float), atol=1e-6
        )


def test_affine_columns_follow_dicom_image_plane(tmp_path: Path) -> None:
    """C.7.6.2: r along IOP[3:6] * PixelSpacing[0], c along IOP[0:3] * PixelSpacing[1]."""
    affine = make_affine((0, 1, 0), (0, 0, -1), pixel=(0.9, 0.6), step=1.25)  # sagittal
    _, dss = write_read(tmp_path, Volume(phantom((4, 10, 12)), affine))
    vol, _ = build_volume(dss, CONFIG)
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    np.testing.assert_allclose(vol.affine[:3, 1], iop[3:] * 0.9, atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, 2], iop[:3] * 0.6, atol=1e-9)
    assert vol.spacing == pytest.approx((1.25, 0.9, 0.6))


def test_spacing_is_the_mean_step_not_the_first(tmp_path: Path) -> None:
    # first step 2.09 (within the 5 % tolerance), all others 2.0
    affine = make_affine(step=2.0)
    _, dss = write_read(tmp_path, Volume(phantom((6, 8, 8)), affine))
    z0 = float(dss[0].ImagePositionPatient[2])
    dss[0].ImagePositionPatient = [
        dss[0].ImagePositionPatient[0],
        dss[0].ImagePositionPatient[1],
        z0 - 0.09,
    ]
    vol, _ = build_volume(dss, CONFIG)
    # (last - first) / (n - 1): exact at both ends, not the first step (2.09)
    assert vol.spacing[0] == pytest.approx((5 * 2.0 + 0.09) / 5, abs=1e-9)


# ---------------------------------------------------------------- refusals (synthetic)


def test_missing_slice_is_refused_with_the_gap(series: list[pydicom.Dataset]) -> None:
    assert refused(series[:3] + series[4:]) == "missing-slices:gap=4.0mm"


def test_duplicate_position_is_refused(series: list[pydicom.Dataset]) -> None:
    dup = copy.deepcopy(series[2])
    dup.SOPInstanceUID = "1.2.3.999"
    assert refused([*series, dup]) == "duplicate-slice-position"


def test_uneven_spacing_is_refused(series: list[pydicom.Dataset]) -> None:
    ipp = series[3].ImagePositionPatient
    series[3].ImagePositionPatient = [ipp[0], ipp[1], float(ipp[2]) + 0.7]
    assert refused(series) == "uneven-spacing:min=1.30,max=2.70mm"


@pytest.mark.parametrize(
    "change",
    [
        lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.7]),
        lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9998, 0.0199990]),
        lambda ds: setattr(ds, "Rows", 16),
    ],
    ids=["pixel-spacing", "orientation", "rows"],
)
def test_mixed_geometry_is_refused(
    series: list[pydicom.Dataset], change: Callable[[pydicom.Dataset], None]
) -> None:
    change(series[4])
    assert refused(series) == "mixed-geometry"


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
)
def test_missing_geometry_is_refused(series: list[pydicom.Dataset], keyword: str) -> None:
    delattr(series[1], keyword)
    assert refused(series) == "missing-geometry"


def test_too_few_slices(series: list[pydicom.Dataset]) -> None:
    assert refused(series[:2]) == "too-few-slices:2"
    assert refused([]) == "too-few-slices:0"


def test_truncated_pixel_data_is_refused(series: list[pydicom.Dataset]) -> None:
    series[2].PixelData = series[2].PixelData[:-200]
    assert refused(series) == "truncated-pixel-data"


def test_oversized_pixel_data_is_refused(series: list[pydicom.Dataset]) -> None:
    series[2].PixelData = series[2].PixelData + b"\0" * 64
    assert refused(series) == "pixel-data-mismatch"


def test_missing_pixel_data_is_refused(series: list[pydicom.Dataset]) -> None:
    del series[5].PixelData
    assert refused(series) == "missing-pixel-data"


def test_multiframe_and_colour_are_refused(series: list[pydicom.Dataset]) -> None:
    series[0].NumberOfFrames = 2
    assert refused(series) == "multiframe-unsupported"
    del series[0].NumberOfFrames
    series[0].PhotometricInterpretation = "RGB"
    assert refused(series) == "not-monochrome"


def test_unknown_and_corrupt_codestreams_are_undecodable(tmp_path: Path) -> None:
    _, dss = write_read(
        tmp_path,
        Volume(phantom((3, 32, 40)), make_affine()),
        transfer_syntax=dcm_uid.JPEGLSLossless,
    )
    bad = copy.deepcopy(dss)
    bad[1].PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + b"\x13" * 300])
    assert refused(bad) == f"undecodable:{dcm_uid.JPEGLSLossless}"
    mpeg = dcm_uid.UID("1.2.840.10008.1.2.4.100")  # MPEG2 video: no decoder in pydicom
    dss[0].file_meta.TransferSyntaxUID = mpeg
    assert refused(dss) == f"undecodable:{mpeg}"


def test_tilt_is_measured_from_positions_not_the_tag(tmp_path: Path) -> None:
    affine = make_affine(step=2.0)
    affine[:3, 0] = [0.0, 2.0 * math.sin(math.radians(12)), 2.0 * math.cos(math.radians(12))]
    _, dss = write_read(tmp_path, Volume(phantom((5, 16, 16)), affine))
    assert all("GantryDetectorTilt" not in ds for ds in dss)
    assert refused(dss) == "gantry-tilt:12.0deg"
    # a tag that claims a tilt changes nothing when the stack is straight
    _, ok = write_read(tmp_path / "straight", Volume(phantom((5, 16, 16)), make_affine()))
    for ds in ok:
        ds.GantryDetectorTilt = 15
    assert build_volume(ok, CONFIG)[0].shape == (5, 16, 16)


# ---------------------------------------------------------------- HU


def test_hu_rescale_padding_clipping_and_bits_stored(series: list[pydicom.Dataset]) -> None:
    ds = series[0]
    raw = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16)
    raw[0, :4] = [0, 1000, 4095, 1]
    raw[1, 0] = 0xF000 | 1024  # garbage above BitsStored=12 must be masked off
    raw[2, 0] = 63  # the padding value
    for d in series:
        d.BitsStored, d.HighBit, d.PixelRepresentation = 12, 11, 0
        d.PixelData = raw.tobytes()
        d.RescaleIntercept = -1024
        d.PixelPaddingValue = 63
    hu = decode_hu_slice(series[0], CONFIG)
    assert hu.dtype == np.int16
    assert hu[0, :4].tolist() == [-1024, -24, 3071, -1023]
    assert hu[1, 0] == 0
    assert hu[2, 0] == CONFIG.hu_min  # -961 HU by rescale, but flagged as padding
    series[0].RescaleSlope = 2
    assert decode_hu_slice(series[0], CONFIG)[0, :4].tolist() == [-1024, 976, 3071, -1022]
    series[0].RescaleSlope = "0.5"
    hu = decode_hu_slice(series[0], CONFIG)
    assert hu.dtype == np.float32 and hu[0, 1] == pytest.approx(-524.0)
    vol, _ = build_volume(series, CONFIG)
    assert vol.array.dtype == np.float32  # one float slice makes the volume float


def test_signed_padding_outside_the_circle(tmp_path: Path) -> None:
    arr = phantom((3, 16, 16))
    _, dss = write_read(tmp_path, Volume(arr, make_affine()))
    for ds in dss:
        pix = ds.pixel_array.copy()
        pix[:, 0] = -2000  # stored -2000 -> -3024 HU: outside the reconstruction circle
        ds.PixelData = pix.tobytes()
    vol, _ = build_volume(dss, CONFIG)
    assert int(vol.array[:, :, 0].max()) == CONFIG.hu_min
    np.testing.assert_array_equal(vol.array[:, :, 1:], arr[:, :, 1:])


def test_no_patient_identity_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, dss = write_read(
        tmp_path,
        Volume(phantom((3, 8, 8)), make_affine()),
        patient_name="Secret^Person",
        patient_id="PID-4711",
    )
    with caplog.at_level(logging.DEBUG, logger="pipeline"):
        build_volume(dss, CONFIG)
    assert caplog.records, "build_volume logs what it built"
    assert "Secret" not in caplog.text and "PID-4711" not in caplog.text


# ---------------------------------------------------------------- decoding


def test_decoder_choice_per_transfer_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    assert decoding_plugin_for(dcm_uid.JPEGLSLossless) == "pyjpegls"
    assert decoding_plugin_for(dcm_uid.JPEGLSNearLossless) == "pyjpegls"
    assert decoding_plugin_for(dcm_uid.JPEG2000Lossless) == "pylibjpeg"
    assert decoding_plugin_for(dcm_uid.JPEGLosslessSV1) == "pylibjpeg"
    assert decoding_plugin_for(dcm_uid.RLELossless) == "pylibjpeg"
    assert decoding_plugin_for(dcm_uid.ExplicitVRBigEndian) == ""
    decoding_plugin_for.cache_clear()
    monkeypatch.setitem(volume_mod.PREFERRED_PLUGINS, dcm_uid.RLELossless, "not-installed")
    try:
        assert decoding_plugin_for(dcm_uid.RLELossless) == ""  # pydicom's own choice
    finally:
        decoding_plugin_for.cache_clear()


REENCODINGS = [
    (dcm_uid.JPEGLSLossless, "pyjpegls"),
    (dcm_uid.JPEG2000Lossless, "pylibjpeg"),
    (dcm_uid.RLELossless, "pylibjpeg"),
]


@pytest.mark.parametrize(("syntax", "plugin"), REENCODINGS, ids=lambda x: str(x))
def test_reencoded_copies_round_trip_losslessly(
    series: list[pydicom.Dataset], syntax: str, plugin: str
) -> None:
    reference, _ = build_volume(series, CONFIG)
    uids = [ds.SOPInstanceUID for ds in series]
    for ds in series:
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
    assert [ds.SOPInstanceUID for ds in series] == uids
    assert series[0].file_meta.TransferSyntaxUID == syntax
    vol, _ = build_volume(series, CONFIG)
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_array_equal(vol.affine, reference.affine)


@pytest.mark.parametrize(
    "syntax",
    [
        dcm_uid.ImplicitVRLittleEndian,
        dcm_uid.ExplicitVRBigEndian,
        dcm_uid.DeflatedExplicitVRLittleEndian,
    ],
    ids=lambda x: str(x),
)
def test_native_syntaxes_from_files(tmp_path: Path, syntax: str) -> None:
    arr = phantom((3, 16, 20))
    _, dss = write_read(tmp_path, Volume(arr, make_affine()), transfer_syntax=syntax)
    assert dss[0].file_meta.TransferSyntaxUID == syntax
    vol, _ = build_volume(dss, CONFIG)
    np.testing.assert_array_equal(vol.array, arr)


# ---------------------------------------------------------------- real data


WG04_LOSSLESS = ("J2KR", "JLSL", "JPLL")


@pytest.mark.shared_data
def test_every_wg04_file_decodes() -> None:
    folder = shared("codecs/wg04")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 12
    for f in files:
        ds = pydicom.dcmread(f)
        hu = decode_hu_slice(ds, CONFIG)
        assert hu.shape == (512, 512), f.name
        assert hu.dtype == np.int16
        assert hu.min() >= CONFIG.hu_min and hu.max() <= CONFIG.hu_max
        assert np.count_nonzero(hu > 0) > 10_000, f.name  # a real body, not zeros


@pytest.mark.shared_data
@pytest.mark.parametrize("image", ["CT1", "CT2"])
def test_wg04_lossless_copies_equal_the_rle_reference(image: str) -> None:
    folder = shared("codecs/wg04")
    ref = decode_hu_slice(pydicom.dcmread(folder / f"{image}_RLE.dcm"), CONFIG)
    for kind in WG04_LOSSLESS:
        hu = decode_hu_slice(pydicom.dcmread(folder / f"{image}_{kind}.dcm"), CONFIG)
        np.testing.assert_array_equal(hu, ref, err_msg=f"{image}_{kind}")
    near = decode_hu_slice(pydicom.dcmread(folder / f"{image}_JLSN.dcm"), CONFIG)
    diff = np.abs(near.astype(np.int32) - ref)
    assert 0 < diff.max() <= 10  # near-lossless: bounded error
    lossy = decode_hu_slice(pydicom.dcmread(folder / f"{image}_J2KI.dcm"), CONFIG)
    assert np.mean(np.abs(lossy.astype(np.int32) - ref)) < 50  # about 22 HU in CT1
    assert np.corrcoef(lossy.ravel(), ref.ravel())[0, 1] > 0.99


@pytest.mark.shared_data
def test_wg04_copies_of_one_slice_are_duplicates() -> None:
    folder = shared("codecs/wg04")
    dss = [pydicom.dcmread(f) for f in sorted(folder.glob("CT1_*.dcm"))]
    assert refused(dss) == "duplicate-slice-position"


@pytest.mark.shared_data
def test_j2k_series_builds_without_sop_uids() -> None:
    dss = read_folder(shared("codecs/j2k-lossless-series"))
    assert all(not ds.get("SOPInstanceUID") for ds in dss)
    vol, ordered = build_volume(list(reversed(dss)), CONFIG)
    assert vol.shape == (20, 512, 512)
    assert vol.spacing[0] == pytest.approx(2.0, abs=1e-6)
    z = [float(ds.ImagePositionPatient[2]) for ds in ordered]
    assert z == sorted(z)
    np.testing.assert_allclose(vol.origin, np.asarray(ordered[0].ImagePositionPatient, float))
    assert -1024 <= vol.array.min() and vol.array.max() > 500


@pytest.mark.shared_data
def test_parallel_decoding_gives_the_same_volume() -> None:
    from dataclasses import replace

    dss = read_folder(shared("codecs/j2k-lossless-series"))  # 20 JPEG 2000 slices
    serial, _ = build_volume(dss, replace(CONFIG, decode_workers=1))
    parallel, _ = build_volume(dss, replace(CONFIG, decode_workers=2))
    np.testing.assert_array_equal(serial.array, parallel.array)
    np.testing.assert_array_equal(serial.affine, parallel.affine)


@pytest.mark.parametrize(
    "syntax", [pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless], ids=["jpegls", "j2k"]
)
def test_the_decoding_pool_gives_the_stored_volume(tmp_path: Path, syntax: str) -> None:
    """Slices sent to the decoding processes (only what decoding reads of them) give the
    very volume that was written, as decoding in place does; padding and rescale too."""
    from dataclasses import replace

    hu = phantom((24, 32, 40))
    vol = Volume(hu, make_affine())
    dss = [pydicom.dcmread(p) for p in write_ct_series(vol, tmp_path, transfer_syntax=syntax)]
    dss[3].PixelPaddingValue = int(dss[3].pixel_array.min())  # the darkest stored value
    serial, _ = build_volume(dss, replace(CONFIG, decode_workers=1))
    parallel, ordered = build_volume(dss, replace(CONFIG, decode_workers=2))
    np.testing.assert_array_equal(serial.array, parallel.array)
    assert parallel.array.dtype == np.int16
    expected = hu.copy()
    expected[3][hu[3] == hu[3].min()] = CONFIG.hu_min  # padding pixels
    np.testing.assert_array_equal(parallel.array, np.clip(expected, CONFIG.hu_min, CONFIG.hu_max))
    assert "PixelData" in ordered[0]  # the series' own datasets are left whole


def test_a_refusal_in_a_decoding_process_keeps_its_code(tmp_path: Path) -> None:
    import pickle
    from dataclasses import replace

    e = pickle.loads(pickle.dumps(NotAnalysable("truncated-pixel-data", "slice 3: short")))
    assert (e.code, e.message) == ("truncated-pixel-data", "slice 3: short")
    # the same through the pool: a J2K series with one slice cut short
    vol = Volume(phantom((20, 32, 32)), make_affine())
    paths = write_ct_series(vol, tmp_path, transfer_syntax=pydicom.uid.JPEG2000Lossless)
    dss = [pydicom.dcmread(p) for p in paths]
    dss[7].PixelData = dss[7].PixelData[:40]
    with pytest.raises(NotAnalysable) as info:
        build_volume(dss, replace(CONFIG, decode_workers=2))
    assert info.value.code.startswith(("undecodable", "truncated-pixel-data")), info.value.code


@pytest.mark.shared_data
def test_philips_gantry_tilt_is_refused() -> None:
    dss = read_folder(shared("bad-input/gantry-tilt"))
    assert len(dss) == 54
    assert refused(dss) == "gantry-tilt:18.5deg"
    for ds in dss:  # geometric, not from the tag
        del ds.GantryDetectorTilt
    assert refused(dss) == "gantry-tilt:18.5deg"


@pytest.mark.shared_data
def test_ge_tilt_with_variable_spacing_is_refused() -> None:
    dss = read_folder(shared("bad-input/gantry-tilt-variable-spacing"))
    code = refused(dss)
    assert code.split(":")[0] in {"gantry-tilt", "uneven-spacing", "missing-slices"}
    assert refused(dss) == code  # deterministic


@pytest.mark.shared_data
def test_copdgene_geometry_matches_simpleitk() -> None:
    sitk = pytest.importorskip("SimpleITK")
    folder = shared("chest-ct/cip-copdgene-10002k-64/ct-64Dicom")
    rng = np.random.default_rng(0)
    dss = read_folder(folder)
    vol, ordered = build_volume([dss[i] for i in rng.permutation(len(dss))], CONFIG)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    assert vol.shape == (img.GetSize()[2], img.GetSize()[1], img.GetSize()[0])
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=1e-4)
    sx, sy, sz = img.GetSpacing()  # ITK axes: i = column c, j = row r, k = slice
    np.testing.assert_allclose(vol.spacing[1:], (sy, sx), atol=1e-6)
    # IPP here is rounded to 1e-3 mm (steps 3.987..3.988): like ITK we take
    # (last - first) / (n - 1) = 3.98734 mm, which keeps every slice within 1e-3 mm of its IPP.
    assert vol.spacing[0] == pytest.approx(sz, abs=1e-5)
    for k, ds in enumerate(ordered):
        err = np.linalg.norm(
            vol.index_to_lps((k, 0, 0))[0] - np.asarray(ds.ImagePositionPatient, float)
        )
        assert err < 2e-3, f"slice {k} is {err:.4f} mm from its ImagePositionPatient"
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(vol.direction, d[:, [2, 1, 0]], atol=1e-6)
    itk = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(vol.array, np.clip(itk, CONFIG.hu_min, CONFIG.hu_max))


def test_a_file_meta_naming_no_transfer_syntax_is_refused(series: list[pydicom.Dataset]) -> None:
    """Found by the fuzzer: a valid UID that is not a transfer syntax made pydicom raise."""
    broken = copy.deepcopy(series)
    broken[1].file_meta.TransferSyntaxUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert refused(broken) == "undecodable:1.2.840.10008.5.1.4.1.1.2"
