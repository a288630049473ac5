"""Every setting, as frozen dataclasses, loaded from YAML with unknown keys refused.

The defaults here *are* the embedded default configuration; ``configs/default.yaml``
spells out the same values (a test keeps the two equal).  A site's file only needs the
keys it changes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class SelectionConfig:
    """Rules that pick the series to analyse (all data, no code)."""

    sop_classes: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.2",)  # CT Image Storage
    modalities: tuple[str, ...] = ("CT",)
    required_image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    excluded_image_type: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM")
    max_slice_thickness_mm: float = 1.5
    axial_tolerance_deg: float = 15.0
    min_slices: int = 40
    min_coverage_mm: float = 150.0
    # BodyPartExamined values that mean "not a chest"; an empty or unlisted value passes
    # and the lung stage decides (it refuses a series without lungs).
    non_chest_body_parts: tuple[str, ...] = (
        "HEAD",
        "BRAIN",
        "SKULL",
        "NECK",
        "ABDOMEN",
        "PELVIS",
        "HIP",
        "KNEE",
        "LEG",
        "ANKLE",
        "FOOT",
        "ARM",
        "ELBOW",
        "HAND",
        "WRIST",
        "SHOULDER",
        "EXTREMITY",
        "CSPINE",
        "LSPINE",
        "HEART",
    )
    # Regular expressions matched against ConvolutionKernel; a series whose kernel matches
    # an earlier pattern is preferred (lung / sharp kernels first).
    preferred_kernels: tuple[str, ...] = (
        r"(?i)lung",
        r"^(?i:B[l]?[6-8]\d|Br[5-9]\d|Bl\d\d|I[57]0)",
        r"^(?i:FC5\d|FC8\d)",
        r"^(?i:YA|YB|YC|L|LUNG)$",
        r"^(?i:D|E|C)$",
    )


@dataclass(frozen=True)
class VolumeConfig:
    gap_tolerance_mm: float = 0.1  # a step may exceed the median by max(this, fraction)
    gap_tolerance_fraction: float = 0.05
    max_tilt_deg: float = 0.5  # slice stack vs. slice normal; more is refused (gantry tilt)
    hu_min: int = -1024  # padding outside the reconstruction circle is set to this
    hu_max: int = 3071


@dataclass(frozen=True)
class LungsConfig:
    method: str = "classical"
    min_lung_volume_ml: float = 500.0  # less, both lungs together: "no-lungs-found"
    working_spacing_mm: float = 1.5  # in-plane blocks of about this size (labels upsampled)
    air_threshold_hu: float = -400.0  # lung parenchyma and airways are below
    min_component_ml: float = 50.0  # an air component smaller than this is never a lung
    airway_threshold_hu: float = -900.0  # trachea seed; growth tries this and lower
    airway_max_ml: float = 250.0  # a grown airway larger than this has leaked into the lung
    trachea_min_area_mm2: float = 40.0
    trachea_max_area_mm2: float = 900.0
    trachea_max_offset_mm: float = 40.0  # from the body's midline (LPS x)
    # Convex-hull repair of dense pathology against the pleura (per slice, per lung)
    pleural_max_depth_mm: float = 40.0  # deeper hull additions are anatomy (heart, liver)
    pleural_max_area_fraction: float = 0.25  # of the slice's lung area
    pleural_min_mean_hu: float = -500.0  # hull additions must be dense (pathology or wall)
    mediastinal_margin: float = 0.0  # medial by more than this x lung width: mediastinum
    # Mirror recovery of large dense regions (lobar consolidation / collapse), see lungs.py
    mirror_recovery: bool = True
    bone_min_hu: float = 200.0  # bone, for the mid-sagittal symmetry plane
    mirror_max_yaw_deg: float = 10.0  # plane normal searched within this of LPS x
    mirror_deficit_ratio: float = 0.5  # a slice's lung below this x its mirrored twin: deficient
    mirror_extend_ratio: float = 0.8  # ... and the run of slices under this x around it
    dense_max_hu: float = 150.0  # recovered tissue is between air_threshold_hu and this ...
    fat_min_hu: float = -200.0  # ... and not fat (a band that survives an in-plane opening)
    fat_max_hu: float = -30.0
    mirror_min_ml: float = 10.0  # smaller recovered pieces are asymmetry, not pathology
    # QA of the final mask (lung_mask_warnings): implausible results are flagged, not guessed
    qa_min_side_ratio: float = 0.5  # one lung under this x the other: "lung-asymmetry"
    qa_min_total_ml: float = 2000.0  # both lungs together under this: "lung-volume-low"


@dataclass(frozen=True)
class LesionsConfig:
    detector: str = "density"
    max_reported_findings: int = 20  # the largest N are reported one by one
    # Study-level pattern: involvement of both lungs together, in percent.
    present_min_pct: float = 1.0
    indeterminate_min_pct: float = 0.1
    # Density detector (HU bands after smoothing; see pipeline/lesions.py)
    working_spacing_mm: float = 1.5  # in-plane blocks of about this size
    smoothing_sigma_mm: float = 1.0
    ggo_min_hu: float = -750.0  # ground glass from here ...
    consolidation_min_hu: float = -300.0  # ... to here; consolidation from here ...
    consolidation_max_hu: float = 100.0  # ... to here; denser is calcification or contrast
    consolidation_edge_hu: float = -450.0  # a consolidation's partial-volume rim joins it
    vessel_opening_mm: float = 3.5  # cube half-side a: removes tubes of radius < a*sqrt(2)
    regrow_voxels: int = 1  # lesions grow back this many voxels after the opening
    ggo_shell_opening_mm: float = 1.5  # removes thin GGO shells around consolidation
    edge_erosion_mm: float = 3.0  # lesions must reach this deep into the lung
    min_lesion_ml: float = 0.3


@dataclass(frozen=True)
class ReportConfig:
    key_images: int = 3
    window_center: float = -600.0
    window_width: float = 1500.0
    manufacturer: str = "ctscreen project"
    institution_name: str = ""


@dataclass(frozen=True)
class WorklistConfig:
    # SQLite file; empty means "<archive>.ctscreen.sqlite" beside the archive folder.
    path: str = ""


@dataclass(frozen=True)
class Config:
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    lungs: LungsConfig = field(default_factory=LungsConfig)
    lesions: LesionsConfig = field(default_factory=LesionsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)


def load_config(path: str | Path | None = None) -> Config:
    """The embedded defaults, overridden by the YAML file at ``path`` where given."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    return from_mapping(Config, raw, where=p.name)


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return typing.cast(T, cls(**kwargs))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(typing.cast(type, tp), value, where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")
