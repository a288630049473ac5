"""A regional centre: several hospitals (sites) screened by one ctscreen (docs/sites.md).

The site file (sites: with archives, clock, window, weight, selection rules), studies known
by site and UID in the state and the worklist (and older databases rebuilt so), the
night's window on each site's clock, the weighted round-robin that keeps a large backlog
from starving a small site, and ``ctscreen run --site``.  The tests with real archives
(two Orthancs and a folder, an outage) are in test_sites_pacs.py.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from batch_kit import SHAPE, SPACING
from pacs_kit import run_cli

from pipeline.api import site_window
from pipeline.artefacts import ScreeningResult, Status
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.phantom.dicom import derive_uid, write_ct_series
from pipeline.phantom.model import PhantomSpec, make_grid, render
from pipeline.state import Claim, State, StateStore
from pipeline.worklist import Worklist, WorklistFilter

# ---------------------------------------------------------------- the site file

ARCHIVES = """
archives:
  a-pacs: {kind: folder, path: /tmp/a}
  a-web: {kind: dicomweb, url: 'https://a.example.org/dicom-web'}
  b-pacs: {kind: folder, path: /tmp/b}
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "centre.yaml"
    path.write_text(text)
    return path


def test_sites_are_read_with_their_own_selection_rules_over_the_common_ones(
    tmp_path: Path,
) -> None:
    cfg = load_config(_config(tmp_path, ARCHIVES + """
selection: {max_slice_thickness_mm: 2.0, min_slices: 60}
sites:
  north:
    archives: [a-pacs, a-web]
    results_archive: a-pacs
    timezone: Asia/Shanghai
    window_hours: 12
    weight: 3
    selection: {max_slice_thickness_mm: 3.0}
  south:
    archives: [b-pacs]
"""))
    north, south = cfg.sites["north"], cfg.sites["south"]
    assert north.archives == ("a-pacs", "a-web") and north.weight == 3
    assert north.timezone == "Asia/Shanghai" and north.window_hours == 12
    # a site states only what differs: the rest of the common selection holds for it
    assert north.selection is not None and north.selection.max_slice_thickness_mm == 3.0
    assert north.selection.min_slices == 60
    assert south.selection is None and cfg.for_site("south").selection == cfg.selection
    assert cfg.for_site("north").selection.max_slice_thickness_mm == 3.0
    assert cfg.for_site("north").analysis_key() != cfg.analysis_key()  # its own results
    assert cfg.site_of("a-web") == "north" and cfg.site_of("b-pacs") == "south"
    assert cfg.site_of("elsewhere") == ""


@pytest.mark.parametrize("sites, message", [
    ("x: {archives: [nowhere]}", "archive 'nowhere' is not under archives:"),
    ("x: {archives: []}", "at least one archive"),
    ("x: {archives: [a-pacs]}\n  y: {archives: [a-pacs]}", "already belongs to site 'x'"),
    ("x: {archives: [a-pacs], results_archive: b-pacs}\n  y: {archives: [b-pacs]}",
     "results never cross sites"),
    ("x: {archives: [a-pacs], timezone: Mars/Olympus}", "IANA time zone"),
    ("'bad name': {archives: [a-pacs]}", "expected a site name"),
    ("x: {archives: [a-pacs], weight: 0}", "weight"),
    ("x: {archives: [a-pacs], window_hours: 0}", "window_hours"),
    ("x: {archives: [a-pacs], selection: {no_such_rule: 1}}", "unknown key"),
])
def test_a_wrong_site_file_is_refused_with_its_reason(
    tmp_path: Path, sites: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, ARCHIVES + "sites:\n  " + sites + "\n"))


def test_the_night_is_read_on_each_sites_own_clock(tmp_path: Path) -> None:
    """StudyDate/Time are the hospital's local time: one moment is a different night in
    Shanghai and in New York."""
    cfg = load_config(_config(tmp_path, ARCHIVES + """
sites:
  east: {archives: [a-pacs], timezone: Asia/Shanghai, window_hours: 12}
  west: {archives: [b-pacs], timezone: America/New_York, window_hours: 12}
"""))
    moment = datetime(2020, 2, 29, 23, 0, tzinfo=UTC)
    east = site_window(cfg.sites["east"], moment)
    west = site_window(cfg.sites["west"], moment)
    assert (east.start, east.end) == (datetime(2020, 2, 29, 19), datetime(2020, 3, 1, 7))
    assert (west.start, west.end) == (datetime(2020, 2, 29, 6), datetime(2020, 2, 29, 18))
    assert east.holds("20200301", "020000") and not west.holds("20200301", "020000")
    # a time without a zone is already on the site's clock
    local = site_window(cfg.sites["west"], datetime(2020, 3, 1, 7))
    assert (local.start, local.end) == (datetime(2020, 2, 29, 19), datetime(2020, 3, 1, 7))


# ---------------------------------------------------------------- studies known by site and UID

def _result(uid: str, status: Status = Status.NOT_ANALYSED, reason: str = "r") -> ScreeningResult:
    return ScreeningResult(study_uid=uid, accession_number="A1", study_date="20200301",
                           status=status, reasons=(reason,), algorithm_version="v")


def test_one_study_at_two_sites_is_two_rows_and_two_states(tmp_path: Path) -> None:
    db = tmp_path / "wl.sqlite"
    with Worklist(db) as wl, StateStore(db) as states:
        north, south = wl.for_site("north"), wl.for_site("south")
        north.record(_result("1.2.3", reason="north-reason"), "fp")
        south.record(_result("1.2.3", reason="south-reason"), "fp")
        assert north.get("1.2.3").reasons == ["north-reason"]  # type: ignore[union-attr]
        assert south.get("1.2.3").reasons == ["south-reason"]  # type: ignore[union-attr]
        assert {(r.site, r.study_uid) for r in wl.rows()} == {("north", "1.2.3"),
                                                              ("south", "1.2.3")}
        assert [r.site for r in north.rows()] == ["north"]
        page, total = wl.page(filters=WorklistFilter(site="south"))
        assert total == 1 and page[0].site == "south"
        assert wl.page(filters=WorklistFilter(sites=("north",)))[1] == 1
        assert wl.page(filters=WorklistFilter(sites=()))[1] == 0  # a user of no site sees none

        a, b = states.for_site("north"), states.for_site("south")
        assert a.claim("1.2.3", "fp", "", "run-1", 60) is Claim.CLAIMED
        # the other site's copy is a study of its own: not busy, not done
        assert b.claim("1.2.3", "fp", "", "run-2", 60) is Claim.CLAIMED
        a.advance("1.2.3", State.NOT_ANALYSED, "run-1", ["r"])
        a.release("1.2.3", "run-1")
        assert a.get("1.2.3").state is State.NOT_ANALYSED  # type: ignore[union-attr]
        assert b.get("1.2.3").state is State.DISCOVERED  # type: ignore[union-attr]
        assert a.claim("1.2.3", "fp", "", "run-3", 60) is Claim.DONE
        assert states.get("1.2.3") is None  # the plain run's site '' holds no such study
        assert a.counts() == {"not-analysed": 1} and b.counts() == {"discovered": 1}


def test_databases_from_before_sites_keep_their_studies(tmp_path: Path) -> None:
    """A worklist and a state table keyed by the study UID alone are rebuilt with the key
    (site, UID); every row stays, as the plain run's (site '')."""
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE studies (study_uid TEXT PRIMARY KEY, accession_number TEXT NOT NULL
            DEFAULT '', study_date TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, reasons TEXT
            NOT NULL DEFAULT '[]', warnings TEXT NOT NULL DEFAULT '[]', series_uid TEXT NOT NULL
            DEFAULT '', series_description TEXT NOT NULL DEFAULT '', n_slices INTEGER NOT NULL
            DEFAULT 0, lung_right_ml REAL, lung_left_ml REAL, involved_pct REAL, severity_score
            INTEGER, severity_max INTEGER, suspicion REAL, pattern TEXT, n_findings INTEGER NOT
            NULL DEFAULT 0, outputs TEXT NOT NULL DEFAULT '[]', algorithm_version TEXT NOT NULL
            DEFAULT '', fingerprint TEXT NOT NULL DEFAULT '', timings TEXT NOT NULL DEFAULT '{}',
            first_seen TEXT NOT NULL, updated_at TEXT NOT NULL);
        CREATE INDEX studies_date ON studies (study_date);
        INSERT INTO studies (study_uid, status, pattern, suspicion, first_seen, updated_at)
            VALUES ('1.2.3', 'analysed', 'typical', 0.9, '2020', '2020'),
                   ('1.2.4', 'not-analysed', NULL, NULL, '2020', '2020');
        CREATE TABLE study_state (study_uid TEXT PRIMARY KEY, fingerprint TEXT NOT NULL
            DEFAULT '', limits TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reasons TEXT NOT
            NULL DEFAULT '[]', owner TEXT NOT NULL DEFAULT '', lease_until DOUBLE PRECISION NOT
            NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL
            DEFAULT 0, updated_at DOUBLE PRECISION NOT NULL DEFAULT 0);
        INSERT INTO study_state (study_uid, fingerprint, state) VALUES ('1.2.3', 'fp', 'delivered');
    """)
    con.commit()
    con.close()
    with Worklist(db) as wl, StateStore(db) as states:
        rows = wl.rows()
        assert [(r.site, r.study_uid, r.flag) for r in rows] == [
            ("", "1.2.3", "TYPICAL"), ("", "1.2.4", "NOT ANALYSED")]
        assert states.get("1.2.3").state is State.DELIVERED  # type: ignore[union-attr]
        assert states.claim("1.2.3", "fp", "", "me", 60) is Claim.DONE
        wl.for_site("north").record(_result("1.2.3"), "fp")  # the new key takes a copy
        assert len(wl.rows()) == 3
    with Worklist(db) as wl:  # opening it again changes nothing
        assert len(wl.rows()) == 3


# ---------------------------------------------------------------- runs of sites

def _write_studies(root: Path, n: int, tag: str, thick: bool = False) -> list[str]:
    """``n`` small phantom studies (80 slices of 3.75 mm; 5 mm where ``thick``), one
    rendered phantom with fresh UIDs per study: their study UIDs."""
    spacing = (5.0, *SPACING[1:]) if thick else SPACING
    ct, _ = render(PhantomSpec(seed=501), make_grid(SHAPE, spacing, "axial"), SHAPE,
                   slice_thickness_mm=spacing[0])
    first = root / f"{tag}-0"
    write_ct_series(ct, first, study_uid=derive_uid(0, f"{tag}-study"),
                    series_uid=derive_uid(0, f"{tag}-series"), accession_number=f"{tag}0",
                    slice_thickness=spacing[0], seed=501)
    uids = [derive_uid(0, f"{tag}-study")]
    files = sorted(first.glob("*.dcm"))
    for i in range(1, n):
        study, series = derive_uid(i, f"{tag}-study"), derive_uid(i, f"{tag}-series")
        out = root / f"{tag}-{i}"
        out.mkdir(parents=True)
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = derive_uid(i * 1000 + k, f"{tag}-sop")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AccessionNumber = f"{tag}{i}"
            ds.save_as(out / f.name)
        uids.append(study)
    return uids


def _centre(tmp_path: Path, a: Path, b: Path, **site_b: str) -> Path:
    extra = "".join(f", {k}: {v}" for k, v in site_b.items())
    return _config(tmp_path, f"""
archives:
  a-folder: {{kind: folder, path: '{a}'}}
  b-folder: {{kind: folder, path: '{b}'}}
selection: {{max_slice_thickness_mm: 4.0}}
lungs: {{method: classical}}
batch: {{disk_reserve_mb: 0}}
web: {{store_views: false}}
sites:
  big: {{archives: [a-folder]}}
  small: {{archives: [b-folder]{extra}}}
""")


def _finish_order(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return [(r[0], r[1]) for r in con.execute(
            "SELECT site, study_uid FROM study_state ORDER BY updated_at")]


@pytest.mark.heavy
def test_a_small_site_is_not_starved_by_a_large_backlog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 studies at one site, 2 at another, one worker: the small site's studies are
    finished among the first five (round-robin); every study is screened once, each
    recorded under its own site; a second night adds nothing."""
    big = _write_studies(tmp_path / "a", 20, "big")
    small = _write_studies(tmp_path / "b", 2, "small")
    cfg = _centre(tmp_path, tmp_path / "a", tmp_path / "b")
    db = tmp_path / "centre.sqlite"
    args = ["nightly", "--config", str(cfg), "--worklist", str(db), "--workers", "1",
            "--until", "2020-03-01T07:00", "--json"]
    rc, report = run_cli(args, capsys)
    assert rc == 0, report
    assert report["sites"]["big"]["by_status"] == {"analysed": 20}, report["sites"]["big"]
    assert report["sites"]["small"]["by_status"] == {"analysed": 2}
    order = _finish_order(db)
    assert len(order) == 22
    assert {("small", u) for u in small} <= set(order[:5]), order[:6]
    # one study of each site in turn while both have studies
    assert [site for site, _ in order[:5]] == ["big", "small", "big", "small", "big"]
    with Worklist(db) as wl:
        rows = wl.rows()
    assert {r.site for r in rows} == {"big", "small"} and len(rows) == 22
    assert {r.study_uid for r in rows if r.site == "big"} == set(big)
    # each site's results went into its own archive only
    assert len(list((tmp_path / "a" / "ctscreen").rglob("*.dcm"))) > 0
    small_results = {pydicom.dcmread(f).StudyInstanceUID
                     for f in (tmp_path / "b" / "ctscreen").rglob("*.dcm")}
    assert small_results == set(small)

    rc, again = run_cli(args, capsys)
    assert rc == 0 and again["total"]["screened"] == 0, again["total"]
    assert again["total"]["skipped_unchanged"] == 22
    assert json.loads((tmp_path / "centre.sqlite.last-run.json").read_text())["total"] == \
        again["total"]


def test_a_site_has_its_own_selection_rules_and_run_site_screens_one_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same study at two sites: the site whose scanners' rules refuse it says so, the
    other screens it; ``ctscreen run --site`` screens only its site."""
    _write_studies(tmp_path / "a", 1, "same")
    (uid,) = _write_studies(tmp_path / "b", 1, "same")
    cfg = _centre(tmp_path, tmp_path / "a", tmp_path / "b",
                  selection="{max_slice_thickness_mm: 1.0}")
    db = tmp_path / "centre.sqlite"
    rc, summary = run_cli(["run", "--site", "small", "--config", str(cfg), "--worklist",
                           str(db), "--workers", "0", "--json"], capsys)
    assert rc == 0 and summary["site"] == "small", summary
    assert summary["by_status"] == {"not-analysed": 1}
    assert any("slice-too-thick" in r for r in summary["reasons"]), summary["reasons"]
    with Worklist(db) as wl:
        assert [(r.site, r.status) for r in wl.rows()] == [("small", "not-analysed")]
    rc, summary = run_cli(["run", "--archive", "a-folder", "--config", str(cfg), "--worklist",
                           str(db), "--workers", "0", "--json"], capsys)
    assert rc == 0 and summary["site"] == "big" and summary["by_status"] == {"analysed": 1}
    with Worklist(db) as wl:
        got = {r.site: r.status for r in wl.rows() if r.study_uid == uid}
    assert got == {"small": "not-analysed", "big": "analysed"}


@pytest.mark.heavy
def test_a_receiving_node_of_a_site_records_its_studies_as_that_sites(tmp_path: Path) -> None:
    """``listen.site``: what the node receives is screened with its site's rules and
    recorded under its site."""
    from orthanc import free_port
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from pipeline.api import listener

    _write_studies(tmp_path / "files", 1, "rx")
    (uid,) = [derive_uid(0, "rx-study")]
    port = free_port()
    cfg = _config(tmp_path, f"""
archives:
  a-folder: {{kind: folder, path: '{tmp_path / "a"}'}}
selection: {{max_slice_thickness_mm: 4.0}}
lungs: {{method: classical}}
batch: {{disk_reserve_mb: 0}}
web: {{store_views: false}}
sites:
  north: {{archives: [a-folder]}}
listen: {{ae_title: NODE, port: {port}, allowed_calling_aes: [SENDER], site: north,
          spool: '{tmp_path / "spool"}', stability_timeout_s: 1.0}}
""")
    db = tmp_path / "node.sqlite"
    node = listener(cfg, worklist=db)
    node.start()
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        for f in sorted((tmp_path / "files").rglob("*.dcm")):
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        assoc.release()
        import time

        deadline = time.monotonic() + 120
        while not node.summaries and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        node.stop()
    (summary,) = node.summaries
    assert summary.site == "north" and summary.by_status == {"analysed": 1}, summary.as_json()
    with Worklist(db) as wl:
        assert [(r.site, r.study_uid) for r in wl.rows()] == [("north", uid)]


def test_listen_site_must_be_a_configured_site(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listen\.site"):
        load_config(_config(tmp_path, "listen: {site: nowhere}\n"))
