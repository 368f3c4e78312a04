"""``medcfx data check``: scan a dataset and report EVERY problem at once.

:func:`check` reads the layout (:mod:`medcfx.data.layouts`), then every file: NIfTI headers (shape,
spacing from the header zooms) and data (NaN/inf), 2D images, masks. It never stops at the first problem
and never raises for a problem in the data; a path that is not a dataset at all (missing, empty folder, no
known layout) becomes the report's only problem.

Problems (the dataset cannot be used as is): missing modality, modalities of different shapes, a
segmentation on another grid, an unreadable/corrupt/truncated file, NaN or inf values, a 4D file where a
volume is expected, a labels.csv naming missing files or holding bad values, an all-zero mask in masks/
for an abnormal image, a mask whose size differs from its image, an empty folder.

Info (worth knowing, not wrong): BraTS cases without any lesion voxel, cases without segmentation,
abnormal images without a mask, notes from the readers (alpha dropped, palette converted, ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcfx.data.geometry import MIN_SIDE, axcodes
from medcfx.data.intensity import scale_volume
from medcfx.data.io import read_image, read_volume
from medcfx.data.layouts import Layout, detect_layout, load_layout
from medcfx.data.layouts_npz import iter_npz_rows, npz_member_header
from medcfx.errors import MedcfxError


@dataclass
class Report:
    """What :func:`check` found. ``ok`` is true when ``problems`` is empty."""

    path: Path
    kind: str | None = None
    cases: int = 0
    files: int = 0
    channels: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)  # "240x240x155" -> count of cases
    spacings: dict[str, int] = field(default_factory=dict)  # "1x1x1" -> count of cases
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "ok": self.ok,
            "cases": self.cases,
            "files": self.files,
            "channels": self.channels,
            "label_names": self.label_names,
            "shapes": self.shapes,
            "spacings": self.spacings,
            "label_counts": self.label_counts,
            "splits": self.splits,
            "problems": self.problems,
            "info": self.info,
        }


def _fmt(t) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in t)


def _count_labels(layout: Layout) -> dict[str, dict[str, int]]:
    out = {}
    for name in layout.label_names:
        vals = np.array([c.labels.get(name, np.nan) for c in layout.cases], dtype=float)
        out[name] = {
            "positive": int(np.sum(vals == 1)),
            "negative": int(np.sum(vals == 0)),
            "unlabelled": int(np.sum(np.isnan(vals))),
        }
    return out


def check(path: str | Path, kind: str | None = None, modalities=None) -> Report:
    """Scan ``path`` (layout ``kind`` or detected) and return a :class:`Report` listing every problem."""
    path = Path(path)
    report = Report(path=path)
    try:
        layout = load_layout(path, kind, modalities) if kind else detect_layout(path, modalities)
    except MedcfxError as exc:
        report.problems.append(str(exc))
        return report
    report.kind = layout.kind
    report.cases = len(layout.cases)
    report.channels = list(layout.channels)
    report.label_names = list(layout.label_names)
    report.problems.extend(layout.problems)
    report.info.extend(layout.info)
    report.files = len(layout.files())
    if layout.kind == "npz":
        _check_npz(layout, report)
    elif layout.dims == 3:
        _check_volumes(layout, report)
    else:
        _check_images(layout, report)
    if layout.dims != 3 and layout.kind != "nnunet":  # else labels come from the masks (counted per case)
        report.label_counts = _count_labels(layout)
    splits = Counter(c.split for c in layout.cases if c.split)
    report.splits = dict(sorted(splits.items()))
    if not layout.cases and not report.problems:
        report.problems.append(f"{layout.root}: no cases found")
    return report


def _check_volumes(layout: Layout, report: Report) -> None:
    """Read every case as ``prepare`` does and report what it would refuse (one mechanism: the same
    :func:`~medcfx.data.preprocess.load_volume_case` reader and
    :func:`~medcfx.data.preprocess.volume_case_geometry` checks: one grid, a readable orientation, foreground)."""
    from medcfx.data.preprocess import PreprocessConfig, volume_case_geometry

    cfg = PreprocessConfig()
    shapes: Counter = Counter()
    spacings: Counter = Counter()
    orientations: Counter = Counter()
    lesion = {"with lesion": 0, "without lesion": 0, "no segmentation": 0}
    no_lesion = []
    notes: Counter = Counter()
    for case in layout.cases:
        frames = getattr(case, "frames", None) or [None] * len(case.channels)
        vols = []
        for f, frame in zip(case.channels, frames):
            try:
                vols.append(read_volume(f, frame=frame) if frame is not None else read_volume(f))
            except MedcfxError as exc:
                report.problems.append(str(exc))
        seg = None
        if case.mask is not None:
            try:
                seg = read_volume(case.mask)
            except MedcfxError as exc:
                report.problems.append(str(exc))
        if len(vols) != len(case.channels) or (case.mask is not None and seg is None):
            continue
        try:
            geom, fg, case_notes = volume_case_geometry(case, list(layout.channels), vols, seg, cfg)
            for name, v in zip(layout.channels, vols):  # the scaling prepare applies: a constant channel
                case_notes += scale_volume(v.data, fg, cfg.percentile, cfg.clip, f"{name} ({v.path})")[1]
        except MedcfxError as exc:
            report.problems.append(f"{exc} ({case.channels[0].parent})" if str(case.channels[0].parent) not in str(exc) else str(exc))
            continue
        for n in case_notes:
            if not n.startswith("stored as "):  # orientations are summed up below
                notes[n] += 1
        shapes[_fmt(vols[0].shape)] += 1
        spacings[_fmt(tuple(round(float(z), 3) for z in vols[0].zooms))] += 1
        orientations[axcodes(vols[0].affine)] += 1
        if min(geom.plane) < MIN_SIDE:
            report.info.append(f"case {case.id}: slices of {geom.plane[0]} x {geom.plane[1]} pixels are below "
                               f"{MIN_SIDE} x {MIN_SIDE}: explain refuses them")
        if seg is None:
            lesion["no segmentation"] += 1
        elif np.any(seg.data > 0):
            lesion["with lesion"] += 1
        else:
            lesion["without lesion"] += 1
            no_lesion.append(case.id)
    if no_lesion:
        report.info.append(f"{len(no_lesion)} case(s) without any lesion voxel: {', '.join(no_lesion[:5])}"
                           + (" ..." if len(no_lesion) > 5 else ""))
    stored = {o: k for o, k in orientations.items() if o != "RAS"}
    if stored:
        report.info.append("stored orientation(s) " + ", ".join(f"{o} ({k} case(s))" for o, k in sorted(stored.items()))
                           + ": reoriented to RAS+ before slicing; outputs are written back in the input's own order")
    for n, k in notes.items():
        report.info.append(f"{k} case(s): {n}")
    report.shapes = dict(shapes)
    report.spacings = dict(spacings)
    report.label_counts = {"cases": lesion}


def _check_images(layout: Layout, report: Report) -> None:
    shapes: Counter = Counter()
    notes: Counter = Counter()
    small: list[str] = []
    for case in layout.cases:
        hw = None
        for f in case.channels:
            try:
                img = read_image(f)
            except MedcfxError as exc:
                report.problems.append(str(exc))
                continue
            hw = img.shape[1:]
            if min(hw) < MIN_SIDE:
                small.append(f.name)
            shapes[_fmt(img.shape[1:]) + f" ({img.shape[0]} ch, {img.meta['bit_depth']}-bit)"] += 1
            for n in img.meta.get("notes", []):
                notes[n] += 1
        if case.mask is not None:
            try:
                m = read_image(case.mask)
            except MedcfxError as exc:
                report.problems.append(str(exc))
                continue
            if hw is not None and m.shape[1:] != hw:
                report.problems.append(f"{case.mask}: mask shape {m.shape[1:]} does not match its image {case.channels[0].name} {hw}")
            if not np.any(m.data > 0):
                if layout.kind == "nnunet":
                    continue
                report.problems.append(f"{case.mask}: mask is empty (all zero) for abnormal image {case.channels[0].name}")
    for n, k in notes.items():
        report.info.append(f"{k} image(s): {n}")
    if small:
        report.info.append(f"{len(small)} image(s) smaller than {MIN_SIDE} x {MIN_SIDE} pixels (explain, grade and "
                           f"predict refuse them): {', '.join(small[:5])}" + (" ..." if len(small) > 5 else ""))
    report.shapes = dict(shapes)


def _check_npz(layout: Layout, report: Report) -> None:
    if not layout.cases:
        return
    path = layout.cases[0].channels[0]

    for split in dict.fromkeys(c.item[0] for c in layout.cases):
        key = f"{split}_images"
        try:
            shape, dtype = npz_member_header(path, key)
            report.shapes[f"{split}: {_fmt(shape)} {dtype}"] = int(shape[0])
            if dtype.kind == "f":
                for start, rows in iter_npz_rows(path, key, chunk=1024):
                    ok = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
                    if not ok.all():
                        report.problems.append(f"{path}: {key}[{start + int(np.flatnonzero(~ok)[0])}] holds NaN or inf values")
                        break
            else:
                for _ in iter_npz_rows(path, key, chunk=4096):
                    pass  # read through: a truncated/corrupt member raises here
        except MedcfxError as exc:
            report.problems.append(str(exc))
        except Exception as exc:  # zlib / zipfile errors on a corrupt member
            report.problems.append(f"cannot read {path}: array {key}: {type(exc).__name__}: {exc}")
