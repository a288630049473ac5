"""The view store (pipeline/web/viewer.py): display orientation from the direction cosines,
labels on the same grid, overlays, atomic replacement, retention, and a real screened phantom."""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from geometry import make_affine
from view_kit import MARKER, SHAPE, SPACING, UID, analysis, image

from pipeline.artefacts import (
    LESION_LABELS,
    LUNG_LABELS,
    LesionKind,
    Side,
)
from pipeline.config import Config, WebConfig, WorklistConfig
from pipeline.phantom.model import make_grid
from pipeline.run import StudyAnalysis
from pipeline.web import viewer
from pipeline.web.viewer import (
    StudyView,
    prune_views,
    remove_view,
    save_view,
    study_key,
    view_root,
)


def _blob(gray: npt.NDArray[np.uint8]) -> tuple[float, float, float]:
    """(k, row, column) centre of the bright marker in a view's slices."""
    idx = np.argwhere(gray > 200)
    assert len(idx), "the marker is not in the view"
    k, r, c = idx.mean(axis=0)
    return float(k), float(r), float(c)


GRIDS = {
    "axial": make_grid(SHAPE, SPACING, "axial"),
    "flipped": make_grid(SHAPE, SPACING, "flipped"),
    "oblique": make_grid(SHAPE, SPACING, "oblique"),
    # rows and columns swapped (IOP 0,1,0 / 1,0,0), slices running inferior
    "transposed": make_affine((0, 1, 0), (1, 0, 0), pixel=(1.4, 1.6), step=2.5,
                              origin=(-66.5, -63.2, 43.75)),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_patient_right_is_on_the_image_left(tmp_path: Path, name: str) -> None:
    affine = GRIDS[name]
    if name == "transposed":
        shape: tuple[int, int, int] = (SHAPE[0], SHAPE[2], SHAPE[1])
    else:
        shape = SHAPE
    ct, lungs, lesions = image(affine, shape)
    folder = save_view(tmp_path, analysis(ct, lungs, lesions), None, max_px=64)
    assert folder == tmp_path / study_key(UID)
    with StudyView.open(tmp_path, UID) as view:  # type: ignore[union-attr]
        assert max(view.shape) <= 64
        gray = np.stack([view.gray(k) for k in range(view.n_slices)])
        lung = np.stack([view.labels(k)[0] for k in range(view.n_slices)])
        lesion = np.stack([view.labels(k)[1] for k in range(view.n_slices)])
        n, h, w = gray.shape
        k, r, c = _blob(gray)
        # patient right on the image's left, anterior up, superior slices first
        assert c < 0.4 * w and r < 0.45 * h and k < 0.5 * n, (name, k, r, c, gray.shape)
        # ... exactly where the geometry puts it (half a view pixel or so)
        inv = np.linalg.inv(np.asarray(view.meta["affine"]))
        ek, er, ec = inv[:3, :3] @ np.asarray(MARKER) + inv[:3, 3]
        assert abs(ec - c) < 1.0 and abs(er - r) < 1.0 and abs(ek - k) < 1.0, (name, ek, k)
        # the right lung's label on the left of the image, the left lung's on the right
        cols = np.arange(w)[None, None, :]
        right_c = float((cols * (lung == LUNG_LABELS[Side.RIGHT])).sum()
                        / (lung == LUNG_LABELS[Side.RIGHT]).sum())
        left_c = float((cols * (lung == LUNG_LABELS[Side.LEFT])).sum()
                       / (lung == LUNG_LABELS[Side.LEFT]).sum())
        assert right_c < w / 2 < left_c
        # the lesion label lies on the marker, and the finding's slice is the marker's
        lk, lr, lc = np.argwhere(lesion == LESION_LABELS[LesionKind.GGO]).mean(axis=0)
        assert abs(lk - k) < 1.0 and abs(lr - r) < 1.5 and abs(lc - c) < 1.5
        (f,) = view.findings
        assert abs(f["slice"] - k) <= 1 and abs(f["x"] - c) < 1.5 and abs(f["y"] - r) < 1.5
        assert f["kind"] == "ground-glass opacity" and f["side"] == "right"
        assert view.meta["resampled"] is (name == "oblique")


def test_downsampled_with_square_pixels(tmp_path: Path) -> None:
    ct, lungs, lesions = image(make_affine(pixel=(0.8, 0.5), step=2.0), (20, 200, 300))
    save_view(tmp_path, analysis(ct, lungs, lesions), None, max_px=100)
    view = StudyView.open(tmp_path, UID)
    assert view is not None
    # 160 mm of rows by 150 mm of columns: the longer side 100 px, the same mm per pixel
    assert view.shape == (100, 94)
    assert view.meta["pixel_mm"] == pytest.approx(1.6, abs=0.02)
    w, h = viewer.view_png_size(view.slice_png(0))
    assert (h, w) == view.shape
    # a small image is not upsampled
    save_view(tmp_path / "small", analysis(ct, lungs, lesions), None, max_px=1000)
    small = StudyView.open(tmp_path / "small", UID)
    assert small is not None and small.shape == (320, 300)  # 0.5 mm pixels: rows upsampled
    # ... only to square pixels (0.8 mm rows become two 0.5 mm ones)
    assert small.meta["pixel_mm"] == pytest.approx(0.5)


def test_overlays_toggle(tmp_path: Path) -> None:
    ct, lungs, lesions = image(GRIDS["axial"])
    save_view(tmp_path, analysis(ct, lungs, lesions), None, max_px=64)
    view = StudyView.open(tmp_path, UID)
    assert view is not None
    k = view.findings[0]["slice"]
    lung, lesion = view.labels(k)

    def rgb(overlays: frozenset[str]) -> npt.NDArray[np.uint8]:
        a = cv2.imdecode(np.frombuffer(view.slice_png(k, overlays), np.uint8),
                         cv2.IMREAD_UNCHANGED)
        assert a is not None
        out = a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
        return np.asarray(out, dtype=np.uint8)

    plain = rgb(frozenset())
    assert plain.ndim == 2 and np.array_equal(plain, view.gray(k))  # the stored slice as is
    lungs_only = rgb(frozenset({"lungs"}))
    both = rgb(frozenset({"lungs", "lesions"}))
    lesions_only = rgb(frozenset({"lesions"}))
    grey3 = np.repeat(plain[..., None], 3, axis=2)
    changed = np.any(lungs_only != grey3, axis=2)
    # thin outlines: far fewer pixels than the lungs, in the two sides' colours
    assert 0 < changed.sum() < 0.5 * (lung > 0).sum()
    colours = {tuple(v) for v in lungs_only[changed]}
    assert colours == {(0, 200, 255), (70, 220, 110)}
    right_cols = np.nonzero(np.all(lungs_only == (0, 200, 255), axis=2))[1]
    left_cols = np.nonzero(np.all(lungs_only == (70, 220, 110), axis=2))[1]
    assert right_cols.mean() < left_cols.mean()  # right lung outline on the image's left
    # lesions: a translucent fill (tinted, not opaque) where the lesion label is
    ggo = lesion == LESION_LABELS[LesionKind.GGO]
    assert ggo.any()
    tint = lesions_only[ggo].astype(int) - grey3[ggo].astype(int)
    assert np.all(tint[:, 2] <= 0) and np.any(tint[:, 0] != 0)  # towards yellow
    assert not np.all(lesions_only[ggo] == (255, 230, 0))  # translucent
    assert np.array_equal(lesions_only[~ggo], grey3[~ggo])
    assert not np.array_equal(both, lungs_only) and not np.array_equal(both, lesions_only)
    with pytest.raises(ValueError, match="overlays"):
        view.slice_png(k, frozenset({"bones"}))
    for bad in (-1, view.n_slices):
        with pytest.raises(IndexError):
            view.slice_png(bad)
        with pytest.raises(IndexError):
            view.slice_png(bad, frozenset({"lungs"}))
    with pytest.raises(IndexError):
        view.key_image_png(0)  # no key images in this one


def test_open_of_a_missing_study_is_none(tmp_path: Path) -> None:
    assert StudyView.open(tmp_path, UID) is None
    assert StudyView.open(tmp_path / "nowhere", UID) is None
    ct, lungs, lesions = image(GRIDS["axial"])
    save_view(tmp_path, analysis(ct, lungs, lesions), None, max_px=32)
    assert StudyView.open(tmp_path, UID + ".2") is None
    assert not remove_view(tmp_path, UID + ".2")
    assert remove_view(tmp_path, UID) and StudyView.open(tmp_path, UID) is None
    save_view(tmp_path, analysis(ct, lungs, lesions), None, max_px=32)
    (tmp_path / study_key(UID) / "view.zip").write_bytes(b"not a zip")
    assert StudyView.open(tmp_path, UID) is None


def test_rescreen_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct, lungs, lesions = image(GRIDS["axial"])
    save_view(tmp_path, analysis(ct, lungs, lesions, version="v1"), None, max_px=48)
    old = StudyView.open(tmp_path, UID)
    assert old is not None
    old_first = old.slice_png(0)
    moved, lungs2, lesions2 = image(GRIDS["axial"], marker=(40.0, 30.0, -20.0))
    save_view(tmp_path, analysis(moved, lungs2, lesions2, version="v2"), None, max_px=48)
    new = StudyView.open(tmp_path, UID)
    assert new is not None and new.meta["versions"]["algorithm"] == "v2"
    assert new.findings[0]["slice"] != old.findings[0]["slice"]
    # a view opened before the replacement still reads its own (old) content, whole
    assert old.meta["versions"]["algorithm"] == "v1" and old.slice_png(0) == old_first
    assert _blob(np.stack([old.gray(k) for k in range(old.n_slices)]))[2] < 24
    old.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [study_key(UID)]
    assert json.loads((tmp_path / study_key(UID) / "view.json").read_text()) == new.meta

    # a write that fails half way leaves the previous view as it was, and no temporary
    calls = {"n": 0}
    real_png = viewer._png

    def failing(a: npt.NDArray[np.uint8]) -> bytes:
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full")
        return real_png(a)

    monkeypatch.setattr(viewer, "_png", failing)
    with pytest.raises(OSError, match="disk full"):
        save_view(tmp_path, analysis(ct, lungs, lesions, version="v3"), None, max_px=48)
    monkeypatch.undo()
    kept = StudyView.open(tmp_path, UID)
    assert kept is not None and kept.meta["versions"]["algorithm"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [study_key(UID)]


def test_readers_never_see_half_a_view(tmp_path: Path) -> None:
    """A reader opening the view while it is rewritten over and over always finds a whole
    one: the slices its view.json promises, of the version it names."""
    grids = {"a": image(GRIDS["axial"], (12, 40, 40)),
             "b": image(GRIDS["axial"], (16, 40, 40), marker=(30.0, 20.0, -5.0))}
    save_view(tmp_path, analysis(*grids["a"], version="a"), None, max_px=40)
    stop = threading.Event()
    errors: list[str] = []
    seen: set[str] = set()

    def read() -> None:
        while not stop.is_set():
            view = StudyView.open(tmp_path, UID)
            if view is None:
                errors.append("no view")
                continue
            with view:
                version = view.meta["versions"]["algorithm"]
                seen.add(version)
                if view.n_slices != {"a": 12, "b": 16}[version]:
                    errors.append(f"{version}: {view.n_slices} slices")
                try:
                    view.slice_png(view.n_slices - 1, frozenset({"lungs"}))
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    errors.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(8):
            v = "b" if i % 2 == 0 else "a"
            save_view(tmp_path, analysis(*grids[v], version=v), None, max_px=40)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:5]
    assert seen == {"a", "b"}


def test_prune(tmp_path: Path) -> None:
    for i in range(3):
        ct, lungs, lesions = image(GRIDS["axial"], (8, 32, 32))
        save_view(tmp_path, analysis(ct, lungs, lesions, uid=f"{UID}.{i}"), None, max_px=32)
    now = time.time()
    old = tmp_path / study_key(f"{UID}.0") / "view.zip"
    os.utime(old, (now - 10 * 86400, now - 10 * 86400))
    stale_tmp = tmp_path / ".tmp-deadbeef-1-0"
    stale_tmp.mkdir()
    os.utime(stale_tmp, (now - 7200, now - 7200))
    live_tmp = tmp_path / ".tmp-cafe-2-0"
    live_tmp.mkdir()
    (tmp_path / "README").write_text("not a view")
    assert prune_views(tmp_path, keep_days=7) == 1
    assert StudyView.open(tmp_path, f"{UID}.0") is None
    assert StudyView.open(tmp_path, f"{UID}.1") is not None
    assert not stale_tmp.exists() and live_tmp.exists() and (tmp_path / "README").exists()
    assert prune_views(tmp_path, keep_days=7) == 0
    assert prune_views(tmp_path, keep_days=0, now=now + 1) == 2
    assert prune_views(tmp_path / "absent", keep_days=1) == 0
    with pytest.raises(ValueError, match="keep_days"):
        prune_views(tmp_path, keep_days=-1)


def test_view_root(tmp_path: Path) -> None:
    assert view_root(Config(web=WebConfig(view_store=str(tmp_path / "v")))) == tmp_path / "v"
    db = tmp_path / "archive.ctscreen.sqlite"
    assert view_root(Config(worklist=WorklistConfig(path=str(db)))) == \
        tmp_path / "archive.ctscreen.views"
    assert view_root(Config(), db) == tmp_path / "archive.ctscreen.views"
    with pytest.raises(Exception, match="view store"):
        view_root(Config())


@pytest.fixture(scope="module")
def screened_phantom(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pipeline import screen
    from pipeline.demo import write_phantom_study

    folder = tmp_path_factory.mktemp("phantom") / "study"
    write_phantom_study(folder, seed=1, with_lesions=True, accession="VIEW1")
    return screen(folder)


@pytest.mark.heavy  # a phantom study screened
def test_screened_phantom(tmp_path: Path, screened_phantom: Any) -> None:
    s = screened_phantom
    assert s.analysed and s.analysis.findings
    done = StudyAnalysis(s.result, list(s.datasets), s.volume, list(s.sources), s.lungs,
                         s.analysis)
    folder = save_view(tmp_path, done, None, max_px=128)
    view = StudyView.open(tmp_path, s.result.study_uid)
    assert view is not None
    n_sc = sum(1 for kind, _ in s.datasets if kind == "sc")
    assert view.n_key_images == n_sc > 0
    w, h = viewer.view_png_size(view.key_image_png(0))
    sc = next(ds for kind, ds in s.datasets if kind == "sc")
    assert (h, w) == (sc.Rows, sc.Columns)
    assert view.n_slices == s.volume.shape[0] and max(view.shape) == 128
    assert view.series_uid == s.result.series_uid
    for f, got in zip(s.analysis.findings, view.findings, strict=True):
        assert got["index"] == f.index and got["volume_ml"] == pytest.approx(f.volume_ml, 1e-3)
        # the finding's view slice holds lesion pixels, and its centre lies near them
        _, lesion = view.labels(got["slice"])
        rr, cc = np.nonzero(lesion)
        assert len(rr) and np.min(np.hypot(rr - got["y"], cc - got["x"])) < 3.0, got
    # the same figures from ReportObjects-like objects (key_images attribute)

    class Objects:
        key_images = tuple(ds for kind, ds in s.datasets if kind == "sc")

    save_view(tmp_path / "objects", done, Objects(), max_px=64)  # type: ignore[arg-type]
    assert StudyView.open(tmp_path / "objects", s.result.study_uid).n_key_images == n_sc  # type: ignore[union-attr]
    # no patient name or ID anywhere in the store
    name = str(s.sources[0].PatientName).encode()
    pid = str(s.sources[0].PatientID).encode()
    with zipfile.ZipFile(folder / "view.zip") as z:
        text = z.read("view.json")
        members = z.namelist()
    assert name not in text and pid not in text
    assert name not in (folder / "view.json").read_bytes()
    assert {m.split("/")[0] for m in members} == {"view.json", "gray", "labels", "key"}
