"""Training and evaluation sets: import from the layouts researchers bring, one storage format.

A dataset is a folder with ``manifest.json`` (one record per case, plus import facts) and
``cases/<id>.npz`` holding, for a stack of K axial slices:

- ``hu``: int16 (K, H, W), Hounsfield units (approximate for 8-bit sources, see intensity.py);
- ``label``: uint8 (K, H, W), 0 background, 1 ground-glass opacity, 2 consolidation,
  3 lesion of unknown kind (a merged infection mask: scored as lesion, not per kind),
  255 ignore (neither trained on nor scored);
- ``region``: uint8 (K, H, W), the lung region both detectors are restricted to at evaluation.

Layouts read by :func:`import_into` / :func:`open_dataset`:

(a) ``semiseg``: ``Imgs/N.jpg`` (8-bit windowed, lung-cropped) and ``GT/N.png`` (0 / 1 GGO /
    2 consolidation).  The images are stored turned by 90 degrees (their rows run from one
    lung to the other, the spine on the right; "upside down" in the shared README); they are
    turned clockwise to the usual display (anterior up, spine down), mapped to HU by
    :func:`~pipeline.train.intensity.intensity_to_hu`, and given an assumed pixel size of
    ``ASSUMED_WIDTH_MM / width`` (the crops span both lungs left to right, about 300 mm).
    The lung region is :func:`slice_lung_region`.  Case identity is unknown: slices are
    grouped by a proxy (:func:`proxy_groups`), and splits are made by group.
(b) ``volumes``: ``ROOT/<site>/<case>/`` with the CT as ``image.nii.gz`` / ``image.nii`` /
    ``image.nrrd`` or a folder ``image/`` of DICOM files, and the lesion mask as
    ``label.nii.gz`` / ``label.nii`` / ``label.nrrd`` (same grid; 1 GGO, 2 consolidation,
    255 ignore) or a DICOM SEG ``label.dcm`` / ``seg.dcm`` (segments whose label names
    ground glass or consolidation).  The site folder name is kept for stratified splits.  The
    lung region is the pipeline's classical lung mask; slices without lung are dropped.
(c) ``synthetic``: see :mod:`pipeline.train.synthetic`.
(d) ``ma20``: ``ct/NNNN.png``, ``lungs/NNNN.png``, ``infection/NNNN.png`` and ``volumes.csv``
    (first, last, volume, group): full-field 256 x 256 slices already made by the recipe of
    :mod:`pipeline.representation` (``intensity`` "ma20": no HU).  One case per volume
    (group); ``label`` is 3 where infected (ground glass and consolidation merged), the
    stored ``region`` is the annotated lung mask (the truth of the lung task).  The pixel
    size is the recipe's nominal one (360 mm / 256): the true field of view is unknown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from ..artefacts import Volume, volume_from_sitk
from ..errors import CtscreenError
from .intensity import histogram_anchors, intensity_to_hu

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ASSUMED_WIDTH_MM = 300.0
IGNORE = 255
LESION_ANY = 3  # a lesion of unknown kind
U8 = npt.NDArray[np.uint8]


class DatasetError(CtscreenError):
    """A dataset folder or an import source is not in an expected layout."""


@dataclass(frozen=True)
class CaseRecord:
    """One case of a dataset (a slice or a stack of slices of one scan)."""

    id: str
    site: str
    source: str  # "semiseg", "volume", "synthetic", "negative"
    group: str  # cases of one group (one patient, or its proxy) always share a split
    file: str  # relative to the dataset folder
    n_slices: int
    spacing_rc: tuple[float, float]
    slice_mm: float
    fingerprint: str  # sha256 (16 hex) of the HU array: recognises a case under any name
    lesion_px: tuple[int, int]  # GGO, consolidation pixels
    fixed_split: str = ""  # "", "train" or "test": set by the importer where it must be
    note: str = ""
    # "hu": ``hu`` holds Hounsfield units (approximate for 8-bit sources); "ma20": it holds
    # the uint8 recipe image of pipeline/representation.py (no HU exist)
    intensity: str = "hu"
    fov: str = "lung-crop"  # "full": the whole field of view; "lung-crop": cut to the lungs

    @staticmethod
    def from_json(d: dict[str, Any]) -> CaseRecord:
        d = dict(d)
        d["spacing_rc"] = tuple(d["spacing_rc"])
        d["lesion_px"] = tuple(d["lesion_px"])
        return CaseRecord(**d)


@dataclass
class CaseData:
    record: CaseRecord
    hu: npt.NDArray[np.int16]
    label: U8
    region: npt.NDArray[np.bool_]


@dataclass
class Dataset:
    root: Path
    records: list[CaseRecord]
    info: dict[str, Any] = field(default_factory=dict)

    def load(self, rec: CaseRecord) -> CaseData:
        with np.load(self.root / rec.file) as z:
            return CaseData(rec, z["hu"], z["label"], z["region"].astype(bool))


def fingerprint(hu: npt.NDArray[np.int16]) -> str:
    return hashlib.sha256(np.ascontiguousarray(hu, dtype=np.int16).tobytes()).hexdigest()[:16]


def save_case(root: Path, *, id: str, site: str, source: str, group: str,
              hu: npt.NDArray[Any], label: U8, region: npt.NDArray[np.bool_],
              spacing_rc: tuple[float, float], slice_mm: float, fixed_split: str = "",
              note: str = "", intensity: str = "hu", fov: str = "lung-crop") -> CaseRecord:
    """Write one case's arrays and return its record."""
    if not (hu.shape == label.shape == region.shape) or hu.ndim != 3:
        raise DatasetError(f"case {id}: expected image, label and region of one (K, H, W) "
                           f"shape, got {hu.shape}, {label.shape}, {region.shape}")
    hu16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    if intensity not in ("hu", "ma20") or fov not in ("full", "lung-crop"):
        raise DatasetError(f"case {id}: unknown intensity {intensity!r} or fov {fov!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", id)
    rel = f"cases/{safe}.npz"
    (root / "cases").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / rel, hu=hu16, label=label.astype(np.uint8),
                        region=region.astype(np.uint8))
    return CaseRecord(id=id, site=site, source=source, group=group, file=rel,
                      n_slices=int(hu.shape[0]),
                      spacing_rc=(float(spacing_rc[0]), float(spacing_rc[1])),
                      slice_mm=float(slice_mm), fingerprint=fingerprint(hu16),
                      lesion_px=(int(np.count_nonzero(label == 1)),
                                 int(np.count_nonzero(label == 2))),
                      fixed_split=fixed_split, note=note, intensity=intensity, fov=fov)


def write_manifest(root: Path, records: list[CaseRecord], info: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"format": "ctscreen-lesion-dataset/1", "info": info,
            "cases": [asdict(r) for r in records]}
    (root / MANIFEST).write_text(json.dumps(data, indent=1), encoding="utf-8")


def read_dataset(root: str | Path) -> Dataset:
    r = Path(root)
    try:
        data = json.loads((r / MANIFEST).read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{r}: expected {MANIFEST} (run `ctscreen data import`), "
                           f"got {e.strerror}") from e
    return Dataset(r, [CaseRecord.from_json(c) for c in data["cases"]], data.get("info", {}))


# --------------------------------------------------------------------------- layouts


def detect_layout(path: Path) -> str:
    """"dataset", "semiseg" or "volumes" (raises DatasetError otherwise)."""
    if (path / MANIFEST).is_file():
        return "dataset"
    if (path / "Imgs").is_dir() and (path / "GT").is_dir():
        return "semiseg"
    if (path / "ct").is_dir() and (path / "lungs").is_dir() and (path / "volumes.csv").is_file():
        return "ma20"
    if any(_case_image(c) is not None for s in _dirs(path) for c in _dirs(s)):
        return "volumes"
    raise DatasetError(f"{path}: expected a dataset (manifest.json), a semiseg folder "
                       f"(Imgs/ + GT/), an ma20 folder (ct/ + lungs/ + infection/ + "
                       f"volumes.csv) or volumes (SITE/CASE/image.nii.gz|image/ + label)")


def open_dataset(path: str | Path, workdir: Path) -> Dataset:
    """A dataset folder as is; any other layout imported into ``workdir`` first."""
    p = Path(path)
    layout = detect_layout(p)
    if layout == "dataset":
        return read_dataset(p)
    return import_into(workdir, semiseg=[p] if layout == "semiseg" else [],
                       volumes=[p] if layout == "volumes" else [],
                       ma20=[p] if layout == "ma20" else [])


def import_into(out: Path, semiseg: Iterable[Path] = (), volumes: Iterable[Path] = (),
                synthetic_from: Path | None = None, synthetic_cases: int = 0,
                seed: int = 0, ma20: Iterable[Path] = (),
                ma20_fixed_splits: bool = False) -> Dataset:
    """Import every given source into a new dataset folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    records: list[CaseRecord] = []
    info: dict[str, Any] = {"sources": []}
    real_hu: dict[str, list[float]] = {"ggo": [], "consolidation": []}
    for src in semiseg:
        recs, stats = import_semiseg(Path(src), out)
        records += recs
        for k in real_hu:
            real_hu[k] += stats[k]
        info["sources"].append({"layout": "semiseg", "path": str(src), "cases": len(recs),
                                "intensity_to_hu": "HU = -850 + (I - 44.5) * 890 / 170.5",
                                "anchors_median": stats["anchors_median"]})
    for src in ma20:
        recs = import_ma20(Path(src), out, fixed_splits=ma20_fixed_splits)
        records += recs
        info["sources"].append({"layout": "ma20", "path": str(src), "cases": len(recs),
                                "intensity": "ma20 recipe (pipeline/representation.py)"})
    for src in volumes:
        recs = import_volumes(Path(src), out)
        records += recs
        info["sources"].append({"layout": "volumes", "path": str(src), "cases": len(recs)})
    if synthetic_from is not None and synthetic_cases > 0:
        from .synthetic import import_synthetic

        recs, realism = import_synthetic(synthetic_from, out, synthetic_cases, seed)
        records += recs
        real = {k: _hu_summary(np.asarray(v)) for k, v in real_hu.items() if v}
        realism["real_annotated_semiseg"] = real
        info["sources"].append({"layout": "synthetic", "path": str(synthetic_from),
                                "cases": len(recs), "seed": seed, "realism": realism})
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise DatasetError("two imported cases share one id; give each site folder a "
                           "distinct name")
    write_manifest(out, records, info)
    log.info("dataset %s: %d cases (%s)", out, len(records),
             ", ".join(f"{s}: {sum(r.source == s for r in records)}"
                       for s in sorted({r.source for r in records})))
    return Dataset(out, records, info)


def _hu_summary(v: npt.NDArray[Any]) -> dict[str, float]:
    if v.size == 0:
        return {}
    p = np.percentile(v, [10, 50, 90])
    return {"mean": round(float(v.mean()), 1), "sd": round(float(v.std()), 1),
            "p10": round(float(p[0]), 1), "p50": round(float(p[1]), 1),
            "p90": round(float(p[2]), 1), "n": int(v.size)}


# --------------------------------------------------------------------------- (a) semiseg


def slice_lung_region(hu: npt.NDArray[Any],
                      spacing_rc: tuple[float, float]) -> npt.NDArray[np.bool_]:
    """A 2D lung region for a lung-cropped slice without a lung mask.

    Aerated pixels (median-filtered HU below -500), opened by a 3 mm disk, components of at
    least 1% of the image, split into two lungs at the least aerated column of the middle
    third (the mediastinum), each piece replaced by its convex hull (which brings back dense
    lesions against the pleura and between vessels); hull additions farther than 8 mm from
    aerated lung are dropped (the heart and mediastinum in a lung's concavity).  Used for
    both detectors alike.
    """
    from skimage.morphology import convex_hull_object, disk

    air = ndi.median_filter(np.asarray(hu, np.float32), size=3) < -500.0
    r = max(1, round(3.0 / spacing_rc[0]))
    opened = ndi.binary_opening(air, structure=disk(r))
    lab, n = ndi.label(opened, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= 0.01 * hu.size
    keep[0] = False
    mask = keep[lab]
    if not mask.any():
        return mask
    # the two lungs are hulled apart: split at the least aerated column of the middle third
    w = hu.shape[1]
    prof = air.sum(axis=0)
    split = w // 3 + int(np.argmin(prof[w // 3: 2 * w // 3 + 1]))
    cols = np.arange(w)[None, :]
    hull = np.zeros(hu.shape, dtype=bool)
    for half in (cols < split, cols >= split):
        part = mask & half
        if part.any():
            hull |= np.asarray(convex_hull_object(part, connectivity=2), dtype=bool)
    near = ndi.distance_transform_edt(~(air & hull), sampling=spacing_rc) <= 8.0
    return np.asarray(hull & near, dtype=bool)


def proxy_groups(items: list[tuple[int, tuple[int, int], tuple[float, float]]]) -> dict[int, str]:
    """Group slices that probably come from one patient (their identity is unknown).

    ``items``: (index, (height, width), (parenchyma peak, soft-tissue peak)).  Two slices are
    joined when their indices are at most 3 apart (the set was built patient by patient),
    their sizes differ by under 6% in one dimension and 15% in the other (one crop per
    patient), and their histogram peaks by under 12 levels (one window).  Components of
    that relation are the groups.  This is a proxy: slices of one patient that differ more
    stay apart (a leakage risk that the README states).
    """
    parent = {i: i for i, _, _ in items}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, si, pi in items:
        for j, sj, pj in items:
            if j <= i or j - i > 3:
                continue
            d = sorted(abs(a - b) / max(a, b) for a, b in zip(si, sj, strict=True))
            if d[0] < 0.06 and d[1] < 0.15 and max(abs(pi[0] - pj[0]), abs(pi[1] - pj[1])) < 12:
                parent[find(j)] = find(i)
    return {i: f"g{find(i):03d}" for i, _, _ in items}


def import_semiseg(src: Path, out: Path, site: str = "medseg") -> tuple[list[CaseRecord],
                                                                        dict[str, Any]]:
    """Layout (a): returns the records and the annotated lesions' HU (for realism checks)."""
    from PIL import Image

    imgs = sorted((src / "Imgs").glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
    if not imgs:
        raise DatasetError(f"{src}/Imgs: expected N.jpg images, found none")
    loaded = []
    for p in imgs:
        gt = src / "GT" / f"{p.stem}.png"
        if not gt.is_file():
            raise DatasetError(f"{p}: expected its mask {gt}, found none")
        img = np.asarray(Image.open(p).convert("L"))
        mask = np.asarray(Image.open(gt))
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != img.shape or not set(np.unique(mask).tolist()) <= {0, 1, 2}:
            raise DatasetError(f"{gt}: expected a {img.shape} mask of 0/1/2, got "
                               f"{mask.shape} with values {np.unique(mask)[:8].tolist()}")
        # stored turned by 90 degrees (rows run left-right, the spine on the right): turn
        # clockwise so that rows run anterior -> posterior (spine at the bottom)
        loaded.append((p.stem, np.rot90(img, -1).copy(), np.rot90(mask, -1).astype(np.uint8)))
    index = {stem: k for k, (stem, _, _) in enumerate(loaded)}
    anchors = {stem: histogram_anchors(img) for stem, img, _ in loaded}
    groups = proxy_groups([(int(stem) if stem.isdigit() else index[stem], img.shape,
                            anchors[stem]) for stem, img, _ in loaded])
    records = []
    stats: dict[str, Any] = {"ggo": [], "consolidation": []}
    for stem, img, mask in loaded:
        key = int(stem) if stem.isdigit() else index[stem]
        px = ASSUMED_WIDTH_MM / img.shape[1]
        hu = intensity_to_hu(img)
        stats["ggo"] += hu[mask == 1][::7].tolist()
        stats["consolidation"] += hu[mask == 2][::7].tolist()
        region = slice_lung_region(hu, (px, px))
        records.append(save_case(
            out, id=f"{site}-{stem}", site=site, source="semiseg",
            group=f"{site}-{groups[key]}", hu=hu[None], label=mask[None], region=region[None],
            spacing_rc=(px, px), slice_mm=5.0,
            note="8-bit image, HU approximated; pixel size assumed"))
    a = np.array(list(anchors.values()))
    stats["anchors_median"] = [float(np.median(a[:, 0])), float(np.median(a[:, 1]))]
    log.info("semiseg %s: %d slices in %d proxy groups; anchor medians %s", src, len(records),
             len({r.group for r in records}), stats["anchors_median"])
    return records, stats


# --------------------------------------------------------------------------- (d) ma20


def import_ma20(src: Path, out: Path, site: str = "ma20",
                fixed_splits: bool = False) -> list[CaseRecord]:
    """Layout (d): one case per volume group (see the module docstring).  With
    ``fixed_splits`` each volume keeps the split the lung model gave its patient
    (:func:`pipeline.train.lungs.split_groups` with the default seed), so that neither model
    is tested on a patient the other trained on."""
    from ..config import LungTrainConfig
    from ..representation import NOMINAL_FIELD_MM, SIZE
    from .lungs import read_ma20, split_groups

    try:
        img, lung, inf, groups = read_ma20(src)
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{src}: expected the ma20 layout (ct/, lungs/, infection/ "
                           f"NNNN.png and volumes.csv), got {e}") from e
    px = NOMINAL_FIELD_MM / SIZE
    g = np.array(groups)
    fixed = {grp: split for split, gs in split_groups(groups, LungTrainConfig()).items()
             for grp in gs} if fixed_splits else {}
    records = []
    for name in sorted(set(groups)):
        sel = np.nonzero(g == name)[0]
        label = np.where(inf[sel] > 0, LESION_ANY, 0).astype(np.uint8)
        records.append(save_case(
            out, id=f"{site}-{name}", site=site, source="ma20", group=f"{site}-{name}",
            hu=img[sel].astype(np.int16), label=label, region=lung[sel] > 0,
            spacing_rc=(px, px), slice_mm=0.0, intensity="ma20", fov="full",
            fixed_split=fixed.get(name, ""),
            note="8-bit recipe image (no HU); slices not contiguous; pixel size nominal"))
    log.info("ma20 %s: %d slices in %d volumes", src, len(img), len(records))
    return records


# --------------------------------------------------------------------------- (b) volumes


def _dirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir()) if p.is_dir() else []


_IMAGE_NAMES = ("image.nii.gz", "image.nii", "image.nrrd", "image.mha")
_LABEL_NAMES = ("label.nii.gz", "label.nii", "label.nrrd", "label.mha")
_SEG_NAMES = ("label.dcm", "seg.dcm")


def _case_image(case: Path) -> Path | None:
    for n in _IMAGE_NAMES:
        if (case / n).is_file():
            return case / n
    if (case / "image").is_dir():
        return case / "image"
    return None


def read_dicom_series(folder: Path) -> tuple[Volume, list[Any]]:
    """A folder of one DICOM CT series -> (HU volume, datasets in slice order)."""
    import pydicom

    from ..config import VolumeConfig
    from ..volume import build_volume

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except (pydicom.errors.InvalidDicomError, OSError) as e:
            log.debug("skipping %s: %s", f, e)
    if not datasets:
        raise DatasetError(f"{folder}: expected DICOM files of one CT series, found none")
    return build_volume(datasets, VolumeConfig())


def read_image(path: Path) -> tuple[Volume, list[Any]]:
    if path.is_dir():
        return read_dicom_series(path)
    import SimpleITK as sitk

    return volume_from_sitk(sitk.ReadImage(str(path))), []


def _read_seg_labels(path: Path, sources: list[Any], shape: tuple[int, int, int]) -> U8:
    """A DICOM SEG -> LESION labels on the CT grid (segments named GGO / consolidation)."""
    import highdicom as hd

    if not sources:
        raise DatasetError(f"{path}: a DICOM SEG needs the CT as DICOM (image/), got a file")
    seg = hd.seg.segread(str(path))
    wanted: dict[int, int] = {}
    for item in seg.SegmentSequence:
        text = str(item.SegmentLabel).lower()
        if "ground" in text or "ggo" in text:
            wanted[int(item.SegmentNumber)] = 1
        elif "consolidation" in text:
            wanted[int(item.SegmentNumber)] = 2
    out = np.zeros(shape, dtype=np.uint8)
    if not wanted:
        log.warning("%s: no ground-glass or consolidation segment; labels stay empty", path)
        return out
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    referenced = {str(u) for _, _, u in seg.get_source_image_uids()}
    present = [k for k, u in enumerate(uids) if u in referenced]
    if not present:
        return out
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[uids[k] for k in present],
        segment_numbers=list(wanted), assert_missing_frames_are_empty=False)
    for j, (_, value) in enumerate(wanted.items()):
        on = px[..., j] > 0
        for i, k in enumerate(present):
            out[k][on[i] & (out[k] < value)] = value  # consolidation wins over GGO
    return out


def import_volumes(src: Path, out: Path, margin_mm: float = 15.0) -> list[CaseRecord]:
    """Layout (b): ROOT/<site>/<case>/ with an image and a lesion label."""
    import SimpleITK as sitk

    from ..config import LungsConfig
    from ..lungs import segment_lungs

    records = []
    for site_dir in _dirs(src):
        for case in _dirs(site_dir):
            img_path = _case_image(case)
            if img_path is None:
                log.warning("%s: no image.nii.gz / image/ folder; skipped", case)
                continue
            ct, sources = read_image(img_path)
            lab_path = next((case / n for n in _LABEL_NAMES if (case / n).is_file()), None)
            seg_path = next((case / n for n in _SEG_NAMES if (case / n).is_file()), None)
            if lab_path is not None:
                lv = volume_from_sitk(sitk.ReadImage(str(lab_path)))
                if lv.shape != ct.shape or not np.allclose(lv.affine, ct.affine, atol=1e-2):
                    raise DatasetError(f"{lab_path}: expected the image's grid {ct.shape}, got "
                                       f"{lv.shape} (or another position / orientation)")
                label = np.asarray(lv.array, dtype=np.uint8)
            elif seg_path is not None:
                label = _read_seg_labels(seg_path, sources, ct.shape)
            else:
                raise DatasetError(f"{case}: expected label.nii.gz or seg.dcm beside the image")
            bad = set(np.unique(label).tolist()) - {0, 1, 2, IGNORE}
            if bad:
                raise DatasetError(f"{case}: expected labels 0/1/2/255, got also {sorted(bad)}")
            lungs = segment_lungs(ct, LungsConfig(method="classical")).mask()
            found = ndi.find_objects(lungs.astype(np.uint8))
            if not found or found[0] is None:
                log.warning("%s: no lungs found; skipped", case)
                continue
            ks, rs, cs = found[0]
            sp = ct.spacing
            mr, mc = round(margin_mm / sp[1]), round(margin_mm / sp[2])
            box = (ks, slice(max(0, rs.start - mr), rs.stop + mr),
                   slice(max(0, cs.start - mc), cs.stop + mc))
            records.append(save_case(
                out, id=f"{site_dir.name}-{case.name}", site=site_dir.name, source="volume",
                group=f"{site_dir.name}-{case.name}", hu=ct.array[box], label=label[box],
                region=lungs[box], spacing_rc=(sp[1], sp[2]), slice_mm=sp[0]))
            log.info("volume %s/%s: %d slices with lung", site_dir.name, case.name,
                     ks.stop - ks.start)
    if not records:
        raise DatasetError(f"{src}: expected SITE/CASE/ folders with an image and a label")
    return records
