"""Result datasets -> the archive, each store checked and confirmed.

A result counts as delivered only when the archive confirms it holds the instance
(``Archive.contains``).  Objects are stored in a fixed order (SEG, SR, then key images)
so that the SR's references point at objects that already exist.

With an outbox (the normal case from the command line) every object is first queued on
disk, then delivered; what cannot be delivered now (archive down, store not confirmed)
stays queued and is retried by later runs, and a store refused with a failure status is
recorded with that status.  Without an outbox a failed store raises ArchiveError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset

from .archive import Archive
from .artefacts import OutputRef
from .errors import ArchiveError
from .outbox import Outbox

log = logging.getLogger(__name__)

PENDING_LOCATOR = "outbox:pending"
REFUSED_LOCATOR = "outbox:refused:"


def write_back(
    archive: Archive, objects: Sequence[tuple[str, Dataset]], outbox: Outbox | None = None
) -> tuple[OutputRef, ...]:
    """Store ``(kind, dataset)`` pairs; returns a reference to each object.  With an
    outbox, an object not yet confirmed has the locator ``outbox:pending`` (or
    ``outbox:refused:<status>``)."""
    if outbox is None:
        return tuple(_store_now(archive, kind, ds) for kind, ds in objects)
    sops = [outbox.put(archive.name, kind, ds) for kind, ds in objects]
    delivery = outbox.deliver(archive, sops, due_only=False)
    refs = []
    for kind, ds in objects:
        sop = str(ds.SOPInstanceUID)
        if sop in delivery.delivered:
            loc = delivery.delivered[sop]
        elif sop in delivery.refused:
            loc = REFUSED_LOCATOR + delivery.refused[sop]
        else:
            loc = PENDING_LOCATOR
        refs.append(_ref(kind, ds, loc))
    if delivery.pending or delivery.refused:
        log.warning(
            "%s: %d of %d result objects not delivered (%d waiting in the outbox, %d refused)",
            archive.name, len(delivery.pending) + len(delivery.refused), len(objects),
            len(delivery.pending), len(delivery.refused),
        )
    return tuple(refs)


def _store_now(archive: Archive, kind: str, ds: Dataset) -> OutputRef:
    study_uid = str(ds.StudyInstanceUID)
    sop_uid = str(ds.SOPInstanceUID)
    locator = archive.store(ds)
    if not archive.contains(study_uid, sop_uid):
        raise ArchiveError(f"{archive.name} did not confirm {kind} {sop_uid} after storing it")
    log.info("stored %s %s in %s", kind, sop_uid, archive.name)
    return _ref(kind, ds, locator)


def _ref(kind: str, ds: Dataset, locator: str) -> OutputRef:
    return OutputRef(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        locator=locator,
    )
