"""The batch keeps the web's view of each study (pipeline/web/viewer.py) beside its worklist:
written for an analysed study before the worklist row, removed when a re-screen does not
analyse it, not written with ``web.store_views: false``, pruned by age."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

import pipeline
from pipeline.artefacts import ScreeningResult, Status
from pipeline.config import Config
from pipeline.demo import write_phantom_study
from pipeline.run import StudyAnalysis, store_view
from pipeline.web.viewer import StudyView, view_root
from pipeline.worklist import Worklist

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views") / "archive"
    write_phantom_study(root / "a", seed=5, with_lesions=True, accession="VIEW1")
    return root


def _uid(wl: Path) -> str:
    with Worklist(wl) as w:
        (row,) = w.rows()
        return row.study_uid


def test_a_batch_stores_the_view_of_an_analysed_study(archive: Path, tmp_path: Path) -> None:
    wl = tmp_path / "wl.sqlite"
    summary = pipeline.run_batch(str(archive), Config(), worklist=wl, workers=0)
    assert summary.by_status["analysed"] == 1
    root = view_root(Config(), wl)
    assert root == tmp_path / "wl.views"
    view = StudyView.open(root, _uid(wl))
    assert view is not None and view.n_slices > 0 and view.n_key_images >= 1
    assert view.findings  # the phantom's lesions
    view.close()
    # a re-screen that does not analyse the study removes its old view
    uid = _uid(wl)
    refused = ScreeningResult(study_uid=uid, accession_number="", study_date="",
                              status=Status.NOT_ANALYSED, reasons=("too-few-slices:8",))
    store_view(root, StudyAnalysis(refused, []), Config())
    assert StudyView.open(root, uid) is None
    pipeline.run_batch(str(archive), Config(), worklist=wl, workers=0, force=True)
    assert StudyView.open(root, uid) is not None
    # an old view is pruned when a batch starts
    folder = next(p for p in root.iterdir() if p.is_dir())
    old = time.time() - 40 * 86400
    for p in [folder, *folder.iterdir()]:
        os.utime(p, (old, old))
    pipeline.run_batch(str(archive), Config(), worklist=wl, workers=0)  # nothing to re-screen
    assert StudyView.open(root, _uid(wl)) is None


def test_no_view_without_store_views(archive: Path, tmp_path: Path) -> None:
    cfg = Config()
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, store_views=False))
    wl = tmp_path / "wl.sqlite"
    pipeline.run_batch(str(archive), cfg, worklist=wl, workers=0)
    assert not view_root(cfg, wl).exists()
