"""Evaluation of a lesion detector (an exported model or the density baseline) on a dataset.

Both detectors see the same cases, the same HU (the same 8-bit -> HU map for 2D slices) and
the same lung region (case ``region``), and are scored by the same code:

- **Dice** of ground-glass opacity, consolidation and of lesions as a whole, pooled over the
  cases' pixels (ignore-labelled pixels excluded);
- **lesion-level sensitivity**: ground-truth lesions are the 8-connected pieces (any kind) of
  each slice of at least ``min_lesion_mm2``; one is detected when a predicted lesion pixel
  touches it.  **False positives**: predicted pieces (after the detector's own size filter)
  of at least ``min_lesion_mm2`` touching no true or ignored lesion, **per slice**;
- **slice-level AUC**: the score of a slice is its predicted lesion area (mm2); a slice is
  positive when it holds a ground-truth lesion of at least ``min_lesion_mm2``;
- **sensitivity / specificity** at the operating point "a slice is called positive when any
  predicted piece of at least ``min_lesion_mm2`` remains";
- every figure with a 95% confidence interval: percentile bootstrap over **cases** (2000
  resamples, seeded); a resample where a figure is undefined (no negative slice for the
  AUC) is skipped for that figure.

Cases a model was trained or validated on are recognised by their HU fingerprint (listed in
its model.yaml) and left out, so a model is never scored on what it has seen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from scipy.stats import rankdata

from ..artefacts import LungMasks, Volume
from ..config import LesionsConfig
from .dataset import IGNORE, CaseData, Dataset

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
CasePredictor = Callable[[CaseData], U8]
_ST = np.ones((3, 3), dtype=bool)


@dataclass
class CaseStats:
    id: str
    site: str
    source: str
    inter: dict[str, int] = field(default_factory=dict)
    pred: dict[str, int] = field(default_factory=dict)
    gt: dict[str, int] = field(default_factory=dict)
    gt_lesions: int = 0
    detected: int = 0
    fp: int = 0
    slices: int = 0
    scores: list[float] = field(default_factory=list)
    truth: list[bool] = field(default_factory=list)
    calls: list[bool] = field(default_factory=list)
    gt_in_region: int = 0


KINDS = {"lesion": (1, 2), "ggo": (1,), "consolidation": (2,)}


def case_stats(case: CaseData, pred: U8, min_lesion_mm2: float) -> CaseStats:
    rec = case.record
    gt = case.label
    pred = np.where(case.region, pred, 0).astype(np.uint8)
    valid = gt != IGNORE
    st = CaseStats(rec.id, rec.site, rec.source, slices=int(gt.shape[0]))
    for name, vals in KINDS.items():
        p = np.isin(pred, vals) & valid
        g = np.isin(gt, vals)
        st.inter[name] = int(np.count_nonzero(p & g))
        st.pred[name] = int(np.count_nonzero(p))
        st.gt[name] = int(np.count_nonzero(g))
    st.gt_in_region = int(np.count_nonzero(np.isin(gt, (1, 2)) & case.region))
    px_mm2 = rec.spacing_rc[0] * rec.spacing_rc[1]
    min_px = min_lesion_mm2 / px_mm2
    for k in range(gt.shape[0]):
        g_any = np.isin(gt[k], (1, 2))
        p_any = pred[k] > 0
        glab, gn = ndi.label(g_any, structure=_ST)
        big = 0
        if gn:
            sizes = np.bincount(glab.ravel())[1:]
            hit = np.zeros(gn + 1, dtype=bool)
            hit[np.unique(glab[p_any])] = True
            for i in range(gn):
                if sizes[i] >= min_px:
                    big += 1
                    st.detected += int(hit[i + 1])
        st.gt_lesions += big
        plab, pn = ndi.label(p_any, structure=_ST)
        called = False
        if pn:
            sizes = np.bincount(plab.ravel())[1:]
            touches = np.zeros(pn + 1, dtype=bool)
            touches[np.unique(plab[g_any | (gt[k] == IGNORE)])] = True
            for i in range(pn):
                if sizes[i] >= min_px:
                    called = True
                    st.fp += int(not touches[i + 1])
        st.scores.append(float(np.count_nonzero(p_any) * px_mm2))
        st.truth.append(big > 0)
        st.calls.append(called)
    return st


def auc(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN without both classes."""
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def metrics_of(stats: list[CaseStats]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in KINDS:
        s = sum(c.pred[name] + c.gt[name] for c in stats)
        out[f"dice_{name}"] = 2.0 * sum(c.inter[name] for c in stats) / s if s else float("nan")
    n_les = sum(c.gt_lesions for c in stats)
    out["lesion_sensitivity"] = sum(c.detected for c in stats) / n_les if n_les else float("nan")
    n_sl = sum(c.slices for c in stats)
    out["fp_per_slice"] = sum(c.fp for c in stats) / n_sl if n_sl else float("nan")
    scores = np.array([v for c in stats for v in c.scores], dtype=np.float64)
    truth = np.array([v for c in stats for v in c.truth], dtype=bool)
    calls = np.array([v for c in stats for v in c.calls], dtype=bool)
    out["slice_auc"] = auc(scores, truth)
    out["slice_sensitivity"] = float(calls[truth].mean()) if truth.any() else float("nan")
    out["slice_specificity"] = float((~calls[~truth]).mean()) if (~truth).any() else float("nan")
    return out


def bootstrap(stats: list[CaseStats], n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Point estimates and 95% percentile-bootstrap intervals (resampling cases)."""
    point = metrics_of(stats)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n):
        idx = rng.integers(len(stats), size=len(stats))
        m = metrics_of([stats[i] for i in idx])
        for k, v in m.items():
            if not np.isnan(v):
                samples[k].append(v)
    out: dict[str, Any] = {}
    for k, v in point.items():
        s = np.asarray(samples[k])
        lo, hi = (np.percentile(s, [2.5, 97.5]) if s.size else (np.nan, np.nan))
        out[k] = {"value": _r(v), "ci95": [_r(float(lo)), _r(float(hi))]}
    return out


def _r(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 4)


# --------------------------------------------------------------------------- detectors


def density_predictor(config: LesionsConfig | None = None, pad: int = 6) -> CasePredictor:
    """The density baseline on a case: a stack is padded by repeating its end slices (a
    single 2D slice becomes a short cylinder), run in 3D, and cropped back."""
    from ..lesions import DensityLesionDetector

    det = DensityLesionDetector(config or LesionsConfig())

    def run(case: CaseData) -> U8:
        rec = case.record
        hu = np.pad(case.hu, ((pad, pad), (0, 0), (0, 0)), mode="edge")
        region = np.pad(case.region, ((pad, pad), (0, 0), (0, 0)), mode="edge")
        aff = np.diag([rec.slice_mm, rec.spacing_rc[0], rec.spacing_rc[1], 1.0])
        ct = Volume(hu, aff)
        lungs = LungMasks(ct.with_array(region.astype(np.uint8)), "dataset region")
        out = det(ct, lungs).array[pad:-pad]
        return np.asarray(out, dtype=np.uint8)

    return run


def onnx_predictor(model_dir: str | Path, threads: int = 2, batch: int = 16) -> tuple[
        CasePredictor, Any]:
    from ..inference import OnnxPredictor, load_model_spec, segment_slices

    spec = load_model_spec(model_dir)
    predictor = OnnxPredictor(spec, threads)

    def run(case: CaseData) -> U8:
        return segment_slices(case.hu, case.record.spacing_rc, case.region, predictor, spec,
                              batch, slice_mm=case.record.slice_mm)

    return run, spec


def evaluate(model: str, dataset: Dataset, held_out_of: str | None = None,
             min_lesion_mm2: float = 20.0, threads: int = 2,
             n_boot: int = 2000) -> dict[str, Any]:
    """Score ``model`` ("density" or a model folder) on ``dataset``; returns the report."""
    seen: set[str] = set()
    spec = None
    if model == "density":
        predict = density_predictor()
        name = "density-threshold 1.0 (baseline)"
    else:
        predict, spec = onnx_predictor(model, threads)
        name = f"{spec.name} {spec.version}"
        seen |= set(spec.raw.get("training_data", {}).get("seen_fingerprints", []))
    if held_out_of:
        from ..inference import load_model_spec

        other = load_model_spec(held_out_of)
        seen |= set(other.raw.get("training_data", {}).get("seen_fingerprints", []))
    cases = [r for r in dataset.records if r.fingerprint not in seen]
    skipped = len(dataset.records) - len(cases)
    if skipped:
        log.warning("%d case(s) left out: a model was trained or validated on them", skipped)
    if not cases:
        raise ValueError("no case left to evaluate: every case was seen in training")
    stats = []
    t0 = time.perf_counter()
    for rec in cases:
        case = dataset.load(rec)
        stats.append(case_stats(case, predict(case), min_lesion_mm2))
    dt = time.perf_counter() - t0
    report = {
        "detector": name,
        "dataset": str(dataset.root),
        "cases": len(stats),
        "cases_left_out_as_seen": skipped,
        "slices": sum(s.slices for s in stats),
        "slices_with_lesions": int(sum(sum(s.truth) for s in stats)),
        "gt_lesions": sum(s.gt_lesions for s in stats),
        "by_source": {src: sum(1 for s in stats if s.source == src)
                      for src in sorted({s.source for s in stats})},
        "min_lesion_mm2": min_lesion_mm2,
        # the share of true lesion pixels inside the lung region: the most either detector
        # can find (both are restricted to the region)
        "gt_lesion_pixels_in_region": round(sum(s.gt_in_region for s in stats)
                                            / max(1, sum(s.gt["lesion"] for s in stats)), 4),
        "seconds": round(dt, 1),
        "metrics": bootstrap(stats, n_boot),
        "case_ids": [s.id for s in stats],
    }
    return report


LABELS = {
    "dice_ggo": "Dice, ground-glass opacity",
    "dice_consolidation": "Dice, consolidation",
    "dice_lesion": "Dice, lesions (both kinds)",
    "lesion_sensitivity": "Lesion-level sensitivity",
    "fp_per_slice": "False-positive lesions per slice",
    "slice_auc": "Slice-level AUC",
    "slice_sensitivity": "Slice-level sensitivity (operating point)",
    "slice_specificity": "Slice-level specificity (operating point)",
}


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {report['detector']}", "",
             f"Dataset `{report['dataset']}`: {report['cases']} cases, {report['slices']} "
             f"slices ({report['slices_with_lesions']} with lesions), {report['gt_lesions']} "
             f"true lesions of at least {report['min_lesion_mm2']} mm2; cases by source "
             f"{report['by_source']}; {report['cases_left_out_as_seen']} case(s) left out as "
             f"seen in training; {report['gt_lesion_pixels_in_region']:.1%} of true lesion "
             f"pixels lie inside the lung region the detectors are limited to.", "",
             "| metric | value | 95% CI (bootstrap over cases) |", "|---|---|---|"]
    for k, label in LABELS.items():
        m = report["metrics"][k]
        lo, hi = m["ci95"]
        lines.append(f"| {label} | {_fmt(m['value'])} | {_fmt(lo)} - {_fmt(hi)} |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
