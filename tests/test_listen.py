"""ctscreen as a receiving node, spoken to by an independent implementation (dcmtk):
storescu pushes a study into the listener, it is screened once complete, results go to
Orthanc, and dcmtk's findscu finds them there.  Unknown calling AEs are refused."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FINDSCU_AE, site_config
from orthanc import AET, Orthanc, free_port, require_dcmtk
from pacs_kit import write_phantom
from pynetdicom import AE

from pipeline.cli import outbox_path
from pipeline.config import load_config
from pipeline.listen import Listener
from pipeline.run import Stages
from pipeline.worklist import Worklist

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

NODE_AE = "CTSCREENRX"
SENDER_AE = "STORESCU"


@pytest.fixture(scope="module")
def listener(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    require_dcmtk()
    root = tmp_path_factory.mktemp("listen")
    cfg = load_config(
        site_config(
            orthanc,
            root,
            ae_title=NODE_AE,
            port=free_port(),
            allowed_calling_aes=[SENDER_AE],
            spool=str(root / "spool"),
            stability_timeout_s=1.5,
            results_archive="pacs",
        )
    )
    from pipeline.archive import open_archive

    wl = root / "wl.sqlite"
    node = Listener(
        cfg.listen,
        Stages.load(cfg),
        wl,
        open_archive("pacs", cfg.archives["pacs"]),
        outbox_path(wl, cfg),
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_storescu_pushes_a_study_that_is_screened_and_findscu_finds_the_results(
    listener: Listener, orthanc: Orthanc, tmp_path: Path
) -> None:
    study = write_phantom(tmp_path / "study", seed=41)
    host, port = listener.address
    sent = subprocess.run(
        ["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, "+sd", "+r", host, str(port),
         str(tmp_path / "study")],
        capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    assert listener.received == 200
    deadline = time.monotonic() + 120
    while not listener.summaries and time.monotonic() < deadline:
        time.sleep(0.2)
    (summary,) = listener.summaries
    assert summary.by_status == {"analysed": 1}, summary.as_json()
    assert summary.outputs_written >= 3
    with Worklist(listener.worklist_path) as wl:
        (row,) = wl.rows()
    assert row.study_uid == study and row.pattern == "typical"
    assert not (listener.incoming / study).exists()  # received files dropped once screened

    found = subprocess.run(
        ["findscu", "-aet", FINDSCU_AE, "-aec", AET, "-S",
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
         "-k", "Modality", "-k", "SeriesInstanceUID",
         "127.0.0.1", str(orthanc.dicom_port)],
        capture_output=True, text=True, timeout=60,
    )
    assert found.returncode == 0, found.stderr
    modalities = re.findall(r"\(0008,0060\) CS \[(\w+)", found.stdout + found.stderr)
    assert "SR" in modalities and "SEG" in modalities, found.stdout + found.stderr
    orthanc.delete_study(study)


def test_unknown_calling_ae_is_refused(listener: Listener, tmp_path: Path) -> None:
    before = listener.received
    write_phantom(tmp_path / "study", seed=41)
    host, port = listener.address
    sent = subprocess.run(
        ["storescu", "-aet", "INTRUDER", "-aec", NODE_AE, host, str(port),
         str(next((tmp_path / "study").glob("*.dcm")))],
        capture_output=True, text=True, timeout=60,
    )
    assert sent.returncode != 0
    assert "Association Rejected" in sent.stderr + sent.stdout
    assert _rejected_by_pynetdicom(host, port)
    assert listener.received == before


def _rejected_by_pynetdicom(host: str, port: int) -> bool:
    """An unknown AE through pynetdicom: the association is rejected, not just a store."""
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=NODE_AE)
    rejected = bool(assoc.is_rejected)
    if assoc.is_established:
        assoc.release()
    return rejected


def test_ctscreen_listen_command_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The CLI node: accepts an allowed AE's C-ECHO, refuses another, ends on SIGTERM."""
    import signal
    import sys

    port = free_port()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"listen: {{ae_title: {NODE_AE}, port: {port}, allowed_calling_aes: [{SENDER_AE}], "
        f"spool: '{tmp_path / 'spool'}', stability_timeout_s: 1.0}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "listen", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        ae = AE(ae_title=SENDER_AE)
        ae.add_requested_context("1.2.840.10008.1.1")
        deadline = time.monotonic() + 60
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        while not assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.3)
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert _rejected_by_pynetdicom("127.0.0.1", port)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "listening as CTSCREENRX" in out
