"""How `ctscreen run` scales: with the number of studies, and with the slices per series.

    .venv/bin/python bench/scaling.py [--sizes 1 2 4 8] [--slices 100 250 500 1000]
                                      [--workers N] [--shared-data DIR] [--keep DIR] [--json OUT]

    .venv/bin/python bench/scaling.py --sizes 1 --slices 100          # smoke run (under a minute)
    .venv/bin/python bench/scaling.py --sizes 1 2 4 8 --slices        # (a) only
    .venv/bin/python bench/scaling.py --sizes --slices 100 250 500 1000 --json scaling.json

A benchmark: it reports, it never fails on a slow machine.  Exit status 0 when every
`ctscreen run` it started exited 0, 1 when one did not (the table still shows the others),
2 for a usage error (no LIDC-IDRI-0314, --workers not accepted by the installed CLI).

What is measured
----------------
Every figure comes from one `ctscreen run --archive DIR --json` subprocess per size (the
console script beside this interpreter, ``.venv/bin/ctscreen`` = ``pipeline.cli:main``;
``python -m pipeline.cli`` where it is absent), so a size includes the interpreter start and
loading the models once, as a nightly run does.  The child runs with the embedded defaults
(CTSCREEN_CONFIG is removed from its environment) on a fresh folder archive with a fresh
worklist and outbox beside it, so nothing is skipped as unchanged.  The archives are written
just before the runs, so their files are read from the page cache, not from disk.

- ``wall s``: wall-clock seconds from starting the child to reaping it.
- ``run s``: the ``duration_s`` of the child's own JSON summary (finding the studies,
  screening, writing back; no interpreter start, no model load); ``start s`` = wall - run.
- ``s/study`` = wall / studies; ``studies/h`` = 3600 x studies / wall; ``incr s/study``:
  the extra wall seconds per extra study against the previous (smaller) size, i.e. the cost
  of one more study once the process is up.
- ``peak MB``: ru_maxrss of the child as returned by ``os.wait4`` for that child alone (not
  RUSAGE_CHILDREN, which is a maximum over every child this script ever had): the kernel's
  exact high-water RSS of the largest single process of the child's tree (descendants that
  the child reaped count with their own maximum, not added).
- ``tree MB``: the largest sum of RSS over the child and all its descendants, sampled every
  0.1 s with psutil: what a pool of worker processes (e.g. ``--workers`` or the parallel
  decoder) holds together.  Sampled, so it may miss a short peak; pages shared between
  forked processes are counted once per process, so it can overstate (never shown below
  ``peak MB``).
- ``cpu s``: user + system CPU seconds of the child and its reaped descendants (wait4).
- Per-stage seconds: the summary's ``stage_seconds`` (totals over the studies of the run).

(a) the cost as the work grows: for each of ``--sizes`` (default 1 2 4 8) a folder archive
    holding that many copies of LIDC-IDRI-0314 (275 slices, as stored), each with its own
    StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID, SOPInstanceUIDs and
    AccessionNumber.  The copies are written once and hard-linked into each size's archive
    (copied where hard links are not possible).
(b) series of ``--slices`` (default 100 250 500 1000) slices, one study per run, made from
    the real series sorted along its slice normal (spacing 1.0 mm, 512 x 512):
    - N <= 275: the central N slices (a crop, original positions);
    - N > 275: the slices walked back and forth ("ping-pong": 0..274, 273..0, 1..274, ...),
      so that neighbouring slices always are neighbours in the real study (no seams, the
      chest is mirrored in z at each end), placed at the original spacing along the same
      normal from the first slice's position: evenly spaced, same orientation, same pixel
      spacing; InstanceNumber 1..N, SliceLocation moved with the position.
    Every slice gets a new SOPInstanceUID, each series new study, series and frame of
    reference UIDs.  A central crop shorter than the default 150 mm minimum coverage would
    be refused by selection, so these runs use a config file (written beside the archives)
    that lowers ``selection.min_coverage_mm`` and ``selection.min_slices`` just below the
    smallest series; nothing else differs from the defaults.
    Read ``ms/slice`` and ``MB/slice`` (run seconds and peak RSS divided by the slices) and
    the increments against the previous size: if they do not rise with N, time and memory
    grow no faster than the slice count.  Peak RSS includes the loaded models and
    libraries (a constant), so the increments are the cleaner per-slice memory figure.

All UIDs are deterministic ``2.25.`` UIDs (a name-based UUID of the copy and the slice
index; not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``, which ignores its
entropy sources without a prefix and is random), so two runs of this script build identical
archives.  ``--workers N`` is passed to every `ctscreen run`; the
script checks first that the installed CLI accepts it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
from pydicom.dataset import Dataset

from pipeline.demo import default_shared_data
from pipeline.workers import tree_rss

REPO = Path(__file__).resolve().parents[1]
STAGES = ("read", "volume", "lungs", "lesions", "report", "writeback")
ENTROPY = "ctscreen-bench-scaling-v1"
DEFAULT_MIN_COVERAGE_MM = 150.0
DEFAULT_MIN_SLICES = 40


def ctscreen_command() -> list[str]:
    """The console script installed beside this interpreter, else ``python -m pipeline.cli``."""
    script = Path(sys.executable).parent / "ctscreen"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "pipeline.cli"]


def _uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID: a name-based (SHA-1) UUID of the parts.  Not
    ``generate_uid(prefix=None, entropy_srcs=...)``: with no prefix pydicom 3 ignores the
    entropy sources and returns a random UUID UID."""
    name = "|".join([ENTROPY, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _ds(value: float) -> str:
    return f"{value:.4f}"


# ---------------------------------------------------------------------------- the source


@dataclass
class Source:
    """LIDC-IDRI-0314 in memory, sorted along its slice normal (pixel data left encoded)."""

    slices: list[Dataset]
    normal: np.ndarray  # unit slice normal (row x column direction cosines)
    spacing: float  # median distance between neighbouring slices along the normal, mm
    origin: np.ndarray  # ImagePositionPatient of the first slice in that order
    folder: Path


def load_source(folder: Path) -> Source:
    slices: list[Dataset] = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)

    def along(ds: Dataset) -> float:
        return float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))

    slices.sort(key=along)
    steps = np.diff([along(ds) for ds in slices])
    spacing = float(np.median(steps))
    if np.max(np.abs(steps - spacing)) > 0.01 * spacing:
        print(f"warning: {folder} is not evenly spaced (steps {steps.min()}..{steps.max()} mm)")
    origin = np.array([float(v) for v in slices[0].ImagePositionPatient])
    return Source(slices, normal, spacing, origin, folder)


def _write(
    ds: Dataset,
    path: Path,
    *,
    key: str,
    index: int,
    position: np.ndarray | None = None,
    slice_location: float | None = None,
    instance: int | None = None,
) -> None:
    """Write ``ds`` as instance ``index`` of the copy ``key``: new UIDs, optionally a new
    position; every attribute changed is set on every write (``ds`` is reused)."""
    ds.StudyInstanceUID = _uid(key, "study")
    ds.SeriesInstanceUID = _uid(key, "series")
    ds.FrameOfReferenceUID = _uid(key, "frame-of-reference")
    ds.SOPInstanceUID = _uid(key, "instance", index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = ("B" + _uid(key, "accession").replace(".", "")[-15:])[:16]
    if position is not None:
        ds.ImagePositionPatient = [_ds(v) for v in position]
    if slice_location is not None and "SliceLocation" in ds:
        ds.SliceLocation = _ds(slice_location)
    if instance is not None:
        ds.InstanceNumber = instance
    ds.save_as(path, enforce_file_format=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_study_archives(source: Source, sizes: list[int], root: Path) -> dict[int, Path]:
    """(a): max(sizes) copies written once under ``root/pool``, linked into one archive per
    size ``root/studies-N/study-K/``."""
    pool = root / "pool"
    n_copies = max(sizes)
    for k in range(n_copies):
        (pool / f"study-{k}").mkdir(parents=True)
    for i, ds in enumerate(source.slices):  # each source slice read once, written n times
        for k in range(n_copies):
            _write(ds, pool / f"study-{k}" / f"{i + 1:06d}.dcm", key=f"copy-{k}", index=i)
    archives = {}
    for n in sizes:
        archive = root / f"studies-{n}"
        for k in range(n):
            (archive / f"study-{k}").mkdir(parents=True)
            for f in sorted((pool / f"study-{k}").iterdir()):
                _link_or_copy(f, archive / f"study-{k}" / f.name)
        archives[n] = archive
    return archives


def series_indices(n_source: int, n: int) -> list[int]:
    """Which source slice (in normal order) each of ``n`` slices shows: a central crop, or
    a back-and-forth walk without repeating the end slices."""
    if n <= n_source:
        start = (n_source - n) // 2
        return list(range(start, start + n))
    period = 2 * (n_source - 1)
    out = []
    for k in range(n):
        m = k % period
        out.append(m if m < n_source else period - m)
    return out


def build_slice_archives(source: Source, counts: list[int], root: Path) -> dict[int, Path]:
    """(b): one archive ``root/slices-N/`` with one N-slice series per count."""
    archives = {}
    first = source.slices[0]
    along0 = float(np.dot(source.origin, source.normal))
    # keep the source's offset between SliceLocation and the position along the normal
    sl_offset = float(first.SliceLocation) - along0 if "SliceLocation" in first else 0.0
    saved = [
        (ds.ImagePositionPatient, ds.get("SliceLocation"), ds.get("InstanceNumber"))
        for ds in source.slices
    ]
    for n in counts:
        archive = root / f"slices-{n}"
        archive.mkdir(parents=True)
        idx = series_indices(len(source.slices), n)
        start = np.array([float(v) for v in source.slices[idx[0]].ImagePositionPatient])
        for k, i in enumerate(idx):
            position = start + k * source.spacing * source.normal
            _write(
                source.slices[i], archive / f"{k + 1:06d}.dcm", key=f"slices-{n}", index=k,
                position=position,
                slice_location=float(np.dot(position, source.normal)) + sl_offset,
                instance=k + 1,
            )
        archives[n] = archive
    for ds, (ipp, sl, inst) in zip(source.slices, saved, strict=True):
        ds.ImagePositionPatient = ipp
        if sl is not None:
            ds.SliceLocation = sl
        if inst is not None:
            ds.InstanceNumber = inst
    return archives


def write_slice_config(path: Path, counts: list[int], spacing: float) -> Path:
    """The config of the (b) runs: the defaults with selection's length gate just below the
    smallest series, so that a crop is screened rather than refused."""
    smallest = min(counts)
    min_cov = min(DEFAULT_MIN_COVERAGE_MM, round(0.9 * (smallest - 1) * spacing, 1))
    min_slices = min(DEFAULT_MIN_SLICES, smallest)
    path.write_text(
        "# bench/scaling.py: selection's length gate lowered for short crops; all else default\n"
        f"selection:\n  min_coverage_mm: {min_cov}\n  min_slices: {min_slices}\n"
    )
    return path


# ---------------------------------------------------------------------------- one run


def run_ctscreen(
    cmd: list[str], archive: Path, log_dir: Path, extra: list[str]
) -> dict[str, Any]:
    """One `ctscreen run --archive DIR --json` child: wall time, its own rusage (wait4),
    the sampled peak RSS of its process tree, its JSON summary."""
    argv = [*cmd, "run", "--archive", str(archive), "--json", *extra]
    env = dict(os.environ)
    env.pop("CTSCREEN_CONFIG", None)
    out_path = log_dir / f"{archive.name}.stdout"
    err_path = log_dir / f"{archive.name}.stderr"
    peak_tree = 0
    stop = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, env=env)

        def sample() -> None:
            nonlocal peak_tree
            try:
                proc = psutil.Process(child.pid)
            except psutil.Error:
                return
            while not stop.is_set():
                peak_tree = max(peak_tree, tree_rss(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            stop.set()
        wall = time.perf_counter() - t0
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    stdout = out_path.read_text(errors="replace")
    summary: dict[str, Any] | None
    try:
        summary = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        summary = None
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    return {
        "argv": argv,
        "rc": child.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(peak_mb),
        "peak_tree_rss_mb": round(max(peak_tree / 2**20, peak_mb)),
        "summary": summary,
        "stderr_tail": None if child.returncode == 0 and summary is not None
        else err_path.read_text(errors="replace")[-3000:],
    }


def _status(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "no summary"
    parts = [f"{k} {v}" for k, v in summary.get("by_status", {}).items()]
    parts += [f"{k} {v}" for k, v in summary.get("reasons", {}).items()]
    parts += [f"check {k}" for k in summary.get("warnings", {})]
    if summary.get("skipped_unchanged"):
        parts.append(f"skipped {summary['skipped_unchanged']}")
    return ", ".join(parts) or "nothing screened"


def _figures(r: dict[str, Any], n_studies: int) -> dict[str, Any]:
    s = r["summary"] or {}
    run_s = s.get("duration_s")
    return {
        "all_analysed": s.get("by_status", {}).get("analysed", 0) == n_studies,
        "run_s": run_s,
        "startup_s": round(r["wall_s"] - run_s, 2) if run_s is not None else None,
        "s_per_study": round(r["wall_s"] / n_studies, 2),
        "stage_seconds": s.get("stage_seconds", {}),
        "by_status": s.get("by_status", {}),
        "status": _status(r["summary"]),
    }


# ---------------------------------------------------------------------------- tables


def _f(v: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def _stage_names(rows: list[dict[str, Any]]) -> list[str]:
    names = list(STAGES)
    for r in rows:
        names += [k for k in r["stage_seconds"] if k not in names]
    return names


def print_stage_table(key: str, rows: list[dict[str, Any]]) -> None:
    names = _stage_names(rows)
    print(f"{key:>8}" + "".join(f"{n[:9]:>10}" for n in names) + f"{'sum':>10}")
    for r in rows:
        st = r["stage_seconds"]
        print(
            f"{r[key]:>8}"
            + "".join(_f(st.get(n), 10) for n in names)
            + _f(sum(st.values()) if st else None, 10)
        )


def print_study_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'studies':>8}{'wall s':>9}{'run s':>9}{'start s':>9}{'s/study':>9}"
        f"{'incr s/st':>10}{'studies/h':>10}{'peak MB':>9}{'tree MB':>9}{'cpu s':>9}  status"
    )
    for r in rows:
        print(
            f"{r['studies']:>8}{_f(r['wall_s'], 9)}{_f(r['run_s'], 9)}{_f(r['startup_s'], 9)}"
            f"{_f(r['s_per_study'], 9)}{_f(r['incremental_s_per_study'], 10)}"
            f"{_f(r['studies_per_hour'], 10, 0)}{r['peak_rss_mb']:>9}{r['peak_tree_rss_mb']:>9}"
            f"{_f(r['cpu_s'], 9)}  {r['status']}"
        )


def print_slice_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'slices':>8}{'wall s':>9}{'run s':>9}{'ms/slice':>10}{'peak MB':>9}{'tree MB':>9}"
        f"{'MB/slice':>10}{'incr ms/sl':>11}{'incr MB/sl':>11}{'cpu s':>9}  status"
    )
    for r in rows:
        print(
            f"{r['slices']:>8}{_f(r['wall_s'], 9)}{_f(r['run_s'], 9)}"
            f"{_f(r['run_ms_per_slice'], 10, 1)}{r['peak_rss_mb']:>9}{r['peak_tree_rss_mb']:>9}"
            f"{_f(r['peak_rss_mb_per_slice'], 10, 2)}"
            f"{_f(r['incremental_ms_per_slice'], 11, 1)}"
            f"{_f(r['incremental_mb_per_slice'], 11, 2)}{_f(r['cpu_s'], 9)}  {r['status']}"
        )


# ---------------------------------------------------------------------------- main


def _check_workers(cmd: list[str]) -> bool:
    help_text = subprocess.run(
        [*cmd, "run", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout
    return "--workers" in help_text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes", type=_positive, nargs="*", default=[1, 2, 4, 8],
        help="(a) studies per run (default: 1 2 4 8; none: skip (a))",
    )
    p.add_argument(
        "--slices", type=_positive, nargs="*", default=[100, 250, 500, 1000],
        help="(b) slices per series, at least 2 (default: 100 250 500 1000; none: skip (b))",
    )
    p.add_argument("--workers", type=_positive, help="passed to every `ctscreen run`")
    p.add_argument(
        "--shared-data", type=Path, default=default_shared_data(),
        help="../shared/data or $CTSCREEN_SHARED_DATA (holds chest-ct/lidc-idri-0314)",
    )
    p.add_argument("--keep", type=Path, help="build (and keep) the archives here (new or empty)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    sizes = sorted(set(args.sizes))
    counts = sorted(set(args.slices))
    if any(n < 2 for n in counts):
        p.error("--slices: a series needs at least 2 slices")
    if not sizes and not counts:
        p.error("nothing to measure: give --sizes or --slices values")
    src = args.shared_data / "chest-ct" / "lidc-idri-0314"
    if not src.is_dir():
        print(f"no LIDC-IDRI-0314 at {src}", file=sys.stderr)
        return 2
    cmd = ctscreen_command()
    extra = []
    if args.workers is not None:
        if not _check_workers(cmd):
            print(
                f"--workers: the installed `{' '.join(cmd)} run` does not accept --workers yet",
                file=sys.stderr,
            )
            return 2
        extra = ["--workers", str(args.workers)]
    if args.keep is not None:
        if args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
            print(f"--keep {args.keep}: expected a new or empty folder", file=sys.stderr)
            return 2
        args.keep.mkdir(parents=True, exist_ok=True)
        return _measure(args.keep.resolve(), src, sizes, counts, cmd, extra, args)
    with tempfile.TemporaryDirectory(prefix="ctscreen-scaling-") as tmp:
        return _measure(Path(tmp), src, sizes, counts, cmd, extra, args)


def _measure(
    root: Path,
    src: Path,
    sizes: list[int],
    counts: list[int],
    cmd: list[str],
    extra: list[str],
    args: argparse.Namespace,
) -> int:
    logs = root / "logs"
    logs.mkdir()
    t0 = time.perf_counter()
    source = load_source(src)
    study_archives = build_study_archives(source, sizes, root) if sizes else {}
    config = write_slice_config(root / "slices.yaml", counts, source.spacing) if counts else None
    slice_archives = build_slice_archives(source, counts, root) if counts else {}
    n_source = len(source.slices)
    del source
    build_s = time.perf_counter() - t0
    print(
        f"LIDC-IDRI-0314: {n_source} slices; archives built in {build_s:.0f} s under {root}; "
        f"command: {' '.join(cmd)} run --archive DIR --json {' '.join(extra)}".rstrip()
    )
    print(f"cpu cores {os.cpu_count()}, python {platform.python_version()}\n")
    failed = False

    study_rows: list[dict[str, Any]] = []
    for n in sizes:
        r = run_ctscreen(cmd, study_archives[n], logs, extra)
        row = {"studies": n, **r, **_figures(r, n)}
        row["studies_per_hour"] = round(3600 * n / r["wall_s"], 1)
        prev = study_rows[-1] if study_rows else None
        row["incremental_s_per_study"] = (
            round((r["wall_s"] - prev["wall_s"]) / (n - prev["studies"]), 2) if prev else None
        )
        study_rows.append(row)
        failed |= r["rc"] != 0 or r["summary"] is None
    if study_rows:
        print(f"(a) studies per run: copies of LIDC-IDRI-0314 ({n_source} slices, as stored)")
        print_study_table(study_rows)
        print("\nseconds per stage, totals over the studies of the run")
        print_stage_table("studies", study_rows)
        print()

    slice_rows: list[dict[str, Any]] = []
    for n in counts:
        assert config is not None
        r = run_ctscreen(cmd, slice_archives[n], logs, ["--config", str(config), *extra])
        row = {"slices": n, **r, **_figures(r, 1)}
        run_s = row["run_s"]
        row["run_ms_per_slice"] = round(1000 * run_s / n, 2) if run_s is not None else None
        row["peak_rss_mb_per_slice"] = round(r["peak_rss_mb"] / n, 3)
        prev = slice_rows[-1] if slice_rows else None
        if prev and run_s is not None and prev["run_s"] is not None:
            row["incremental_ms_per_slice"] = round(
                1000 * (run_s - prev["run_s"]) / (n - prev["slices"]), 2
            )
        else:
            row["incremental_ms_per_slice"] = None
        row["incremental_mb_per_slice"] = (
            round((r["peak_rss_mb"] - prev["peak_rss_mb"]) / (n - prev["slices"]), 3)
            if prev else None
        )
        slice_rows.append(row)
        failed |= r["rc"] != 0 or r["summary"] is None
    if slice_rows:
        print(
            "(b) one series per run, 512x512 slices at 1.0 mm (crop, or the real slices "
            "walked back and forth)"
        )
        print_slice_table(slice_rows)
        print("\nseconds per stage")
        print_stage_table("slices", slice_rows)
        print()

    partial = [r for r in (*study_rows, *slice_rows) if not r["all_analysed"]]
    if partial:
        print(
            "warning: not every study was analysed in the runs of "
            + ", ".join(f"{r['studies']} studies" if "studies" in r else f"{r['slices']} slices"
                        for r in partial)
            + ": their times do not cover every stage (see status)\n"
        )
    for r in (*study_rows, *slice_rows):
        if r["stderr_tail"]:
            print(f"--- {' '.join(r['argv'])}: exit {r['rc']}; end of its stderr:")
            print(r["stderr_tail"])
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "command": [*cmd, "run", "--archive", "DIR", "--json", *extra],
            "workers": args.workers,
            "source": {"path": str(src), "slices": n_source},
            "build_s": round(build_s, 1),
            "studies": study_rows,
            "slices": slice_rows,
        }, indent=2))
    if args.keep is not None:
        print(f"archives kept in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
