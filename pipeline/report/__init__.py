"""Pure: a screening result + the source CT headers -> DICOM SEG, Comprehensive SR, key
images and a Key Object Selection document (docs/results.md describes them for users).

Every object is built with highdicom (no hand-assembled content items) and passes dciodvfy.
Nothing here reads or writes files, talks to the network or logs patient identity.

Outputs of one run (``build_report``):

* **SEG** (``highdicom.seg.Segmentation``, BINARY, empty frames omitted): segments whose
  numbers never change, so that consumers can rely on them even where one is empty (an empty
  segment is described and has no frames): 1 right lung, 2 left lung, 3 ground-glass opacity,
  4 consolidation (``SEGMENT_NUMBERS``), then 4 + i for reported lesion i alone
  (``LESION_SEGMENT_BASE``).
* **SR** (``highdicom.sr.ComprehensiveSR``) with a TID 1500 Measurement Report: procedure
  "CT of chest", the algorithm as device observer, an image library of the key slices, and
  measurement groups for the study as a whole (the RSNA category, severity, suspicion, total
  involvement), each lung, each lesion kind, each reported lesion and each lung zone.  Every
  group is anchored on a CT image (``_build_sr``).  What has no standard code is coded in the
  private scheme ``PRIVATE_SCHEME``, declared in the SR.
* **Key images** (``highdicom.sc.SCImage``, RGB): one per finding, on its largest slice not yet
  shown, in a lung window with outlines and a burned-in caption that wraps to the width.
* **Key Object Selection** (``highdicom.ko``): flags the key images and the SR.

UIDs are deterministic and follow content (``content_identity``, ``output_uid``): they derive
from the source series and its instances, the lung and lesion labels themselves, and the
``content_key`` of the stages (code, stage versions, model hashes, analysis configuration).
The same inputs give the same UIDs, so a re-run duplicates nothing; any change that can change
what an object says gives new UIDs, so no archive can keep a stale object under a current UID
(and finding the UID in the archive confirms this content).  The SR names the SRs of the
result it replaces (``previous``) in its Predecessor Documents Sequence.  Dates and times are
not part of any UID.
Content date/time is the ``created`` argument where given, otherwise the run time (highdicom's
default); Instance Creation Date/Time is always the run time.

``sources`` may be header-only (read with ``stop_before_pixels=True``): highdicom needs no pixel
data from the source images for any of the three objects; the key images are rendered from
``ct.array``.

The package's modules: ``codes`` (coded concepts, the private scheme, shared constants),
``uids`` (content identity, output UIDs), ``orientation`` (patient direction letters),
``slices`` (key slices, each finding's view), ``context`` (what the builders share),
``seg``, ``sr_items`` and ``sr`` (the SR's building blocks and sections), ``kos``,
``key_images`` (drawing, captions), and ``build`` (``build_report``).  Everything other code
uses is re-exported here.
"""

from __future__ import annotations

from .build import (
    ReportObjects,
    build_report,
)
from .codes import (
    CHEST_CT_TRIAGE,
    COLOURS,
    DISCLAIMER,
    EXTENT,
    KIND_CODES,
    LESION_SEGMENT_BASE,
    LUNG,
    PATTERN_CAPTIONS,
    PATTERN_CODES,
    PRIVATE_CODES,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_VERSION,
    RSNA_CATEGORY,
    SEGMENT_NUMBERS,
    SERIES_NUMBERS,
    SIDE_CODES,
    SIDE_LUNG_CODES,
    VOLUME,
    ZONE_CODES,
)
from .key_images import (
    KEY_IMAGE_MIN_SIZE,
    render_key_image,
    wrap_caption,
)
from .orientation import (
    EdgeLabels,
    image_edge_labels,
    patient_direction_letter,
)
from .slices import (
    KEY_IMAGE_MIN_GAP_MM,
    LesionView,
    choose_finding_slices,
    choose_key_slices,
    lesion_view,
)
from .uids import (
    SLICE_KEYS,
    STUDY_KEYS,
    content_identity,
    output_uid,
)

__all__ = [
    "CHEST_CT_TRIAGE",
    "COLOURS",
    "DISCLAIMER",
    "EXTENT",
    "KEY_IMAGE_MIN_GAP_MM",
    "KEY_IMAGE_MIN_SIZE",
    "KIND_CODES",
    "LESION_SEGMENT_BASE",
    "LUNG",
    "PATTERN_CAPTIONS",
    "PATTERN_CODES",
    "PRIVATE_CODES",
    "PRIVATE_SCHEME",
    "PRIVATE_SCHEME_NAME",
    "PRIVATE_SCHEME_VERSION",
    "RSNA_CATEGORY",
    "SEGMENT_NUMBERS",
    "SERIES_NUMBERS",
    "SIDE_CODES",
    "SIDE_LUNG_CODES",
    "SLICE_KEYS",
    "STUDY_KEYS",
    "VOLUME",
    "ZONE_CODES",
    "EdgeLabels",
    "LesionView",
    "ReportObjects",
    "build_report",
    "choose_finding_slices",
    "choose_key_slices",
    "content_identity",
    "image_edge_labels",
    "lesion_view",
    "output_uid",
    "patient_direction_letter",
    "render_key_image",
    "wrap_caption",
]
