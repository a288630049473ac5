"""What the builders of one report share: its inputs, its UIDs and the choices made once
(key slices, each finding's view)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import pydicom

from ..artefacts import LesionAnalysis, LungMasks, OutputRef, Volume
from ..config import ReportConfig
from .slices import LesionView
from .uids import output_uid


@dataclass
class _Context:
    ct: Volume
    sources: tuple[pydicom.Dataset, ...]
    lungs: LungMasks
    analysis: LesionAnalysis
    config: ReportConfig
    algorithm_name: str
    algorithm_version: str
    series_uid: str
    created: datetime.datetime | None
    identity: str
    n_groups: int = 0
    key_slices: list[int] = field(default_factory=list)
    # the finding each key image shows (Finding.index; 0: none, a study without findings)
    key_findings: list[int] = field(default_factory=list)
    views: dict[int, LesionView] = field(default_factory=dict)  # by Finding.index
    previous: list[OutputRef] = field(default_factory=list)

    def uid(self, kind: str, index: int = 0) -> str:
        return output_uid(self.series_uid, self.identity, kind, index)

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by the three highdicom constructors."""
        kw: dict[str, Any] = {
            "manufacturer_model_name": self.algorithm_name[:64],
            "software_versions": self.algorithm_version[:64],
        }
        if self.config.institution_name:
            kw["institution_name"] = self.config.institution_name
        if self.created is not None:
            kw["content_date"] = self.created.date()
            kw["content_time"] = self.created.time()
        return kw
