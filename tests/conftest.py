"""Shared fixtures.  Real public CT lives in ../shared/data (CTSCREEN_SHARED_DATA overrides);
tests that need it skip with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
