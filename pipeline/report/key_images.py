"""Key images (``highdicom.sc.SCImage``, RGB): one slice each, in a lung window with the
outlines, orientation markers and a burned-in caption that wraps to the width."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from ..artefacts import LESION_LABELS, LUNG_LABELS, LesionKind, Side, Volume
from ..config import ReportConfig
from .codes import COLOURS, DISCLAIMER, PATTERN_CAPTIONS, SERIES_NUMBERS
from .context import _Context
from .orientation import EdgeLabels, image_edge_labels

KEY_IMAGE_MIN_SIZE = 512  # key images are upscaled (nearest) to at least this many pixels


def _outline(mask: npt.NDArray[np.bool_], width: int = 1) -> npt.NDArray[np.bool_]:
    """Inner boundary of a 2-D mask, ``width`` pixels thick (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        e = inner.copy()
        e[1:, :] &= inner[:-1, :]
        e[:-1, :] &= inner[1:, :]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return np.asarray(mask & ~inner)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def wrap_caption(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Any,
                 width: float) -> list[str]:
    """``lines`` broken at spaces (a word wider than ``width`` at characters) so that every
    line fits ``width`` pixels: nothing of the caption is cut off."""
    out: list[str] = []
    for text in lines:
        line = ""
        for word in text.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                out.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                out.append(word[:cut])
                word = word[cut:]
            line = word
        out.append(line)
    return out


def render_key_image(
    ct: Volume,
    lung_labels: npt.NDArray[Any],
    lesion_labels: npt.NDArray[Any],
    k: int,
    caption: Sequence[str],
    config: ReportConfig,
) -> tuple[npt.NDArray[np.uint8], EdgeLabels, int]:
    """Slice ``k`` as an RGB image: lung window, outlines, orientation markers, caption.

    Returns the (rows, columns, 3) uint8 image, the patient directions at its edges and the
    integer upscaling factor (the image part has ``factor`` pixels per CT pixel; the caption
    is a black band below it).
    """
    hu = ct.array[k].astype(np.float32)
    lo = config.window_center - config.window_width / 2.0
    gray = np.clip((hu - lo) / config.window_width * 255.0 + 0.5, 0, 255).astype(np.uint8)
    factor = max(1, math.ceil(KEY_IMAGE_MIN_SIZE / max(gray.shape)))

    def up(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)

    rgb = np.repeat(up(gray)[..., None], 3, axis=2)
    width = max(1, round(max(rgb.shape[:2]) / 256))
    lung_up = up(np.asarray(lung_labels[k]))
    les_up = up(np.asarray(lesion_labels[k]))
    for side in Side:
        rgb[_outline(lung_up == LUNG_LABELS[side], width)] = COLOURS[side]
    for kind in LesionKind:
        rgb[_outline(les_up == LESION_LABELS[kind], width)] = COLOURS[kind]

    edges = image_edge_labels(ct.direction[:, 2], ct.direction[:, 1])
    h, w = rgb.shape[:2]
    size = max(12, w // 32)
    font = _font(size)
    line_h = size + size // 3
    pad = max(4, w // 64)
    measure_draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = [("lung", COLOURS[Side.RIGHT]), ("lung", COLOURS[Side.LEFT]),
              ("GGO", COLOURS[LesionKind.GGO]),
              ("consolidation", COLOURS[LesionKind.CONSOLIDATION])]
    legend_rows = _legend_rows(measure_draw, legend, font, w - 2 * pad)
    wrapped = wrap_caption(measure_draw, caption, font, w - 2 * pad)
    band = line_h * (len(wrapped) + len(legend_rows)) + size // 2
    img = Image.new("RGB", (w, h + band), (0, 0, 0))
    img.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(img)
    marker_font = _font(max(14, w // 20))
    white, black = (255, 255, 255), (0, 0, 0)
    for x_pos, text, anchor in ((pad, edges.left, "lm"), (w - pad, edges.right, "rm")):
        draw.text(
            (x_pos, h // 2), text, fill=white, font=marker_font, anchor=anchor,
            stroke_width=max(1, size // 8), stroke_fill=black,
        )
    y = h + size // 4
    for line in wrapped:
        draw.text((pad, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    for row in legend_rows:
        x = float(pad)
        for label, colour in row:
            draw.text((x, y), label, fill=colour, font=font)
            x += draw.textlength(label + "   ", font=font)
        y += line_h
    return np.asarray(img, dtype=np.uint8), edges, factor


def _legend_rows(draw: ImageDraw.ImageDraw, items: Sequence[tuple[str, tuple[int, int, int]]],
                 font: Any, width: float) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """The colour legend's words, as many to a row as fit ``width``."""
    rows: list[list[tuple[str, tuple[int, int, int]]]] = [[]]
    x = 0.0
    for label, colour in items:
        step = draw.textlength(label + "   ", font=font)
        if rows[-1] and x + draw.textlength(label, font=font) > width:
            rows.append([])
            x = 0.0
        rows[-1].append((label, colour))
        x += step
    return rows


def _image_position(src: pydicom.Dataset, ct: Volume, k: int) -> str:
    """How a viewer names the source slice: its series and instance numbers and its table
    position (Slice Location where given, else the patient z of its position)."""
    number = src.get("InstanceNumber")
    loc = src.get("SliceLocation")
    z = float(loc) if loc not in (None, "") else float(ct.index_to_lps([k, 0, 0])[0, 2])
    series = src.get("SeriesNumber")
    head = f"Series {series} image {number}" if series not in (None, "") else f"Image {number}"
    return f"{head} ({'location' if loc not in (None, '') else 'z'} {z:.1f} mm)"


def _build_key_images(ctx: _Context) -> list[hd.sc.SCImage]:
    a = ctx.analysis
    ct = ctx.ct
    lung = ctx.lungs.labels.array
    les = a.labels.array
    ks = ctx.key_slices
    ref = ctx.sources[0]
    out = []
    by_index = {f.index: f for f in a.findings}
    for i, (k, shown) in enumerate(zip(ks, ctx.key_findings, strict=True), start=1):
        src = ctx.sources[k]
        f = by_index.get(shown)
        what = (f"Lesion {f.index} of {a.n_findings_total}: {f.kind}, {f.volume_ml:.1f} ml, "
                f"{f.side} {f.zone} zone, mean {f.mean_hu:.0f} HU" if f is not None
                else "No lesion found")
        caption = [
            DISCLAIMER,
            f"Suspicion {a.suspicion:.2f} | RSNA category: {PATTERN_CAPTIONS[a.pattern]}",
            f"Involvement {a.involved_pct:.1f}% | severity {a.severity_score}/{a.severity_max} "
            f"({a.severity_scale})",
            what,
            f"{_image_position(src, ct, k)} | {ctx.algorithm_name} {ctx.algorithm_version}",
        ]
        pixels, edges, factor = render_key_image(ct, lung, les, k, caption, ctx.config)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ctx.uid("sc-series"),
            series_number=SERIES_NUMBERS["sc"],
            sop_instance_uid=ctx.uid("sc-instance", i),
            instance_number=i,
            manufacturer=ctx.config.manufacturer,
            patient_orientation=(edges.right, edges.bottom),
            # highdicom annotates tuple[int, int] but writes DS values: floats are right.
            pixel_spacing=(ct.spacing[1] / factor, ct.spacing[2] / factor),  # type: ignore[arg-type]
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{ctx.algorithm_name} key images - {DISCLAIMER}"[:64],
            **ctx.common_kwargs(),
        )
        image.BurnedInAnnotation = "YES"
        image.BodyPartExamined = str(ref.get("BodyPartExamined", "") or "CHEST")
        image.ImageComments = DISCLAIMER
        derived = pydicom.Dataset()
        derived.ReferencedSOPClassUID = src.SOPClassUID
        derived.ReferencedSOPInstanceUID = src.SOPInstanceUID
        image.SourceImageSequence = [derived]
        out.append(image)
    return out
