"""The Key Object Selection document: flags the key images and the SR."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from .codes import DISCLAIMER, SERIES_NUMBERS
from .context import _Context
from .sr import _device_observer


def _build_kos(ctx: _Context, sr: pydicom.Dataset, key_images: Sequence[pydicom.Dataset]
               ) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection document ("Of Interest") flagging the key images and the SR,
    so that a PACS marks them as the study's key objects."""
    selected = [*key_images, sr]
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=selected,
        observer_device_context=_device_observer(ctx),
        description=f"{ctx.algorithm_name}: one key image per finding, and the measurement "
                    f"report ({DISCLAIMER})",
    )
    kw = ctx.common_kwargs()
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=selected,
        content=content,
        series_instance_uid=ctx.uid("ko-series"),
        series_number=SERIES_NUMBERS["ko"],
        sop_instance_uid=ctx.uid("ko-instance"),
        instance_number=1,
        manufacturer=ctx.config.manufacturer or None,
        institution_name=kw.get("institution_name"),
        series_description=f"{ctx.algorithm_name} key objects - {DISCLAIMER}"[:64],
    )
    if ctx.created is not None:
        kos.ContentDate = pydicom.valuerep.DA(ctx.created.date())
        kos.ContentTime = pydicom.valuerep.TM(ctx.created.time())
    return kos
