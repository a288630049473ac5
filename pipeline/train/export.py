"""Export a trained checkpoint: model.onnx (weights inside), model.yaml and MODEL_CARD.md.

The ONNX file is checked against the torch module on real inputs (validation slices of the
dataset, preprocessed by the serving path) and the largest difference is recorded.  model.yaml
carries the preprocessing spec that inference reads, the labels, the version, the ONNX file's
sha256, what the model was trained on (including the HU fingerprints of every case seen in
training or validation, so that evaluation never scores them) and, where given, the
evaluation reports of the model and of the density baseline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import TrainConfig, from_mapping
from ..inference import file_sha256, model_grid, normalise, resize_slices
from .dataset import read_dataset
from .loop import LABELS, build_network, spec_from_config, torch_predictor

log = logging.getLogger(__name__)


def _real_inputs(cfg: TrainConfig, ids: list[str], n: int = 4) -> np.ndarray:
    ds = read_dataset(cfg.dataset)
    by_id = {r.id: r for r in ds.records}
    xs = []
    for cid in ids[:n]:
        case = ds.load(by_id[cid])
        k = int(np.argmax(np.isin(case.label, (1, 2)).sum(axis=(1, 2))))
        if cfg.input == "ma20":
            from .loop import ma20_slice

            x01, _ = ma20_slice(case.hu[k], case.label[k], case.record)
            xs.append(resize_slices(x01[None], (128, 128), 1))
            continue
        grid = model_grid(case.hu.shape[1:], case.record.spacing_rc, cfg.spacing_mm)
        x = normalise(resize_slices(case.hu[k:k + 1].astype(np.float32), (128, 128), 1),
                      (cfg.hu_window[0], cfg.hu_window[1]))
        del grid
        xs.append(x)
    return np.stack(xs).astype(np.float32)


def export_model(run: Path, out: Path, reports: dict[str, Path] | None = None,
                 commands: dict[str, str] | None = None, checkpoint: str = "best") -> Path:
    """Export ``run``/``checkpoint``.pt into the model folder ``out``; returns model.onnx."""
    import onnxruntime as ort
    import torch

    ck = torch.load(run / f"{checkpoint}.pt", map_location="cpu", weights_only=False)
    cfg = from_mapping(TrainConfig, ck["config"], where="checkpoint config")
    splits: dict[str, list[str]] = dict(ck["splits"])
    net = build_network(cfg)
    net.load_state_dict(ck["model"])
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    example = torch.zeros(1, 1, 128, 128)
    torch.onnx.export(net, (example,), str(onnx_path), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"},
                                    "logits": {0: "n", 2: "h", 3: "w"}})
    x = _real_inputs(cfg, splits["val"] or splits["train"])
    ref = torch_predictor(net, torch.device("cpu"))(x)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.asarray(sess.run(None, {"image": x})[0])
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    log.info("onnx vs torch on %d real slices: max |logit difference| %.2e, labels agree %.5f",
             len(x), diff, agree)
    if diff > 1e-3:
        raise RuntimeError(f"onnxruntime and torch disagree: expected < 1e-3, got {diff:.2e}")
    ds = read_dataset(cfg.dataset)
    by_id = {r.id: r for r in ds.records}
    seen = sorted({by_id[i].fingerprint for i in splits["train"] + splits["val"]})
    metrics: dict[str, Any] = {}
    for key, path in (reports or {}).items():
        rep = json.loads(Path(path).read_text(encoding="utf-8"))
        metrics[key] = {"detector": rep["detector"], "cases": rep["cases"],
                        "slices": rep["slices"], "metrics": rep["metrics"]}
    spec = spec_from_config(cfg)
    history = ck["history"]
    doc: dict[str, Any] = {
        "name": cfg.name,
        "version": cfg.version,
        "task": "lesions",
        "sha256": file_sha256(onnx_path),
        "labels": list(LABELS),
        "framework": {"trained_with": f"torch {torch.__version__}, MONAI BasicUNet 2D",
                      "served_with": f"onnxruntime (exported with opset 17; checked "
                                     f"with onnxruntime {ort.__version__})"},
        "network": {"kind": "monai.networks.nets.BasicUNet", "spatial_dims": 2,
                    "features": list(cfg.features),
                    "parameters": int(sum(p.numel() for p in net.parameters()))},
        "preprocessing": {
            "input": cfg.input,
            **({"recipe": "per slice, the lung crop (bounding box + margin_mm) in the "
                          "canonical in-plane orientation, resampled to the nominal pixel "
                          "(360/256 mm), min-max, uint8(x*255), OpenCV CLAHE clip 7 with "
                          "tiles of 32 nominal pixels (pipeline/representation.py, "
                          "crop_input); / 255; padded with 0",
                "z_step_mm": cfg.z_step_mm} if cfg.input == "ma20" else {}),
            "slices": "axial, each slice on its own (2D)",
            "crop": "bounding box of the lung mask + margin_mm",
            "spacing_mm": spec.spacing_mm,
            "hu_window": list(spec.hu_window),
            "scale": "(clip(HU, lo, hi) - lo) / (hi - lo)",
            "pad_multiple": spec.pad_multiple,
            "pad_value_hu": -1000,
            "margin_mm": spec.margin_mm,
        },
        "postprocessing": {"argmax": True, "inside_lungs_only": True,
                           "min_lesion_mm2": spec.min_lesion_mm2,
                           "min_lesion_ml": spec.min_lesion_ml},
        "export_check": {"inputs": f"{len(x)} real slices (dataset)",
                         "max_abs_logit_difference": diff, "label_agreement": agree},
        "training_data": {
            "dataset": str(cfg.dataset),
            "sources": ds.info.get("sources", []),
            "splits": {k: len(v) for k, v in splits.items()},
            "train_cases": splits["train"],
            "val_cases": splits["val"],
            "test_cases": splits["test"],
            "seen_fingerprints": seen,
            "epochs": ck["epoch"],
            "checkpoint": f"{checkpoint}.pt (epoch {ck['epoch']})",
            "best_validation": max(history, key=lambda h: h["val_dice_lesion"]) if history
            else {},
            "seconds": round(sum(h["seconds"] for h in history), 0),
        },
        "metrics": metrics,
        "commands": commands or default_commands(cfg, out, checkpoint),
    }
    (out / "model.yaml").write_text(
        "# Written by `ctscreen export`; inference reads preprocessing, labels and sha256.\n"
        + yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(model_card(doc), encoding="utf-8")
    log.info("exported %s %s to %s (sha256 %s...)", cfg.name, cfg.version, out,
             doc["sha256"][:12])
    return onnx_path


def default_commands(cfg: TrainConfig, out: Path, checkpoint: str) -> dict[str, str]:
    """The commands that reproduce this model and its figures (from the repository root)."""
    return {
        "install": "scripts/setup.sh --test   # torch first, pinned by constraints.txt",
        "import": f"ctscreen data import --out {cfg.dataset} --semiseg "
                  "../shared/data/covid-lesions/semiseg-train --synthetic-from "
                  "../shared/data/chest-ct/lidc-idri-0314 --synthetic-cases 8 --seed 0",
        "train": "ctscreen train --config configs/train_lesions.yaml",
        "export": f"ctscreen export --run {cfg.out} --out {out} --checkpoint {checkpoint}",
        "evaluate model": f"ctscreen evaluate {out} {cfg.dataset} --out work/eval-model",
        "evaluate baseline": f"ctscreen evaluate density {cfg.dataset} --held-out-of {out} "
                             "--out work/eval-density",
        "attach figures": f"ctscreen export --run {cfg.out} --out {out} --checkpoint "
                          f"{checkpoint} --report model=work/eval-model/report.json "
                          "--report baseline=work/eval-density/report.json",
        "inference time": "python bench/lesion_inference.py",
    }


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    from .evaluate import LABELS as NAMES

    if not metrics:
        return ["(no evaluation attached: run `ctscreen evaluate` and export with --report)"]
    keys = list(metrics)
    rows = ["| metric | " + " | ".join(f"{metrics[k]['detector']}" for k in keys) + " |",
            "|---|" + "---|" * len(keys)]
    for m, label in NAMES.items():
        cells = []
        for k in keys:
            v = metrics[k]["metrics"][m]
            cells.append("n/a" if v["value"] is None else
                         f"{v['value']:.3f} ({_f(v['ci95'][0])}-{_f(v['ci95'][1])})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def model_card(doc: dict[str, Any]) -> str:
    td = doc["training_data"]
    cmds = doc.get("commands", {})
    lines = [
        f"# Model card: {doc['name']} {doc['version']}", "",
        "## What it does", "",
        "Marks ground-glass opacity (label 1) and consolidation (label 2) on axial chest CT "
        "slices, inside the lung mask, for the ctscreen overnight triage of suspected COVID-19 "
        "pneumonia.  A 2D MONAI BasicUNet "
        f"({doc['network']['parameters']:,} parameters, features {doc['network']['features']}) "
        f"on slices resampled to {doc['preprocessing']['spacing_mm']} mm, HU window "
        f"{doc['preprocessing']['hu_window']}; served by ONNX Runtime.", "",
        "## Intended use", "",
        "- AI triage of chest CT to rank a worklist, with every result shown to a radiologist.",
        "- **Not for diagnosis**, not for children, not for follow-up measurement.", "",
        "## Training data", "",
        f"Splits by case group: {td['splits']} (train / validation / held-out test).",
        "- MedSeg / COVID-SemiSeg annotated slices (8-bit, HU approximated by a fixed linear "
        "map, see pipeline/train/intensity.py); case identity unknown, grouped by a proxy "
        "(index, size, histogram): slices of one patient may still fall on both sides.",
        "- Synthetic lesions inserted into the real lungs of LIDC-IDRI-0314 (superior 70% of "
        "its lung slices; its opacified right upper lobe and nodule excluded as ignore).",
        f"- Training time: {td['seconds']:.0f} s of epochs ({td['epochs']} epochs, "
        f"{td.get('checkpoint', '')}) on 2 CPU cores, 1 torch thread, machine shared with "
        "other jobs.", "",
        "## Held-out evaluation (95% CI, bootstrap over cases)", "",
        *_metric_rows(doc.get("metrics", {})), "",
        "Held-out data: the test groups of the annotated slices (never trained on or used for "
        "model selection) and the inferior 30% of LIDC-IDRI-0314's lung slices (no COVID-19 "
        "findings; never trained on, but the same patient as the synthetic training cases).", "",
        "## Limits", "",
        "- Trained on 2D slices: no 3D context; lesions are judged slice by slice.",
        "- The annotated slices are 8-bit JPEGs with approximate HU and an assumed pixel size; "
        "the only full-HU real CT is one patient.  The figures above come from few cases: "
        "the intervals are wide, and the maintainers judge the model on further real cases.",
        "- Consolidation is its weak class: low consolidation Dice on held-out slices, it "
        "misses the phantom's homogeneous subpleural consolidation (a strict xfail test) and "
        "does not mark LIDC-IDRI-0314's opacified right upper lobe (excluded from training as "
        "ignore).  Ground glass is its strength.",
        "- It detects a pattern, not a cause: other opacities (atelectasis, other pneumonias) "
        "can be marked.",
        "- On LIDC-IDRI-0314 (no COVID-19) the pipeline with this model reports 19 small false "
        "lesions (0.10% of the lungs, largest 0.6 ml: pattern 'indeterminate'); the superior "
        "70% of that study were training background, so this is not a held-out figure.",
        "- Inference: about 11 s per 275-slice 512x512 study on 2 shared CPU cores (density "
        "baseline: under 1 s); see bench/lesion_inference.py.",
        "- Because of the consolidation weakness the pipeline's default stays the density "
        "detector; select this model with `lesions.detector: onnx`.",
        "- The lung mask limits where it looks: lesions the lung mask misses are missed.", "",
        "## Reproduce", "",
        *[f"- {k}: `{v}`" for k, v in cmds.items()], "",
        f"ONNX sha256: `{doc['sha256']}`; torch vs onnxruntime on real slices: max logit "
        f"difference {doc['export_check']['max_abs_logit_difference']:.1e}.", ""]
    return "\n".join(lines)
