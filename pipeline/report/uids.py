"""Content identity and output UIDs: every UID of a result derives from what its content
depends on (``content_identity``), so the same inputs give the same UIDs and any change that
can change what an object says gives new ones."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence

import numpy as np
import pydicom

from ..artefacts import LesionAnalysis, LungMasks

# Namespace of the name-based UUIDs below (fixed forever: changing it changes every UID).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ctscreen:report-uids")


def _name_based_uid(*parts: str) -> str:
    """``2.25.<UUID>`` (PS3.5 B.2) with a version-5 (SHA-1, name-based) UUID of ``parts``.

    Note: ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores
    ``entropy_srcs`` and returns a random UUID, so it cannot be used for this.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(list(parts))).int}"


# Header values of the source that the result objects copy (patient and study modules) or
# show (the key-image caption): part of the result's identity.
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
              "PatientComments", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
              "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
              "BodyPartExamined", "FrameOfReferenceUID")
SLICE_KEYS = ("SOPInstanceUID", "InstanceNumber", "SeriesNumber", "SliceLocation")


def content_identity(
    content_key: str,
    algorithm_version: str,
    sources: Sequence[pydicom.Dataset],
    lungs: LungMasks,
    analysis: LesionAnalysis,
) -> str:
    """The seed of every output UID of one result: a hash of the stages' ``content_key``,
    the algorithm version, the source instances in slice order with the header values the
    objects show or copy (``SLICE_KEYS`` of each, ``STUDY_KEYS`` of the first: a DICOM
    instance's pixels never change under its UID, but an archive may correct its headers),
    and the lung and lesion labels.  Every number, outline, caption and copied attribute of
    the result is a function of these."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{content_key}|{algorithm_version}|".encode())
    if sources:
        h.update(repr([str(sources[0].get(k, "")) for k in STUDY_KEYS]).encode())
    for ds in sources:
        h.update(repr([str(ds.get(k, "")) for k in SLICE_KEYS]).encode())
    for labels in (lungs.labels, analysis.labels):
        arr = np.ascontiguousarray(labels.array)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def output_uid(source_series_uid: str, identity: str, kind: str, index: int = 0) -> str:
    """A deterministic ``2.25.`` UID for one output of one result (``identity``, from
    ``content_identity``) on one series.

    ``kind`` names the object ("seg-series", "sr-instance", "tracking-lesion", ...) and
    ``index`` tells apart several of one kind.  The same inputs always give the same UID;
    any change of series, version, kind or index gives another.
    """
    return _name_based_uid("output", source_series_uid, identity, kind, str(index))

