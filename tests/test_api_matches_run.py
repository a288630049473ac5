"""``pipeline.screen(folder)`` gives what ``ctscreen run`` writes for the same series: the
same figures and the same result objects.  The objects' UIDs derive from a content identity
that hashes the lung and lesion label volumes themselves (pipeline/report/uids.py), so equal
UIDs mean equal masks; the SEG written by the run is also read back and compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

import pipeline
from pipeline.cli import main
from pipeline.worklist import Worklist


@pytest.mark.slow
@pytest.mark.shared_data
def test_screen_gives_what_ctscreen_run_writes(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "chest-ct" / "lidc-idri-0314"
    archive = tmp_path / "archive" / "lidc"
    archive.mkdir(parents=True)
    for f in sorted(src.glob("*.dcm")):  # the run writes its results into its archive
        (archive / f.name).symlink_to(f)
    assert any(archive.iterdir())
    s = pipeline.screen(archive)
    assert s.analysed
    wl = tmp_path / "wl.sqlite"
    assert main(["run", "--archive", str(archive.parent), "--worklist", str(wl)]) == 0
    with Worklist(wl) as w:
        (row,) = w.rows()
        outputs = w.outputs(row.study_uid)
    r = s.result
    assert row.status == r.status.value and row.pattern == r.pattern.value
    assert row.involved_pct == pytest.approx(r.involved_pct, abs=1e-9)
    assert row.suspicion == pytest.approx(r.suspicion, abs=1e-9)
    assert (row.severity_score, row.n_findings) == (r.severity_score, r.n_findings)
    assert sorted(o.sop_instance_uid for o in outputs) == sorted(
        str(ds.SOPInstanceUID) for _, ds in s.datasets)
    # the SEG the run wrote holds the masks screen() returned
    seg_ref = next(o for o in outputs if o.kind == "seg")
    written = next(p for p in archive.parent.rglob("*.dcm")
                   if not p.is_symlink()
                   and pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                   == seg_ref.sop_instance_uid)
    seg = pydicom.dcmread(written)
    mine = next(ds for kind, ds in s.datasets if kind == "seg")
    assert np.array_equal(seg.pixel_array, mine.pixel_array)
