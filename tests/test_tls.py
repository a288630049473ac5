"""Traffic between sites encrypted and authenticated, on loopback with a throw-away CA.

A real Orthanc with DICOM TLS (DicomTlsEnabled, the sender's certificate required) and HTTPS:
``ctscreen echo`` through DIMSE and DICOMweb, a ``ctscreen run`` that queries, retrieves
and stores over TLS, and ``ctscreen listen`` over TLS receiving a study that Orthanc itself
sends (its modality entry with UseDicomTls) and sending the results back over TLS.  Each
wrong certificate (the server's from another CA, ours from another CA, no TLS at all) is
refused with its reason; nothing falls back to plain text.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OUR_AE
from orthanc import PASSWORD, PASSWORD_ENV, USER, Orthanc, free_port, require_orthanc
from pacs_kit import result_counts, run_cli
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_sites import _write_studies
from tls_kit import TlsProxy, authority

from pipeline.api import listener as make_listener
from pipeline.config import load_config
from pipeline.errors import ConfigError

pytestmark = pytest.mark.heavy  # servers: outside the quick tier

NODE_AE = "CTSCREENTLS"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("pki")
    return {"good": authority(root, "good"), "rogue": authority(root, "rogue")}


@pytest.fixture(scope="module")
def tls_orthanc(pki: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Orthanc]:
    require_orthanc()
    os.environ[PASSWORD_ENV] = PASSWORD
    good = pki["good"]
    node_port = free_port()
    server = Orthanc(tmp_path_factory.mktemp("tls-orthanc"), {}, extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(good["server"]),
        "DicomTlsPrivateKey": str(good["server_key"]),
        "DicomTlsTrustedCertificates": str(good["ca"]),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "ctscreen": [OUR_AE, "127.0.0.1", free_port()],
            "listener": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port,
                         "UseDicomTls": True},
        },
    })
    server.node_port = node_port  # type: ignore[attr-defined]
    server.start()
    # HTTPS in front of its HTTP port (tls_kit.TlsProxy says why not Orthanc's own)
    proxy = TlsProxy(good["server"], good["server_key"], server.http_port)
    server.https_port = proxy.port  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        proxy.close()
        server.stop()


def _site_file(folder: Path, orthanc: Orthanc, pki: dict[str, dict[str, Path]],
               listen: bool = False) -> Path:
    good, rogue = pki["good"], pki["rogue"]

    def dimse(ca: Path, cert: Path, key: Path, enabled: bool = True) -> str:
        return (f"{{kind: dimse, host: 127.0.0.1, port: {orthanc.dicom_port}, called_ae: ORTHANC,"
                f" calling_ae: {OUR_AE}, retrieve: c-get, timeout_s: 10, tls: {{enabled: "
                f"{'true' if enabled else 'false'}, ca_file: '{ca}', cert_file: '{cert}', "
                f"key_file: '{key}'}}}}")

    def web(ca: Path) -> str:
        port = orthanc.https_port  # type: ignore[attr-defined]
        return (f"{{kind: dicomweb, url: 'https://127.0.0.1:{port}/dicom-web', "
                f"username: {USER}, password_env: {PASSWORD_ENV}, timeout_s: 10, "
                f"tls: {{enabled: true, ca_file: '{ca}'}}}}")

    text = f"""
archives:
  tls-pacs: {dimse(good["ca"], good["client"], good["client_key"])}
  tls-web: {web(good["ca"])}
  server-from-another-ca: {dimse(rogue["ca"], good["client"], good["client_key"])}
  ours-from-another-ca: {dimse(good["ca"], rogue["client"], rogue["client_key"])}
  no-tls: {dimse(good["ca"], good["client"], good["client_key"], enabled=False)}
  web-from-another-ca: {web(rogue["ca"])}
selection: {{max_slice_thickness_mm: 4.0}}
lungs: {{method: classical}}
outbox: {{backoff_initial_s: 0.0, backoff_max_s: 0.0}}
batch: {{disk_reserve_mb: 0}}
web: {{store_views: false}}
"""
    if listen:
        text += f"""
listen:
  ae_title: {NODE_AE}
  port: {orthanc.node_port}  # type: ignore[attr-defined]
  allowed_calling_aes: [ORTHANC]
  spool: '{folder / "spool"}'
  stability_timeout_s: 1.5
  results_archive: tls-pacs
  tls: {{enabled: true, cert_file: '{good["server"]}', key_file: '{good["server_key"]}',
         ca_file: '{good["ca"]}'}}
"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(text.replace("  # type: ignore[attr-defined]", ""))
    return path


def test_echo_over_tls_and_every_wrong_certificate_refused_with_its_reason(
    tls_orthanc: Orthanc, pki: dict[str, dict[str, Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.cli import main

    cfg = str(_site_file(tmp_path, tls_orthanc, pki))
    for name, expect in (("tls-pacs", "C-ECHO ok"), ("tls-web", "QIDO-RS ok at https://")):
        capsys.readouterr()
        rc = main(["echo", name, "--config", cfg])
        out = capsys.readouterr()
        assert rc == 0 and expect in out.out, (name, out.err)
    for name, reason in (
        ("server-from-another-ca", "certificate verify failed"),
        ("web-from-another-ca", "CERTIFICATE_VERIFY_FAILED"),
        ("ours-from-another-ca", "refused our client certificate"),
        ("no-tls", ""),
    ):
        capsys.readouterr()
        rc = main(["echo", name, "--config", cfg])
        err = capsys.readouterr().err
        assert rc != 0, name
        assert "FAILED" in err and reason in err, (name, err)


def test_echo_names_tls_in_its_answer(
    tls_orthanc: Orthanc, pki: dict[str, dict[str, Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.cli import main

    cfg = str(_site_file(tmp_path, tls_orthanc, pki))
    capsys.readouterr()
    assert main(["echo", "tls-pacs", "--config", cfg]) == 0
    assert "(TLS)" in capsys.readouterr().out


def test_a_run_queries_retrieves_and_stores_over_tls(
    tls_orthanc: Orthanc, pki: dict[str, dict[str, Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (study,) = _write_studies(tmp_path / "files", 1, "tls-run")
    tls_orthanc.upload(sorted((tmp_path / "files").rglob("*.dcm")))
    try:
        cfg = str(_site_file(tmp_path, tls_orthanc, pki))
        for door in ("tls-pacs", "tls-web"):
            tls_orthanc.delete_results(study)
            rc, summary = run_cli(["run", "--archive", door, "--config", cfg, "--worklist",
                                   str(tmp_path / f"{door}.sqlite"), "--workers", "0",
                                   "--json"], capsys)
            assert rc == 0, summary
            assert summary["by_status"] == {"analysed": 1}, (door, summary)
            assert summary["outbox"]["pending"] == 0
            counts = result_counts(tls_orthanc, study)
            assert counts["sr"] == 1 and counts["seg"] == 1, (door, counts)
        rc, summary = run_cli(["run", "--archive", "server-from-another-ca", "--config", cfg,
                               "--worklist", str(tmp_path / "rogue.sqlite"), "--workers", "0",
                               "--json"], capsys)
        assert rc == 3, summary  # the archive could not be queried: nothing was read or sent
    finally:
        tls_orthanc.delete_study(study)


def test_listen_over_tls_receives_from_orthanc_and_refuses_a_stranger(
    tls_orthanc: Orthanc, pki: dict[str, dict[str, Path]], tmp_path: Path,
) -> None:
    """Orthanc sends a study to ``ctscreen listen`` over DICOM TLS (its own certificate,
    signed by the CA the node trusts); the node screens it and stores the results back
    over TLS. A sender with a certificate of another CA, or none, gets no association."""
    (study,) = _write_studies(tmp_path / "files", 1, "tls-listen")
    ids = tls_orthanc.upload(sorted((tmp_path / "files").rglob("*.dcm")))
    cfg = _site_file(tmp_path, tls_orthanc, pki, listen=True)
    node = make_listener(cfg, worklist=tmp_path / "node.sqlite")
    node.start()
    try:
        r = tls_orthanc.session.post(f"{tls_orthanc.url}/modalities/listener/store",
                                     json={"Resources": ids, "Synchronous": True}, timeout=120)
        assert r.status_code == 200, r.text
        assert node.received == len(ids)
        deadline = time.monotonic() + 120
        while not node.summaries and time.monotonic() < deadline:
            time.sleep(0.2)
        (summary,) = node.summaries
        assert summary.by_status == {"analysed": 1}, summary.as_json()
        assert result_counts(tls_orthanc, study)["sr"] == 1

        host, port = node.address
        for who in ("rogue", None):
            assert not _echo(host, port, pki, who), who
        assert _echo(host, port, pki, "good")
    finally:
        node.stop()
        tls_orthanc.delete_study(study)


def _echo(host: str, port: int, pki: dict[str, dict[str, Path]], who: str | None) -> bool:
    """A C-ECHO to the node over TLS with ``who``'s client certificate (None: none)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["good"]["ca"]))
    if who is not None:
        ctx.load_cert_chain(str(pki[who]["client"]), str(pki[who]["client_key"]))
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate(host, port, ae_title=NODE_AE, tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    status: Any = assoc.send_c_echo()
    assoc.release()
    return isinstance(status, Dataset) and status.Status == 0


def test_listen_tls_needs_its_certificate_and_the_senders_ca(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {tls: {enabled: true, cert_file: x.crt}}\n")
    with pytest.raises(ConfigError, match="ca_file"):
        load_config(bad)


def test_a_site_whose_certificate_does_not_verify_is_not_retried_all_night(
    tls_orthanc: Orthanc, pki: dict[str, dict[str, Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Waiting does not mend a certificate: ``ctscreen nightly`` reports such a site
    unreachable with the certificate named, at once (not after site_give_up_s), while a
    site over good TLS is screened."""
    from pipeline.cli import main

    base = _site_file(tmp_path, tls_orthanc, pki).read_text()
    (study,) = _write_studies(tmp_path / "files", 1, "tls-night")
    tls_orthanc.upload(sorted((tmp_path / "files").rglob("*.dcm")))
    cfg = tmp_path / "centre.yaml"
    cfg.write_text(base.replace("batch: {disk_reserve_mb: 0}",
                                "batch: {disk_reserve_mb: 0, site_retry_s: 5, "
                                "site_give_up_s: 600}") + """
sites:
  good: {archives: [tls-pacs]}
  bad: {archives: [server-from-another-ca]}
""")
    try:
        t0 = time.monotonic()
        capsys.readouterr()
        rc = main(["nightly", "--config", str(cfg), "--worklist", str(tmp_path / "c.sqlite"),
                   "--workers", "0", "--until", "2020-03-01T07:00", "--json"])
        import json

        report = json.loads(capsys.readouterr().out)
        assert rc == 5, report
        assert time.monotonic() - t0 < 120  # not the 600 s of site_give_up_s
        assert "certificate verify failed" in report["unreachable"]["bad"]
        assert report["sites"]["good"]["by_status"] == {"analysed": 1}
    finally:
        tls_orthanc.delete_study(study)
