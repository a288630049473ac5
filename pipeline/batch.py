"""The nightly run: which studies to process, one row each in the worklist, a summary.

Each study goes through the persisted state machine of ``state.py`` (discovered,
retrieved, analysed or not analysed, written, delivered), under a lease, so that a run
killed at any point is resumed by the next one, and two runs on one archive at once
screen each study once.  Studies are screened by a pool (``workers.py``: this process,
N worker processes, or a Dask cluster); this module writes their results, the worklist
row and the state, in that order.

One pathological study never stops the night: a study over a limit is "not analysed:
limit-exceeded:<which>", an unexpected exception is ``failed: internal-error:<Type>`` (a
defect to fix, shown as not analysed, never as negative), and the batch goes on.  A study
whose input, configuration and algorithm are unchanged since it was finished is skipped
unless forced.  Below the free-disk reserve no further study is pulled.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

from .archive import Archive
from .archive.folder import RESULTS_DIR
from .artefacts import OutputRef, QueryWindow, ScreeningResult, Status, StudyRef
from .durable import remove_orphaned_temporaries
from .errors import ArchiveError
from .ingest import find_studies
from .outbox import DELIVERED, Outbox
from .run import Stages, timed
from .state import Claim, Heartbeat, LeaseLost, State, StateStore, new_owner
from .workers import InProcessPool, Outcome, Pool
from .worklist import Worklist
from .writeback import write_back

log = logging.getLogger(__name__)

# Called with the run's summary once the studies are found and after each study it is
# through with (``BatchSummary.done`` of ``studies_found``): a progress display's hook.
Progress = Callable[["BatchSummary"], None]


@dataclass
class BatchSummary:
    archive: str
    studies_found: int = 0
    skipped_unchanged: int = 0
    busy_elsewhere: int = 0  # being screened by another run at the time
    lease_lost: int = 0  # taken over by another run while this one worked on them
    by_status: Counter[str] = field(default_factory=Counter)  # screened by this run
    by_state: Counter[str] = field(default_factory=Counter)  # all found, after the run
    reasons: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    stage_seconds: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0
    outputs_written: int = 0
    window: str = ""
    stopped: str = ""  # why no further study was pulled (e.g. the disk reserve)
    temporaries_removed: int = 0  # left by runs that were killed mid-write
    outbox_delivered: int = 0  # earlier results delivered from the outbox by this run
    outbox_pending: int = 0  # after the run: waiting for the archive
    outbox_refused: int = 0  # after the run: refused by the archive with a failure status

    def add(self, result: ScreeningResult) -> None:
        self.by_status[result.status.value] += 1
        for r in result.reasons:
            self.reasons[r] += 1
        for w in result.warnings:
            self.warnings[w] += 1
        self.stage_seconds.update(result.timings_s)
        self.outputs_written += sum(  # confirmed by the archive, not waiting in the outbox
            1 for o in result.outputs if not o.locator.startswith("outbox:")
        )

    @property
    def screened(self) -> int:
        return sum(self.by_status.values())

    @property
    def done(self) -> int:
        """Studies found that this run is through with: screened, skipped as unchanged,
        left to another run."""
        return self.screened + self.skipped_unchanged + self.busy_elsewhere + self.lease_lost

    def as_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "window": self.window,
            "studies_found": self.studies_found,
            "screened": self.screened,
            "skipped_unchanged": self.skipped_unchanged,
            "busy_elsewhere": self.busy_elsewhere,
            "lease_lost": self.lease_lost,
            "by_status": dict(self.by_status),
            "by_state": dict(self.by_state),
            "reasons": dict(self.reasons),
            "warnings": dict(self.warnings),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "seconds_per_study": (
                round(sum(self.stage_seconds.values()) / self.screened, 2)
                if self.screened else None
            ),
            "duration_s": round(self.duration_s, 2),
            "outputs_written": self.outputs_written,
            "stopped": self.stopped,
            "temporaries_removed": self.temporaries_removed,
            "outbox": {
                "delivered_from_earlier_runs": self.outbox_delivered,
                "pending": self.outbox_pending,
                "refused": self.outbox_refused,
            },
        }

    def text(self) -> str:
        """A short report for the person on the night shift."""
        attention = self.by_status.get(Status.NOT_ANALYSED.value, 0) + self.by_status.get(
            Status.FAILED.value, 0
        )
        lines = [
            f"ctscreen run on {self.archive} ({self.window}): {self.studies_found} studies "
            f"found, {self.screened} screened now, {self.skipped_unchanged} already done, "
            f"in {self.duration_s:.0f} s",
        ]
        if self.stopped:
            lines.append(f"  STOPPED EARLY: {self.stopped}. Free disk space, then run again;")
            lines.append("  the studies not pulled are screened by the next run.")
        for status in (Status.ANALYSED, Status.NOT_ANALYSED, Status.FAILED):
            if self.by_status.get(status.value):
                lines.append(f"  {status.value:<13} {self.by_status[status.value]}")
        for reason, n in self.reasons.most_common():
            lines.append(f"    not analysed because {reason}: {n}")
        for warning, n in self.warnings.most_common():
            lines.append(f"    analysed, but check {warning}: {n}")
        if attention:
            lines.append(
                f"  {attention} studies were not analysed: they are on the worklist as "
                "NOT ANALYSED for a radiologist to read; failed ones are retried next run."
            )
        if self.busy_elsewhere or self.lease_lost:
            lines.append(
                f"  {self.busy_elsewhere + self.lease_lost} studies were being screened by "
                "another ctscreen run at the same time (that run records them)."
            )
        if self.by_state:
            states = ", ".join(f"{k} {v}" for k, v in sorted(self.by_state.items()))
            lines.append(f"  state of the studies found: {states}")
        if self.stage_seconds:
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
            lines.append(f"  time per stage (all studies): {stages}")
        lines.append(f"  result objects written: {self.outputs_written}")
        if self.outbox_delivered or self.outbox_pending or self.outbox_refused:
            lines.append(
                f"  outbox: {self.outbox_delivered} delivered from earlier runs, "
                f"{self.outbox_pending} waiting for the archive, "
                f"{self.outbox_refused} refused (see `ctscreen outbox`)"
            )
        if self.temporaries_removed:
            lines.append(
                f"  removed {self.temporaries_removed} half-written files of an interrupted run"
            )
        return "\n".join(lines)


def run_batch(
    archive: Archive,
    stages: Stages,
    worklist: Worklist,
    since: date | None = None,
    force: bool = False,
    window: QueryWindow | None = None,
    outbox: Outbox | None = None,
    states: StateStore | None = None,
    pool: Pool | None = None,
    progress: Progress | None = None,
) -> BatchSummary:
    """Screen the studies of ``window`` (or on or after ``since``); with an outbox, first
    deliver what earlier runs could not, and queue this run's results through it.

    ``states`` is the per-study state (default: the worklist's SQLite file) and ``pool``
    where studies are screened (default: in this process).  Any number of runs may work
    on one archive at once: each study is screened by the run that holds its lease.
    ``progress`` is called with the summary once the studies are found and after each."""
    t0 = time.perf_counter()
    cfg = stages.config.batch
    window = window or QueryWindow.since(since)
    summary = BatchSummary(archive=archive.name, window=str(window))
    own_states = states is None
    states = states if states is not None else StateStore(worklist.path)
    pool = pool if pool is not None else InProcessPool(stages, archive, states)
    owner = new_owner()
    limits = limits_key(stages)
    folders = _local_folders(archive, worklist, outbox)
    try:
        # the worklist's folder may hold anything (the archive included): only its own level
        for i, folder in enumerate(folders):
            summary.temporaries_removed += remove_orphaned_temporaries(folder, recursive=i > 0)
        if outbox is not None:
            earlier = outbox.deliver(archive)
            summary.outbox_delivered = len(earlier.delivered)
            _confirm_deliveries(states, worklist, outbox, archive)
        studies = find_studies(archive, window=window)
        summary.studies_found = len(studies)
        for study in studies:
            states.discover(study.study_uid)
        tick = progress or _no_progress
        tick(summary)
        with Heartbeat(states, owner, cfg.lease_s):
            _screen_all(studies, stages, archive, worklist, outbox, states, pool, owner,
                        limits, force, folders, summary, tick)
        if outbox is not None:
            _confirm_deliveries(states, worklist, outbox, archive)
            counts = outbox.counts(archive.name)
            summary.outbox_pending = counts["pending"]
            summary.outbox_refused = counts["refused"]
        summary.by_state.update(states.counts(s.study_uid for s in studies))
    finally:
        if own_states:
            states.close()
    summary.duration_s = time.perf_counter() - t0
    return summary


def _screen_all(
    studies: list[StudyRef],
    stages: Stages,
    archive: Archive,
    worklist: Worklist,
    outbox: Outbox | None,
    states: StateStore,
    pool: Pool,
    owner: str,
    limits: str,
    force: bool,
    folders: list[Path],
    summary: BatchSummary,
    tick: Progress,
) -> None:
    """Claim, screen and finish each study, keeping the pool busy."""
    cfg = stages.config.batch
    n = len(studies)
    queue = deque(enumerate(studies, start=1))
    in_flight: dict[str, tuple[int, StudyRef, str]] = {}
    while queue or in_flight:
        while queue and len(in_flight) < pool.capacity and not summary.stopped:
            low = _low_disk(folders, cfg.disk_reserve_mb)
            if low:
                summary.stopped = low
                log.error("%s: no further study is pulled", low)
                break
            i, study = queue.popleft()
            uid = study.study_uid
            fp = fingerprint(study, stages)
            claim = states.claim(uid, fp, limits, owner, cfg.lease_s, force)
            if claim is Claim.DONE:
                summary.skipped_unchanged += 1
                log.info("[%d/%d] study %s unchanged; skipped", i, n, uid)
                tick(summary)
                continue
            if claim is Claim.BUSY:
                summary.busy_elsewhere += 1
                log.info("[%d/%d] study %s is being screened by another run", i, n, uid)
                tick(summary)
                continue
            log.info("[%d/%d] study %s: %d series, %d instances", i, n, uid,
                     len(study.series), study.n_instances)
            study = replace(study, previous_results=_delivered_outputs(
                worklist, outbox, archive.name, uid))
            in_flight[uid] = (i, study, fp)
            pool.submit(study, owner)
        if not in_flight:
            return
        outcome = pool.next_done()
        i, study, fp = in_flight.pop(outcome.study_uid)
        try:
            result = _finish(outcome, fp, archive, worklist, outbox, states, owner)
        except LeaseLost:
            summary.lease_lost += 1
            log.warning("study %s: taken over by another run; its results are that run's",
                        study.study_uid)
            tick(summary)
            continue
        summary.add(result)
        log.info("[%d/%d] study %s: %s %s", i, n, study.study_uid, result.status.value,
                 ", ".join(result.reasons))
        tick(summary)


def _no_progress(summary: BatchSummary) -> None:
    pass


def _finish(
    outcome: Outcome,
    fp: str,
    archive: Archive,
    worklist: Worklist,
    outbox: Outbox | None,
    states: StateStore,
    owner: str,
) -> ScreeningResult:
    """Write a screened study's results, then its worklist row, then its state: what a
    state announces always exists already."""
    uid = outcome.study_uid
    result = outcome.result
    if outcome.lease_lost:
        raise LeaseLost(f"study {uid}: the lease passed to another run")
    if outcome.objects:
        timings = dict(result.timings_s)
        try:
            with timed(timings, "writeback"):
                outputs = write_back(archive, outcome.objects, outbox)
            result = replace(result, outputs=outputs, timings_s=timings)
        except ArchiveError as e:  # no outbox: the archive refused or is unreachable
            log.error("study %s: results not written: %s", uid, e)
            result = replace(result, status=Status.FAILED, reasons=("archive-error",))
    if not states.holds(uid, owner):
        raise LeaseLost(f"study {uid}: the lease passed to another run")
    _prune_replaced(archive, worklist, outbox, result)
    worklist.record(result, fp)
    if result.status is Status.ANALYSED:
        states.advance(uid, State.WRITTEN, owner)
        if all(not o.locator.startswith("outbox:") for o in result.outputs):
            states.advance(uid, State.DELIVERED, owner)
    elif result.status is Status.NOT_ANALYSED:
        states.advance(uid, State.NOT_ANALYSED, owner, result.reasons)
    else:
        states.advance(uid, State.FAILED, owner, result.reasons)
    states.release(uid, owner)
    return result


def _confirm_deliveries(
    states: StateStore, worklist: Worklist, outbox: Outbox, archive: Archive
) -> None:
    """Studies ``written`` whose every result object the outbox has since delivered
    become ``delivered``."""
    delivered = {it.sop_uid for it in outbox.items(archive.name) if it.state == "delivered"}
    for uid in states.in_state(State.WRITTEN):
        outputs = worklist.outputs(uid)
        if outputs and all(o.sop_instance_uid in delivered for o in outputs):
            states.mark_delivered(uid)


def limits_key(stages: Stages) -> str:
    """The limits a "limit-exceeded" study was refused under (it is tried again when they
    change)."""
    b = stages.config.batch
    return repr((b.max_study_seconds, b.max_study_memory_mb, b.max_slices, b.max_series_bytes))


def _local_folders(archive: Archive, worklist: Worklist, outbox: Outbox | None) -> list[Path]:
    """The folders this run writes to: the worklist's first, then the outbox and the results
    of a folder archive."""
    folders = [worklist.path.parent]
    if outbox is not None:
        folders.append(outbox.folder)
    root = getattr(archive, "root", None)
    if isinstance(root, Path):
        folders.append(root / RESULTS_DIR)
    return folders


def _low_disk(folders: list[Path], reserve_mb: int) -> str:
    """``disk-reserve:...`` where a folder's file system has less than the reserve free,
    else an empty string."""
    if reserve_mb <= 0:
        return ""
    for folder in folders:
        probe = folder
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < reserve_mb * 1024**2:
            return (f"disk-reserve: {folder} has {free // 1024**2} MB free, "
                    f"below batch.disk_reserve_mb {reserve_mb}")
    return ""


def _delivered_outputs(worklist: Worklist, outbox: Outbox | None, archive: str,
                       study_uid: str) -> tuple[OutputRef, ...]:
    """The study's result objects of its last run that reached the archive: recorded as
    stored, or delivered by the outbox since (then with the outbox's locator)."""
    refs = worklist.outputs(study_uid)
    queued = [r.sop_instance_uid for r in refs if r.locator.startswith("outbox:")]
    states = outbox.states(archive, queued) if outbox is not None and queued else {}
    out = []
    for ref in refs:
        if not ref.locator.startswith("outbox:"):
            out.append(ref)
        elif states.get(ref.sop_instance_uid, ("", ""))[0] == DELIVERED:
            out.append(replace(ref, locator=states[ref.sop_instance_uid][1]))
    return tuple(out)


def _prune_replaced(
    archive: Archive, worklist: Worklist, outbox: Outbox | None, result: ScreeningResult
) -> None:
    """Retire the result objects of an earlier run that this run did not write again (their
    content is no longer what ctscreen says about the study): those still waiting in the
    outbox are withdrawn from it, so that they are never delivered; those in the archive are
    removed where the archive allows it (the folder archive; a PACS whose archive entry
    configures a delete method), and otherwise named as such in the log (the new SR names
    them as its predecessors either way)."""
    if result.status is Status.FAILED:
        return
    keep = {o.sop_instance_uid for o in result.outputs}
    old = [o for o in worklist.outputs(result.study_uid) if o.sop_instance_uid not in keep]
    if not old:
        return
    if outbox is not None:
        withdrawn = outbox.withdraw(archive.name, [o.sop_instance_uid for o in old])
        if withdrawn:
            log.info("study %s: %d superseded result object(s) withdrawn from the outbox",
                     result.study_uid, withdrawn)
    remove = getattr(archive, "remove", None)
    for ref in _delivered_outputs(worklist, outbox, archive.name, result.study_uid):
        if ref.sop_instance_uid in keep:
            continue
        if remove is None:
            log.warning("superseded %s %s stays in %s: it offers no delete (the new SR names "
                        "it as replaced)", ref.kind, ref.sop_instance_uid, archive.name)
            continue
        try:
            remove(ref)
        except ArchiveError as e:
            log.warning("superseded %s %s could not be removed from %s: %s", ref.kind,
                        ref.sop_instance_uid, archive.name, e)
        else:
            log.info("removed superseded %s %s", ref.kind, ref.sop_instance_uid)


def fingerprint(study: StudyRef, stages: Stages) -> str:
    """Changes when the study's CT images, the analysis configuration, a model file or the
    code that computes results change (``Stages.content_key``).

    Only CT image instances count: the result objects this program writes into the study
    (SR, SEG, Secondary Capture) must not make the next run see a changed study.
    """
    h = hashlib.sha256()
    h.update(stages.algorithm_version.encode())
    h.update(stages.content_key.encode())  # code, models and analysis configuration
    ct_classes = set(stages.config.selection.sop_classes)
    for s in study.series:
        for inst in s.instances:
            if inst.sop_class_uid in ct_classes:
                h.update(f"{s.series_uid}/{inst.sop_instance_uid}|".encode())
    return h.hexdigest()
