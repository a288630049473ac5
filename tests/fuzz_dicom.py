"""Fuzz harness (atheris) over reading, series assembly and decoding.

One input is one file's bytes.  It goes through the same code as a nightly run: the folder
archive's header read, ingest's grouping, selection, the whole-file load and volume building
(on three copies of the instance stacked 1 mm apart).  Allowed outcomes: the file is
skipped as unreadable, or a stage refuses it with ``NotAnalysable`` (a coded reason), or it
is accepted.  Any other exception is a defect, and atheris reports it with the input.

    .venv/bin/python tests/fuzz_dicom.py -max_total_time=600 [corpus_dir ...]

Seeds come from ../shared/data (small real files of several transfer syntaxes); without
arguments the harness makes its own seed corpus in a temporary folder.  tests/test_fuzz.py
runs it for a bounded time in the test command.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["pipeline"]):
    from pipeline.archive.folder import FolderArchive
    from pipeline.config import Config
    from pipeline.errors import NotAnalysable
    from pipeline.ingest import group_studies
    from pipeline.selection import select_series
    from pipeline.volume import build_volume

CONFIG = Config()
WORK = Path(tempfile.mkdtemp(prefix="ctscreen-fuzz-"))
ARCHIVE = FolderArchive(WORK)
TARGET = WORK / "input.dcm"
SEEDS = (
    "chest-ct/cip-copdgene-10002k-64/ct-64Dicom",
    "codecs/wg04",
    "bad-input/minimal-header",
    "bad-input/localizer",
)
MAX_SEED_BYTES = 600_000


def one_input(data: bytes) -> None:
    TARGET.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every malformed value
        headers = list(ARCHIVE.headers())
        if not headers:
            return  # skipped as not (readable) DICOM: an allowed outcome
        for study in group_studies(headers):
            select_series(study, CONFIG.selection)
        try:
            (ds,) = ARCHIVE.load([str(TARGET)])
        except NotAnalysable:
            return
        stack = []
        for k in range(3):
            d = copy.deepcopy(ds)
            if "ImagePositionPatient" in d:
                try:
                    x, y, z = (float(v) for v in d.ImagePositionPatient)
                    d.ImagePositionPatient = [x, y, z + k]
                except (TypeError, ValueError):
                    pass
            stack.append(d)
        try:
            build_volume(stack, CONFIG.volume)
        except NotAnalysable:
            pass


def seed_corpus(shared: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for sub in SEEDS:
        folder = shared / sub
        if not folder.is_dir():
            continue
        for i, f in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
            if i >= 4 or f.stat().st_size > MAX_SEED_BYTES:
                continue
            (out / f"{sub.replace('/', '_')}_{f.name}").write_bytes(f.read_bytes())
    return out


def main(argv: list[str]) -> None:
    if not any(not a.startswith("-") for a in argv[1:]):
        shared = Path(os.environ.get(
            "CTSCREEN_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
        ))
        argv = [*argv, str(seed_corpus(shared, WORK / "corpus"))]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
