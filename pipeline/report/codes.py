"""Coded concepts of the report objects, ctscreen's private coding scheme (99CTSCREEN), and
the constants the objects share (segment numbers, colours, series numbers, the disclaimer)."""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..artefacts import LesionKind, Pattern, Side, Zone

# Real codes only (SNOMED CT "SCT", DICOM "DCM", UCUM); meanings <= 64 characters.

CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")
LUNG: Code = codes.SCT.Lung  # 39607008
RIGHT: Code = codes.SCT.Right  # 24028007
LEFT: Code = codes.SCT.Left  # 7771000
ZONE_CODES: dict[Zone, Code] = {
    Zone.UPPER: codes.SCT.UpperZoneOfLung,  # 281392002
    Zone.MIDDLE: codes.SCT.MiddleZoneOfLung,  # 281393007
    Zone.LOWER: codes.SCT.LowerZoneOfLung,  # 281394001
}
KIND_CODES: dict[LesionKind, Code] = {
    LesionKind.GGO: codes.DCM.GroundGlassOpacity,  # DCM 112120, CID 6102/6104
    LesionKind.CONSOLIDATION: Code("95436008", "SCT", "Lung consolidation"),
}
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # 91723000
ABNORMAL_STRUCTURE: Code = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
# What ctscreen found is an imaging pattern, not a disease: the study-level call is the RSNA
# expert consensus category (Simpson et al., Radiology: Cardiothoracic Imaging 2020), and
# the suspicion is a ranking score.  Neither has a standard code (SNOMED CT codes the disease
# COVID-19, 840539006, which a reader would take as a diagnosis), so they are coded in
# ctscreen's private scheme, declared in each SR's Coding Scheme Identification Sequence and
# listed in docs/results.md.
PRIVATE_SCHEME = "99CTSCREEN"
PRIVATE_SCHEME_NAME = "ctscreen private codes"
PRIVATE_SCHEME_VERSION = "1"
CHEST_CT_TRIAGE = Code("CTS0001", PRIVATE_SCHEME, "Chest CT triage assessment")
RSNA_CATEGORY = Code("CTS0002", PRIVATE_SCHEME, "RSNA COVID-19 pneumonia CT category")
SUSPICION = Code("CTS0003", PRIVATE_SCHEME, "Triage suspicion score")
PATTERN_CODES: dict[Pattern, Code] = {
    Pattern.TYPICAL: Code("CTS0011", PRIVATE_SCHEME, "Typical appearance"),
    Pattern.INDETERMINATE: Code("CTS0012", PRIVATE_SCHEME, "Indeterminate appearance"),
    Pattern.ATYPICAL: Code("CTS0013", PRIVATE_SCHEME, "Atypical appearance"),
    Pattern.NEGATIVE: Code("CTS0014", PRIVATE_SCHEME, "Negative for pneumonia"),
}
PRIVATE_CODES: tuple[Code, ...] = (CHEST_CT_TRIAGE, RSNA_CATEGORY, SUSPICION,
                                   *PATTERN_CODES.values())
# How the key-image caption names each category (the statement's category names).
PATTERN_CAPTIONS: dict[Pattern, str] = {
    Pattern.TYPICAL: "typical for COVID-19 pneumonia",
    Pattern.INDETERMINATE: "indeterminate for COVID-19 pneumonia",
    Pattern.ATYPICAL: "atypical for COVID-19 pneumonia",
    Pattern.NEGATIVE: "negative for pneumonia",
}
VOLUME: Code = codes.SCT.Volume  # 118565006
EXTENT: Code = Code("260858005", "SCT", "Extent")  # percent of the lung involved
ATTENUATION: Code = codes.DCM.AttenuationCoefficient  # 112031, with derivation Mean
MEAN: Code = codes.SCT.Mean  # 373098007
SEVERITY: Code = Code("246112005", "SCT", "Severity")
AI_FAMILY: Code = codes.cid7162.ArtificialIntelligence  # DCM 123110
DEVICE = hd.sr.CodedConcept.from_code(codes.DCM.Device)  # 121007, observer type

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT: Code = codes.UCUM.Percent
UNIT_HU: Code = codes.UCUM.HounsfieldUnit
UNIT_SCORE = Code("{score}", "UCUM", "score")
UNIT_ONE: Code = codes.UCUM.NoUnits  # "1"

SIDE_CODES: dict[Side, Code] = {Side.RIGHT: RIGHT, Side.LEFT: LEFT}
# The lung of each side, pre-coordinated: a second finding site beside the post-coordinated
# (structure + laterality) one, since viewers (OHIF 3.13) show a finding site's own meaning
# and drop its laterality.
SIDE_LUNG_CODES: dict[Side, Code] = {
    Side.RIGHT: Code("3341006", "SCT", "Right lung"),
    Side.LEFT: Code("44029006", "SCT", "Left lung"),
}

# Segment numbers are fixed: consumers may rely on them.
SEGMENT_NUMBERS: dict[Side | LesionKind, int] = {
    Side.RIGHT: 1,
    Side.LEFT: 2,
    LesionKind.GGO: 3,
    LesionKind.CONSOLIDATION: 4,
}

# Lesion ``i`` (``Finding.index``, 1 = largest) has its own segment, number 4 + i, besides
# the union of its kind; the SR's group of that lesion references it.
LESION_SEGMENT_BASE = 4

# Colours shared by the SEG display colours and the key-image outlines (RGB).
COLOURS: dict[Side | LesionKind, tuple[int, int, int]] = {
    Side.RIGHT: (0, 200, 255),
    Side.LEFT: (70, 220, 110),
    LesionKind.GGO: (255, 230, 0),
    LesionKind.CONSOLIDATION: (255, 40, 40),
}

SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "sc": 9703, "ko": 9704}
DISCLAIMER = "AI triage - not for diagnosis"


def _private_scheme() -> pydicom.Dataset:
    """The Coding Scheme Identification item of ctscreen's private codes (PS3.3 C.12.1)."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "the ctscreen project"
    return item
