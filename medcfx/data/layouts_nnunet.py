"""Layouts of the nnU-Net raw format and the Medical Segmentation Decathlon (see :mod:`medcfx.data.layouts`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from medcfx.data.io import VOLUME_SUFFIXES, is_volume_file, strip_suffix
from medcfx.data.layouts import (
    Case,
    Layout,
    list_visible,
    canonical_modality,
)
from medcfx.errors import MedcfxError

# ---------------------------------------------------------------------------------------------------------
# nnU-Net raw


def _dataset_json(root: Path, what: str) -> tuple[Path, dict]:
    js = root / "dataset.json"
    if not js.is_file():
        raise MedcfxError(f"{root}: no dataset.json (an {what} dataset needs dataset.json and imagesTr/)")
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError) as exc:
        raise MedcfxError(f"cannot read {js}: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict):
        raise MedcfxError(f"{js}: expected a JSON object")
    return js, meta


def _channel_table(js: Path, meta: dict) -> tuple[list[str], list[int]]:
    """(channel names, channel numbers) from dataset.json's channel_names / modality, in channel order."""
    names = meta.get("channel_names", meta.get("modality"))
    if not isinstance(names, dict) or not names:
        raise MedcfxError(f"{js}: needs a 'channel_names' (or 'modality') mapping like {{\"0\": \"T1\"}}")
    try:
        order = sorted(names, key=lambda k: int(k))
    except ValueError:
        raise MedcfxError(f"{js}: channel_names keys must be channel numbers \"0\", \"1\", ...") from None
    return [str(names[k]) for k in order], [int(k) for k in order]


def _select_channels(js: Path, channel_names: list[str], channel_ids: list[int], modalities: tuple[str, ...],
                     problems: list[str], info: list[str]) -> tuple[list[int], list[str]]:
    """MRI channel names (T1, T1Gd, FLAIR ...) are selected and ordered by ``modalities``; otherwise all are used."""
    canon = [canonical_modality(n) for n in channel_names]
    if all(c is not None for c in canon) and len(set(canon)) == len(canon):
        present = [m for m in modalities if m in canon]
        missing = [m for m in modalities if m not in canon]
        if missing:
            problems.append(f"{js}: no channel for modality {', '.join(missing)} (channels: {', '.join(channel_names)})")
        return [channel_ids[canon.index(m)] for m in present], present
    info.append(f"channels {', '.join(channel_names)} are not all MRI modalities: all are used, in dataset.json order")
    return list(channel_ids), list(channel_names)


def scan_nnunet(path: Path, modalities: tuple[str, ...]) -> Layout:
    root = path.parent if path.is_file() else path
    js, meta = _dataset_json(root, "nnU-Net raw")
    channel_names, channel_ids = _channel_table(js, meta)
    ending = meta.get("file_ending", ".nii.gz")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    problems: list[str] = []
    info: list[str] = []
    if not images_dir.is_dir():
        raise MedcfxError(f"{root}: no imagesTr/ folder")
    pat = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
    found: dict[str, dict[int, Path]] = {}
    for f in list_visible(images_dir):
        if not f.is_file():
            continue
        if not f.name.endswith(ending):
            problems.append(f"{f}: file does not end in {ending} (dataset.json file_ending)")
            continue
        m = pat.match(f.name[: -len(ending)])
        if not m:
            problems.append(f"{f}: name is not <case>_XXXX{ending}")
            continue
        found.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if not found:
        problems.append(f"{images_dir}: no images")
    select, channels = _select_channels(js, channel_names, channel_ids, modalities, problems, info)
    dims = 2 if ending.lower() in (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg") else 3
    if dims == 3 and ending not in VOLUME_SUFFIXES:
        raise MedcfxError(f"{js}: file_ending {ending} not supported (use .nii.gz, .nii or .png)")
    cases = []
    for case_id in sorted(found):
        chans = found[case_id]
        absent = [f"{i:04d}" for i in channel_ids if i not in chans]
        if absent:
            problems.append(f"{images_dir}: case {case_id} is missing channel file(s) {', '.join(f'{case_id}_{a}{ending}' for a in absent)}")
            continue
        extra = sorted(set(chans) - set(channel_ids))
        if extra:
            problems.append(f"{images_dir}: case {case_id} has channel(s) {extra} not in dataset.json")
        seg = labels_dir / f"{case_id}{ending}"
        mask = seg if seg.is_file() else None
        cases.append(Case(id=case_id, channels=[chans[i] for i in select], mask=mask, labels={"unhealthy": math.nan}))
    if labels_dir.is_dir():
        known = set(found)
        for f in list_visible(labels_dir):
            if f.is_file() and f.name.endswith(ending) and f.name[: -len(ending)] not in known:
                problems.append(f"{f}: label without images in imagesTr/")
        no_label = [c.id for c in cases if c.mask is None]
        if no_label:
            info.append(f"{len(no_label)} case(s) without a label file: {', '.join(no_label[:5])}")
    return Layout("nnunet", root, cases, channels, ["unhealthy"], problems, info, dims=dims, extra_files=[js])


# ---------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon

_CHANNEL_FILE = re.compile(r"_\d{4}$")


def _listed(root: Path, rel: object) -> Path | None:
    """dataset.json path ``"./imagesTr/X.nii.gz"`` -> root / imagesTr / X.nii.gz (None when not a string)."""
    return root / str(rel).removeprefix("./") if isinstance(rel, str) and rel.strip() else None


def is_decathlon(root: Path) -> bool:
    """dataset.json with 'modality' and a 'training' list whose image files exist as listed (one file per case)."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or not isinstance(meta.get("modality"), dict) or not isinstance(meta.get("training"), list):
        return False
    for entry in meta["training"][:5]:
        img = _listed(root, entry.get("image") if isinstance(entry, dict) else None)
        if img is not None and img.is_file():
            return img.parent.name == "imagesTr" and not _CHANNEL_FILE.search(strip_suffix(img))
    return False  # nnU-Net v1 lists ./imagesTr/X.nii.gz but stores X_0000.nii.gz ...


def scan_decathlon(path: Path, modalities: tuple[str, ...]) -> Layout:
    root = path.parent if path.is_file() else path
    js, meta = _dataset_json(root, "Medical Segmentation Decathlon")
    channel_names, channel_ids = _channel_table(js, meta)
    training, test = meta.get("training", []), meta.get("test", [])
    if not isinstance(training, list) or not isinstance(test, list):
        raise MedcfxError(f"{js}: 'training' and 'test' must be lists")
    problems: list[str] = []
    info: list[str] = []
    select, channels = _select_channels(js, channel_names, channel_ids, modalities, problems, info)
    frames = select if len(channel_ids) > 1 else None  # one channel: the files are 3D volumes
    cases: list[Case] = []
    seen: dict[str, str] = {}
    listed: set[Path] = set()
    entries = [(e, "training") for e in training] + [(e, "test") for e in test]
    for n, (entry, part) in enumerate(entries):
        where = f"{js.name} {part}[{n if part == 'training' else n - len(training)}]"
        img_rel = entry.get("image") if isinstance(entry, dict) else entry
        img = _listed(root, img_rel)
        if img is None:
            problems.append(f"{where}: no image path (got {entry!r})")
            continue
        listed.add(img)
        if not img.is_file():
            problems.append(f"{where}: image {img_rel} not found (looked for {img})")
            continue
        if not is_volume_file(img):
            problems.append(f"{where}: image {img_rel} is not a NIfTI file ({', '.join(VOLUME_SUFFIXES)})")
            continue
        case_id = strip_suffix(img)
        if case_id in seen:
            problems.append(f"{where}: case {case_id} already listed in {seen[case_id]}")
            continue
        seen[case_id] = where
        mask = None
        lab_rel = entry.get("label") if isinstance(entry, dict) else None
        if lab_rel is not None:
            lab = _listed(root, lab_rel)
            if lab is None or not lab.is_file():
                problems.append(f"{where}: label {lab_rel} not found (looked for {lab})")
            else:
                mask = lab
        cases.append(Case(id=case_id, channels=[img] * len(select), mask=mask, labels={"unhealthy": math.nan},
                          split="test" if part == "test" else None, frames=list(frames) if frames is not None else None))
    if not entries:
        problems.append(f"{js}: 'training' and 'test' list no cases")
    for d in (root / "imagesTr", root / "imagesTs"):
        if d.is_dir():
            extra = [f.name for f in list_visible(d) if f.is_file() and is_volume_file(f) and f not in listed]
            if extra:
                info.append(f"{len(extra)} file(s) in {d.name}/ not listed in dataset.json: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    no_label = [c.id for c in cases if c.mask is None and c.split != "test"]
    if no_label:
        info.append(f"{len(no_label)} training case(s) without a label file: {', '.join(no_label[:5])}")
    return Layout("decathlon", root, cases, channels, ["unhealthy"], problems, info, dims=3, extra_files=[js])
