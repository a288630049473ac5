"""A small nightly batch for the resumability and concurrency tests: ten studies, and the
means to run ``ctscreen run`` as a real process, kill it, and compare what it left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.dataset import Dataset

from pipeline.phantom.dicom import derive_uid, write_ct_series
from pipeline.phantom.model import PhantomSpec, make_grid, render
from pipeline.worklist import Worklist

# Small phantoms (80 slices of 3.75 mm, 112 x 112 pixels of 3.2 mm) screen in about a
# second each; the site config admits their slice thickness.
SHAPE = (80, 112, 112)
SPACING = (3.75, 3.2, 3.2)
# The batch's state machine, kills and limits are tested with the classical lung segmenter
# (no weights, one method instead of a model plus its cross-check), whatever the default: what
# is tested here is the batch (the memory-limit test also runs the learned lungs).
SITE_CONFIG = ("selection: {max_slice_thickness_mm: 4.0}\nbatch: {disk_reserve_mb: 0}\n"
               "lungs: {method: classical}\n")
N_STUDIES = 10
CTSCREEN = [sys.executable, "-m", "pipeline.cli"]


def write_batch(root: Path, n: int = N_STUDIES) -> Path:
    """``n - 1`` phantom studies (every other one with lesions) and one that selection
    refuses (5 mm slices): every end state of the machine occurs."""
    for i in range(n):
        seed = 300 + i
        thick = i == n - 1
        spacing = (5.0, *SPACING[1:]) if thick else SPACING
        shape = (60, *SHAPE[1:]) if thick else SHAPE
        spec = PhantomSpec(seed=seed) if i % 2 == 0 else PhantomSpec(seed=seed, lesions=())
        ct, _ = render(spec, make_grid(shape, spacing, "axial"), shape,
                       slice_thickness_mm=spacing[0])
        write_ct_series(
            ct, root / f"study{i}", study_uid=derive_uid(seed, "batch-study"),
            series_uid=derive_uid(seed, "batch-series"), accession_number=f"B{i:02d}",
            slice_thickness=spacing[0], seed=seed,
        )
    return root


def prepare(source: Path, where: Path) -> tuple[Path, Path]:
    """A fresh copy of the batch's archive and the site config beside it."""
    where.mkdir(parents=True, exist_ok=True)
    archive = where / "archive"
    shutil.copytree(source, archive)
    config = where / "site.yaml"
    config.write_text(SITE_CONFIG)
    return archive, config


def start(
    archive: Path, config: Path, *extra: str, fault: str = "", mark: str = ""
) -> subprocess.Popen[str]:
    """``ctscreen run`` in a session of its own (so the fault injection's process-group
    kill stays inside it)."""
    env = dict(os.environ)
    env.pop("CTSCREEN_FAULT_KILL", None)
    if fault:
        env["CTSCREEN_FAULT_KILL"] = fault
    env["CTSCREEN_TEST_MARK"] = mark or "batch-kit"
    log = open(archive.parent / "runs.log", "a")
    return subprocess.Popen(
        [*CTSCREEN, "run", "--archive", str(archive), "--config", str(config), "--json", *extra],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def kill_hard(p: subprocess.Popen[str]) -> None:
    """SIGKILL the run alone (its workers must go by themselves)."""
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate(timeout=60)


def finish(p: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"ctscreen run exited {p.returncode}"
    summary: dict[str, Any] = json.loads(out)
    return summary


def leftover_processes(mark: str, wait_s: float = 10.0) -> list[int]:
    """Processes still alive that a run with ``mark`` started (its workers included)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("CTSCREEN_TEST_MARK") == mark and proc.status() != "zombie":
                    alive.append(proc.pid)
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def new_mark() -> str:
    return uuid.uuid4().hex


def _digest(ds: Dataset) -> str:
    """A digest of a dataset without its dates and times (the only things that may differ
    between two runs on the same input)."""
    h = hashlib.sha256()
    stack = [ds]
    while stack:
        d = stack.pop()
        for elem in d:
            if elem.VR in ("DA", "DT", "TM"):
                continue
            if elem.VR == "SQ":
                h.update(f"{elem.tag}:SQ{len(elem.value)}".encode())
                stack.extend(elem.value)
            elif isinstance(elem.value, bytes):
                h.update(f"{elem.tag}:".encode() + hashlib.sha256(elem.value).digest())
            else:
                h.update(f"{elem.tag}:{elem.value!r}".encode())
    return h.hexdigest()


def snapshot(archive: Path) -> dict[str, Any]:
    """What a run leaves that anyone sees: the result files (by name, with a digest) and
    the worklist (without its timestamps)."""
    results = {}
    sops: list[str] = []
    for p in sorted((archive / "ctscreen").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p)
            sops.append(str(ds.SOPInstanceUID))
            results[str(p.relative_to(archive))] = _digest(ds)
    assert len(sops) == len(set(sops)), "duplicated SOP Instance UIDs in the archive"
    with Worklist(worklist_file(archive)) as wl:
        rows = [r.as_json() for r in wl.rows()]
    for r in rows:
        r.pop("updated_at")
    return {"results": results, "worklist": rows}


def worklist_file(archive: Path) -> Path:
    return archive.parent / f"{archive.name}.ctscreen.sqlite"


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as c:
        return str(c.execute("PRAGMA integrity_check").fetchone()[0])


def states(archive: Path) -> dict[str, str]:
    """Study UID -> state; empty where the run died before it made the table."""
    if not worklist_file(archive).exists():
        return {}
    with sqlite3.connect(worklist_file(archive)) as c:
        try:
            return dict(c.execute("SELECT study_uid, state FROM study_state").fetchall())
        except sqlite3.OperationalError:
            return {}


def temporaries(where: Path) -> list[Path]:
    return sorted(where.rglob(".ctscreen-tmp*"))


def check_final(archive: Path, reference: dict[str, Any]) -> None:
    check_final_equal(archive, reference, N_STUDIES)


def check_final_equal(archive: Path, reference: dict[str, Any], n_studies: int) -> None:
    """The archive and worklist equal the uninterrupted run's; nothing half done remains."""
    assert snapshot(archive) == reference
    wl = worklist_file(archive)
    assert integrity(wl) == "ok"
    assert integrity(archive.parent / f"{wl.name}.outbox" / "outbox.sqlite") == "ok"
    assert temporaries(archive.parent) == []
    end = states(archive)
    assert len(end) == n_studies
    assert sorted(end.values()) == ["delivered"] * (n_studies - 1) + ["not-analysed"]
