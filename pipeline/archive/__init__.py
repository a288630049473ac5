"""Kinds of archive behind one protocol.

An archive yields header datasets (no pixel data) with a locator, loads whole series for
analysis, and stores result objects.  Everything that touches files or the network lives
behind this protocol; the stages never do I/O.

Superseded results are removed by ``remove(ref)`` where an archive has one (the folder
archive; an Orthanc with ``delete: orthanc-rest``, see ``orthanc_rest.py``).

Kinds: ``folder`` (any tree of DICOM files), ``dimse`` (C-FIND, C-GET/C-MOVE, C-STORE with
pynetdicom) and ``dicomweb`` (QIDO-RS, WADO-RS, STOW-RS with dicomweb-client).  A DICOM
archive answers queries, not files: it looks at studies of the query window only, asks
for their series first, and reads instance headers of the CT image series only, so a
night's batch never pulls headers or pixels of series that selection cannot use.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset

from ..artefacts import QueryWindow

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..config import ArchiveConfig, Config


class Archive(Protocol):
    @property
    def name(self) -> str:
        """A short label for logs and the worklist (never a credential)."""
        ...

    @property
    def query_based(self) -> bool:
        """True where headers come from a query (C-FIND, QIDO, metadata) rather than files:
        they carry no pixel data, so its presence is judged from Rows/Columns."""
        ...

    def headers(self, window: QueryWindow | None = None) -> Iterator[tuple[Dataset, str]]:
        """Every candidate instance's header dataset and its locator; pixel data not read.
        A query-based archive may restrict itself to ``window`` and to CT image series."""
        ...

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        """Whole datasets (with pixel data) for ``locators``, in that order.  Raises
        NotAnalysable("incomplete-retrieval:<got>/<expected>") when fewer arrive."""
        ...

    def store(self, ds: Dataset) -> str:
        """Store one dataset, replacing an instance with the same SOP Instance UID;
        returns its locator once the archive has it.  Raises StoreRefused when the archive
        answers with a failure status, ArchiveUnavailable when it cannot be reached."""
        ...

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether the archive confirms it holds this instance (delivery check)."""
        ...


def open_archive(name: str, config: ArchiveConfig) -> Archive:
    """The archive described by ``config`` (one entry of the config's ``archives:``)."""
    archive: Any
    if config.kind in ("dimse", "dicomweb"):
        if config.kind == "dimse":
            from .dimse import DimseArchive

            archive = DimseArchive(name, config)
        else:
            from .dicomweb import DicomWebArchive

            archive = DicomWebArchive(name, config)
        if config.delete == "orthanc-rest":  # how superseded results are removed
            from .orthanc_rest import OrthancRestDelete

            archive.remove = OrthancRestDelete(archive.name, config)
        return typing.cast(Archive, archive)
    from .folder import FolderArchive

    return FolderArchive(config.path)


def open_named(name: str, config: Config) -> Archive:
    """An archive named in the config's ``archives:``, or a folder given by its path."""
    from pathlib import Path

    from ..errors import CtscreenError
    from .folder import FolderArchive

    if name in config.archives:
        return open_archive(name, config.archives[name])
    if Path(name).is_dir():
        return FolderArchive(name)
    known = ", ".join(sorted(config.archives)) or "none configured"
    raise CtscreenError(
        f"expected an archive named in the config ({known}) or a folder, got {name!r}"
    )


def locator(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The locator of an instance in a DICOM archive: its three UIDs."""
    return f"{study_uid}/{series_uid}/{sop_uid}"


def split_locator(loc: str) -> tuple[str, str, str]:
    parts = loc.split("/")
    if len(parts) != 3 or not all(parts):
        from ..errors import ArchiveError

        raise ArchiveError(f"expected a locator STUDY/SERIES/SOP (three UIDs), got {loc[:120]!r}")
    return parts[0], parts[1], parts[2]


def retrieve_series(
    name: str,
    method: str,
    locators: Sequence[str],
    retrieve: Callable[[str, str], Iterable[Dataset]],
    attempts: int,
) -> list[Dataset]:
    """The instances named by ``locators`` (one series), in that order, fetched with
    ``retrieve(study_uid, series_uid)`` up to ``attempts`` times.  Fewer instances than the
    query announced after the last attempt: not analysed, ``incomplete-retrieval:N/M``."""
    from ..errors import ArchiveError, NotAnalysable
    from .folder import drop_unparseable

    if not locators:
        return []
    keys = [split_locator(loc) for loc in locators]
    study_uid, series_uid, _ = keys[0]
    if any((k[0], k[1]) != (study_uid, series_uid) for k in keys):
        raise ArchiveError(f"{name}: expected locators of one series, got several")
    wanted = {k[2] for k in keys}
    got: dict[str, Dataset] = {}
    for attempt in range(1, max(1, attempts) + 1):
        t0 = time.perf_counter()
        for ds in retrieve(study_uid, series_uid):
            drop_unparseable(ds, f"{name} instance")
            sop = str(ds.SOPInstanceUID)
            if sop in wanted:
                got[sop] = ds
        log.info(
            "%s: retrieved %d/%d instances of series %s by %s in %.1f s (attempt %d)",
            name, len(got), len(wanted), series_uid, method, time.perf_counter() - t0, attempt,
        )
        if len(got) == len(wanted):
            return [got[k[2]] for k in keys]
    raise NotAnalysable(
        f"incomplete-retrieval:{len(got)}/{len(wanted)}",
        f"{name} delivered {len(got)} of the {len(wanted)} instances the query announced",
    )
