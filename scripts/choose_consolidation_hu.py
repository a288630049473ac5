"""Choose ``lesions.model_consolidation_hu`` on a lesion model's own training and validation
slices (never its test cases): the HU above which a lesion pixel the model marked is called
consolidation.

    .venv/bin/python scripts/choose_consolidation_hu.py [MODEL] [DATASET]

MODEL defaults to models/covid-lesions-unet2d, DATASET to work/lesions-dataset (what
``ctscreen data import`` built for it).  For each threshold it prints the pooled consolidation
Dice of (a) the true lesion split at that HU ("oracle": how well density alone separates the
annotators' kinds) and (b) the model's lesion split at that HU, and the ground-glass Dice of
(b); the chosen value is the arg-max of (b).  Only annotated (semiseg) cases carry both kinds.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import yaml

from pipeline.inference import kind_by_density
from pipeline.train.dataset import read_dataset
from pipeline.train.evaluate import onnx_predictor

THRESHOLDS = range(-600, -150, 50)


def main(model: str = "models/covid-lesions-unet2d", data: str = "work/lesions-dataset") -> None:
    seen = yaml.safe_load(open(f"{model}/model.yaml"))["training_data"]
    ids = [c for c in seen["train_cases"] + seen["val_cases"] if c.startswith("medseg")]
    ds = read_dataset(data)
    recs = {r.id: r for r in ds.records}
    predict, _ = onnx_predictor(model)  # the model's own kinds; only its extent is used
    acc: dict[str, list[int]] = {}

    def add(key: str, a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> None:
        x = acc.setdefault(key, [0, 0])
        x[0] += 2 * int((a & b & valid).sum())
        x[1] += int((a & valid).sum() + (b & valid).sum())

    for cid in ids:
        case = ds.load(recs[cid])
        case = replace(case, region=np.ones(case.label.shape, bool))
        pred = predict(case)
        lab = case.label
        valid = lab != 255
        truth = (lab == 1) | (lab == 2)
        for t in THRESHOLDS:
            oracle = kind_by_density(truth.astype(np.uint8), case.hu, case.record.spacing_rc, t)
            split = kind_by_density(pred, case.hu, case.record.spacing_rc, t)
            add(f"{t} oracle consolidation", oracle == 2, lab == 2, valid)
            add(f"{t} model consolidation", split == 2, lab == 2, valid)
            add(f"{t} model ground glass", split == 1, lab == 1, valid)
    print(f"{len(ids)} training + validation slices of {model}")
    best = max(THRESHOLDS, key=lambda t: acc[f"{t} model consolidation"][0]
               / max(1, acc[f"{t} model consolidation"][1]))
    for t in THRESHOLDS:
        row = [acc[f"{t} {k}"] for k in ("oracle consolidation", "model consolidation",
                                          "model ground glass")]
        print(f"{t:5d} HU  " + "  ".join(f"{a / max(1, b):.3f}" for a, b in row)
              + ("  <- chosen" if t == best else ""))


if __name__ == "__main__":
    main(*sys.argv[1:3])
