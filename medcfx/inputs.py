"""Inputs of ``explain``: files and folders as users have them -> model slices, and outputs written back.

An input may be a BraTS case folder (or a folder of cases, or any dataset layout medcfx reads), a NIfTI
volume or a DICOM series folder (one channel), or a PNG/JPEG/TIFF/DICOM/npy image; every command reads it
through the same functions (:func:`load_cases`, :func:`load_image`). Each becomes one or more :class:`InputCase`:
model slices preprocessed exactly as training slices are (``medcfx.data.preprocess``), plus the geometry
that maps any per-slice output back onto the input's own grid (NIfTI outputs keep the input's affine and
header; 2D outputs keep the input's pixel size).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from medcfx.data.io import (
    SUPPORTED_SUFFIXES,
    Volume,
    is_image_file,
    is_volume_file,
    load_nifti_header,
    strip_suffix,
    write_nifti,
)
from medcfx.data.dicom import is_dicom_series
from medcfx.data.layouts import Case, Layout, detect_layout
from medcfx.data.geometry import check_min_side
from medcfx.data.preprocess import CaseResult, PreprocessConfig, process_image_case, process_volume_case
from medcfx import staging
from medcfx.errors import CaseErrors, MedcfxError, UsageError

@dataclass
class InputCase:
    """One input case preprocessed for a model; refused (MedcfxError) when smaller than ``MIN_SIDE`` in-plane."""

    id: str
    source: Path
    channels: list[str]
    result: CaseResult  # images [n, C, S, S], masks, slice_index, geometry, affine, ref
    subsampled: bool = False  # only some of the case's slices were kept (see subset)

    def __post_init__(self) -> None:
        check_min_side(self.result.geometry.plane, str(self.source if self.source.is_file() else f"{self.source} ({self.id})"))

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
    def notes(self) -> list[str]:
        """What reading and scaling changed or assumed (reorientation, a z-scored channel, MONOCHROME1 ...)."""
        return list(self.result.notes)

    @property
    def is_volume(self) -> bool:
        return not self.result.geometry.is_2d

    def select(self, slice_k: int | None) -> "InputCase":
        """Keep only slice ``slice_k`` (volumes; an axial index of the volume reoriented to RAS+, counted from
        inferior); None keeps every slice."""
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
        return self.subset(rows)

    def subset(self, rows) -> "InputCase":
        """The case restricted to the sampled slices ``rows`` (indices into ``slice_index``); its
        :attr:`scored_region` shrinks to those slices."""
        rows = np.asarray(rows, dtype=np.int64)
        r = self.result
        sub = dataclasses.replace(r, images=r.images[rows], labels=r.labels[rows],
                                  masks=None if r.masks is None else r.masks[rows], slice_index=r.slice_index[rows])
        return InputCase(self.id, self.source, self.channels, sub, subsampled=True)

    @property
    def scored_region(self) -> np.ndarray | None:
        """Where this case's maps are scored and thresholded, on the input's grid: the foreground, and for a
        case restricted to some slices (:meth:`subset`) only the voxels of those slices."""
        fg = self.result.foreground
        if fg is None or not self.subsampled:
            return fg
        n, size = len(self.slice_index), self.images.shape[-1]
        return fg & self.to_original(np.ones((n, size, size), bool))

    @property
    def grid(self) -> Volume:
        """The input's grid (shape, affine, header; no voxel data) that volume outputs are written on, kept
        from preprocessing (a DICOM series is not read again per output)."""
        if self.result.grid is None:
            raise MedcfxError(f"{self.source}: a 2D image has no volume grid")
        return self.result.grid

    def to_original(self, slices: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Model-sized per-slice outputs ([n, S, S] or [n, C, S, S]) on the input's grid."""
        return self.result.geometry.to_original(slices, fill=fill, index=self.slice_index)


def _single_volume_case(path: Path, cfg: PreprocessConfig, channels: int) -> InputCase:
    """A one-channel volume: a NIfTI file or a DICOM series folder."""
    stem = strip_suffix(path) if path.is_file() else path.name
    if channels != 1:
        if path.is_file():  # a corrupt file is reported as such, not as a channel count it may not have
            load_nifti_header(path)
        raise MedcfxError(f"{path}: a single volume holds one channel but the model expects {channels}; give a "
                          f"case folder with one file per modality (or a 4D Decathlon dataset)")
    case = Case(id=stem, channels=[path])
    layout = Layout(kind="volume", root=path.parent, cases=[case], channels=["image"], label_names=[], dims=3)
    return InputCase(stem, path, ["image"], process_volume_case(case, layout, cfg))


def _single_image_case(path: Path, cfg: PreprocessConfig, channels: int) -> InputCase:
    """A 2D image file (any format :func:`medcfx.data.io.read_image` reads); grey <-> RGB converted."""
    case = Case(id=strip_suffix(path), channels=[path])
    layout = Layout(kind="image", root=path.parent, cases=[case], channels=["image"], label_names=[], dims=2)
    res = process_image_case(case, layout, cfg, channels)
    return InputCase(case.id, path, [f"c{i}" for i in range(channels)], res)


def load_image(path: Path, cfg: PreprocessConfig, channels: int, log=None) -> InputCase:
    """One 2D image as every command reads it (explain, predict, grade): the model slice is
    ``.images[0]`` (float32 [C, S, S] in [-1, 1]); ``.notes`` says what the readers changed or assumed, and
    ``log`` (when given) is called with one ``note: <file>: <note>`` line per note.

    Raises MedcfxError (one line, naming the file) for a volume, an unreadable or too small image.
    """
    path = Path(path)
    if path.is_dir() or is_volume_file(path):
        raise MedcfxError(f"{path}: a volume where a 2D image is expected")
    if not path.exists():
        raise MedcfxError(f"cannot read {path}: no such file")
    case = _single_image_case(path, cfg, channels)
    if log is not None:
        for note in case.notes:
            log(f"note: {path.name}: {note}")
    return case


class CaseLog:
    """Runs the cases of a command over several inputs one by one (explain, grade), as nnU-Net does: a
    MedcfxError in one case (an unreadable file, NaN voxels, too small, ``--slice`` out of range ...) is
    recorded and the next case goes on; :meth:`finish` ends the command with
    :class:`~medcfx.errors.CaseErrors` (one line per failed case) when any failed. Other exceptions
    (bugs, a full disk) still stop the command."""

    def __init__(self) -> None:
        self.failures: list[MedcfxError] = []

    @contextlib.contextmanager
    def case(self, label: str, mention: str | None = None):
        """Run the block for the case ``label``; a MedcfxError is recorded (prefixed with ``label`` unless
        its message already names ``mention`` or ``label``) instead of raised."""
        try:
            yield
        except MedcfxError as exc:
            msg = str(exc)
            if label not in msg and (mention is None or mention not in msg):
                err = MedcfxError(f"{label}: {msg}")
                err.exit_code = exc.exit_code
                exc = err
            self.failures.append(exc)

    def finish(self, summary):
        """Return ``summary`` when every case was written, else raise CaseErrors carrying it."""
        if self.failures:
            raise CaseErrors(self.failures, summary)
        return summary


def load_cases(path: Path, cfg: PreprocessConfig, channels: int, log=None,
               failures: CaseLog | None = None) -> list[InputCase]:
    """Every case of ``path`` preprocessed for a model with ``channels`` input channels, as a list (see
    :func:`iter_cases`, which reads them one at a time)."""
    return list(iter_cases(path, cfg, channels, log=log, failures=failures))


def iter_cases(path: Path, cfg: PreprocessConfig, channels: int, log=None,
               failures: CaseLog | None = None, select: Callable[[str], bool] | None = None) -> Iterator[InputCase]:
    """The cases of ``path`` preprocessed for a model with ``channels`` input channels, read one at a time
    (a test set of hundreds of volumes is never in memory at once).

    ``path``: a NIfTI file, a 2D image file (DICOM recognised by its DICM marker whatever its name), a DICOM
    series folder, or any dataset layout ``medcfx data check`` recognises. ``log``: called with one line per
    note of each case (what the readers changed or assumed), so the user sees it. Without ``failures`` the
    first case that cannot be read raises MedcfxError (naming the file); with a :class:`CaseLog` each such
    case (or the whole ``path``, when it cannot be read as a dataset) is recorded there and the readable
    cases are yielded. ``select(case_id)``: called once per case, in order, before it is read; a case for
    which it returns False is not read (shards, resume).

    Without ``failures``, a ``path`` that cannot be read as a dataset (missing, unsupported, a case without one
    of the modalities, the wrong number of channels) raises MedcfxError on the call itself, before any case is
    read, so a command can check its inputs before it starts any work.
    """
    path = Path(path)
    readers = _case_readers(path, cfg, channels) if failures is None else None
    return _read_cases(path, cfg, channels, readers, log, failures, select)


def _read_cases(path: Path, cfg: PreprocessConfig, channels: int, readers, log, failures, select) -> Iterator[InputCase]:
    """The generator of :func:`iter_cases` (``readers`` listed already, or None: listed here under ``failures``)."""
    if readers is None:
        readers = []
        with failures.case(str(path), path.name):
            readers = _case_readers(path, cfg, channels)
    for case_id, read in readers:
        case = None
        if select is not None and not select(case_id):
            continue
        if failures is None:
            case = read()
        else:
            with failures.case(f"{path} ({case_id})" if len(readers) > 1 else str(path), case_id):
                case = read()
        if case is None:
            continue
        if log is not None:
            for note in case.notes:
                log(f"note: {case.id}: {note}")
        yield case


def case_ids(path: Path, cfg: PreprocessConfig, channels: int) -> list[str]:
    """The ids of the cases of ``path`` in the order :func:`iter_cases` yields them, without reading any
    case; [] when ``path`` itself cannot be read (iter_cases then reports why)."""
    try:
        return [case_id for case_id, _ in _case_readers(Path(path), cfg, channels)]
    except MedcfxError:
        return []


def _case_readers(path: Path, cfg: PreprocessConfig, channels: int) -> list[tuple[str, Callable[[], InputCase]]]:
    """(case id, reader) for every case of ``path``; MedcfxError when ``path`` itself cannot be read."""
    if not path.exists():
        raise MedcfxError(f"{path}: no such file or folder")
    if path.is_file():
        if is_volume_file(path):
            return [(strip_suffix(path), partial(_single_volume_case, path, cfg, channels))]
        if is_image_file(path):
            return [(strip_suffix(path), partial(_single_image_case, path, cfg, channels))]
        raise UsageError(f"{path}: unsupported input type (supported: {', '.join(SUPPORTED_SUFFIXES)}, DICOM files "
                         f"of any name, a DICOM series folder, or a case folder)")
    if is_dicom_series(path):
        return [(path.name, partial(_single_volume_case, path, cfg, channels))]
    layout = detect_layout(path, modalities=list(cfg.modalities))
    if layout.problems:
        raise MedcfxError(f"{path}: {layout.problems[0]} ({len(layout.problems)} problem(s); run `medcfx data check {path}`)")
    if layout.dims == 3 and len(layout.channels) != channels:
        raise MedcfxError(f"{path}: {len(layout.channels)} channel(s) ({', '.join(layout.channels)}) "
                          f"but the model expects {channels}")

    def read(case: Case) -> InputCase:
        if layout.dims == 3:
            res = process_volume_case(case, layout, cfg)
        else:
            res = process_image_case(case, layout, cfg, channels)
        return InputCase(case.id, path, list(layout.channels), res)

    return [(case.id, partial(read, case)) for case in layout.cases]


class OutputDir:
    """A case's output folder ``out/name``, built under a staging name (:mod:`medcfx.staging`) and moved into
    place only when complete (an existing folder of that name is replaced). ``out`` itself is created with
    the first case written into it, and removed again when that case fails and ``out`` did not exist."""

    def __init__(self, out: Path, name: str):
        self.out = Path(out)
        self.final = self.out / name
        self._created = False
        self._staged = None

    def __enter__(self) -> Path:
        self._created = not self.out.exists()
        self._staged = staging.staged_folder(self.final)
        return self._staged.__enter__()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return bool(self._staged.__exit__(exc_type, exc, tb))
        finally:
            if exc_type is not None and self._created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only when empty: nothing of this run is left


def write_map(case: InputCase, folder: Path, name: str, slices: np.ndarray, fill: float = 0.0) -> Path:
    """Write per-slice model-sized maps [n, S, S] on the input's grid: NIfTI for volumes (the input's voxel
    order, affine and header), .npy for images."""
    return write_native(case, folder, name, case.to_original(np.asarray(slices, dtype=np.float32), fill=fill))


def write_native(case: InputCase, folder: Path, name: str, array: np.ndarray) -> Path:
    """Write an array already on the input's grid (float32; a bool mask as 0/1): ``name.nii.gz`` with the
    input's affine and header for a volume, ``name.npy`` for a 2D image."""
    vol = np.asarray(array).astype(np.float32)
    if case.is_volume:
        return write_nifti(folder / f"{name}.nii.gz", vol, like=case.grid)
    path = folder / f"{name}.npy"
    np.save(path, vol, allow_pickle=False)
    return path
