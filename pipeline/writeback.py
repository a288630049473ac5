"""Result datasets -> the archive, each store checked and confirmed.

A result counts as delivered only when the archive confirms it holds the instance
(``Archive.contains``).  Objects are stored in a fixed order (SEG, SR, then key images)
so that the SR's references point at objects that already exist.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset

from .archive import Archive
from .artefacts import OutputRef
from .errors import ArchiveError

log = logging.getLogger(__name__)


def write_back(archive: Archive, objects: Sequence[tuple[str, Dataset]]) -> tuple[OutputRef, ...]:
    """Store ``(kind, dataset)`` pairs; returns a reference to each confirmed instance."""
    refs = []
    for kind, ds in objects:
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        locator = archive.store(ds)
        if not archive.contains(study_uid, sop_uid):
            raise ArchiveError(f"{archive.name} did not confirm {kind} {sop_uid} after storing it")
        log.info("stored %s %s in %s", kind, sop_uid, archive.name)
        refs.append(
            OutputRef(
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=sop_uid,
                series_instance_uid=str(ds.SeriesInstanceUID),
                locator=locator,
            )
        )
    return tuple(refs)
