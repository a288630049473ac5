"""One pathological study never stops the night: limits per study, the free-disk reserve,
a full disk, a model that fails its hash, the run summary, and the state in PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from batch_kit import (
    SITE_CONFIG,
    finish,
    integrity,
    prepare,
    start,
    temporaries,
    worklist_file,
    write_batch,
)
from orthanc import free_port
from postgres import postgres_server

from pipeline.cli import main

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom studies and one with 5 mm slices."""
    return write_batch(tmp_path_factory.mktemp("limits-source") / "archive", n=3)


def _site(where: Path, extra: dict[str, Any]) -> Path:
    cfg = yaml.safe_load(SITE_CONFIG)
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = where / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(archive: Path, config: Path, capsys: pytest.CaptureFixture[str], *extra: str
         ) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["run", "--archive", str(archive), "--config", str(config), "--json", *extra])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def _rows(archive: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(worklist_file(archive)) as c:
        c.row_factory = sqlite3.Row
        return {r["accession_number"]: dict(r) for r in c.execute("SELECT * FROM studies")}


@pytest.mark.parametrize(
    ("limit", "code"),
    [({"max_slices": 50}, "limit-exceeded:slices"),
     ({"max_series_bytes": 1_000_000}, "limit-exceeded:bytes")],
)
def test_size_limits_refuse_before_retrieval_and_rerun_when_raised(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    limit: dict[str, int], code: str,
) -> None:
    archive, _ = prepare(source, tmp_path)
    config = _site(tmp_path, {"batch": limit})
    rc, summary = _run(archive, config, capsys, "--workers", "0")
    assert rc == 0
    assert summary["reasons"] == {code: 2, "slice-too-thick:5.0mm": 1}
    assert "read" not in summary["stage_seconds"]  # nothing was retrieved
    rows = _rows(archive)
    assert json.loads(rows["B00"]["reasons"]) == [code] and rows["B00"]["status"] == "not-analysed"
    rc, again = _run(archive, config, capsys, "--workers", "0")
    assert again["skipped_unchanged"] == 3  # same limits: not tried again
    raised = _site(tmp_path, {"batch": {k: 0 for k in limit}})
    rc, after = _run(archive, raised, capsys, "--workers", "0")
    assert after["by_status"] == {"analysed": 2}  # the thick series stays refused (done)
    assert after["skipped_unchanged"] == 1


@pytest.mark.parametrize(
    ("limit", "code"),
    [({"max_study_seconds": 0.2}, "limit-exceeded:time"),
     ({"max_study_memory_mb": 20}, "limit-exceeded:memory")],
)
def test_time_and_memory_limits_stop_the_study_not_the_batch(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    limit: dict[str, float], code: str,
) -> None:
    archive, _ = prepare(source, tmp_path)
    # the learned lungs: their libraries must load before the worker's memory cap
    config = _site(tmp_path, {"batch": limit, "lungs": {"method": "model"}})
    rc, summary = _run(archive, config, capsys, "--workers", "1")
    assert rc == 0
    assert summary["reasons"] == {code: 2, "slice-too-thick:5.0mm": 1}
    assert summary["by_state"] == {"not-analysed": 3}
    rows = _rows(archive)
    assert {json.loads(rows[a]["reasons"])[0] for a in ("B00", "B01")} == {code}
    assert not (archive / "ctscreen").exists() or not any((archive / "ctscreen").rglob("*.dcm"))


def test_disk_reserve_stops_pulling(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, _ = prepare(source, tmp_path)
    free_mb = shutil.disk_usage(tmp_path).free // 1024**2
    config = _site(tmp_path, {"batch": {"disk_reserve_mb": free_mb + 10_000}})
    rc, summary = _run(archive, config, capsys, "--workers", "0")
    assert rc == 4
    assert summary["stopped"].startswith("disk-reserve:")
    assert summary["screened"] == 0 and summary["by_state"] == {"discovered": 3}
    assert not (archive / "ctscreen").exists()
    capsys.readouterr()
    assert main(["run", "--archive", str(archive), "--config", str(config), "--workers", "0"]) == 4
    text = capsys.readouterr().out
    assert "STOPPED EARLY" in text and "Free disk space" in text
    rc, after = _run(archive, _site(tmp_path, {}), capsys, "--workers", "0")
    assert rc == 0 and after["screened"] == 3


def test_a_full_disk_leaves_no_partial_file_and_loses_nothing(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The archive on a real file system that fills up (an 8 MiB tmpfs): the result
    objects wait in the outbox, no partial file remains, and once space is made the next
    run delivers them."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        archive = mnt / "archive"
        shutil.copytree(source / "study0", archive / "study0")
        filler = mnt / "filler"
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave 64 KiB
        config = _site(tmp_path, {})
        wl = tmp_path / "wl.sqlite"
        rc, summary = _run(archive, config, capsys, "--workers", "0", "--worklist", str(wl))
        assert rc == 0
        assert summary["by_status"] == {"analysed": 1}
        assert summary["outbox"]["pending"] >= 3 and summary["outputs_written"] == 0
        assert temporaries(mnt) == []
        assert not any((archive / "ctscreen").rglob("*.dcm"))
        with sqlite3.connect(wl) as c:
            assert dict(c.execute("SELECT study_uid, state FROM study_state").fetchall()) \
                .popitem()[1] == "written"
        filler.unlink()
        assert main(["outbox", "--archive", str(archive), "--worklist", str(wl), "--config",
                     str(config), "--drain"]) == 0
        rc, after = _run(archive, config, capsys, "--workers", "0", "--worklist", str(wl))
        assert after["skipped_unchanged"] == 1 and after["outbox"]["pending"] == 0
        assert after["by_state"] == {"delivered": 1}
        assert len(list((archive / "ctscreen").rglob("*.dcm"))) == summary["outbox"]["pending"]
        assert integrity(wl) == "ok"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_model_that_fails_its_hash_stops_the_run_before_any_study(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, _ = prepare(source, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "covid-lesions-unet2d", model)
    spec = yaml.safe_load((model / "model.yaml").read_text())
    spec["sha256"] = "0" * 64
    (model / "model.yaml").write_text(yaml.safe_dump(spec))
    config = _site(tmp_path, {"lesions": {"detector": "onnx", "model": str(model)}})
    capsys.readouterr()
    rc = main(["run", "--archive", str(archive), "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sha256" in err and "refusing" in err
    assert not worklist_file(archive).exists()  # no study was touched, not even listed
    assert not (archive / "ctscreen").exists()


def test_the_summary_for_the_night_shift(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, config = prepare(source, tmp_path)
    capsys.readouterr()
    assert main(["run", "--archive", str(archive), "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "3 studies found, 3 screened now, 0 already done" in text
    assert "not analysed because slice-too-thick:5.0mm: 1" in text
    assert "1 studies were not analysed: they are on the worklist as NOT ANALYSED" in text
    assert "state of the studies found: delivered 2, not-analysed 1" in text
    assert "time per stage" in text
    last = json.loads(worklist_file(archive).with_name(
        worklist_file(archive).name + ".last-run.json").read_text())
    assert last["by_state"] == {"delivered": 2, "not-analysed": 1}
    assert set(last["stage_seconds"]) >= {"read", "volume", "lungs", "lesions", "report",
                                          "writeback"}
    assert last["duration_s"] > 0


def test_state_in_postgresql_with_two_runs_at_once(source: Path, tmp_path: Path) -> None:
    with postgres_server(free_port()) as url:
        archive, _ = prepare(source, tmp_path)
        config = _site(tmp_path, {"batch": {"state_url": url}})
        runs = [start(archive, config) for _ in range(2)]
        summaries = [finish(p) for p in runs]
        assert sum(s["screened"] for s in summaries) == 3
        import psycopg

        with psycopg.connect(url) as c:
            rows = dict(c.execute("SELECT study_uid, state FROM study_state").fetchall())
        assert sorted(rows.values()) == ["delivered", "delivered", "not-analysed"]
        # the SQLite file beside the worklist holds no state: it lives in PostgreSQL
        with sqlite3.connect(worklist_file(archive)) as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
        assert "study_state" not in tables
        again = finish(start(archive, config))
        assert again["skipped_unchanged"] == 3
        assert again["by_state"] == {"delivered": 2, "not-analysed": 1}
