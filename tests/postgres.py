"""A real PostgreSQL server (Debian's) started in a temporary folder for one test session:
its own data directory and Unix socket, no TCP, trust authentication for the local
socket only.  The server refuses to run as root, so it runs as the ``postgres`` user
that the Debian package creates."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def require_postgres() -> Path:
    bindir = _bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL (Debian package postgresql) is missing in CI")
        pytest.skip("PostgreSQL (Debian package postgresql) is not installed")
    return bindir


@contextmanager
def postgres_server(port: int) -> Iterator[str]:
    """Start a server; yields a libpq URL for database ``ctscreen`` over its socket."""
    bindir = require_postgres()
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="ctscreen-pg-"))
    data, sock = base / "data", base / "sock"
    data.mkdir()
    sock.mkdir()
    if as_user:
        os.chown(base, pw.pw_uid, pw.pw_gid)
        os.chown(data, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
    run = lambda *cmd: subprocess.run(  # noqa: E731
        [*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120
    )
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l",
            str(base / "server.log"), "-o",
            f"-c listen_addresses='' -k {sock} -p {port} -c fsync=off", "start")
        run(str(bindir / "createdb"), "-h", str(sock), "-p", str(port), "-U", "postgres",
            "ctscreen")
        yield f"postgresql://postgres@/ctscreen?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
