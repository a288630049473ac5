"""ctscreen: overnight chest CT screening for suspected COVID-19 pneumonia.

The Python API (``pipeline/api.py``)::

    import pipeline
    s = pipeline.screen("path/to/one/study/")   # a folder, a list of datasets or a Volume
    print(s.result.status, s.result.involved_pct, s.analysis.pattern)
    s.save("results/")                          # SEG, SR, key images, Key Object Selection

also ``segment_lungs``, ``detect_lesions`` and ``run_batch``.  The data flow is the package
layout; read ``pipeline/run.py`` first.
"""

from typing import Any


def _version() -> str:
    """The version in pyproject.toml, the one source: the installed package's metadata,
    else (a source tree run without installing) pyproject.toml itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctscreen")
    except PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


__version__ = _version()
ALGORITHM_NAME = "ctscreen"

__all__ = ["ALGORITHM_NAME", "Screening", "__version__", "detect_lesions", "run_batch",
           "screen", "segment_lungs"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (``import pipeline`` stays light)."""
    if name in ("Screening", "detect_lesions", "run_batch", "screen", "segment_lungs"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
