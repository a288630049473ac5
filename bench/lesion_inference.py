"""Lesion-stage inference time per study on this machine's CPU.

    .venv/bin/python bench/lesion_inference.py [--model models/covid-lesions-unet2d]
                                               [--threads 1 2] [--repeat 3]

Reads LIDC-IDRI-0314 (275 slices, 512x512) from ../shared/data (CTSCREEN_SHARED_DATA), or
renders a phantom where it is absent; segments the lungs once (classical), then times the
lesion stage: the ONNX model (session load, then per study, for each thread count) and the
density baseline.  Prints one line per figure (median of ``--repeat`` runs) and the number
of lesions each finds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.artefacts import Volume
from pipeline.config import LesionsConfig, LungsConfig
from pipeline.lesions import DensityLesionDetector, analyse
from pipeline.lungs import segment_lungs

REPO = Path(__file__).resolve().parents[1]


def _study() -> tuple[str, Volume]:
    shared = Path(os.environ.get("CTSCREEN_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    folder = shared / "chest-ct" / "lidc-idri-0314"
    if folder.is_dir():
        from pipeline.train.dataset import read_dicom_series

        return "LIDC-IDRI-0314", read_dicom_series(folder)[0]
    from pipeline.phantom.model import PhantomSpec, make_grid, render

    shape = (275, 512, 512)
    ct, _ = render(PhantomSpec(), make_grid(shape, (1.0, 0.7, 0.7), "axial"), shape)
    return "phantom 275x512x512", ct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/covid-lesions-unet2d")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    name, ct = _study()
    lungs = segment_lungs(ct, LungsConfig(method="classical"))
    print(f"study: {name}, {ct.shape[0]} slices of {ct.shape[1]}x{ct.shape[2]}, "
          f"spacing {tuple(round(s, 3) for s in ct.spacing)} mm, cpu cores {os.cpu_count()}")
    from pipeline.inference import OnnxLesionDetector

    for threads in args.threads:
        cfg = LesionsConfig(detector="onnx", model=args.model, threads=threads)
        t0 = time.perf_counter()
        det = OnnxLesionDetector(cfg)
        load = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            labels = det(ct, lungs)
            times.append(time.perf_counter() - t0)
        an = analyse(ct, lungs, labels, cfg, det.name)
        print(f"onnx {det.name} {det.version}, {threads} thread(s): load {load:.2f} s, "
              f"per study {statistics.median(times):.2f} s (runs {[round(t, 2) for t in times]}), "
              f"{an.n_findings_total} lesions, {an.involved_pct:.2f}% involved")
    dens = DensityLesionDetector(LesionsConfig())
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        labels = dens(ct, lungs)
        times.append(time.perf_counter() - t0)
    an = analyse(ct, lungs, labels, LesionsConfig(), dens.name)
    print(f"density baseline: per study {statistics.median(times):.2f} s, "
          f"{an.n_findings_total} lesions, {an.involved_pct:.2f}% involved")
    print(f"lung voxels {int(np.count_nonzero(lungs.mask()))}")


if __name__ == "__main__":
    main()
