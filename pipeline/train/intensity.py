"""8-bit windowed slices -> approximate Hounsfield units.

The annotated COVID-19 slices (MedSeg / COVID-SemiSeg layout) are 8-bit JPEGs in a lung
window: the Hounsfield units are lost.  We map them back with ONE fixed linear map, applied
identically at import, training and evaluation (:func:`intensity_to_hu`):

    HU = -850 + (I - 44.5) * 890 / (215.0 - 44.5)      (I = 0..255)
       = 5.220 * I - 1082.3                              (I = 0 -> -1082 HU, 255 -> +249 HU)

Two anchors, estimated from the 50 slices of ``semiseg-train`` (histogram smoothed with a
Gaussian of 3 levels, :func:`histogram_anchors`):

- the aerated-parenchyma peak (mode below level 150): median over the images 44.5 -> -850 HU,
  the usual density of normal aerated lung;
- the soft-tissue peak (mode in 150..249, heart and chest wall): median 215.0 -> +40 HU.

A per-image map (each image's own peaks) was tried and rejected: under it the annotated
ground-glass mean varied more across images (SD 176 vs 105 HU) because in diffusely diseased
slices the "parenchyma" peak *is* the disease.  Under the fixed map the annotated lesions
measure: ground glass mean -564 HU (SD across images 105), consolidation -259 HU (SD 150);
consolidation reads low (true consolidation is about -100..+50 HU) because the window
saturates near +250 HU and the masks include partial-volume rims.  These figures are
approximate by construction and are only used to put the 2D slices on the same scale as real
CT; they are recomputed by ``ctscreen data import`` and stored in the dataset manifest.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter1d

PARENCHYMA_LEVEL = 44.5
PARENCHYMA_HU = -850.0
SOFT_TISSUE_LEVEL = 215.0
SOFT_TISSUE_HU = 40.0
SLOPE = (SOFT_TISSUE_HU - PARENCHYMA_HU) / (SOFT_TISSUE_LEVEL - PARENCHYMA_LEVEL)


def intensity_to_hu(image: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """8-bit intensity -> approximate HU with the fixed map above."""
    i = np.asarray(image, dtype=np.float32)
    return np.asarray(PARENCHYMA_HU + (i - np.float32(PARENCHYMA_LEVEL)) * np.float32(SLOPE),
                      dtype=np.float32)


def histogram_anchors(image: npt.NDArray[np.generic]) -> tuple[float, float]:
    """(parenchyma peak, soft-tissue peak) levels of one 8-bit image, as used to fit the map."""
    a = np.asarray(image, dtype=np.uint8).ravel()
    h = gaussian_filter1d(np.bincount(a, minlength=256).astype(np.float64), 3.0)
    return float(np.argmax(h[:150])), float(150 + np.argmax(h[150:250]))
