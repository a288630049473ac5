"""Kinds of archive behind one protocol.

An archive yields header datasets (no pixel data) with a locator, loads whole series for
analysis, and stores result objects.  Everything that touches files or the network lives
behind this protocol; the stages never do I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from pydicom.dataset import Dataset


class Archive(Protocol):
    @property
    def name(self) -> str:
        """A short label for logs and the worklist (never a credential)."""
        ...

    def headers(self) -> Iterator[tuple[Dataset, str]]:
        """Every instance's header dataset and its locator; pixel data not read."""
        ...

    def load(self, locators: Sequence[str]) -> list[Dataset]:
        """Whole datasets (with pixel data) for ``locators``, in that order."""
        ...

    def store(self, ds: Dataset) -> str:
        """Store one dataset, replacing an instance with the same SOP Instance UID;
        returns its locator once the archive has it."""
        ...

    def contains(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether the archive confirms it holds this instance (delivery check)."""
        ...
