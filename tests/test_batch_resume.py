"""A nightly batch never loses, duplicates or invents a result: ``ctscreen run`` as a real
process, killed with SIGKILL at every state boundary and at 20 random points, restarted
each time; and several runs at once on one archive.  Each time the final archive and
worklist must equal those of an uninterrupted run.

More random kills on demand (a soak; any seed):
    CTSCREEN_RANDOM_KILLS=200 CTSCREEN_KILL_SEED=7 .venv/bin/pytest tests/test_batch_resume.py
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from batch_kit import (
    N_STUDIES,
    check_final,
    finish,
    kill_hard,
    leftover_processes,
    new_mark,
    prepare,
    snapshot,
    start,
    states,
    worklist_file,
    write_batch,
)

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

# Random kill points: seeded, so a failure can be replayed.  Every boundary is killed at
# by test_killed_at_every_state_boundary; the random points add the moments between them.
SEED = int(os.environ.get("CTSCREEN_KILL_SEED", "20201127"))
RANDOM_KILLS = int(os.environ.get("CTSCREEN_RANDOM_KILLS", "20"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_batch(tmp_path_factory.mktemp("batch-source") / "archive")


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run."""
    archive, config = prepare(source, tmp_path_factory.mktemp("batch-reference"))
    summary = finish(start(archive, config))
    assert summary["studies_found"] == N_STUDIES
    assert summary["by_status"] == {"analysed": N_STUDIES - 1, "not-analysed": 1}
    assert summary["reasons"] == {"slice-too-thick:5.0mm": 1}
    snap = snapshot(archive)
    assert len(snap["results"]) == summary["outputs_written"] >= 3 * (N_STUDIES - 1)
    # a second run finds everything done and changes nothing
    again = finish(start(archive, config))
    assert again["skipped_unchanged"] == N_STUDIES and again["screened"] == 0
    assert snapshot(archive) == snap
    return snap


# Every boundary of the machine, in the order a study meets them; "before" is after the
# work a transition announces and before its commit.
BOUNDARIES = [
    "after:discovered:2",
    "after:retrieved:1",
    "after:analysed:1",
    "before:written:1",
    "after:written:1",
    "before:delivered:1",
    "after:delivered:1",
    "before:not-analysed:1",
    "after:not-analysed:1",
]


def test_killed_at_every_state_boundary(
    source: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    archive, config = prepare(source, tmp_path)
    mark = new_mark()
    for fault in BOUNDARIES:
        p = start(archive, config, fault=fault, mark=mark)
        p.communicate(timeout=300)
        assert p.returncode == -9, f"the fault {fault} did not fire (exit {p.returncode})"
        assert leftover_processes(mark) == []
    finish(start(archive, config, mark=mark))
    check_final(archive, reference)


def test_killed_at_random_points(source: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL to the run alone (its worker must die with it), at random times: one kill in
    five from the process start (start-up, query, discovery), the others from the moment
    the run holds its first study (so that a slow machine still kills inside studies).
    When a batch completes, it is checked and a fresh copy is started, until RANDOM_KILLS
    kills; one in five at least must land inside a study."""
    rng = random.Random(SEED)
    kills = rounds = 0
    mid_study = 0  # kills that found a study between claim and its end state
    mark = new_mark()
    while kills < RANDOM_KILLS:
        rounds += 1
        archive, config = prepare(source, tmp_path / f"round{rounds}")
        while kills < RANDOM_KILLS:
            p = start(archive, config, mark=mark)
            if kills % 5 == 0 or _wait_for_a_claim(archive, p):
                delay = rng.uniform(0.2, 3.0)
            else:
                delay = 0.0  # it finished before claiming anything
            try:
                p.wait(timeout=delay or None)
            except subprocess.TimeoutExpired:
                kill_hard(p)
                kills += 1
                now = states(archive).values()
                mid_study += any(s in ("retrieved", "analysed", "written") for s in now)
                continue
            p.communicate()
            assert p.returncode == 0
            break  # the batch completed between kills
        finish(start(archive, config, mark=mark))
        check_final(archive, reference)
    assert leftover_processes(mark) == []
    assert mid_study >= RANDOM_KILLS // 5, "too few kills landed inside a study"


def _wait_for_a_claim(archive: Path, p: subprocess.Popen[str]) -> bool:
    """Until the run ``p`` holds a study (True) or has exited (False)."""
    db = worklist_file(archive)
    while p.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    owners = [r[0] for r in c.execute("SELECT owner FROM study_state")]
            except sqlite3.OperationalError:  # the table is not made yet
                owners = []
            if any(f":{p.pid}:" in o for o in owners):
                return True
        time.sleep(0.05)
    return False


def test_concurrent_runs_screen_each_study_once(
    source: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    archive, config = prepare(source, tmp_path)
    runs = [start(archive, config) for _ in range(3)]
    summaries = [finish(p) for p in runs]
    assert sum(s["screened"] for s in summaries) == N_STUDIES
    assert all(s["lease_lost"] == 0 for s in summaries)
    assert sum(1 for s in summaries if s["screened"]) >= 2, "the runs did not overlap"
    check_final(archive, reference)


def test_a_dead_holders_lease_is_taken_over_at_once(
    source: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    """A run killed while it holds a study (and its lease is far from expiring) does not
    block the next run."""
    archive, config = prepare(source, tmp_path)
    p = start(archive, config, fault="after:retrieved:1")
    p.communicate(timeout=300)
    assert p.returncode == -9
    held = [uid for uid, st in states(archive).items() if st == "retrieved"]
    assert len(held) == 1
    t0 = time.monotonic()
    summary = finish(start(archive, config))
    assert summary["screened"] == N_STUDIES
    assert time.monotonic() - t0 < 200  # not the 300 s lease
    check_final(archive, reference)


def test_workers_die_with_the_run(source: Path, tmp_path: Path) -> None:
    archive, config = prepare(source, tmp_path)
    mark = new_mark()
    p = start(archive, config, "--workers", "2", mark=mark)
    deadline = time.monotonic() + 120
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and len(children) < 2:
        children = psutil.Process(p.pid).children()
        time.sleep(0.1)
    assert len(children) >= 2
    kill_hard(p)
    assert leftover_processes(mark) == []
