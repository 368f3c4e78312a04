"""Preprocessing (Sanchez et al. 2022, sec. 4.1): dataset cases -> model-sized slices in a cached SliceSet.

Each step is decided in one module, so the place where a voxel's orientation or value is set is easy to find:

* reading (:mod:`medcfx.data.io`): NIfTI, DICOM (files and series), PNG/JPEG/TIFF/npy, as stored;
* geometry (:mod:`medcfx.data.geometry`): every volume is reoriented to RAS+ from its affine before slicing
  (``axis`` 2 is then always axial), the files of a case must share one grid (shape AND affine), and
  results go back onto the input's own voxel order;
* intensity (:mod:`medcfx.data.intensity`): the foreground is what differs from the background value (not
  the sign of the values), each channel is scaled by its foreground percentile, 2D images by the model's
  recorded rule;
* this module: per case, the steps in order, then the cache (:mod:`medcfx.data.cache`,
  :class:`~medcfx.data.sliceset.SliceSet`).

Volumes (BraTS, Decathlon, nnU-Net 3D, DICOM series), per case:

1. every channel and the segmentation on one grid (:func:`~medcfx.data.geometry.check_same_grid`);
2. foreground F (:func:`~medcfx.data.intensity.foreground_mask`); a case without foreground is refused;
3. per channel, u = (x - lo) / (p - lo), lo = min(0, min x[F]), p = the ``percentile`` of x[F], clipped to
   [0, 1] when ``clip`` (:func:`~medcfx.data.intensity.scale_volume`);
4. slices along the canonical ``axis`` whose foreground area is below ``min_foreground`` times the largest
   slice's area are skipped (``min_foreground=0`` keeps every slice);
5. each slice is padded to a square (centred, with 0) and resized to ``size`` x ``size``
   (:class:`~medcfx.data.geometry.SliceGeometry`);
6. the model value is 2 u - 1, so background is -1 and the foreground's percentile maps to +1.

Slice label ``unhealthy`` = 1 if the slice holds at least one voxel with seg > 0 (at the original
resolution), 0 otherwise, NaN if the case has no segmentation. The model-sized mask keeps small lesions
(:meth:`~medcfx.data.geometry.SliceGeometry.mask_to_model`).

2D images (image folders, labels.csv, npz, nnU-Net 2D): grey images have 1 channel, RGB 3 (``image_channels``
forces 1 or 3: RGB -> grey by ITU-R 601 luma, grey -> RGB by repetition; by default the first image decides);
scaled to [0, 1] by :func:`~medcfx.data.intensity.scale_image` under ``intensity``, then steps 5-6.

Inputs given to a model (explain, grade, predict: :mod:`medcfx.inputs`) smaller than ``MIN_SIDE`` pixels in
either in-plane direction are refused by :func:`~medcfx.data.geometry.check_min_side`: a model working at 48-256 px would see an
up-sampled blur and still answer with confident numbers (``data check`` lists such images).

:func:`prepare` processes one case at a time (peak memory: a few cases) and stores the result in the
cache; a second call with the same files and config reads no input file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medcfx.data import cache as cachemod
from medcfx.data.geometry import (
    IDENTITY_ORNT,
    SliceGeometry,
    axcodes,
    check_same_grid,
    to_canonical,
    volume_orientation,
)
from medcfx.data.intensity import (
    CHANNEL_NAMES_2D,
    INTENSITY_RULES,
    convert_channels,
    foreground_mask,
    scale_image,
    scale_volume,
)
from medcfx.data.io import Volume, read_image, read_volume
from medcfx.data.layouts import MODALITIES, Case, Layout, detect_layout, load_layout, resolve_modalities
from medcfx.data.layouts_npz import iter_npz_rows, npz_member_header
from medcfx.data.sliceset import PREPROCESS_VERSION, SliceSet, open_checked
from medcfx.errors import MedcfxError, UsageError

NATIVE = 0  # preprocess.size: each case at its own in-plane size (thresholding baseline)


@dataclass(frozen=True)
class PreprocessConfig:
    """How files become model-sized slices; every field is part of the cache key.

    size            output height = width (methods train at 64 and evaluate at 128); 0 = NATIVE: each case at
                    its own in-plane size (the square side max(H, W), so pad + resize is the identity), for the
                    thresholding baseline, which has no network; a SliceSet (training) refuses it
    modalities      MRI channels in order (brats, nnU-Net MRI); aliases t1n, t1c, t2w, t2f accepted
    percentile      per-scan, per-modality foreground percentile that maps to 1 (before the 2u - 1 step)
    clip            clip x / p to [0, 1]; False keeps values above the percentile (> 1 after scaling)
    axis            slicing axis of the volume reoriented to RAS+ (0 sagittal, 1 coronal, 2 axial), whatever
                    its storage order
    min_foreground  skip slices whose foreground area < this fraction of the case's largest slice area
    image_channels  2D only: 1 (grey) or 3 (RGB); None = as the first image of the dataset
    intensity       2D scaling rule, recorded with every model and replayed at inference: percentile
                    (default), nominal or legacy (:mod:`medcfx.data.intensity`); volumes always use the
                    foreground percentile rule
    """

    size: int = 64
    modalities: tuple[str, ...] = MODALITIES
    percentile: float = 99.0
    clip: bool = True
    axis: int = 2
    min_foreground: float = 0.05
    image_channels: int | None = None
    intensity: str = "percentile"

    def __post_init__(self):
        object.__setattr__(self, "modalities", resolve_modalities(self.modalities))
        if (isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer))
                or not (4 <= int(self.size) <= 4096 or int(self.size) == NATIVE)):
            raise UsageError(f"preprocess size must be an integer in [4, 4096] or 0 (native), got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        try:
            pct = float(self.percentile)
        except (TypeError, ValueError):
            raise UsageError(f"preprocess percentile must be a number in (0, 100], got {self.percentile!r}") from None
        if not 0 < pct <= 100:
            raise UsageError(f"preprocess percentile must be in (0, 100], got {self.percentile!r}")
        object.__setattr__(self, "percentile", pct)
        if self.axis not in (0, 1, 2):
            raise UsageError(f"preprocess axis must be 0, 1 or 2, got {self.axis!r}")
        try:
            mf = float(self.min_foreground)
        except (TypeError, ValueError):
            raise UsageError(f"preprocess min_foreground must be in [0, 1], got {self.min_foreground!r}") from None
        if not 0 <= mf <= 1:
            raise UsageError(f"preprocess min_foreground must be in [0, 1], got {self.min_foreground!r}")
        object.__setattr__(self, "min_foreground", mf)
        if self.image_channels not in (None, 1, 3):
            raise UsageError(f"preprocess image_channels must be 1, 3 or null, got {self.image_channels!r}")
        object.__setattr__(self, "clip", bool(self.clip))
        if self.intensity not in INTENSITY_RULES:
            raise UsageError(f"preprocess intensity must be one of {', '.join(INTENSITY_RULES)}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, data: dict | None) -> "PreprocessConfig":
        """Build from a mapping (e.g. YAML); unknown keys are a UsageError naming them."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown preprocess key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if isinstance(data.get("modalities"), str):
            data["modalities"] = [m for m in data["modalities"].split(",") if m.strip()]
        if "modalities" in data:
            data["modalities"] = tuple(data["modalities"])
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# per-case processing


@dataclass
class CaseResult:
    images: np.ndarray  # [n, C, S, S] float32 in [-1, 1]
    labels: np.ndarray  # [n, K] float32
    masks: np.ndarray | None  # [n, S, S] uint8
    has_mask: bool
    grade: float
    bbox: np.ndarray | None  # [K, 4] model coordinates, NaN = none
    slice_index: np.ndarray  # [n] int (canonical slice index for volumes)
    geometry: SliceGeometry
    affine: np.ndarray | None
    ref: Path
    notes: list[str] = field(default_factory=list)
    grid: Volume | None = None  # volumes: the reference volume's shape, affine and header (no voxel data)
    # on the input's own grid (storage order; [H, W] for a 2D image): the lesion mask (None without
    # annotation) and the foreground that maps are scored and thresholded inside (the brain; all of a 2D image)
    lesion: np.ndarray | None = None
    foreground: np.ndarray | None = None


def load_volume_case(case: Case) -> tuple[list[Volume], Volume | None]:
    """Read a 3D case's channel volumes (4D files: the channel's frame) and its segmentation."""
    frames = getattr(case, "frames", None) or [None] * len(case.channels)
    vols = [read_volume(p, frame=f) if f is not None else read_volume(p) for p, f in zip(case.channels, frames)]
    seg = read_volume(case.mask) if case.mask is not None else None
    return vols, seg


def _native(geom: SliceGeometry, cfg: PreprocessConfig) -> SliceGeometry:
    """``geom`` at the case's own in-plane size when ``cfg.size`` is NATIVE (0), else as given."""
    return dataclasses.replace(geom, size=geom.side) if cfg.size == NATIVE else geom


def volume_case_geometry(case: Case, names: list[str], vols: list[Volume], seg: Volume | None,
                         cfg: PreprocessConfig) -> tuple[SliceGeometry, np.ndarray, list[str]]:
    """Everything about a volume case that can refuse it, before any scaling (shared with ``data check``).

    Returns (geometry with every canonical slice kept, foreground bool [X, Y, Z] in storage order, notes).
    Notes: the storage orientation, what the header leaves open (:func:`~medcfx.data.geometry.volume_orientation`),
    the readers' notes, the background values. Raises MedcfxError: files not on one grid, a singular affine,
    no foreground.
    """
    items = list(zip(names, vols)) + ([("segmentation", seg)] if seg is not None else [])
    check_same_grid(f"case {case.id}", items)
    ornt, notes = volume_orientation(vols[0], f"{vols[0].path}")
    shape = tuple(vols[0].shape)
    geom = _native(SliceGeometry(shape, cfg.axis, cfg.size or 1, (), ornt), cfg)
    geom = dataclasses.replace(geom, kept=tuple(range(geom.canonical_shape[cfg.axis])))
    if geom.ornt != IDENTITY_ORNT:
        notes.insert(0, f"stored as {axcodes(vols[0].affine)}: sliced after reorientation to RAS+; outputs are "
                        f"written back in the input's own voxel order and affine")
    for v in vols + ([seg] if seg is not None else []):  # what the readers did (a DICOM series: MONOCHROME1 ...)
        notes += [f"{v.path.name}: {n}" for n in v.meta.get("notes", [])]
    fg, more = foreground_mask([v.data for v in vols], names)
    notes += more
    for v in vols:  # DICOM PixelPaddingValue voxels are never foreground
        if v.meta.get("padding") is not None:
            fg &= ~np.asarray(v.meta["padding"], dtype=bool)
    if not fg.any():
        raise MedcfxError(f"case {case.id}: no foreground (every voxel of every channel equals its background "
                          f"value) in {case.channels[0].parent}")
    return geom, fg, notes


def process_volume_case(case: Case, layout: Layout, cfg: PreprocessConfig,
                        loaded: tuple[list[Volume], Volume | None] | None = None) -> CaseResult:
    """One 3D case -> its model slices (see the module docstring for every step).

    ``loaded``: the result of :func:`load_volume_case` when the caller already read the files; those
    volumes are consumed (scaled in place, then released).
    """
    vols, seg = loaded if loaded is not None else load_volume_case(case)
    names = list(layout.channels)
    geom, fg, notes = volume_case_geometry(case, names, vols, seg, cfg)
    plane_axes = tuple(i for i in range(3) if i != cfg.axis)
    area = to_canonical(fg, geom.ornt).sum(axis=plane_axes)
    if cfg.min_foreground > 0:
        kept = np.flatnonzero(area >= cfg.min_foreground * area.max())
    else:
        kept = np.arange(len(area))
    geom = dataclasses.replace(geom, kept=tuple(int(k) for k in kept))
    n, S = len(kept), geom.size
    images = np.empty((n, len(vols), S, S), dtype=np.float32)
    for c, (name, v) in enumerate(zip(names, vols)):
        x, more = scale_volume(v.data, fg, cfg.percentile, cfg.clip, f"{name} ({v.path})")
        notes += more
        images[:, c] = geom.to_model(x)
        v.data = None  # type: ignore[assignment]  (free the volume early)
    images *= 2.0
    images -= 1.0
    masks = None
    labels = np.full((n, 1), np.nan, dtype=np.float32)
    if seg is not None:
        lesion = seg.data > 0
        labels[:, 0] = to_canonical(lesion, geom.ornt).any(axis=plane_axes)[kept]
        masks = geom.mask_to_model(lesion)
    v0 = vols[0]
    grid = Volume(np.broadcast_to(np.float32(0), geom.shape), v0.affine, v0.header, v0.path, {"zooms": v0.zooms})
    return CaseResult(images, labels, masks, case.mask is not None, math.nan, None, kept.astype(np.int32), geom,
                      v0.affine, case.channels[0], notes, grid, lesion=None if seg is None else lesion, foreground=fg)


def _read_mask_2d(path: Path, hw: tuple[int, int]) -> np.ndarray:
    m = read_image(path)
    if tuple(m.shape[1:]) != tuple(hw):
        raise MedcfxError(f"{path}: mask shape {m.shape[1:]} does not match its image {tuple(hw)}")
    return (m.data > 0).any(axis=0)


def process_image_case(case: Case, layout: Layout, cfg: PreprocessConfig, channels: int) -> CaseResult:
    """One 2D case (1 file, or one file per channel for nnU-Net 2D) -> one model slice."""
    parts = []
    hw = None
    notes: list[str] = []
    for p in case.channels:
        img = read_image(p)
        if hw is not None and img.shape[1:] != hw:
            raise MedcfxError(f"case {case.id}: channel files have different sizes: {hw} and {img.shape[1:]} ({p.name})")
        hw = img.shape[1:]
        parts.append(scale_image(img.data, img.meta, cfg.intensity, cfg.percentile, cfg.clip))
        notes += img.meta.get("notes", [])
    u = np.concatenate(parts, axis=0)
    if u.shape[0] != channels and {u.shape[0], channels} != {1, 3}:
        raise MedcfxError(f"{case.channels[0]}: the image has {u.shape[0]} channel(s) but the model expects {channels}")
    u = convert_channels(u, channels)
    geom = _native(SliceGeometry(tuple(int(s) for s in hw), None, cfg.size or 1, (0,)), cfg)
    images = geom.to_model(u)  # [1, C, S, S]
    images = images * 2.0 - 1.0
    K = len(layout.label_names)
    labels = np.array([[case.labels.get(n, math.nan) for n in layout.label_names]], dtype=np.float32).reshape(1, K)
    masks = lesion = None
    if case.mask is not None:
        lesion = _read_mask_2d(case.mask, hw)
        masks = geom.mask_to_model(lesion)
        if layout.kind == "nnunet":
            labels[0, 0] = float(lesion.any())
    elif case.mask_empty:
        masks = np.zeros((1, geom.size, geom.size), np.uint8)
        lesion = np.zeros(hw, bool)
    bbox = None
    if case.bbox:
        bbox = np.full((K, 4), np.nan, dtype=np.float32)
        for name, box in case.bbox.items():
            bbox[layout.label_names.index(name)] = geom.box_to_model(box)
    return CaseResult(images.astype(np.float32), labels, masks, case.has_mask, case.grade, bbox,
                      np.zeros(1, np.int32), geom, None, case.channels[0], notes, lesion=lesion,
                      foreground=np.ones(hw, bool))


def _image_channels_of(case: Case) -> int:
    """Channel count of a 2D case: the sum over its files (1 grey / 3 RGB for one file)."""
    return sum(read_image(p).shape[0] for p in case.channels)


# ---------------------------------------------------------------------------------------------------------
# prepare


def _progress_callback(progress, total: int):
    """Return (update(done, case_id), close()) for progress=True (rich bar), a callable, or False."""
    if callable(progress):
        return (lambda done, cid: progress(done, total, cid)), (lambda: None)
    if not progress:
        return (lambda done, cid: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("preparing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    bar.start()
    task = bar.add_task("", total=total)

    def update(done, cid):
        bar.update(task, completed=done, description=str(cid))

    return update, bar.stop


def prepare(
    path: str | Path,
    cfg: PreprocessConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | Callable[[int, int, str], Any] = False,
    layout: Layout | None = None,
    kind: str | None = None,
) -> SliceSet:
    """Preprocess the dataset at ``path`` (or the given ``layout``) and return its cached :class:`SliceSet`.

    ``cache_dir`` defaults to :func:`medcfx.data.cache.cache_root`. ``kind`` forces a layout kind instead of
    detecting it. A dataset whose scan found problems is refused (one line naming the first problem and
    their count; ``medcfx data check`` lists all). ``progress``: True for a rich progress bar on stderr, or a
    callable ``(done, total, case_id)``.
    """
    cfg = cfg or PreprocessConfig()
    if cfg.size == NATIVE:
        raise UsageError("preprocess.size 0 (native) is for the thresholding baseline only: a model trains and "
                         "runs at one fixed size (set preprocess.size)")
    if layout is None:
        layout = load_layout(path, kind, cfg.modalities) if kind else detect_layout(path, cfg.modalities)
    if layout.problems:
        more = f" (and {len(layout.problems) - 1} more)" if len(layout.problems) > 1 else ""
        raise MedcfxError(f"{layout.root}: {layout.problems[0]}{more}; run 'medcfx data check {layout.root}' to list every problem")
    if not layout.cases:
        raise MedcfxError(f"{layout.root}: no cases found")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cachemod.cache_root()
    key = cachemod.cache_key(layout.kind, layout.root, layout.files(), cfg.to_dict(), PREPROCESS_VERSION)
    entry = root / key
    if entry.is_dir():
        try:
            return open_checked(entry, layout.root)
        except cachemod.CacheInvalid:
            cachemod.remove_entry(entry)  # never trusted: rebuilt below
    with cachemod.building(root, key) as tmp, _single_threaded_blas():
        _build(layout, cfg, key, tmp, progress)
    return open_checked(entry, layout.root)


def _single_threaded_blas():
    """Limit BLAS to one thread while building: the resize GEMMs are small, and a multi-threaded BLAS
    whose threads wait for a core taken by another process is several times slower (measured 3 s vs 18 s
    for 4 BraTS cases on a shared 2-core machine). threadpoolctl comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class _Builder:
    """Streams per-case results into the arrays of a cache entry under construction."""

    def __init__(self, folder: Path, layout: Layout, cfg: PreprocessConfig, channels: int):
        self.folder, self.layout, self.cfg = folder, layout, cfg
        S, K = cfg.size, len(layout.label_names)
        self.images = cachemod.NpyWriter(folder / "images.npy", np.float32, (channels, S, S))
        self.masks = cachemod.NpyWriter(folder / "masks.npy", np.uint8, (S, S)) if layout.has_masks else None
        self.K = K
        self.labels: list[np.ndarray] = []
        self.has_mask: list[np.ndarray] = []
        self.grade: list[np.ndarray] = []
        self.bbox: list[np.ndarray] = []
        self.any_bbox = any(c.bbox for c in layout.cases)
        self.case_index: list[np.ndarray] = []
        self.slice_index: list[np.ndarray] = []
        self.cases: list[dict] = []
        self.geoms: dict[str, int] = {}
        self.notes: dict[str, int] = {}

    def _geom_id(self, g: SliceGeometry) -> int:
        k = json.dumps(g.to_dict(), sort_keys=True)
        if k not in self.geoms:
            self.geoms[k] = len(self.geoms)
        return self.geoms[k]

    def add_case(self, case: Case, geom: SliceGeometry, affine, ref: Path) -> int:
        self.cases.append({
            "id": case.id,
            "split": case.split,
            "geometry": self._geom_id(geom),
            "affine": None if affine is None else np.asarray(affine).tolist(),
            "ref": cachemod.relative_path(Path(ref), self.layout.root),
        })
        return len(self.cases) - 1

    def add_rows(self, case_pos, images, labels, masks, has_mask, grade, bbox, slice_index) -> None:
        n = images.shape[0]
        self.images.append(images)
        if self.masks is not None:
            self.masks.append(masks if masks is not None else np.zeros((n, self.cfg.size, self.cfg.size), np.uint8))
        self.labels.append(np.asarray(labels, np.float32).reshape(n, self.K))
        self.has_mask.append(np.broadcast_to(np.asarray(has_mask, np.uint8), (n,)).copy())
        self.grade.append(np.broadcast_to(np.asarray(grade, np.float32), (n,)).copy())
        if self.any_bbox:
            b = np.full((n, self.K, 4), np.nan, np.float32) if bbox is None else np.broadcast_to(bbox, (n, self.K, 4))
            self.bbox.append(np.asarray(b, np.float32))
        self.case_index.append(np.broadcast_to(np.asarray(case_pos, np.int32), (n,)).copy())
        self.slice_index.append(np.asarray(slice_index, np.int32).reshape(n))

    def add_result(self, case: Case, r: CaseResult) -> None:
        pos = self.add_case(case, r.geometry, r.affine, r.ref)
        self.add_rows(pos, r.images, r.labels, r.masks, r.has_mask, r.grade, r.bbox, r.slice_index)
        for note in r.notes:
            self.notes[note] = self.notes.get(note, 0) + 1

    def finish(self, key: str, channel_names: list[str]) -> None:
        arrays = {}
        shape = self.images.close()
        arrays["images"] = {"shape": list(shape), "dtype": np.dtype(np.float32).str}
        if self.masks is not None:
            arrays["masks"] = {"shape": list(self.masks.close()), "dtype": np.dtype(np.uint8).str}
        n = shape[0]

        def cat(parts, tail, dtype):
            return np.concatenate(parts) if parts else np.zeros((0,) + tail, dtype)

        arrays["labels"] = cachemod.save_array(self.folder, "labels", cat(self.labels, (self.K,), np.float32))
        arrays["has_mask"] = cachemod.save_array(self.folder, "has_mask", cat(self.has_mask, (), np.uint8))
        arrays["grade"] = cachemod.save_array(self.folder, "grade", cat(self.grade, (), np.float32))
        if self.any_bbox:
            arrays["bbox"] = cachemod.save_array(self.folder, "bbox", cat(self.bbox, (self.K, 4), np.float32))
        arrays["case_index"] = cachemod.save_array(self.folder, "case_index", cat(self.case_index, (), np.int32))
        arrays["slice_index"] = cachemod.save_array(self.folder, "slice_index", cat(self.slice_index, (), np.int32))
        geoms = [json.loads(k) for k in self.geoms]
        index = {
            "complete": True,
            "key": key,
            "version": PREPROCESS_VERSION,
            "kind": self.layout.kind,
            "root": str(self.layout.root.absolute()),
            "dims": self.layout.dims,
            "config": self.cfg.to_dict(),
            "channels": channel_names,
            "label_names": list(self.layout.label_names),
            "n": int(n),
            "arrays": arrays,
            "cases": self.cases,
            "geometries": geoms,
            "notes": self.notes,
        }
        cachemod.write_index(self.folder, index)

    def abort(self) -> None:
        self.images.abort()
        if self.masks is not None:
            self.masks.abort()


def _build(layout: Layout, cfg: PreprocessConfig, key: str, folder: Path, progress) -> None:
    total = len(layout.cases)
    update, close = _progress_callback(progress, total)
    try:
        if layout.dims == 3:
            channels, names = len(layout.channels), list(layout.channels)
        elif layout.kind == "npz":
            channels = cfg.image_channels or _npz_channels(layout)
            names = CHANNEL_NAMES_2D[channels]
        else:
            channels = cfg.image_channels or _image_channels_of(layout.cases[0])
            if layout.kind == "nnunet" and channels == len(layout.channels):
                names = list(layout.channels)  # one grey file per channel
            else:
                names = CHANNEL_NAMES_2D.get(channels) or [f"channel_{i}" for i in range(channels)]
        b = _Builder(folder, layout, cfg, channels)
        try:
            if layout.kind == "npz":
                _build_npz(b, layout, cfg, channels, update)
            else:
                for done, case in enumerate(layout.cases, start=1):
                    if layout.dims == 3:
                        r = process_volume_case(case, layout, cfg)
                    else:
                        r = process_image_case(case, layout, cfg, channels)
                    b.add_result(case, r)
                    update(done, case.id)
            b.finish(key, names)
        except BaseException:
            b.abort()
            raise
    finally:
        close()


def _npz_channels(layout: Layout) -> int:
    case = layout.cases[0]
    shape, _ = npz_member_header(case.channels[0], f"{case.item[0]}_images")
    return 3 if len(shape) == 4 and shape[-1] == 3 else 1


def _build_npz(b: _Builder, layout: Layout, cfg: PreprocessConfig, channels: int, update) -> None:
    """Stream each split's image array in chunks; every row is a case (one slice)."""
    path = layout.cases[0].channels[0]
    by_item = {c.item: c for c in layout.cases}
    K = len(layout.label_names)
    done = 0
    splits = list(dict.fromkeys(c.item[0] for c in layout.cases))
    for split in splits:
        key = f"{split}_images"
        for start, rows in iter_npz_rows(path, key, chunk=512):
            x = rows.astype(np.float32)
            if x.ndim == 3:
                x = x[:, None]
            else:
                x = np.moveaxis(x, -1, 1)
            H, W = x.shape[-2:]
            geom = SliceGeometry((int(H), int(W)), None, cfg.size, (0,))
            meta = {"integer": rows.dtype.kind in "biu", "bit_depth": rows.dtype.itemsize * 8 if rows.dtype != bool else 8}
            if rows.dtype.kind == "f":
                bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
                if bad.any():
                    raise MedcfxError(f"{path}: {key}[{start + int(np.flatnonzero(bad)[0])}] holds NaN or inf values")
            if meta["integer"] and meta["bit_depth"] == 8 and cfg.intensity != "percentile":
                u = x / 255.0  # the nominal and legacy rules of 8-bit rows, vectorised
                if cfg.clip:
                    np.clip(u, 0, 1, out=u)
            else:
                u = np.stack([scale_image(xi, meta, cfg.intensity, cfg.percentile, cfg.clip) for xi in x])
            u = np.stack([convert_channels(ui, channels) for ui in u]) if u.shape[1] != channels else u
            imgs = np.matmul(np.matmul(geom._down()[0], u.astype(np.float32)), geom._down()[1].T) * 2.0 - 1.0
            n = len(rows)
            labels = np.empty((n, K), np.float32)
            grade = np.empty(n, np.float32)
            pos = np.empty(n, np.int32)
            for j in range(n):
                case = by_item[(split, start + j)]
                labels[j] = [case.labels.get(name, math.nan) for name in layout.label_names]
                grade[j] = case.grade
                pos[j] = b.add_case(case, geom, None, path)
            b.add_rows(pos, imgs.astype(np.float32), labels, None, 0, grade, None, np.zeros(n, np.int32))
            done += n
            update(done, f"{split}[{start + n - 1}]")
