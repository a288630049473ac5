"""The outbox on its own: backoff against an archive that is down (a real closed port),
delivery into a real folder archive, and the query window it relies on."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from orthanc import free_port
from pacs_kit import small_sc, write_phantom

from pipeline.archive import open_archive
from pipeline.archive.folder import RESULTS_DIR, FolderArchive
from pipeline.artefacts import QueryWindow
from pipeline.batch import run_batch
from pipeline.config import ArchiveConfig, Config, OutboxConfig
from pipeline.outbox import Outbox
from pipeline.run import Stages
from pipeline.worklist import Worklist
from pipeline.writeback import write_back


def test_backoff_doubles_while_the_archive_is_down(tmp_path: Path) -> None:
    down = open_archive(
        "down", ArchiveConfig(host="127.0.0.1", port=free_port(), called_ae="X", timeout_s=2)
    )
    cfg = OutboxConfig(backoff_initial_s=60.0, backoff_max_s=100.0)
    with Outbox(tmp_path / "ob", cfg) as ob:
        a, b = small_sc(), small_sc()
        refs = write_back(down, [("sc", a), ("sc", b)], ob)
        assert [r.locator for r in refs] == ["outbox:pending"] * 2
        first = {it.sop_uid: it for it in ob.items()}
        assert first[a.SOPInstanceUID].attempts == 1  # the first failure stops the pass
        assert first[b.SOPInstanceUID].attempts == 0
        wait = first[a.SOPInstanceUID].next_attempt - time.time()
        assert 50 < wait <= 60
        d = ob.deliver(down)  # a run's drain: nothing is due yet, nothing is tried
        assert d.pending and not d.delivered
        assert ob.items()[0].attempts + ob.items()[1].attempts == 1
        ob.deliver(down, due_only=False)  # `ctscreen outbox --drain`
        again = {it.sop_uid: it for it in ob.items()}[a.SOPInstanceUID]
        assert again.attempts == 2 and 90 < again.next_attempt - time.time() <= 100  # capped
        assert "connection refused" in again.last_error

        folder = FolderArchive(tmp_path)  # the same objects, into an archive that works
        for ds in (a, b):
            ob.put(folder.name, "sc", ds)
        done = ob.deliver(folder)
        assert set(done.delivered) == {a.SOPInstanceUID, b.SOPInstanceUID}
        assert folder.contains(a.StudyInstanceUID, a.SOPInstanceUID)
        assert ob.counts(folder.name) == {"pending": 0, "delivered": 2, "refused": 0,
                                          "superseded": 0}
        assert ob.counts(down.name)["pending"] == 2  # kept for the archive that is down


def test_query_window_bounds() -> None:
    w = QueryWindow(datetime(2024, 1, 4, 18, 0), datetime(2024, 1, 5, 7, 0))
    assert w.date_range() == "20240104-20240105"
    assert w.holds("20240104", "235959.123")
    assert w.holds("20240105", "0659")
    assert not w.holds("20240105", "070000")  # the end is exclusive
    assert not w.holds("20240104", "1759")
    assert w.holds("", "") is None  # no StudyDate: the caller keeps it and says so
    assert QueryWindow.since(None).unbounded and QueryWindow().date_range() == ""
    assert QueryWindow(None, datetime(2024, 1, 5)).date_range() == "-20240105"


@pytest.mark.heavy  # two batches of a 200-slice phantom
def test_a_result_replaced_before_delivery_is_never_delivered(tmp_path: Path) -> None:
    """The archive cannot take results (its result folder is a file: a real write failure)
    while a study is screened, then screened again under a changed configuration: the first
    result is withdrawn from the outbox, and once the archive works it receives the second
    result only."""
    root = tmp_path / "archive"
    study = write_phantom(root / "study", seed=12)
    (root / RESULTS_DIR).write_text("not a folder")
    archive = FolderArchive(root)
    config = Config(outbox=OutboxConfig(backoff_initial_s=0.0, backoff_max_s=0.0))
    changed = replace(config, lesions=replace(config.lesions,
                                              ggo_min_hu=config.lesions.ggo_min_hu + 100))
    with Worklist(tmp_path / "wl.sqlite") as wl, Outbox(tmp_path / "ob", config.outbox) as ob:
        first = run_batch(archive, Stages.load(config), wl, outbox=ob)
        assert first.by_status == {"analysed": 1} and first.outbox_pending >= 3
        old = {o.sop_instance_uid for o in wl.outputs(study)}
        second = run_batch(archive, Stages.load(changed), wl, outbox=ob)
        assert second.by_status == {"analysed": 1}
        new = {o.sop_instance_uid for o in wl.outputs(study)}
        assert not old & new
        state = {it.sop_uid: it.state for it in ob.items()}
        assert {state[u] for u in old} == {"superseded"}
        assert ob.counts()["pending"] == len(new)
        assert len(list((tmp_path / "ob" / "objects").glob("*.dcm"))) == len(new)

        (root / RESULTS_DIR).unlink()  # the archive works again
        third = run_batch(archive, Stages.load(changed), wl, outbox=ob)
        assert third.skipped_unchanged == 1 and third.outbox_delivered == len(new)
        held = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in (root / RESULTS_DIR).rglob("*.dcm")}
        assert held == new
