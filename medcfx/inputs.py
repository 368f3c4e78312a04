"""Inputs of ``explain``: files and folders as users have them -> model slices, and outputs written back.

An input may be a BraTS case folder (or a folder of cases, or any dataset layout medcfx reads), a NIfTI
volume (one channel), or a PNG/JPEG/TIFF/DICOM/npy image. Each becomes one or more :class:`InputCase`:
model slices preprocessed exactly as training slices are (``medcfx.data.preprocess``), plus the geometry
that maps any per-slice output back onto the input's own grid (NIfTI outputs keep the input's affine and
header; 2D outputs keep the input's pixel size).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcfx.data.io import write_nifti
from medcfx.data.layouts import Case, Layout, detect_layout
from medcfx.data.preprocess import CaseResult, PreprocessConfig, process_image_case, process_volume_case
from medcfx.errors import MedcfxError, UsageError

VOLUME_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".npy")


@dataclass
class InputCase:
    id: str
    source: Path
    channels: list[str]
    result: CaseResult  # images [n, C, S, S], masks, slice_index, geometry, affine, ref

    @property
    def images(self) -> np.ndarray:
        return self.result.images

    @property
    def masks(self) -> np.ndarray | None:
        return self.result.masks

    @property
    def slice_index(self) -> np.ndarray:
        return self.result.slice_index

    @property
    def is_volume(self) -> bool:
        return not self.result.geometry.is_2d

    def select(self, slice_k: int | None) -> "InputCase":
        """Keep only original slice ``slice_k`` (volumes); None keeps every slice."""
        if slice_k is None:
            return self
        if not self.is_volume:
            raise UsageError(f"--slice applies to volumes; {self.source.name} is a 2D image")
        rows = np.flatnonzero(self.slice_index == slice_k)
        if len(rows) == 0:
            n = self.result.geometry.shape[self.result.geometry.axis]
            kept = self.slice_index
            raise UsageError(f"--slice {slice_k}: {self.id} has slices 0..{n - 1}, of which "
                             f"{kept.min()}..{kept.max()} hold enough foreground to be explained")
        r = self.result
        sub = CaseResult(r.images[rows], r.labels[rows], None if r.masks is None else r.masks[rows], r.has_mask,
                         r.grade, r.bbox, r.slice_index[rows], r.geometry, r.affine, r.ref, r.notes)
        return InputCase(self.id, self.source, self.channels, sub)

    def to_original(self, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Model-sized per-slice outputs ([n, S, S] or [n, C, S, S]) on the input's grid."""
        return self.result.geometry.to_original(slices, fill=fill, index=self.slice_index)


def _single_file_case(path: Path, cfg: PreprocessConfig, channels: int) -> InputCase:
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem
    case = Case(id=stem, channels=[path])
    if name.lower().endswith(VOLUME_SUFFIXES):
        if channels != 1:
            raise MedcfxError(f"{path}: a NIfTI file holds one channel but the model expects {channels}; "
                              f"give a case folder with one file per modality")
        layout = Layout(kind="nifti", root=path.parent, cases=[case], channels=["image"], label_names=[], dims=3)
        return InputCase(stem, path, ["image"], process_volume_case(case, layout, cfg))
    if name.lower().endswith(IMAGE_SUFFIXES):
        from medcfx.data.io import read_image

        have = read_image(path).shape[0]
        if have != channels and not {have, channels} == {1, 3}:
            raise MedcfxError(f"{path}: the image has {have} channel(s) but the model expects {channels}")
        layout = Layout(kind="image", root=path.parent, cases=[case], channels=["image"], label_names=[], dims=2)
        return InputCase(stem, path, [f"c{i}" for i in range(channels)], process_image_case(case, layout, cfg, channels))
    raise UsageError(f"{path}: unsupported input type (volumes: {', '.join(VOLUME_SUFFIXES)}; "
                     f"images: {', '.join(IMAGE_SUFFIXES)}; or a case folder)")


def load_cases(path: Path, cfg: PreprocessConfig, channels: int) -> list[InputCase]:
    """Every case of ``path`` preprocessed for a model with ``channels`` input channels."""
    path = Path(path)
    if path.is_file():
        return [_single_file_case(path, cfg, channels)]
    layout = detect_layout(path, modalities=list(cfg.modalities))
    if layout.problems:
        raise MedcfxError(f"{path}: {layout.problems[0]} ({len(layout.problems)} problem(s); run `medcfx data check {path}`)")
    if layout.dims == 3 and len(layout.channels) != channels:
        raise MedcfxError(f"{path}: {len(layout.channels)} channel(s) ({', '.join(layout.channels)}) "
                          f"but the model expects {channels}")
    out = []
    for case in layout.cases:
        if layout.dims == 3:
            res = process_volume_case(case, layout, cfg)
        else:
            res = process_image_case(case, layout, cfg, channels)
        out.append(InputCase(case.id, path, list(layout.channels), res))
    return out


class OutputDir:
    """A case's output folder, built under a temporary name and moved into place only when complete."""

    def __init__(self, out: Path, name: str):
        self.final = Path(out) / name
        self.tmp = Path(out) / f".tmp-{name}-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def write_map(case: InputCase, folder: Path, name: str, slices: np.ndarray, fill: float = 0.0) -> Path:
    """Write per-slice model-sized maps [n, S, S] on the input's grid: NIfTI for volumes, .npy for images."""
    vol = case.to_original(np.asarray(slices, dtype=np.float32), fill=fill)
    if case.is_volume:
        return write_nifti(folder / f"{name}.nii.gz", vol.astype(np.float32), like=case.result.ref)
    path = folder / f"{name}.npy"
    np.save(path, vol.astype(np.float32), allow_pickle=False)
    return path
