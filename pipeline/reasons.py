"""Every reason code ctscreen can give, in one registry, and the table of them in docs.

A study that cannot be screened keeps its row on the worklist as "not analysed: <code>",
with the status ``not-analysed`` (the input cannot be analysed, see
``errors.NotAnalysable``) or ``failed`` (the archive, a worker or a defect got in the
way).  A code is a short lower-case stem, optionally followed by ``:detail``
(``slice-too-thick:5.0mm``); the stem is what is registered here and must stay stable.

Adding a code: raise it (``NotAnalysable("my-stem:<detail>", "a sentence")``), add a
``Reason`` below, and regenerate the table::

    python -m pipeline.reasons --write docs/reasons.md

``tests/test_reasons.py`` fails while a produced code is missing here, a registered one is
produced nowhere, or docs/reasons.md differs from :func:`render_table`.

Lung QA warnings (``lung-asymmetry:...`` etc.) are not reasons: an analysed study carries
them, see ``lungs.lung_mask_warnings``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Retry = Literal["next run", "when the limits change", "no"]
Scope = Literal["study", "series", "internal"]


@dataclass(frozen=True)
class Reason:
    """One reason code.

    ``stem``: the code before any ``:``; ``detail``: the form of what follows the ``:``
    (``<T>mm``), empty where the code has none; ``meaning``: what it says about the study;
    ``action``: what the site can do about it; ``status``: the study's status with it
    (``Status`` values); ``retry``: whether the next run screens the study again (every
    code: also when its images, the analysis configuration or the algorithm change, and
    with ``--force``);
    ``scope``: ``study`` (a worklist reason), ``series`` (given to one series only, never
    the study's reason) or ``internal`` (never recorded)."""

    stem: str
    detail: str
    meaning: str
    action: str
    status: Literal["not-analysed", "failed"] = "not-analysed"
    retry: Retry = "no"
    scope: Scope = "study"

    @property
    def code(self) -> str:
        """The code as documented: ``stem`` or ``stem:detail``."""
        return f"{self.stem}:{self.detail}" if self.detail else self.stem


REASONS: tuple[Reason, ...] = (
    # ---- the study as a whole (selection.py, before any series is judged)
    Reason(
        "missing-study-uid", "",
        "the instances carry no StudyInstanceUID; results could not be filed",
        "have the modality or the PACS send the study with its StudyInstanceUID",
    ),
    Reason(
        "invalid-uid", "<Keyword>",
        "a Study, Series or SOP Instance UID that is not a DICOM UID (digits and dots, no "
        "leading zeros, at most 64 characters; e.g. one holding a path): refused before any "
        "stage, nothing is written",
        "correct the UID named at the source (modality, PACS or the export that rewrote it)",
    ),
    Reason(
        "unreadable-instance", "",
        "a DICOM file of the study does not parse (or is no longer DICOM when read whole); a "
        "damaged file whose series cannot be told refuses the whole study",
        "replace the damaged file (send the study again from the modality or the PACS)",
    ),
    Reason(
        "truncated-file", "",
        "a DICOM file of the study ends before what it announces (cut short, or a length "
        "field larger than the file); a damaged file whose series cannot be told refuses the "
        "whole study",
        "replace the cut file (send the study again; look for a transfer or a disk that "
        "stopped short)",
    ),
    Reason(
        "no-ct-series", "",
        "no CT image series in the study",
        "nothing, where the study holds no CT; else check what the PACS or its routing sends",
    ),
    Reason(
        "localizer-only", "",
        "the only CT images are localizers",
        "send the reconstructed axial series too (a routing rule may pass the scouts only)",
    ),
    # ---- a series' headers (selection.py); a study gets these where no series passes
    Reason(
        "missing-tag", "<Keyword>",
        "a tag needed to judge the series is absent (also an empty SeriesInstanceUID or "
        "SOPInstanceUID)",
        "have the modality send the tag named; from a PACS by DIMSE, check that its "
        "IMAGE-level C-FIND returns it (or use the DICOMweb door)",
    ),
    Reason(
        "not-original-primary", "",
        "derived / secondary images only (reformats, MPR, ...)",
        "send the original axial reconstruction",
    ),
    Reason(
        "not-axial", "<angle>deg",
        "slice normal beyond the axial tolerance",
        "send the axial reconstruction, or widen `selection.axial_tolerance_deg`",
    ),
    Reason(
        "slice-too-thick", "<T>mm",
        "thicker than `selection.max_slice_thickness_mm`",
        "reconstruct and archive thin slices (1.5 mm or less), or raise "
        "`selection.max_slice_thickness_mm` (nothing was validated on thick slices)",
    ),
    Reason(
        "too-few-slices", "<N>",
        "the stack cannot cover a chest (fewer than `selection.min_slices`; fewer than 3 "
        "when the volume is built)",
        "send the complete series, or lower `selection.min_slices`",
    ),
    Reason(
        "insufficient-coverage", "<L>mm",
        "the stack cannot cover a chest (shorter than `selection.min_coverage_mm`)",
        "send the complete series, or lower `selection.min_coverage_mm`",
    ),
    Reason(
        "not-chest", "<BodyPart>",
        "BodyPartExamined names another region",
        "nothing, for another region; where the modality names the region wrongly, correct "
        "its protocol or `selection.non_chest_body_parts`",
    ),
    Reason(
        "duplicate-sop-instance-uid", "",
        "the same instance twice in a series",
        "remove the duplicate from the archive (or the export folder)",
    ),
    Reason(
        "mixed-series", "<Keyword>",
        "instances sharing one SeriesInstanceUID disagree on SOP class, Modality, "
        "SeriesNumber or ConvolutionKernel (two reconstructions under one UID)",
        "have the modality or the PACS give each reconstruction its own SeriesInstanceUID",
    ),
    Reason(
        "no-pixel-data", "",
        "no images (no instance of the series has pixel data)",
        "nothing, for a series without images; else send the images",
    ),
    Reason(
        "multiframe-unsupported", "",
        "enhanced multi-frame CT (not handled yet)",
        "have the modality or the PACS send classic single-frame CT Image Storage",
    ),
    Reason(
        "localizer", "",
        "ImageType says LOCALIZER / SCOUT / TOPOGRAM: the series is passed over",
        "nothing",
        scope="series",
    ),
    Reason(
        "not-ct-image", "<Modality>",
        "not a CT image object (SR, SEG, SC, ...; ctscreen's own results among them): the "
        "series is passed over",
        "nothing",
        scope="series",
    ),
    # ---- building the volume (volume.py)
    Reason(
        "missing-geometry", "",
        "position / orientation / spacing (or Rows / Columns) absent or malformed, an "
        "orientation that is not orthonormal, a spacing that is not positive",
        "have the modality send the Image Plane module (C.7.6.2) whole",
    ),
    Reason(
        "mixed-geometry", "",
        "slices of one series differ in Rows / Columns, PixelSpacing or orientation",
        "send the series as reconstructed (one grid); it is not resampled",
    ),
    Reason(
        "duplicate-slice-position", "",
        "two slices at one position",
        "remove the duplicate slice, or give each reconstruction its own series",
    ),
    Reason(
        "missing-slices", "gap=<G>mm",
        "a gap in the stack (a step that is a multiple of the usual one)",
        "send the missing slices (retrieve the series again, or export it whole)",
    ),
    Reason(
        "uneven-spacing", "min=<a>,max=<b>mm",
        "irregular steps in the stack (beyond `volume.gap_tolerance_mm` / "
        "`gap_tolerance_fraction` of the median step)",
        "reconstruct with even spacing; it is not resampled",
    ),
    Reason(
        "gantry-tilt", "<A>deg",
        "the stack is sheared (computed from the positions, not only the tag)",
        "reconstruct without tilt; it is not resampled (`volume.max_tilt_deg`)",
    ),
    Reason(
        "missing-pixel-data", "",
        "pixel data absent in some slices",
        "send the series again from the modality or the PACS",
    ),
    Reason(
        "truncated-pixel-data", "",
        "pixel data shorter than Rows x Columns x BitsAllocated",
        "send the series again from the modality or the PACS",
    ),
    Reason(
        "pixel-data-mismatch", "",
        "pixel data not matching Rows x Columns (longer, decoded to another shape, or "
        "BitsAllocated not 8, 16 or 32)",
        "send the series again; correct the modality's Image Pixel module if it persists",
    ),
    Reason(
        "undecodable", "<TransferSyntaxUID>",
        "pixels that cannot be turned into HU: a transfer syntax with no decoder here or "
        "data its decoder refuses (`unknown` where the file meta names no transfer syntax, "
        "`invalid` where it holds no valid UID)",
        "have the PACS send another transfer syntax (e.g. uncompressed or JPEG-LS), or "
        "report it with the syntax named",
    ),
    Reason(
        "not-monochrome", "",
        "pixels that cannot be turned into HU: not MONOCHROME1/2 with one sample per pixel",
        "nothing: not a CT greyscale image",
    ),
    Reason(
        "missing-rescale", "",
        "pixels that cannot be turned into HU: RescaleSlope / RescaleIntercept absent, not "
        "numeric or not finite, or a slope of 0",
        "have the modality send the CT Image module's rescale values",
    ),
    # ---- the lungs (lungs.py)
    Reason(
        "no-lungs-found", "",
        "less than `lungs.min_lung_volume_ml` of lung (not a chest; or a lung so opacified "
        "that the mask lost it)",
        "nothing, where the series is not a chest; else have it read (a completely "
        "opacified lung can be lost, see [Limits](limits.md))",
    ),
    # ---- the archive and the batch (archive/, run.py, workers.py, batch.py)
    Reason(
        "archive-error", "",
        "the archive failed while reading or storing",
        "check the archive (`ctscreen echo NAME`, the log); nothing else",
        status="failed", retry="next run",
    ),
    Reason(
        "incomplete-retrieval", "<got>/<expected>",
        "the PACS delivered fewer instances than its query announced",
        "check that the PACS holds the whole series; nothing else",
        retry="next run",
    ),
    Reason(
        "limit-exceeded", "<time|memory|slices|bytes>",
        "the study is over a per-study limit (`batch:`); the batch goes on",
        "raise the limit named (`batch.max_study_seconds`, `max_study_memory_mb`, "
        "`max_slices`, `max_series_bytes`) where the machine allows it",
        retry="when the limits change",
    ),
    Reason(
        "worker-died", "<exit code>",
        "the worker process screening the study died (not at a limit); on a Dask cluster "
        "the detail is the task's error, e.g. `KilledWorker`",
        "read the log (the kernel's OOM killer, a crash in a decoder); report it if it "
        "comes back",
        status="failed", retry="next run",
    ),
    Reason(
        "internal-error", "<Type>",
        "an unexpected error: a defect, logged with its traceback",
        "report it with the traceback from the log",
        status="failed", retry="next run",
    ),
    Reason(
        "lease-lost", "",
        "another run took the study over while this one worked on it: this run drops its "
        "result, and the other run's stands",
        "nothing",
        status="failed", scope="internal",
    ),
)

BY_STEM: dict[str, Reason] = {r.stem: r for r in REASONS}

BEGIN = "<!-- BEGIN GENERATED: python -m pipeline.reasons --write docs/reasons.md -->"
END = "<!-- END GENERATED -->"


def stem(code: str) -> str:
    """The registered part of a code: what precedes the first ``:``."""
    return code.split(":", 1)[0]


def is_registered(code: str) -> bool:
    return stem(code) in BY_STEM


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table() -> str:
    """The markdown tables of every code, in registry order (what docs/reasons.md holds
    between ``BEGIN`` and ``END``)."""
    lines = [
        "| code | status | meaning | what the site can do | screened again |",
        "|---|---|---|---|---|",
    ]
    for r in REASONS:
        if r.scope == "study":
            lines.append(
                f"| `{_cell(r.code)}` | {r.status} | {_cell(r.meaning)} | {_cell(r.action)} "
                f"| {r.retry} |"
            )
    for scope, title in (
        ("series", "Given to one series only (in `select_series`'s decisions), never as the "
                   "study's reason:"),
        ("internal", "Never recorded on the worklist:"),
    ):
        lines += ["", title, "", "| code | meaning |", "|---|---|"]
        lines += [f"| `{_cell(r.code)}` | {_cell(r.meaning)} |" for r in REASONS
                  if r.scope == scope]
    return "\n".join(lines) + "\n"


def replace_generated(text: str, table: str) -> str:
    """``text`` with what lies between ``BEGIN`` and ``END`` replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"expected the markers {BEGIN!r} and {END!r}")
    return text[: start + len(BEGIN)] + "\n" + table + text[end:]


def generated_part(text: str) -> str:
    """What lies between ``BEGIN`` and ``END`` (without the newline after ``BEGIN``)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"expected the markers {BEGIN!r} and {END!r}")
    return text[start + len(BEGIN) + 1: end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reasons",
        description="Print the table of reason codes, or write it into a markdown file "
        "between its generated-content markers.",
    )
    parser.add_argument("--write", metavar="FILE", type=Path,
                        help="replace the generated part of FILE (e.g. docs/reasons.md)")
    parser.add_argument("--check", metavar="FILE", type=Path,
                        help="exit 1 where the generated part of FILE is out of date")
    args = parser.parse_args(argv)
    table = render_table()
    if args.write is not None:
        text = args.write.read_text(encoding="utf-8")
        new = replace_generated(text, table)
        if new != text:
            args.write.write_text(new, encoding="utf-8")
        return 0
    if args.check is not None:
        if generated_part(args.check.read_text(encoding="utf-8")) != table:
            print(f"{args.check}: the reasons table is out of date; run "
                  f"python -m pipeline.reasons --write {args.check}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
