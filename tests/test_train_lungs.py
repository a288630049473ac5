"""Training the lung model: a tiny run on a made-up ma20 folder, resumed, exported, served."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import LungsConfig, LungTrainConfig
from pipeline.errors import NotAnalysable

pytest.importorskip("torch")
pytest.importorskip("monai")


def _ma20_folder(root: Path, n_groups: int = 4, per_group: int = 3) -> Path:
    """ct/, lungs/, infection/ PNGs and volumes.csv: dark ellipses (lungs) in a bright disc."""
    from PIL import Image

    for sub in ("ct", "lungs", "infection"):
        (root / sub).mkdir(parents=True)
    rr, cc = np.mgrid[:256, :256]
    rows, i = [], 0
    for g in range(n_groups):
        first = i
        for _ in range(per_group):
            body = ((rr - 128) / 100.0) ** 2 + ((cc - 128) / 120.0) ** 2 <= 1
            lung = np.zeros((256, 256), bool)
            for cx in (80, 176):
                lung |= ((rr - 120) / 60.0) ** 2 + ((cc - cx) / 35.0) ** 2 <= 1
            img = np.where(body, 170, 10).astype(np.uint8)
            img[lung] = 40
            inf = lung & (rr > 150)
            img[inf] = 120
            Image.fromarray(img).save(root / "ct" / f"{i:04d}.png")
            Image.fromarray((lung * 255).astype(np.uint8)).save(root / "lungs" / f"{i:04d}.png")
            Image.fromarray((inf * 255).astype(np.uint8)).save(root / "infection" / f"{i:04d}.png")
            i += 1
        rows.append({"first": f"{first:04d}", "last": f"{i - 1:04d}",
                     "volume": f"coronacases-{g + 1:02d}", "group": f"coronacases-{g + 1:02d}"})
    with (root / "volumes.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["first", "last", "volume", "group"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_tiny_lung_training_resumes_exports_and_serves(tmp_path: Path) -> None:
    from pipeline.lungs import LearnedLungSegmenter
    from pipeline.phantom.model import PhantomSpec, make_grid, render
    from pipeline.train.dataset import import_ma20
    from pipeline.train.lungs import export_lung_model, split_groups, train

    data = _ma20_folder(tmp_path / "ma20")
    cfg = LungTrainConfig(ma20=str(data), negatives_from=(), out=str(tmp_path / "run"),
                          size=32, features=(4, 4, 8, 8, 16, 4), batch_size=2, epochs=1,
                          iterations_per_epoch=2, threads=1, test_groups=1, val_groups=1,
                          boundary_weight=2.0, boundary_px=2)
    run = train(cfg)
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1] and 0.0 <= hist[0]["val_dice_lung"] <= 1.0
    # the selection score is the mean of the lung Dice and the infection-inside share
    h = hist[0]
    assert 0.0 <= h["val_inside"] <= 1.0
    assert h["val_score"] == pytest.approx((h["val_dice_lung"] + h["val_inside"]) / 2, abs=1e-3)
    splits = json.loads((run / "splits.json").read_text())
    assert splits == split_groups([f"coronacases-{g:02d}" for g in range(1, 5)], cfg)
    assert not set(splits["test"]) & set(splits["train"] + splits["val"])
    # resume: one more epoch continues the history instead of starting again
    train(LungTrainConfig(**{**cfg.__dict__, "epochs": 2}), resume=True)
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    out = tmp_path / "model"
    export_lung_model(run, out, "last", notes=["a tiny test model"])
    doc = yaml.safe_load((out / "model.yaml").read_text())
    assert doc["task"] == "lungs" and doc["preprocessing"]["input"] == "ma20"
    assert "a tiny test model" in (out / "MODEL_CARD.md").read_text()
    # the fingerprints of the train + val volumes are those the ma20 importer gives them
    recs = {r.group.removeprefix("ma20-"): r.fingerprint
            for r in import_ma20(data, tmp_path / "ds")}
    seen = {recs[g] for g in splits["train"] + splits["val"]}
    assert set(doc["training_data"]["seen_fingerprints"]) == seen
    # served: an untrained tiny model on a phantom either finds lungs or refuses, never crashes
    seg = LearnedLungSegmenter(LungsConfig(method="model", model=str(out), cross_check=False))
    shape = (20, 64, 64)
    ct, _ = render(PhantomSpec(lesions=()), make_grid(shape, (5.0, 5.5, 5.5), "axial"), shape)
    try:
        masks = seg(ct)
        assert masks.labels.array.shape == ct.shape
    except NotAnalysable as e:
        assert e.code == "no-lungs-found"


def test_tiny_lung_infection_training_starts_from_a_lung_model_and_serves(tmp_path: Path) -> None:
    """The infection class (one network for lungs and lesions): the run starts from a
    two-class lung model's weights, validates the infection Dice too, exports three labels,
    and the segmenter serves the infected lung inside the lungs."""
    from pipeline.lungs import LearnedLungSegmenter
    from pipeline.phantom.model import PhantomSpec, make_grid, render
    from pipeline.train.lungs import export_lung_model, train

    data = _ma20_folder(tmp_path / "ma20")
    base = LungTrainConfig(ma20=str(data), negatives_from=(), out=str(tmp_path / "run2"),
                           size=32, features=(4, 4, 8, 8, 16, 4), batch_size=2, epochs=1,
                           iterations_per_epoch=2, threads=1, test_groups=1, val_groups=1)
    export_lung_model(train(base), tmp_path / "two", "last")
    cfg = LungTrainConfig(**{**base.__dict__, "out": str(tmp_path / "run3"), "infection": True,
                             "init_from": str(tmp_path / "two")})
    run = train(cfg)
    h = json.loads((run / "history.json").read_text())[0]
    assert 0.0 <= h["val_dice_infection"] <= 1.0
    assert h["val_score"] == pytest.approx(
        (h["val_dice_lung"] + h["val_inside"] + h["val_dice_infection"]) / 3, abs=1e-3)
    out = tmp_path / "three"
    export_lung_model(run, out, "last")
    doc = yaml.safe_load((out / "model.yaml").read_text())
    assert doc["labels"] == ["background", "lung", "infection"]
    seg = LearnedLungSegmenter(LungsConfig(method="model", model=str(out), cross_check=False))
    assert seg.infection
    shape = (20, 64, 64)
    ct, _ = render(PhantomSpec(), make_grid(shape, (5.0, 5.5, 5.5), "axial"), shape)
    try:
        masks = seg(ct)
    except NotAnalysable as e:
        assert e.code == "no-lungs-found"
        return
    assert masks.infection is not None and masks.infection.shape == ct.shape
    assert not (masks.infection.array.astype(bool) & ~masks.mask()).any()


def _semiseg_folder(root: Path, n: int = 3) -> Path:
    from PIL import Image

    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for i in range(n):
        img = np.full((120, 100), 215, np.uint8)
        img[10:60, 10:90] = 40 + 5 * i  # "lungs"; each slice its own fingerprint
        gt = np.zeros_like(img)
        gt[20:40, 30:50] = 1 + i % 2  # ground glass or consolidation
        Image.fromarray(img).save(root / "Imgs" / f"{i}.jpg", quality=95)
        Image.fromarray(gt).save(root / "GT" / f"{i}.png")
    return root


def test_lesion_slices_train_only_the_infection_and_only_the_allowed_cases(tmp_path: Path) -> None:
    """Annotated lesion slices join the infection training; only those the named model was
    trained on are used (its held-out slices stay held out), and the export lists them as
    seen so that evaluation leaves them out."""
    from pipeline.train.dataset import import_semiseg
    from pipeline.train.lungs import export_lung_model, lesion_slices, train

    semi = _semiseg_folder(tmp_path / "semi")
    recs, _ = import_semiseg(semi, tmp_path / "probe")
    allowed = sorted(r.fingerprint for r in recs[:2])
    of = tmp_path / "lesion-model"
    of.mkdir()
    (of / "model.yaml").write_text(yaml.safe_dump(
        {"training_data": {"seen_fingerprints": allowed}}), encoding="utf-8")
    img, mask, fps = lesion_slices(semi, of)
    assert sorted(fps) == allowed and img.shape == mask.shape == (2, 256, 256)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2} and (mask == 1).any()
    (of / "model.yaml").write_text(yaml.safe_dump({"training_data": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match="held-out"):
        lesion_slices(semi, of)
    (of / "model.yaml").write_text(yaml.safe_dump(
        {"training_data": {"seen_fingerprints": allowed}}), encoding="utf-8")
    data = _ma20_folder(tmp_path / "ma20")
    cfg = LungTrainConfig(ma20=str(data), negatives_from=(), out=str(tmp_path / "run"),
                          size=32, features=(4, 4, 8, 8, 16, 4), batch_size=4, epochs=1,
                          iterations_per_epoch=3, threads=1, test_groups=1, val_groups=1,
                          infection=True, lesion_slices=str(semi), lesion_slices_of=str(of),
                          lesion_fraction=0.5)
    run = train(cfg)
    h = json.loads((run / "history.json").read_text())[0]
    assert np.isfinite(h["loss"])
    export_lung_model(run, tmp_path / "out", "last")
    doc = yaml.safe_load((tmp_path / "out" / "model.yaml").read_text())
    assert set(allowed) <= set(doc["training_data"]["seen_fingerprints"])
    assert doc["training_data"]["lesion_slices"].startswith("2 of ")


def test_mixed_loss_counts_lesion_slices_as_infection_or_not() -> None:
    import torch
    from monai.losses import DiceLoss

    from pipeline.train.lungs import SEMI_IGNORE, _mixed_loss

    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    logits = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    w = torch.ones(2, 4, 4)
    semi = torch.tensor([False, True])
    # the lesion slice: all pixels "not infection"; uniform logits give log(3/2) each
    y[1] = 0
    base = float(_mixed_loss(torch, logits, y, w, semi, dice))
    # a confident "lung" on the lesion slice's non-lesion pixels costs nothing there
    sure = logits.clone()
    sure[1, 1] = 20.0
    assert float(_mixed_loss(torch, sure, y, w, semi, dice)) < base
    # ignored pixels count nothing, whatever the network says
    y[1] = SEMI_IGNORE
    a = float(_mixed_loss(torch, logits, y, w, semi, dice))
    b = float(_mixed_loss(torch, sure, y, w, semi, dice))
    assert a == pytest.approx(b)


def test_init_from_copies_the_lung_row_into_the_infection_row(tmp_path: Path) -> None:
    import torch

    from pipeline.train.lungs import build_network, init_from_onnx

    two = LungTrainConfig(size=32, features=(4, 4, 8, 8, 16, 4))
    net2 = build_network(two).eval()
    with torch.no_grad():  # trained weights differ (ONNX merges equal constants)
        for t in net2.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    folder = tmp_path / "m"
    folder.mkdir()
    torch.onnx.export(net2, (torch.zeros(1, 1, 32, 32),), str(folder / "model.onnx"),
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    net3 = build_network(LungTrainConfig(**{**two.__dict__, "infection": True}))
    n = init_from_onnx(net3, folder)
    assert n == len(net2.state_dict())
    w2, w3 = net2.state_dict()["final_conv.weight"], net3.state_dict()["final_conv.weight"]
    assert w3.shape[0] == 3 and torch.equal(w3[:2], w2) and torch.equal(w3[2], w2[1])
    with pytest.raises(ValueError, match="expected"):  # another network: refused, not half-set
        init_from_onnx(build_network(LungTrainConfig(features=(8, 8, 16, 16, 32, 8))), folder)


def test_validation_scores_dice_and_the_infection_kept_inside() -> None:
    from pipeline.train.lungs import validate

    lung = np.zeros((2, 256, 256), np.uint8)
    lung[:, 60:200, 40:120] = 1
    inf = np.zeros_like(lung)
    inf[:, 150:200, 40:120] = 1  # the lower part of the lung is infected
    data = {"img": np.zeros_like(lung), "lung": lung, "inf": inf}

    def predictor(upper_only: bool):  # type: ignore[no-untyped-def]
        def run(x: np.ndarray) -> np.ndarray:  # logits (N, 2, S, S) on the network grid
            s = x.shape[-1]
            p = np.zeros((x.shape[0], 2, s, s), np.float32)
            p[:, 0] = 10.0  # background everywhere but in the box below
            r1 = round((150 if upper_only else 200) * s / 256)
            box = (slice(None), slice(round(60 * s / 256), r1),
                   slice(round(40 * s / 256), round(120 * s / 256)))
            p[:, 0][box], p[:, 1][box] = 0.0, 10.0
            return p
        return run

    full = validate(predictor(False), data, np.arange(2), 128)
    part = validate(predictor(True), data, np.arange(2), 128)
    assert full["val_inside"] > 0.95 and full["val_dice_lung"] > 0.95
    assert part["val_inside"] < 0.05  # the infected lung left out
    assert part["val_score"] < full["val_score"]
