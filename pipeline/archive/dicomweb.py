"""A PACS through the DICOMweb door (dicomweb-client): QIDO-RS, WADO-RS, STOW-RS.

Queries: QIDO-RS studies of the query window with CT in ModalitiesInStudy, then QIDO-RS
series of each study (Modality, number of instances), then WADO-RS *series metadata* of
the CT series only: the full header of every instance without pixel data, in one request
per series, so selection judges the same attributes as on files.  (An instance-level QIDO
with ``includefield`` would also do, but servers differ in which attributes they return
there; metadata is complete by definition.)

Retrieval: WADO-RS of the chosen series asking for ``transfer-syntax=*``, so the archive
sends each instance as stored (JPEG-LS, JPEG 2000, ...) without transcoding.  Storage:
STOW-RS of one instance per request, with the response's Failed SOP Sequence and Referenced
SOP Sequence checked; delivery is confirmed by a QIDO-RS query of the SOP Instance UID.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from ..artefacts import QueryWindow
from ..config import ArchiveConfig
from ..errors import ArchiveError, ArchiveUnavailable, StoreRefused, TlsRefused
from . import locator, retrieve_series
from .http import archive_session

log = logging.getLogger(__name__)

QIDO_PAGE = 200  # answers per QIDO-RS request
# STOW-RS answers that refuse this object (PS3.18 10.5.3): sending it again unchanged would
# be refused again.  409: the instance failed (see its Failed SOP Sequence).
STOW_REFUSALS = (400, 409, 413, 415)


def secret_from_env(env_name: str) -> str:
    """The secret held by environment variable ``env_name`` ('' where no name is set)."""
    if not env_name:
        return ""
    value = os.environ.get(env_name)
    if value is None:
        raise ArchiveError(
            f"expected the environment variable {env_name} to hold the archive's secret; unset"
        )
    return value


class DicomWebArchive:
    """A DICOMweb service, as configured under ``archives: NAME``."""

    def __init__(self, name: str, config: ArchiveConfig) -> None:
        self._name = name
        self.config = config
        session = archive_session(config, config.url)
        if config.username:
            session.auth = (config.username, secret_from_env(config.password_env))
        if config.token_env:
            session.headers["Authorization"] = f"Bearer {secret_from_env(config.token_env)}"
        self.client = DICOMwebClient(
            config.url.rstrip("/"), session=session, timeout=config.timeout_s
        )
        # No retries inside one call: dicomweb-client's default (5 attempts, exponential
        # waits of 2-16 s, on any connection error) stalls a worker half a minute per call
        # on an archive that is down.  Trying again is the callers' decision: the outbox
        # backs off, a retrieval is attempted retrieve_attempts times, and the nightly
        # batch sets a site aside and comes back to it (docs/sites.md).
        self.client.set_http_retry_params(retry=False)

    @property
    def name(self) -> str:
        return f"dicomweb:{self._name}"

    @property
    def query_based(self) -> bool:
        return True

    def _call(
        self, what: str, fn: Any, *args: Any, refusals: tuple[int, ...] = (), **kwargs: Any
    ) -> Any:
        """Run one client call; network faults and 5xx become ArchiveUnavailable (try again
        later), the HTTP codes in ``refusals`` StoreRefused, other HTTP errors ArchiveError,
        each with one line saying what was expected and what arrived."""
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as e:
            kind = TlsRefused if "CERTIFICATE_VERIFY_FAILED" in str(e) else ArchiveUnavailable
            raise kind(f"{self.name}: TLS failure during {what}: {e}") from e
        except requests.exceptions.ConnectionError as e:
            raise ArchiveUnavailable(
                f"{self.name}: connection refused or lost during {what} ({self.config.url})"
            ) from e
        except requests.exceptions.Timeout as e:
            raise ArchiveUnavailable(
                f"{self.name}: no answer within {self.config.timeout_s:g} s during {what}"
            ) from e
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            hint = {401: " (authentication failed)", 403: " (not allowed)"}.get(code, "")
            if code in refusals:
                raise StoreRefused(
                    f"HTTP {code}", f"{self.name}: expected HTTP 200 for {what}, got {code}"
                ) from e
            if code in (401, 403, 404):
                raise ArchiveError(
                    f"{self.name}: expected HTTP 200 for {what}, got {code}{hint}"
                ) from e
            raise ArchiveUnavailable(
                f"{self.name}: expected HTTP 200 for {what}, got {code}{hint}"
            ) from e

    def echo(self) -> str:
        """A QIDO-RS query for one study: reachable, authenticated, DICOMweb answering."""
        t0 = time.perf_counter()
        self._call("QIDO-RS echo", self.client.search_for_studies, limit=1)
        ms = (time.perf_counter() - t0) * 1000
        return f"{self.name}: QIDO-RS ok at {self.config.url} in {ms:.0f} ms"

    # ------------------------------------------------------------ query

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        window = window or QueryWindow()
        filters: dict[str, Any] = {"ModalitiesInStudy": "CT"}
        if window.date_range():
            filters["StudyDate"] = window.date_range()
        studies = self._pages(
            "QIDO-RS studies",
            self.client.search_for_studies,
            "0020000D",
            search_filters=filters,
            fields=["StudyDate", "StudyTime", "AccessionNumber", "PatientName", "PatientID"],
        )
        log.info("%s: %d studies with CT in %s", self.name, len(studies), window)
        for st in studies:
            study_uid = _json_value(st, "0020000D")
            if not study_uid:
                continue
            series = self._pages(
                "QIDO-RS series",
                self.client.search_for_series,
                "0020000E",
                study_instance_uid=study_uid,
                fields=["Modality", "NumberOfSeriesRelatedInstances"],
            )
            for se in series:
                series_uid = _json_value(se, "0020000E")
                if not series_uid or str(_json_value(se, "00080060")).upper() != "CT":
                    continue
                metadata = self._call(
                    "WADO-RS series metadata",
                    self.client.retrieve_series_metadata,
                    study_uid,
                    series_uid,
                )
                announced = _json_value(se, "00201209")
                if announced not in (None, "") and int(announced) != len(metadata):
                    log.warning(
                        "%s: series %s announced %s instances, its metadata lists %d",
                        self.name, series_uid, announced, len(metadata),
                    )
                for item in metadata:
                    ds = Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"")
                    # Bulk data (pixels) is left out of metadata; no PixelData in headers.
                    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                        if tag in ds:
                            del ds[tag]
                    _patient_from_study(ds, st)
                    yield ds, locator(study_uid, series_uid, str(ds.get("SOPInstanceUID", "")))

    def _pages(self, what: str, fn: Any, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        """Every answer of a QIDO-RS search, page by page (limit/offset).  Stops at a short
        page, or at a page that brings nothing new (a server that ignores offset would
        otherwise send the same page forever)."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            page = self._call(what, fn, limit=QIDO_PAGE, offset=len(out), **kwargs)
            new = [p for p in page if _json_value(p, key) not in seen]
            out.extend(new)
            seen.update(str(_json_value(p, key)) for p in new)
            if len(page) < QIDO_PAGE or not new:
                return out

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        found = self._call(
            "QIDO-RS instance",
            self.client.search_for_instances,
            study_instance_uid=study_uid,
            search_filters={"SOPInstanceUID": sop_instance_uid},
        )
        return any(_json_value(f, "00080018") == sop_instance_uid for f in found)

    # ------------------------------------------------------------ retrieve

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        def wado(study_uid: str, series_uid: str) -> list[Dataset]:
            received: list[Dataset] = self._call(
                "WADO-RS series",
                self.client.retrieve_series,
                study_uid,
                series_uid,
                media_types=(("application/dicom", "*"),),
            )
            return received

        return retrieve_series(
            self.name, "WADO-RS", locators, wado, self.config.retrieve_attempts
        )

    # ------------------------------------------------------------ store

    def store(self, ds: Dataset) -> str:
        sop = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        response = self._call(
            "STOW-RS",
            self.client.store_instances,
            [ds],
            study_instance_uid=study_uid,
            refusals=STOW_REFUSALS,
        )
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "")
            code = int(reason) if reason not in ("", None) else "unknown"
            shown = f"0x{code:04X}" if isinstance(code, int) else code
            raise StoreRefused(
                code, f"{self.name}: expected STOW-RS to store {sop}, got failure reason {shown}"
            )
        refs = response.get("ReferencedSOPSequence", []) if response is not None else []
        if not any(str(r.get("ReferencedSOPInstanceUID", "")) == sop for r in refs):
            raise StoreRefused(
                "not-referenced",
                f"{self.name}: expected STOW-RS to reference {sop} as stored, it did not",
            )
        for r in refs:
            warn = r.get("WarningReason")
            if warn not in (None, ""):
                log.warning("%s: STOW-RS stored %s with warning 0x%04X", self.name, sop, warn)
        return locator(study_uid, str(ds.SeriesInstanceUID), sop)


def _patient_from_study(ds: Dataset, study: dict[str, Any]) -> None:
    """PatientName / PatientID from the QIDO-RS study answer where the instance's metadata
    lacks them (for the worklist's pages; never logged)."""
    name = _json_value(study, "00100010")
    if isinstance(name, dict):  # a PN value in DICOM JSON: {"Alphabetic": "Doe^Jane"}
        name = name.get("Alphabetic", "")
    if not ds.get("PatientName") and name:
        ds.PatientName = str(name)
    patient_id = _json_value(study, "00100020")
    if not ds.get("PatientID") and patient_id:
        ds.PatientID = str(patient_id)


def _json_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON object ('' where absent)."""
    values = item.get(tag, {}).get("Value") or [""]
    return values[0]
