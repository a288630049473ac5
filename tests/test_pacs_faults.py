"""Faults between ctscreen and a PACS, each with a real part where one can produce it:
Orthanc stopped in the middle of a run, a C-STORE refused with a failure status (a real
pynetdicom SCP that refuses), instances removed from Orthanc between query and retrieval,
and connectivity checks that say what failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FINDSCU_AE, OUR_AE, site_config
from orthanc import AET, Orthanc, free_port, require_orthanc
from pacs_kit import PHANTOM_NIGHT, result_counts, run_cli, small_sc, write_phantom
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from pipeline.archive import open_archive
from pipeline.batch import run_batch
from pipeline.config import ArchiveConfig, load_config
from pipeline.errors import ArchiveUnavailable
from pipeline.outbox import Outbox
from pipeline.run import Stages
from pipeline.worklist import Worklist
from pipeline.writeback import write_back

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@pytest.fixture
def own_orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc of this test alone (it is stopped and started again)."""
    require_orthanc()
    server = Orthanc(
        tmp_path / "orthanc",
        {"ctscreen": (OUR_AE, free_port()), "findscu": (FINDSCU_AE, free_port())},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_orthanc_stopped_mid_run_then_a_later_run_delivers(
    own_orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Orthanc goes down after the first study was retrieved: its results wait in the
    outbox, the second study fails (retried later); once Orthanc is back, the next run
    delivers the waiting results and screens the second study, nothing lost or doubled."""
    o = own_orthanc
    studies = []
    for seed in (31, 32):
        folder = tmp_path / f"s{seed}"
        studies.append(write_phantom(folder, seed=seed))
        o.upload(sorted(folder.glob("*.dcm")))
    config = load_config(site_config(o, tmp_path))
    stages = Stages.load(config)
    archive = open_archive("pacs", config.archives["pacs"])
    load = archive.load
    calls = []

    def load_then_stop(locators: list[str]) -> list[Dataset]:
        datasets = load(locators)
        calls.append(len(datasets))
        if len(calls) == 1:
            o.stop()  # the archive goes down while the first study is being screened
        return datasets

    archive.load = load_then_stop  # type: ignore[method-assign]
    wl_path, ob_path = tmp_path / "wl.sqlite", tmp_path / "wl.sqlite.outbox"
    with Worklist(wl_path) as wl, Outbox(ob_path, config.outbox) as ob:
        first = run_batch(archive, stages, wl, outbox=ob)
        rows = {r.study_uid: r for r in wl.rows()}
        waiting = ob.items(archive.name, "pending")
    assert first.by_status == {"analysed": 1, "failed": 1}, first.as_json()
    assert first.reasons == {"archive-error": 1}
    assert first.outbox_pending == len(waiting) >= 3  # SEG, SR and key images kept
    assert {it.study_uid for it in waiting} == {studies[0]}
    assert all((ob_path / "objects" / it.file_name).is_file() for it in waiting)
    assert rows[studies[0]].status == "analysed" and rows[studies[1]].status == "failed"

    rc, listed = run_cli(["outbox", "--worklist", str(wl_path), "--json"], capsys)
    assert rc == 0 and listed["counts"]["pending"] == len(waiting)
    assert {it["state"] for it in listed["items"]} == {"pending"}

    o.start()  # same storage: the CT studies are still there
    assert result_counts(o, studies[0])["sr"] == 0
    archive = open_archive("pacs", config.archives["pacs"])
    with Worklist(wl_path) as wl, Outbox(ob_path, config.outbox) as ob:
        second = run_batch(archive, stages, wl, outbox=ob)
        counts = ob.counts(archive.name)
    assert second.outbox_delivered == len(waiting)
    assert second.skipped_unchanged == 1 and second.by_status == {"analysed": 1}
    assert counts["pending"] == 0 and counts["refused"] == 0
    assert not list((ob_path / "objects").glob("*.dcm"))  # delivered files removed
    expected = None
    for study in studies:
        c = result_counts(o, study)
        assert c["ct"] == 200 and c["sr"] == 1 and c["seg"] == 1 and c["sc"] >= 1, c
        expected = expected or c
    with Worklist(wl_path) as wl, Outbox(ob_path, config.outbox) as ob:
        third = run_batch(archive, stages, wl, outbox=ob)
    assert third.skipped_unchanged == 2 and third.outbox_delivered == 0
    assert result_counts(o, studies[0]) == expected  # nothing duplicated


class RefusingScp:
    """A real DIMSE storage SCP that answers every C-STORE with 0xA700 (out of resources)
    and every C-FIND with no match: an archive whose disk is full."""

    def __init__(self) -> None:
        self.stores = 0
        ae = AE(ae_title="FULLPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(STUDY_ROOT_FIND)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_FIND, self._find)],
        )

    def _store(self, event: Any) -> int:
        self.stores += 1
        return 0xA700

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0x0000, None

    def close(self) -> None:
        self.server.shutdown()


def test_refused_store_is_recorded_with_its_status_and_not_retried_blindly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = RefusingScp()
    try:
        cfg = ArchiveConfig(
            kind="dimse", host="127.0.0.1", port=scp.port, called_ae="FULLPACS", timeout_s=5
        )
        archive = open_archive("full", cfg)
        ds = small_sc()
        with Outbox(tmp_path / "wl.sqlite.outbox") as ob:
            (ref,) = write_back(archive, [("sc", ds)], ob)
            assert ref.locator == "outbox:refused:0xA700"
            (item,) = ob.items()
            assert item.state == "refused" and item.status == "0xA700"
            assert "0xA700" in item.last_error
            assert scp.stores == 1
            later = ob.deliver(archive, due_only=False)  # a later run's drain
            assert scp.stores == 1 and not later.delivered and not later.pending
            again = ob.deliver(archive, retry_refused=True)  # asked for explicitly
            assert scp.stores == 2 and again.refused == {ds.SOPInstanceUID: "0xA700"}
        wl = str(tmp_path / "wl.sqlite")
        rc, out = run_cli(["outbox", "--worklist", wl, "--json"], capsys)
        assert rc == 0 and out["counts"]["refused"] == 1
        assert out["items"][0]["status"] == "0xA700"
        site = tmp_path / "site.yaml"
        site.write_text(json.dumps({"archives": {"full": _dimse(scp.port, called_ae="FULLPACS")}}))
        drain = ["outbox", "--archive", "full", "--config", str(site), "--worklist", wl, "--drain"]
        rc, text = run_cli(drain, capsys)
        assert rc == 0 and scp.stores == 2  # nothing pending; the refused one left alone
        rc, text = run_cli([*drain, "--retry-refused"], capsys)
        assert rc == 1 and scp.stores == 3 and "0xA700" in text
    finally:
        scp.close()


@pytest.mark.parametrize("door", ["pacs", "pacs-web"])
def test_fewer_instances_than_announced_is_not_analysed_and_retried(
    door: str, orthanc: Orthanc, tmp_path: Path
) -> None:
    """Two instances disappear from Orthanc between the query and the retrieval (a real
    race with the archive's own deletion): "incomplete-retrieval:198/200", retried next run."""
    folder = tmp_path / "s"
    study = write_phantom(folder, seed=33 if door == "pacs" else 34)
    orthanc.upload(sorted(folder.glob("*.dcm")))
    try:
        config = load_config(site_config(orthanc, tmp_path))
        stages = Stages.load(config)
        archive = open_archive(door, config.archives[door])
        load = archive.load

        def load_after_deletion(locators: list[str]) -> list[Dataset]:
            for number in ("1", "2"):  # the two most caudal slices: no gap once gone
                (inst,) = orthanc.find(
                    "Instance", {"StudyInstanceUID": study, "InstanceNumber": number}
                )
                orthanc.session.delete(f"{orthanc.url}/instances/{inst['ID']}").raise_for_status()
            archive.load = load  # type: ignore[method-assign]
            return load(locators)

        archive.load = load_after_deletion  # type: ignore[method-assign]
        with Worklist(tmp_path / "wl.sqlite") as wl, Outbox(tmp_path / "ob") as ob:
            first = run_batch(archive, stages, wl, outbox=ob, window=PHANTOM_NIGHT)
            (row,) = wl.rows()
            assert first.by_status == {"not-analysed": 1}
            assert row.reasons == ["incomplete-retrieval:198/200"]
            assert result_counts(orthanc, study)["sr"] == 0  # nothing analysed, nothing stored
            second = run_batch(archive, stages, wl, outbox=ob, window=PHANTOM_NIGHT)
            (row,) = wl.rows()
        assert second.skipped_unchanged == 0 and second.by_status == {"analysed": 1}
        assert row.status == "analysed" and row.reasons == []
    finally:
        orthanc.delete_study(study)


def test_echo_says_what_failed(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = site_config(orthanc, tmp_path)
    for name in ("pacs", "pacs-web"):
        capsys.readouterr()
        assert main_echo(name, good) == 0
        assert "ok" in capsys.readouterr().out
    closed = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps(
            {
                "archives": {
                    "wrong-aet": _dimse(orthanc.dicom_port, called_ae="NOTORTHANC"),
                    "down": _dimse(closed),
                    "tls": _dimse(orthanc.dicom_port, tls={"enabled": True}),
                    "bad-password": {
                        "kind": "dicomweb", "url": orthanc.dicomweb_url, "username": "ctscreen",
                        "password_env": "CTSCREEN_TEST_WRONG_PASSWORD",
                    },
                }
            }
        )
    )
    import os

    os.environ["CTSCREEN_TEST_WRONG_PASSWORD"] = "not-the-password"
    expected = {
        "wrong-aet": "Called AE title not recognised",
        "down": "connection refused",
        "tls": "TLS",
        "bad-password": "authentication failed",
    }
    for name, words in expected.items():
        capsys.readouterr()
        assert main_echo(name, bad) == 1, name
        err = capsys.readouterr().err
        assert words in err and "FAILED" in err, (name, err)


def _dimse(port: int, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "kind": "dimse", "host": "127.0.0.1", "port": port, "called_ae": AET,
        "calling_ae": OUR_AE, "timeout_s": 5,
    }
    d.update(over)
    return d


def main_echo(name: str, config: Path) -> int:
    from pipeline.cli import main

    return main(["echo", name, "--config", str(config)])


def test_archive_unavailable_is_its_own_error() -> None:
    """Connection failures are ArchiveUnavailable (retried), not a refusal."""
    cfg = ArchiveConfig(kind="dimse", host="127.0.0.1", port=free_port(), called_ae="X")
    with pytest.raises(ArchiveUnavailable, match="connection refused"):
        open_archive("x", cfg).store(small_sc())
