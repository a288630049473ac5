"""ctscreen as a receiving node: a C-STORE SCP that screens each study once complete.

A PACS auto-routing rule (or a modality, or dcmtk's storescu) sends instances to our AE.
Only calling AE titles on the allow-list (``listen.allowed_calling_aes``) may associate;
any other is rejected ("calling AE title not recognised").  Each instance is written to
disk as it arrives (``<spool>/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm``,
atomically, in the transfer syntax it came in) and acknowledged only then.  A study counts
as complete when nothing new arrived for ``listen.stability_timeout_s`` seconds, the way
PACS routing delivers (there is no "end of study" message in DICOM).  It is then screened
by the same batch code as ``ctscreen run``; results go to ``listen.results_archive``
through the outbox.  Instances that arrive after a study was screened make it a changed
study, screened again (deterministic UIDs: results are replaced, not duplicated).
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from .archive import Archive
from .archive.folder import FolderArchive
from .artefacts import QueryWindow
from .batch import BatchSummary, run_batch
from .config import ListenConfig, ListenTlsConfig
from .durable import TMP_PREFIX
from .errors import ConfigError
from .outbox import Outbox
from .run import Stages
from .state import RETRY_REASONS
from .worklist import Worklist

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
RETRY_DELAY_S = 300.0  # a study that failed for the archive's sake is screened again after this
# Everything we can decode, so a sender never has to transcode for us.
ACCEPTED_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
]


class RoutedArchive:
    """Reads studies from one archive and stores results in another (the spool folder
    in, the PACS out).  Named after where the results go, as the outbox keys by it."""

    def __init__(self, source: Archive, sink: Archive) -> None:
        self.source = source
        self.sink = sink

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def query_based(self) -> bool:
        return self.source.query_based

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        return self.source.headers(window)

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        return self.source.load(locators)

    def store(self, ds: Dataset) -> str:
        return self.sink.store(ds)

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        return self.sink.contains(study_uid, sop_instance_uid)


def server_tls(tls: ListenTlsConfig) -> ssl.SSLContext | None:
    """The TLS context of the receiving node (None without TLS): TLS 1.2 or later, our
    certificate, and each sender's certificate required and checked against ``ca_file``
    (mutual TLS; a sender whose certificate does not verify fails the handshake)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                     cafile=tls.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"listen.tls: cannot load our certificate {tls.cert_file}: {e}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class Listener:
    """The receiving node.  ``start()`` returns at once; ``stop()`` ends it cleanly."""

    def __init__(
        self,
        config: ListenConfig,
        stages: Stages,
        worklist_path: Path,
        results: Archive | None = None,
        outbox: Path | None = None,
    ) -> None:
        if not config.allowed_calling_aes:
            raise ConfigError(
                "listen.allowed_calling_aes: expected at least one AE title allowed to send, "
                "got none (every association would be refused)"
            )
        self.config = config
        self.stages = stages
        self.spool = Path(config.spool or "ctscreen-spool").resolve()
        self.incoming = self.spool / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.results: Archive = results or FolderArchive(self.spool)
        self.worklist_path = worklist_path
        self.outbox_path = outbox
        self._last: dict[str, float] = {}  # study UID -> monotonic time of its last instance
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._worker: threading.Thread | None = None
        self.summaries: list[BatchSummary] = []
        self.received = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return (self.config.bind_address, self.config.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        for folder in sorted(self.incoming.iterdir()):
            if folder.is_dir():  # left by an earlier process: screen it after the timeout
                self._last[folder.name] = time.monotonic()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ACCEPTED_SYNTAXES)
        ae.maximum_associations = 4
        self._server = ae.start_server(
            (self.config.bind_address, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, _log_reject)],
            ssl_context=server_tls(self.config.tls),
        )
        self._worker = threading.Thread(target=self._loop, name="ctscreen-screen", daemon=True)
        self._worker.start()
        host, port = self.address
        log.info(
            "listening as %s on %s:%d%s; accepting %s; a study is complete after %.0f s quiet",
            self.config.ae_title, host, port,
            " over TLS (senders' certificates checked)" if self.config.tls.enabled else "",
            ", ".join(self.config.allowed_calling_aes), self.config.stability_timeout_s,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self._worker.join(timeout=600)
            self._worker = None

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # ------------------------------------------------------------ receiving

    def _on_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            study = _uid(str(ds.get("StudyInstanceUID", "")))
            sop = _uid(str(ds.get("SOPInstanceUID", "")))
        except (AttributeError, ValueError, KeyError) as e:
            log.warning("refused an instance without usable UIDs (%s)", type(e).__name__)
            return 0xA900  # dataset does not match SOP class
        if not study or not sop:
            log.warning("refused an instance without Study/SOP Instance UID")
            return 0xA900
        folder = self.incoming / study
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}-{os.getpid()}-", dir=folder)
            with os.fdopen(fd, "wb") as fh:
                # Preamble, file meta and the dataset as received: no re-encoding.
                fh.write(event.encoded_dataset(include_meta=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{sop}.dcm")
        except OSError as e:
            log.error("could not write instance %s of study %s: %s", sop, study, e)
            return 0xA700  # out of resources
        with self._lock:
            self._last[study] = time.monotonic()
            self.received += 1
        return 0x0000

    # ------------------------------------------------------------ screening

    def _loop(self) -> None:
        worklist = Worklist(self.worklist_path)
        outbox = Outbox(self.outbox_path) if self.outbox_path else None
        try:
            while not self._stop.is_set():
                for study in self._complete_studies():
                    if self._stop.is_set():
                        break
                    self._screen(study, worklist, outbox)
                self._stop.wait(0.2)
        finally:
            worklist.close()
            if outbox is not None:
                outbox.close()

    def _complete_studies(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            done = [
                s for s, t in self._last.items() if now - t >= self.config.stability_timeout_s
            ]
            for s in done:
                del self._last[s]
        return sorted(done)

    def _screen(self, study: str, worklist: Worklist, outbox: Outbox | None) -> None:
        folder = self.incoming / study
        if not folder.is_dir():
            return
        log.info("study %s complete (%d files); screening", study, len(list(folder.glob("*.dcm"))))
        archive = RoutedArchive(FolderArchive(folder), self.results)
        try:
            summary = run_batch(archive, self.stages, worklist, outbox=outbox,
                                site=self.config.site)
        except Exception:  # one study's defect must not stop the node
            log.exception("study %s: screening failed; its files stay in %s", study, folder)
            return
        log.info("study %s: %s", study, dict(summary.by_status))
        retry = summary.by_status.get("failed", 0) > 0 or any(
            r.split(":")[0] in RETRY_REASONS for r in summary.reasons
        )
        with self._lock:
            if retry:  # the archive let us down: try this study again in a while
                log.info("study %s: screened again in %.0f s", study, RETRY_DELAY_S)
                self._last.setdefault(study, time.monotonic() + RETRY_DELAY_S)
            elif self.config.delete_after_screening and study not in self._last:
                shutil.rmtree(folder, ignore_errors=True)  # nothing new arrived meanwhile
        self.summaries.append(summary)


def _uid(text: str) -> str:
    text = text.strip()
    if not text or len(text) > 64 or not all(ch.isdigit() or ch == "." for ch in text):
        raise ValueError("not a UID")
    return text


def _log_reject(event: evt.Event) -> None:
    log.warning("refused an association from %s", event.assoc.requestor.ae_title)
