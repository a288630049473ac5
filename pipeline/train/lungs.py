"""The learned lung segmenter: training data, training (MONAI, seeded, resumable) and export.

Data (``ctscreen train --task lungs``; keys in :class:`~pipeline.config.LungTrainConfig`):

- ``ma20`` (``../shared/data/covid-lesions/ma20-lungs-infection``): 256 x 256 slices already
  made by the recipe of :mod:`pipeline.representation`, with lung masks that include the
  diseased lung.  Split by patient: each ``coronacases-NN`` volume is one group, the
  Radiopaedia slices (several volumes whose boundaries are unknown) one more; ``test_groups``
  coronacases volumes are held out for testing and ``val_groups`` for validation, chosen by
  the seed; the rest (and Radiopaedia) train.
- negatives: slices without lung from real HU series (``negatives_from``; by default
  LIDC-IDRI-0314's upper abdomen, the slices where the classical segmenter finds no lung),
  made into the network's input by the same recipe, with an empty mask.  Without them a
  model marks bowel and kidneys on abdominal slices.

The network (MONAI BasicUNet 2D, 2 classes) sees the 256 image shrunk to ``size`` (area
averaging); a share ``dense_fraction`` of the ma20 samples gets synthetic dense lung
(:func:`paint_dense`: part of a lung filled with the slice's soft-tissue level, still lung);
augmentation: scale 0.8-1.25, rotation +-12 degrees, shift +-8%, left-right
mirror, gamma 0.7-1.4, contrast +-15%, noise, occasional blur.  Loss: cross-entropy, where
infected lung (the ma20 infection masks) weighs ``1 + infection_weight`` (dense lung is what a
threshold method loses and what must stay inside), and background within ``boundary_px`` of the
lung ``1 + boundary_weight`` (what a model that keeps dense lung over-reaches into: the chest
wall, the liver dome, the paravertebral muscle), + Dice.
Each epoch ends with validation (:func:`validate`: pooled lung Dice at 256 x 256, the share
of infected lung inside the predicted lung, and their mean, the selection score); ``last.pt``
is written every epoch (model, optimiser, schedule, RNG: ``--resume`` continues), ``best.pt``
when the score improves.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import LungTrainConfig, from_mapping
from ..representation import SIZE, canonical_inplane, ma20_input, resize2d, to_canonical

log = logging.getLogger(__name__)

LABELS = ("background", "lung")
LABELS_INFECTION = ("background", "lung", "infection")  # lung = healthy lung; both are lung
U8 = npt.NDArray[np.uint8]


# --------------------------------------------------------------------------- data


def read_ma20(root: Path) -> tuple[U8, U8, U8, list[str]]:
    """(images, lung masks, infection masks) as (N, 256, 256) uint8 (masks 0/1) and the
    group (patient) of each slice, from a folder in the ma20 layout."""
    from PIL import Image

    rows = list(csv.DictReader((root / "volumes.csv").open(encoding="utf-8")))
    imgs, lungs, inf, groups = [], [], [], []
    for row in rows:
        for i in range(int(row["first"]), int(row["last"]) + 1):
            name = f"{i:04d}.png"
            if not (root / "ct" / name).is_file():
                continue
            imgs.append(np.asarray(Image.open(root / "ct" / name).convert("L"), np.uint8))
            lungs.append(np.asarray(Image.open(root / "lungs" / name).convert("L")) > 127)
            p = root / "infection" / name
            inf.append(np.asarray(Image.open(p).convert("L")) > 127 if p.is_file()
                       else np.zeros(imgs[-1].shape, bool))
            groups.append(row.get("group") or row["volume"])
    return (np.stack(imgs), np.stack(lungs).astype(np.uint8), np.stack(inf).astype(np.uint8),
            groups)


def negative_slices(folder: Path) -> U8:
    """Slices of a real HU series where the classical segmenter finds no lung, as network
    input (the ma20 recipe); none where the series has none."""
    from ..config import LungsConfig
    from ..lungs import ClassicalLungSegmenter
    from .dataset import read_dicom_series

    ct, _ = read_dicom_series(folder)
    labels = ClassicalLungSegmenter(LungsConfig())(ct).labels.array
    empty = np.nonzero(~(labels > 0).any(axis=(1, 2)))[0]
    if empty.size == 0:
        return np.zeros((0, SIZE, SIZE), np.uint8)
    how = canonical_inplane(ct.direction)
    return ma20_input(to_canonical(ct.array[empty], how))


def split_groups(groups: list[str], cfg: LungTrainConfig) -> dict[str, list[str]]:
    """Patient groups per split: coronacases volumes drawn by the seed for test and
    validation; everything else trains."""
    rng = np.random.default_rng(cfg.seed)
    named = sorted({g for g in groups if g.startswith("coronacases")})
    rng.shuffle(named)
    test = sorted(named[: cfg.test_groups])
    val = sorted(named[cfg.test_groups: cfg.test_groups + cfg.val_groups])
    train = sorted(set(groups) - set(test) - set(val))
    return {"train": train, "val": val, "test": test}


SEMI_IGNORE = 2  # in the lesion slices' masks: 0 no lesion, 1 lesion, 2 ignore


def lesion_slices(src: Path, seen_of: Path) -> tuple[U8, U8, list[str]]:
    """The annotated lesion slices of ``src`` (semiseg layout) that the model ``seen_of``
    was trained or validated on, made into the recipe: (images (N, 256, 256) uint8, masks
    (N, 256, 256) 0 / 1 lesion / 2 ignore, their fingerprints).  The crop is the whole
    image, padded square as the recipe pads a slice."""
    import tempfile

    import yaml

    from ..representation import square_pad
    from .dataset import IGNORE, import_semiseg, read_dataset, write_manifest

    doc = yaml.safe_load((Path(seen_of) / "model.yaml").read_text(encoding="utf-8"))
    allowed = set((doc.get("training_data") or {}).get("seen_fingerprints") or [])
    if not allowed:
        raise ValueError(f"lesion_slices_of {seen_of}: its model.yaml lists no "
                         "seen_fingerprints; the held-out slices could not be kept out")
    imgs, masks, fps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        recs, _ = import_semiseg(Path(src), Path(tmp))
        write_manifest(Path(tmp), recs, {})
        ds = read_dataset(tmp)
        for rec in ds.records:
            if rec.fingerprint not in allowed:
                continue
            case = ds.load(rec)
            imgs.append(ma20_input(case.hu.astype(np.float32))[0])
            lab = case.label[0]
            m = np.where(lab == IGNORE, SEMI_IGNORE, lab > 0).astype(np.uint8)
            side, r0, c0 = square_pad(m.shape)
            sq = np.zeros((side, side), np.uint8)
            sq[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] = m
            masks.append(np.asarray(resize2d(sq, (SIZE, SIZE), linear=False), np.uint8))
            fps.append(rec.fingerprint)
    if not imgs:
        raise ValueError(f"lesion_slices {src}: none of its slices is among those "
                         f"{seen_of} was trained on")
    return np.stack(imgs), np.stack(masks), fps


def load_training_data(cfg: LungTrainConfig, cache: Path) -> dict[str, Any]:
    """All arrays, cached as one npz in the run folder (rebuilt when absent)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    img, lung, inf, groups = read_ma20(Path(cfg.ma20))
    negs = [negative_slices(Path(p)) for p in cfg.negatives_from]
    neg = np.concatenate(negs) if negs else np.zeros((0, SIZE, SIZE), np.uint8)
    data = {"img": img, "lung": lung, "inf": inf, "groups": np.array(groups), "neg": neg}
    if cfg.lesion_slices:
        if not cfg.lesion_slices_of:
            raise ValueError("lesion_slices needs lesion_slices_of (the model whose "
                             "training slices they may be)")
        si, sm, sf = lesion_slices(Path(cfg.lesion_slices), Path(cfg.lesion_slices_of))
        data.update(semi_img=si, semi_mask=sm, semi_fp=np.array(sf))
    np.savez_compressed(cache, **data)  # type: ignore[arg-type]
    log.info("training data: %d ma20 slices in %d groups, %d negative slices, %d lesion "
             "slices", len(img), len(set(groups)), len(neg), len(data.get("semi_img", ())))
    return data


# --------------------------------------------------------------------------- sampling


def paint_dense(img: U8, mask: U8, rng: np.random.Generator) -> tuple[U8, U8]:
    """Synthetic dense lung: a random part of one lung (a disc reaching to the pleura, or the
    whole lung beyond a random chord: a lobar consolidation, a collapse, a white-out) is
    filled with the slice's own soft-tissue level plus texture; it stays lung, and counts as
    infected (label 2).  The model learns that whatever lies inside the pleura is lung,
    however dense."""
    from scipy import ndimage as ndi

    lung = mask > 0
    lab, n = ndi.label(lung)
    if n == 0:
        return img, mask
    sizes = np.bincount(lab.ravel())[1:]
    big = np.nonzero(sizes >= 400)[0]
    if big.size == 0:
        return img, mask
    one = lab == int(rng.choice(big)) + 1
    pts = np.argwhere(one)
    rr, cc = np.mgrid[: img.shape[0], : img.shape[1]]
    if rng.random() < 0.5:  # a disc around a point of the lung
        r0, c0 = pts[int(rng.integers(len(pts)))]
        rad = rng.uniform(12, 45)
        region = one & ((rr - r0) ** 2 + (cc - c0) ** 2 <= rad ** 2)
    else:  # the lung beyond a random chord
        ang = rng.uniform(0, 2 * np.pi)
        d = (rr * np.cos(ang) + cc * np.sin(ang))[one]
        cut = np.quantile(d, rng.uniform(0.3, 1.0))
        region = one & ((rr * np.cos(ang) + cc * np.sin(ang)) <= cut)
    if region.sum() < 50:
        return img, mask
    ring = ndi.binary_dilation(lung, iterations=6) & ~lung
    soft = float(np.percentile(img[ring], rng.uniform(45, 75))) if ring.any() else 160.0
    tex = ndi.gaussian_filter(rng.standard_normal(img.shape), rng.uniform(1.0, 3.0))
    tex = tex / (tex.std() + 1e-6) * rng.uniform(3, 12)
    w = ndi.gaussian_filter(region.astype(np.float32), rng.uniform(0.7, 2.0))
    dense = np.clip(soft + tex, 0, 255)
    out = img.astype(np.float32) * (1 - w) + dense * w
    if rng.random() < 0.4:  # air bronchograms survive: the darkest lung pixels stay darker
        dark = region & (img < np.percentile(img[one], 8))
        out[dark] = 0.5 * out[dark] + 0.5 * img[dark]
    m = mask.copy()
    m[region] = 2
    return np.asarray(np.clip(out, 0, 255), np.uint8), m


class Augment:
    """Random spatial and intensity augmentation of 256-grid uint8 images and masks."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size

    def __call__(self, img: U8, mask: U8) -> tuple[npt.NDArray[np.float32], U8]:
        """Image in 0..1 and labels at ``size``; ``mask`` may carry 2 (infected lung)."""
        x, yy = self.warp(img, mask)
        lung = shrink_mask((yy > 0).astype(np.uint8), self.size)
        inf = shrink_mask((yy == 2).astype(np.uint8), self.size)
        return x, np.asarray(lung + (inf & lung), np.uint8)

    def lesion(self, img: U8, mask: U8) -> tuple[npt.NDArray[np.float32], U8]:
        """A lesion slice: image and mask (0, 1 lesion, 2 ignore) at ``size``."""
        x, yy = self.warp(img, mask)
        les = shrink_mask((yy == 1).astype(np.uint8), self.size)
        ign = shrink_mask((yy == SEMI_IGNORE).astype(np.uint8), self.size)
        return x, np.where(ign > 0, SEMI_IGNORE, les).astype(np.uint8)

    def warp(self, img: U8, mask: U8) -> tuple[npt.NDArray[np.float32], U8]:
        """Image in 0..1 at ``size`` and the mask warped alike on the 256 grid."""
        import cv2

        rng = self.rng
        s = rng.uniform(0.8, 1.25)
        ang = rng.uniform(-12, 12)
        m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), ang, s)
        m[:, 2] = m[:, 2] + rng.uniform(-0.08, 0.08, 2) * SIZE
        x = cv2.warpAffine(img.astype(np.float32), m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=float(img.min()))
        y = cv2.warpAffine(mask, m, (SIZE, SIZE), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        x = np.clip(np.asarray(x, np.float32) / 255.0, 0, 1) ** rng.uniform(0.7, 1.4)
        x = 0.5 + (x - 0.5) * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
        if rng.random() < 0.2:
            x = cv2.GaussianBlur(np.ascontiguousarray(x, np.float32), (0, 0), rng.uniform(0.5, 1.2))
        x = x + rng.standard_normal(x.shape) * rng.uniform(0, 0.03)
        x = resize2d(np.ascontiguousarray(x, np.float32), (self.size, self.size))
        return np.asarray(np.clip(x, 0, 1), np.float32), np.ascontiguousarray(y)


def shrink_mask(mask: U8, size: int) -> U8:
    """A 0/1 mask -> ``size`` x ``size`` by area (majority)."""
    a = resize2d(mask.astype(np.float32), (size, size))
    return np.asarray(a >= 0.5, np.uint8)


def network_input(img_u8: U8, size: int) -> npt.NDArray[np.float32]:
    """(K, 256, 256) uint8 recipe images -> (K, 1, size, size) float32 in 0..1."""
    x = resize2d(img_u8.astype(np.float32) / 255.0, (size, size))
    if x.ndim == 2:
        x = x[None]
    return np.ascontiguousarray(x[:, None], np.float32)


# --------------------------------------------------------------------------- training


def labels_of(cfg: LungTrainConfig) -> tuple[str, ...]:
    return LABELS_INFECTION if cfg.infection else LABELS


def build_network(cfg: LungTrainConfig) -> Any:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(labels_of(cfg)),
                     features=tuple(cfg.features))


def init_from_onnx(net: Any, model_dir: Path) -> int:
    """Start ``net`` from the weights of ``model_dir``/model.onnx (same BasicUNet; the ONNX
    initializers carry the torch names).  Where the last layer has more classes than the
    source, the source's last row starts each extra row.  Returns the tensors copied."""
    import onnx
    import torch
    from onnx import numpy_helper

    src = {i.name: numpy_helper.to_array(i) for i in
           onnx.load(str(Path(model_dir) / "model.onnx")).graph.initializer}
    state = net.state_dict()
    n = 0
    for name, t in state.items():
        if name not in src:
            continue
        a = torch.from_numpy(np.array(src[name], dtype=np.float32))
        if a.shape != t.shape and a.shape[1:] == t.shape[1:] and a.shape[0] < t.shape[0]:
            a = torch.cat([a] + [a[-1:]] * (t.shape[0] - a.shape[0]))
        if a.shape == t.shape:
            state[name] = a
            n += 1
    if n != len(state):
        raise ValueError(f"init_from {model_dir}: expected the {len(state)} tensors of this "
                         f"network, found {n} that fit")
    net.load_state_dict(state)
    return n


def predict_prob(predictor: Any, img_u8: U8, size: int, batch: int = 16,
                 infection: bool = False) -> Any:
    """Lung probability (K, size, size) of (K, 256, 256) recipe images (one minus the
    background's); with ``infection`` also the infection probability, as a pair."""
    from ..inference import softmax

    lung, inf = [], []
    for k0 in range(0, len(img_u8), batch):
        p = softmax(predictor(network_input(img_u8[k0:k0 + batch], size)))
        lung.append(1.0 - p[:, 0])
        if infection:
            inf.append(p[:, 2] if p.shape[1] > 2 else np.zeros_like(p[:, 0]))
    empty = np.zeros((0, size, size), np.float32)
    lp = np.concatenate(lung) if lung else empty
    if not infection:
        return lp
    return lp, (np.concatenate(inf) if inf else empty)


def dice(pred: npt.NDArray[np.bool_], gt: npt.NDArray[np.bool_]) -> float:
    s = int(pred.sum()) + int(gt.sum())
    return 2.0 * int((pred & gt).sum()) / s if s else 1.0


def validate(predictor: Any, data: dict[str, Any], idx: npt.NDArray[np.intp],
             size: int, infection: bool = False) -> dict[str, float]:
    """Validation figures on the slices ``idx``: pooled lung Dice, the share of infected-lung
    pixels inside the predicted lung, with ``infection`` the pooled infection Dice (inside
    the predicted lung), and the selection score, their mean (the issue's targets weigh
    alike; ``best.pt`` is the epoch with the highest score)."""
    lp, ip = predict_prob(predictor, data["img"][idx], size, infection=True)
    full = resize2d(lp, (SIZE, SIZE)) >= 0.5
    d = dice(full, data["lung"][idx] > 0)
    inf = data["inf"][idx] > 0
    inside = float((full & inf).sum() / inf.sum()) if inf.any() else 1.0
    out = {"val_dice_lung": d, "val_inside": inside, "val_score": (d + inside) / 2.0}
    if infection:
        found = (resize2d(ip, (SIZE, SIZE)) >= 0.5) & full
        out["val_dice_infection"] = dice(found, inf)
        out["val_score"] = (d + inside + out["val_dice_infection"]) / 3.0
    return out


def train(cfg: LungTrainConfig, resume: bool = False) -> Path:
    """Train; returns the run folder (best.pt, last.pt, splits.json, history.json)."""
    import torch
    from monai.losses import DiceLoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    from .loop import restore_checkpoint, save_checkpoint, torch_predictor

    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    data = load_training_data(cfg, run / "data.npz")
    groups = [str(g) for g in data["groups"]]
    splits = split_groups(groups, cfg)
    (run / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    g = np.array(groups)
    train_idx = np.nonzero(np.isin(g, splits["train"]))[0]
    val_idx = np.nonzero(np.isin(g, splits["val"]))[0]
    neg = data["neg"]
    log.info("lung training: %d train slices, %d validation slices, %d negatives; splits %s",
             len(train_idx), len(val_idx), len(neg), splits)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    set_determinism(seed=cfg.seed)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2)))
    rng = np.random.default_rng(cfg.seed)
    aug = Augment(rng, cfg.size)
    net = build_network(cfg)
    if cfg.init_from and not (resume and (run / "last.pt").is_file()):
        log.info("started from %s (%d tensors)", cfg.init_from,
                 init_from_onnx(net, Path(cfg.init_from)))
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.iterations_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=total,
                                                pct_start=0.1)
    dice_loss = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    history: list[dict[str, Any]] = []
    start, best = 0, -1.0
    last = run / "last.pt"
    if resume and last.is_file():
        start, best, history = restore_checkpoint(last, net, opt, sched, rng, total, device)
    empty = np.zeros((SIZE, SIZE), np.uint8)
    n_semi = len(data["semi_img"]) if "semi_img" in data and cfg.infection else 0
    for epoch in range(start, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, mininterval=5.0)
        for _ in bar:
            xs: list[npt.NDArray[np.float32]] = []
            ys: list[U8] = []
            semi: list[bool] = []
            for _ in range(cfg.batch_size):
                if n_semi and rng.random() < cfg.lesion_fraction:
                    j = int(rng.integers(n_semi))
                    x, y = aug.lesion(data["semi_img"][j], data["semi_mask"][j])
                    semi.append(True)
                elif len(neg) and rng.random() < cfg.negative_fraction:
                    x, y = aug(neg[int(rng.integers(len(neg)))], empty)
                else:
                    i = int(train_idx[int(rng.integers(len(train_idx)))])
                    lab = (data["lung"][i] + (data["lung"][i] & data["inf"][i])).astype(np.uint8)
                    im = data["img"][i]
                    if rng.random() < cfg.dense_fraction:
                        im, lab = paint_dense(im, lab, rng)
                    x, y = aug(im, lab)
                if len(semi) < len(xs) + 1:
                    semi.append(False)
                xs.append(x)
                ys.append(y)
            xb = torch.from_numpy(np.stack(xs)[:, None]).to(device)
            y2 = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
            # lung (2: infected lung, which weighs more); with the infection class, 3 classes
            yb = y2.long() if cfg.infection else (y2 > 0).long()
            w = 1.0 + cfg.infection_weight * (y2 == 2).float()
            if cfg.boundary_weight > 0:
                lung = (y2 > 0).float()[:, None]
                near = torch.nn.functional.max_pool2d(lung, 2 * cfg.boundary_px + 1, stride=1,
                                                      padding=cfg.boundary_px)[:, 0]
                w = w + cfg.boundary_weight * ((near > 0) & (y2 == 0)).float()
            logits = net(xb)
            if any(semi):
                loss = _mixed_loss(torch, logits, yb, w, torch.tensor(semi, device=device),
                                   dice_loss)
            else:
                ce = torch.nn.functional.cross_entropy(logits, yb, reduction="none")
                loss = (ce * w).sum() / w.sum() + dice_loss(logits, yb[:, None])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        net.eval()
        val = validate(torch_predictor(net, device), data, val_idx, cfg.size, cfg.infection)
        score = val["val_score"]
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
               "seconds": round(time.perf_counter() - t0, 1),
               **{k: round(v, 4) for k, v in val.items()}}
        history.append(row)
        improved = score > best
        best = max(best, score)
        save_checkpoint(run, net, opt, sched, rng, epoch + 1, best, history, asdict(cfg),
                        splits, improved)
        log.info("epoch %d: loss %.4f, validation lung Dice %.4f, infection inside %.4f, "
                 "infection Dice %s%s, %.0f s", epoch + 1, row["loss"], val["val_dice_lung"],
                 val["val_inside"], row.get("val_dice_infection", "-"),
                 " *best*" if improved else "", row["seconds"])
    return run


def _mixed_loss(torch: Any, logits: Any, yb: Any, w: Any, semi: Any, dice_loss: Any) -> Any:
    """A batch of ma20 samples (3 classes: the weighted cross-entropy + Dice) and lesion
    slices (``semi``), whose lung is not annotated: there a lesion pixel is infection, any
    other pixel is "not infection" (background or lung: the log of their summed
    probability), an ignored pixel counts nothing."""
    lp = torch.nn.functional.log_softmax(logits, dim=1)
    full = ~semi
    num = logits.new_zeros(())
    den = logits.new_zeros(())
    if bool(full.any()):
        ce = torch.nn.functional.nll_loss(lp[full], yb[full], reduction="none")
        num = num + (ce * w[full]).sum()
        den = den + w[full].sum()
    ys = yb[semi]
    les = (ys == 1).float()
    valid = (ys != SEMI_IGNORE).float()
    nll = -(les * lp[semi][:, 2] + (1 - les) * torch.logsumexp(lp[semi][:, :2], dim=1))
    num = num + (nll * valid).sum()
    den = den + valid.sum()
    loss = num / den.clamp(min=1.0)
    if bool(full.any()):
        loss = loss + dice_loss(logits[full], yb[full][:, None])
    return loss


# --------------------------------------------------------------------------- export


def export_lung_model(run: Path, out: Path, checkpoint: str = "best",
                      metrics: dict[str, Any] | None = None,
                      notes: list[str] | None = None) -> Path:
    """``run``/``checkpoint``.pt -> ``out``/model.onnx, model.yaml, MODEL_CARD.md."""
    import onnxruntime as ort
    import torch
    import yaml

    from ..inference import file_sha256
    from .loop import torch_predictor

    ck = torch.load(run / f"{checkpoint}.pt", map_location="cpu", weights_only=False)
    cfg = from_mapping(LungTrainConfig, ck["config"], where="checkpoint config")
    net = build_network(cfg)
    net.load_state_dict(ck["model"])
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, cfg.size, cfg.size),), str(onnx_path),
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamo=False, dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
    data = load_training_data(cfg, run / "data.npz")
    x = network_input(data["img"][:8], cfg.size)
    ref = torch_predictor(net, torch.device("cpu"))(x)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.asarray(sess.run(None, {"image": x})[0])
    diff = float(np.abs(got - ref).max())
    if diff > 1e-3:
        raise RuntimeError(f"onnxruntime and torch disagree: expected < 1e-3, got {diff:.2e}")
    history = ck["history"]
    from .dataset import fingerprint

    g = np.array([str(v) for v in data["groups"]])
    seen = sorted(fingerprint(data["img"][g == grp].astype(np.int16))
                  for grp in ck["splits"]["train"] + ck["splits"]["val"])
    # the lesion slices it learnt from (their fingerprints as the semiseg import gives them)
    seen += sorted(str(f) for f in data.get("semi_fp", ()))
    doc: dict[str, Any] = {
        "name": cfg.name,
        "version": cfg.version,
        "task": "lungs",
        "sha256": file_sha256(onnx_path),
        "labels": list(labels_of(cfg)),
        "framework": {"trained_with": f"torch {torch.__version__}, MONAI BasicUNet 2D",
                      "served_with": f"onnxruntime (opset 17; checked with onnxruntime "
                                     f"{ort.__version__})"},
        "network": {"kind": "monai.networks.nets.BasicUNet", "spatial_dims": 2,
                    "features": list(cfg.features),
                    "parameters": int(sum(p.numel() for p in net.parameters()))},
        "preprocessing": {
            "input": "ma20",
            "recipe": "canonical in-plane orientation (rows anterior->posterior, columns "
                      "right->left); HU clipped to [-1024, 3071]; padded square with -1024; "
                      "cv2.resize 256x256 bicubic; per-slice min-max; uint8(x*255); "
                      "OpenCV CLAHE clip 7, 8x8 tiles (pipeline/representation.py)",
            "network_size": cfg.size,
            "scale": "uint8 / 255, area-averaged to network_size",
            "z_step_mm": cfg.z_step_mm,
        },
        "postprocessing": {"threshold": 0.5, "upsampling": "bilinear probabilities",
                           "between_slices": "linear interpolation of probabilities",
                           "left_right": "by LPS x against the body's midline"},
        "export_check": {"inputs": f"{len(x)} training slices",
                         "max_abs_logit_difference": diff},
        "training_data": {
            "ma20": str(cfg.ma20),
            "negatives_from": list(cfg.negatives_from),
            "slices": len(data["img"]),
            "negative_slices": len(data["neg"]),
            "init_from": cfg.init_from,
            "lesion_slices": (f"{len(data['semi_img'])} of {cfg.lesion_slices} (those "
                              f"{cfg.lesion_slices_of} was trained or validated on)"
                              if "semi_img" in data else None),
            "splits": ck["splits"],
            # the ma20 volume cases (as `ctscreen data import --ma20` stores them) seen in
            # training or validation: `ctscreen evaluate --task lungs` leaves them out
            "seen_fingerprints": seen,
            "epochs": ck["epoch"],
            "checkpoint": f"{checkpoint}.pt (epoch {ck['epoch']})",
            "best_validation": max(history, key=lambda h: h.get("val_score", h["val_dice_lung"]))
            if history else {},
            "seconds": round(sum(h["seconds"] for h in history), 0),
        },
        "metrics": metrics or {},
        "notes": list(notes or []),
    }
    (out / "model.yaml").write_text(
        "# Written by `ctscreen export --task lungs`; inference reads preprocessing and sha256.\n"
        + yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(lung_model_card(doc), encoding="utf-8")
    log.info("exported %s %s to %s (sha256 %s...)", cfg.name, cfg.version, out,
             doc["sha256"][:12])
    return onnx_path


def lung_model_card(doc: dict[str, Any]) -> str:
    """MODEL_CARD.md of a lung model from its model.yaml content."""
    td = doc["training_data"]
    rows = []
    for key, rep in doc.get("metrics", {}).items():
        m = rep.get("metrics", {}).get("dice_pooled", {})
        if m:
            lo, hi = m.get("ci95", [None, None])
            cases = ", ".join(f"{c['id']} {c['dice']}" for c in rep.get("per_case", [])
                              if isinstance(c, dict) and "id" in c and "dice" in c)
            inside = rep.get("metrics", {}).get("lesion_inside", {})
            share = (f"{inside['value']:.1%} ({inside['ci95'][0]:.1%} - {inside['ci95'][1]:.1%})"
                     if inside.get("value") is not None else "n/a")
            rows.append(f"| {key} | {rep.get('segmenter', '')} | {rep.get('cases', '')} "
                        f"({cases}) | {m.get('value')} | {lo} - {hi} | {share} |")
    lesion_rows = []
    for key, rep in doc.get("metrics", {}).items():
        if rep.get("task") != "lesions":
            continue
        m = rep.get("metrics", {})

        def cell(name: str, m: dict[str, Any] = m) -> str:
            v = m.get(name, {})
            if v.get("value") is None:
                return "n/a"
            lo, hi = v.get("ci95", [None, None])
            if lo is None:
                return f"{v['value']:.3f}"
            return f"{v['value']:.3f} ({lo:.3f}-{hi:.3f})"

        lesion_rows.append(
            f"| {key} | {rep.get('cases', '')} | {cell('dice_lesion')} | "
            f"{cell('dice_consolidation')} | {cell('lesion_sensitivity')} | "
            f"{cell('fp_per_slice')} | {rep.get('gt_lesion_pixels_in_region')} |")
    lesion_table = ([
        "## Its infection class as the lesion detector (`lesions.detector: lung-model`; "
        "95% CI, bootstrap over cases)", "",
        "| data | cases | lesion Dice | consolidation Dice | lesion sensitivity | false "
        "positives per slice | true lesion pixels in the region |",
        "|---|---|---|---|---|---|---|", *lesion_rows, ""] if lesion_rows else [])
    return "\n".join([
        f"# Model card: {doc['name']} {doc['version']}", "",
        "## What it does", "",
        "Outlines both lungs, **including diseased lung** (ground glass, consolidation, "
        "collapse), on axial chest CT slices for the ctscreen overnight triage.  A 2D MONAI "
        f"BasicUNet ({doc['network']['parameters']:,} parameters, features "
        f"{doc['network']['features']}) on a {doc['preprocessing']['network_size']}-pixel "
        "square grid of the whole field of view, input made from HU by the ma20 recipe "
        "(pipeline/representation.py), run on slices about "
        f"{doc['preprocessing']['z_step_mm']} mm apart with the probabilities interpolated in "
        "between; right and left are decided by patient geometry (LPS x against the body's "
        "midline), never by array index.  Served by ONNX Runtime."
        + ("  A third class marks **infected lung** (ground glass and consolidation of "
           "COVID-19 pneumonia, the ma20 infection masks): with `lesions.detector: lung-model` "
           "the one network gives the lesions too, their kind decided by the density "
           "(`lesions.model_consolidation_hu`)." if "infection" in doc.get("labels", []) else ""),
        "",
        "## Intended use", "",
        "- The lung region in which ctscreen measures involvement and looks for lesions.",
        "- Not for lobar anatomy, not for children, not for diagnosis.", "",
        "## Training data", "",
        f"- {td['slices']} slices of the COVID-19 CT Lung and Infection Segmentation set "
        "(Ma et al. 2020; `ma20`), split by patient: "
        f"train {td['splits']['train']}, validation {td['splits']['val']}, "
        f"held-out test {td['splits']['test']}.",
        f"- {td['negative_slices']} slices without lung (upper abdomen) from "
        f"{', '.join(Path(p).name for p in td['negatives_from'])}, empty masks.",
        *([f"- Annotated lesion slices for the infection class only: {td['lesion_slices']}."]
          if td.get("lesion_slices") else []),
        *([f"- Started from the weights of {td['init_from']}."] if td.get("init_from") else []),
        f"- Training time: {td['seconds']:.0f} s of epochs ({td['epochs']} epochs, "
        f"{td['checkpoint']}) on 2 shared CPU cores.", "",
        "## Evaluation (95% CI, bootstrap over cases)", "",
        "| data | segmenter | cases | lung Dice, pooled | 95% CI | true infection inside "
        "(95% CI) |", "|---|---|---|---|---|---|",
        *rows, "",
        *lesion_table,
        *[f"- {n}" for n in doc.get("notes", [])], "",
        "## Limits", "",
        f"- 2D: each slice on its own; the {doc['preprocessing']['network_size']}-pixel grid "
        f"(about {360 / doc['preprocessing']['network_size']:.1f} mm for a 360 mm field) "
        "smooths the boundary; thin structures at the hilum are approximate.",
        "- Trained on 8 + several Radiopaedia COVID-19 volumes and one patient's abdomen: "
        "the held-out test is two patients; the maintainers judge it on further cases.",
        "- The classical segmenter runs beside it as a cross-check (a large disagreement is "
        "the coded warning `lung-methods-disagree`).", "",
        f"ONNX sha256: `{doc['sha256']}`; torch vs onnxruntime: max logit difference "
        f"{doc['export_check']['max_abs_logit_difference']:.1e}.", ""])
