"""``ctscreen run`` on a terminal: one progress bar and a summary line on stderr, the log in
a file beside the worklist; ``--verbose`` or a non-terminal (every other test) logs as
before.  The bar shows counts only, never a patient, study or accession."""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import select
import struct
import subprocess
import termios
from collections import Counter
from pathlib import Path

import pytest
from batch_kit import CTSCREEN, prepare, worklist_file, write_batch

from pipeline.batch import BatchSummary
from pipeline.cli import ProgressBar, progress_wanted, render_progress

REPO = Path(__file__).resolve().parents[1]
# what write_ct_series writes by default: must never reach the terminal
PATIENT_ID, PATIENT_NAME, ACCESSION = "PHANTOM-001", "Phantom^Chest", "B00"


def summary(found: int = 10, **by_status: int) -> BatchSummary:
    s = BatchSummary(archive="night", studies_found=found)
    s.by_status = Counter({k.replace("_", "-"): v for k, v in by_status.items()})
    return s


# ---------------------------------------------------------------- the bar's line


def test_the_line_counts_studies_and_outcomes() -> None:
    s = summary(10, analysed=3, not_analysed=1, failed=1)
    line = render_progress(s, 83.0, width=100)
    assert line.startswith("[") and "] 5/10 studies" in line
    assert "analysed 3, not analysed 1, failed 1" in line and line.endswith("1:23")
    assert line.count("#") == 15 and len(line) <= 99  # half of a 30-character bar
    s.skipped_unchanged = 2
    assert "7/10 studies" in render_progress(s, 0, 100) and "skipped 2" in render_progress(s, 0)


def test_the_line_fits_the_terminal() -> None:
    s = summary(200, analysed=150)
    for width in (20, 40, 60, 80, 200):
        assert len(render_progress(s, 3725.0, width)) <= width - 1
    assert render_progress(s, 3725.0, 60).startswith("150/200 studies")  # no room for a bar
    assert render_progress(s, 3725.0, 200).endswith("1:02:05")
    assert render_progress(None, 4.0) == "ctscreen run: starting, finding studies ... 0:04"
    assert render_progress(summary(0), 1.0).startswith("[")  # an empty night is complete


def test_the_bar_draws_prints_above_and_ends_in_a_summary() -> None:
    out = io.StringIO()
    now = [100.0]
    bar = ProgressBar(out, log_path=Path("/x/night.ctscreen.sqlite.log"), clock=lambda: now[0])
    bar.update(summary(4))
    bar.message("WARNING pipeline.batch: something")
    now[0] += 61
    s = summary(4, analysed=2, not_analysed=1)
    s.skipped_unchanged = 1
    bar.update(s)
    bar.finish(s)
    bar.message("after the end: not shown")
    bar.close()  # once only
    text = out.getvalue()
    assert "\r\x1b[KWARNING pipeline.batch: something\n[" in text
    assert text.endswith(
        "\r\x1b[Kctscreen run: 4 of 4 studies in 1:01: 2 analysed, 1 not analysed, 0 failed, "
        "1 skipped (unchanged or screened by another run)\n  log: /x/night.ctscreen.sqlite.log\n"
    )
    assert "not shown" not in text


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_bar_only_on_a_terminal_without_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    quiet, verbose = argparse.Namespace(verbose=False), argparse.Namespace(verbose=True)
    assert progress_wanted(quiet, _Stream(tty=True))
    assert not progress_wanted(quiet, _Stream(tty=False))
    assert not progress_wanted(verbose, _Stream(tty=True))
    closed = io.StringIO()
    closed.close()
    assert not progress_wanted(quiet, closed)  # isatty raises on a closed stream
    monkeypatch.setenv("TERM", "dumb")
    assert not progress_wanted(quiet, _Stream(tty=True))


# ---------------------------------------------------------------- the command on a terminal


def run_on_terminal(args: list[str], columns: int = 120) -> tuple[int, str, str]:
    """``ctscreen ARGS`` with its stderr on a pseudo-terminal: (exit status, what the
    terminal showed, stdout)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm"}
    env.pop("CTSCREEN_FAULT_KILL", None)
    p = subprocess.Popen([*CTSCREEN, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=slave, env=env, cwd=REPO, text=True)
    os.close(slave)
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            if not ready:
                p.kill()
                pytest.fail("no output on the terminal for 300 s")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    out, _ = p.communicate(timeout=120)
    return p.returncode, shown.decode(errors="replace"), out


@pytest.mark.heavy  # two runs of the command
def test_run_on_a_terminal_shows_a_bar_and_logs_to_a_file(tmp_path: Path) -> None:
    archive, config = prepare(write_batch(tmp_path / "source", n=2), tmp_path / "night")
    rc, shown, out = run_on_terminal(["run", "--archive", str(archive), "--config", str(config)])
    assert rc == 0, shown
    assert "] 0/2 studies" in shown and "] 2/2 studies  analysed 1, not analysed 1" in shown
    assert "ctscreen run: 2 of 2 studies in " in shown
    assert ": 1 analysed, 1 not analysed, 0 failed" in shown
    log_file = worklist_file(archive).with_name(worklist_file(archive).name + ".log")
    assert f"log: {log_file}" in shown
    # no log line on the terminal, neither this process's nor its worker's; no identifier
    assert " INFO " not in shown and "[w" not in shown
    for secret in (PATIENT_ID, PATIENT_NAME, ACCESSION, "study0", "1.2."):
        assert secret not in shown
    log = log_file.read_text()
    assert "INFO    pipeline.batch: [1/2] study" in log and "[2/2] study" in log
    assert "pipeline.workers[w" in log or "]: " in log  # the worker's lines too
    assert "ctscreen run on " in out and "worklist: " in out  # stdout as before

    # --verbose: the log on the terminal, no bar (here in this process)
    rc, shown, out = run_on_terminal(["-v", "run", "--archive", str(archive), "--config",
                                      str(config), "--workers", "0"])
    assert rc == 0, shown
    assert "pipeline.batch: [2/2] study" in shown and "studies  analysed" not in shown
    assert "ctscreen run on " in out
