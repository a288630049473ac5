"""Serving learned models: a Predictor is any callable array -> array.

- :class:`ModelSpec` is a model folder's ``model.yaml``: the preprocessing the model was trained
  with (in-plane spacing, HU window, padding), its labels, version and the sha256 of its ONNX
  file.  Training writes it (``pipeline/train/export.py``) and inference reads it, so the two
  cannot drift apart.
- :class:`OnnxPredictor` wraps one onnxruntime session: the file's hash is checked against the
  spec before the session is built (a mismatch raises :class:`~pipeline.errors.ModelError`:
  fail closed, before any study is touched); threads are set explicitly.
- :func:`segment_slices` is the one preprocessing + batching + postprocessing path for a 2D
  slice model, used by the pipeline (:class:`OnnxLesionDetector`) and by evaluation alike:
  crop to the region's bounding box (+ margin), resample each slice in-plane to the model's
  spacing, clip to the HU window and scale to 0..1, pad to a multiple of ``pad_multiple``, run
  in batches, resample the class probabilities back, take the arg-max, keep it inside the
  region and drop pieces smaller than ``min_lesion_mm2`` per slice and, in a stack of
  slices, lesions smaller than ``min_lesion_ml``.

Nothing here imports torch; the runtime needs onnxruntime only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from scipy import ndimage as ndi

from .artefacts import LungMasks, Volume, bounding_box
from .config import LesionsConfig
from .errors import ModelError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
F32 = npt.NDArray[np.float32]
Predictor = Callable[[F32], F32]
"""Any callable (N, 1, H, W) float32 -> (N, C, H, W) float32 logits."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``model.yaml`` says about a model: enough to preprocess, run and check it."""

    folder: Path
    name: str
    version: str
    task: str  # "lesions" (0 background, 1 GGO, 2 consolidation) or "lungs"
    sha256: str
    labels: tuple[str, ...]
    spacing_mm: float
    hu_window: tuple[float, float]
    pad_multiple: int
    margin_mm: float
    min_lesion_mm2: float
    min_lesion_ml: float
    raw: dict[str, Any]
    # "hu-window": clip to hu_window, scale to 0..1 (the first lesion model); "ma20": the
    # recipe of pipeline/representation.py (both learned models from 2.0 / 1.0 on)
    input: str = "hu-window"
    network_size: int = 0  # "ma20" lung model: the network's square grid
    z_step_mm: float = 0.0  # lung model: it runs on slices about this far apart

    @property
    def onnx_path(self) -> Path:
        return self.folder / "model.onnx"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder: absolute, else relative to the working directory, else to the repo."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read and check ``model.yaml`` of a model folder (raises ModelError)."""
    folder = resolve_model_dir(path)
    f = folder / "model.yaml"
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"model spec {f}: expected a readable model.yaml, got {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ModelError(f"model spec {f} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ModelError(f"model spec {f}: expected a mapping, got {type(raw).__name__}")
    try:
        pre = raw["preprocessing"]
        post = raw.get("postprocessing", {})
        spec = ModelSpec(
            folder=folder,
            name=str(raw["name"]),
            version=str(raw["version"]),
            task=str(raw.get("task", "lesions")),
            sha256=str(raw["sha256"]),
            labels=tuple(str(x) for x in raw["labels"]),
            spacing_mm=float(pre.get("spacing_mm", 0.0)),
            hu_window=(float(pre.get("hu_window", (-1024, 3071))[0]),
                       float(pre.get("hu_window", (-1024, 3071))[1])),
            pad_multiple=int(pre.get("pad_multiple", 16)),
            margin_mm=float(pre.get("margin_mm", 10.0)),
            min_lesion_mm2=float(post.get("min_lesion_mm2", 0.0)),
            min_lesion_ml=float(post.get("min_lesion_ml", 0.0)),
            raw=raw,
            input=str(pre.get("input", "hu-window")),
            network_size=int(pre.get("network_size", 0)),
            z_step_mm=float(pre.get("z_step_mm", 0.0)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelError(f"model spec {f}: missing or malformed entry {e!s}") from e
    if spec.input not in ("hu-window", "ma20"):
        raise ModelError(f"model spec {f}: preprocessing.input: expected 'hu-window' or 'ma20', "
                         f"got {spec.input!r}")
    if spec.task == "lungs":
        if spec.input != "ma20" or spec.network_size < 16 or spec.z_step_mm <= 0:
            raise ModelError(f"model spec {f}: a lungs model needs input 'ma20', a network_size "
                             f"and a positive z_step_mm, got {spec.input!r}, "
                             f"{spec.network_size}, {spec.z_step_mm}")
        return spec
    if spec.hu_window[1] <= spec.hu_window[0] or spec.spacing_mm <= 0:
        raise ModelError(f"model spec {f}: expected a rising HU window and a positive spacing, "
                         f"got {spec.hu_window} and {spec.spacing_mm}")
    return spec


class OnnxPredictor:
    """One onnxruntime session, built once; the file's sha256 must match the spec."""

    def __init__(
        self, spec: ModelSpec, threads: int = 2, providers: Sequence[str] = ()
    ) -> None:
        import onnxruntime as ort

        path = spec.onnx_path
        if not path.is_file():
            raise ModelError(f"model {spec.name}: expected {path}, found no file")
        digest = file_sha256(path)
        if digest != spec.sha256:
            raise ModelError(f"model {spec.name}: sha256 of {path.name} is {digest[:16]}..., "
                             f"model.yaml expects {spec.sha256[:16]}...; refusing to run it")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        wanted = choose_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelError(f"model {spec.name}: onnxruntime cannot load {path}: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.spec = spec
        # the provider that runs the model (CUDA falls back to CPU where its libraries fail)
        self.provider = self.session.get_providers()[0]
        log.info("model %s %s loaded from %s (sha256 %s..., %s, %d CPU threads)", spec.name,
                 spec.version, path, digest[:12], self.provider, threads)

    def __call__(self, x: F32) -> F32:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], dtype=np.float32)


def choose_providers(configured: Sequence[str], available: Sequence[str]) -> list[str]:
    """The execution providers to ask for: the configured ones (a ModelError where one is
    not available), or by default CUDA where onnxruntime has it, and always CPU last."""
    if configured:
        missing = [p for p in configured if p not in available]
        if missing:
            raise ModelError(f"expected onnxruntime providers {missing} (lesions.providers); "
                             f"this onnxruntime has {list(available)}")
        return list(configured)
    auto = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*auto, "CPUExecutionProvider"]


# --------------------------------------------------------------------------- preprocessing


def normalise(hu: npt.NDArray[Any], window: tuple[float, float]) -> F32:
    """Clip to the HU window and scale to 0..1 (the model's input scale)."""
    lo, hi = window
    x = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(x, 0.0, 1.0)


def resize_slices(a: npt.NDArray[Any], shape: tuple[int, int], order: int) -> npt.NDArray[Any]:
    """Resample (K, H, W) (or (K, C, H, W)) in-plane to ``shape``, pixel edges aligned."""
    h, w = a.shape[-2:]
    if (h, w) == shape:
        return a
    zoom = [1.0] * (a.ndim - 2) + [shape[0] / h, shape[1] / w]
    out = ndi.zoom(a, zoom, order=order, mode="nearest", grid_mode=True)
    # zoom rounds the size; make it exact
    out = out[..., : shape[0], : shape[1]]
    ph, pw = shape[0] - out.shape[-2], shape[1] - out.shape[-1]
    if ph > 0 or pw > 0:
        pad = [(0, 0)] * (a.ndim - 2) + [(0, max(ph, 0)), (0, max(pw, 0))]
        out = np.pad(out, pad, mode="edge")
    return np.asarray(out)


def model_grid(shape: tuple[int, int], spacing_rc: tuple[float, float],
               spacing_mm: float) -> tuple[int, int]:
    """In-plane size of a (H, W) slice of pixel size ``spacing_rc`` at ``spacing_mm``."""
    return (max(1, round(shape[0] * spacing_rc[0] / spacing_mm)),
            max(1, round(shape[1] * spacing_rc[1] / spacing_mm)))


def _pad_to(x: F32, multiple: int, value: float) -> F32:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="constant", constant_values=value)


def softmax(logits: F32, axis: int = 1) -> F32:
    m = logits.max(axis=axis, keepdims=True)
    e = np.exp(logits - m)
    return np.asarray(e / e.sum(axis=axis, keepdims=True), dtype=np.float32)


def drop_small_2d(labels: npt.NDArray[np.uint8], min_pixels: float) -> npt.NDArray[np.uint8]:
    """Remove, slice by slice, connected lesion pieces (any class, 8-connected) under a size."""
    if min_pixels <= 1:
        return labels
    out = labels.copy()
    st = np.ones((3, 3), dtype=bool)
    for k in range(labels.shape[0]):
        if not out[k].any():
            continue
        lab, _ = ndi.label(out[k] > 0, structure=st)
        sizes = np.bincount(lab.ravel())
        small = sizes < min_pixels
        small[0] = False
        out[k][small[lab]] = 0
    return out


def _ma20_crop_probs(hu: npt.NDArray[Any], ks: list[int], box: tuple[slice, slice],
                     spacing_rc: tuple[float, float], intensity: str, predictor: Predictor,
                     spec: ModelSpec, batch: int) -> F32:
    """Class probabilities (len(ks), C, h, w) of slices ``ks`` cropped to ``box``, on the
    model's grid: the crop made into the ma20 recipe (:func:`crop_input`; an ``intensity``
    "ma20" image already is one), padded with 0 to a multiple of ``pad_multiple``."""
    from .representation import NOMINAL_FIELD_MM, SIZE, crop_input, resize2d

    imgs = []
    for k in ks:
        crop = hu[k, box[0], box[1]]
        if intensity == "ma20":
            px = NOMINAL_FIELD_MM / SIZE
            h = max(8, round(crop.shape[0] * spacing_rc[0] / px))
            w = max(8, round(crop.shape[1] * spacing_rc[1] / px))
            imgs.append(resize2d(np.asarray(crop, np.float32), (h, w)))
        else:
            imgs.append(crop_input(crop, spacing_rc)[0].astype(np.float32))
    x = np.asarray(np.stack(imgs) / np.float32(255.0), dtype=np.float32)
    h, w = x.shape[1:]
    xp = _pad_to(x, spec.pad_multiple, 0.0)[:, None]
    out = [softmax(predictor(np.ascontiguousarray(xp[i:i + batch])))[:, :, :h, :w]
           for i in range(0, len(xp), batch)]
    return np.concatenate(out)


def _upsampled_argmax(probs: npt.NDArray[np.float32], run: list[int], ks: range,
                      region: npt.NDArray[np.bool_],
                      crop_shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Arg-max labels (K, *crop_shape) of every slice of ``ks`` (whole stack, K = its size)
    from class probabilities (len(run), C, h, w) computed on the slices ``run``: linear
    interpolation between them, bilinear upsampling (pixel edges aligned, OpenCV), slices
    without region left 0."""
    import cv2

    out = np.zeros((region.shape[0], *crop_shape), dtype=np.uint8)
    pos = {k: i for i, k in enumerate(run)}
    for k in ks:
        if not region[k].any():
            continue
        if k in pos:
            p = probs[pos[k]]
        else:
            j = int(np.searchsorted(run, k))
            a, b = run[j - 1], run[j]
            t = np.float32((k - a) / (b - a))
            p = probs[j - 1] * (1 - t) + probs[j] * t
        hwc = np.ascontiguousarray(np.moveaxis(p, 0, -1))
        up = cv2.resize(hwc, (crop_shape[1], crop_shape[0]), interpolation=cv2.INTER_LINEAR)
        out[k] = np.argmax(up.reshape(*crop_shape, -1), axis=-1)
    return out


def _segment_ma20(hu: npt.NDArray[Any], spacing_rc: tuple[float, float],
                  region: npt.NDArray[np.bool_], predictor: Predictor, spec: ModelSpec,
                  batch: int, slice_mm: float | None, intensity: str,
                  ks: slice, box: tuple[slice, slice]) -> npt.NDArray[np.uint8]:
    """Arg-max labels of an "ma20"-input model on the crop ``box`` of slices ``ks``; in a
    stack (``slice_mm``) the model runs on slices about ``z_step_mm`` apart and the
    probabilities are interpolated linearly in between."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    run = _run_slices(ks, spec, slice_mm)
    probs = _ma20_crop_probs(hu, run, box, spacing_rc, intensity, predictor, spec, batch)
    crop_shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    out[:, box[0], box[1]] = _upsampled_argmax(probs, run, range(ks.start, ks.stop), region,
                                               crop_shape)
    return out


def _run_slices(ks: slice, spec: ModelSpec, slice_mm: float | None) -> list[int]:
    """The slices of ``ks`` a model runs on: in a stack (``slice_mm``) about ``z_step_mm``
    apart, always the first and the last; otherwise all."""
    step = max(1, round(spec.z_step_mm / slice_mm)) if slice_mm and spec.z_step_mm > 0 else 1
    return sorted(set(range(ks.start, ks.stop, step)) | {ks.stop - 1})


def segment_slices(hu: npt.NDArray[Any], spacing_rc: tuple[float, float],
                   region: npt.NDArray[np.bool_] | None, predictor: Predictor, spec: ModelSpec,
                   batch: int = 16, slice_mm: float | None = None,
                   intensity: str = "hu",
                   consolidation_hu: float | None = None) -> npt.NDArray[np.uint8]:
    """Labels (K, H, W) uint8 of a 2D slice model on axial slices ``hu`` (K, H, W) in HU.

    ``region`` (the lungs) limits where the model runs (its bounding box + ``margin_mm``) and
    where labels may be; None means the whole slice.  Where ``slice_mm`` is given and the
    stack has at least 3 slices, lesions (26-connected, any kind) under ``min_lesion_ml``
    are dropped as well.  With ``consolidation_hu`` the model decides where a lesion is and
    the density its kind (:func:`kind_by_density`).  See the module docstring.
    """
    out = np.zeros(hu.shape, dtype=np.uint8)
    if region is None:
        region = np.ones(hu.shape, dtype=bool)
    found = bounding_box(region)
    if found is None:
        return out
    ks, rs, cs = found
    mr = round(spec.margin_mm / spacing_rc[0])
    mc = round(spec.margin_mm / spacing_rc[1])
    r0, r1 = max(0, rs.start - mr), min(hu.shape[1], rs.stop + mr)
    c0, c1 = max(0, cs.start - mc), min(hu.shape[2], cs.stop + mc)
    crop_shape = (r1 - r0, c1 - c0)
    if spec.input == "ma20":
        out = _segment_ma20(hu, spacing_rc, region, predictor, spec, batch, slice_mm,
                            intensity, ks, (slice(r0, r1), slice(c0, c1)))
    else:
        if intensity == "ma20":  # recipe images: approximate HU through two anchors
            hu = _pseudo_hu(hu, region)
        elif intensity != "hu":
            raise ModelError(f"model {spec.name} reads HU; this case holds {intensity} images")
        grid = model_grid(crop_shape, spacing_rc, spec.spacing_mm)
        pad_value = float(normalise(np.array([-1000.0]), spec.hu_window)[0])
        # in a stack the model runs on slices about z_step_mm apart (always the first and
        # the last of the lungs' box); probabilities are interpolated linearly in between
        run = _run_slices(ks, spec, slice_mm)
        parts = []
        for i in range(0, len(run), batch):
            kk = run[i:i + batch]
            x = normalise(resize_slices(np.asarray(hu[kk, r0:r1, c0:c1], np.float32), grid,
                                        1), spec.hu_window)
            xp = _pad_to(x, spec.pad_multiple, pad_value)[:, None]
            parts.append(softmax(predictor(xp)[:, :, : grid[0], : grid[1]]))
        probs = np.concatenate(parts)
        out[:, r0:r1, c0:c1] = _upsampled_argmax(probs, run, range(ks.start, ks.stop),
                                                  region, crop_shape)
    # labels exist only in the box: the clean-up runs there (the same result, less work)
    box = (ks, slice(r0, r1), slice(c0, c1))
    sub = np.where(region[box], out[box], 0).astype(np.uint8)
    min_px = spec.min_lesion_mm2 / (spacing_rc[0] * spacing_rc[1])
    sub = drop_small_2d(sub, min_px)
    if slice_mm is not None and hu.shape[0] >= 3 and spec.min_lesion_ml > 0 and sub.any():
        lab, _ = ndi.label(sub > 0, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(lab.ravel())
        small = sizes * (spacing_rc[0] * spacing_rc[1] * slice_mm / 1000.0) < spec.min_lesion_ml
        small[0] = False
        sub[small[lab]] = 0
    if consolidation_hu is not None and sub.any():
        hu_box = np.asarray(hu[box] if intensity == "hu" or spec.input != "ma20"
                            else _pseudo_hu(hu, region)[box])
        sub = kind_by_density(sub, hu_box, spacing_rc, consolidation_hu)
    out = np.zeros(hu.shape, dtype=np.uint8)
    out[box] = sub
    return out


def _pseudo_hu(hu: npt.NDArray[Any], region: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
    from .representation import ma20_pseudo_hu

    return ma20_pseudo_hu(np.asarray(hu), region)


KIND_SMOOTHING_MM = 1.0  # in-plane Gaussian sigma of the density that decides a lesion's kind


def kind_by_density(labels: npt.NDArray[np.uint8], hu: npt.NDArray[Any],
                    spacing_rc: tuple[float, float], consolidation_hu: float
                    ) -> npt.NDArray[np.uint8]:
    """Lesion labels (K, H, W) whose kind follows the density: a lesion pixel is
    consolidation (2) where ``hu``, smoothed in-plane with a Gaussian of
    ``KIND_SMOOTHING_MM``, is above ``consolidation_hu``, else ground glass (1).  Where a
    lesion is stays as the model said; only the kind changes."""
    out = np.zeros_like(labels)
    found = bounding_box(labels > 0)
    if found is None:
        return out
    sigma = (0.0, KIND_SMOOTHING_MM / spacing_rc[0], KIND_SMOOTHING_MM / spacing_rc[1])
    # smoothed only around the lesions: a margin beyond the kernel's reach (truncate 4)
    # gives the same values as smoothing the whole slice
    box = [found[0]]
    for axis in (1, 2):
        m = math.ceil(4.0 * sigma[axis]) + 1
        box.append(slice(max(0, found[axis].start - m), min(labels.shape[axis],
                                                             found[axis].stop + m)))
    sub = tuple(box)
    smooth = ndi.gaussian_filter(np.asarray(hu[sub], dtype=np.float32), sigma=sigma)
    les = labels[sub] > 0
    view = out[sub]
    view[les] = np.where(smooth[les] > consolidation_hu, 2, 1).astype(np.uint8)
    return out


class OnnxLesionDetector:
    """The lesion stage served by an exported model (``lesions.detector: onnx``)."""

    def __init__(self, config: LesionsConfig) -> None:
        self.spec = load_model_spec(config.model)
        if config.z_step_mm > 0:
            self.spec = replace(self.spec, z_step_mm=config.z_step_mm)
        if self.spec.task != "lesions" or len(self.spec.labels) != 3:
            raise ModelError(f"model {self.spec.name}: expected a 3-label lesions model, got "
                             f"task {self.spec.task!r} with labels {list(self.spec.labels)}")
        self.predictor = OnnxPredictor(self.spec, config.threads, config.providers)
        from . import representation

        representation.load()  # OpenCV (upsampling), imported before a worker caps memory
        self.batch = max(1, config.batch_slices)
        self.consolidation_hu = config.model_consolidation_hu
        self.name = self.spec.name
        self.version = self.spec.version

    def __call__(self, ct: Volume, lungs: LungMasks) -> Volume:
        if lungs.labels.shape != ct.shape:
            raise ValueError(f"lung labels shape {lungs.labels.shape} does not match the CT "
                             f"grid {ct.shape}")
        t0 = time.perf_counter()
        sp = ct.spacing
        if self.spec.input == "ma20":
            # the recipe's slices are in the canonical in-plane orientation (rows anterior ->
            # posterior, columns right -> left): turn there and back
            from .representation import canonical_inplane, from_canonical, to_canonical

            how = canonical_inplane(ct.direction)
            rc = (sp[2], sp[1]) if how[0] else (sp[1], sp[2])
            lab_c = segment_slices(to_canonical(ct.array, how), rc,
                                   to_canonical(lungs.mask(), how), self.predictor, self.spec,
                                   self.batch, slice_mm=sp[0],
                                   consolidation_hu=self.consolidation_hu)
            labels = np.ascontiguousarray(from_canonical(lab_c, how))
        else:
            labels = segment_slices(ct.array, (sp[1], sp[2]), lungs.mask(), self.predictor,
                                    self.spec, self.batch, slice_mm=sp[0],
                                    consolidation_hu=self.consolidation_hu)
        log.info("lesions: %s %s on %d slices in %.2f s", self.name, self.version, ct.shape[0],
                 time.perf_counter() - t0)
        return ct.with_array(labels)


class LungModelLesionDetector:
    """The lesions of the lung model's infection class (``lesions.detector: lung-model``):
    one network gives the lung region and the infected lung in one pass (``lungs.model`` with
    the labels background, lung, infection).  The infected lung inside the lungs is a lesion;
    its kind follows the density (:func:`kind_by_density`, ``model_consolidation_hu``; where
    that is None all of it is ground glass); per slice, pieces under ``MIN_LESION_MM2`` are
    dropped (``min_lesion_ml`` holds in the measurement)."""

    MIN_LESION_MM2 = 20.0

    def __init__(self, config: LesionsConfig) -> None:
        self.consolidation_hu = config.model_consolidation_hu
        # what it does with the infection (the lung model's hash is the lung stage's)
        self.name = "lung-model-infection"
        self.version = "1.0"

    def __call__(self, ct: Volume, lungs: LungMasks) -> Volume:
        from .errors import ConfigError

        if lungs.infection is None:
            raise ConfigError("lesions.detector lung-model: the lung segmenter "
                              f"({lungs.method}) gives no infection; configure lungs.method "
                              "model with a lung model that has the infection class")
        t0 = time.perf_counter()
        sp = ct.spacing
        inf = (np.asarray(lungs.infection.array) > 0) & lungs.mask()
        labels = infection_lesions(inf, ct.array, (sp[1], sp[2]), self.consolidation_hu)
        log.info("lesions: the infection class of %s on %d slices in %.2f s", lungs.method,
                 ct.shape[0], time.perf_counter() - t0)
        return ct.with_array(np.asarray(labels, dtype=np.uint8))


def infection_lesions(infection: npt.NDArray[np.bool_], hu: npt.NDArray[Any] | None,
                      spacing_rc: tuple[float, float], consolidation_hu: float | None
                      ) -> npt.NDArray[np.uint8]:
    """Lesion labels (K, H, W) of an infected-lung mask already cut to the region: pieces
    under ``LungModelLesionDetector.MIN_LESION_MM2`` per slice dropped, the kind by density
    where ``hu`` and ``consolidation_hu`` are given, else all ground glass."""
    sub = drop_small_2d(infection.astype(np.uint8),
                        LungModelLesionDetector.MIN_LESION_MM2 / (spacing_rc[0] * spacing_rc[1]))
    if consolidation_hu is None or hu is None:
        return sub
    return kind_by_density(sub, hu, spacing_rc, consolidation_hu)
