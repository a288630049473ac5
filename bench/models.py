"""The learned models against the classical methods, on one real 275-slice study, one run.

    .venv/bin/python bench/models.py [--shared-data DIR] [--repeat N] [--json OUT]
                                     [--providers CUDAExecutionProvider ...]
                                     [--lesion-model models/NAME]
                                     [--lung-infection-model models/NAME]

Reads LIDC-IDRI-0314 (275 slices of 512x512) once, loads both flows once (models stay
loaded) and, ``--repeat`` times in turn, times:

- the learned lung model alone (no cross-check), its classical cross-check, the lesion model;
- the classical lung segmenter and the density detector;
- the whole study (selection to the DICOM result objects, no write-back) with the learned
  flow (learned lungs and ``--lesion-model``), with the embedded defaults, and with the
  classical flow (``lungs.method: classical``, ``lesions.detector: density``).

With ``--lung-infection-model`` (a lung model with the infection class), also the flow in
which that one network gives lungs and lesions (``lesions.detector: lung-model``): the network
with its lesion step ("one network") and the whole study with it.

Prints medians and the ratios (learned / classical) measured in this one run: a benchmark,
it never fails on a slow machine.  The onnxruntime provider and the CPU count are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.archive.folder import FolderArchive
from pipeline.config import Config, LesionsConfig, LungsConfig
from pipeline.demo import default_shared_data
from pipeline.ingest import find_studies
from pipeline.lesions import DensityLesionDetector
from pipeline.lungs import ClassicalLungSegmenter, LearnedLungSegmenter
from pipeline.run import Stages, screen_study
from pipeline.train.dataset import read_dicom_series


def _t(fn: Any, *a: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared-data", type=Path, default=default_shared_data())
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--providers", nargs="*", default=[])
    p.add_argument("--lesion-model", default=Config().lesions.model,
                   help="the lesion model of the learned flow (default: the configured one)")
    p.add_argument("--lung-infection-model", default=None,
                   help="a lung model with the infection class: also time the one-network flow")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = args.shared_data / "chest-ct" / "lidc-idri-0314"
    if not src.is_dir():
        print(f"no LIDC-IDRI-0314 at {src}")
        return 2
    ct, _ = read_dicom_series(src)
    base = Config()
    prov = tuple(args.providers)
    learned_cfg = dataclasses.replace(
        base, lungs=dataclasses.replace(base.lungs, method="model", providers=prov),
        lesions=dataclasses.replace(base.lesions, detector="onnx", providers=prov,
                                    model=args.lesion_model))
    classical_cfg = dataclasses.replace(
        base, lungs=dataclasses.replace(base.lungs, method="classical"),
        lesions=dataclasses.replace(base.lesions, detector="density"))
    one = None
    if args.lung_infection_model:
        one_cfg = dataclasses.replace(
            base, lungs=dataclasses.replace(base.lungs, method="model", providers=prov,
                                            model=args.lung_infection_model),
            lesions=dataclasses.replace(base.lesions, detector="lung-model"))
        one = Stages.load(one_cfg)
        one_bare = LearnedLungSegmenter(dataclasses.replace(one_cfg.lungs, cross_check=False))
    learned = Stages.load(learned_cfg)
    classical = Stages.load(classical_cfg)
    default = Stages.load(base)
    assert isinstance(learned.lungs, LearnedLungSegmenter)
    bare = LearnedLungSegmenter(dataclasses.replace(learned_cfg.lungs, cross_check=False))
    cross = ClassicalLungSegmenter(dataclasses.replace(
        base.lungs, working_spacing_mm=base.lungs.cross_check_spacing_mm, min_lung_volume_ml=0.0,
        qa_min_total_ml=0.0))
    cl_lungs = ClassicalLungSegmenter(LungsConfig())
    density = DensityLesionDetector(LesionsConfig())
    provider = bare.predictor.provider
    print(f"study LIDC-IDRI-0314 {ct.shape}, {os.cpu_count()} CPU cores, onnxruntime "
          f"provider {provider}; lungs {bare.method}, lesions {learned.lesions.name} "
          f"{learned.lesions.version}")
    archive = FolderArchive(src)
    (study,) = find_studies(archive)
    fig: dict[str, list[float]] = {k: [] for k in (
        "lung model", "cross-check (classical, coarse)", "lesion model", "both models",
        "classical lungs", "density lesions", "classical stages",
        "whole study, learned", "whole study, default", "whole study, classical")}
    if one is not None:
        fig.update({"one network (lungs + lesions)": [], "whole study, one network": []})
    for _ in range(args.repeat):
        t_l, lungs = _t(bare, ct)
        t_x, _ = _t(cross, ct)
        t_m, _ = _t(learned.lesions, ct, lungs)
        t_c, cl = _t(cl_lungs, ct)
        t_d, _ = _t(density, ct, cl)
        t_wl, (res_l, _) = _t(screen_study, study, archive, learned)
        t_wc, (res_c, _) = _t(screen_study, study, archive, classical)
        t_wd, (res_d, _) = _t(screen_study, study, archive, default)
        if one is not None:
            t_o, olungs = _t(one_bare, ct)
            t_ol, _ = _t(one.lesions, ct, olungs)
            t_wo, (res_o, _) = _t(screen_study, study, archive, one)
            fig["one network (lungs + lesions)"].append(t_o + t_ol)
            fig["whole study, one network"].append(t_wo)
        for k, v in (("lung model", t_l), ("cross-check (classical, coarse)", t_x),
                     ("lesion model", t_m), ("both models", t_l + t_m),
                     ("classical lungs", t_c), ("density lesions", t_d),
                     ("classical stages", t_c + t_d), ("whole study, learned", t_wl),
                     ("whole study, default", t_wd),
                     ("whole study, classical", t_wc)):
            fig[k].append(v)
    med = {k: round(statistics.median(v), 2) for k, v in fig.items()}
    for k, v in med.items():
        print(f"{k:<34}{v:>8.2f} s")
    ratio = round(med["whole study, learned"] / med["whole study, classical"], 2)
    ratio_d = round(med["whole study, default"] / med["whole study, classical"], 2)
    print(f"whole study learned / classical: {ratio}; default / classical: {ratio_d}")
    if one is not None:
        r1 = round(med["whole study, one network"] / med["whole study, classical"], 2)
        print(f"whole study one network / classical: {r1}; one-network flow result: "
              f"{res_o.status.value}, involvement {res_o.involved_pct}, pattern "
              f"{res_o.pattern}, warnings {res_o.warnings}")
    print(f"learned flow result: {res_l.status.value}, involvement {res_l.involved_pct}, "
          f"pattern {res_l.pattern}, warnings {res_l.warnings}")
    print(f"classical flow result: {res_c.status.value}, involvement {res_c.involved_pct}, "
          f"pattern {res_c.pattern}, warnings {res_c.warnings}")
    print(f"default flow ({default.algorithm_version}) result: {res_d.status.value}, "
          f"involvement {res_d.involved_pct}, pattern {res_d.pattern}, lungs "
          f"{res_d.lung_volume_ml} ml, warnings {res_d.warnings}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": med, "learned_over_classical": ratio,
                                         "default_over_classical": ratio_d,
                                         "lesion_model": args.lesion_model,
                                         "lung_infection_model": args.lung_infection_model,
                                         "provider": provider, "cpu_cores": os.cpu_count(),
                                         "repeat": args.repeat}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
