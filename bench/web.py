"""How fast the worklist's web pages are with a year of a busy site in the worklist.

    .venv/bin/python bench/web.py [--rows 300000] [--repeat 7] [--keep DIR] [--json OUT]

    .venv/bin/python bench/web.py --rows 20000 --repeat 3        # smoke run (under a minute)

A benchmark: it reports, it never fails on a slow machine (exit 0; 2 for a usage error).

What is built
-------------
A worklist database of ``--rows`` studies (default 300 000: about 820 chest CTs a day for a
year), written by ``pipeline.worklist.Worklist.record`` from ``ScreeningResult`` objects, so
every row is what the nightly batch writes (the outputs' UIDs, timings, patient name and ID,
reasons and warnings included).  Only the database's durability is relaxed while it is built
(``PRAGMA synchronous = OFF`` on the worklist's own connection; one fsync per row would make
the build take an hour on this disk): the rows are the same.  The mix, by fraction of studies:

    negative 0.66 (of which 0.02 with a quality warning), typical 0.08, indeterminate 0.09,
    atypical 0.10, not analysed 0.065 (coded reasons of pipeline/reasons.py), failed 0.005

with study dates spread evenly over the 365 days before today and suspicion scores drawn per
category.  One study also gets a stored view (pipeline/web/viewer.py, a synthetic 120-slice
chest at 256 px), so its study page and slice images are timed with a view present.

What is timed
-------------
Medians (and min / max) over ``--repeat`` requests after one warm-up, in milliseconds:

- ``Worklist.page``: the first page, a filtered page (group "typical", the last 30 days), a
  deep page (offset 250 000, i.e. the tail of the negatives), ``Worklist.get``;
- with the web app (``pipeline.web.app.create_app``, through Starlette's TestClient: the
  whole app in this process, no network), logged in as a radiologist: the list page's first
  page, a filtered page, a deep page, a study page, and a slice image with both overlays.
  Where the app or a route is missing the line says so and the rest is still timed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.artefacts import OutputRef, Pattern, ScreeningResult, Status  # noqa: E402
from pipeline.worklist import Worklist, WorklistFilter  # noqa: E402

MIX = (  # (kind, fraction)
    ("negative", 0.647), ("negative-warned", 0.013), ("typical", 0.08),
    ("indeterminate", 0.09), ("atypical", 0.10), ("not-analysed", 0.065), ("failed", 0.005),
)
NOT_ANALYSED_REASONS = (("slice-too-thick:5.0mm",), ("no-ct-series",), ("not-axial:31deg",),
                        ("missing-slices:gap=7.5mm",), ("localizer-only",),
                        ("too-few-slices:40",), ("no-lungs-found",))
SUSPICION = {"negative": (0.0, 0.25), "negative-warned": (0.0, 0.3), "typical": (0.6, 1.0),
             "indeterminate": (0.4, 0.9), "atypical": (0.3, 0.95)}
SR, SEG, SC, KO = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.66.4",
                   "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.59")
VERSION = "0.1.0+ctscreen-lungs-unet2d-1.1.0+density-threshold-1.0"
USER, PASSWORD = "bench.reader", "bench-password-123"


def _uid(n: int, *parts: int) -> str:
    return "2.25." + ".".join(str(p) for p in (n, *parts))


def make_result(i: int, kind: str, day: date, rng: random.Random) -> ScreeningResult:
    """The row the batch would record for study ``i`` of this kind."""
    study = _uid(1000 + i)
    base: dict[str, Any] = {
        "study_uid": study, "accession_number": f"ACC{i:08d}",
        "study_date": day.strftime("%Y%m%d"), "patient_name": f"Bench^Patient{i % 250000}",
        "patient_id": f"P{i % 250000:07d}", "algorithm_version": VERSION,
        "series_uid": _uid(1000 + i, 1), "series_description": "Thorax 1.0 B70f",
        "n_slices": rng.randint(220, 480),
        "timings_s": {"read": 2.1, "volume": 0.8, "lungs": 9.5, "lesions": 21.0, "report": 3.2},
    }
    if kind == "failed":
        return ScreeningResult(status=Status.FAILED, reasons=("internal-error:ValueError",), **base)
    if kind == "not-analysed":
        return ScreeningResult(status=Status.NOT_ANALYSED,
                               reasons=rng.choice(NOT_ANALYSED_REASONS), **base)
    pattern = Pattern.NEGATIVE if kind.startswith("negative") else Pattern(kind)
    lo, hi = SUSPICION[kind]
    n_findings = 0 if pattern is Pattern.NEGATIVE else rng.randint(1, 12)
    n_sc = max(1, min(n_findings, 5))
    outputs = [OutputRef("seg", SEG, _uid(1000 + i, 2, 1), _uid(1000 + i, 2)),
               OutputRef("sr", SR, _uid(1000 + i, 3, 1), _uid(1000 + i, 3))]
    outputs += [OutputRef("sc", SC, _uid(1000 + i, 4, k), _uid(1000 + i, 4))
                for k in range(1, n_sc + 1)]
    outputs.append(OutputRef("ko", KO, _uid(1000 + i, 5, 1), _uid(1000 + i, 5)))
    involved = 0.0 if n_findings == 0 else round(rng.uniform(0.2, 45.0), 2)
    return ScreeningResult(
        status=Status.ANALYSED,
        warnings=("lung-volume-implausible",) if kind == "negative-warned" else (),
        lung_volume_ml=(round(rng.uniform(1800, 3400), 1), round(rng.uniform(1500, 3000), 1)),
        involved_pct=involved, severity_score=min(30, int(involved / 3)), severity_max=30,
        suspicion=round(rng.uniform(lo, hi), 4), pattern=pattern, n_findings=n_findings,
        outputs=tuple(outputs), **base)


def build_worklist(path: Path, rows: int, seed: int = 14) -> dict[str, Any]:
    """``rows`` studies into a new worklist at ``path``; returns what was built."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    today = date.today()
    counts: dict[str, int] = dict.fromkeys(kinds, 0)
    t0 = time.perf_counter()
    with Worklist(path) as wl:
        db = wl._db  # the worklist's own connection: durability off for the build only
        db.execute("PRAGMA synchronous = OFF")
        for i in range(rows):
            kind = rng.choices(kinds, weights)[0]
            counts[kind] += 1
            day = today - timedelta(days=int(i * 365 / rows))
            wl.record(make_result(i, kind, day, rng), fingerprint=f"fp{i}")
        db.execute("PRAGMA synchronous = NORMAL")
    seconds = time.perf_counter() - t0
    return {"rows": rows, "build_s": round(seconds, 1),
            "record_us": round(seconds / max(1, rows) * 1e6, 1),
            "bytes": path.stat().st_size, "mix": counts}


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(samples), 2),
            "min_ms": round(min(samples), 2), "max_ms": round(max(samples), 2)}


def save_bench_view(root: Path, study_uid: str) -> None:
    """A synthetic 120-slice chest (two lungs, a lesion, 25 HU noise) stored as that
    study's view."""
    import numpy as np

    from pipeline.artefacts import (
        LesionAnalysis,
        LungMasks,
    )
    from pipeline.artefacts import Volume as Vol
    from pipeline.phantom.model import make_grid
    from pipeline.run import StudyAnalysis
    from pipeline.web.viewer import save_view

    shape = (120, 512, 512)
    ct = Vol(np.zeros(shape, np.int16), make_grid(shape, (2.5, 0.7, 0.7)))
    x, y, z = (ct.lps_grid(i) for i in range(3))
    inside = (x / 150) ** 2 + (y / 110) ** 2 <= 1
    lungs = np.where(inside & (np.abs(x) > 15), np.where(x < 0, 1, 2), 0).astype(np.uint8)
    hu = np.where(lungs > 0, -850, 40).astype(np.int16)
    lesion = ((x + 70) ** 2 + y ** 2 + z ** 2 <= 25 ** 2) & (lungs > 0)
    hu[lesion] = -500
    noise = np.random.default_rng(14).normal(0.0, 25.0, shape)  # CT noise: realistic PNG sizes
    hu = (hu + noise).astype(np.int16)
    ct = ct.with_array(hu)
    la = LesionAnalysis(labels=ct.with_array(lesion.astype(np.uint8)), findings=(), lungs=(),
                        zones=(), involved_pct=1.0, severity_score=1, severity_max=30,
                        severity_scale="bench", suspicion=0.9, pattern=Pattern.TYPICAL,
                        detector="bench")
    result = ScreeningResult(study_uid=study_uid, accession_number="", study_date="",
                             status=Status.ANALYSED, series_uid=study_uid + ".1",
                             algorithm_version=VERSION)
    save_view(root, StudyAnalysis(result, [], ct, [], LungMasks(ct.with_array(lungs), "bench"),
                                  la), None, 256)


def time_worklist(path: Path, repeat: int) -> dict[str, Any]:
    today = date.today()
    month = WorklistFilter(date_from=(today - timedelta(days=30)).strftime("%Y%m%d"),
                           group="typical")
    with Worklist(path) as wl:
        total = wl.page(0, 1)[1]
        deep = min(250_000, max(0, total - 50))
        first_uid = wl.page(0, 1)[0][0].study_uid
        return {
            "page first": timed(lambda: wl.page(0, 50), repeat),
            "page filtered (typical, 30 days)": timed(lambda: wl.page(0, 50, month), repeat),
            f"page deep (offset {deep})": timed(lambda: wl.page(deep, 50), repeat),
            "get": timed(lambda: wl.get(first_uid), repeat),
        }


def time_app(path: Path, views: Path, study_uid: str, repeat: int) -> dict[str, Any]:
    """The web pages through the app, logged in as a radiologist ("not timed: why" where a
    part is missing)."""
    try:
        from fastapi.testclient import TestClient

        from pipeline.web.app import create_app
    except ImportError as e:
        return {"app": f"not timed: {e}"}
    from dataclasses import replace

    from pipeline.config import Config

    cfg = Config()
    cfg = replace(cfg, worklist=replace(cfg.worklist, path=str(path)),
                  web=replace(cfg.web, view_store=str(views)))
    app = create_app(cfg, path)
    out: dict[str, Any] = {}
    with TestClient(app) as client:
        problem = _login(client, cfg, path)
        if problem:
            return {"app": f"not timed: {problem}"}
        since = (date.today() - timedelta(days=30)).strftime("%Y-%m-%d")
        deep = 250_000 // max(1, cfg.web.page_size) + 1
        pages = {
            "list first page": "/worklist",
            "list filtered (typical, 30 days)": f"/worklist?group=typical&date_from={since}",
            f"list deep page (page {deep})": f"/worklist?page={deep}",
            "study page": f"/study/{study_uid}",
            "slice image, no overlays": f"/study/{study_uid}/slice/60.png",
            "slice image, both overlays": f"/study/{study_uid}/slice/60.png"
                                          "?overlays=lungs,lesions",
        }
        for name, url in pages.items():
            r = client.get(url)
            if r.status_code != 200:
                out[name] = f"not timed: GET {url} answered {r.status_code}"
                continue
            figure: dict[str, Any] = timed(partial(client.get, url), repeat)
            figure["bytes"] = len(r.content)
            out[name] = figure
    return out


def _login(client: Any, cfg: Any, worklist: Path) -> str:
    """Create the bench user and log in through the login form; '' or what went wrong."""
    try:
        from pipeline.web import auth, db
    except ImportError as e:
        return str(e)
    with db.connect(db.web_db_path(cfg, worklist)) as conn:
        if conn.execute("SELECT 1 FROM users WHERE username = ?", (USER,)).fetchone() is None:
            auth.add_user(conn, USER, "radiologist", PASSWORD, time.time())
    client.get("/login")
    token = client.cookies.get("ctscreen_login_csrf", "")
    r = client.post("/login", data={"username": USER, "password": PASSWORD, "csrf": token},
                    follow_redirects=False)
    if r.status_code != 303 or "ctscreen_session" not in client.cookies:
        return f"the login answered {r.status_code}"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--keep", type=Path, help="build (or reuse) the database in this folder")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.rows < 100 or args.repeat < 1:
        print("expected --rows >= 100 and --repeat >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctscreen-bench-web-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"bench-{args.rows}.ctscreen.sqlite"
        figures: dict[str, Any] = {}
        if path.exists():
            figures["build"] = {"rows": args.rows, "reused": str(path)}
        else:
            print(f"building a worklist of {args.rows} studies in {path} ...", flush=True)
            figures["build"] = build_worklist(path, args.rows)
        b = figures["build"]
        print(f"worklist: {b['rows']} rows" + (
            f", built in {b['build_s']} s ({b['record_us']} us a row by Worklist.record), "
            f"{b['bytes'] / 1e6:.0f} MB; mix {b['mix']}" if "build_s" in b else " (reused)"))
        views = path.with_name(path.stem + ".views")
        with Worklist(path) as wl:
            top = wl.page(0, 1)[0][0].study_uid
        save_bench_view(views, top)
        figures["worklist"] = time_worklist(path, args.repeat)
        figures["app"] = time_app(path, views, top, args.repeat)
    for section in ("worklist", "app"):
        print(f"\n{section} (ms, median of {args.repeat} [min-max])")
        for name, v in figures[section].items():
            if isinstance(v, dict):
                extra = f"  {v['bytes']} bytes" if "bytes" in v else ""
                print(f"  {name:<40} {v['median_ms']:>9.2f}  [{v['min_ms']:.2f}-"
                      f"{v['max_ms']:.2f}]{extra}")
            else:
                print(f"  {name:<40} {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
