"""Serving: the slice model path (preprocessing from the spec), the committed model on
phantoms and on the real negative study, hash checks."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiers import quick_one

from pipeline.artefacts import LesionKind, Side
from pipeline.config import LesionsConfig
from pipeline.errors import ModelError
from pipeline.inference import (
    ModelSpec,
    load_model_spec,
    model_grid,
    resize_slices,
    segment_slices,
)
from pipeline.lesions import analyse, detector_for
from pipeline.lungs import segment_lungs
from pipeline.phantom.model import PhantomSpec, default_lesions, make_grid, render

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "covid-lesions-unet2d"


def _spec(**kw: object) -> ModelSpec:
    base = dict(folder=Path("."), name="t", version="0", task="lesions", sha256="",
                labels=("b", "g", "c"), spacing_mm=1.5, hu_window=(-1100.0, 300.0),
                pad_multiple=16, margin_mm=5.0, min_lesion_mm2=10.0, min_lesion_ml=0.0,
                raw={})
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def _threshold_model(x: np.ndarray) -> np.ndarray:
    """A stand-in network: class 1 where the (0..1) input is above ground-glass level."""
    hu = x * 1400.0 - 1100.0
    logits = np.zeros((x.shape[0], 3, *x.shape[2:]), np.float32)
    assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0  # padded as the spec says
    logits[:, 1] = np.where(hu[:, 0] > -700, 5.0, -5.0)
    return logits


def test_segment_slices_resamples_crops_and_restricts() -> None:
    hu = np.full((4, 120, 90), -850.0, np.float32)
    hu[1, 40:60, 30:50] = -500.0  # a 20x20 px "lesion" at 0.75 mm: 15 x 15 mm
    hu[2, 2:6, 2:6] = -500.0  # outside the region: never labelled
    region = np.zeros(hu.shape, bool)
    region[:, 20:100, 10:80] = True
    out = segment_slices(hu, (0.75, 0.75), region, _threshold_model, _spec(), batch=3)
    assert out.shape == hu.shape and out.dtype == np.uint8
    assert out[2, 2:6, 2:6].sum() == 0 and not out[0].any() and not out[3].any()
    got = out[1] == 1
    want = hu[1] > -700
    # the model works at 2x coarser pixels: at most a one-pixel ring of difference
    assert (got & want).sum() / want.sum() > 0.9 and (got & ~want).sum() < 4 * 22
    # below the minimum size: dropped
    small = np.full((1, 120, 90), -850.0, np.float32)
    small[0, 50:53, 50:53] = -500.0  # 9 px of 0.56 mm2 = 5 mm2 < 10 mm2
    assert not segment_slices(small, (0.75, 0.75), None, _threshold_model, _spec()).any()


def test_a_stack_runs_on_slices_z_step_apart_and_interpolates() -> None:
    """In a stack, the model sees slices about z_step_mm apart (the first and last of the
    region always); a lesion spanning several slices is labelled on all of them."""
    hu = np.full((13, 64, 64), -850.0, np.float32)
    hu[3:10, 20:40, 20:40] = -500.0  # a lesion over 7 slices of 1 mm
    region = np.ones(hu.shape, bool)
    seen: list[int] = []

    def counting(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape[0])
        return _threshold_model(x)

    every = segment_slices(hu, (1.0, 1.0), region, _threshold_model, _spec(), batch=4)
    out = segment_slices(hu, (1.0, 1.0), region, counting, _spec(z_step_mm=3.0), batch=4,
                         slice_mm=1.0)
    assert sum(seen) == 5  # slices 0, 3, 6, 9, 12
    inner = (slice(4, 9), slice(24, 36), slice(24, 36))
    assert (out[inner] == 1).all() and (every[inner] == 1).all()
    assert not out[0].any() and not out[12].any()


def test_resize_is_exact_and_model_grid() -> None:
    a = np.random.default_rng(0).random((2, 37, 53)).astype(np.float32)
    assert resize_slices(a, (61, 29), 1).shape == (2, 61, 29)
    assert model_grid((512, 512), (0.7, 0.7), 1.5) == (239, 239)


def test_model_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.yaml"):
        load_model_spec(tmp_path)
    (tmp_path / "model.yaml").write_text("name: x\n")
    with pytest.raises(ModelError, match="missing or malformed"):
        load_model_spec(tmp_path)


needs_model = pytest.mark.skipif(not (MODEL / "model.onnx").is_file(),
                                 reason=f"no committed model at {MODEL}")


@needs_model
def test_committed_model_hash_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "m"
    shutil.copytree(MODEL, bad)
    with (bad / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        detector_for(LesionsConfig(detector="onnx", model=str(bad)))
    doc = yaml.safe_load((MODEL / "model.yaml").read_text())
    assert doc["preprocessing"]["spacing_mm"] > 0 and doc["labels"][2] == "consolidation"


def _phantom_with_model(orient: str):  # type: ignore[no-untyped-def]
    shape, spacing = (110, 160, 160), (2.5, 2.2, 2.2)
    ct, truth = render(PhantomSpec(), make_grid(shape, spacing, orient), shape)
    lungs = segment_lungs(ct)
    cfg = LesionsConfig(detector="onnx")
    det = detector_for(cfg)
    an = analyse(ct, lungs, det(ct, lungs), cfg, det.name)
    log.info("%s: %d findings: %s", orient, an.n_findings_total,
             [(f.kind.value, f.side.value, round(f.volume_ml, 1)) for f in an.findings])
    return truth, an


def _near(an, spec):  # type: ignore[no-untyped-def]
    return [f for f in an.findings
            if np.linalg.norm(np.subtract(f.centroid_lps, spec.centre_lps)) < 25.0]


@needs_model
@pytest.mark.parametrize("orient", quick_one(["axial", "flipped"], "flipped"))
def test_committed_model_finds_phantom_ground_glass(orient: str) -> None:
    truth, an = _phantom_with_model(orient)
    ggo = [(s, side) for s, side in zip(default_lesions(), truth.lesion_sides, strict=True)
           if s.kind == LesionKind.GGO]
    assert len(ggo) == 2
    for spec, side in ggo:  # right lower zone (x = -95) and left upper zone (x = +80)
        near = _near(an, spec)
        assert near, f"{orient}: nothing found near the GGO at {spec.centre_lps}"
        assert all(f.side == side for f in near), f"{orient}: GGO reported on the wrong side"
    assert an.lungs[0].side == Side.RIGHT and an.lungs[0].ggo_ml > 15.0
    assert an.lungs[1].side == Side.LEFT and an.lungs[1].ggo_ml > 3.0
    assert an.n_findings_total <= 4  # no scatter of false lesions on the clean phantom


@needs_model
@pytest.mark.heavy
@pytest.mark.xfail(strict=True, reason="known limit of covid-lesions-unet2d 1.0.0: it misses "
                   "the phantom's homogeneous subpleural consolidation (the density detector "
                   "finds it); consolidation Dice on held-out data is low too")
def test_committed_model_finds_phantom_consolidation() -> None:
    _, an = _phantom_with_model("axial")
    cons = default_lesions()[1]
    assert cons.kind == LesionKind.CONSOLIDATION
    assert any(f.kind == LesionKind.CONSOLIDATION for f in _near(an, cons))


@needs_model
@pytest.mark.slow
@pytest.mark.shared_data
def test_committed_model_on_lidc(shared_data: Path) -> None:
    """LIDC-IDRI-0314: no COVID-19; a real opacified right upper lobe.  What the model finds
    here is stated in the README: a few small false lesions and not the opacity.  Note that
    the superior 70% of this study's lung slices were training background (with inserted
    lesions): this is not a held-out figure."""
    from test_lungs import read_lidc

    ct = read_lidc(shared_data)
    lungs = segment_lungs(ct)
    cfg = LesionsConfig(detector="onnx")
    det = detector_for(cfg)
    an = analyse(ct, lungs, det(ct, lungs), cfg, det.name)
    opacity = [f for f in an.findings if f.side == Side.RIGHT and f.volume_ml > 20]
    others = an.n_findings_total - len(opacity)
    # 1.0.0 does not mark the opacified lobe (it was "ignore" in training): every finding is
    # a false lesion, all small (README: 19 findings, 0.10% of the lungs)
    log.info("LIDC-IDRI-0314 with the model: %d findings, %.2f%% involved; largest %s; "
             "others %d", an.n_findings_total, an.involved_pct,
             [(f.kind.value, f.side.value, f.zone.value, round(f.volume_ml, 1))
              for f in an.findings[:5]], others)
    assert not opacity
    assert all(f.volume_ml < 2.0 for f in an.findings)
    assert an.n_findings_total <= 25 and an.involved_pct < 0.3


def test_providers_default_to_cuda_where_present_and_cpu_always() -> None:
    from pipeline.errors import ModelError
    from pipeline.inference import choose_providers

    cpu = ["CPUExecutionProvider"]
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers((), cpu) == cpu
    assert choose_providers((), gpu) == gpu
    assert choose_providers(("CPUExecutionProvider",), gpu) == cpu
    with pytest.raises(ModelError, match="CUDAExecutionProvider"):
        choose_providers(("CUDAExecutionProvider",), cpu)


def test_kind_follows_the_density_where_the_model_put_a_lesion() -> None:
    """The model says where; the smoothed HU says which kind; nothing is added or removed."""
    from pipeline.inference import kind_by_density

    hu = np.full((2, 40, 40), -850.0, dtype=np.float32)
    hu[:, 5:20, 5:20] = -600.0  # ground-glass density
    hu[:, 22:36, 22:36] = 0.0  # consolidation density
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 6:19, 6:19] = 2  # the model called the ground glass consolidation ...
    labels[:, 23:35, 23:35] = 1  # ... and the consolidation ground glass
    out = kind_by_density(labels, hu, (1.0, 1.0), -400.0)
    assert np.array_equal(out > 0, labels > 0)
    assert np.all(out[:, 8:17, 8:17] == 1) and np.all(out[:, 25:33, 25:33] == 2)
    assert not np.any(out[labels == 0])


def test_the_configured_split_reaches_the_served_detector() -> None:
    assert LesionsConfig().model_consolidation_hu == -400.0
    det = detector_for(LesionsConfig(detector="onnx", model_consolidation_hu=None))
    assert det.consolidation_hu is None  # type: ignore[attr-defined]


def test_kind_by_density_smooths_around_the_lesions_as_over_the_whole_slice() -> None:
    from scipy import ndimage as ndi

    from pipeline.inference import kind_by_density

    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, (3, 120, 130)).astype(np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[:, 40:70, 50:60] = 1
    labels[1, 2:5, 0:3] = 2  # at the image border
    smooth = ndi.gaussian_filter(hu, (0, 1 / 0.7, 1 / 0.8))
    want = np.zeros_like(labels)
    want[labels > 0] = np.where(smooth[labels > 0] > -400, 2, 1)
    assert np.array_equal(kind_by_density(labels, hu, (0.7, 0.8), -400.0), want)
    assert not kind_by_density(np.zeros_like(labels), hu, (0.7, 0.8), -400.0).any()
