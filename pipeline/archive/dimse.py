"""A PACS through the DIMSE door (pynetdicom): C-ECHO, C-FIND, C-GET or C-MOVE, C-STORE.

Queries (Study Root information model):

1. STUDY level: the studies of the query window (StudyDate range) with CT in
   ModalitiesInStudy;
2. SERIES level: every series of those studies with its Modality and the number of
   instances the archive announces (NumberOfSeriesRelatedInstances);
3. IMAGE level, for the CT series only: the attributes selection judges (ImageType,
   SliceThickness, orientation, position, kernel, Rows/Columns, ...).  The answers become
   header datasets, so selection works exactly as on files and only the series it chooses
   is retrieved; localizers, reformats and other phases never leave the archive.

Retrieval is by C-GET (default) or C-MOVE of the chosen series.  Each transfer syntax is
offered in its own presentation context so that the archive can send instances as stored
(JPEG-LS, JPEG 2000, ...) instead of transcoding them.  Fewer instances than announced is
``incomplete-retrieval:<got>/<expected>``.  Results go back by C-STORE; every response
status is checked, and delivery is confirmed by querying the instance back.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association

from ..artefacts import QueryWindow
from ..config import ArchiveConfig
from ..errors import ArchiveError, ArchiveUnavailable, StoreRefused, TlsRefused
from . import locator, retrieve_series

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# SOP classes by UID (pynetdicom.sop_class names are made at run time, unknown to mypy).
Verification = UID("1.2.840.10008.1.1")
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")
StudyRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.2.2")
StudyRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.2.3")
# Offered one per presentation context for retrieval, so the archive can keep the stored
# syntax (a context listing several made Orthanc transcode to uncompressed).
RETRIEVE_SYNTAXES: tuple[tuple[UID, ...], ...] = (
    (JPEGLSLossless,),
    (JPEG2000Lossless,),
    (JPEGLosslessSV1,),
    (RLELossless,),
    (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
)
# What selection needs from every instance of a CT series (see ingest.instance_header).
IMAGE_KEYS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ImageType",
    "SeriesNumber",
    "InstanceNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "ConvolutionKernel",
    "SliceThickness",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "GantryDetectorTilt",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
)
IMAGE_KEYS_NULL = ("Rows", "Columns", "NumberOfFrames")  # US / IS: empty means "return it"
# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings.
STORE_OK = {0x0000, 0xB000, 0xB006, 0xB007}
PENDING = {0xFF00, 0xFF01}


def _unavailable(message: str, why: str) -> ArchiveError:
    """ArchiveUnavailable (try again later), or TlsRefused where certificates are at fault."""
    if why.startswith("TLS: ") or "certificate verify failed" in why:
        return TlsRefused(message)
    return ArchiveUnavailable(message)


def _client_certificate_refused(tsock: ssl.SSLSocket) -> str:
    """Under TLS 1.3 a server's verdict on our certificate arrives after the handshake, as
    an alert on the first read: the alert's text, or '' where the server just waits."""
    tsock.settimeout(1.0)
    try:
        tsock.recv(1)
    except ssl.SSLError as e:
        return str(e)
    except OSError:  # a timeout: the server waits for our request, as it should
        return ""
    return ""


class DimseArchive:
    """A PACS reached by DIMSE, as configured under ``archives: NAME``."""

    def __init__(self, name: str, config: ArchiveConfig) -> None:
        self._name = name
        self.config = config
        self.calling_ae = config.calling_ae
        self._announced: dict[str, int] = {}  # series UID -> instances the archive announced
        self._classes: dict[str, set[str]] = {}  # series UID -> SOP classes seen in it

    @property
    def name(self) -> str:
        return f"dimse:{self._name}"

    @property
    def query_based(self) -> bool:
        return True

    # ------------------------------------------------------------ association

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        t = self.config.timeout_s
        ae.acse_timeout = t
        ae.dimse_timeout = t
        ae.network_timeout = t
        ae.connection_timeout = t
        return ae

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        tls = self.config.tls
        if not tls.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
        return ctx, tls.server_hostname or self.config.host

    @contextmanager
    def _association(
        self, ae: AE, ext_neg: list[Any] | None = None, handlers: list[Any] | None = None
    ) -> Iterator[Association]:
        c = self.config
        capture = _RejectCapture()
        pn_log = logging.getLogger("pynetdicom")
        pn_log.addHandler(capture)
        try:
            assoc = ae.associate(
                c.host,
                c.port,
                ae_title=c.called_ae,
                ext_neg=ext_neg,
                evt_handlers=handlers,
                tls_args=self._tls_args(),
            )
        except (OSError, ssl.SSLError) as e:
            why = self._diagnose()
            raise _unavailable(f"{self.name}: {why} ({e})", why) from e
        finally:
            pn_log.removeHandler(capture)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise ArchiveUnavailable(
                    f"{self.name}: association rejected by {c.called_ae}@{c.host}:{c.port}: "
                    f"{capture.reason or 'no reason given'} (calling AE {self.calling_ae})"
                )
            why = self._diagnose()
            raise _unavailable(f"{self.name}: {why}", why)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _diagnose(self) -> str:
        """Why an association could not be made: refused, timeout, TLS, or aborted."""
        c = self.config
        where = f"{c.host}:{c.port}"
        try:
            with socket.create_connection((c.host, c.port), timeout=c.timeout_s) as sock:
                tls = self._tls_args()
                if tls is not None:
                    try:
                        with tls[0].wrap_socket(sock, server_hostname=tls[1]) as tsock:
                            refused = _client_certificate_refused(tsock)
                    except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                        return (
                            f"TLS handshake with {where} failed: {e} "
                            "(does the archive speak TLS on this port? certificate trusted?)"
                        )
                    if refused:
                        return (f"TLS: {where} refused our client certificate ({refused}; "
                                "is it signed by a CA the archive trusts?)")
        except ConnectionRefusedError:
            return f"connection refused by {where} (nothing listens there: archive down?)"
        except TimeoutError:
            return f"no answer from {where} within {c.timeout_s:g} s (timeout)"
        except OSError as e:
            return f"cannot reach {where}: {e.strerror or e}"
        return (
            f"{where} accepted the connection but no association was made "
            f"(aborted, or no presentation context accepted; called AE {c.called_ae})"
        )

    # ------------------------------------------------------------ echo

    def echo(self) -> str:
        """C-ECHO; returns a one-line success message or raises ArchiveUnavailable."""
        ae = self._ae()
        ae.add_requested_context(Verification)
        t0 = time.perf_counter()
        with self._association(ae) as assoc:
            status = assoc.send_c_echo()
            code = _status(status)
        ms = (time.perf_counter() - t0) * 1000
        if code != 0x0000:
            raise ArchiveUnavailable(
                f"{self.name}: expected C-ECHO status 0x0000, got {_hex(code)}"
            )
        c = self.config
        return (
            f"{self.name}: C-ECHO ok, {self.calling_ae} -> {c.called_ae}@{c.host}:{c.port}"
            f"{' (TLS)' if c.tls.enabled else ''} in {ms:.0f} ms"
        )

    # ------------------------------------------------------------ query

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        with self._association(ae) as assoc:
            studies = self._find(assoc, _study_query(window or QueryWindow()))
            log.info("%s: %d studies with CT in %s", self.name, len(studies), window)
            for st in studies:
                study_uid = str(st.get("StudyInstanceUID", ""))
                if not study_uid:
                    continue
                for se in self._find(assoc, _series_query(study_uid)):
                    series_uid = str(se.get("SeriesInstanceUID", ""))
                    modality = str(se.get("Modality", "")).upper()
                    if not series_uid or modality != "CT":
                        continue  # SR, SEG, SC of earlier runs, other modalities
                    n = _int(se.get("NumberOfSeriesRelatedInstances"))
                    if n is not None:
                        self._announced[series_uid] = n
                    answers = self._find(assoc, _image_query(study_uid, series_uid))
                    if n is not None and len(answers) != n:
                        log.warning(
                            "%s: series %s announced %d instances, the image query found %d",
                            self.name, series_uid, n, len(answers),
                        )
                    for ds in answers:
                        ds.StudyInstanceUID = study_uid
                        ds.SeriesInstanceUID = series_uid
                        for k in ("PatientName", "PatientID"):  # the study answer's
                            if not ds.get(k) and st.get(k):
                                setattr(ds, k, st.get(k))
                        if not ds.get("Modality"):
                            ds.Modality = modality
                        sop = str(ds.get("SOPInstanceUID", ""))
                        self._classes.setdefault(series_uid, set()).add(
                            str(ds.get("SOPClassUID", "")) or CT_IMAGE_STORAGE
                        )
                        yield ds, locator(study_uid, series_uid, sop)

    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        out = []
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = _status(status)
            if code in PENDING:
                if ident is not None:
                    out.append(ident)
            elif code == 0x0000:
                break
            elif code == -1:
                raise ArchiveUnavailable(f"{self.name}: C-FIND got no response (aborted/timeout)")
            else:
                raise ArchiveError(
                    f"{self.name}: expected C-FIND status 0x0000/0xFF00 at "
                    f"{query.QueryRetrieveLevel} level, got {_hex(code)}"
                    f"{_comment(status)}"
                )
        return out

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.SOPInstanceUID = sop_instance_uid
        with self._association(ae) as assoc:
            answers = self._find(assoc, q)
        return any(str(a.get("SOPInstanceUID", "")) == sop_instance_uid for a in answers)

    # ------------------------------------------------------------ retrieve

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        return retrieve_series(
            self.name,
            self.config.retrieve.upper(),
            locators,
            self._retrieve_series,
            self.config.retrieve_attempts,
        )

    def _retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        classes = sorted(self._classes.get(series_uid) or {CT_IMAGE_STORAGE})
        received: list[Dataset] = []
        lock = threading.Lock()

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with lock:
                received.append(ds)
            return 0x0000

        if self.config.retrieve == "c-move":
            self._c_move(query, classes, on_store)
        else:
            self._c_get(query, classes, on_store)
        return received

    def _c_get(self, query: Dataset, classes: list[str], on_store: Any) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for cls in classes:
            for syntaxes in RETRIEVE_SYNTAXES:
                ae.add_requested_context(cls, list(syntaxes))
            roles.append(build_role(cls, scp_role=True))
        handlers = [(evt.EVT_C_STORE, on_store)]
        with self._association(ae, ext_neg=roles, handlers=handlers) as assoc:
            responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            self._check_retrieve(responses, "C-GET")

    def _c_move(self, query: Dataset, classes: list[str], on_store: Any) -> None:
        c = self.config
        scp = self._ae()
        for cls in classes:
            scp.add_supported_context(cls, [s for group in RETRIEVE_SYNTAXES for s in group])
        bind = "127.0.0.1" if c.host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"
        try:
            server = scp.start_server(
                (bind, c.move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
        except OSError as e:
            raise ArchiveError(
                f"{self.name}: expected to listen on {bind}:{c.move_port} for C-MOVE, got {e}"
            ) from e
        if server is None:
            raise ArchiveError(f"{self.name}: our C-MOVE storage SCP did not start")
        try:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae) as assoc:
                responses = assoc.send_c_move(
                    query,
                    c.move_destination or self.calling_ae,
                    StudyRootQueryRetrieveInformationModelMove,
                )
                self._check_retrieve(responses, "C-MOVE")
        finally:
            server.shutdown()

    def _check_retrieve(self, responses: Iterator[tuple[Dataset, Dataset | None]], op: str) -> None:
        final = -1
        last: Dataset = Dataset()
        for status, _ident in responses:
            final = _status(status)
            last = status
            if final not in PENDING:
                break
        if final == -1:
            raise ArchiveUnavailable(f"{self.name}: {op} got no response (aborted or timeout)")
        failed = _int(last.get("NumberOfFailedSuboperations")) or 0
        if final not in (0x0000, 0xB000) or failed:
            # Counted by the caller as an incomplete retrieval; the status is logged here.
            log.warning(
                "%s: %s ended with status %s, %d sub-operations failed%s",
                self.name, op, _hex(final), failed, _comment(last),
            )

    # ------------------------------------------------------------ store

    def store(self, ds: Dataset) -> str:
        ae = self._ae()
        syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        if syntax and syntax not in syntaxes:
            syntaxes.insert(0, UID(syntax))
        ae.add_requested_context(str(ds.SOPClassUID), syntaxes)
        with self._association(ae) as assoc:
            status = assoc.send_c_store(ds)
        code = _status(status)
        sop = str(ds.SOPInstanceUID)
        if code == -1:
            raise ArchiveUnavailable(f"{self.name}: C-STORE of {sop} got no response")
        if code not in STORE_OK:
            raise StoreRefused(
                code,
                f"{self.name}: expected C-STORE status 0x0000, got {_hex(code)} for {sop}"
                f"{_comment(status)}",
            )
        if code != 0x0000:
            log.warning("%s: C-STORE of %s stored with warning %s", self.name, sop, _hex(code))
        return locator(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop)


class _RejectCapture(logging.Handler):
    """Keeps pynetdicom's "Reason: ..." line of an A-ASSOCIATE-RJ (it is only logged)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reason = ""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Reason: "):
            self.reason = msg[len("Reason: "):]
        elif msg.startswith("Result: ") and not self.reason:
            self.reason = msg


def _study_query(window: QueryWindow) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.StudyDate = window.date_range()
    q.StudyTime = ""
    q.AccessionNumber = ""
    q.PatientName = ""  # for the worklist's pages (never logged)
    q.PatientID = ""
    q.ModalitiesInStudy = "CT"
    return q


def _series_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesNumber = ""
    q.SeriesDescription = ""
    q.NumberOfSeriesRelatedInstances = ""
    return q


def _image_query(study_uid: str, series_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    for k in IMAGE_KEYS:
        setattr(q, k, "")
    for k in IMAGE_KEYS_NULL:
        setattr(q, k, None)
    return q


def _status(status: Dataset | None) -> int:
    """The Status of a DIMSE response, or -1 where none came (aborted, timed out)."""
    if status is None or "Status" not in status:
        return -1
    return int(status.Status)


def _hex(code: int) -> str:
    return "no response" if code < 0 else f"0x{code:04X}"


def _comment(status: Dataset) -> str:
    text = str(status.get("ErrorComment", "")).strip()
    return f" ({text})" if text else ""


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None

