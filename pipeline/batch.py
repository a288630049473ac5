"""The nightly run: which studies to process, one row each in the worklist, a summary.

One pathological study never stops the night: an unexpected exception in a study is
recorded as ``failed: internal-error:<Type>`` (a defect to fix, shown as not analysed,
never as negative) and the batch goes on.  A study whose input, configuration and
algorithm are unchanged since its last successful run is skipped unless forced.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from .archive import Archive
from .artefacts import QueryWindow, ScreeningResult, Status, StudyRef
from .errors import ArchiveError
from .ingest import find_studies
from .outbox import Outbox
from .run import Stages, run_study
from .worklist import Worklist

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    archive: str
    studies_found: int = 0
    skipped_unchanged: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    stage_seconds: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0
    outputs_written: int = 0
    window: str = ""
    outbox_delivered: int = 0  # earlier results delivered from the outbox by this run
    outbox_pending: int = 0  # after the run: waiting for the archive
    outbox_refused: int = 0  # after the run: refused by the archive with a failure status

    def as_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "studies_found": self.studies_found,
            "skipped_unchanged": self.skipped_unchanged,
            "by_status": dict(self.by_status),
            "reasons": dict(self.reasons),
            "warnings": dict(self.warnings),
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
            "duration_s": round(self.duration_s, 2),
            "outputs_written": self.outputs_written,
            "window": self.window,
            "outbox": {
                "delivered_from_earlier_runs": self.outbox_delivered,
                "pending": self.outbox_pending,
                "refused": self.outbox_refused,
            },
        }

    def text(self) -> str:
        lines = [
            f"ctscreen run on {self.archive}: {self.studies_found} studies found, "
            f"{self.skipped_unchanged} unchanged since their last run, "
            f"{self.duration_s:.1f} s",
        ]
        for status in (Status.ANALYSED, Status.NOT_ANALYSED, Status.FAILED):
            if self.by_status.get(status.value):
                lines.append(f"  {status.value:<13} {self.by_status[status.value]}")
        for reason, n in self.reasons.most_common():
            lines.append(f"    not analysed because {reason}: {n}")
        for warning, n in self.warnings.most_common():
            lines.append(f"    analysed, but check {warning}: {n}")
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
        return "\n".join(lines)


def run_batch(
    archive: Archive,
    stages: Stages,
    worklist: Worklist,
    since: date | None = None,
    force: bool = False,
    window: QueryWindow | None = None,
    outbox: Outbox | None = None,
) -> BatchSummary:
    """Screen the studies of ``window`` (or on or after ``since``); with an outbox, first
    deliver what earlier runs could not, and queue this run's results through it."""
    t0 = time.perf_counter()
    window = window or QueryWindow.since(since)
    summary = BatchSummary(archive=archive.name, window=str(window))
    if outbox is not None:
        earlier = outbox.deliver(archive)
        summary.outbox_delivered = len(earlier.delivered)
    studies = find_studies(archive, window=window)
    summary.studies_found = len(studies)
    for i, study in enumerate(studies, start=1):
        fp = fingerprint(study, stages)
        if not force and worklist.done(study.study_uid, fp):
            summary.skipped_unchanged += 1
            log.info("[%d/%d] study %s unchanged; skipped", i, len(studies), study.study_uid)
            continue
        log.info(
            "[%d/%d] study %s: %d series, %d instances",
            i,
            len(studies),
            study.study_uid,
            len(study.series),
            study.n_instances,
        )
        result = _screen(study, archive, stages, outbox)
        _prune_replaced(archive, worklist, result)
        worklist.record(result, fp)
        summary.by_status[result.status.value] += 1
        for r in result.reasons:
            summary.reasons[r] += 1
        for w in result.warnings:
            summary.warnings[w] += 1
        summary.stage_seconds.update(result.timings_s)
        summary.outputs_written += sum(  # confirmed by the archive, not waiting in the outbox
            1 for o in result.outputs if not o.locator.startswith("outbox:")
        )
        log.info(
            "[%d/%d] study %s: %s %s",
            i,
            len(studies),
            study.study_uid,
            result.status.value,
            ", ".join(result.reasons),
        )
    if outbox is not None:
        counts = outbox.counts(archive.name)
        summary.outbox_pending = counts["pending"]
        summary.outbox_refused = counts["refused"]
    summary.duration_s = time.perf_counter() - t0
    return summary


def _screen(
    study: StudyRef, archive: Archive, stages: Stages, outbox: Outbox | None
) -> ScreeningResult:
    try:
        return run_study(study, archive, stages, outbox)
    except ArchiveError as e:
        log.error("study %s: archive error: %s", study.study_uid, e)
        code = "archive-error"
    except Exception as e:  # one study's defect must not stop the night
        log.exception("study %s: unexpected %s", study.study_uid, type(e).__name__)
        code = f"internal-error:{type(e).__name__}"
    return ScreeningResult(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        study_date=study.study_date,
        status=Status.FAILED,
        reasons=(code,),
        algorithm_version=stages.algorithm_version,
    )


def _prune_replaced(archive: Archive, worklist: Worklist, result: ScreeningResult) -> None:
    """Remove result objects of an earlier run that this run did not write again."""
    if result.status is Status.FAILED:
        return
    keep = {o.sop_instance_uid for o in result.outputs}
    remove = getattr(archive, "remove", None)
    for old in worklist.outputs(result.study_uid):
        if old.locator.startswith("outbox:"):
            continue  # never delivered: nothing to remove from the archive
        if old.sop_instance_uid not in keep and remove is not None:
            remove(old)
            log.info("removed superseded %s %s", old.kind, old.sop_instance_uid)


def fingerprint(study: StudyRef, stages: Stages) -> str:
    """Changes when the study's CT images, the configuration or the algorithm change.

    Only CT image instances count: the result objects this program writes into the study
    (SR, SEG, Secondary Capture) must not make the next run see a changed study.
    """
    h = hashlib.sha256()
    h.update(stages.algorithm_version.encode())
    h.update(stages.config.analysis_key().encode())
    ct_classes = set(stages.config.selection.sop_classes)
    for s in study.series:
        for inst in s.instances:
            if inst.sop_class_uid in ct_classes:
                h.update(f"{s.series_uid}/{inst.sop_instance_uid}|".encode())
    return h.hexdigest()
