"""The MedMNIST-style ``.npz`` layout and streaming readers of its arrays (see :mod:`medcfx.data.layouts`)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from medcfx.data.io import suffix_of
from medcfx.data.layouts import (
    SPLITS,
    Case,
    Layout,
    list_visible,
)
from medcfx.errors import MedcfxError

# ---------------------------------------------------------------------------------------------------------
# MedMNIST-style npz


def _read_npy_header(fh, path: Path, key: str):
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise MedcfxError(f"{path}: array {key} uses .npy format version {version} (supported: 1.0, 2.0)")


def npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` inside an .npz without reading its data (or pickle)."""
    with zipfile.ZipFile(path) as zf:
        with zf.open(f"{key}.npy") as fh:
            shape, fortran, dtype = _read_npy_header(fh, path, key)
    if dtype.hasobject:
        raise MedcfxError(f"{path}: array {key} holds Python objects (refused: no pickle)")
    if fortran:
        raise MedcfxError(f"{path}: array {key} is stored in Fortran order (not supported)")
    return tuple(shape), dtype


def iter_npz_rows(path: Path, key: str, chunk: int = 1024):
    """Yield (start, rows) chunks of array ``key`` of an .npz, streaming: memory bounded by ``chunk`` rows."""
    shape, dtype = npz_member_header(path, key)
    row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = row_items * dtype.itemsize
    with zipfile.ZipFile(path) as zf:
        with zf.open(f"{key}.npy") as fh:
            _read_npy_header(fh, path, key)
            start = 0
            while start < shape[0]:
                n = min(chunk, shape[0] - start)
                buf = fh.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise MedcfxError(f"cannot read {path}: array {key} is truncated")
                yield start, np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))
                start += n


def read_npz_array(path: Path, key: str) -> np.ndarray:
    """A whole (small) array of an .npz, without pickle."""
    parts = [rows for _, rows in iter_npz_rows(path, key, chunk=1 << 16)]
    shape, dtype = npz_member_header(path, key)
    return np.concatenate(parts) if parts else np.zeros(shape, dtype)


def scan_npz(path: Path) -> Layout:
    if path.is_dir():
        npz = [p for p in list_visible(path) if p.is_file() and suffix_of(p) == ".npz"]
        if len(npz) != 1:
            raise MedcfxError(f"{path}: expected exactly one .npz file, found {len(npz)}")
        path = npz[0]
    try:
        with zipfile.ZipFile(path) as zf:
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise MedcfxError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    problems: list[str] = []
    info: list[str] = []
    splits = [s for s in SPLITS if f"{s}_images" in keys]
    if not splits:
        raise MedcfxError(f"{path}: no train_images / val_images / test_images arrays (found: {', '.join(keys) or 'none'})")
    label_arrays: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple] = {}
    for s in splits:
        try:
            shape, dtype = npz_member_header(path, f"{s}_images")
        except MedcfxError:
            raise
        except Exception as exc:
            raise MedcfxError(f"cannot read {path}: array {s}_images: {type(exc).__name__}: {exc}") from None
        shapes[s] = shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            problems.append(f"{path}: {s}_images has shape {shape}; expected [N, H, W] or [N, H, W, C] with C 1 or 3")
        if dtype.kind not in "biuf":
            problems.append(f"{path}: {s}_images has dtype {dtype}; expected numbers")
        if f"{s}_labels" in keys:
            try:
                lab = read_npz_array(path, f"{s}_labels")
            except MedcfxError:
                raise
            except Exception as exc:
                raise MedcfxError(f"cannot read {path}: array {s}_labels: {type(exc).__name__}: {exc}") from None
            lab = lab.reshape(lab.shape[0], -1) if lab.ndim != 2 else lab
            if lab.shape[0] != shape[0]:
                problems.append(f"{path}: {s}_labels has {lab.shape[0]} rows but {s}_images has {shape[0]}")
            label_arrays[s] = lab
        else:
            info.append(f"{path.name}: no {s}_labels (unlabelled)")
    widths = {a.shape[1] for a in label_arrays.values()}
    if len(widths) > 1:
        problems.append(f"{path}: label arrays have different widths {sorted(widths)}")
    width = widths.pop() if len(widths) == 1 else 1
    maxval = max((float(np.nanmax(a)) for a in label_arrays.values() if a.size), default=1.0)
    multiclass = width == 1 and maxval > 1
    if multiclass:
        ncls = int(maxval) + 1
        label_names = [f"class_{i}" for i in range(ncls)]
    elif width == 1:
        label_names = ["label"]
    else:
        label_names = [f"label_{i}" for i in range(width)]
    for s, a in label_arrays.items():
        if a.size and (a.min() < 0 or not np.all(np.equal(np.mod(a, 1), 0))):
            problems.append(f"{path}: {s}_labels must hold non-negative integers")
        elif not multiclass and a.size and a.max() > 1:
            problems.append(f"{path}: {s}_labels (multi-label) must hold 0/1")
    cases: list[Case] = []
    for s in splits:
        lab = label_arrays.get(s)
        for i in range(shapes[s][0]):
            labels: dict[str, float]
            grade = math.nan
            if lab is None or problems:
                labels = {n: math.nan for n in label_names}
            elif multiclass:
                k = int(lab[i, 0])
                labels = {n: float(j == k) for j, n in enumerate(label_names)}
                grade = float(k)
            else:
                labels = {n: float(lab[i, j]) for j, n in enumerate(label_names)}
            cases.append(Case(id=f"{s}/{i:06d}", channels=[path], labels=labels, grade=grade, split=s, item=(s, i)))
    return Layout("npz", path.parent, cases, ["image"], label_names, problems, info, dims=2, extra_files=[path])
