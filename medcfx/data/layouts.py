"""Dataset layouts: find the cases, their channel files, masks and labels on disk (no pixel data read).

:func:`detect_layout` recognises a folder or file; :func:`load_layout` reads it as a named kind. Both return
a :class:`Layout` whose ``problems`` lists EVERY problem found while scanning (a missing modality, a
labels.csv naming a missing file, a value that is not 0/1, ...): the scan never stops at the first. Reading
pixel data (NaN, shapes, corrupt files) is left to :func:`medcfx.data.check.check` and the preprocessing.

Kinds (``LAYOUT_KINDS``):

``brats``
    A folder of case folders, each with ``<case>_t1``, ``_t1ce``, ``_t2``, ``_flair`` (``.nii.gz`` or
    ``.nii``) and an optional ``_seg``; BraTS 2023 names ``<case>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``,
    ``-seg`` map onto t1, t1ce, t2, flair, seg. A path that is itself one case folder is a dataset of one
    case. Channels are the requested ``modalities`` in that order (default t1, t1ce, t2, flair); label
    ``unhealthy`` per slice from the segmentation (unknown when a case has no ``_seg``).
``folder``
    ``normal/`` and ``abnormal/`` image folders (either may be absent, not both) and an optional ``masks/``
    whose files carry the names of the ``abnormal/`` images (the suffix may differ). One label
    ``abnormal`` (0 normal, 1 abnormal). With ``masks/``, normal images count as "known lesion-free".
    A plain folder of images (none of the other layouts' markers) is the same layout with every image
    unlabelled: what unsupervised training (diffae, the mediffusion autoencoder) needs.
``csv``
    A ``labels.csv`` (the path of the csv, or a folder holding one): first column ``file`` (relative to the
    csv's folder); columns ``grade`` (integer, may be empty), ``split`` (train/val/test, may be empty),
    ``bbox_<label>`` (``x0;y0;x1;y1`` pixel coordinates, x along the width; empty = no box), ``meta_<name>``
    (free-form per-image information, ignored by the reader); every other column is a label with values
    0/1 (an empty cell = unlabelled, NaN).
``nnunet``
    nnU-Net raw: ``dataset.json`` (``channel_names`` or ``modality``; ``labels``; ``file_ending``),
    ``imagesTr/<case>_0000<ending>`` ... per channel, ``labelsTr/<case><ending>``. 3D (NIfTI) or 2D
    (``.png``). Label ``unhealthy`` = any label value > 0 in the slice.
``decathlon``
    Medical Segmentation Decathlon: ``dataset.json`` (``modality`` {"0": "FLAIR", ...}, ``training``
    [{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}, ...], ``test`` [paths]) with ONE
    file per case holding every channel along the 4th axis (no ``_0000`` suffix). ``Case.channels`` repeats
    that file and ``Case.frames`` gives the 4th-axis index of each channel (None for single-channel 3D
    files); MRI channels are selected and ordered by ``modalities`` as in ``brats``. Label ``unhealthy``,
    mask the ``labelsTr`` file; ``test`` cases have no mask and split ``test``.
``npz``
    MedMNIST-style ``.npz``: ``train_images``/``train_labels`` (and ``val_``, ``test_``), images
    [N, H, W] or [N, H, W, C] uint8. Labels: one 0/1 column -> label ``label``; several columns
    (multi-label) -> ``label_0`` ...; one integer column with values above 1 (multi-class) -> one-hot
    ``class_0`` ... and the class index also as ``grade``.
``bids``
    A BIDS dataset: ``dataset_description.json`` and ``sub-<label>/[ses-<label>/]anat/`` NIfTI files; one
    case per subject or session (id ``sub-X`` or ``sub-X_ses-Y``), channels by BIDS suffix chosen and ordered
    by ``modalities`` (t1 ``_T1w``, t1ce ``_ce-<agent>_T1w``, t2 ``_T2w``, flair ``_FLAIR``), lesion masks
    from ``derivatives/<pipeline>/`` (never ``derivatives/medcfx``). A ``sub-*`` (or ``sub-*/ses-*``)
    folder of such a dataset is that subject (session). See :mod:`medcfx.data.layouts_bids`.
``dicom``
    A folder holding one DICOM series (every file DICOM, the first with ImagePositionPatient and
    ImageOrientationPatient): one single-channel volume case named after the folder, read by
    :func:`medcfx.data.dicom.read_dicom_series`. A folder of radiographs (no position) is a ``folder``.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


from medcfx.data.io import (
    IMAGE_SUFFIXES,
    is_image_file,
    is_volume_file,
    strip_suffix,
    suffix_of,
)
from medcfx.errors import MedcfxError, UsageError

LAYOUT_KINDS = ("brats", "folder", "csv", "nnunet", "decathlon", "bids", "npz", "dicom")
MODALITIES = ("t1", "t1ce", "t2", "flair")
SPLITS = ("train", "val", "test")

# every spelling of a modality that medcfx maps onto the canonical names (case-insensitive)
MODALITY_ALIASES = {
    "t1": ("t1", "t1n", "t1w", "t1-native", "t1_native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1-gd", "t1_gd", "t1post", "t1-ce", "t1_ce", "t1wce", "t1c+"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2-flair", "t2_flair", "t2flair"),
}
_ALIAS_TO_CANON = {alias: canon for canon, aliases in MODALITY_ALIASES.items() for alias in aliases}

# BraTS file name suffixes: <case>_t1ce.nii.gz (2018-2021) and <case>-t1c.nii.gz (2023)
_BRATS_SUFFIX = re.compile(r"^(?P<case>.+?)[_-](?P<mod>t1ce|t1c|t1n|t1|t2w|t2f|t2|flair|seg)$", re.IGNORECASE)


def canonical_modality(name: str) -> str | None:
    """``"T1Gd"`` -> ``"t1ce"``, ``"t2f"`` -> ``"flair"``; None when the name is not an MRI modality alias."""
    return _ALIAS_TO_CANON.get(name.strip().lower())


def resolve_modalities(modalities: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate a modality list (aliases allowed) into canonical names, in the given order."""
    if modalities is None:
        return MODALITIES
    if isinstance(modalities, str):
        modalities = [m for m in modalities.split(",") if m.strip()]
    out = []
    for m in modalities:
        canon = canonical_modality(str(m))
        if canon is None:
            raise UsageError(f"unknown modality {m!r}; known: {', '.join(MODALITIES)} (or BraTS 2023 t1n, t1c, t2w, t2f)")
        if canon in out:
            raise UsageError(f"modality {m!r} given twice (as {canon})")
        out.append(canon)
    if not out:
        raise UsageError("the modality list is empty")
    return tuple(out)


@dataclass
class Case:
    """One case: its channel files in the layout's channel order, optional mask, labels and annotations.

    ``labels`` maps label name -> 1.0 / 0.0 / NaN (unlabelled). ``grade`` is NaN when absent. ``bbox`` maps a
    label name -> (x0, y0, x1, y1) in pixel coordinates of the original image. ``mask_empty`` marks an
    image known to have no lesion (a normal image in a layout with masks). ``item`` addresses a row in an
    array file (npz: ``("train", 17)``). ``frames`` (decathlon) gives, per channel, its index along the 4th
    axis of a 4D file (read with ``read_volume(channels[i], frame=frames[i])``); None when each channel
    file is 3D.
    """

    id: str
    channels: list[Path]
    mask: Path | None = None
    labels: dict[str, float] = field(default_factory=dict)
    grade: float = math.nan
    bbox: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    split: str | None = None
    item: tuple[str, int] | None = None
    mask_empty: bool = False
    frames: list[int] | None = None  # 4th-axis index of each channel in its file; None: 3D channel files

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_empty


@dataclass
class Layout:
    """A scanned dataset. ``dims`` is 3 for NIfTI volumes (sliced) and 2 for images."""

    kind: str
    root: Path
    cases: list[Case]
    channels: list[str]
    label_names: list[str]
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    dims: int = 3
    extra_files: list[Path] = field(default_factory=list)  # labels.csv, dataset.json: part of the fingerprint

    def files(self) -> list[Path]:
        """Every input file (channels, masks, csv/json), sorted and without repeats."""
        seen: set[Path] = set(self.extra_files)
        for c in self.cases:
            seen.update(c.channels)
            if c.mask is not None:
                seen.add(c.mask)
        return sorted(seen)

    @property
    def has_masks(self) -> bool:
        return any(c.has_mask for c in self.cases)

    def summary(self) -> str:
        return f"{self.kind} dataset at {self.root}: {len(self.cases)} case(s), channels {', '.join(self.channels)}"


# ---------------------------------------------------------------------------------------------------------
# detection


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and not p.name.startswith("_")


def list_visible(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if _visible(p))
    except OSError as exc:
        raise MedcfxError(f"cannot list {path}: {exc.strerror or exc}") from None


def _brats_files(folder: Path) -> list[Path]:
    return [p for p in list_visible(folder) if p.is_file() and is_volume_file(p) and _BRATS_SUFFIX.match(strip_suffix(p))]


def detect_kind(path: str | Path) -> str:
    """The layout kind of ``path`` (see the module docstring), or a MedcfxError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise MedcfxError(f"{path}: no such file or folder")
    if path.is_file():
        suf = suffix_of(path)
        if suf == ".npz":
            return "npz"
        if suf == ".csv":
            return "csv"
        if path.name == "dataset.json":
            from medcfx.data.layouts_nnunet import is_decathlon

            return "decathlon" if is_decathlon(path.parent) else "nnunet"
        if path.name == "dataset_description.json":
            return "bids"
        raise MedcfxError(f"{path}: a dataset is a folder, a labels.csv or a .npz file, not a {suf or 'suffix-less'} file")
    entries = list_visible(path)
    if not entries:
        raise MedcfxError(f"{path}: folder is empty")
    names = {p.name for p in entries}
    if "dataset.json" in names and "imagesTr" in names:
        from medcfx.data.layouts_nnunet import is_decathlon

        return "decathlon" if is_decathlon(path) else "nnunet"
    from medcfx.data.layouts_bids import bids_root

    if bids_root(path) is not None:  # before brats: BIDS anat names end in _T2w / _FLAIR too
        return "bids"
    if "labels.csv" in names:
        return "csv"
    if ("normal" in names and (path / "normal").is_dir()) or ("abnormal" in names and (path / "abnormal").is_dir()):
        return "folder"
    if _brats_files(path):
        return "brats"
    subdirs = [p for p in entries if p.is_dir()]
    if any(_brats_files(d) for d in subdirs):
        return "brats"
    npz = [p for p in entries if p.is_file() and suffix_of(p) == ".npz"]
    if len(npz) == 1:
        return "npz"
    from medcfx.data.dicom import is_dicom_series

    if is_dicom_series(path):
        return "dicom"  # one DICOM series: a volume
    if any(p.is_file() and is_image_file(p) for p in entries):
        return "folder"  # a plain folder of images: unlabelled (unsupervised training)
    raise MedcfxError(
        f"{path}: no known dataset layout found; expected BraTS case folders (<case>/<case>_t1.nii.gz ...), "
        "normal/ + abnormal/ image folders, a labels.csv, an nnU-Net or Decathlon folder (dataset.json + imagesTr/), a BIDS dataset "
        "(dataset_description.json + sub-*/anat/) or a .npz"
    )


def detect_layout(path: str | Path, modalities: Sequence[str] | None = None) -> Layout:
    """Recognise the layout of ``path`` and scan it (see :func:`load_layout`)."""
    return load_layout(path, detect_kind(path), modalities=modalities)


def load_layout(path: str | Path, kind: str, modalities: Sequence[str] | None = None) -> Layout:
    """Scan ``path`` as layout ``kind``. ``modalities`` selects and orders MRI channels (brats, nnunet, decathlon,
    bids).

    Returns a :class:`Layout` (its ``problems`` list every problem found). Errors (MedcfxError): unknown
    kind (UsageError), no such path, a structure the kind cannot read at all (no dataset.json, ...).
    """
    path = Path(path)
    if kind not in LAYOUT_KINDS:
        raise UsageError(f"unknown layout kind {kind!r}; choose one of: {', '.join(LAYOUT_KINDS)}")
    if not path.exists():
        raise MedcfxError(f"{path}: no such file or folder")
    mods = resolve_modalities(modalities)
    if kind == "brats":
        return _scan_brats(path, mods)
    if kind == "folder":
        return _scan_folder(path)
    if kind == "csv":
        return _scan_csv(path)
    if kind == "nnunet":
        from medcfx.data.layouts_nnunet import scan_nnunet

        return scan_nnunet(path, mods)
    if kind == "decathlon":
        from medcfx.data.layouts_nnunet import scan_decathlon

        return scan_decathlon(path, mods)
    if kind == "bids":
        from medcfx.data.layouts_bids import scan_bids

        return scan_bids(path, mods)
    if kind == "dicom":
        return scan_dicom_series(path)
    from medcfx.data.layouts_npz import scan_npz

    return scan_npz(path)


def scan_dicom_series(path: Path) -> Layout:
    """A folder holding one DICOM series: a dataset of one single-channel volume case (its files are part of
    the fingerprint; :func:`medcfx.data.io.read_volume` reads the folder)."""
    from medcfx.data.dicom import dicom_files

    if not path.is_dir():
        raise MedcfxError(f"{path}: a DICOM series is a folder of DICOM files")
    files = dicom_files(path)
    if not files:
        raise MedcfxError(f"{path}: no DICOM files (none carries the DICM marker)")
    case = Case(id=path.name, channels=[path], labels={"unhealthy": math.nan})
    return Layout("dicom", path.parent, [case], ["image"], ["unhealthy"], [], [f"one DICOM series of {len(files)} file(s)"],
                  dims=3, extra_files=files)


# ---------------------------------------------------------------------------------------------------------
# BraTS


def _scan_brats(path: Path, modalities: tuple[str, ...]) -> Layout:
    if not path.is_dir():
        raise MedcfxError(f"{path}: a BraTS dataset is a folder of case folders")
    problems: list[str] = []
    info: list[str] = []
    if _brats_files(path):
        case_dirs = [path]
        root = path
    else:
        entries = list_visible(path)
        if not entries:
            raise MedcfxError(f"{path}: folder is empty")
        case_dirs = [p for p in entries if p.is_dir()]
        root = path
        stray = [p.name for p in entries if p.is_file() and is_volume_file(p)]
        if stray:
            problems.append(f"{path}: NIfTI file(s) outside a case folder: {', '.join(stray[:5])}")
    cases: list[Case] = []
    no_seg = []
    for d in case_dirs:
        files = list_visible(d)
        found: dict[str, list[Path]] = {}
        for f in files:
            if not f.is_file() or not is_volume_file(f):
                continue
            m = _BRATS_SUFFIX.match(strip_suffix(f))
            if not m:
                continue
            mod = m.group("mod").lower()
            mod = "seg" if mod == "seg" else _ALIAS_TO_CANON[mod]
            found.setdefault(mod, []).append(f)
        if not found:
            problems.append(f"{d}: no BraTS NIfTI files (<case>_t1.nii.gz, _t1ce, _t2, _flair or 2023 -t1n, -t1c, -t2w, -t2f)")
            continue
        channel_paths: list[Path] = []
        ok = True
        for mod in modalities:
            got = found.get(mod, [])
            if not got:
                problems.append(f"{d}: case {d.name} is missing modality {mod} (expected {d.name}_{mod}.nii.gz)")
                ok = False
            elif len(got) > 1:
                problems.append(f"{d}: modality {mod} given by several files: {', '.join(p.name for p in got)}")
                ok = False
            else:
                channel_paths.append(got[0])
        segs = found.get("seg", [])
        if len(segs) > 1:
            problems.append(f"{d}: several segmentation files: {', '.join(p.name for p in segs)}")
            ok = False
        if not ok:
            continue
        seg = segs[0] if segs else None
        if seg is None:
            no_seg.append(d.name)
        labels = {"unhealthy": math.nan}
        cases.append(Case(id=d.name, channels=channel_paths, mask=seg, labels=labels))
    if not case_dirs:
        problems.append(f"{path}: no case folders")
    if no_seg:
        info.append(f"{len(no_seg)} case(s) without a segmentation (slice labels unknown): {', '.join(no_seg[:5])}"
                    + (" ..." if len(no_seg) > 5 else ""))
    return Layout("brats", root, cases, list(modalities), ["unhealthy"], problems, info, dims=3)


# ---------------------------------------------------------------------------------------------------------
# image folders


def _image_files(folder: Path, problems: list[str]) -> list[Path]:
    out = []
    for p in list_visible(folder):
        if p.is_dir():
            continue
        if is_image_file(p):
            out.append(p)
        elif is_volume_file(p):
            problems.append(f"{p}: a NIfTI volume in a 2D image folder")
    return out


def _scan_folder(path: Path) -> Layout:
    if not path.is_dir():
        raise MedcfxError(f"{path}: an image-folder dataset is a folder with normal/ and/or abnormal/")
    problems: list[str] = []
    info: list[str] = []
    normal_dir, abnormal_dir, masks_dir = path / "normal", path / "abnormal", path / "masks"
    if not normal_dir.is_dir() and not abnormal_dir.is_dir():
        plain = _image_files(path, problems)
        if not plain:
            raise MedcfxError(f"{path}: expected a normal/ and/or an abnormal/ folder, or image files")
        cases = [Case(id=p.name, channels=[p], labels={"abnormal": math.nan}) for p in plain]
        return Layout("folder", path, cases, ["image"], ["abnormal"], problems,
                      [f"{len(cases)} unlabelled image(s) (a plain image folder)"], dims=2)
    normal = _image_files(normal_dir, problems) if normal_dir.is_dir() else []
    abnormal = _image_files(abnormal_dir, problems) if abnormal_dir.is_dir() else []
    for d, files in ((normal_dir, normal), (abnormal_dir, abnormal)):
        if d.is_dir() and not files:
            problems.append(f"{d}: folder holds no images")
    have_masks = masks_dir.is_dir()
    masks: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    if have_masks:
        for m in _image_files(masks_dir, problems):
            masks[m.name] = m
            by_stem.setdefault(strip_suffix(m), []).append(m)
    cases: list[Case] = []
    used: set[Path] = set()
    for p in normal:
        cases.append(Case(id=f"normal/{p.name}", channels=[p], labels={"abnormal": 0.0}, mask_empty=have_masks))
    missing = []
    for p in abnormal:
        mask = None
        if have_masks:
            mask = masks.get(p.name)
            if mask is None:
                cands = by_stem.get(strip_suffix(p), [])
                if len(cands) == 1:
                    mask = cands[0]
                elif len(cands) > 1:
                    problems.append(f"{p}: several masks match: {', '.join(c.name for c in cands)}")
            if mask is None:
                missing.append(p.name)
            else:
                used.add(mask)
        cases.append(Case(id=f"abnormal/{p.name}", channels=[p], mask=mask, labels={"abnormal": 1.0}))
    if have_masks:
        orphans = sorted(m.name for m in masks.values() if m not in used)
        for name in orphans:
            problems.append(f"{masks_dir / name}: mask without an image of the same name in abnormal/")
        if missing:
            info.append(f"{len(missing)} abnormal image(s) without a mask: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return Layout("folder", path, cases, ["image"], ["abnormal"], problems, info, dims=2)


# ---------------------------------------------------------------------------------------------------------
# labels.csv


def _parse_01(value: str) -> float | None:
    """'1' / '0' / '1.0' / '' -> 1.0 / 0.0 / 1.0 / NaN; anything else None."""
    v = value.strip()
    if v == "":
        return math.nan
    try:
        f = float(v)
    except ValueError:
        return None
    return f if f in (0.0, 1.0) else None


def _parse_bbox(value: str) -> tuple[float, float, float, float] | None | str:
    v = value.strip()
    if not v:
        return None
    parts = [p.strip() for p in v.split(";")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        return "not numbers"
    if len(nums) != 4:
        return f"{len(nums)} numbers instead of 4"
    x0, y0, x1, y1 = nums
    if not all(math.isfinite(n) for n in nums) or x1 <= x0 or y1 <= y0 or min(nums) < 0:
        return "needs 0 <= x0 < x1 and 0 <= y0 < y1"
    return (x0, y0, x1, y1)


def _scan_csv(path: Path) -> Layout:
    csv_path = path / "labels.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise MedcfxError(f"{path}: no labels.csv")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedcfxError(f"cannot read {csv_path}: {type(exc).__name__}: {exc}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise MedcfxError(f"{csv_path}: file is empty (expected a header row starting with 'file')")
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "file":
        raise MedcfxError(f"{csv_path}: the first column must be 'file', got {header[0] if header else ''!r}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise MedcfxError(f"{csv_path}: duplicate column(s): {', '.join(dup)}")
    if "" in header:
        raise MedcfxError(f"{csv_path}: a column has an empty name")
    label_cols = [h for h in header[1:] if h not in ("grade", "split") and not h.startswith(("bbox_", "meta_"))]
    bbox_cols = [h for h in header if h.startswith("bbox_")]
    problems: list[str] = []
    info: list[str] = []
    for b in bbox_cols:
        if b[5:] not in label_cols:
            problems.append(f"{csv_path}: column {b} names no label column ({b[5:]!r} is not a column)")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    col = {h: i for i, h in enumerate(header)}
    for lineno, row in enumerate(rows[1:], start=2):
        where = f"{csv_path.name} line {lineno}"
        if len(row) != len(header):
            problems.append(f"{where}: {len(row)} cells, the header has {len(header)}")
            continue
        rel = row[0].strip()
        if not rel:
            problems.append(f"{where}: empty 'file' cell")
            continue
        file = (base / rel)
        if rel in seen:
            problems.append(f"{where}: file {rel} already listed on line {seen[rel]}")
            continue
        seen[rel] = lineno
        bad = False
        if not file.is_file():
            problems.append(f"{where}: file {rel} not found (looked for {file})")
            bad = True
        elif not is_image_file(file):
            if is_volume_file(file):
                problems.append(f"{where}: {rel} is a NIfTI volume; a labels.csv lists 2D images ({', '.join(IMAGE_SUFFIXES)})")
            else:
                problems.append(f"{where}: {rel} has an unsupported file type; supported: {', '.join(IMAGE_SUFFIXES)}")
            bad = True
        labels = {}
        for name in label_cols:
            v = _parse_01(row[col[name]])
            if v is None:
                problems.append(f"{where}: column {name} must be 0, 1 or empty, got {row[col[name]]!r}")
                bad = True
            else:
                labels[name] = v
        grade = math.nan
        if "grade" in col and row[col["grade"]].strip():
            g = row[col["grade"]].strip()
            try:
                gf = float(g)
                if not gf.is_integer():
                    raise ValueError
                grade = float(gf)
            except ValueError:
                problems.append(f"{where}: grade must be an integer or empty, got {g!r}")
                bad = True
        split = None
        if "split" in col and row[col["split"]].strip():
            split = row[col["split"]].strip().lower()
            if split not in SPLITS:
                problems.append(f"{where}: split must be one of {', '.join(SPLITS)} or empty, got {row[col['split']]!r}")
                bad = True
        boxes = {}
        for b in bbox_cols:
            parsed = _parse_bbox(row[col[b]])
            if isinstance(parsed, str):
                problems.append(f"{where}: {b} must be 'x0;y0;x1;y1' ({parsed}), got {row[col[b]]!r}")
                bad = True
            elif parsed is not None:
                boxes[b[5:]] = parsed
        if not bad:
            cases.append(Case(id=rel, channels=[file], labels=labels, grade=grade, bbox=boxes, split=split))
    if len(rows) == 1:
        problems.append(f"{csv_path}: no rows below the header")
    if not label_cols:
        info.append(f"{csv_path.name}: no label columns")
    return Layout("csv", base, cases, ["image"], label_cols, problems, info, dims=2, extra_files=[csv_path])
