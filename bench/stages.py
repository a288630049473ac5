"""Per-stage timing of the whole flow on LIDC-IDRI-0314, as stored and re-encoded.

    .venv/bin/python bench/stages.py [--shared-data DIR] [--repeat N] [--json OUT]

Re-encodes the real 275-slice series losslessly (JPEG-LS, JPEG 2000, RLE) into a temporary
folder archive per variant, loads the stages once, screens each variant ``--repeat`` times
and prints the median seconds per stage, the end-to-end time, peak memory (RSS) and studies
per hour.  A benchmark: it reports, it never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from pipeline.archive.folder import FolderArchive
from pipeline.config import Config
from pipeline.demo import default_shared_data
from pipeline.ingest import find_studies
from pipeline.run import Stages, run_study

VARIANTS = {
    "as stored": None,
    "JPEG-LS": JPEGLSLossless,
    "JPEG 2000": JPEG2000Lossless,
    "RLE": RLELossless,
}
STAGES = ("read", "volume", "lungs", "lesions", "report", "writeback")


def _archive(src: Path, dst: Path, syntax: str | None) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if syntax is not None:
            ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared-data", type=Path, default=default_shared_data())
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = args.shared_data / "chest-ct" / "lidc-idri-0314"
    if not src.is_dir():
        print(f"no LIDC-IDRI-0314 at {src}")
        return 2
    stages = Stages.load(Config())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in VARIANTS.items():
            archive = FolderArchive(_archive(src, Path(tmp) / name.replace(" ", "_"), syntax))
            per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
            total = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                (study,) = find_studies(archive)
                result = run_study(study, archive, stages)
                total.append(time.perf_counter() - t0)
                for s in STAGES:
                    per_stage[s].append(result.timings_s.get(s, 0.0))
            end_to_end = statistics.median(total)
            rows[name] = {
                **{s: round(statistics.median(v), 2) for s, v in per_stage.items()},
                "end_to_end_s": round(end_to_end, 2),
                "studies_per_hour": round(3600 / end_to_end),
                "status": result.status.value,
            }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head = f"{'variant':<10}" + "".join(f"{s:>10}" for s in (*STAGES, "total", "per hour"))
    print(head)
    for name, r in rows.items():
        print(
            f"{name:<10}"
            + "".join(f"{r[s]:>10.2f}" for s in STAGES)
            + f"{r['end_to_end_s']:>10.2f}{r['studies_per_hour']:>10}"
        )
    print(f"peak memory (RSS) of this process: {peak_mb:.0f} MB")
    if args.json:
        args.json.write_text(
            json.dumps({"variants": rows, "peak_rss_mb": round(peak_mb)}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
