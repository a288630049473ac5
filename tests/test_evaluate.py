"""Evaluation that scores what the batch does: region rules, lesion of unknown kind, the lung
task, the ma20 layout read directly.  Everything is built in tmp_path (tiny PNG folders, tiny
threshold ONNX models whose output is known), so exact figures can be asserted."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import Config, LungsConfig
from pipeline.train.dataset import (
    LESION_ANY,
    CaseData,
    CaseRecord,
    fingerprint,
    open_dataset,
    read_dataset,
    save_case,
    write_manifest,
)
from pipeline.train.evaluate import (
    RULE_SEGMENTER,
    RULE_STORED,
    RULE_WHOLE,
    Detector,
    EvaluationError,
    case_stats,
    case_volume,
    evaluate,
    evaluate_lungs,
    lungs_config,
    metrics_of,
    region_rule,
)

REPO = Path(__file__).resolve().parents[1]
N = 256  # the ma20 grid


# --------------------------------------------------------------------------- builders


def _ma20_folder(root: Path, volumes: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
                 ) -> None:
    """ct/, lungs/, infection/ NNNN.png and volumes.csv: one row per volume."""
    from PIL import Image

    for d in ("ct", "lungs", "infection"):
        (root / d).mkdir(parents=True)
    rows, i = [], 0
    for name, slices in volumes.items():
        first = i
        for ct, lung, inf in slices:
            Image.fromarray(ct.astype(np.uint8)).save(root / "ct" / f"{i:04d}.png")
            Image.fromarray(np.where(lung, 255, 0).astype(np.uint8)).save(
                root / "lungs" / f"{i:04d}.png")
            Image.fromarray(np.where(inf, 255, 0).astype(np.uint8)).save(
                root / "infection" / f"{i:04d}.png")
            i += 1
        rows.append({"first": f"{first:04d}", "last": f"{i - 1:04d}", "volume": name,
                     "group": name})
    with (root / "volumes.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["first", "last", "volume", "group"])
        w.writeheader()
        w.writerows(rows)


def _box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((N, N), bool)
    m[r0:r1, c0:c1] = True
    return m


def _threshold_model(folder: Path, coefs: list[tuple[float, float]], doc: dict) -> Path:  # type: ignore[type-arg]
    """A model folder whose ONNX network gives logits a * x + b per class (x: the input)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from pipeline.inference import file_sha256

    nodes, inits, outs = [], [], []
    for i, (a, b) in enumerate(coefs):
        inits += [helper.make_tensor(f"a{i}", TensorProto.FLOAT, [], [a]),
                  helper.make_tensor(f"b{i}", TensorProto.FLOAT, [], [b])]
        nodes += [helper.make_node("Mul", ["image", f"a{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"c{i}"])]
        outs.append(f"c{i}")
    nodes.append(helper.make_node("Concat", outs, ["logits"], axis=1))
    graph = helper.make_graph(
        nodes, "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", len(coefs), "h", "w"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    doc = {**doc, "sha256": file_sha256(folder / "model.onnx")}
    (folder / "model.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return folder


def _lung_model(folder: Path, training_data: dict | None = None) -> Path:  # type: ignore[type-arg]
    """Lung where the recipe image is above 0.3 (of 255)."""
    return _threshold_model(folder, [(0.0, 0.0), (40.0, -12.0)], {
        "name": "test-lungs", "version": "0.0.1", "task": "lungs",
        "labels": ["background", "lung"],
        "preprocessing": {"input": "ma20", "network_size": N, "z_step_mm": 2.5},
        "training_data": training_data or {}})


def _lesion_model(folder: Path) -> Path:
    """Ground glass where the (ma20-recipe) input is above 0.7; never consolidation."""
    return _threshold_model(folder, [(0.0, 0.0), (40.0, -28.0), (0.0, -100.0)], {
        "name": "test-lesions", "version": "0.0.1", "task": "lesions",
        "labels": ["background", "ground-glass opacity", "consolidation"],
        "preprocessing": {"input": "ma20", "spacing_mm": 360.0 / 256, "hu_window": [-1024, 3071],
                          "pad_multiple": 16, "margin_mm": 10.0},
        "postprocessing": {"min_lesion_mm2": 0.0, "min_lesion_ml": 0.0}})


# three volumes of two slices; the threshold lung model finds the pixels >= 128
LUNG_A, SEEN_A = _box(50, 150, 40, 120), _box(50, 150, 40, 100)  # model: 6000 of 8000 px
LUNG_B = _box(60, 160, 130, 220)  # model: exactly the truth (9000 px)
INF_A = _box(60, 80, 90, 110)  # 400 px, half outside what the lung model finds


def _volumes() -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    a = np.where(SEEN_A, 128, 0)
    a[60:80, 90:100] = 255  # the lesion model marks these 200 px (inside the found lungs)
    b = np.where(LUNG_B, 128, 0)
    c = np.where(LUNG_B, 200, 0)
    none = np.zeros((N, N), bool)
    return {"coronacases-01": [(a, LUNG_A, INF_A)] * 2,
            "coronacases-02": [(b, LUNG_B, none)] * 2,
            "coronacases-03": [(c, LUNG_B, none)] * 2}


def _fingerprint_of(images: list[np.ndarray]) -> str:
    """As the lung model's export computes it: the volume's stacked images as int16."""
    return fingerprint(np.stack(images).astype(np.int16))


# --------------------------------------------------------------------------- unit figures


def _case(label: np.ndarray, region: np.ndarray | None = None, cid: str = "x",
          **kw: object) -> CaseData:
    rec = CaseRecord(id=cid, site="s", source=str(kw.get("source", "t")), group=cid, file="",
                     n_slices=label.shape[0], spacing_rc=(1.0, 1.0), slice_mm=1.0,
                     fingerprint=cid, lesion_px=(0, 0), fov=str(kw.get("fov", "lung-crop")),
                     intensity=str(kw.get("intensity", "hu")))
    return CaseData(rec, np.zeros(label.shape, np.int16), label.astype(np.uint8),
                    np.ones(label.shape, bool) if region is None else region)


def test_lesion_of_unknown_kind_counts_as_lesion_not_as_a_kind() -> None:
    gt = np.zeros((2, 40, 40), np.uint8)
    gt[0, 2:12, 2:12] = 1  # 100 px GGO
    gt[0, 20:30, 20:30] = LESION_ANY  # 100 px lesion of unknown kind
    pred = np.zeros_like(gt)
    pred[0, 2:12, 2:12] = 1
    pred[0, 20:30, 20:30] = 1  # called GGO where the kind is unknown: neither right nor wrong
    m = metrics_of([case_stats(_case(gt), pred, 20.0)])
    assert m["dice_ggo"] == pytest.approx(1.0)
    assert np.isnan(m["dice_consolidation"])
    assert m["dice_lesion"] == pytest.approx(1.0)
    assert m["lesion_sensitivity"] == pytest.approx(1.0) and m["fp_per_slice"] == 0.0
    # found only where the kind is unknown: a lesion hit, no GGO credit, no GGO false pixel
    only = np.zeros_like(gt)
    only[0, 20:30, 20:30] = 2
    m = metrics_of([case_stats(_case(gt), only, 20.0)])
    assert m["dice_ggo"] == 0.0 and np.isnan(m["dice_consolidation"])
    assert m["dice_lesion"] == pytest.approx(2 * 100 / (100 + 200))
    assert m["lesion_sensitivity"] == pytest.approx(0.5)
    assert m["slice_sensitivity"] == 1.0  # slice 0 holds lesions and is called


def test_region_rules_and_lung_choices() -> None:
    lab = np.zeros((1, 4, 4), np.uint8)
    assert region_rule(_case(lab, source="ma20", fov="full").record) == RULE_SEGMENTER
    assert region_rule(_case(lab, source="volume").record) == RULE_SEGMENTER
    assert region_rule(_case(lab, source="semiseg").record) == RULE_WHOLE
    assert region_rule(_case(lab, source="synthetic").record) == RULE_STORED
    assert region_rule(_case(lab, source="negative").record) == RULE_STORED
    base = LungsConfig(method="classical", threads=1)
    assert lungs_config(None, base) is base and lungs_config("default", base) is base
    assert lungs_config("classical", replace(base, method="model")).method == "classical"
    m = lungs_config("models/x", base)
    assert (m.method, m.model, m.threads) == ("model", "models/x", 1)
    # rows -> posterior, columns -> patient left, slices -> superior
    v = case_volume(CaseRecord("x", "s", "t", "x", "", 1, (0.7, 0.8), 5.0, "x", (0, 0)),
                    np.zeros((3, 4, 5), np.int16))
    assert v.spacing == pytest.approx((5.0, 0.7, 0.8))
    assert np.allclose(v.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


# --------------------------------------------------------------------------- region rules


class _Spy:
    """A detector that predicts nothing and remembers each case's region."""

    def __init__(self) -> None:
        self.regions: dict[str, np.ndarray] = {}

    def __call__(self, case: CaseData) -> np.ndarray:
        self.regions[case.record.id] = case.region.copy()
        return np.zeros(case.label.shape, np.uint8)


def _semiseg(root: Path, n: int = 2) -> None:
    """Lung-cropped slices whose lesion lies outside the lung region slice_lung_region makes
    (a dense blob in soft tissue): only the whole-slice rule holds it."""
    from PIL import Image

    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for i in range(n):
        img = np.full((120, 100), 215, np.uint8)
        img[10:50, 10:90] = 40  # "lungs"
        gt = np.zeros_like(img)
        gt[80:100, 30:50] = 2  # 400 px of consolidation in the soft tissue
        Image.fromarray(img).save(root / "Imgs" / f"{i}.jpg", quality=95)
        Image.fromarray(gt).save(root / "GT" / f"{i}.png")


def test_semiseg_region_is_the_whole_slice_and_stored_masks_are_kept(tmp_path: Path) -> None:
    _semiseg(tmp_path / "semi")
    ds = open_dataset(tmp_path / "semi", tmp_path / "ds")
    stored = ds.load(ds.records[0]).region
    assert not stored.all()  # the import's own lung region is not the whole slice
    # a synthetic case keeps its stored region (a real series' lung mask)
    label = np.zeros((1, 32, 32), np.uint8)
    label[0, 4:8, 4:12] = 1  # 32 px, 16 of them inside the stored region
    region = np.zeros((1, 32, 32), bool)
    region[0, :6, :] = True
    rec = save_case(ds.root, id="syn-0", site="s", source="synthetic", group="syn",
                    hu=np.full((1, 32, 32), -850), label=label, region=region,
                    spacing_rc=(1.0, 1.0), slice_mm=2.0)
    write_manifest(ds.root, [*ds.records, rec], ds.info)
    spy = _Spy()
    rep = evaluate(Detector("spy", spy), read_dataset(ds.root), n_boot=20)
    for r in ds.records:
        assert spy.regions[r.id].all()
    assert np.array_equal(spy.regions["syn-0"], region)
    assert "whole slice" in rep["region_rules"]["semiseg"]
    assert "stored lung mask" in rep["region_rules"]["synthetic"]
    assert rep["gt_lesion_pixels_in_region_by_source"]["semiseg"] == 1.0
    assert rep["gt_lesion_pixels_in_region_by_source"]["synthetic"] == 0.5
    n_semi = sum(int(np.count_nonzero(ds.load(r).label)) for r in ds.records)
    assert rep["gt_lesion_pixels_in_region"] == pytest.approx(
        round((n_semi + 16) / (n_semi + 32), 4))
    assert rep["lungs"] is None  # no case needed a lung segmenter


def test_full_field_hu_case_takes_the_segmenter_region(tmp_path: Path) -> None:
    from pipeline.phantom.model import PhantomSpec, make_grid, render

    shape, spacing = (100, 128, 128), (2.5, 2.6, 2.6)
    ct, truth = render(PhantomSpec(), make_grid(shape, spacing, "axial"), shape)
    lungs = truth.lungs.array > 0
    recs = [save_case(tmp_path, id="chest", site="s", source="volume", group="chest",
                      hu=ct.array, label=truth.lesions.array,
                      region=np.zeros(shape, bool),  # a wrong stored region: not used
                      spacing_rc=spacing[1:], slice_mm=spacing[0], fov="full")]
    # a full-field HU case without lungs: the segmenter refuses, the region is empty
    body = np.full((6, 64, 64), 40)
    label = np.zeros((6, 64, 64), np.uint8)
    label[:, 20:30, 20:30] = 1
    recs.append(save_case(tmp_path, id="belly", site="s", source="volume", group="belly",
                          hu=body, label=label, region=np.ones((6, 64, 64), bool),
                          spacing_rc=(2.0, 2.0), slice_mm=4.0, fov="full"))
    write_manifest(tmp_path, recs, {})
    spy = _Spy()
    rep = evaluate(Detector("spy", spy), read_dataset(tmp_path), n_boot=20,
                   config=Config(), lungs="classical")
    got = spy.regions["chest"]
    dice = 2 * np.count_nonzero(got & lungs) / (np.count_nonzero(got) + np.count_nonzero(lungs))
    assert dice > 0.9
    assert not spy.regions["belly"].any()
    assert rep["cases_no_lungs_found"] == 1 and rep["no_lungs_found"] == ["belly"]
    assert rep["lungs"].startswith("classical")
    assert "lung segmenter" in rep["region_rules"]["volume"]
    les = truth.lesions.array > 0
    inside = np.count_nonzero(les & got) / np.count_nonzero(les)
    assert rep["gt_lesion_pixels_in_region"] == pytest.approx(
        round(np.count_nonzero(les & got) / (np.count_nonzero(les) + 600), 4))
    assert inside > 0.8
    # a learned lung model runs on the HU stack through the batch's path (HU -> recipe);
    # this threshold model finds no lungs in the uniform soft-tissue case either
    small = tmp_path / "small"
    write_manifest(small, [save_case(
        small, id="chest", site="s", source="volume", group="chest", hu=ct.array[40:52],
        label=truth.lesions.array[40:52], region=np.zeros((12, *shape[1:]), bool),
        spacing_rc=spacing[1:], slice_mm=spacing[0], fov="full"), recs[1]], {})
    (small / recs[1].file).parent.mkdir(parents=True, exist_ok=True)
    (small / recs[1].file).write_bytes((tmp_path / recs[1].file).read_bytes())
    spy = _Spy()
    rep = evaluate(Detector("spy", spy), read_dataset(small), n_boot=10,
                   lungs=str(_lung_model(tmp_path / "lung-model")))
    assert rep["lungs"] == "test-lungs 0.0.1"
    assert spy.regions["chest"].shape == (12, *shape[1:]) and spy.regions["chest"].any()
    assert rep["no_lungs_found"] == ["belly"]


# --------------------------------------------------------------------------- ma20 layout


def test_density_is_not_applicable_on_ma20_cases(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main
    from pipeline.train.dataset import import_into

    _ma20_folder(tmp_path / "ma20", _volumes())
    _semiseg(tmp_path / "semi")
    ds = import_into(tmp_path / "ds", semiseg=[tmp_path / "semi"], ma20=[tmp_path / "ma20"])
    rep = evaluate("density", ds, n_boot=20)
    assert rep["cases"] == 2 and rep["by_source"] == {"semiseg": 2}
    assert rep["cases_not_applicable"] == 3
    assert {n["source"] for n in rep["not_applicable"]} == {"ma20"}
    assert all("needs HU" in n["reason"] for n in rep["not_applicable"])
    # only ma20 cases: a clear one-line refusal, no traceback
    assert main(["evaluate", "density", str(tmp_path / "ma20"), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err
    assert "not applicable" in err and "needs HU" in err and "Traceback" not in err


def test_classical_lungs_make_ma20_cases_not_applicable(tmp_path: Path) -> None:
    _ma20_folder(tmp_path / "ma20", _volumes())
    lesions = _lesion_model(tmp_path / "lesions")
    ds = open_dataset(tmp_path / "ma20", tmp_path / "ds")
    with pytest.raises(EvaluationError, match="classical lung segmenter needs HU"):
        evaluate(str(lesions), ds, n_boot=10, lungs="classical")


def test_lesions_on_ma20_inside_the_lung_model_region(tmp_path: Path) -> None:
    vols = _volumes()
    _ma20_folder(tmp_path / "ma20", vols)
    seen = _fingerprint_of([ct for ct, _, _ in vols["coronacases-03"]])
    lungs = _lung_model(tmp_path / "lungs", {"seen_fingerprints": [seen]})
    lesions = _lesion_model(tmp_path / "lesions")
    ds = open_dataset(tmp_path / "ma20", tmp_path / "ds")  # the ma20 layout, read directly
    assert {r.intensity for r in ds.records} == {"ma20"} and {r.fov for r in ds.records} == {
        "full"}
    rep = evaluate(str(lesions), ds, n_boot=50, lungs=str(lungs))
    # the lung model saw volume 03: it is left out of the lesion figures too
    assert rep["left_out"] == [{"id": "ma20-coronacases-03", "source": "ma20",
                                "seen_by": ["test-lungs 0.0.1"]}]
    assert rep["cases"] == 2 and rep["lungs"] == "test-lungs 0.0.1"
    assert "lung segmenter" in rep["region_rules"]["ma20"]
    assert rep["gt_lesion_pixels_in_region"] == 0.5  # 200 of INF_A's 400 px per slice
    assert rep["gt_lesion_pixels_in_region_by_source"] == {"ma20": 0.5}
    m = rep["metrics"]
    assert m["dice_lesion"]["value"] == pytest.approx(round(2 * 200 / (200 + 400), 4))
    assert m["dice_ggo"]["value"] is None  # every true lesion is of unknown kind
    assert m["lesion_sensitivity"]["value"] == 1.0 and m["fp_per_slice"]["value"] == 0.0


def _lung_infection_model(folder: Path, training_data: dict | None = None) -> Path:  # type: ignore[type-arg]
    """Lung where the recipe image is above 0.3 (of 255), infected lung above 0.7."""
    return _threshold_model(folder, [(0.0, 0.0), (40.0, -12.0), (80.0, -40.0)], {
        "name": "test-lungs-infection", "version": "0.0.1", "task": "lungs",
        "labels": ["background", "lung", "infection"],
        "preprocessing": {"input": "ma20", "network_size": N, "z_step_mm": 2.5},
        "training_data": training_data or {}})


def test_lung_model_infection_class_scored_as_the_lesion_detector(tmp_path: Path) -> None:
    """A lung model with an infection class is a lesion detector ("lung-model"): on the ma20
    layout it is scored inside its own lung region, as the batch uses it, and gives what a
    separate lesion model marking the same pixels gives."""
    vols = _volumes()
    _ma20_folder(tmp_path / "ma20", vols)
    seen = _fingerprint_of([ct for ct, _, _ in vols["coronacases-03"]])
    model = _lung_infection_model(tmp_path / "li", {"seen_fingerprints": [seen]})
    ds = open_dataset(tmp_path / "ma20", tmp_path / "ds")
    rep = evaluate(str(model), ds, n_boot=50, lungs=str(model))
    assert rep["detector"].startswith("test-lungs-infection 0.0.1 (infection class)")
    assert [x["id"] for x in rep["left_out"]] == ["ma20-coronacases-03"]
    assert rep["cases"] == 2 and rep["gt_lesion_pixels_in_region"] == 0.5
    m = rep["metrics"]
    assert m["dice_lesion"]["value"] == pytest.approx(round(2 * 200 / (200 + 400), 4))
    assert m["fp_per_slice"]["value"] == 0.0
    # "default" with lesions.detector lung-model resolves to the configured lung model
    cfg = Config()
    cfg = replace(cfg, lungs=replace(cfg.lungs, model=str(model)),
                  lesions=replace(cfg.lesions, detector="lung-model"))
    again = evaluate("default", ds, n_boot=50, config=cfg)
    assert again["metrics"]["dice_lesion"] == m["dice_lesion"]
    # its lung task is the lung class and the infection together
    lungs = evaluate_lungs(str(model), ds, n_boot=20)
    assert {c["id"]: c["dice"] for c in lungs["per_case"]}["ma20-coronacases-02"] == 1.0


def test_lung_model_detector_needs_a_lung_model_with_infection(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from pipeline.run import Stages

    cfg = Config()
    two = _lung_model(tmp_path / "two")
    cfg = replace(cfg, lungs=replace(cfg.lungs, model=str(two), cross_check=False),
                  lesions=replace(cfg.lesions, detector="lung-model"))
    with pytest.raises(ConfigError, match="infection class"):
        Stages.load(cfg)
    classical = replace(cfg, lungs=replace(cfg.lungs, method="classical"))
    with pytest.raises(ConfigError, match="infection class"):
        Stages.load(classical)
    three = _lung_infection_model(tmp_path / "three")
    ok = Stages.load(replace(cfg, lungs=replace(cfg.lungs, model=str(three))))
    assert ok.lesions.name == "lung-model-infection"


def test_cli_lung_task_on_ma20(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    vols = _volumes()
    _ma20_folder(tmp_path / "ma20", vols)
    seen = _fingerprint_of([ct for ct, _, _ in vols["coronacases-03"]])
    lungs = _lung_model(tmp_path / "lungs", {"seen_fingerprints": [seen]})
    assert main(["evaluate", "--task", "lungs", str(lungs), str(tmp_path / "ma20"),
                 "--bootstrap", "200", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    a = 2 * 6000 / (6000 + 8000)
    assert {c["id"]: c["dice"] for c in rep["per_case"]} == {
        "ma20-coronacases-01": pytest.approx(round(a, 4)), "ma20-coronacases-02": 1.0}
    assert rep["metrics"]["dice_pooled"]["value"] == pytest.approx(
        round(2 * (2 * 6000 + 2 * 9000) / (2 * 14000 + 2 * 18000), 4))
    assert rep["metrics"]["dice_case_mean"]["value"] == pytest.approx(round((a + 1) / 2, 4))
    lo, hi = rep["metrics"]["dice_pooled"]["ci95"]
    assert lo == pytest.approx(round(a, 4)) and hi == 1.0  # two cases: a resample is one of them
    assert rep["cases_left_out_as_seen"] == 1
    assert rep["left_out"][0]["id"] == "ma20-coronacases-03"
    # half of case 01's infection lies outside what the lung model finds; 02 has none
    assert rep["metrics"]["lesion_inside"]["value"] == pytest.approx(0.5)
    assert {c["id"]: c["lesion_inside"] for c in rep["per_case"]} == {
        "ma20-coronacases-01": pytest.approx(0.5), "ma20-coronacases-02": None}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| Lung Dice, pooled over pixels |" in md and "ma20-coronacases-03" in md
    # the classical segmenter cannot run on images without HU: refused in one line
    capsys.readouterr()
    assert main(["evaluate", "--task", "lungs", "classical", str(tmp_path / "ma20")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ctscreen:")]
    assert len(err) == 1 and "needs HU" in err[0]
    # 'default' is the configured lungs: a site configuration naming the classical method
    # is refused here as 'classical' is; its lung model runs
    site = tmp_path / "site.yaml"
    site.write_text("lungs: {method: classical}\n")
    assert main(["evaluate", "--task", "lungs", "default", str(tmp_path / "ma20"),
                 "--config", str(site)]) == 2
    site.write_text(f"lungs: {{method: model, model: {lungs}}}\n")
    assert main(["evaluate", "--task", "lungs", "default", str(tmp_path / "ma20"),
                 "--config", str(site), "--bootstrap", "50", "--out",
                 str(tmp_path / "rep2")]) == 0
    rep2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert rep2["per_case"] == rep["per_case"]


def test_lung_model_without_fingerprints_leaves_out_its_split_by_name(tmp_path: Path) -> None:
    _ma20_folder(tmp_path / "ma20", _volumes())
    lungs = _lung_model(tmp_path / "lungs", {"splits": {
        "train": ["coronacases-01"], "val": ["coronacases-03"], "test": ["coronacases-02"]}})
    rep = evaluate_lungs(str(lungs), open_dataset(tmp_path / "ma20", tmp_path / "ds"),
                         n_boot=10)
    assert [c["id"] for c in rep["per_case"]] == ["ma20-coronacases-02"]
    assert rep["metrics"]["dice_pooled"]["value"] == 1.0
    assert sorted(x["id"] for x in rep["left_out"]) == ["ma20-coronacases-01",
                                                        "ma20-coronacases-03"]


def test_lung_task_needs_annotated_lungs(tmp_path: Path) -> None:
    _semiseg(tmp_path / "semi")
    with pytest.raises(EvaluationError, match="annotated lung mask"):
        evaluate_lungs("classical", open_dataset(tmp_path / "semi", tmp_path / "ds"))


@pytest.mark.skipif(not (REPO / "models" / "ctscreen-lungs-unet2d" / "model.yaml").is_file(),
                    reason="no trained lung model in models/ctscreen-lungs-unet2d yet")
def test_committed_lung_model_on_a_tiny_ma20_folder(tmp_path: Path) -> None:
    """The committed lung model runs through the lung task (figures not asserted: the tiny
    folder is not anatomy)."""
    _ma20_folder(tmp_path / "ma20", _volumes())
    rep = evaluate_lungs(str(REPO / "models" / "ctscreen-lungs-unet2d"),
                         open_dataset(tmp_path / "ma20", tmp_path / "ds"), n_boot=10)
    assert rep["cases"] + rep["cases_left_out_as_seen"] == 3


def test_default_is_the_configured_detector_and_lungs(tmp_path: Path) -> None:
    from pipeline.cli import main

    _ma20_folder(tmp_path / "ma20", _volumes())
    lungs = _lung_model(tmp_path / "lungs")
    lesions = _lesion_model(tmp_path / "lesions")
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"lesions": {"detector": "onnx", "model": str(lesions)},
                                   "lungs": {"method": "model", "model": str(lungs)}}))
    assert main(["evaluate", "default", str(tmp_path / "ma20"), "--config", str(cfg),
                 "--bootstrap", "20", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["detector"].startswith("test-lesions 0.0.1, kind by density")
    assert rep["lungs"] == "test-lungs 0.0.1"
    assert rep["dataset"] == str(tmp_path / "ma20") and rep["cases"] == 3
    assert rep["gt_lesion_pixels_in_region"] == 0.5
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| ma20 | 3 | the lung segmenter's mask (test-lungs 0.0.1) | 50.0% |" in md
    # --lungs overrides the configured lungs; the lung task takes the configured model too
    assert main(["evaluate", "default", str(tmp_path / "ma20"), "--config", str(cfg),
                 "--lungs", "classical", "--bootstrap", "10"]) == 2
    assert main(["evaluate", "--task", "lungs", "default", str(tmp_path / "ma20"), "--config",
                 str(cfg), "--bootstrap", "10", "--out", str(tmp_path / "rep-lungs")]) == 0
    rep = json.loads((tmp_path / "rep-lungs" / "report.json").read_text())
    assert rep["segmenter"] == "test-lungs 0.0.1" and rep["cases"] == 3
