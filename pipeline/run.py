"""run_study(): the stages in order, nothing else.

    archive -> selection -> volume -> lungs -> lesions -> report -> writeback -> archive

Each stage is a function of its inputs; a stage that cannot go on raises
``NotAnalysable`` with a coded reason, which becomes a "not analysed" result here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from . import ALGORITHM_NAME, __version__
from .archive import Archive
from .artefacts import (
    LesionAnalysis,
    LungMasks,
    ScreeningResult,
    SeriesRef,
    Status,
    StudyRef,
    Volume,
)
from .config import BatchConfig, Config
from .errors import ConfigError, NotAnalysable
from .lesions import LesionDetector, analyse, detector_for
from .lungs import LungSegmenter, lung_mask_warnings, segmenter_for
from .outbox import Outbox
from .report import build_report
from .selection import select_series
from .state import State
from .volume import build_volume
from .writeback import write_back

log = logging.getLogger(__name__)

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float and Double Float Pixel Data


@dataclass(frozen=True)
class Stages:
    """The configured stages, built once per process (models stay loaded across studies)."""

    config: Config
    lungs: LungSegmenter
    lesions: LesionDetector
    # the web's per-study view store (pipeline/web/viewer.py) the batch writes; None: none
    views: Path | None = None

    @property
    def algorithm_version(self) -> str:
        """The package version with each stage's method and version (lungs, lesions)."""
        return (f"{__version__}+{self.lungs.name}-{self.lungs.version}"
                f"+{self.lesions.name}-{self.lesions.version}")

    @cached_property
    def content_key(self) -> str:
        """sha256 of everything a result's content depends on besides the CT itself: the
        package version, the code of the modules that compute and encode results, each
        stage's method and version, each model file's sha256 (and the lung cross-check's
        method), and the analysis configuration.  It enters the fingerprint that decides a
        re-screen and every output UID (``pipeline/report/uids.py: content_identity``)."""
        doc = {
            "package": __version__,
            "code": code_digest(),
            "lungs": stage_identity(self.lungs),
            "lesions": stage_identity(self.lesions),
            "analysis": self.config.analysis_key(),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def for_site(self, site: str) -> Stages:
        """These stages (the same models) as the site ``site`` runs them: its selection
        rules, its own folder of the view store.  Itself for the empty name."""
        if not site:
            return self
        views = None if self.views is None else self.views / site
        return replace(self, config=self.config.for_site(site), views=views)

    @classmethod
    def load(cls, config: Config, views: Path | None = None) -> Stages:
        lungs = segmenter_for(config.lungs)
        if config.lesions.detector == "lung-model" and not getattr(lungs, "infection", False):
            raise ConfigError(
                "lesions.detector lung-model: expected lungs.method model with a lung model "
                f"that has the infection class, got {config.lungs.method!r} "
                f"({config.lungs.model if config.lungs.method == 'model' else 'no model'})")
        return cls(config, lungs, detector_for(config.lesions), views)


# The modules whose code decides what a result says: a change to any of them changes
# ``Stages.content_key`` (and so re-screens and writes new UIDs), whether or not someone
# remembered to bump a stage version.  Transport (archives, outbox, batch) is not here.
# An entry ending in "/" is a package: every *.py file under it counts.
CONTENT_MODULES = ("artefacts.py", "volume.py", "lungs.py", "lesions.py", "representation.py",
                   "inference.py", "report/", "selection.py")


def content_files() -> list[str]:
    """``CONTENT_MODULES`` with each package expanded to its ``*.py`` files, sorted, as
    names relative to ``pipeline/`` ("report/build.py")."""
    here = Path(__file__).parent
    out: list[str] = []
    for name in CONTENT_MODULES:
        if name.endswith("/"):
            out += sorted(p.relative_to(here).as_posix() for p in (here / name).rglob("*.py"))
        else:
            out.append(name)
    return out


def code_digest() -> str:
    """sha256 over the source of ``CONTENT_MODULES`` (as installed; see ``content_files``)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in content_files():
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()


def stage_identity(stage: Any) -> dict[str, Any]:
    """A stage's method, version and model file hash (and its cross-check's, where any)."""
    out: dict[str, Any] = {"name": stage.name, "version": stage.version}
    spec = getattr(stage, "spec", None)
    if spec is not None:
        out["model_sha256"] = spec.sha256
        out["model_z_step_mm"] = spec.z_step_mm
        # what model.yaml says about pre- and post-processing changes the output as much as
        # the weights do (an edited min_lesion_ml must not keep the old UIDs)
        out["model_processing"] = {
            "task": spec.task, "labels": list(spec.labels), "input": spec.input,
            "spacing_mm": spec.spacing_mm, "hu_window": list(spec.hu_window),
            "pad_multiple": spec.pad_multiple, "margin_mm": spec.margin_mm,
            "min_lesion_mm2": spec.min_lesion_mm2, "min_lesion_ml": spec.min_lesion_ml,
            "network_size": spec.network_size}
    cross = getattr(stage, "cross", None)
    if cross is not None:
        out["cross_check"] = stage_identity(cross)
    return out


def run_study(
    study: StudyRef, archive: Archive, stages: Stages, outbox: Outbox | None = None
) -> ScreeningResult:
    """Screen one study and write its results back (through ``outbox`` where given: what
    the archive cannot take now waits there); never raises NotAnalysable."""
    result, objects = screen_study(study, archive, stages)
    if not objects:
        return result
    timings = dict(result.timings_s)
    with timed(timings, "writeback"):
        outputs = write_back(archive, objects, outbox)
    return replace(result, outputs=outputs, timings_s=timings)


def screen_study(
    study: StudyRef,
    archive: Archive,
    stages: Stages,
    progress: Callable[[State], None] = lambda _state: None,
) -> tuple[ScreeningResult, list[tuple[str, Dataset]]]:
    """Everything up to the result objects (not yet written): the result and the
    ``(kind, dataset)`` pairs to store, none where the study was not analysed.
    ``progress`` hears of the ``retrieved`` and ``analysed`` transitions."""
    done = analyse_study(study, archive, stages, progress)
    if stages.views is not None:
        store_view(stages.views, done, stages.config)
    return done.result, done.objects


def store_view(root: Path, done: StudyAnalysis, config: Config) -> None:
    """Keep the web's view of an analysed study (slices, masks, key images), or remove an
    old one where the study is not analysed now.  Stored before the worklist records the
    study, so a row never shows without its view.  A failure to store costs the web page
    its images, never the study its result: it is logged and the night goes on."""
    from .web.viewer import remove_view, save_view

    uid = done.result.study_uid
    try:
        if done.ct is None:
            remove_view(root, uid)
        else:
            save_view(root, done, done.objects, config.web.view_max_px,
                      window=(config.report.window_center, config.report.window_width))
    except (OSError, ValueError) as e:
        log.warning("study %s: its web view was not stored (%s: %s)", uid, type(e).__name__, e)


@dataclass(frozen=True, eq=False)
class StudyAnalysis:
    """What ``analyse_study`` made: the result, the objects to store, and (where the study
    was analysed) the volume, its source headers, the lungs and the lesion analysis."""

    result: ScreeningResult
    objects: list[tuple[str, Dataset]]
    ct: Volume | None = None
    sources: list[Dataset] = field(default_factory=list)
    lungs: LungMasks | None = None
    analysis: LesionAnalysis | None = None


def analyse_study(
    study: StudyRef,
    archive: Archive,
    stages: Stages,
    progress: Callable[[State], None] = lambda _state: None,
) -> StudyAnalysis:
    """``screen_study``, keeping what it computed (the Python API's ``screen``)."""
    cfg = stages.config
    timings: dict[str, float] = {}
    base = ScreeningResult(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        study_date=study.study_date,
        status=Status.NOT_ANALYSED,
        algorithm_version=stages.algorithm_version,
        timings_s=timings,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
    )
    selection = select_series(study, cfg.selection)
    series = selection.chosen
    if series is None:
        return StudyAnalysis(replace(base, reasons=selection.reasons), [])
    base = replace(
        base,
        series_uid=series.series_uid,
        series_description=series.description,
        n_slices=len(series.instances),
    )
    try:
        check_size_limits(series, cfg.batch)
        with timed(timings, "read"):
            datasets = archive.load([h.locator for h in series.instances])
        progress(State.RETRIEVED)
        with timed(timings, "volume"):
            ct, sources = build_volume(datasets, cfg.volume)
        del datasets
        for ds in sources:  # the volume holds the pixels now; the report needs headers only
            for tag in PIXEL_DATA_TAGS:
                if tag in ds:
                    del ds[tag]
        with timed(timings, "lungs"):
            lungs = stages.lungs(ct)
            warnings = lung_mask_warnings(lungs, cfg.lungs)
        with timed(timings, "lesions"):
            labels = stages.lesions(ct, lungs)
            analysis = analyse(ct, lungs, labels, cfg.lesions, stages.lesions.name)
    except NotAnalysable as e:
        log.info("study %s not analysed: %s", study.study_uid, e)
        return StudyAnalysis(replace(base, reasons=(e.code,)), [])
    progress(State.ANALYSED)
    with timed(timings, "report"):
        objects = build_report(
            ct,
            sources,
            lungs,
            analysis,
            cfg.report,
            algorithm_name=ALGORITHM_NAME,
            algorithm_version=stages.algorithm_version,
            content_key=stages.content_key,
            previous=study.previous_results,
        )
    result = analysed_result(base, analysis, warnings)
    written: list[tuple[str, Dataset]] = [("seg", objects.seg), ("sr", objects.sr)]
    written += [("sc", d) for d in objects.key_images]
    written.append(("ko", objects.kos))
    return StudyAnalysis(result, written, ct, list(sources), lungs, analysis)


def analysed_result(base: ScreeningResult, analysis: LesionAnalysis,
                    warnings: tuple[str, ...]) -> ScreeningResult:
    """``base`` (the study's identity) with the figures of an analysed study."""
    right, left = analysis.lungs
    return replace(
        base,
        status=Status.ANALYSED,
        warnings=warnings,
        lung_volume_ml=(right.volume_ml, left.volume_ml),
        involved_pct=analysis.involved_pct,
        severity_score=analysis.severity_score,
        severity_max=analysis.severity_max,
        suspicion=analysis.suspicion,
        pattern=analysis.pattern,
        n_findings=analysis.n_findings_total,
    )


def check_size_limits(series: SeriesRef, limits: BatchConfig) -> None:
    """Refuse a series larger than the per-study limits, from its headers alone (before
    any pixel data is fetched): ``limit-exceeded:slices`` or ``limit-exceeded:bytes``."""
    n = len(series.instances)
    if limits.max_slices and n > limits.max_slices:
        raise NotAnalysable(
            "limit-exceeded:slices", f"{n} slices; batch.max_slices is {limits.max_slices}"
        )
    # CT pixels are stored in 16 bits (the volume stage refuses anything else)
    size = sum(
        (h.rows or 0) * (h.columns or 0) * max(h.number_of_frames, 1) * 2
        for h in series.instances
    )
    if limits.max_series_bytes and size > limits.max_series_bytes:
        raise NotAnalysable(
            "limit-exceeded:bytes",
            f"{size} bytes of pixels; batch.max_series_bytes is {limits.max_series_bytes}",
        )


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 3)
