"""One version: pyproject.toml's, which ``pipeline.__version__`` (and ``ctscreen --version``,
and the algorithm version the results carry) read from the package metadata."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

import pipeline
from pipeline.cli import main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_version() -> str:
    return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])


def test_the_package_version_is_pyprojects() -> None:
    # unequal after a version bump until the package is installed again: scripts/setup.sh
    assert pipeline.__version__ == pyproject_version(), "run scripts/setup.sh to reinstall"
    assert importlib.metadata.version("ctscreen") == pyproject_version()


def test_the_command_says_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ctscreen {pyproject_version()}"


def test_without_metadata_pyproject_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert pipeline._version() == pyproject_version()
