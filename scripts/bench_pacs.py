"""Query, retrieval and store timings per door (C-GET, C-MOVE, WADO-RS) and stored transfer
syntax (uncompressed, JPEG-LS, JPEG 2000 lossless) on LIDC-IDRI-0314 (275 slices), against a
throw-away Orthanc on loopback (tests/orthanc.py).

    .venv/bin/python scripts/bench_pacs.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SHARED_DATA  # noqa: E402
from orthanc import PASSWORD, PASSWORD_ENV, Orthanc, free_port  # noqa: E402

from pipeline.archive import open_archive  # noqa: E402
from pipeline.config import ArchiveConfig, SelectionConfig  # noqa: E402
from pipeline.ingest import find_studies  # noqa: E402
from pipeline.selection import select_series  # noqa: E402


def encoded(files: list[Path], syntax: UID) -> list[bytes]:
    if syntax == ExplicitVRLittleEndian:
        return [f.read_bytes() for f in files]
    out = []
    t0 = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(syntax, generate_instance_uid=False)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    mib = sum(map(len, out)) / 2**20
    print(f"  encoded as {syntax.name} in {time.perf_counter() - t0:.1f} s: {mib:.0f} MiB")
    return out


def main() -> None:
    files = sorted((SHARED_DATA / "chest-ct" / "lidc-idri-0314").glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    root = Path(tempfile.mkdtemp(prefix="ctscreen-bench-"))
    move_port = free_port()
    orthanc = Orthanc(root, {"ctscreen": ("CTSCREEN", move_port)})
    orthanc.start()
    os.environ[PASSWORD_ENV] = PASSWORD
    base: dict[str, Any] = {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": "ORTHANC",
            "calling_ae": "CTSCREEN", "timeout_s": 60.0}
    doors = {
        "C-GET": ArchiveConfig(kind="dimse", retrieve="c-get", **base),
        "C-MOVE": ArchiveConfig(
            kind="dimse", retrieve="c-move", move_port=move_port, **base
        ),
        "WADO-RS": ArchiveConfig(kind="dicomweb", url=orthanc.dicomweb_url, username="ctscreen",
                                 password_env=PASSWORD_ENV, timeout_s=120.0),
    }
    try:
        for syntax in (ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless):
            data = encoded(files, syntax)
            t0 = time.perf_counter()
            orthanc.upload(data)
            print(f"{syntax.name}: uploaded in {time.perf_counter() - t0:.1f} s")
            for door, cfg in doors.items():
                archive = open_archive(door, cfg)
                t0 = time.perf_counter()
                (study,) = find_studies(archive)
                query_s = time.perf_counter() - t0
                chosen = select_series(study, SelectionConfig()).chosen
                assert chosen is not None
                locators = [h.locator for h in chosen.instances]
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    datasets = archive.load(locators)
                    times.append(time.perf_counter() - t0)
                got = {str(d.file_meta.TransferSyntaxUID) for d in datasets}
                print(f"  {door:8s} query {query_s:.2f} s, retrieve {len(datasets)} in "
                      f"{min(times):.2f}-{max(times):.2f} s, received as {got}")
            if syntax == ExplicitVRLittleEndian:
                for door in ("C-GET", "WADO-RS"):
                    archive = open_archive(door, doors[door])
                    ds = pydicom.dcmread(files[0])
                    store, confirm = [], []
                    for _ in range(10):
                        t0 = time.perf_counter()
                        archive.store(ds)
                        store.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        assert archive.contains(study_uid, str(ds.SOPInstanceUID))
                        confirm.append(time.perf_counter() - t0)
                    print(f"  store by {'C-STORE' if door == 'C-GET' else 'STOW-RS'}: "
                          f"{statistics.median(store) * 1000:.0f} ms per 512 KiB instance, "
                          f"confirming query {statistics.median(confirm) * 1000:.0f} ms")
            orthanc.delete_study(study_uid)
    finally:
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
