"""What a result's identity (``Stages.content_key``) follows: the model's weights and its
model.yaml processing, the analysis configuration; not the transport settings."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from pipeline.config import Config
from pipeline.run import Stages

LESION_MODEL = Path(__file__).resolve().parents[1] / "models" / "covid-lesions-unet2d"


def _key(cfg: Config) -> str:
    return Stages.load(cfg).content_key


def _with_lesion_model(cfg: Config, model: Path) -> Config:
    return dataclasses.replace(cfg, lesions=dataclasses.replace(
        cfg.lesions, detector="onnx", model=str(model)))


def test_an_edited_model_yaml_changes_the_identity(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(LESION_MODEL, copy)
    base = _with_lesion_model(Config(), copy)
    before = _key(base)
    assert _key(base) == before  # stable
    spec = yaml.safe_load((copy / "model.yaml").read_text())
    spec["postprocessing"]["min_lesion_ml"] = 2 * float(spec["postprocessing"]["min_lesion_ml"])
    (copy / "model.yaml").write_text(yaml.safe_dump(spec))
    assert _key(base) != before


def test_the_analysis_configuration_changes_the_identity_and_transport_does_not() -> None:
    cfg = _with_lesion_model(Config(), LESION_MODEL)
    before = _key(cfg)
    split = dataclasses.replace(cfg, lesions=dataclasses.replace(
        cfg.lesions, model_consolidation_hu=-300.0))
    assert _key(split) != before
    workers = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, workers=3))
    assert _key(workers) == before
