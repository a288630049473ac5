"""A real Orthanc on loopback for the tests: its own configuration folder, free ports,
authentication on, the DICOMweb and GDCM plugins, storage under a temporary folder.

Orthanc 1.10.1 has no bind-address option (it listens on every interface), so the tests
only ever talk to 127.0.0.1.  Where Orthanc is not installed the tests that need it skip
with a reason, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")
AET = "ORTHANC"
USER = "ctscreen"
PASSWORD = "orthanc-test-secret"  # a throw-away test credential, passed to ctscreen by env var
PASSWORD_ENV = "CTSCREEN_TEST_ORTHANC_PASSWORD"


def free_port() -> int:
    """A TCP port that nothing listens on right now (picked by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_orthanc() -> None:
    """Skip (or fail in CI) where Orthanc and its DICOMweb plugin are not installed."""
    missing = [
        p
        for p in (ORTHANC, str(PLUGINS / "libOrthancDicomWeb.so"))
        if not Path(p).exists()
    ]
    if missing:
        msg = (
            f"Orthanc is not installed (missing {', '.join(missing)}; "
            "apt: orthanc orthanc-dicomweb)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def require_dcmtk() -> None:
    if shutil.which("storescu") is None or shutil.which("findscu") is None:
        msg = "dcmtk (storescu, findscu) is not installed (apt: dcmtk)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class Orthanc:
    """One Orthanc process with its own configuration and storage under ``root``.

    ``modalities`` maps a name to (AE title, port) of peers on 127.0.0.1 that may query
    and retrieve (and be C-MOVE destinations).
    """

    def __init__(self, root: Path, modalities: dict[str, tuple[str, int]],
                 extra: dict[str, Any] | None = None) -> None:
        self.root = root
        self.extra = dict(extra or {})  # more settings (e.g. DICOM TLS, HTTPS)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = root / "orthanc.log"
        self.session = requests.Session()
        self.session.auth = (USER, PASSWORD)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        cfg_dir = self.root / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        plugins = [str(PLUGINS / "libOrthancDicomWeb.so")]
        if (PLUGINS / "libOrthancGdcm.so").exists():
            plugins.append(str(PLUGINS / "libOrthancGdcm.so"))
        config: dict[str, Any] = {
            "Name": "ctscreen-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomAet": AET,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomModalities": {
                name: [aet, "127.0.0.1", port] for name, (aet, port) in self.modalities.items()
            },
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "DicomScpTimeout": 30,
            "StableAge": 2,
        }
        config.update(self.extra)
        (cfg_dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        return cfg_dir

    def start(self) -> None:
        cfg_dir = self.write_config()
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            [ORTHANC, str(cfg_dir), f"--logfile={self.logfile}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.logfile}"
                )
            try:
                if self.session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    if _port_open(self.dicom_port):
                        return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not become ready in 30 s; see {self.logfile}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    # ------------------------------------------------------------ REST helpers for tests

    def upload(self, files: Iterable[Path | bytes]) -> list[str]:
        """POST each file to /instances; returns the Orthanc instance ids."""
        ids = []
        for f in files:
            data = f if isinstance(f, bytes) else Path(f).read_bytes()
            r = self.session.post(f"{self.url}/instances", data=data, timeout=60)
            r.raise_for_status()
            ids.append(str(r.json()["ID"]))
        return ids

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        r = self.session.post(
            f"{self.url}/tools/find",
            json={"Level": level, "Query": query, "Expand": True},
            timeout=60,
        )
        r.raise_for_status()
        return list(r.json())

    def series_by_class(self, study_uid: str) -> dict[str, list[int]]:
        """SOP Class UID -> the instance count of each series of the study holding it."""
        out: dict[str, list[int]] = {}
        for st in self.find("Study", {"StudyInstanceUID": study_uid}):
            r = self.session.get(f"{self.url}/studies/{st['ID']}/series", timeout=60)
            r.raise_for_status()
            for se in r.json():
                instances = se["Instances"]
                out.setdefault(self.sop_class(instances[0]), []).append(len(instances))
        return out

    def delete_results(self, study_uid: str, keep_modality: str = "CT") -> None:
        """Delete every series of the study except those of ``keep_modality`` (the source)."""
        for st in self.find("Study", {"StudyInstanceUID": study_uid}):
            r = self.session.get(f"{self.url}/studies/{st['ID']}/series", timeout=60)
            r.raise_for_status()
            for se in r.json():
                if self.sop_class(se["Instances"][0]) != "1.2.840.10008.5.1.4.1.1.2":
                    self.session.delete(
                        f"{self.url}/series/{se['ID']}", timeout=60
                    ).raise_for_status()

    def sop_class(self, instance_id: str) -> str:
        r = self.session.get(
            f"{self.url}/instances/{instance_id}/metadata/SopClassUid", timeout=30
        )
        r.raise_for_status()
        return r.text

    def transfer_syntax(self, instance_id: str) -> str:
        r = self.session.get(
            f"{self.url}/instances/{instance_id}/metadata/TransferSyntax", timeout=30
        )
        r.raise_for_status()
        return r.text

    def delete_study(self, study_uid: str) -> None:
        for s in self.find("Study", {"StudyInstanceUID": study_uid}):
            self.session.delete(f"{self.url}/studies/{s['ID']}", timeout=60).raise_for_status()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
