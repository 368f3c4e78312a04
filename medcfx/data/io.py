"""Readers and writers for the image files medcfx takes: NIfTI volumes and 2D images.

Every reader returns float32 data and keeps what is needed to write results back where they came from
(the NIfTI affine and header), and every problem with a file becomes a one-line
:class:`~medcfx.errors.MedcfxError` that names the file: ``cannot read <file>: <reason>``, ``<file>: holds
NaN or inf values``, ``<file>: expected a 3D volume, got shape (...)``.

Volumes (``.nii``, ``.nii.gz``)
    :func:`read_volume` -> :class:`Volume` (``data`` float32 ``[X, Y, Z]`` in the file's voxel order,
    ``affine``, ``header``; ``meta["dtype"]`` is the dtype stored on disk, ``meta["zooms"]`` the spacing).
    A trailing singleton dimension (``X x Y x Z x 1``) is dropped; a genuine 4D file is an error.
    :func:`write_nifti` writes an array on the grid, affine and header of an input (float32, atomic).

2D images (``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.bmp``, ``.npy``, ``.dcm``/``.dicom``)
    :func:`read_image` -> :class:`Image2D` (``data`` float32 ``[C, H, W]``, C = 1 grey or 3 RGB). Values
    are the RAW stored values (0..255 for 8-bit, 0..65535 for 16-bit, rescaled values for DICOM): mapping
    to [-1, 1] is the preprocessing's job (:func:`medcfx.data.preprocess.scale_image`), which uses
    ``meta["bit_depth"]`` and ``meta["integer"]``. RGBA drops alpha, palette images become RGB, ``LA``
    becomes grey (each with a note in ``meta["notes"]``). DICOM needs the optional ``pydicom``
    (``pip install 'medcfx[dicom]'``); RescaleSlope/RescaleIntercept are applied and MONOCHROME1 is
    inverted so that larger values are always brighter.

:func:`read_any` dispatches on the suffix (a file without a known suffix but with the DICOM ``DICM``
marker is read as DICOM).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcfx.errors import MedcfxError

VOLUME_SUFFIXES = (".nii.gz", ".nii")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = PIL_SUFFIXES + (".npy", ".dcm", ".dicom")
SUPPORTED_SUFFIXES = VOLUME_SUFFIXES + IMAGE_SUFFIXES

DICOM_HINT = "reading DICOM needs the dicom extra: pip install 'medcfx[dicom]'"


@dataclass
class Volume:
    """A 3D NIfTI volume: ``data`` float32 [X, Y, Z]; ``affine`` 4x4 voxel->world; the file's ``header``."""

    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def zooms(self) -> tuple[float, ...]:
        return tuple(self.meta.get("zooms", ()))


@dataclass
class Image2D:
    """A 2D image: ``data`` float32 [C, H, W] of raw stored values; ``meta``: bit_depth, integer, mode, notes."""

    data: np.ndarray
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def suffix_of(path: str | Path) -> str:
    """The lower-case suffix, with ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def strip_suffix(path: str | Path) -> str:
    """The file name without its (double) suffix: ``BraTS_001_t1.nii.gz`` -> ``BraTS_001_t1``."""
    name = Path(path).name
    suf = suffix_of(name)
    return name[: len(name) - len(suf)] if suf else name


def is_volume_file(path: str | Path) -> bool:
    return suffix_of(path) in VOLUME_SUFFIXES


def is_image_file(path: str | Path) -> bool:
    return suffix_of(path) in IMAGE_SUFFIXES


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    if isinstance(exc, EOFError) or "end-of-stream" in msg or "Compressed file ended" in msg:
        return f"truncated or corrupt file ({type(exc).__name__}: {msg or 'unexpected end of file'})"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _exists(path: Path) -> None:
    if not path.exists():
        raise MedcfxError(f"cannot read {path}: no such file")
    if path.is_dir():
        raise MedcfxError(f"cannot read {path}: it is a folder, not a file")


def _check_finite(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise MedcfxError(f"{path}: holds {n} NaN or inf value(s)")


# ---------------------------------------------------------------------------------------------------------
# NIfTI


def load_nifti_header(path: str | Path):
    """``nibabel`` image object (lazy: no voxel data read) with errors as MedcfxError."""
    import nibabel as nib

    path = Path(path)
    _exists(path)
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, gzip/zlib errors ...
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None


def spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Shape as 3D: trailing singleton dims dropped; anything else than 3 dims is a MedcfxError."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        kind = f"{len(shape)}D"
        raise MedcfxError(f"{path}: expected a 3D volume, got shape {shape} ({kind})")
    return shape  # type: ignore[return-value]


def read_volume(path: str | Path) -> Volume:
    """Read a 3D NIfTI file as float32 (scaling by scl_slope/scl_inter applied, as nibabel does).

    Errors (one line, naming the file): unreadable/corrupt/truncated file, a 4D (or 2D) volume, NaN/inf.
    """
    path = Path(path)
    img = load_nifti_header(path)
    shape = spatial_shape(img.shape, path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    data = data.reshape(shape, order="A") if data.shape != shape else data
    _check_finite(data, path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    meta = {"dtype": str(img.get_data_dtype()), "zooms": zooms, "shape": shape}
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path, meta=meta)


def write_nifti(path: str | Path, array: np.ndarray, like: Volume | str | Path) -> Path:
    """Write ``array`` (float32, same shape as ``like``) with ``like``'s affine and header, atomically.

    ``like`` is a :class:`Volume` or the path of a NIfTI file (only its header is read). The header is a
    copy of the input's (qform/sform, units, description kept) with the data type set to float32 and the
    intensity scaling reset, so the values read back are exactly ``array``. The file is written to a
    temporary name in the same folder and moved into place with ``os.replace``.
    """
    import nibabel as nib

    path = Path(path)
    if isinstance(like, Volume):
        affine, header, shape = like.affine, like.header, like.shape
    else:
        img = load_nifti_header(like)
        affine, header, shape = img.affine, img.header, spatial_shape(img.shape, Path(like))
    array = np.asarray(array)
    if tuple(array.shape) != tuple(shape):
        raise MedcfxError(f"cannot write {path}: array shape {tuple(array.shape)} does not match the input grid {tuple(shape)}")
    if not is_volume_file(path):
        raise MedcfxError(f"cannot write {path}: a NIfTI output must end in .nii or .nii.gz")
    hdr = header.copy()
    hdr.set_data_dtype(np.float32)
    cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    out = cls(array.astype(np.float32, copy=False), affine, header=hdr)
    out.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        nib.save(out, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise MedcfxError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------------------------
# 2D images


def _to_chw(arr: np.ndarray, path: Path, channels_last: bool = False) -> np.ndarray:
    """[H, W] -> [1, H, W]; [H, W, C] (C in 1, 3, 4) -> [C, H, W]; [C, H, W] (C in 1, 3) kept.

    ``channels_last``: the reader knows the layout is [H, W, C] (Pillow, DICOM); otherwise (``.npy``) a
    3D array is channels-last when its last dimension is 1, 3 or 4 and its first is not.
    """
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and channels_last and arr.shape[-1] in (1, 3):
        return np.moveaxis(arr, -1, 0)
    if arr.ndim == 3 and not channels_last:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
            return np.moveaxis(arr, -1, 0)
        if arr.shape[0] in (1, 3):
            return arr
    raise MedcfxError(f"{path}: expected a 2D image [H, W], [H, W, C] or [C, H, W] with C 1 or 3, got shape {arr.shape}")


def _png_ihdr_bit_depth(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return int(head[24])
    except OSError:
        pass
    return None


def _read_pil(path: Path) -> Image2D:
    from PIL import Image

    notes: list[str] = []
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise MedcfxError(f"{path}: holds {frames} frames/pages; expected a single 2D image")
            mode = im.mode
            im.load()
            if mode == "1":
                im, notes = im.convert("L"), ["bilevel image read as 8-bit grey (0/255)"]
            elif mode == "P":
                target = "RGBA" if "transparency" in im.info else "RGB"
                im = im.convert(target)
                notes.append("palette image converted to RGB")
            elif mode == "CMYK" or mode == "YCbCr":
                im = im.convert("RGB")
                notes.append(f"{mode} image converted to RGB")
            elif mode == "LA":
                im = im.convert("L")
                notes.append("alpha channel dropped (LA -> L)")
            arr = np.asarray(im)
    except MedcfxError:
        raise
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
        notes.append("alpha channel dropped (RGBA -> RGB)")
    if arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., :1]
    if arr.dtype == np.uint8 or arr.dtype == bool:
        bit_depth, integer = 8, True
        if mode in ("RGB", "RGBA") and _png_ihdr_bit_depth(path) == 16:
            notes.append("16-bit colour PNG read at 8 bits per channel (Pillow keeps the high byte)")
    elif arr.dtype in (np.uint16, np.int16) or mode.startswith("I;16"):
        bit_depth, integer = 16, True
    elif arr.dtype.kind in "iu":
        # Pillow's mode "I" (32-bit int) is also how some 16-bit greyscale PNGs are opened
        png_depth = _png_ihdr_bit_depth(path)
        bit_depth, integer = (png_depth if png_depth else 32), True
    else:
        bit_depth, integer = 32, False
    data = np.ascontiguousarray(_to_chw(arr, path, channels_last=True), dtype=np.float32)
    _check_finite(data, path)
    meta = {"bit_depth": int(bit_depth), "integer": integer, "mode": mode, "notes": notes, "format": suffix_of(path)[1:]}
    return Image2D(data=data, path=path, meta=meta)


def _read_npy(path: Path) -> Image2D:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)} (object arrays are refused: no pickle)") from None
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    if arr.dtype.kind not in "biuf":
        raise MedcfxError(f"{path}: unsupported array dtype {arr.dtype} (expected numbers)")
    if arr.ndim == 3 and arr.shape[-1] == 4 and arr.shape[0] not in (1, 3, 4):
        arr = arr[..., :3]
    data = _to_chw(arr, path)
    if arr.dtype == np.uint8 or arr.dtype == bool:
        bit_depth, integer = 8, True
    elif arr.dtype.kind in "iu":
        bit_depth, integer = arr.dtype.itemsize * 8, True
    else:
        bit_depth, integer = arr.dtype.itemsize * 8, False
    data = np.ascontiguousarray(data, dtype=np.float32)
    _check_finite(data, path)
    meta = {"bit_depth": bit_depth, "integer": integer, "mode": str(arr.dtype), "notes": [], "format": "npy"}
    return Image2D(data=data, path=path, meta=meta)


def _read_dicom(path: Path) -> Image2D:
    try:
        import pydicom
    except ImportError:
        raise MedcfxError(f"cannot read {path}: {DICOM_HINT}") from None
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    if "PixelData" not in ds:
        raise MedcfxError(f"{path}: DICOM file has no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MedcfxError(f"{path}: multi-frame DICOM ({frames} frames); expected a single 2D image")
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise MedcfxError(f"cannot read {path}: pixel data not decodable (transfer syntax {ts}): {_reason(exc)}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(getattr(ds, "BitsStored", stored.dtype.itemsize * 8))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    x = stored.astype(np.float64)
    notes = []
    if photometric == "MONOCHROME1":
        # MONOCHROME1: larger stored values are darker. Invert within the nominal stored range
        # [lo, hi] (from BitsStored / PixelRepresentation) so larger values mean brighter: s' = lo + hi - s.
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        x = (lo + hi) - x
        notes.append("MONOCHROME1 inverted")
    elif photometric not in ("MONOCHROME2", "RGB"):
        if photometric.startswith("YBR") and stored.ndim == 3:
            from pydicom.pixels import convert_color_space

            x = convert_color_space(stored, photometric, "RGB").astype(np.float64)
            notes.append(f"{photometric} converted to RGB")
        elif photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            x = apply_color_lut(stored, ds).astype(np.float64)
            notes.append("palette colour applied")
    x = x * slope + intercept
    data = np.ascontiguousarray(_to_chw(x, path, channels_last=True), dtype=np.float32)
    _check_finite(data, path)
    meta = {
        "bit_depth": bits,
        "integer": False,  # rescaled values: scaled by the robust rule, never by 2**bits
        "mode": photometric,
        "notes": notes,
        "format": "dicom",
        "rescale": [slope, intercept],
    }
    return Image2D(data=data, path=path, meta=meta)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> Image2D:
    """Read a 2D image (PNG/JPEG/TIFF/BMP, ``.npy``, single-file DICOM) as float32 [C, H, W] raw values."""
    path = Path(path)
    _exists(path)
    suf = suffix_of(path)
    if suf in PIL_SUFFIXES:
        return _read_pil(path)
    if suf == ".npy":
        return _read_npy(path)
    if suf in (".dcm", ".dicom") or (suf not in SUPPORTED_SUFFIXES and _looks_like_dicom(path)):
        return _read_dicom(path)
    if suf in VOLUME_SUFFIXES:
        raise MedcfxError(f"{path}: a NIfTI volume where a 2D image is expected")
    raise MedcfxError(f"{path}: unsupported file type {suf or '(no suffix)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def read_any(path: str | Path) -> Volume | Image2D:
    """:func:`read_volume` for NIfTI, :func:`read_image` for the 2D formats; anything else is a MedcfxError."""
    path = Path(path)
    suf = suffix_of(path)
    if suf in VOLUME_SUFFIXES:
        return read_volume(path)
    if suf in IMAGE_SUFFIXES:
        return read_image(path)
    _exists(path)
    if _looks_like_dicom(path):
        return _read_dicom(path)
    raise MedcfxError(f"{path}: unsupported file type {suf or '(no suffix)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
