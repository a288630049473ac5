"""Build a demo folder archive: two synthetic chest phantoms (one with lesions, one without)
and, where ``../shared/data`` is present, the real LIDC-IDRI-0314 series."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .phantom.dicom import derive_uid, write_ct_series
from .phantom.model import PhantomSpec, make_grid, render

log = logging.getLogger(__name__)

# 200 slices of 1.5 mm (300 mm, apex to bases) of 256 x 256 pixels of 1.4 mm.
DEMO_SHAPE = (200, 256, 256)
DEMO_SPACING = (1.5, 1.4, 1.4)


def default_shared_data() -> Path:
    env = os.environ.get("CTSCREEN_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def write_phantom_study(
    folder: Path, *, seed: int, with_lesions: bool, accession: str, orientation: str = "axial"
) -> str:
    """Render a phantom chest and write it as one CT series; returns its StudyInstanceUID."""
    spec = PhantomSpec(seed=seed) if with_lesions else PhantomSpec(seed=seed, lesions=())
    affine = make_grid(DEMO_SHAPE, DEMO_SPACING, orientation)  # type: ignore[arg-type]
    ct, _truth = render(spec, affine, DEMO_SHAPE, slice_thickness_mm=DEMO_SPACING[0])
    study_uid = derive_uid(seed, "demo-study")
    write_ct_series(
        ct,
        folder,
        study_uid=study_uid,
        series_uid=derive_uid(seed, "demo-series"),
        accession_number=accession,
        patient_id=f"DEMO-{seed:03d}",
        patient_name=f"Demo^Phantom{seed}",
        slice_thickness=DEMO_SPACING[0],
        seed=seed,
    )
    return study_uid


def build_demo_archive(
    root: Path, shared_data: str | Path | None = None, phantom_only: bool = False
) -> Path:
    """Create ``root/archive`` (replacing an earlier demo) and return its path."""
    archive = root / "archive"
    if archive.exists():
        shutil.rmtree(archive)
    wl = root / "archive.ctscreen.sqlite"
    for p in (wl, wl.with_name(wl.name + "-wal"), wl.with_name(wl.name + "-shm")):
        p.unlink(missing_ok=True)
    archive.mkdir(parents=True)
    log.info("writing the phantom with lesions")
    write_phantom_study(archive / "phantom-covid", seed=1, with_lesions=True, accession="DEMO1")
    log.info("writing the lesion-free phantom")
    write_phantom_study(archive / "phantom-clear", seed=2, with_lesions=False, accession="DEMO2")
    if not phantom_only:
        lidc = Path(shared_data or default_shared_data()) / "chest-ct" / "lidc-idri-0314"
        if lidc.is_dir():
            log.info("copying the real series %s", lidc)
            shutil.copytree(lidc, archive / "lidc-idri-0314")
        else:
            log.info("no real series at %s; the demo uses phantoms only", lidc)
    return archive
