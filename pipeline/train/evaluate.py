"""Evaluation that scores what the batch does: a lesion detector, or a lung segmenter, on a dataset.

**Lesions** (``ctscreen evaluate MODEL|density|default DATA``): an exported lesion model, the
density baseline or the configured detector (``lesions`` of the configuration).  Both
detectors see the same cases, the same image (HU, or the ma20 recipe image where a case holds
no HU) and the same region, and are scored by the same code.

The region both detectors are restricted to (:func:`region_rule`, stated per source in the
report with the share of true lesion pixels inside it, overall and per source):

- **full-field cases** (``fov`` "full": the ma20 layout; and the volumes layout, whose stacks
  keep the whole thorax section around the lungs): the mask of the configured lung segmenter
  (``lungs`` of the configuration, or ``--lungs MODEL|classical``), as in the batch.  On an
  HU case it runs on a :func:`case_volume`; where it finds no lungs the region is empty (the
  case counts in ``cases_no_lungs_found``).  An ma20 case holds no HU: only a learned lung
  model can run there (on the recipe image itself); with classical lungs the case is not
  applicable;
- **lung-cropped 2D slices of the semiseg layout**: the whole slice (the crop is the region,
  as in the published benchmarks on such slices);
- other lung-cropped cases (synthetic lesions and negatives cut from a real series, whose
  stored region is that series' lung mask): their stored region.

A case a detector cannot read (the density detector on an ma20 case without HU) is left out
with its reason logged and counted (``cases_not_applicable``).  A model that reads a HU
window gets an ma20 case through approximate HU anchored in the region
(:func:`~pipeline.representation.ma20_pseudo_hu`).

Figures:

- **Dice** of ground-glass opacity, consolidation and of lesions as a whole, pooled over the
  cases' pixels (ignore-labelled pixels excluded).  A lesion of unknown kind (label 3, a
  merged infection mask) counts as a lesion, but not for the per-kind Dice: a predicted GGO
  pixel there is neither a true nor a false GGO pixel;
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

**Lungs** (``ctscreen evaluate --task lungs MODEL|classical|default DATA``): lung Dice per
case and pooled over pixels, with the mean of the cases' Dice, and the share of the true
lesion (infection) pixels inside the predicted lung, each with a 95% bootstrap interval over
cases.  The truth is the annotated lung mask of the ma20 layout (its stored
region); other cases carry no lung truth and are not scored.  A learned model runs on the
ma20 recipe images (:meth:`~pipeline.lungs.LearnedLungSegmenter.segment_recipe`); the
classical segmenter needs HU and is refused there.

Cases a model was trained or validated on are left out, for every model involved (the
detector, a learned lung model giving the region, ``--held-out-of``): they are recognised by
their fingerprint (``training_data.seen_fingerprints`` of the model's model.yaml).  A lung
model whose model.yaml lists no fingerprints but names its patient splits has the ma20
volumes of its train and validation splits left out by name.  The report lists the cases
left out and by which model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from scipy.stats import rankdata

from ..artefacts import LungMasks, Volume
from ..config import Config, LesionsConfig, LungsConfig
from ..errors import CtscreenError, NotAnalysable
from .dataset import IGNORE, LESION_ANY, CaseData, CaseRecord, Dataset

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
CasePredictor = Callable[[CaseData], U8]
T = TypeVar("T")
_ST = np.ones((3, 3), dtype=bool)

LESION_VALUES = (1, 2, LESION_ANY)
KINDS = {"lesion": LESION_VALUES, "ggo": (1,), "consolidation": (2,)}
LUNG_TRUTH_SOURCES = ("ma20",)  # sources whose stored region is an annotated lung mask

RULE_SEGMENTER = "lung-segmenter"
RULE_WHOLE = "whole-slice"
RULE_STORED = "stored-mask"


class EvaluationError(CtscreenError):
    """An evaluation that cannot be made as asked (no case left, a method that cannot read
    the data, a model of another task)."""


class NotApplicable(CtscreenError):
    """One case that a detector or segmenter cannot read; the case is left out, counted."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --------------------------------------------------------------------------- lesion metrics


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


def case_stats(case: CaseData, pred: U8, min_lesion_mm2: float) -> CaseStats:
    """The counts of one case; ``pred`` is kept inside ``case.region``."""
    rec = case.record
    gt = case.label
    pred = np.where(case.region, pred, 0).astype(np.uint8)
    valid = gt != IGNORE
    known = valid & (gt != LESION_ANY)  # pixels whose lesion kind is known
    st = CaseStats(rec.id, rec.site, rec.source, slices=int(gt.shape[0]))
    for name, vals in KINDS.items():
        p = np.isin(pred, vals) & (valid if name == "lesion" else known)
        g = np.isin(gt, vals)
        st.inter[name] = int(np.count_nonzero(p & g))
        st.pred[name] = int(np.count_nonzero(p))
        st.gt[name] = int(np.count_nonzero(g))
    st.gt_in_region = int(np.count_nonzero(np.isin(gt, LESION_VALUES) & case.region))
    px_mm2 = rec.spacing_rc[0] * rec.spacing_rc[1]
    min_px = min_lesion_mm2 / px_mm2
    for k in range(gt.shape[0]):
        g_any = np.isin(gt[k], LESION_VALUES)
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


def bootstrap_over(items: Sequence[T], fn: Callable[[list[T]], dict[str, float]],
                   n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Point estimates of ``fn`` and 95% percentile-bootstrap intervals (resampling items)."""
    point = fn(list(items))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n if items else 0):
        idx = rng.integers(len(items), size=len(items))
        m = fn([items[i] for i in idx])
        for k, v in m.items():
            if not np.isnan(v):
                samples[k].append(v)
    out: dict[str, Any] = {}
    for k, v in point.items():
        s = np.asarray(samples[k])
        lo, hi = (np.percentile(s, [2.5, 97.5]) if s.size else (np.nan, np.nan))
        out[k] = {"value": _r(v), "ci95": [_r(float(lo)), _r(float(hi))]}
    return out


def bootstrap(stats: list[CaseStats], n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Point estimates and 95% percentile-bootstrap intervals (resampling cases)."""
    return bootstrap_over(stats, metrics_of, n, seed)


def _r(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 4)


# --------------------------------------------------------------------------- geometry, region


def case_volume(rec: CaseRecord, array: npt.NDArray[Any]) -> Volume:
    """A case's (K, H, W) stack as a Volume: rows run to posterior (+y), columns to patient
    left (+x), slices to superior (+z), as the pipeline's axial volumes do (the datasets keep
    that orientation; their original position is not stored).  A case without a slice
    distance (2D slices) gets 1 mm."""
    sr, sc = rec.spacing_rc
    aff = np.zeros((4, 4))
    aff[0, 2] = sc
    aff[1, 1] = sr
    aff[2, 0] = rec.slice_mm if rec.slice_mm > 0 else 1.0
    aff[3, 3] = 1.0
    return Volume(np.asarray(array), aff)


def region_rule(rec: CaseRecord) -> str:
    """Which region a case's detectors are restricted to (see the module docstring)."""
    if rec.fov == "full" or rec.source == "volume":
        return RULE_SEGMENTER
    if rec.source == "semiseg":
        return RULE_WHOLE
    return RULE_STORED


def lungs_config(choice: str | None, base: LungsConfig) -> LungsConfig:
    """``None`` / "default": the configured lungs; "classical"; else a lung model folder."""
    if choice in (None, "", "default"):
        return base
    if choice == "classical":
        return replace(base, method="classical")
    return replace(base, method="model", model=str(choice))


class LungRegion:
    """The lung segmenter of an evaluation, built on first use (a dataset of lung-cropped
    slices never needs it).  The learned segmenter's classical cross-check is off: it adds
    a worklist warning, never changes the mask."""

    def __init__(self, config: LungsConfig) -> None:
        self.config = replace(config, cross_check=False)
        self._segmenter: Any = None

    @property
    def learned(self) -> bool:
        return self.config.method == "model"

    @property
    def label(self) -> str:
        if self._segmenter is not None:
            return str(getattr(self._segmenter, "method", self.config.method))
        return f"lung model {self.config.model}" if self.learned else "classical"

    def spec(self) -> Any:
        from ..inference import load_model_spec

        return load_model_spec(self.config.model)

    def segmenter(self) -> Any:
        if self._segmenter is None:
            from ..lungs import segmenter_for

            self._segmenter = segmenter_for(self.config)
        return self._segmenter

    def of(self, case: CaseData) -> tuple[BoolArray, bool]:
        """(lung mask of the case, whether lungs were found); raises NotApplicable."""
        rec = case.record
        if rec.intensity == "ma20":
            if not self.learned:
                raise NotApplicable("the classical lung segmenter needs HU and the case holds "
                                    "ma20 recipe images (no HU); a lung model can run there")
            seg = self.segmenter()
            mask = np.asarray(seg.segment_recipe(case.hu.astype(np.uint8)), dtype=bool)
            if mask.shape != case.label.shape:
                from ..representation import resize2d

                mask = np.asarray(resize2d(mask.astype(np.uint8), case.label.shape[1:],
                                           linear=False), dtype=bool)
            return mask, bool(mask.any())
        try:
            masks: LungMasks = self.segmenter()(case_volume(rec, case.hu))
        except NotAnalysable as e:
            if e.code != "no-lungs-found":
                raise
            return np.zeros(case.label.shape, dtype=bool), False
        return masks.mask(), True


# --------------------------------------------------------------------------- what was seen


@dataclass
class Seen:
    """The cases the models involved were trained or validated on."""

    fingerprints: dict[str, set[str]] = field(default_factory=dict)  # model -> fingerprints
    ma20_volumes: dict[str, set[str]] = field(default_factory=dict)  # lung model -> names

    def add(self, spec: Any) -> None:
        label = f"{spec.name} {spec.version}"
        td = spec.raw.get("training_data") or {}
        fps = td.get("seen_fingerprints")
        if fps:
            self.fingerprints[label] = {str(f) for f in fps}
            return
        splits = td.get("splits")
        if spec.task == "lungs" and isinstance(splits, dict) and any(
                isinstance(v, list) for v in splits.values()):
            names = {str(g) for k in ("train", "val") for g in splits.get(k) or []}
            self.ma20_volumes[label] = names
            log.warning("model %s lists no seen_fingerprints: the %d ma20 volumes its train and "
                        "validation splits name are left out by name", label, len(names))
            return
        log.warning("model %s lists no cases it was trained on: none can be left out", label)

    def by(self, rec: CaseRecord) -> list[str]:
        """The models that saw ``rec``."""
        out = [m for m, f in self.fingerprints.items() if rec.fingerprint in f]
        if rec.source == "ma20":
            name = rec.group.removeprefix(f"{rec.site}-")
            out += [m for m, names in self.ma20_volumes.items() if name in names and m not in out]
        return out

    def split(self, records: Sequence[CaseRecord]) -> tuple[list[CaseRecord],
                                                            list[dict[str, Any]]]:
        """(records to evaluate, the ones left out with the models that saw them)."""
        keep, left = [], []
        for rec in records:
            by = self.by(rec)
            if by:
                left.append({"id": rec.id, "source": rec.source, "seen_by": by})
            else:
                keep.append(rec)
        if left:
            log.warning("%d case(s) left out: a model was trained or validated on them",
                        len(left))
        return keep, left


def _model_list(held_out_of: str | Sequence[str] | None) -> list[str]:
    if not held_out_of:
        return []
    return [held_out_of] if isinstance(held_out_of, str) else list(held_out_of)


# --------------------------------------------------------------------------- detectors


@dataclass
class Detector:
    """A lesion detector as evaluation runs it: a name, a case -> labels function, the
    intensities it can read and the model specs whose seen cases are left out."""

    name: str
    predict: CasePredictor
    reads: tuple[str, ...] = ("hu",)
    specs: tuple[Any, ...] = ()


def density_predictor(config: LesionsConfig | None = None, pad: int = 6) -> CasePredictor:
    """The density baseline on a case: a stack is padded by repeating its end slices (a
    single 2D slice becomes a short cylinder), run in 3D, and cropped back."""
    from ..lesions import DensityLesionDetector

    det = DensityLesionDetector(config or LesionsConfig())

    def run(case: CaseData) -> U8:
        hu = np.pad(case.hu, ((pad, pad), (0, 0), (0, 0)), mode="edge")
        region = np.pad(case.region, ((pad, pad), (0, 0), (0, 0)), mode="edge")
        ct = case_volume(case.record, hu)
        lungs = LungMasks(ct.with_array(region.astype(np.uint8)), "dataset region")
        out = det(ct, lungs).array[pad:-pad]
        return np.asarray(out, dtype=np.uint8)

    return run


def onnx_predictor(model_dir: str | Path, threads: int = 2, batch: int = 16,
                   consolidation_hu: float | None = None) -> tuple[CasePredictor, Any]:
    from ..inference import OnnxPredictor, load_model_spec, segment_slices

    spec = load_model_spec(model_dir)
    predictor = OnnxPredictor(spec, threads)

    def run(case: CaseData) -> U8:
        rec = case.record
        # ma20 cases have no slice distance (their slices are not a contiguous stack)
        return segment_slices(case.hu, rec.spacing_rc, case.region, predictor, spec, batch,
                              slice_mm=rec.slice_mm if rec.slice_mm > 0 else None,
                              intensity=rec.intensity, consolidation_hu=consolidation_hu)

    return run, spec


def infection_predictor(model_dir: str | Path, config: LesionsConfig,
                        lungs: LungsConfig | None = None) -> tuple[CasePredictor, Any]:
    """The lesions of a lung model's infection class (``lesions.detector: lung-model``) on
    a case, as the batch makes them: a full-field HU stack goes through the lung segmenter
    itself (:class:`~pipeline.lungs.LearnedLungSegmenter`, its infection on the CT grid);
    an ma20 case's recipe images, and a lung-cropped HU slice made into the recipe, through
    the network per slice.  Then, as :class:`~pipeline.inference.LungModelLesionDetector`:
    inside the case's region, pieces under 20 mm2 per slice dropped, the kind by density
    where the case holds HU (an ma20 case has no kind truth: its lesions count as ground
    glass)."""
    from ..inference import infection_lesions
    from ..lungs import LearnedLungSegmenter
    from ..representation import ma20_input, resize2d, square_to_slice

    base = replace(lungs or LungsConfig(), method="model", model=str(model_dir),
                   cross_check=False)
    seg = LearnedLungSegmenter(base)
    if not seg.infection:
        raise EvaluationError(f"{model_dir}: a lung model without the infection class")

    def run(case: CaseData) -> U8:
        rec = case.record
        region = np.asarray(case.region, dtype=bool)
        if rec.intensity == "ma20":
            inf = seg.infection_recipe(case.hu.astype(np.uint8))
        elif rec.fov == "full" or rec.source == "volume":
            try:
                masks = seg(case_volume(rec, case.hu))
                inf = np.asarray(masks.infection.array > 0) if masks.infection is not None \
                    else np.zeros(region.shape, bool)
            except NotAnalysable:
                inf = np.zeros(region.shape, bool)
        else:  # a lung-cropped HU slice: the crop made into the recipe, as if full-field
            sq = seg.infection_recipe(ma20_input(case.hu)).astype(np.float32)
            inf = np.stack([square_to_slice(q, region.shape[1:]) >= 0.5 for q in sq])
        if inf.shape != region.shape:
            inf = np.asarray(resize2d(inf.astype(np.uint8), region.shape[1:], linear=False),
                             dtype=bool)
        return infection_lesions(inf & region, case.hu if rec.intensity == "hu" else None,
                                 rec.spacing_rc, config.model_consolidation_hu)

    return run, seg.spec


def lesion_detector(model: str, config: LesionsConfig | None = None,
                    threads: int = 2, lungs: LungsConfig | None = None) -> Detector:
    """"density", a lesion model folder, a lung model folder with an infection class, or
    "default" (the configured detector)."""
    from ..inference import load_model_spec

    cfg = config or LesionsConfig()
    if model == "default":
        if cfg.detector == "density":
            model = "density"
        elif cfg.detector == "onnx":
            model = cfg.model
        elif cfg.detector == "lung-model":
            model = (lungs or LungsConfig()).model
        else:
            raise EvaluationError(f"lesions.detector: expected 'density', 'onnx' or "
                                  f"'lung-model', got {cfg.detector!r}")
    if model == "density":
        return Detector("density-threshold 1.0 (baseline)", density_predictor(cfg), ("hu",))
    kind = ("" if cfg.model_consolidation_hu is None
            else f", kind by density (consolidation above {cfg.model_consolidation_hu:g} HU)")
    if load_model_spec(model).task == "lungs":
        predict, spec = infection_predictor(model, cfg, lungs)
        return Detector(f"{spec.name} {spec.version} (infection class){kind}", predict,
                        ("hu", "ma20"), (spec,))
    predict, spec = onnx_predictor(model, threads, max(1, cfg.batch_slices),
                                   cfg.model_consolidation_hu)
    if spec.task != "lesions":
        raise EvaluationError(f"{model}: expected a lesions model, got task {spec.task!r} "
                              f"(a lung model is evaluated with --task lungs)")
    # every model reads ma20 recipe images: an "ma20" model as they are, a HU-window model
    # through approximate HU (pipeline.representation.ma20_pseudo_hu, anchored in the region)
    reads = ("hu", "ma20")
    return Detector(f"{spec.name} {spec.version}{kind}", predict, reads, (spec,))


# --------------------------------------------------------------------------- lesion task


def evaluate(model: str | Detector, dataset: Dataset,
             held_out_of: str | Sequence[str] | None = None, min_lesion_mm2: float = 20.0,
             threads: int = 2, n_boot: int = 2000, config: Config | None = None,
             lungs: str | None = None) -> dict[str, Any]:
    """Score a lesion detector (``model``: "density", a model folder, "default", or a
    :class:`Detector`) on ``dataset``; ``lungs`` ("classical" or a lung model folder)
    overrides the configured lung segmenter; returns the report."""
    from ..inference import load_model_spec

    cfg = config or Config()
    det = (model if isinstance(model, Detector)
           else lesion_detector(model, cfg.lesions, threads, cfg.lungs))
    region = LungRegion(lungs_config(lungs, cfg.lungs))
    rules = {r.id: region_rule(r) for r in dataset.records}
    seen = Seen()
    for spec in det.specs:
        seen.add(spec)
    for other in _model_list(held_out_of):
        seen.add(load_model_spec(other))
    if region.learned and RULE_SEGMENTER in rules.values():
        seen.add(region.spec())  # its region is part of what is scored
    records, left_out = seen.split(dataset.records)
    if not records:
        raise EvaluationError("no case left to evaluate: every case was seen in training")
    stats: list[CaseStats] = []
    not_applicable: list[dict[str, str]] = []
    no_lungs: list[str] = []
    used_rules: dict[str, set[str]] = {}
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        rule = rules[rec.id]
        try:
            if rec.intensity not in det.reads:
                raise NotApplicable(f"{det.name} needs HU and the case holds {rec.intensity} "
                                    f"recipe images (no HU)")
            case = dataset.load(rec)
            if rule == RULE_SEGMENTER:
                mask, found = region.of(case)
                if not found:
                    no_lungs.append(rec.id)
                    log.warning("case %d of %d (source %s): the lung segmenter found no lungs; "
                                "its region is empty", i + 1, len(records), rec.source)
                case = replace(case, region=mask)
            elif rule == RULE_WHOLE:
                case = replace(case, region=np.ones(case.label.shape, dtype=bool))
        except NotApplicable as e:
            log.debug("case %d of %d (source %s) not applicable: %s", i + 1, len(records),
                      rec.source, e.reason)
            not_applicable.append({"id": rec.id, "source": rec.source, "reason": e.reason})
            continue
        used_rules.setdefault(rec.source, set()).add(rule)
        stats.append(case_stats(case, det.predict(case), min_lesion_mm2))
    dt = time.perf_counter() - t0
    reasons = sorted({n["reason"] for n in not_applicable})
    for reason in reasons:
        log.warning("%d case(s) not applicable, left out: %s",
                    sum(n["reason"] == reason for n in not_applicable), reason)
    if not stats:
        raise EvaluationError(f"no case left to evaluate: {len(not_applicable)} case(s) not "
                              f"applicable ({'; '.join(reasons)})")
    rule_text = {RULE_SEGMENTER: f"the lung segmenter's mask ({region.label})",
                 RULE_WHOLE: "the whole slice (the lung crop is the region, as in published "
                             "benchmarks)",
                 RULE_STORED: "the stored lung mask of the case"}
    sources = sorted({s.source for s in stats})
    report = {
        "task": "lesions",
        "detector": det.name,
        "lungs": region.label if any(RULE_SEGMENTER in v for v in used_rules.values()) else None,
        "dataset": str(dataset.root),
        "cases": len(stats),
        "cases_left_out_as_seen": len(left_out),
        "left_out": left_out,
        "cases_not_applicable": len(not_applicable),
        "not_applicable": not_applicable,
        "cases_no_lungs_found": len(no_lungs),
        "no_lungs_found": no_lungs,
        "slices": sum(s.slices for s in stats),
        "slices_with_lesions": int(sum(sum(s.truth) for s in stats)),
        "gt_lesions": sum(s.gt_lesions for s in stats),
        "by_source": {src: sum(1 for s in stats if s.source == src) for src in sources},
        "region_rules": {src: "; ".join(rule_text[r] for r in sorted(used_rules[src]))
                         for src in sources},
        "min_lesion_mm2": min_lesion_mm2,
        # the share of true lesion pixels inside the region: the most either detector can
        # find (both are restricted to it)
        "gt_lesion_pixels_in_region": _share(stats),
        "gt_lesion_pixels_in_region_by_source": {
            src: _share([s for s in stats if s.source == src]) for src in sources},
        "seconds": round(dt, 1),
        "metrics": bootstrap(stats, n_boot),
        "case_ids": [s.id for s in stats],
    }
    return report


def _share(stats: list[CaseStats]) -> float | None:
    n = sum(s.gt["lesion"] for s in stats)
    return round(sum(s.gt_in_region for s in stats) / n, 4) if n else None


# --------------------------------------------------------------------------- lung task


@dataclass
class LungCaseStats:
    id: str
    source: str
    slices: int
    inter: int
    pred: int
    gt: int
    lungs_found: bool = True
    lesion_in: int = 0  # true lesion (infection) pixels inside the predicted lung
    lesion: int = 0  # true lesion pixels

    @property
    def dice(self) -> float:
        s = self.pred + self.gt
        return 2.0 * self.inter / s if s else 1.0


def lung_metrics(stats: list[LungCaseStats]) -> dict[str, float]:
    s = sum(c.pred + c.gt for c in stats)
    les = sum(c.lesion for c in stats)
    return {"dice_pooled": 2.0 * sum(c.inter for c in stats) / s if s else float("nan"),
            "dice_case_mean": float(np.mean([c.dice for c in stats])) if stats
            else float("nan"),
            "lesion_inside": sum(c.lesion_in for c in stats) / les if les else float("nan")}


def evaluate_lungs(model: str, dataset: Dataset,
                   held_out_of: str | Sequence[str] | None = None, n_boot: int = 2000,
                   config: Config | None = None) -> dict[str, Any]:
    """Score a lung segmenter (``model``: a lung model folder, "classical" or "default")
    on the cases of ``dataset`` that carry an annotated lung mask; returns the report."""
    from ..inference import load_model_spec

    cfg = config or Config()
    region = LungRegion(lungs_config(model, cfg.lungs))
    with_truth = [r for r in dataset.records if r.source in LUNG_TRUTH_SOURCES]
    without = len(dataset.records) - len(with_truth)
    if not with_truth:
        raise EvaluationError(f"{dataset.root}: no case with an annotated lung mask (expected "
                              f"the ma20 layout: ct/, lungs/, infection/ and volumes.csv)")
    if without:
        log.warning("%d case(s) carry no annotated lung mask and are not scored", without)
    if not region.learned and any(r.intensity == "ma20" for r in with_truth):
        raise EvaluationError(f"the classical lung segmenter needs HU, and the annotated cases "
                              f"of {dataset.root} hold ma20 recipe images (no HU): give a lung "
                              f"model folder instead")
    seen = Seen()
    if region.learned:
        seen.add(region.spec())
    for other in _model_list(held_out_of):
        seen.add(load_model_spec(other))
    records, left_out = seen.split(with_truth)
    if not records:
        raise EvaluationError("no case left to evaluate: every annotated case was seen in "
                              "training")
    stats: list[LungCaseStats] = []
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        case = dataset.load(rec)
        pred, found = region.of(case)
        if not found:
            log.warning("case %d of %d (source %s): the lung segmenter found no lungs", i + 1,
                        len(records), rec.source)
        truth = case.region
        les = np.isin(case.label, LESION_VALUES)
        stats.append(LungCaseStats(rec.id, rec.source, int(truth.shape[0]),
                                   int(np.count_nonzero(pred & truth)),
                                   int(np.count_nonzero(pred)), int(np.count_nonzero(truth)),
                                   found, int(np.count_nonzero(pred & les)),
                                   int(np.count_nonzero(les))))
    dt = time.perf_counter() - t0
    return {
        "task": "lungs",
        "segmenter": region.label,
        "dataset": str(dataset.root),
        "truth": "the annotated lung masks of the ma20 layout (diseased lung included)",
        "cases": len(stats),
        "slices": sum(s.slices for s in stats),
        "cases_left_out_as_seen": len(left_out),
        "left_out": left_out,
        "cases_without_lung_truth": without,
        "cases_no_lungs_found": sum(not s.lungs_found for s in stats),
        "seconds": round(dt, 1),
        "metrics": bootstrap_over(stats, lung_metrics, n_boot),
        "per_case": [{"id": s.id, "source": s.source, "slices": s.slices,
                      "dice": round(s.dice, 4),
                      "lesion_inside": round(s.lesion_in / s.lesion, 4) if s.lesion else None}
                     for s in stats],
    }


# --------------------------------------------------------------------------- reports


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

LUNG_LABELS = {
    "dice_pooled": "Lung Dice, pooled over pixels",
    "dice_case_mean": "Lung Dice, mean of the cases",
    "lesion_inside": "Share of the true lesion (infection) pixels inside the lung mask",
}


def report_markdown(report: dict[str, Any]) -> str:
    if report.get("task") == "lungs":
        return _lungs_markdown(report)
    share = report["gt_lesion_pixels_in_region"]
    lines = [f"# Evaluation: {report['detector']}", "",
             f"Dataset `{report['dataset']}`: {report['cases']} cases, {report['slices']} "
             f"slices ({report['slices_with_lesions']} with lesions), {report['gt_lesions']} "
             f"true lesions of at least {report['min_lesion_mm2']} mm2; cases by source "
             f"{report['by_source']}; {report['cases_left_out_as_seen']} case(s) left out as "
             f"seen in training; {report.get('cases_not_applicable', 0)} case(s) not "
             f"applicable; {_pct(share)} of true lesion pixels lie inside the region the "
             f"detectors are limited to.", ""]
    rules = report.get("region_rules", {})
    if rules:
        lines += ["| source | cases | region | true lesion pixels inside |", "|---|---|---|---|"]
        by = report.get("gt_lesion_pixels_in_region_by_source", {})
        for src, text in rules.items():
            lines.append(f"| {src} | {report['by_source'].get(src, 0)} | {text} | "
                         f"{_pct(by.get(src))} |")
        lines.append("")
    if report.get("cases_no_lungs_found"):
        lines += [f"The lung segmenter found no lungs in {report['cases_no_lungs_found']} "
                  f"case(s) (empty region, every lesion there missed).", ""]
    for na in sorted({n["reason"] for n in report.get("not_applicable", [])}):
        count = sum(n["reason"] == na for n in report["not_applicable"])
        lines += [f"Not applicable ({count} case(s)): {na}.", ""]
    lines += ["| metric | value | 95% CI (bootstrap over cases) |", "|---|---|---|"]
    for k, label in LABELS.items():
        m = report["metrics"][k]
        lo, hi = m["ci95"]
        lines.append(f"| {label} | {_fmt(m['value'])} | {_fmt(lo)} - {_fmt(hi)} |")
    return "\n".join(lines) + "\n"


def _lungs_markdown(report: dict[str, Any]) -> str:
    left = ", ".join(x["id"] for x in report["left_out"]) or "none"
    lines = [f"# Lung evaluation: {report['segmenter']}", "",
             f"Dataset `{report['dataset']}`: {report['cases']} cases ({report['slices']} "
             f"slices) scored against {report['truth']}; {report['cases_left_out_as_seen']} "
             f"case(s) left out as seen in training ({left}); "
             f"{report['cases_without_lung_truth']} case(s) without a lung truth not scored; "
             f"no lungs found in {report['cases_no_lungs_found']}.", "",
             "| metric | value | 95% CI (bootstrap over cases) |", "|---|---|---|"]
    for k, label in LUNG_LABELS.items():
        m = report["metrics"][k]
        lo, hi = m["ci95"]
        lines.append(f"| {label} | {_fmt(m['value'])} | {_fmt(lo)} - {_fmt(hi)} |")
    lines += ["", "| case | slices | lung Dice | lesion pixels inside |", "|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['slices']} | {c['dice']:.4f} | {_pct(c.get('lesion_inside'))} |"
              for c in report["per_case"]]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
