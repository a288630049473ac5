"""A throw-away PKI for the TLS tests, made with the openssl command: a certificate
authority, a server and a client certificate signed by it (for 127.0.0.1 / localhost), and a
second, rogue authority with its own server and client certificates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSIONS = ("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth,clientAuth\n"
              "basicConstraints=CA:FALSE\n")


def require_openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        msg = "openssl is not installed (apt: openssl)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([require_openssl(), *args], cwd=cwd, check=True, capture_output=True,
                   timeout=120)


def authority(root: Path, name: str) -> dict[str, Path]:
    """``name``-ca.crt / .key, and ``name``-server and ``name``-client certificates (with
    their keys, and a ``.pem`` of certificate and key together) signed by it."""
    root.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         f"/CN=ctscreen test {name} CA", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt",
         cwd=root)
    (root / "ext.cnf").write_text(EXTENSIONS)
    out = {"ca": root / f"{name}-ca.crt"}
    for who in ("server", "client"):
        stem = f"{name}-{who}"
        _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
             f"{stem}.key", "-out", f"{stem}.csr", cwd=root)
        _run("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{name}-ca.crt", "-CAkey",
             f"{name}-ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
             "-out", f"{stem}.crt", cwd=root)
        pem = root / f"{stem}.pem"
        pem.write_text((root / f"{stem}.crt").read_text() + (root / f"{stem}.key").read_text())
        out[who] = root / f"{stem}.crt"
        out[f"{who}_key"] = root / f"{stem}.key"
        out[f"{who}_pem"] = pem
    return out


class TlsProxy:
    """HTTPS in front of a plain HTTP server on loopback: each TLS connection (our server
    certificate, TLS 1.2+) is relayed byte for byte to ``target_port``.  Orthanc 1.10.1 from
    Debian serves HTTPS itself (SslEnabled) but its process dies (SIGSEGV) on the first
    HTTPS request on this machine (OpenSSL 3.0), so the DICOMweb-over-https tests put this
    in front of its HTTP port instead: the TLS that ctscreen's client checks is real."""

    def __init__(self, cert: Path, key: Path, target_port: int) -> None:
        import socket
        import ssl
        import threading

        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(str(cert), str(key))
        self._target = target_port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: object) -> None:
        import socket
        import ssl
        import threading

        try:
            tls = self._ctx.wrap_socket(conn, server_side=True)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError):
            conn.close()  # type: ignore[attr-defined]
            return  # a client that does not trust us: nothing is relayed
        upstream = socket.create_connection(("127.0.0.1", self._target))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pump, args=(upstream, tls), daemon=True)
        t.start()
        pump(tls, upstream)
        t.join(timeout=30)
        tls.close()
        upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
