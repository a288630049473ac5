"""Deleting superseded results from an Orthanc through its REST API.

DICOM defines no delete for DIMSE or DICOMweb; Orthanc's REST API has one
(``POST /tools/lookup`` finds the instance by SOP Instance UID, ``DELETE /instances/{id}``
removes it).  An archive entry opts in with ``delete: orthanc-rest`` and ``rest_url``.
"""

from __future__ import annotations

import requests

from ..artefacts import OutputRef
from ..config import ArchiveConfig
from ..errors import ArchiveError, ArchiveUnavailable


class OrthancRestDelete:
    """``remove(ref)`` for an archive that is an Orthanc."""

    def __init__(self, name: str, config: ArchiveConfig) -> None:
        from .dicomweb import secret_from_env
        from .http import archive_session

        self._name = name
        self._url = config.rest_url.rstrip("/")
        self._timeout = config.timeout_s
        self._session = archive_session(config, self._url)
        if config.username:
            self._session.auth = (config.username, secret_from_env(config.password_env))

    def __call__(self, ref: OutputRef) -> None:
        """Delete the instance ``ref`` names; one that is already gone is fine."""
        found = self._request("post", "/tools/lookup", ref.sop_instance_uid)
        ids = [m["ID"] for m in found.json() if m.get("Type") == "Instance"]
        for orthanc_id in ids:
            self._request("delete", f"/instances/{orthanc_id}")

    def _request(self, method: str, path: str, data: str | None = None) -> requests.Response:
        try:
            r = self._session.request(method, self._url + path, data=data,
                                      timeout=self._timeout)
        except requests.exceptions.RequestException as e:
            raise ArchiveUnavailable(f"{self._name}: Orthanc REST {method.upper()} {path} "
                                     f"failed: {type(e).__name__}") from e
        if r.status_code == 404 and method == "delete":
            return r  # deleted meanwhile
        if r.status_code != 200:
            raise ArchiveError(f"{self._name}: expected HTTP 200 from Orthanc REST "
                               f"{method.upper()} {path}, got {r.status_code}")
        return r
