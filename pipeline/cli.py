"""The command line: the only place that parses arguments and configures logging.

ctscreen run --archive DIR [--since DATE] [--config FILE] [--force] [--json]
ctscreen worklist [--archive DIR | --worklist FILE] [--json]
ctscreen demo [--dir DIR] [--phantom-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .errors import CtscreenError

log = logging.getLogger("pipeline.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet = args.command == "worklist"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # highdicom narrates every module it copies at INFO; keep our own lines readable.
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except CtscreenError as e:
        print(f"ctscreen: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctscreen", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"ctscreen {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="screen every CT study of an archive and write results back")
    r.add_argument("--archive", required=True, help="a folder archive (any tree of DICOM files)")
    r.add_argument(
        "--since", type=_date, help="only studies with StudyDate on or after (YYYY-MM-DD)"
    )
    r.add_argument("--config", help="YAML settings overriding the embedded defaults")
    r.add_argument("--worklist", help="worklist database (default: beside the archive)")
    r.add_argument("--force", action="store_true", help="re-screen studies that are unchanged")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")
    r.set_defaults(func=_cmd_run)

    w = sub.add_parser("worklist", help="print the triage worklist, most suspicious first")
    w.add_argument("--archive", help="the archive whose worklist to show")
    w.add_argument("--worklist", help="worklist database file")
    w.add_argument("--config", help="YAML settings (for worklist.path)")
    w.add_argument("--json", action="store_true", help="rows as JSON for scripts")
    w.set_defaults(func=_cmd_worklist)

    d = sub.add_parser("demo", help="build a demo folder archive and screen it")
    d.add_argument("--dir", default="demo", help="where to build it (default: ./demo)")
    d.add_argument("--shared-data", help="../shared/data, for the real LIDC-IDRI-0314 series")
    d.add_argument("--phantom-only", action="store_true", help="do not add the real series")
    d.set_defaults(func=_cmd_demo)
    return p


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from e


def worklist_path(archive: str | None, explicit: str | None, config: Config) -> Path:
    """--worklist, else the configured path, else ``<archive>.ctscreen.sqlite`` beside it."""
    if explicit:
        return Path(explicit)
    if config.worklist.path:
        return Path(config.worklist.path)
    if archive is None:
        raise CtscreenError("give --archive or --worklist (or set worklist.path in the config)")
    root = Path(archive).resolve()
    return root.parent / f"{root.name}.ctscreen.sqlite"


def _cmd_run(args: argparse.Namespace) -> int:
    from .archive.folder import FolderArchive
    from .batch import run_batch
    from .run import Stages
    from .worklist import Worklist, format_table

    config = load_config(args.config)
    archive = FolderArchive(args.archive)
    stages = Stages.load(config)
    wl_path = worklist_path(args.archive, args.worklist, config)
    with Worklist(wl_path) as worklist:
        summary = run_batch(archive, stages, worklist, since=args.since, force=args.force)
        rows = worklist.rows()
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print(summary.text())
        print()
        print(format_table(rows))
        print()
        print(f"worklist: {wl_path}")
        print(f"results:  {Path(args.archive).resolve() / 'ctscreen'}")
    return 1 if summary.by_status.get("failed") else 0


def _cmd_worklist(args: argparse.Namespace) -> int:
    from .worklist import Worklist, format_table

    config = load_config(args.config)
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


if __name__ == "__main__":
    raise SystemExit(main())
