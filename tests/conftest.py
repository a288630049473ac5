"""Shared fixtures.  Real public CT lives in ../shared/data (CTSCREEN_SHARED_DATA overrides);
tests that need it skip with a reason where it is absent."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc import AET, PASSWORD, PASSWORD_ENV, USER, Orthanc, free_port, require_orthanc

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSCREEN_SHARED_DATA", str(REPO.parent / "shared" / "data")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (set CTSCREEN_SHARED_DATA)")
    return SHARED_DATA


def dciodvfy_lines(path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for one file.

    dciodvfy exits 0 even when it reports errors, so its text is read.  Where dicom3tools
    is missing the test is skipped, except in CI (CI=true), where that is a failure.
    """
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is missing in CI")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(("Error", "Warn"))]


# ---------------------------------------------------------------- a real PACS (Orthanc)

OUR_AE = "CTSCREEN"  # ctscreen's AE title, registered in the test Orthanc
FINDSCU_AE = "FINDSCU"  # dcmtk's findscu, registered too (Orthanc answers known AEs only)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc on loopback for the session (authentication on, DICOMweb, own storage).
    Skips where Orthanc is not installed, except in CI, where that fails."""
    require_orthanc()
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        {"ctscreen": (OUR_AE, free_port()), "findscu": (FINDSCU_AE, free_port())},
    )
    server.start()
    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        yield server
    finally:
        server.stop()


def site_config(orthanc: Orthanc, folder: Path, **listen: object) -> Path:
    """A site file naming the test Orthanc four ways (C-GET, C-MOVE, C-GET with superseded
    results deleted by REST, DICOMweb)."""
    move_port = orthanc.modalities["ctscreen"][1]
    text = f"""
archives:
  pacs: &pacs
    kind: dimse
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    called_ae: {AET}
    calling_ae: {OUR_AE}
    retrieve: c-get
    timeout_s: 10
  pacs-move:
    kind: dimse
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    called_ae: {AET}
    calling_ae: {OUR_AE}
    retrieve: c-move
    move_port: {move_port}
    timeout_s: 10
  pacs-clean:  # C-GET, and superseded results deleted through Orthanc's REST API
    <<: *pacs
    delete: orthanc-rest
    rest_url: {orthanc.url}
    username: {USER}
    password_env: {PASSWORD_ENV}
  pacs-web:
    kind: dicomweb
    url: {orthanc.dicomweb_url}
    username: {USER}
    password_env: {PASSWORD_ENV}
    timeout_s: 30
outbox: {{backoff_initial_s: 0.0, backoff_max_s: 0.0}}
"""
    if listen:
        items = ", ".join(f"{k}: {json.dumps(v)}" for k, v in listen.items())
        text += f"listen: {{{items}}}\n"
    path = folder / "site.yaml"
    path.write_text(text)
    return path
