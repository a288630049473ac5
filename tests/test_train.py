"""The lesion model's research path: import layouts, training, export, evaluation metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.artefacts import LESION_LABELS, LesionKind, volume_to_sitk
from pipeline.config import TrainConfig, load_train_config
from pipeline.phantom.model import PhantomSpec, make_grid, render
from pipeline.train.dataset import (
    CaseData,
    CaseRecord,
    Dataset,
    import_into,
    open_dataset,
    read_dataset,
    save_case,
    write_manifest,
)
from pipeline.train.evaluate import auc, bootstrap, case_stats, metrics_of
from pipeline.train.intensity import intensity_to_hu

REPO = Path(__file__).resolve().parents[1]
SHAPE = (100, 128, 128)
SPACING = (2.5, 2.6, 2.6)


def test_intensity_map_anchors() -> None:
    hu = intensity_to_hu(np.array([44.5, 215.0, 0, 255]))
    assert hu[0] == pytest.approx(-850.0, abs=0.01) and hu[1] == pytest.approx(40.0, abs=0.01)
    assert -1100 < hu[2] < -1050 and 230 < hu[3] < 270
    assert np.all(np.diff(intensity_to_hu(np.arange(256))) > 0)


def _fake_semiseg(root: Path, n: int = 3) -> None:
    """Slices like the shared set: stored turned (rows run lung to lung, spine on the right)."""
    from PIL import Image

    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    rr, cc = np.mgrid[:200, :150]
    for i in range(n):
        img = np.full((200, 150), 215, np.uint8)  # soft tissue
        lungs = (((rr - 55) / 45.0) ** 2 + ((cc - 70) / 55.0) ** 2 < 1) | \
            (((rr - 145) / 45.0) ** 2 + ((cc - 70) / 55.0) ** 2 < 1)
        img[lungs] = 40
        lesion = ((rr - 60) ** 2 + (cc - 90 - i) ** 2) < 100
        img[lesion] = 100
        gt = np.zeros_like(img)
        gt[lesion] = 1
        gt[((rr - 150) ** 2 + (cc - 100) ** 2) < 36] = 2
        img[gt == 2] = 200
        Image.fromarray(img).save(root / "Imgs" / f"{i}.jpg", quality=95)
        Image.fromarray(gt).save(root / "GT" / f"{i}.png")


def test_import_semiseg_layout(tmp_path: Path) -> None:
    _fake_semiseg(tmp_path / "src")
    ds = import_into(tmp_path / "ds", semiseg=[tmp_path / "src"])
    assert len(ds.records) == 3 and {r.source for r in ds.records} == {"semiseg"}
    # neighbouring slices of one size and window: one proxy patient
    assert len({r.group for r in ds.records}) == 1
    case = ds.load(ds.records[0])
    assert case.hu.shape == (1, 150, 200)  # turned: rows anterior-posterior, lung to lung wide
    ggo = case.label[0] == 1
    assert ggo.any() and (case.label[0] == 2).any()
    assert -650 < case.hu[0][ggo].mean() < -450  # level 100 -> about -560 HU
    assert case.region[0][ggo].mean() > 0.9  # the lesion lies inside the lung region
    assert case.record.spacing_rc[0] == pytest.approx(300.0 / 200)
    again = read_dataset(tmp_path / "ds")
    assert [r.fingerprint for r in again.records] == [r.fingerprint for r in ds.records]


@pytest.fixture(scope="module")
def phantom() -> tuple:  # type: ignore[type-arg]
    return render(PhantomSpec(), make_grid(SHAPE, SPACING, "axial"), SHAPE)


def test_import_volumes_nifti_and_dicom(tmp_path: Path, phantom: tuple) -> None:  # type: ignore[type-arg]
    import SimpleITK as sitk

    from pipeline.phantom.dicom import write_ct_series

    ct, truth = phantom
    a = tmp_path / "src" / "site-a" / "case1"
    a.mkdir(parents=True)
    sitk.WriteImage(volume_to_sitk(ct), str(a / "image.nii.gz"))
    sitk.WriteImage(volume_to_sitk(truth.lesions), str(a / "label.nii.gz"))
    b = tmp_path / "src" / "site-b" / "case2"
    write_ct_series(ct, b / "image")
    sitk.WriteImage(volume_to_sitk(truth.lesions), str(b / "label.nii.gz"))
    ds = open_dataset(tmp_path / "src", tmp_path / "ds")
    assert sorted(r.site for r in ds.records) == ["site-a", "site-b"]
    want = [int(np.count_nonzero(truth.lesions.array == v)) for v in (1, 2)]
    for rec in ds.records:
        assert rec.source == "volume" and rec.n_slices <= SHAPE[0]
        assert list(rec.lesion_px) == want  # every lesion voxel kept, kinds unchanged
        assert rec.spacing_rc == pytest.approx(SPACING[1:])
    bad = tmp_path / "bad" / "s" / "c"
    bad.mkdir(parents=True)
    sitk.WriteImage(volume_to_sitk(ct), str(bad / "image.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)),
                    str(bad / "label.nii.gz"))
    from pipeline.train.dataset import DatasetError

    with pytest.raises(DatasetError, match="grid"):
        import_into(tmp_path / "ds-bad", volumes=[tmp_path / "bad"])


def _tiny_dataset(root: Path) -> Dataset:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        hu = np.full((2, 64, 64), -850.0) + rng.normal(0, 20, (2, 64, 64))
        label = np.zeros((2, 64, 64), np.uint8)
        label[:, 20:30, 20:34] = 1
        label[:, 40:48, 36:44] = 2
        hu[label == 1] = -550
        hu[label == 2] = 0
        region = np.zeros((2, 64, 64), bool)
        region[:, 4:60, 4:60] = True
        recs.append(save_case(root, id=f"c{i}", site="s", source="volume", group=f"g{i}",
                              hu=hu, label=label, region=region, spacing_rc=(1.5, 1.5),
                              slice_mm=2.0))
    write_manifest(root, recs, {})
    return read_dataset(root)


def _tiny_config(tmp_path: Path, **kw: object) -> TrainConfig:
    cfg = TrainConfig(dataset=str(tmp_path / "ds"), out=str(tmp_path / "run"), epochs=1,
                      iterations_per_epoch=2, batch_size=2, patch=32,
                      features=(4, 4, 8, 8, 16, 4), threads=1, test_fraction=0.2,
                      val_fraction=0.2, negative_slices_per_volume=1)
    return replace(cfg, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainConfig]:
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from pipeline.train.loop import train

    tmp = tmp_path_factory.mktemp("train")
    _tiny_dataset(tmp / "ds")
    cfg = _tiny_config(tmp)
    run = train(cfg)
    return run, cfg


def test_training_writes_checkpoints_and_resumes(trained: tuple[Path, TrainConfig]) -> None:
    import torch

    from pipeline.train.loop import train

    run, cfg = trained
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] and splits["val"] and splits["train"]
    assert not set(splits["test"]) & set(splits["train"])
    first = torch.load(run / "last.pt", weights_only=False)
    assert first["epoch"] == 1
    train(replace(cfg, epochs=2), resume=True)
    second = torch.load(run / "last.pt", weights_only=False)
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]  # epoch 1 was not redone


def test_export_round_trip_and_hash_check(trained: tuple[Path, TrainConfig],
                                          tmp_path: Path) -> None:
    import yaml

    from pipeline.config import LesionsConfig
    from pipeline.errors import ModelError
    from pipeline.inference import OnnxPredictor, load_model_spec, segment_slices
    from pipeline.lesions import detector_for
    from pipeline.train.export import export_model

    run, _ = trained
    out = tmp_path / "model"
    export_model(run, out)  # raises where onnxruntime and torch disagree on real inputs
    spec = load_model_spec(out)
    doc = yaml.safe_load((out / "model.yaml").read_text())
    assert doc["export_check"]["max_abs_logit_difference"] < 1e-3
    assert len(doc["training_data"]["seen_fingerprints"]) >= 2
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card")
    pred = OnnxPredictor(spec, threads=1)
    hu = np.full((3, 50, 70), -850.0, np.float32)
    labels = segment_slices(hu, (1.0, 1.0), None, pred, spec, batch=2)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    # a changed model file fails closed, with a clear error, before any study
    doc["sha256"] = "0" * 64
    (out / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelError, match="sha256"):
        detector_for(LesionsConfig(detector="onnx", model=str(out)))


def test_evaluation_skips_cases_the_model_saw(trained: tuple[Path, TrainConfig],
                                              tmp_path: Path) -> None:
    from pipeline.train.evaluate import evaluate
    from pipeline.train.export import export_model

    run, cfg = trained
    export_model(run, tmp_path / "m")
    rep = evaluate(str(tmp_path / "m"), read_dataset(cfg.dataset), n_boot=50)
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(rep["case_ids"]) == sorted(splits["test"])
    assert rep["cases_left_out_as_seen"] == len(splits["train"]) + len(splits["val"])


def _case(label: np.ndarray, region: np.ndarray | None = None, cid: str = "x") -> CaseData:
    rec = CaseRecord(id=cid, site="s", source="t", group=cid, file="", n_slices=label.shape[0],
                     spacing_rc=(1.0, 1.0), slice_mm=1.0, fingerprint=cid, lesion_px=(0, 0))
    return CaseData(rec, np.zeros(label.shape, np.int16), label.astype(np.uint8),
                    np.ones(label.shape, bool) if region is None else region)


def test_metrics_on_hand_made_cases() -> None:
    gt = np.zeros((2, 40, 40), np.uint8)
    gt[0, 2:12, 2:12] = 1  # 100 px GGO, found exactly
    gt[0, 20:30, 20:30] = 2  # 100 px consolidation, missed
    pred = np.zeros_like(gt)
    pred[0, 2:12, 2:12] = 1
    pred[1, 30:36, 30:36] = 2  # 36 px false positive on the lesion-free slice
    st = case_stats(_case(gt), pred, min_lesion_mm2=20.0)
    m = metrics_of([st])
    assert m["dice_ggo"] == pytest.approx(1.0)
    assert m["dice_consolidation"] == pytest.approx(0.0)
    assert m["dice_lesion"] == pytest.approx(2 * 100 / (136 + 200))
    assert m["lesion_sensitivity"] == pytest.approx(0.5)
    assert m["fp_per_slice"] == pytest.approx(0.5)
    assert m["slice_sensitivity"] == 1.0 and m["slice_specificity"] == 0.0
    # a piece smaller than the minimum is neither a lesion nor a false positive
    tiny = np.zeros_like(gt)
    tiny[1, 0:3, 0:3] = 1
    assert case_stats(_case(gt), tiny, 20.0).fp == 0
    # ignored pixels are never false positives
    ign = gt.copy()
    ign[1, 30:36, 30:36] = 255
    assert case_stats(_case(ign), pred, 20.0).fp == 0


def test_auc_and_bootstrap_interval() -> None:
    assert auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert np.isnan(auc(np.array([1.0]), np.array([True])))
    rng = np.random.default_rng(1)
    stats = []
    for i in range(12):
        gt = np.zeros((1, 30, 30), np.uint8)
        pred = np.zeros_like(gt)
        if i % 2 == 0:
            gt[0, 5:15, 5:15] = 1
            s = int(rng.integers(5, 12))
            pred[0, 5:5 + s, 5:5 + s] = 1
        elif i % 3 == 0:
            pred[0, 20:26, 20:26] = 1
        stats.append(case_stats(_case(gt, cid=f"c{i}"), pred, 20.0))
    rep = bootstrap(stats, n=300)
    for k, v in rep.items():
        lo, hi = v["ci95"]
        if v["value"] is not None:
            assert lo <= v["value"] <= hi, k
    assert 0.5 < rep["slice_auc"]["value"] <= 1.0
    assert 0 < rep["dice_ggo"]["ci95"][0] < rep["dice_ggo"]["value"] < 1


def test_train_config_file_loads() -> None:
    cfg = load_train_config(REPO / "configs" / "train_lesions.yaml")
    assert cfg.spacing_mm > 0 and len(cfg.features) == 6
    assert LESION_LABELS[LesionKind.GGO] == 1  # the model's labels follow the package's


def test_cli_import_and_evaluate_the_baseline(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    _fake_semiseg(tmp_path / "src", n=4)
    assert main(["data", "import", "--out", str(tmp_path / "ds"),
                 "--semiseg", str(tmp_path / "src")]) == 0
    assert main(["data", "import", "--out", str(tmp_path / "ds"),
                 "--semiseg", str(tmp_path / "src")]) == 2  # never over an existing dataset
    # a folder in an import layout is evaluated as is (imported on the fly)
    assert main(["evaluate", "density", str(tmp_path / "src"), "--bootstrap", "50",
                 "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["cases"] == 4 and rep["detector"].startswith("density")
    assert 0.0 <= rep["metrics"]["dice_ggo"]["value"] <= 1.0
    assert "| Dice, ground-glass opacity |" in (tmp_path / "rep" / "report.md").read_text()
