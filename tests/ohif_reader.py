"""What OHIF v3 makes of an SR: runs OHIF's released DICOM SR extension in Node
(``tests/ohif/load_sr.mjs``) on an SR and the CT instances it references.

``read_with_ohif`` returns the harness's JSON object: ``loaded`` (whether the SR display set's
``load()`` succeeded, as when the SR is opened in a viewport), ``error``, ``isRehydratable``,
``measurements`` (one per tracking UID, with the ``textLines`` the SR viewport draws and
whether coordinates were matched to a CT image), ``annotations``, ``hydration`` and the
console messages (``skipped_messages`` are OHIF's warnings).  See load_sr.mjs.

The harness needs Node.js 20.19 or newer (it loads ES modules with ``require``) and the npm
packages of ``tests/ohif`` (``npm ci --prefix tests/ohif``; ``scripts/setup.sh --test`` does
both).  Where either is missing the tests that need it skip with a reason, except in CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

OHIF_DIR = Path(__file__).resolve().parent / "ohif"
SCRIPT = OHIF_DIR / "load_sr.mjs"
EXTENSION = OHIF_DIR / "node_modules" / "@ohif" / "extension-cornerstone-dicom-sr"
MIN_NODE = (20, 19)
TIMEOUT_S = 60.0  # a run takes 3-4 s here, 275 CT slices included


def _node_version(node: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        return tuple(int(x) for x in out.strip().lstrip("v").split(".")[:2])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def require_ohif() -> None:
    """Skip (or fail in CI) where Node.js or the harness's npm packages are not installed."""
    node = shutil.which("node")
    msg = None
    if node is None:
        msg = "Node.js is not installed (apt: nodejs npm)"
    elif (version := _node_version(node)) is None or version < MIN_NODE:
        found = ".".join(map(str, version)) if version else "unknown"
        msg = f"Node.js {MIN_NODE[0]}.{MIN_NODE[1]} or newer is needed (found {found})"
    elif not (EXTENSION / "package.json").exists():
        msg = (
            "the OHIF harness packages are not installed "
            "(npm ci --prefix tests/ohif; scripts/setup.sh --test does it)"
        )
    if msg:
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def read_with_ohif(sr_path: Path, ct_dir: Path, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """OHIF's reading of the SR at ``sr_path`` with the CT files under ``ct_dir``.

    Raises RuntimeError where the harness itself fails (not where OHIF fails to load the
    SR: that is ``loaded`` false in the result).
    """
    node = shutil.which("node") or "node"
    cmd = [node, str(SCRIPT), str(sr_path), str(ct_dir)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=OHIF_DIR, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"load_sr.mjs did not finish in {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"load_sr.mjs exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"load_sr.mjs printed no JSON object: {proc.stdout[:500]!r}") from e
    if not isinstance(result, dict):
        raise RuntimeError(f"load_sr.mjs printed {type(result).__name__}, not an object")
    return result


def check_ohif_reading(sr_path: Path, ct_dir: Path, lesions: dict[str, tuple[float, str]]
                       ) -> dict[str, Any]:
    """Assert what a site needs of OHIF on one of our SRs: it loads; every measurement group
    (one per tracking UID: the study, two lungs, two lesion kinds, each lesion, six zones)
    has coordinates and is placed on an image of the CT display set; each lesion (``lesions``:
    tracking text -> (volume in ml, "Right" or "Left")) is drawn as its outline with its
    volume as label and its lung named; the study's severity and score are shown.  Returns
    OHIF's reading."""
    got = read_with_ohif(sr_path, ct_dir)
    assert got["loaded"] and got["error"] is None, got["error"]
    ms = {m["trackingIdentifier"]: m for m in got["measurements"]}
    assert len(ms) == 1 + 2 + 2 + len(lesions) + 6, sorted(ms)
    for name, m in ms.items():
        assert m["hasCoordinates"] and m["loaded"] and m["matchedCTDisplaySet"], (name, m)
    for name, (ml, side) in lesions.items():
        m = ms[name]
        assert m["graphicType"] == "POLYLINE", m
        assert m["label"] == f"{ml:.2f} ml", m
        assert f"Volume: {ml:.2f} ml" in m["textLines"], m
        assert any(line.endswith(f"{side} lung") for line in m["textLines"]), m
    study = ms["study assessment"]["textLines"]
    assert any(line.startswith("Triage suspicion score") for line in study), study
    assert any(line.startswith("Severity") for line in study), study
    return got
