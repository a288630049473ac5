"""Training of the 2D lesion model (MONAI BasicUNet, PyTorch), resumable, seeded.

- Splits are by case group (one patient, or its proxy), per site (stratified), seeded; cases
  an importer fixed to a split keep it (synthetic cases: train; held-out negatives: test).
  ``splits.json`` in the run folder lists them; test cases are never loaded here.
- Slices are prepared exactly as inference does (:func:`pipeline.inference.segment_slices`:
  crop to the lung box + margin, resample to ``spacing_mm``, HU window): the same
  :class:`~pipeline.inference.ModelSpec` drives both.
- Patches (``patch`` px) are drawn with a bias to lesions; augmentation: scale 0.8-1.25,
  flips, 90-degree rotations, HU contrast +-8% about -500 HU and offset +-30 HU, noise up to
  15 HU, occasional blur.  Loss: cross-entropy (255 ignored) + masked Dice (MONAI).
- Each epoch: ``iterations_per_epoch`` steps, then validation on the validation cases (Dice
  of lesions as a whole); ``last.pt`` every epoch (model, optimiser, RNG, history: resumable),
  ``best.pt`` when the validation Dice improves (after the first quarter of the
  epochs).  A tqdm bar shows progress.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from ..config import TrainConfig
from ..inference import ModelSpec, model_grid, normalise, resize_slices, segment_slices
from ..representation import NOMINAL_FIELD_MM, SIZE, crop_input, ma20_pseudo_hu, resize2d
from .dataset import IGNORE, LESION_ANY, CaseRecord, Dataset, read_dataset

log = logging.getLogger(__name__)

LABELS = ("background", "ground-glass opacity", "consolidation")


def spec_from_config(cfg: TrainConfig, folder: Path | None = None) -> ModelSpec:
    """The preprocessing spec a model trained with ``cfg`` is served with."""
    return ModelSpec(folder=folder or Path("."), name=cfg.name, version=cfg.version,
                     task="lesions", sha256="", labels=LABELS, spacing_mm=cfg.spacing_mm,
                     hu_window=(cfg.hu_window[0], cfg.hu_window[1]), pad_multiple=16,
                     margin_mm=cfg.margin_mm, min_lesion_mm2=cfg.min_lesion_mm2,
                     min_lesion_ml=cfg.min_lesion_ml, raw={}, input=cfg.input,
                     z_step_mm=cfg.z_step_mm)


def split_cases(records: list[CaseRecord], cfg: TrainConfig) -> dict[str, list[str]]:
    """Case ids per split ("train", "val", "test"): by group, per site, seeded."""
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    free = [r for r in records if not r.fixed_split]
    for r in records:
        if r.fixed_split:
            out[r.fixed_split].append(r.id)
    for site in sorted({r.site for r in free}):
        groups = sorted({r.group for r in free if r.site == site})
        rng.shuffle(groups)
        n_test = math.ceil(cfg.test_fraction * len(groups)) if len(groups) > 2 else 0
        n_val = max(1, math.ceil(cfg.val_fraction * len(groups))) if len(groups) > 1 else 0
        which = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                 for i, g in enumerate(groups)}
        for r in free:
            if r.site == site:
                out[which[r.group]].append(r.id)
    return {k: sorted(v) for k, v in out.items()}


Slice = tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]


def prepare_slices(ds: Dataset, ids: list[str], cfg: TrainConfig, rng: np.random.Generator,
                   all_slices: bool = False) -> list[Slice]:
    """(HU, label) slices at the model's spacing, cropped like inference crops."""
    by_id = {r.id: r for r in ds.records}
    out: list[Slice] = []
    for cid in ids:
        case = ds.load(by_id[cid])
        rec = case.record
        if cfg.input == "ma20" and rec.source == "semiseg":
            # a lung-cropped slice: the crop is the region, in training as in evaluation
            case.region = np.ones(case.region.shape, dtype=bool)
        found = ndi.find_objects(case.region.astype(np.uint8))
        if not found or found[0] is None:
            continue
        _, rs, cs = found[0]
        mr = round(cfg.margin_mm / rec.spacing_rc[0])
        mc = round(cfg.margin_mm / rec.spacing_rc[1])
        r0, r1 = max(0, rs.start - mr), min(case.hu.shape[1], rs.stop + mr)
        c0, c1 = max(0, cs.start - mc), min(case.hu.shape[2], cs.stop + mc)
        has = np.isin(case.label, (1, 2)).any(axis=(1, 2))
        ks = list(np.nonzero(has)[0])
        neg = list(np.nonzero(~has)[0])
        if not all_slices and len(neg) > cfg.negative_slices_per_volume:
            neg = list(rng.choice(neg, cfg.negative_slices_per_volume, replace=False))
        if cfg.input == "ma20":
            for k in sorted(ks + neg):
                out.append(ma20_slice(case.hu[k, r0:r1, c0:c1], case.label[k, r0:r1, c0:c1],
                                      rec))
            continue
        grid = model_grid((r1 - r0, c1 - c0), rec.spacing_rc, cfg.spacing_mm)
        src = (ma20_pseudo_hu(case.hu, case.region) if rec.intensity == "ma20"
               else case.hu)
        for k in sorted(ks + neg):
            hu = resize_slices(src[k:k + 1, r0:r1, c0:c1].astype(np.float32), grid, 1)[0]
            lab = resize_slices(case.label[k:k + 1, r0:r1, c0:c1], grid, 0)[0]
            out.append((hu.astype(np.float32), lab.astype(np.uint8)))
    return out


def ma20_slice(crop: npt.NDArray[Any], label: npt.NDArray[np.uint8],
               rec: CaseRecord) -> Slice:
    """One cropped slice -> (recipe image in 0..1 at the nominal pixel size, its labels),
    as :func:`pipeline.inference.segment_slices` makes it for an "ma20" model."""
    if rec.intensity == "ma20":
        px = NOMINAL_FIELD_MM / SIZE
        shape = (max(8, round(crop.shape[0] * rec.spacing_rc[0] / px)),
                 max(8, round(crop.shape[1] * rec.spacing_rc[1] / px)))
        x = resize2d(np.asarray(crop, np.float32), shape)
    else:
        x = crop_input(crop, rec.spacing_rc)[0].astype(np.float32)
    lab = resize2d(np.ascontiguousarray(label), x.shape, linear=False)
    return np.asarray(x / 255.0, np.float32), np.asarray(lab, np.uint8)


class PatchSampler:
    """Random augmented patches (x in 0..1, labels with 255 ignored) from slice pools."""

    def __init__(self, pools: list[tuple[list[Slice], float]], cfg: TrainConfig,
                 rng: np.random.Generator) -> None:
        self.pools = [(p, w) for p, w in pools if p]
        total = sum(w for _, w in self.pools)
        self.weights = [w / total for _, w in self.pools]
        self.cfg = cfg
        self.rng = rng

    def patch(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        cfg, rng = self.cfg, self.rng
        pool = self.pools[int(rng.choice(len(self.pools), p=self.weights))][0]
        hu, lab = pool[int(rng.integers(len(pool)))]
        size = max(16, round(cfg.patch * rng.uniform(0.8, 1.25)))
        les = np.argwhere((lab == 1) | (lab == 2) | (lab == LESION_ANY))
        if len(les) and rng.random() < cfg.positive_fraction:
            cr, cc = les[int(rng.integers(len(les)))]
        else:
            cr, cc = int(rng.integers(hu.shape[0])), int(rng.integers(hu.shape[1]))
        r0, c0 = int(cr) - size // 2, int(cc) - size // 2
        ph = max(0, -r0), max(0, r0 + size - hu.shape[0])
        pw = max(0, -c0), max(0, c0 + size - hu.shape[1])
        ma20 = cfg.input == "ma20"
        hp = np.pad(hu, (ph, pw), constant_values=0.0 if ma20 else -1000.0)
        lp = np.pad(lab, (ph, pw), constant_values=0)
        r0, c0 = r0 + ph[0], c0 + pw[0]
        h = hp[r0:r0 + size, c0:c0 + size]
        lb = lp[r0:r0 + size, c0:c0 + size]
        h = resize_slices(h[None], (cfg.patch, cfg.patch), 1)[0]
        lb = resize_slices(lb[None], (cfg.patch, cfg.patch), 0)[0]
        k = int(rng.integers(4))
        if ma20:  # the recipe's orientation is canonical: left-right mirror only
            if rng.random() < 0.5:
                h, lb = h[:, ::-1], lb[:, ::-1]
            x = np.clip(h, 0, 1) ** rng.uniform(0.75, 1.35)
            x = 0.5 + (x - 0.5) * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
            if rng.random() < 0.2:
                x = ndi.gaussian_filter(x, rng.uniform(0.3, 1.0))
            x = x + rng.standard_normal(x.shape) * rng.uniform(0, 0.03)
            return (np.ascontiguousarray(np.clip(x, 0, 1), np.float32),
                    np.ascontiguousarray(lb, np.uint8))
        h, lb = np.rot90(h, k), np.rot90(lb, k)
        if rng.random() < 0.5:
            h, lb = h[:, ::-1], lb[:, ::-1]
        gain, offset = 1.0 + rng.uniform(-0.08, 0.08), rng.uniform(-30, 30)
        h = np.asarray(-500.0 + (h + 500.0) * gain + offset, dtype=np.float32)
        if rng.random() < 0.2:
            h = np.asarray(ndi.gaussian_filter(h, rng.uniform(0.3, 1.0)), dtype=np.float32)
        h = np.asarray(h + rng.standard_normal(h.shape) * rng.uniform(0, 15), dtype=np.float32)
        x = normalise(h, (cfg.hu_window[0], cfg.hu_window[1]))
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(lb, np.uint8)

    def batch(self, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        xs, ys = zip(*(self.patch() for _ in range(n)), strict=True)
        return np.stack(xs)[:, None], np.stack(ys)


def build_network(cfg: TrainConfig) -> Any:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(LABELS),
                     features=tuple(cfg.features))


def torch_predictor(net: Any, device: Any) -> Any:
    """A Predictor (array -> array) around a torch module, for validation and export checks."""
    import torch

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            return np.asarray(net(torch.from_numpy(x).to(device)).float().cpu().numpy())

    return run


def dice_of(pred: npt.NDArray[np.uint8], gt: npt.NDArray[np.uint8]) -> dict[str, float]:
    valid = gt != IGNORE
    out = {}
    known = valid & (gt != LESION_ANY)
    for name, vals in (("lesion", (1, 2)), ("ggo", (1,)), ("consolidation", (2,))):
        if name != "lesion":  # kinds are scored where the kind is known
            p = np.isin(pred, vals) & known
            g = np.isin(gt, vals)
            s = int(p.sum() + g.sum())
            out[name] = 2.0 * int((p & g).sum()) / s if s else 1.0
            continue
        p = np.isin(pred, (1, 2)) & valid
        g = np.isin(gt, (1, 2, LESION_ANY))
        s = int(p.sum() + g.sum())
        out[name] = 2.0 * int((p & g).sum()) / s if s else 1.0
    return out


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train; returns the run folder (best.pt, last.pt, splits.json, history.json)."""
    import torch
    from monai.losses import MaskedDiceLoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    ds = read_dataset(cfg.dataset)
    splits = split_cases(ds.records, cfg)
    (run / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    log.info("splits: %s", {k: len(v) for k, v in splits.items()})
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    set_determinism(seed=cfg.seed)
    threads = cfg.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(cfg.seed)
    by_id = {r.id: r for r in ds.records}
    train_2d = [i for i in splits["train"] if by_id[i].n_slices == 1]
    train_ma20 = [i for i in splits["train"] if by_id[i].source == "ma20"]
    train_3d = [i for i in splits["train"] if by_id[i].n_slices > 1 and i not in train_ma20]
    pool_2d = prepare_slices(ds, train_2d, cfg, rng)
    pool_3d = prepare_slices(ds, train_3d, cfg, rng)
    pool_ma20 = prepare_slices(ds, train_ma20, cfg, rng, all_slices=True)
    val = prepare_val(ds, splits["val"])
    log.info("training slices: %d annotated 2D, %d from volumes, %d ma20; %d validation cases",
             len(pool_2d), len(pool_3d), len(pool_ma20), len(val))
    sampler = PatchSampler([(pool_2d, cfg.annotated_2d_fraction),
                            (pool_ma20, cfg.ma20_fraction),
                            (pool_3d, 1.0 - cfg.annotated_2d_fraction - cfg.ma20_fraction)],
                           cfg, rng)
    net = build_network(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.iterations_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=total,
                                                pct_start=0.1)
    dice_loss = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
    history: list[dict[str, Any]] = []
    start, best = 0, -1.0
    last = run / "last.pt"
    if resume and last.is_file():
        start, best, history = restore_checkpoint(last, net, opt, sched, rng, total, device)
    spec = spec_from_config(cfg)
    for epoch in range(start, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, mininterval=2.0)
        for _ in bar:
            xb, yb = sampler.batch(cfg.batch_size)
            x = torch.from_numpy(xb).to(device)
            y = torch.from_numpy(yb.astype(np.int64)).to(device)
            logits = net(x)
            loss = lesion_loss(logits, y, dice_loss, weights, cfg.union_dice)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        net.eval()
        scores = validate(net, device, val, spec)
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
               "seconds": round(time.perf_counter() - t0, 1), **scores}
        history.append(row)
        # the first quarter of the epochs is warm-up: an untrained net that marks everything
        # can score well on a few lesion-rich validation slices, so it is never "best"
        improved = epoch + 1 > cfg.epochs // 4 and scores["val_dice_lesion"] > best
        if improved:
            best = scores["val_dice_lesion"]
        save_checkpoint(run, net, opt, sched, rng, epoch + 1, best, history, asdict(cfg),
                        splits, improved)
        log.info("epoch %d: loss %.3f, validation Dice lesion %.3f (GGO %.3f, consolidation "
                 "%.3f)%s, %.0f s", epoch + 1, row["loss"], scores["val_dice_lesion"],
                 scores["val_dice_ggo"], scores["val_dice_consolidation"],
                 " *best*" if improved else "", row["seconds"])
    if not (run / "best.pt").is_file():
        (run / "best.pt").write_bytes(last.read_bytes())
    return run


def lesion_loss(logits: Any, y: Any, dice_loss: Any, weights: Any, union: bool = False) -> Any:
    """Cross-entropy (per-class weights) + masked Dice over GGO and consolidation, where
    labels 3 (a lesion of unknown kind) count as "GGO or consolidation": their
    cross-entropy is -log(p_ggo + p_consolidation); with ``union``, + the Dice of lesions
    as a whole (p_ggo + p_consolidation against any lesion label); 255 is ignored."""
    import torch

    logp = torch.log_softmax(logits, dim=1)
    known = (y != IGNORE) & (y != LESION_ANY)
    any_ = y == LESION_ANY
    yk = torch.where(known, y, torch.zeros_like(y))
    nll = -logp.gather(1, yk.unsqueeze(1)).squeeze(1) * weights[yk]
    les = -torch.logsumexp(logp[:, 1:], dim=1)
    n = known.sum() + any_.sum()
    ce = ((nll * known).sum() + (les * any_).sum()) / n.clamp(min=1)
    loss = ce + dice_loss(logits, yk.unsqueeze(1), mask=known.unsqueeze(1).float())
    if not union:
        return loss
    p = torch.softmax(logits, dim=1)
    lesion_p = p[:, 1] + p[:, 2]
    lesion_t = ((y == 1) | (y == 2) | any_).float()
    valid = (y != IGNORE).float()
    inter = (lesion_p * lesion_t * valid).sum()
    den = ((lesion_p + lesion_t) * valid).sum()
    return loss + 1.0 - (2.0 * inter + 1e-5) / (den + 1e-5)


def restore_checkpoint(last: Path, net: Any, opt: Any, sched: Any, rng: np.random.Generator,
                       total: int, device: Any) -> tuple[int, float, list[dict[str, Any]]]:
    """Load ``last.pt`` into the network, optimiser, schedule and random generators; returns
    (epochs done, best validation score, history).  A changed epoch count extends (or
    shortens) the schedule."""
    import torch

    ck = torch.load(last, map_location=device, weights_only=False)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    sched.total_steps = total
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    log.info("resumed from %s at epoch %d (best validation score %.4f)", last, ck["epoch"],
             ck["best"])
    return int(ck["epoch"]), float(ck["best"]), list(ck["history"])


def save_checkpoint(run: Path, net: Any, opt: Any, sched: Any, rng: np.random.Generator,
                    epoch: int, best: float, history: list[dict[str, Any]],
                    config: dict[str, Any], splits: Any, improved: bool) -> None:
    """``last.pt`` (atomically), ``best.pt`` where ``improved``, and ``history.json``."""
    import torch

    state = {"model": net.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
             "history": history, "rng": rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "config": config, "splits": splits}
    torch.save(state, run / "last.tmp")
    (run / "last.tmp").replace(run / "last.pt")
    if improved:
        torch.save(state, run / "best.pt")
    (run / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")


def prepare_val(ds: Dataset, ids: list[str]) -> list[Any]:
    by_id = {r.id: r for r in ds.records}
    return [ds.load(by_id[i]) for i in ids]


def validate(net: Any, device: Any, cases: list[Any], spec: ModelSpec) -> dict[str, float]:
    """Pooled Dice over the validation cases, through the inference path (a lung-cropped
    semiseg slice of an "ma20" model: the whole slice is the region, as in evaluation)."""
    pred_all, gt_all = [], []
    predictor = torch_predictor(net, device)
    for case in cases:
        if spec.input == "ma20" and case.record.source == "semiseg":
            case.region = np.ones(case.region.shape, dtype=bool)
        pred = segment_slices(case.hu, case.record.spacing_rc, case.region, predictor, spec,
                              intensity=case.record.intensity)
        pred_all.append(pred.ravel())
        gt_all.append(case.label.ravel())
    if not cases:
        return {"val_dice_lesion": 0.0, "val_dice_ggo": 0.0, "val_dice_consolidation": 0.0}
    d = dice_of(np.concatenate(pred_all), np.concatenate(gt_all))
    return {f"val_dice_{k}": round(v, 4) for k, v in d.items()}
