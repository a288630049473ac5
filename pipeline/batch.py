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
from .errors import ArchiveError, TlsRefused
from .ingest import find_studies
from .outbox import DELIVERED, Outbox
from .run import Stages, timed
from .state import RETRY_REASONS, Claim, Heartbeat, LeaseLost, State, StateStore, new_owner
from .workers import InProcessPool, Job, Outcome, Pool
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
    site: str = ""  # the hospital of a regional centre ('' for a plain run)
    pending: int = 0  # found but left for the next run (its archive stopped answering)
    unreachable: str = ""  # why its archive did not answer when the run gave up on it

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
            "site": self.site,
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
            "pending": self.pending,
            "unreachable": self.unreachable,
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
        where = f"site {self.site} ({self.archive})" if self.site else self.archive
        lines = [
            f"ctscreen run on {where} ({self.window}): {self.studies_found} studies "
            f"found, {self.screened} screened now, {self.skipped_unchanged} already done, "
            f"in {self.duration_s:.0f} s",
        ]
        if self.unreachable:
            lines.append(f"  UNREACHABLE: {self.unreachable}; {self.pending} studies found "
                         "wait for the next run" if self.studies_found else
                         f"  UNREACHABLE: {self.unreachable}; no study could be found: the "
                         "next run tries again")
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


@dataclass
class SiteRun:
    """One site's part of a run: its stages (with its selection rules), the archives its
    studies are found in (``(name, archive)``: workers open an archive by its name), where
    its results go (None: back to the archive each study came from), its query window and
    its weight in the round-robin.  A plain ``ctscreen run`` is one SiteRun of site ''."""

    site: str
    stages: Stages
    sources: list[tuple[str, Archive]]
    window: QueryWindow = field(default_factory=QueryWindow)
    results: Archive | None = None
    weight: int = 1


@dataclass
class _Lane:
    """A SiteRun while the run works on it."""

    run: SiteRun
    worklist: Worklist
    states: StateStore
    summary: BatchSummary
    folders: list[Path]
    outbox: Outbox | None
    queue: deque[tuple[int, StudyRef, str]] = field(default_factory=deque)
    found: list[str] = field(default_factory=list)  # UIDs of the studies found
    ready: bool = False  # its studies are found
    down: str = ""  # why its archive does not answer now ('' : it does)
    retry_at: float = 0.0
    credit: int = 0  # studies it may still take in its turn of the round-robin
    tries: Counter[str] = field(default_factory=Counter)  # archive failures per study

    @property
    def site(self) -> str:
        return self.run.site

    def destination(self, source: str) -> Archive:
        if self.run.results is not None:
            return self.run.results
        return dict(self.run.sources)[source]


@dataclass(frozen=True)
class Retry:
    """``ctscreen nightly``: a site whose archive does not answer is tried again every
    ``every_s`` seconds until ``until_s`` after the start (0: never; a plain run stops at
    the first archive error, as it always has)."""

    every_s: float = 0.0
    until_s: float = 0.0
    # a study whose retrieval fails this often in one night is recorded as failed
    # (archive-error) and tried again by the next run
    max_tries: int = 3


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
    site: str = "",
    source: str | None = None,
) -> BatchSummary:
    """Screen the studies of ``window`` (or on or after ``since``); with an outbox, first
    deliver what earlier runs could not, and queue this run's results through it.

    ``states`` is the per-study state (default: the worklist's SQLite file) and ``pool``
    where studies are screened (default: in this process).  Any number of runs may work
    on one archive at once: each study is screened by the run that holds its lease.
    ``progress`` is called with the summary once the studies are found and after each.
    ``site``: the site the archive belongs to ('' for none); ``source``: the name worker
    processes open the archive by (default ``archive.name``)."""
    run = SiteRun(site, stages, [(source or archive.name, archive)],
                  window or QueryWindow.since(since))
    return run_sites([run], worklist, outbox=outbox, states=states, pool=pool, force=force,
                     progress=progress)[0]


def run_sites(
    runs: list[SiteRun],
    worklist: Worklist,
    outbox: Outbox | None = None,
    states: StateStore | None = None,
    pool: Pool | None = None,
    force: bool = False,
    progress: Progress | None = None,
    retry: Retry | None = None,
) -> list[BatchSummary]:
    """Screen the studies of several sites in one run (``ctscreen nightly``; one site:
    ``ctscreen run``), one summary per site.

    The studies of all sites are interleaved by weighted round-robin, so a site with a
    large backlog cannot starve the others.  With ``retry``, a site whose archive does not
    answer (at the query, or while its studies are retrieved) is set aside and tried again
    later in the run while the other sites go on; what it still holds when ``retry`` gives
    up stays pending (state ``discovered``, or ``failed: archive-error``) for the next run,
    and its summary says ``unreachable``.  Every study is known by its site and UID: a
    copy of one study at two sites is screened, recorded and delivered once for each."""
    t0 = time.perf_counter()
    retry = retry or Retry()
    if len({r.site for r in runs}) != len(runs):
        raise ValueError("expected each site once")
    first = runs[0].stages
    cfg = first.config.batch
    own_states = states is None
    states = states if states is not None else StateStore(worklist.path)
    if pool is None:
        archives = {name: a for r in runs for name, a in r.sources}
        pool = InProcessPool(first, archives, states, {r.site: r.stages for r in runs})
    owner = new_owner()
    lanes = []
    for r in runs:
        lane_wl = worklist.for_site(r.site)
        folders = _local_folders([a for _, a in r.sources] + _destinations(r), lane_wl, outbox)
        lanes.append(_Lane(r, lane_wl, states.for_site(r.site),
                           BatchSummary(archive=", ".join(n for n, _ in r.sources),
                                        window=str(r.window), site=r.site), folders, outbox))
    started = time.monotonic()
    try:
        seen_folders: set[Path] = set()
        for lane in lanes:
            for i, folder in enumerate(lane.folders):
                if folder in seen_folders:
                    continue
                seen_folders.add(folder)
                # the worklist's folder may hold anything (the archive included): only its
                # own level
                lane.summary.temporaries_removed += remove_orphaned_temporaries(
                    folder, recursive=i > 0)
            if outbox is not None:
                for dest in _destinations(lane.run):
                    lane.summary.outbox_delivered += len(outbox.deliver(dest).delivered)
                    _confirm_deliveries(lane.states, lane.worklist, outbox, dest)
            _find(lane, retry, started)
        tick = _ticker(lanes, progress or _no_progress)
        tick()
        with Heartbeat(states, owner, cfg.lease_s):
            _screen_lanes(lanes, pool, owner, force, retry, started, tick)
        for lane in lanes:
            s = lane.summary
            if outbox is not None:
                pending = refused = 0
                for dest in _destinations(lane.run):
                    _confirm_deliveries(lane.states, lane.worklist, outbox, dest)
                    counts = outbox.counts(dest.name)
                    pending += counts["pending"]
                    refused += counts["refused"]
                s.outbox_pending, s.outbox_refused = pending, refused
            s.by_state.update(lane.states.counts(lane.found))
            s.pending = len(lane.queue)
            if lane.down:
                s.unreachable = lane.down
            s.duration_s = time.perf_counter() - t0
    finally:
        if own_states:
            states.close()
    return [lane.summary for lane in lanes]


def _destinations(run: SiteRun) -> list[Archive]:
    """The archives a site's results go to (one each)."""
    if run.results is not None:
        return [run.results]
    out: dict[str, Archive] = {}
    for _, a in run.sources:
        out.setdefault(a.name, a)
    return list(out.values())


def _find(lane: _Lane, retry: Retry, started: float) -> None:
    """Query the lane's archives (the first one holding a study wins); an archive that does
    not answer sets the lane aside until ``retry`` tries it again (or, without retry,
    stops the run as before)."""
    studies: dict[str, tuple[StudyRef, str]] = {}
    for name, archive in lane.run.sources:
        try:
            found = find_studies(archive, window=lane.run.window)
        except ArchiveError as e:
            if not retry.every_s:
                raise
            _set_aside(lane, f"{name}: {e}", retry, started, final=isinstance(e, TlsRefused))
            return
        for study in found:
            studies.setdefault(study.study_uid, (study, name))
    lane.summary.studies_found = len(studies)
    lane.found = list(studies)
    for uid in studies:
        lane.states.discover(uid)
    lane.queue = deque((i, s, name) for i, (s, name) in enumerate(studies.values(), start=1))
    lane.ready, lane.down = True, ""
    if lane.site:
        log.info("site %s: %d studies found", lane.site, len(studies))


def _set_aside(lane: _Lane, why: str, retry: Retry, started: float,
               final: bool = False) -> None:
    """The lane waits for its archive: tried again later in the run, or (``final``: its
    certificates are at fault, which waiting does not mend; or past the deadline) not
    again in this run."""
    now = time.monotonic()
    lane.down = why
    deadline = started + retry.until_s
    lane.retry_at = min(now + retry.every_s, deadline)  # the last try at the deadline
    if now >= deadline or final:
        lane.retry_at = float("inf")  # given up for this run
        log.error("site %s: its archive does not answer (%s); its studies wait for the "
                  "next run", lane.site or "-", why)
    else:
        log.warning("site %s: its archive does not answer (%s); tried again in %.0f s, the "
                    "other sites go on", lane.site or "-", why, retry.every_s)


def _ticker(lanes: list[_Lane], progress: Progress) -> Callable[[], None]:
    """The progress hook with one summary: the only site's, or the sum of the sites'."""
    if len(lanes) == 1:
        return lambda: progress(lanes[0].summary)

    def tick() -> None:
        total = BatchSummary(archive="all sites")
        for lane in lanes:
            s = lane.summary
            total.studies_found += s.studies_found
            total.skipped_unchanged += s.skipped_unchanged
            total.busy_elsewhere += s.busy_elsewhere
            total.lease_lost += s.lease_lost
            total.by_status.update(s.by_status)
        progress(total)

    return tick


def _next_lane(lanes: list[_Lane], turn: list[int]) -> _Lane | None:
    """The lane whose study comes next, by weighted round-robin over the lanes that have
    studies and an archive that answers (``turn[0]``: the index of the lane whose turn it
    is)."""
    open_ = [i for i, lane in enumerate(lanes) if lane.queue and not lane.down]
    if not open_:
        return None
    cur = turn[0]
    if cur in open_ and lanes[cur].credit > 0:
        lanes[cur].credit -= 1
        return lanes[cur]
    for k in range(1, len(lanes) + 1):
        i = (cur + k) % len(lanes)
        if i in open_:
            turn[0] = i
            lanes[i].credit = lanes[i].run.weight - 1
            return lanes[i]
    return None  # pragma: no cover - open_ is not empty


def _screen_lanes(
    lanes: list[_Lane],
    pool: Pool,
    owner: str,
    force: bool,
    retry: Retry,
    started: float,
    tick: Callable[[], None],
) -> None:
    """Claim, screen and finish the lanes' studies, keeping the pool busy; lanes set aside
    are tried again when their time comes, while the others go on."""
    in_flight: dict[tuple[str, str], tuple[_Lane, int, StudyRef, str, str]] = {}
    turn = [-1]
    stopped = ""
    while True:
        now = time.monotonic()
        for lane in lanes:
            if lane.down and now >= lane.retry_at:
                log.info("site %s: trying its archive again", lane.site or "-")
                if lane.ready:
                    lane.down = ""  # its studies are known: the next retrieval tells
                else:
                    _find(lane, retry, started)
                tick()
        while len(in_flight) < pool.capacity and not stopped:
            chosen = _next_lane(lanes, turn)
            if chosen is None:
                break
            lane = chosen
            cfg = lane.run.stages.config.batch
            low = _low_disk(lane.folders, cfg.disk_reserve_mb)
            if low:
                stopped = low
                for each in lanes:
                    each.summary.stopped = low
                log.error("%s: no further study is pulled", low)
                break
            i, study, source = lane.queue.popleft()
            uid = study.study_uid
            n = lane.summary.studies_found
            where = f"site {lane.site} " if lane.site else ""
            fp = fingerprint(study, lane.run.stages)
            claim = lane.states.claim(uid, fp, limits_key(lane.run.stages), owner, cfg.lease_s,
                                      force)
            if claim is not Claim.CLAIMED:
                if claim is Claim.DONE:
                    lane.summary.skipped_unchanged += 1
                    log.info("%s[%d/%d] study %s unchanged; skipped", where, i, n, uid)
                else:
                    lane.summary.busy_elsewhere += 1
                    log.info("%s[%d/%d] study %s is being screened by another run", where, i,
                             n, uid)
                lane.credit += 1  # a study skipped costs its site no turn
                tick()
                continue
            log.info("%s[%d/%d] study %s: %d series, %d instances", where, i, n, uid,
                     len(study.series), study.n_instances)
            dest = lane.destination(source)
            study = replace(study, previous_results=_delivered_outputs(
                lane.worklist, lane.outbox, dest.name, uid))
            in_flight[(lane.site, uid)] = (lane, i, study, fp, source)
            pool.submit(Job(study, owner, lane.site, source))
        if not in_flight:
            waiting = [lane.retry_at for lane in lanes
                       if lane.down and lane.retry_at != float("inf")]
            if stopped or not waiting:
                return
            time.sleep(max(0.0, min(min(waiting) - time.monotonic(), 5.0)))
            continue
        outcome = pool.next_done()
        lane, i, study, fp, source = in_flight.pop((outcome.site, outcome.study_uid))
        if _archive_failed(outcome, lane, retry):
            lane.tries[study.study_uid] += 1
            if lane.tries[study.study_uid] < retry.max_tries:
                # the archive let us down: the study waits in its lane for the next try
                lane.states.advance(study.study_uid, State.FAILED, owner,
                                    outcome.result.reasons)
                lane.states.release(study.study_uid, owner)
                lane.queue.appendleft((i, replace(study, previous_results=()), source))
                _set_aside(lane, f"{source}: {', '.join(outcome.result.reasons)}", retry,
                           started)
                continue
        try:
            result = _finish(outcome, fp, lane.destination(source), lane.worklist,
                             lane.outbox, lane.states, owner)
        except LeaseLost:
            lane.summary.lease_lost += 1
            log.warning("study %s: taken over by another run; its results are that run's",
                        study.study_uid)
            tick()
            continue
        lane.summary.add(result)
        log.info("%s[%d/%d] study %s: %s %s", f"site {lane.site} " if lane.site else "", i,
                 lane.summary.studies_found, study.study_uid, result.status.value,
                 ", ".join(result.reasons))
        tick()


def _archive_failed(outcome: Outcome, lane: _Lane, retry: Retry) -> bool:
    """A study that failed because its archive did not deliver, in a run that retries."""
    return bool(retry.every_s) and not outcome.lease_lost and any(
        r.split(":")[0] in RETRY_REASONS for r in outcome.result.reasons)


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


def _local_folders(archives: list[Archive], worklist: Worklist,
                   outbox: Outbox | None) -> list[Path]:
    """The folders this run writes to: the worklist's first, then the outbox and the results
    of folder archives."""
    folders = [worklist.path.parent]
    if outbox is not None:
        folders.append(outbox.folder)
    for archive in archives:
        root = getattr(archive, "root", None)
        if isinstance(root, Path) and root / RESULTS_DIR not in folders:
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
