"""The command line: the only place that parses arguments and configures logging.

ctscreen run --archive NAME|DIR [--since DATE | --from DATETIME --to DATETIME] [--config FILE]
             [--worklist FILE] [--workers N | --scheduler ADDRESS] [--force] [--json]
             [--log-file FILE]
ctscreen echo NAME [--config FILE]
ctscreen listen [--config FILE] [--worklist FILE]
ctscreen outbox [--archive NAME|DIR] [--drain] [--retry-refused] [--json]
ctscreen worklist [--archive NAME|DIR | --worklist FILE] [--json]
ctscreen demo [--dir DIR] [--phantom-only]
ctscreen data import --out DIR [--semiseg DIR] [--volumes DIR] [--synthetic-from DICOM_DIR]
ctscreen train [--config configs/train_lesions.yaml] [--resume]
ctscreen evaluate MODEL|density|default DATA [--lungs MODEL|classical] [--config FILE]
                  [--held-out-of MODEL] [--out DIR]
ctscreen evaluate --task lungs MODEL|classical|default DATA [--config FILE] [--out DIR]
ctscreen export [--run DIR] --out models/NAME [--report KEY=REPORT_JSON]
ctscreen serve [--archive NAME|DIR | --worklist FILE] [--config FILE] [--host ADDR] [--port N]
ctscreen user [--archive NAME|DIR | --worklist FILE] add NAME --role ROLE | passwd NAME |
              disable NAME | enable NAME | list

``--config`` defaults to the environment variable CTSCREEN_CONFIG.

``ctscreen run`` on a terminal (stderr a TTY, no ``--verbose``) shows one progress bar for
the batch and a summary line at the end; its log goes to a file (``--log-file``, default
``<worklist>.log`` beside the worklist), warnings and errors to the terminal as well.
Anywhere else (cron, CI, a pipe) it logs to stderr, as every other command does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .config import Config, load_config
from .errors import ArchiveError, CtscreenError

if TYPE_CHECKING:
    from .archive import Archive
    from .batch import BatchSummary

log = logging.getLogger("pipeline.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet = args.command in ("worklist", "outbox", "echo", "user")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # highdicom narrates every module it copies at INFO; keep our own lines readable.
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        # pynetdicom logs every association step, and each failure twice (ours says what
        # failed in one line); its records still reach the archive code's own handlers.
        logging.getLogger("pynetdicom").propagate = False
    try:
        return int(args.func(args))
    except ArchiveError as e:  # the archive, not the command, is at fault: try again later
        print(f"ctscreen: archive error: {e}", file=sys.stderr)
        return 3
    except CtscreenError as e:
        print(f"ctscreen: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctscreen", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"ctscreen {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    config_help = "YAML settings overriding the embedded defaults (default: $CTSCREEN_CONFIG)"
    archive_help = "an archive named in the config's archives: section, or a folder of DICOM files"
    r = sub.add_parser("run", help="screen every CT study of an archive and write results back")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--archive", help=archive_help)
    which.add_argument("--site", help="a site named in the config's sites: section (all its "
                       "archives; dates on the site's clock)")
    r.add_argument(
        "--since", type=_date, help="only studies with StudyDate on or after (YYYY-MM-DD)"
    )
    r.add_argument(
        "--from", dest="start", type=_datetime,
        help="query window start, StudyDate/Time (YYYY-MM-DD[THH:MM])",
    )
    r.add_argument(
        "--to", dest="end", type=_datetime, help="query window end, exclusive (YYYY-MM-DD[THH:MM])"
    )
    r.add_argument("--config", help=config_help)
    r.add_argument("--worklist", help="worklist database (default: beside the archive)")
    r.add_argument(
        "--workers", type=int, metavar="N",
        help="worker processes (default: batch.workers, 1); 0 screens in this process "
        "without the time and memory limits",
    )
    r.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="run the studies on this Dask distributed scheduler (tcp://host:8786)",
    )
    r.add_argument("--force", action="store_true", help="re-screen studies that are unchanged")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")
    r.add_argument(
        "--log-file", metavar="FILE",
        help="append the run's log to FILE (on a terminal, where the progress bar is shown, "
        "the default is <worklist>.log beside the worklist; elsewhere stderr)",
    )
    r.set_defaults(func=_cmd_run)

    n = sub.add_parser("nightly", help="screen every site of the config's sites: in one batch "
                       "(round-robin; an unreachable site is retried, the others go on)")
    n.add_argument("--config", help=config_help)
    n.add_argument("--site", action="append", dest="sites", metavar="NAME",
                   help="only this site (repeat for several; default: all)")
    n.add_argument("--worklist", help="worklist database (default: worklist.path, else "
                   "./ctscreen-sites.sqlite)")
    n.add_argument("--workers", type=int, metavar="N",
                   help="worker processes (default: batch.workers, 1); 0 screens in this "
                   "process without the time and memory limits")
    n.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the studies on this Dask distributed scheduler (tcp://host:8786)")
    n.add_argument("--until", type=_datetime, metavar="YYYY-MM-DD[THH:MM]",
                   help="the night's end on each site's own clock (default: now); each site "
                   "looks at its window_hours before it")
    n.add_argument("--force", action="store_true", help="re-screen studies that are unchanged")
    n.add_argument("--json", action="store_true", help="print the sites' summaries as JSON")
    n.add_argument("--log-file", metavar="FILE",
                   help="append the run's log to FILE (default on a terminal: beside the "
                   "worklist)")
    n.set_defaults(func=_cmd_nightly)

    e = sub.add_parser("echo", help="check that a configured archive answers (C-ECHO or QIDO)")
    e.add_argument("name", help="an archive named in the config's archives: section")
    e.add_argument("--config", help=config_help)
    e.set_defaults(func=_cmd_echo)

    li = sub.add_parser("listen", help="receive studies by C-STORE and screen each once complete")
    li.add_argument("--config", help=config_help + "; its listen: section sets the node")
    li.add_argument("--worklist", help="worklist database (default: beside the spool folder)")
    li.set_defaults(func=_cmd_listen)

    o = sub.add_parser("outbox", help="show (or deliver) results waiting for an archive")
    o.add_argument("--archive", help=archive_help + " (default: every archive in the outbox)")
    o.add_argument("--worklist", help="worklist database whose outbox to use")
    o.add_argument("--config", help=config_help)
    o.add_argument("--drain", action="store_true", help="deliver everything pending now")
    o.add_argument(
        "--retry-refused", action="store_true",
        help="with --drain: also try objects the archive refused (after fixing the cause)",
    )
    o.add_argument("--json", action="store_true", help="items as JSON for scripts")
    o.set_defaults(func=_cmd_outbox)

    w = sub.add_parser("worklist", help="print the triage worklist, most suspicious first")
    w.add_argument("--archive", help="the archive whose worklist to show")
    w.add_argument("--worklist", help="worklist database file")
    w.add_argument("--config", help=config_help + " (for worklist.path)")
    w.add_argument("--json", action="store_true", help="rows as JSON for scripts")
    w.set_defaults(func=_cmd_worklist)

    d = sub.add_parser("demo", help="build a demo folder archive and screen it")
    d.add_argument("--dir", default="demo", help="where to build it (default: ./demo)")
    d.add_argument("--shared-data", help="../shared/data, for the real LIDC-IDRI-0314 series")
    d.add_argument("--phantom-only", action="store_true", help="do not add the real series")
    d.set_defaults(func=_cmd_demo)
    _add_model_commands(sub)
    _add_web_commands(sub, config_help, archive_help)
    return p


def _add_web_commands(sub: Any, config_help: str, archive_help: str) -> None:
    """``ctscreen serve`` and ``ctscreen user ...`` (the web extra; docs/web.md)."""
    s = sub.add_parser("serve", help="serve the worklist to browsers (loopback by default)")
    s.add_argument("--archive", help="the archive whose worklist to serve")
    s.add_argument("--worklist", help="worklist database file")
    s.add_argument("--config", help=config_help + "; its web: section sets the server")
    s.add_argument("--host", help="address to listen on (default: web.bind_address)")
    s.add_argument("--port", type=int, help="port (default: web.port)")
    s.set_defaults(func=_cmd_serve)

    u = sub.add_parser("user", help="the web's users: add, list, disable, enable, passwd")
    u.add_argument("--archive", help="the archive whose worklist the web serves")
    u.add_argument("--worklist", help="worklist database file (the web's users live beside it)")
    u.add_argument("--config", help=config_help + " (web.db, worklist.path)")
    uu = u.add_subparsers(dest="user_command", required=True)
    ua = uu.add_parser("add", help="add a user (asks for the password)")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=("radiologist", "admin", "researcher"),
                    help="radiologist: reads and reviews; admin: also the audit log; "
                    "researcher: never sees names or IDs, cannot review")
    ua.add_argument("--site", action="append", dest="sites", metavar="SITE",
                    help="a site (of a regional centre) whose studies the user sees; repeat "
                    "for several (default: every site)")
    us = uu.add_parser("sites", help="set the sites whose studies a user sees (their sessions "
                       "end)")
    us.add_argument("name")
    group = us.add_mutually_exclusive_group(required=True)
    group.add_argument("--site", action="append", dest="sites", metavar="SITE")
    group.add_argument("--all", action="store_true", help="every site")
    up = uu.add_parser("passwd", help="set a user's password (their sessions end)")
    up.add_argument("name")
    for cmd in (ua, up):
        cmd.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of stdin (scripts)")
    for name, text in (("disable", "disable a user (their sessions end)"),
                       ("enable", "enable a disabled user again")):
        uu.add_parser(name, help=text).add_argument("name")
    uu.add_parser("list", help="list the users")
    u.set_defaults(func=_cmd_user)


def _web_paths(args: argparse.Namespace) -> tuple[Config, Path]:
    config = _config(args)
    if config.sites and not args.archive:  # a regional centre: the sites' worklist
        from .api import sites_worklist_path

        return config, sites_worklist_path(args.worklist, config)
    return config, worklist_path(args.archive, args.worklist, config)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .web.app import create_app
    except ImportError as e:
        raise CtscreenError(f"ctscreen serve needs the web extra (pip install "
                            f"'ctscreen[web]'): {e}") from e
    config, wl = _web_paths(args)
    app = create_app(config, wl)
    host = args.host or config.web.bind_address
    port = args.port or config.web.port
    log.info("serving worklist %s on http://%s:%d", wl, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                proxy_headers=False)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise CtscreenError("the two passwords differ")
    return first


def _cmd_user(args: argparse.Namespace) -> int:
    try:
        from .web import auth, db
    except ImportError as e:
        raise CtscreenError(f"ctscreen user needs the web extra: {e}") from e
    config, wl = _web_paths(args)
    path = db.web_db_path(config, wl)
    db.create(path)
    with db.connect(path) as conn:
        cmd = args.user_command
        if cmd == "add":
            _check_sites(config, args.sites)
            auth.add_user(conn, args.name, args.role, _read_password(args), time.time(),
                          args.sites)
            where = f", sites {', '.join(args.sites)}" if args.sites else ""
            print(f"added {args.name} ({args.role}{where}) to {path}")
        elif cmd == "sites":
            _check_sites(config, args.sites)
            auth.set_sites(conn, args.name, None if args.all else args.sites)
            print(f"{args.name} sees {'every site' if args.all else ', '.join(args.sites)}; "
                  "their sessions ended")
        elif cmd == "passwd":
            auth.set_password(conn, args.name, _read_password(args), time.time())
            print(f"password of {args.name} changed; their sessions ended")
        elif cmd in ("disable", "enable"):
            auth.set_disabled(conn, args.name, cmd == "disable")
            print(f"{args.name} {cmd}d")
        else:
            users = auth.list_users(conn)
            for u in users:
                state = " (disabled)" if u["disabled"] else ""
                sites = u["sites"]
                seen = "every site" if sites is None else "sites " + ", ".join(sites)  # type: ignore[arg-type]
                print(f"{u['username']:<24} {u['role']:<12} since {u['created_at']}; "
                      f"{seen}{state}")
            if not users:
                print(f"(no users in {path}; add one with: ctscreen user add NAME --role ROLE)")
    return 0


def _check_sites(config: Config, sites: list[str] | None) -> None:
    """Each site named must be one of the config's sites: (where it has any)."""
    for site in sites or ():
        if config.sites:
            config.site(site)
        else:
            from .config import SITE_NAME

            if not re.match(SITE_NAME, site):
                raise CtscreenError(f"expected a site name, got {site!r}")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from e


def _datetime(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected a date/time as YYYY-MM-DD or YYYY-MM-DDTHH:MM, got {text!r}"
        ) from e


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("CTSCREEN_CONFIG") or None)


def worklist_path(archive: str | None, explicit: str | None, config: Config) -> Path:
    from .api import worklist_path as path

    return path(archive, explicit, config)


def outbox_path(worklist: Path, config: Config) -> Path:
    from .api import outbox_path as path

    return path(worklist, config)


def _archive(name: str, config: Config) -> Archive:
    from .archive import open_named

    return open_named(name, config)


def _cmd_run(args: argparse.Namespace) -> int:
    from .api import run_batch, run_site, sites_worklist_path
    from .artefacts import QueryWindow
    from .worklist import Worklist, format_table

    config = _config(args)
    if args.since and args.start:
        raise CtscreenError("give --since or --from, not both")
    if args.workers is not None and args.scheduler:
        raise CtscreenError("give --workers or --scheduler, not both")
    window = QueryWindow(args.start, args.end) if (args.start or args.end) else None
    if args.site:
        config.site(args.site)
        site = args.site
        wl_path = sites_worklist_path(args.worklist, config)
        archive = None
    else:
        archive = _archive(args.archive, config)
        site = config.site_of(args.archive)
        wl_path = (sites_worklist_path(args.worklist, config) if site
                   else worklist_path(args.archive, args.worklist, config))
    with _run_output(args, wl_path) as bar:
        kwargs: dict[str, Any] = dict(
            worklist=args.worklist, since=args.since, window=window, force=args.force,
            workers=args.workers, scheduler=args.scheduler,
            progress=None if bar is None else bar.update)
        if args.site:
            summary = run_site(args.site, config, **kwargs)
        else:
            summary = run_batch(args.archive, config, **kwargs)
        if bar is not None:
            bar.finish(summary)
    with Worklist(wl_path, site=site or None) as worklist:
        rows = worklist.rows()
    _write_last_run(wl_path, summary.as_json())
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print(summary.text())
        print()
        print(format_table(rows))
        print()
        print(f"worklist: {wl_path}")
        if archive is not None:
            root = getattr(archive, "root", None)
            print(f"results:  {root / 'ctscreen' if root is not None else archive.name}")
    if summary.stopped:
        return 4
    return 1 if summary.by_status.get("failed") else 0


def _cmd_nightly(args: argparse.Namespace) -> int:
    from .api import nightly, sites_worklist_path
    from .worklist import Worklist, format_table

    config = _config(args)
    if args.workers is not None and args.scheduler:
        raise CtscreenError("give --workers or --scheduler, not both")
    wl_path = sites_worklist_path(args.worklist, config)
    with _run_output(args, wl_path) as bar:
        summaries = nightly(config, worklist=args.worklist, sites=args.sites, force=args.force,
                            workers=args.workers, scheduler=args.scheduler, until=args.until,
                            progress=None if bar is None else bar.update)
        if bar is not None:
            bar.close(f"ctscreen nightly: {len(summaries)} sites, "
                      f"{sum(s.done for s in summaries)} studies done")
    report = nightly_json(summaries)
    _write_last_run(wl_path, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(nightly_text(summaries))
        with Worklist(wl_path) as worklist:
            rows = worklist.rows()
        print()
        print(format_table(rows))
        print()
        print(f"worklist: {wl_path}")
    if any(s.stopped for s in summaries):
        return 4
    if any(s.unreachable for s in summaries):
        return 5
    return 1 if any(s.by_status.get("failed") for s in summaries) else 0


def nightly_json(summaries: list[BatchSummary]) -> dict[str, Any]:
    """The night's summary for monitoring: each site's, and the totals."""
    total: Counter[str] = Counter()
    for s in summaries:
        total.update({"studies_found": s.studies_found, "screened": s.screened,
                      "skipped_unchanged": s.skipped_unchanged, "pending": s.pending,
                      "outputs_written": s.outputs_written})
    return {
        "sites": {s.site: s.as_json() for s in summaries},
        "total": dict(total),
        "unreachable": {s.site: s.unreachable for s in summaries if s.unreachable},
        "duration_s": round(max((s.duration_s for s in summaries), default=0.0), 2),
    }


def nightly_text(summaries: list[BatchSummary]) -> str:
    """The night's report for the person on the night shift: each site's, then a line of
    counts per site."""
    parts = [s.text() for s in summaries]
    head = f"{'site':<16} {'found':>6} {'screened':>8} {'done before':>11} {'pending':>7}  status"
    lines = [head, "-" * len(head)]
    for s in summaries:
        state = f"UNREACHABLE: {s.unreachable}" if s.unreachable else "ok"
        seconds = sum(s.stage_seconds.values())
        lines.append(f"{s.site[:16]:<16} {s.studies_found:>6} {s.screened:>8} "
                     f"{s.skipped_unchanged:>11} {s.pending:>7}  {state}; "
                     f"{seconds:.0f} s of screening")
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the progress bar


def progress_wanted(args: argparse.Namespace, stream: TextIO) -> bool:
    """A progress bar instead of the log on ``stream``: a terminal (not a dumb one), and
    no ``--verbose`` (which asks for the log itself)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a file
        tty = False
    return tty and not args.verbose and os.environ.get("TERM") != "dumb"


def render_progress(summary: BatchSummary | None, elapsed_s: float, width: int = 80) -> str:
    """The bar's one line, at most ``width - 1`` characters: studies done of those found,
    how those screened came out, the time so far.  Counts only: no study, patient or
    accession is ever named."""
    text = _progress_text(summary, elapsed_s)
    if summary is None:
        return ("ctscreen run: " + text)[: max(width - 1, 0)]
    room = min(width - 1 - len(text) - 3, 30)
    if room < 10:  # a narrow terminal: the numbers alone
        return text[: max(width - 1, 0)]
    total, done = summary.studies_found, summary.done
    filled = room * done // total if total else room
    return "[" + "#" * filled + "." * (room - filled) + "] " + text


def _progress_text(summary: BatchSummary | None, elapsed_s: float) -> str:
    if summary is None:
        return f"starting, finding studies ... {_clock(elapsed_s)}"
    by = summary.by_status
    text = (f"{summary.done}/{summary.studies_found} studies  analysed {by.get('analysed', 0)}, "
            f"not analysed {by.get('not-analysed', 0)}, failed {by.get('failed', 0)}")
    skipped = summary.skipped_unchanged + summary.busy_elsewhere + summary.lease_lost
    if skipped:
        text += f", skipped {skipped}"
    return f"{text}  {_clock(elapsed_s)}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """The bar on a terminal stream, redrawn when a study is done and once a second (the
    clock); ``message`` prints a line above it."""

    REDRAW_S = 1.0

    def __init__(self, stream: TextIO, log_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream, self.log_path, self._now = stream, log_path, clock
        self._t0 = clock()
        self._summary: BatchSummary | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        self._draw()
        self._ticker = threading.Thread(target=self._tick, name="ctscreen-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.REDRAW_S):
            self._draw()

    def update(self, summary: BatchSummary) -> None:
        self._summary = summary
        self._draw()

    def line(self) -> str:
        return render_progress(self._summary, self._now() - self._t0, self._width())

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 80

    def _draw(self) -> None:
        with self._lock:
            if not self._closed:
                self._stream.write("\r" + self.line() + "\x1b[K")
                self._stream.flush()

    def message(self, text: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._stream.write("\r\x1b[K" + text + "\n" + self.line() + "\x1b[K")
            self._stream.flush()

    def finish(self, summary: BatchSummary) -> None:
        """The bar replaced by the run's summary line (and where its log is)."""
        by = summary.by_status
        text = (f"ctscreen run: {summary.done} of {summary.studies_found} studies in "
                f"{_clock(self._now() - self._t0)}: {by.get('analysed', 0)} analysed, "
                f"{by.get('not-analysed', 0)} not analysed, {by.get('failed', 0)} failed")
        skipped = summary.skipped_unchanged + summary.busy_elsewhere + summary.lease_lost
        if skipped:
            text += f", {skipped} skipped (unchanged or screened by another run)"
        if summary.stopped:
            text += f"; STOPPED EARLY: {summary.stopped}"
        self.close(text)

    def close(self, text: str | None = None) -> None:
        """Stop the clock; the bar's line becomes ``text`` (default: where the run stopped),
        followed by the log's path."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._closed:
                return
            if text is None:
                text = "ctscreen run: stopped at " + _progress_text(
                    self._summary, self._now() - self._t0)
            if self.log_path is not None:
                text += f"\n  log: {self.log_path}"
            self._stream.write("\r\x1b[K" + text + "\n")
            self._stream.flush()
            self._closed = True


class _BarHandler(logging.Handler):
    """Log records (warnings and errors) printed above the bar."""

    def __init__(self, bar: ProgressBar) -> None:
        super().__init__(logging.WARNING)
        self.bar = bar
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bar.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not stop the run
            self.handleError(record)


@contextmanager
def _run_output(args: argparse.Namespace, wl_path: Path) -> Iterator[ProgressBar | None]:
    """Where ``ctscreen run`` reports: on a terminal a progress bar (yielded), the log in a
    file; elsewhere the log on stderr as configured, or in ``--log-file``."""
    explicit = Path(args.log_file) if args.log_file else None
    bar_wanted = progress_wanted(args, sys.stderr)
    if explicit is None and not bar_wanted:
        yield None
        return
    path = explicit or wl_path.with_name(wl_path.name + ".log")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        if explicit is not None:
            raise CtscreenError(f"cannot write the log file {path}: {e}") from e
        log.warning("cannot write the log file %s (%s): logging here instead", path, e)
        yield None
        return
    with _log_to(fd) as terminal:
        if not bar_wanted:
            yield None
            return
        bar = ProgressBar(terminal, log_path=path.resolve())
        handler = _BarHandler(bar)
        logging.getLogger().addHandler(handler)
        bar.start()
        try:
            yield bar
        finally:
            logging.getLogger().removeHandler(handler)
            bar.close()


@contextmanager
def _log_to(fd: int) -> Iterator[TextIO]:
    """This process's log handlers on stderr, and file descriptor 2 itself (what worker
    processes and libraries write), sent to ``fd``; yields the terminal (the former
    stderr) and puts everything back on the way out."""
    root = logging.getLogger()
    moved = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
             and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)]
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    logfile = os.fdopen(os.dup(fd), "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(fd, 2)
    os.close(fd)
    streams = [h.setStream(logfile) for h in moved]
    try:
        yield terminal
    finally:
        for h, stream in zip(moved, streams, strict=True):
            if stream is not None:
                h.setStream(stream)
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        logfile.close()
        terminal.close()


def _write_last_run(wl_path: Path, summary: dict[str, Any]) -> None:
    """The run summary as JSON beside the worklist, for monitoring (replaced each run)."""
    from .durable import TMP_PREFIX

    path = wl_path.with_name(wl_path.name + ".last-run.json")
    tmp = path.with_name(f"{TMP_PREFIX}-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def _cmd_echo(args: argparse.Namespace) -> int:
    config = _config(args)
    archive = _archive(args.name, config)
    echo = getattr(archive, "echo", None)
    if echo is None:
        print(f"{archive.name}: a folder archive; nothing to echo")
        return 0
    try:
        print(echo())
    except ArchiveError as e:
        print(f"ctscreen echo {args.name}: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    from .api import listener as make_listener

    listener = make_listener(_config(args), worklist=args.worklist)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the study in progress", signum)
        listener._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener.serve_forever()
    return 0


def _cmd_outbox(args: argparse.Namespace) -> int:
    from .outbox import Outbox

    config = _config(args)
    wl_path = worklist_path(args.archive, args.worklist, config)
    path = outbox_path(wl_path, config)
    if not path.exists():
        raise CtscreenError(f"no outbox at {path}: nothing was ever queued there")
    status = 0
    with Outbox(path, config.outbox) as outbox:
        if args.drain:
            if args.archive is None:
                raise CtscreenError("--drain needs --archive NAME: the archive to deliver to")
            archive = _archive(args.archive, config)
            d = outbox.deliver(archive, due_only=False, retry_refused=args.retry_refused)
            print(
                f"{archive.name}: {len(d.delivered)} delivered, {len(d.pending)} still waiting"
                f"{' (archive unavailable)' if d.archive_down else ''}, "
                f"{len(d.refused)} refused",
                file=sys.stderr,
            )
            status = 1 if d.pending or d.refused else 0
        name = None
        if args.archive is not None and not args.drain:
            name = _archive(args.archive, config).name
        elif args.drain:
            name = archive.name
        items = [it for it in outbox.items(name) if it.state in ("pending", "refused")]
        counts = outbox.counts(name)
    if args.json:
        print(json.dumps({"counts": counts, "items": [it.__dict__ for it in items]}, indent=2))
        return status
    print(
        f"outbox {path}: {counts['pending']} pending, {counts['refused']} refused, "
        f"{counts['delivered']} delivered, {counts['superseded']} superseded before delivery"
    )
    for it in items:
        when = datetime.fromtimestamp(it.next_attempt).isoformat(sep=" ", timespec="seconds")
        extra = f"status {it.status}" if it.state == "refused" else f"next try {when}"
        print(
            f"  {it.state:<8} {it.kind:<3} {it.archive}  study {it.study_uid}  sop {it.sop_uid}"
            f"  attempts {it.attempts}  {extra}  {it.last_error[:120]}"
        )
    return status


def _cmd_worklist(args: argparse.Namespace) -> int:
    from .worklist import Worklist, format_table

    config = _config(args)
    path = worklist_path(args.archive, args.worklist, config)
    if not path.exists():
        raise CtscreenError(f"no worklist at {path}: run `ctscreen run` on that archive first")
    with Worklist(path) as worklist:
        rows = worklist.rows()
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_archive

    root = Path(args.dir).resolve()
    archive = build_demo_archive(root, shared_data=args.shared_data, phantom_only=args.phantom_only)
    return main(["run", "--archive", str(archive), "--force"])



# --------------------------------------------------------------------------- the lesion model


def _add_model_commands(sub: Any) -> None:
    """ctscreen data import | train | evaluate | export (the learned lesion model, issue 4)."""
    da = sub.add_parser("data", help="training / evaluation data").add_subparsers(
        dest="data_command", required=True)
    di = da.add_parser("import", help="build a lesion dataset from annotated slices, volumes "
                       "and synthetic insertion")
    di.add_argument("--out", required=True, help="new dataset folder")
    di.add_argument("--semiseg", action="append", default=[],
                    help="folder with Imgs/*.jpg + GT/*.png (8-bit annotated slices)")
    di.add_argument("--volumes", action="append", default=[],
                    help="folder SITE/CASE/{image.nii.gz|image/, label.nii.gz|seg.dcm}")
    di.add_argument("--ma20", action="append", default=[],
                    help="folder ct/ + lungs/ + infection/ + volumes.csv (full-field 8-bit "
                         "slices, merged infection masks); its volumes keep the lung model's "
                         "patient split (train / val / test)")
    di.add_argument("--synthetic-from", help="a lesion-free real CT series (DICOM folder)")
    di.add_argument("--synthetic-cases", type=int, default=8)
    di.add_argument("--seed", type=int, default=0)
    di.set_defaults(func=_cmd_data_import)

    t = sub.add_parser("train", help="train the lesion or lung model (needs the train extra)")
    t.add_argument("--task", choices=("lesions", "lungs"), default="lesions")
    t.add_argument("--config", help="default: configs/train_<task>.yaml")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="score a lesion detector or a lung segmenter on a "
                        "dataset, the way the batch runs it")
    ev.add_argument("model", help="--task lesions: a lesion model folder (models/NAME), "
                    "'density' or 'default' (the configured detector); --task lungs: a lung "
                    "model folder, 'classical' or 'default' (the configured lungs)")
    ev.add_argument("data", help="a dataset, or a folder in any import layout (semiseg, ma20, "
                    "volumes)")
    ev.add_argument("--task", choices=("lesions", "lungs"), default="lesions")
    ev.add_argument("--lungs", help="--task lesions: the lung segmenter whose mask is the region "
                    "on full-field cases: a lung model folder or 'classical' (default: the "
                    "configured lungs)")
    ev.add_argument("--config", help="YAML settings overriding the embedded defaults (default: "
                    "$CTSCREEN_CONFIG): its lesions and lungs sections")
    ev.add_argument("--held-out-of", action="append", default=[], metavar="MODEL",
                    help="also leave out the cases this model folder saw (repeatable)")
    ev.add_argument("--min-lesion-mm2", type=float, default=20.0)
    ev.add_argument("--bootstrap", type=int, default=2000)
    ev.add_argument("--out", help="write report.json and report.md here")
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="checkpoint -> model.onnx, model.yaml, MODEL_CARD.md")
    ex.add_argument("--task", choices=("lesions", "lungs"), default="lesions")
    ex.add_argument("--run", help="training run folder (default: work/train-<task>)")
    ex.add_argument("--out", required=True, help="model folder, e.g. models/NAME")
    ex.add_argument("--report", action="append", default=[], metavar="KEY=REPORT_JSON",
                    help="attach an evaluation (e.g. model=..., baseline=...)")
    ex.add_argument("--checkpoint", choices=("best", "last"), default="best")
    ex.add_argument("--note", action="append", default=[],
                    help="a line for the model card (lungs task): how it was chosen, a limit")
    ex.set_defaults(func=_cmd_export)


def _cmd_data_import(args: argparse.Namespace) -> int:
    from .train.dataset import import_into

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CtscreenError(f"{out} is not empty: choose a new folder for the dataset")
    ds = import_into(out, [Path(p) for p in args.semiseg], [Path(p) for p in args.volumes],
                     Path(args.synthetic_from) if args.synthetic_from else None,
                     args.synthetic_cases, args.seed, ma20=[Path(p) for p in args.ma20],
                     ma20_fixed_splits=True)
    print(f"{len(ds.records)} cases in {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    config = args.config or f"configs/train_{args.task}.yaml"
    if args.task == "lungs":
        from .config import load_lung_train_config
        from .train.lungs import train as train_lungs

        run = train_lungs(load_lung_train_config(config), resume=args.resume)
        print(f"checkpoints in {run}")
        return 0
    from .config import load_train_config
    from .train.loop import train

    run = train(load_train_config(config), resume=args.resume)
    print(f"checkpoints in {run}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from .train.dataset import open_dataset
    from .train.evaluate import evaluate, evaluate_lungs, report_markdown, write_report

    config = _config(args)
    if args.task == "lungs" and args.lungs:
        raise CtscreenError("--lungs is for --task lesions; with --task lungs the segmenter is "
                            "the first argument")
    with tempfile.TemporaryDirectory(prefix="ctscreen-eval-") as tmp:
        ds = open_dataset(args.data, Path(tmp))
        if args.task == "lungs":
            report = evaluate_lungs(args.model, ds, args.held_out_of, n_boot=args.bootstrap,
                                    config=config)
        else:
            report = evaluate(args.model, ds, args.held_out_of, args.min_lesion_mm2,
                              n_boot=args.bootstrap, config=config, lungs=args.lungs)
    report["dataset"] = str(args.data)  # what was given, not the folder it was imported to
    if args.out:
        write_report(report, Path(args.out))
    print(report_markdown(report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export_model

    run_dir = Path(args.run or f"work/train-{args.task}")
    if args.task == "lungs":
        from .train.lungs import export_lung_model

        metrics = {}
        for item in args.report:
            key, _, path = item.partition("=")
            if not path:
                raise CtscreenError(f"--report: expected KEY=REPORT_JSON, got {item!r}")
            metrics[key] = json.loads(Path(path).read_text(encoding="utf-8"))
        print(f"exported "
              f"{export_lung_model(run_dir, Path(args.out), args.checkpoint, metrics, args.note)}")
        return 0
    reports = {}
    for item in args.report:
        key, _, path = item.partition("=")
        if not path:
            raise CtscreenError(f"--report: expected KEY=REPORT_JSON, got {item!r}")
        reports[key] = Path(path)
    path = export_model(run_dir, Path(args.out), reports, checkpoint=args.checkpoint)
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
