"""A regional centre against real archives: two Orthancs (one through DIMSE, one through
DICOMweb) and a folder archive, three sites in one ``ctscreen nightly``.

Every study of every site is screened and its results stored only in its own site's
archive (a copy of one study at two hospitals is screened and delivered once for each); a
second night adds nothing; a site whose Orthanc is stopped is tried again later in the night
while the others go on, or, when it never comes back, reported unreachable with its studies
left for the next night, which screens them.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import OUR_AE
from orthanc import PASSWORD, PASSWORD_ENV, USER, Orthanc, free_port, require_orthanc
from pacs_kit import result_counts, run_cli
from test_sites import _write_studies

from pipeline.api import nightly
from pipeline.worklist import Worklist

pytestmark = pytest.mark.heavy  # servers: outside the quick tier

UNTIL = "2020-03-01T07:00"  # the phantoms' night (StudyDate 2020-03-01, 02:00)


@pytest.fixture(scope="module")
def centre(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two Orthancs with their studies, a folder archive, and which study is where:
    north holds N0 and N1, south holds S0 and a copy of N0 (same UIDs), east holds E0."""
    require_orthanc()
    import os

    os.environ[PASSWORD_ENV] = PASSWORD
    root = tmp_path_factory.mktemp("centre")
    servers = {name: Orthanc(root / name, {"ctscreen": (OUR_AE, free_port())})
               for name in ("north", "south")}
    for s in servers.values():
        s.start()
    try:
        north = _write_studies(root / "north-files", 2, "north")
        south = _write_studies(root / "south-files", 1, "south")
        east = _write_studies(root / "east", 1, "east")
        servers["north"].upload(sorted((root / "north-files").rglob("*.dcm")))
        servers["south"].upload(sorted((root / "south-files").rglob("*.dcm")))
        servers["south"].upload(sorted((root / "north-files" / "north-0").glob("*.dcm")))
        yield {"root": root, "servers": servers, "north": north, "south": [*south, north[0]],
               "east": east}
    finally:
        for s in servers.values():
            s.stop()


def _site_file(centre: dict[str, Any], folder: Path, give_up_s: float = 60.0) -> Path:
    n, s = centre["servers"]["north"], centre["servers"]["south"]
    text = f"""
archives:
  north-pacs: {{kind: dimse, host: 127.0.0.1, port: {n.dicom_port}, called_ae: ORTHANC,
               calling_ae: {OUR_AE}, retrieve: c-get, timeout_s: 5}}
  south-web: {{kind: dicomweb, url: '{s.dicomweb_url}', username: {USER},
              password_env: {PASSWORD_ENV}, timeout_s: 5}}
  east-folder: {{kind: folder, path: '{centre["root"] / "east"}'}}
selection: {{max_slice_thickness_mm: 4.0}}
lungs: {{method: classical}}
outbox: {{backoff_initial_s: 0.0, backoff_max_s: 0.0}}
batch: {{disk_reserve_mb: 0, site_retry_s: 1.0, site_give_up_s: {give_up_s}}}
web: {{store_views: false}}
sites:
  north: {{archives: [north-pacs], timezone: Asia/Shanghai}}
  south: {{archives: [south-web], timezone: Asia/Shanghai}}
  east: {{archives: [east-folder]}}
"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "centre.yaml"
    path.write_text(text)
    return path


def _clean(centre: dict[str, Any]) -> None:
    """No results anywhere: each test starts from the CT alone."""
    for name in ("north", "south"):
        server = centre["servers"][name]
        for uid in centre[name]:
            server.delete_results(uid)
    shutil.rmtree(centre["root"] / "east" / "ctscreen", ignore_errors=True)


def _delivered(centre: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per site, SR objects per study in that site's archive."""
    out: dict[str, dict[str, int]] = {}
    for name in ("north", "south"):
        server = centre["servers"][name]
        out[name] = {uid: result_counts(server, uid)["sr"] for uid in centre[name]}
    east: dict[str, int] = {}
    for f in (centre["root"] / "east" / "ctscreen").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33":
            east[ds.StudyInstanceUID] = east.get(ds.StudyInstanceUID, 0) + 1
    out["east"] = east
    return out


def _rows(db: Path) -> dict[tuple[str, str], str]:
    with Worklist(db) as wl:
        return {(r.site, r.study_uid): r.status for r in wl.rows()}


def test_one_night_screens_every_site_into_its_own_archive(
    centre: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean(centre)
    cfg = _site_file(centre, tmp_path)
    db = tmp_path / "centre.sqlite"
    args = ["nightly", "--config", str(cfg), "--worklist", str(db), "--workers", "0",
            "--until", UNTIL, "--json"]
    rc, report = run_cli(args, capsys)
    assert rc == 0, report
    for site, n in (("north", 2), ("south", 2), ("east", 1)):
        s = report["sites"][site]
        assert s["studies_found"] == n and s["by_status"] == {"analysed": n}, (site, s)
        assert s["outbox"]["pending"] == 0 and not s["unreachable"]
    # each result in its own site's archive, once; the copy at south is south's own
    assert _delivered(centre) == {
        "north": dict.fromkeys(centre["north"], 1),
        "south": dict.fromkeys(centre["south"], 1),
        "east": dict.fromkeys(centre["east"], 1),
    }
    rows = _rows(db)
    copy = centre["north"][0]
    assert rows[("north", copy)] == rows[("south", copy)] == "analysed"
    assert len(rows) == 5

    rc, again = run_cli(args, capsys)
    assert rc == 0 and again["total"]["screened"] == 0, again["total"]
    assert again["total"]["skipped_unchanged"] == 5
    assert _delivered(centre)["south"] == dict.fromkeys(centre["south"], 1)  # nothing added


def test_a_site_whose_archive_is_down_is_screened_when_it_comes_back(
    centre: dict[str, Any], tmp_path: Path
) -> None:
    """South's Orthanc is stopped when the night starts: north and east are screened
    meanwhile, south when its Orthanc answers again; nothing is lost or duplicated."""
    _clean(centre)
    cfg = _site_file(centre, tmp_path)
    db = tmp_path / "centre.sqlite"
    south = centre["servers"]["south"]
    south.stop()
    done: dict[str, Any] = {}

    def night() -> None:
        from datetime import datetime

        done["summaries"] = nightly(cfg, worklist=db, workers=0,
                                    until=datetime.fromisoformat(UNTIL))

    t = threading.Thread(target=night)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the other sites finish while south is down
            rows = _rows(db) if db.exists() else {}
            if sum(1 for site, _ in rows if site in ("north", "east")) == 3:
                break
            time.sleep(0.5)
        assert not any(site == "south" for site, _ in _rows(db))
    finally:
        south.start()
    t.join(timeout=180)
    assert not t.is_alive()
    by_site = {s.site: s for s in done["summaries"]}
    assert by_site["south"].by_status == {"analysed": 2} and not by_site["south"].unreachable
    assert by_site["north"].by_status == {"analysed": 2}
    assert _delivered(centre) == {
        "north": dict.fromkeys(centre["north"], 1),
        "south": dict.fromkeys(centre["south"], 1),
        "east": dict.fromkeys(centre["east"], 1),
    }


def test_a_site_that_never_comes_back_is_reported_and_left_for_the_next_night(
    centre: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean(centre)
    cfg = _site_file(centre, tmp_path, give_up_s=2.0)
    db = tmp_path / "centre.sqlite"
    args = ["nightly", "--config", str(cfg), "--worklist", str(db), "--workers", "0",
            "--until", UNTIL, "--json"]
    south = centre["servers"]["south"]
    south.stop()
    try:
        rc, report = run_cli(args, capsys)
    finally:
        south.start()
    assert rc == 5, report  # a site unreachable
    assert "south-web" in report["unreachable"]["south"], report["unreachable"]
    assert report["sites"]["south"]["screened"] == 0
    assert report["sites"]["north"]["by_status"] == {"analysed": 2}
    assert not any(site == "south" for site, _ in _rows(db))  # nothing recorded as done

    rc, report = run_cli(args, capsys)  # the next night: south is back
    assert rc == 0, report
    assert report["sites"]["south"]["by_status"] == {"analysed": 2}
    assert report["sites"]["north"]["screened"] == 0  # done the night before
    assert _delivered(centre)["south"] == dict.fromkeys(centre["south"], 1)
    with sqlite3.connect(db) as con:
        states = dict(con.execute(
            "SELECT site || '/' || study_uid, state FROM study_state").fetchall())
    assert set(states.values()) == {"delivered"} and len(states) == 5
