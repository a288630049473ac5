"""Per-stage timing of the whole flow on LIDC-IDRI-0314, as stored and re-encoded.

    .venv/bin/python bench/stages.py [--shared-data DIR] [--repeat N] [--json OUT] [--config F]

Re-encodes the real 275-slice series losslessly (JPEG-LS, JPEG 2000, RLE) into a temporary
folder archive per variant, loads the stages once, screens each variant ``--repeat`` times
and prints the median seconds per stage, the end-to-end time, peak memory (RSS) and studies
per hour.  A benchmark: it reports, it never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from pipeline.archive.folder import FolderArchive
from pipeline.config import load_config
from pipeline.demo import default_shared_data
from pipeline.ingest import find_studies
from pipeline.run import Stages, run_study
from pipeline.workers import tree_rss

VARIANTS = {
    "as stored": None,
    "JPEG-LS": JPEGLSLossless,
    "JPEG 2000": JPEG2000Lossless,
    "RLE": RLELossless,
}
STAGES = ("read", "volume", "lungs", "lesions", "report", "writeback")


class PeakMemory:
    """The highest resident memory of this process and its children while in the block."""

    def __init__(self) -> None:
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.bytes = max(self.bytes, tree_rss(os.getpid()))

    def __enter__(self) -> PeakMemory:
        self.bytes = tree_rss(os.getpid())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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
    p.add_argument("--config", type=Path, help="settings (e.g. lesions.detector: onnx)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = args.shared_data / "chest-ct" / "lidc-idri-0314"
    if not src.is_dir():
        print(f"no LIDC-IDRI-0314 at {src}")
        return 2
    stages = Stages.load(load_config(args.config))
    predictor = getattr(stages.lesions, "predictor", None)
    provider = getattr(predictor, "provider", "none (no learned model)")
    print(f"lesions: {stages.lesions.name} {stages.lesions.version}; onnxruntime provider: "
          f"{provider}; {os.cpu_count()} CPU cores")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in VARIANTS.items():
            archive = FolderArchive(_archive(src, Path(tmp) / name.replace(" ", "_"), syntax))
            per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
            total = []
            with PeakMemory() as peak:
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
                "peak_mb": round(peak.bytes / 2**20),
                "status": result.status.value,
            }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head = f"{'variant':<10}" + "".join(
        f"{s:>10}" for s in (*STAGES, "total", "per hour", "peak MB")
    )
    print(head)
    for name, r in rows.items():
        print(
            f"{name:<10}"
            + "".join(f"{r[s]:>10.2f}" for s in STAGES)
            + f"{r['end_to_end_s']:>10.2f}{r['studies_per_hour']:>10}{r['peak_mb']:>10}"
        )
    print("peak MB: resident memory of this process and its decoding processes, sampled "
          f"every 50 ms; the process's own high-water mark over all variants: {peak_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({
            "variants": rows, "peak_rss_mb": round(peak_mb), "provider": provider,
            "cpu_cores": os.cpu_count(), "lesions": stages.lesions.name,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
