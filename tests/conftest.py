"""Shared fixtures.  Real public CT lives in ../shared/data (CTSCREEN_SHARED_DATA overrides);
tests that need it skip with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("CTSCREEN_SHARED_DATA", str(REPO.parent / "shared" / "data"))
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (set CTSCREEN_SHARED_DATA)")
    return SHARED_DATA
