"""The Python API: what the batch does, one call at a time, with everything it computes.

    import pipeline
    s = pipeline.screen("path/to/one/study/")      # a folder, a list of datasets or a Volume
    s.result.status, s.result.involved_pct, s.analysis.pattern
    s.lungs.labels.array, s.lesions.array          # masks on the CT grid (s.volume)
    s.save("out/")                                 # the SEG, SR, key images and KOS

``screen`` runs the configured stages exactly as a night's batch does (series selection,
volume, lungs, lesions, report) but writes nothing anywhere until ``save``; a study that
cannot be analysed comes back with ``result.status`` "not-analysed" and its coded reasons.
``segment_lungs`` and ``detect_lesions`` run one stage on a ``Volume``.  ``run_batch``
screens an archive into its worklist as ``ctscreen run`` does (the CLI is argument parsing
over it).  The configured stages are loaded once per configuration and kept (models stay
loaded across calls).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from .archive import Archive, open_named
from .artefacts import (
    LesionAnalysis,
    LungMasks,
    QueryWindow,
    ScreeningResult,
    Status,
    Volume,
)
from .config import Config, load_config
from .errors import CtscreenError, NotAnalysable
from .lesions import analyse
from .lungs import lung_mask_warnings
from .run import Stages, analyse_study, analysed_result

log = logging.getLogger(__name__)

__all__ = ["Screening", "detect_lesions", "nightly", "run_batch", "run_site", "screen",
           "segment_lungs"]


@dataclass(frozen=True, eq=False)
class Screening:
    """One study screened: the result the worklist would show and what it was made from.
    The arrays and datasets are ``None`` / empty where the study was not analysed."""

    result: ScreeningResult
    volume: Volume | None = None  # the CT in HU, with its geometry
    sources: tuple[Dataset, ...] = ()  # the CT headers, slice k of ``volume`` first
    lungs: LungMasks | None = None
    analysis: LesionAnalysis | None = None  # findings, figures, the RSNA category
    datasets: tuple[tuple[str, Dataset], ...] = ()  # ("seg" | "sr" | "sc" | "ko", dataset)

    @property
    def analysed(self) -> bool:
        return self.result.status is Status.ANALYSED

    @property
    def lesions(self) -> Volume | None:
        """The lesion labels (1 ground glass, 2 consolidation) on the CT grid."""
        return None if self.analysis is None else self.analysis.labels

    def save(self, folder: str | Path) -> list[Path]:
        """Write the result objects into ``folder`` (``<kind>-<SOPInstanceUID>.dcm``)."""
        from .durable import write_dataset_atomically

        out = []
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        for kind, ds in self.datasets:
            path = root / f"{kind}-{ds.SOPInstanceUID}.dcm"
            write_dataset_atomically(ds, path)
            out.append(path)
        return out


def screen(
    source: str | Path | Sequence[Dataset] | Volume,
    config: Config | str | Path | None = None,
    *,
    study_uid: str | None = None,
) -> Screening:
    """Screen one study: ``source`` is a folder of DICOM files (any layout), a list of
    datasets, or a ``Volume`` in HU (then there are no source headers and no DICOM results).
    Where the source holds several studies, ``study_uid`` names the one to screen."""
    cfg = _config(config)
    stages = _stages(cfg)
    if isinstance(source, Volume):
        return _screen_volume(source, stages)
    archive: Archive
    if isinstance(source, (str, Path)):
        from .archive.folder import FolderArchive

        if not Path(source).is_dir():
            raise CtscreenError(f"expected a folder of DICOM files, got {str(source)!r}")
        archive = FolderArchive(source)
    else:
        archive = _DatasetArchive(list(source))
    from .ingest import find_studies

    studies = find_studies(archive)
    if study_uid is not None:
        studies = [s for s in studies if s.study_uid == study_uid]
    if len(studies) != 1:
        found = "no study" if not studies else f"{len(studies)} studies"
        raise CtscreenError(
            f"expected one study in the source, found {found}"
            + ("" if study_uid else "; name one with study_uid= or use run_batch")
        )
    done = analyse_study(studies[0], archive, stages)
    return Screening(done.result, done.ct, tuple(done.sources), done.lungs, done.analysis,
                     tuple(done.objects))


def segment_lungs(volume: Volume, config: Config | str | Path | None = None) -> LungMasks:
    """The configured lung segmenter on ``volume`` (raises NotAnalysable, with its code,
    where it finds no lungs)."""
    return _stages(_config(config)).lungs(volume)


def detect_lesions(
    volume: Volume, lungs: LungMasks, config: Config | str | Path | None = None
) -> LesionAnalysis:
    """The configured lesion detector and the measurements on ``volume`` within ``lungs``."""
    stages = _stages(_config(config))
    labels = stages.lesions(volume, lungs)
    return analyse(volume, lungs, labels, stages.config.lesions, stages.lesions.name)


def run_batch(
    archive: str,
    config: Config | str | Path | None = None,
    *,
    worklist: str | Path | None = None,
    since: date | None = None,
    window: QueryWindow | None = None,
    force: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[Any], None] | None = None,
) -> Any:
    """Screen the studies of ``archive`` (a name under the config's ``archives:`` or a
    folder) into its worklist, results written back through the outbox: ``ctscreen run``.
    ``workers`` processes (default ``batch.workers``; 0 screens in this process) or a Dask
    ``scheduler``.  ``progress`` is called with the ``BatchSummary`` so far once the studies
    are found and after each study.  Returns the run's ``BatchSummary``.

    An archive that a site of the config's ``sites:`` lists is screened as that site's (its
    selection rules, its results destination, its studies known by site and UID)."""
    cfg = _config(config)
    site = cfg.site_of(archive)
    if site:
        wl_path = sites_worklist_path(None if worklist is None else str(worklist), cfg)
    else:
        wl_path = worklist_path(archive, None if worklist is None else str(worklist), cfg)
    plan = [(site, [archive], window or QueryWindow.since(since))]
    return _execute(cfg, plan, wl_path, force=force, workers=workers, scheduler=scheduler,
                    progress=progress)[0]


def run_site(
    site: str,
    config: Config | str | Path | None = None,
    *,
    worklist: str | Path | None = None,
    since: date | None = None,
    window: QueryWindow | None = None,
    force: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[Any], None] | None = None,
) -> Any:
    """``ctscreen run --site NAME``: screen the studies of one site of the config's
    ``sites:`` (all its archives) into the sites' worklist.  ``since`` / ``window`` are read
    on the site's clock (its ``timezone``); without them every study is looked at, as
    ``ctscreen run`` does.  Returns the site's ``BatchSummary``."""
    cfg = _config(config)
    sc = cfg.site(site)
    wl_path = sites_worklist_path(None if worklist is None else str(worklist), cfg)
    plan = [(site, list(sc.archives), window or QueryWindow.since(since))]
    return _execute(cfg, plan, wl_path, force=force, workers=workers, scheduler=scheduler,
                    progress=progress)[0]


def nightly(
    config: Config | str | Path | None = None,
    *,
    worklist: str | Path | None = None,
    sites: list[str] | None = None,
    force: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[Any], None] | None = None,
    until: datetime | None = None,
) -> list[Any]:
    """``ctscreen nightly``: every site of the config's ``sites:`` (or those named) in one
    batch: each site's studies of its last ``window_hours`` on its own clock, interleaved
    by weighted round-robin; a site whose archive does not answer is tried again every
    ``batch.site_retry_s`` until ``batch.site_give_up_s`` while the others go on.  The
    night ends ``until`` (default now; a time without a zone is read on each site's own
    clock).  Returns one ``BatchSummary`` per site."""
    from .batch import Retry

    cfg = _config(config)
    if not cfg.sites:
        raise CtscreenError("ctscreen nightly needs sites: in the config (docs/sites.md)")
    names = list(cfg.sites) if not sites else sites
    for name in names:
        cfg.site(name)
    plan = [(name, list(cfg.sites[name].archives), site_window(cfg.sites[name], until))
            for name in names]
    wl_path = sites_worklist_path(None if worklist is None else str(worklist), cfg)
    retry = Retry(cfg.batch.site_retry_s, cfg.batch.site_give_up_s)
    return _execute(cfg, plan, wl_path, force=force, workers=workers, scheduler=scheduler,
                    progress=progress, retry=retry)


def site_window(site: Any, until: datetime | None = None) -> QueryWindow:
    """The site's last ``window_hours`` up to ``until`` (default: now), on the site's clock
    (StudyDate and StudyTime are the hospital's local time), as naive local date-times.  An
    ``until`` without a zone is already a time on the site's clock."""
    from zoneinfo import ZoneInfo

    if until is not None and until.tzinfo is None:
        end = until
    else:
        aware = until or datetime.now(UTC)
        local = (aware.astimezone(ZoneInfo(site.timezone)) if site.timezone
                 else aware.astimezone())
        end = local.replace(tzinfo=None)
    return QueryWindow(end - timedelta(hours=site.window_hours), end)


def _execute(
    cfg: Config,
    plan: list[tuple[str, list[str], QueryWindow]],
    wl_path: Path,
    *,
    force: bool,
    workers: int | None,
    scheduler: str | None,
    progress: Callable[[Any], None] | None,
    retry: Any = None,
) -> list[Any]:
    """Run ``plan`` ((site, archive names, window) each) as one batch: the pool, the
    worklist, the outbox and the state opened once."""
    from .archive import open_archive
    from .batch import SiteRun, run_sites
    from .outbox import Outbox
    from .state import StateStore
    from .workers import DaskPool, InProcessPool, Pool, ProcessPool
    from .worklist import Worklist

    if workers is not None and scheduler:
        raise CtscreenError("give workers or scheduler, not both")
    n = cfg.batch.workers if workers is None else workers
    if n < 0:
        raise CtscreenError(f"expected 0 or more workers, got {n}")
    for _, names, _ in plan:
        for archive in names:
            named = cfg.archives.get(archive)
            if (named is not None and named.kind == "dimse" and named.retrieve == "c-move"
                    and (n > 1 or scheduler)):
                raise CtscreenError(
                    f"archive {archive} retrieves by C-MOVE to one port ({named.move_port}): "
                    "use one worker, or C-GET / DICOMweb for several"
                )
    opened = {name: open_named(name, cfg) for _, names, _ in plan for name in names}
    # Loaded here even where workers screen: a model whose hash does not match stops the
    # run before any study is touched.
    stages = _stages(cfg)
    state_target = cfg.batch.state_url or str(wl_path)
    cfg, views = batch_views(cfg, wl_path)
    base = dataclasses.replace(stages, views=views)
    runs = []
    for site, names, window in plan:
        sc = cfg.sites.get(site) if site else None
        results = (open_archive(sc.results_archive, cfg.archive(sc.results_archive))
                   if sc is not None and sc.results_archive else None)
        runs.append(SiteRun(site, base.for_site(site), [(a, opened[a]) for a in names],
                            window, results, sc.weight if sc is not None else 1))
    with (
        Worklist(wl_path) as wl,
        Outbox(outbox_path(wl_path, cfg), cfg.outbox) as ob,
        StateStore(state_target) as states,
    ):
        pool: Pool
        if scheduler:
            pool = DaskPool(scheduler, cfg, state_target, base.algorithm_version)
        elif n == 0:
            pool = InProcessPool(base, opened, states, {r.site: r.stages for r in runs})
        else:
            pool = ProcessPool(n, cfg, state_target, base.algorithm_version)
        try:
            return run_sites(runs, wl, outbox=ob, states=states, pool=pool, force=force,
                             progress=progress, retry=retry)
        finally:
            pool.close()


def listener(config: Config | str | Path | None = None, *,
             worklist: str | Path | None = None) -> Any:
    """The receiving node of ``ctscreen listen`` (``pipeline.listen.Listener``), wired: its
    stages, its worklist (``worklist``, else ``worklist.path``, else beside the spool
    folder), its outbox, the results archive (``listen.results_archive``) and the web's view
    store.  Call ``serve_forever()`` on it."""
    from .archive import open_archive
    from .listen import Listener

    cfg = _config(config)
    lc = cfg.listen
    results = None
    if lc.results_archive:
        results = open_archive(lc.results_archive, cfg.archive(lc.results_archive))
    spool = Path(lc.spool or "ctscreen-spool").resolve()
    wl_path = Path(worklist) if worklist else (
        Path(cfg.worklist.path) if cfg.worklist.path
        else spool.parent / f"{spool.name}.ctscreen.sqlite"
    )
    cfg, views = batch_views(cfg, wl_path)
    stages = Stages.load(cfg, views).for_site(lc.site)  # its site's rules and view folder
    return Listener(lc, stages, wl_path, results, outbox_path(wl_path, cfg))


def batch_views(config: Config, worklist: Path) -> tuple[Config, Path | None]:
    """The web's view store of a batch (``web.view_store``, else beside ``worklist``),
    created and pruned of views older than ``web.view_keep_days``; and the configuration
    naming it as an absolute path, for worker processes.  None where ``web.store_views`` is
    false."""
    if not config.web.store_views:
        return config, None
    from .web.viewer import prune_views, view_root

    root = view_root(config, worklist).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if config.web.view_keep_days > 0:
        # each site's views live in a folder of its own (Stages.for_site)
        n = sum(prune_views(folder, config.web.view_keep_days)
                for folder in [root, *(root / site for site in config.sites)])
        if n:
            log.info("views: %d older than %g days removed", n, config.web.view_keep_days)
    web = dataclasses.replace(config.web, view_store=str(root))
    return dataclasses.replace(config, web=web), root


def configured_views(config: Config) -> Path | None:
    """The view store a worker process writes: what ``batch_views`` put in its config."""
    if config.web.store_views and config.web.view_store:
        return Path(config.web.view_store)
    return None


def worklist_path(archive: str | None, explicit: str | None, config: Config) -> Path:
    """``explicit``, else the configured path, else ``<archive>.ctscreen.sqlite`` beside a
    folder archive, or ``./ctscreen-<NAME>.sqlite`` for a named archive."""
    if explicit:
        return Path(explicit)
    if config.worklist.path:
        return Path(config.worklist.path)
    if archive is None:
        raise CtscreenError("give --archive or --worklist (or set worklist.path in the config)")
    if archive in config.archives:
        a = config.archives[archive]
        if a.kind != "folder":
            return Path(f"ctscreen-{archive}.sqlite").resolve()
        archive = a.path
    root = Path(archive).resolve()
    return root.with_name(root.name + ".ctscreen.sqlite")


def sites_worklist_path(explicit: str | None, config: Config) -> Path:
    """The worklist of the sites' runs: ``explicit``, else the configured path, else
    ``./ctscreen-sites.sqlite``."""
    if explicit:
        return Path(explicit)
    if config.worklist.path:
        return Path(config.worklist.path)
    return Path("ctscreen-sites.sqlite").resolve()


def outbox_path(worklist: Path, config: Config) -> Path:
    """``outbox.path``, else ``<worklist>.outbox`` beside the worklist."""
    if config.outbox.path:
        return Path(config.outbox.path)
    return worklist.with_name(worklist.name + ".outbox")


# ------------------------------------------------------------------ internals

_LOADED: dict[str, Stages] = {}  # by configuration: models stay loaded across calls


def _config(config: Config | str | Path | None) -> Config:
    if config is None or isinstance(config, Config):
        return config or Config()
    return load_config(config)


def _stages(config: Config) -> Stages:
    key = repr(config)
    if key not in _LOADED:
        if len(_LOADED) >= 2:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = Stages.load(config)
    return _LOADED[key]


def _screen_volume(ct: Volume, stages: Stages) -> Screening:
    base = ScreeningResult(study_uid="", accession_number="", study_date="",
                           status=Status.NOT_ANALYSED, algorithm_version=stages.algorithm_version,
                           n_slices=ct.shape[0])
    try:
        lungs = stages.lungs(ct)
        warnings = lung_mask_warnings(lungs, stages.config.lungs)
        labels = stages.lesions(ct, lungs)
        a = analyse(ct, lungs, labels, stages.config.lesions, stages.lesions.name)
    except NotAnalysable as e:
        return Screening(replace(base, reasons=(e.code,)), volume=ct)
    return Screening(analysed_result(base, a, warnings), volume=ct, lungs=lungs, analysis=a)


class _DatasetArchive:
    """Datasets in memory behind the Archive protocol (for ``screen(list_of_datasets)``)."""

    name = "datasets"
    query_based = False

    def __init__(self, datasets: list[Dataset]) -> None:
        self._datasets = datasets

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        for i, ds in enumerate(self._datasets):
            yield ds, str(i)

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        # copies of the element maps: the screening drops pixel data from what it loads,
        # and the caller's datasets must stay as they were
        # (Dataset(ds) and copy.copy(ds) would share the element map)
        out = []
        for loc in locators:
            ds = self._datasets[int(loc)]
            copy = Dataset()
            for elem in ds:
                copy.add(elem)
            if hasattr(ds, "file_meta"):
                copy.file_meta = ds.file_meta
            out.append(copy)
        return out

    def store(self, ds: Dataset) -> str:
        raise CtscreenError("screen() writes nothing; use Screening.save(folder)")

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        return False

