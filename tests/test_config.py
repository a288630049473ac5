from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_embedded_defaults() -> None:
    assert load_config(REPO / "configs" / "default.yaml") == Config()


def test_no_file_means_embedded_defaults() -> None:
    assert load_config(None) == Config()


def test_partial_file_overrides_only_its_keys(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("selection:\n  max_slice_thickness_mm: 2.0\n")
    cfg = load_config(p)
    assert cfg.selection.max_slice_thickness_mm == 2.0
    assert cfg.selection.min_slices == Config().selection.min_slices
    assert cfg.lungs == Config().lungs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("selection:\n  max_slice_thicknes_mm: 2.0\n", "unknown key"),
        ("bogus: 1\n", "unknown key"),
        ("selection:\n  max_slice_thickness_mm: thin\n", "expected a number"),
        ("selection:\n  modalities: CT\n", "expected a list"),
        ("selection: [1, 2]\n", "expected a mapping"),
        ("selection: {\n", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_site_example_names_archives_and_no_secrets() -> None:
    cfg = load_config(REPO / "configs" / "site-example.yaml")
    assert set(cfg.archives) == {"pacs", "pacs-web", "orthanc", "orthanc-web"}
    assert cfg.archive("pacs").kind == "dimse" and cfg.archive("pacs").called_ae == "MAINPACS"
    assert cfg.archive("pacs-web").password_env == "CTSCREEN_PACS_PASSWORD"
    assert cfg.listen.allowed_calling_aes == ("MAINPACS",)
    assert cfg.listen.results_archive in cfg.archives
    with pytest.raises(ConfigError, match="expected an archive named"):
        cfg.archive("nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("archives:\n  a: {kind: ftp}\n", "expected one of"),
        ("archives:\n  a: {kind: dimse, host: h}\n", "needs host and called_ae"),
        ("archives:\n  a: {kind: dimse, host: h, called_ae: X, retrieve: c-move}\n", "move_port"),
        ("archives:\n  a: {kind: dicomweb, url: pacs.example.org}\n", "http"),
        ("archives:\n  a: {kind: dicomweb, url: 'http://x', password_env: 'hunter 2!'}\n",
         "NAME of an environment variable"),
        ("archives:\n  a: {kind: dimse, host: h, called_ae: X, bogus: 1}\n", "unknown key"),
        ("archives: [a]\n", "expected a mapping"),
    ],
)
def test_bad_archives_are_refused(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_how_the_work_is_spread_does_not_change_the_fingerprint_key() -> None:
    import dataclasses

    base = Config()
    spread = dataclasses.replace(
        base,
        volume=dataclasses.replace(base.volume, decode_workers=4),
        lesions=dataclasses.replace(base.lesions, threads=8, batch_slices=64,
                                    providers=("CPUExecutionProvider",)),
        batch=dataclasses.replace(base.batch, workers=8),
    )
    assert spread.analysis_key() == base.analysis_key()
    lungs = dataclasses.replace(base.lungs, air_threshold_hu=-450)
    changed = dataclasses.replace(base, lungs=lungs)
    assert changed.analysis_key() != base.analysis_key()
