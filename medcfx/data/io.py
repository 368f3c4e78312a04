"""Readers and writers for the image files medcfx takes: NIfTI volumes, DICOM and 2D images.

Every reader returns float32 data and keeps what is needed to write results back where they came from
(the NIfTI affine and header); every problem with a file is a one-line :class:`~medcfx.errors.MedcfxError`
naming the file (``cannot read <file>: <reason>`` with the library's whole reason on one line).

One detection rule for every command: a file is DICOM when it carries the ``DICM`` marker at byte 128,
whatever its suffix (``.dcm``, ``.IMA``, none); NIfTI by the suffix ``.nii``/``.nii.gz``; the Pillow formats
and ``.npy`` by suffix (:func:`is_dicom_file`, :func:`is_image_file`, :func:`is_volume_file`).

Volumes: :func:`read_volume` -> :class:`Volume` (``data`` float32 ``[X, Y, Z]`` in the file's voxel order,
``affine``, ``header``). A trailing singleton dimension is dropped; a 4D file is read one channel at a time
(``frame=``). Before any voxel is read the header's data size is checked against the file, and a ``.nii.gz``
is decompressed once, whole, with its gzip CRC32 and length verified. A folder of DICOM files is a series
(:func:`medcfx.data.dicom.read_dicom_series`). :func:`write_nifti` writes on an input's grid (atomic).

2D images: :func:`read_image` -> :class:`Image2D` (``data`` float32 ``[C, H, W]``, C = 1 grey or 3 RGB) of
RAW values (0..255 for 8-bit, 0..65535 for 16-bit, modality-LUT values for DICOM); scaling is the
preprocessing's job (``meta["bit_depth"]``, ``meta["integer"]``, DICOM ``meta["voi_range"]``). RGBA drops
alpha, palette images become RGB, ``LA`` grey, each with a note in ``meta["notes"]``. DICOM
(:func:`medcfx.data.dicom.read_dicom_image`) needs the optional ``pydicom`` (``pip install 'medcfx[dicom]'``).
:func:`read_any` dispatches with the same rule (a folder is read as a DICOM series).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcfx import staging
from medcfx.errors import MedcfxError

VOLUME_SUFFIXES = (".nii.gz", ".nii")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # a hint only: DICOM is recognised by its DICM marker
IMAGE_SUFFIXES = PIL_SUFFIXES + (".npy",) + DICOM_SUFFIXES
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
    """True for a ``.nii`` / ``.nii.gz`` name (by suffix only; the file is not opened)."""
    return suffix_of(path) in VOLUME_SUFFIXES


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` is a file carrying the DICOM ``DICM`` marker at byte 128 (any suffix or none).

    Reads 132 bytes; False for an unreadable, short or missing file (never raises).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def is_image_file(path: str | Path) -> bool:
    """True for a 2D image file: a Pillow/``.npy``/DICOM suffix, or any other non-NIfTI file with the DICM marker.

    Used to list image folders: a folder of extension-less (or ``.IMA``) DICOM files is a folder of images.
    A ``DICOMDIR`` index file is not an image. Only files of unknown suffix are opened (132 bytes).
    """
    suf = suffix_of(path)
    if suf in IMAGE_SUFFIXES:
        return True
    if suf in VOLUME_SUFFIXES or Path(path).name.upper() == "DICOMDIR":
        return False
    return is_dicom_file(path)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: whole message`` on one line (whitespace runs, newlines included, -> one space; cut past ``limit``)."""
    msg = " ".join(str(exc).split())
    msg = msg[: limit - 3] + "..." if len(msg) > limit else msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The reason of a library exception for a one-line error: its whole message (see :func:`_one_line`)."""
    text = _one_line(exc)
    if isinstance(exc, EOFError) or "end-of-stream" in text or "Compressed file ended" in text:
        return f"truncated or corrupt file ({text if str(exc).strip() else 'EOFError: unexpected end of file'})"
    return text


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


GZIP_MAX_RATIO = 1032  # deflate expands a stream at most ~1032-fold (RFC 1951 longest match per 258 bytes)


def _declared(img) -> tuple[int, int]:
    """(byte offset of the voxel data, bytes of voxel data) from a NIfTI header; Python ints (no overflow)."""
    hdr = img.header
    return int(hdr.get_data_offset()), math.prod(int(s) for s in hdr.get_data_shape()) * hdr.get_data_dtype().itemsize


def _too_small(path: Path, img, holds: str) -> MedcfxError:
    shape, dtype = tuple(int(s) for s in img.header.get_data_shape()), np.dtype(img.header.get_data_dtype())
    return MedcfxError(f"{path}: header declares {shape} {dtype} ({_declared(img)[1]} bytes of voxel data) but the file holds only {holds}")


def _gzip_stream(path: Path, sink=None) -> int:
    """Decompress ``path`` whole with the gzip module (CRC32 and length checked at the end of each member).

    Returns the decompressed length; ``sink`` (a writable file object) receives the bytes when given.
    """
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
                if sink is not None:
                    sink.write(chunk)
    except (FileNotFoundError, PermissionError) as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile (CRC, length), truncation, bad deflate data
        raise MedcfxError(f"cannot read {path}: corrupt gzip stream ({_one_line(exc)})") from None
    return n


def _check_size(path: Path, img) -> None:
    """Refuse a header whose voxel data cannot fit in the file, without reading (or allocating) the data.

    ``.nii``: offset + data bytes against the file size. ``.nii.gz``: against the most the compressed size
    can expand to, then the gzip ISIZE trailer (single-member streams; a mismatch is confirmed by counting
    the decompressed bytes, in bounded memory, so that a corrupt trailer is reported as such).
    """
    offset, nbytes = _declared(img)
    need, size = offset + nbytes, path.stat().st_size
    if suffix_of(path) != ".nii.gz":
        if need > size:
            raise _too_small(path, img, f"{size} bytes (voxel data starts at byte {offset})")
        return
    if need > GZIP_MAX_RATIO * size + (1 << 16):
        raise _too_small(path, img, f"{size} compressed bytes (at most {GZIP_MAX_RATIO * size} bytes decompressed)")
    with open(path, "rb") as f:
        head, _, isize = f.read(4), f.seek(max(size - 4, 0)), int.from_bytes(f.read(4), "little")
    single = len(head) == 4 and not head[3] & 0x04  # FEXTRA set: BGZF and other multi-member streams
    if single and need < 2**32 and isize < need:
        n = _gzip_stream(path)
        if n < need:
            raise _too_small(path, img, f"{n} bytes decompressed (voxel data starts at byte {offset})")


def load_nifti_header(path: str | Path):
    """The ``nibabel`` image of a NIfTI file, lazily (no voxel data read), with its size checked.

    Returns a ``nibabel.Nifti1Image`` / ``Nifti2Image`` whose header describes the file. Raises
    :class:`~medcfx.errors.MedcfxError` (one line naming the file): no such file, unreadable header,
    a header declaring more voxel data than the file can hold (see :func:`read_volume`).
    """
    import nibabel as nib

    path = Path(path)
    _exists(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, gzip/zlib errors ...
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    if isinstance(img, nib.Nifti1Image) and is_volume_file(path):
        _check_size(path, img)
    return img


def spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Shape as 3D: trailing singleton dims dropped; anything else than 3 dims is a MedcfxError."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise MedcfxError(f"{path}: expected a 3D volume, got shape {shape} (4D: {shape[3]} channels or frames "
                          "along the 4th axis); a dataset layout must name its channels (e.g. a Decathlon dataset.json 'modality')")
    if len(shape) != 3:
        raise MedcfxError(f"{path}: expected a 3D volume, got shape {shape} ({len(shape)}D)")
    return shape  # type: ignore[return-value]


def _nifti_image(path: Path):
    """The NIfTI image of ``path`` with its size checked and, for ``.nii.gz``, its whole gzip stream verified."""
    import nibabel as nib

    img = load_nifti_header(path)
    if suffix_of(path) != ".nii.gz":
        return img
    buf = io.BytesIO()
    n = _gzip_stream(path, buf)
    offset, nbytes = _declared(img)
    if n < offset + nbytes:
        raise _too_small(path, img, f"{n} bytes decompressed (voxel data starts at byte {offset})")
    cls = nib.Nifti2Image if isinstance(img.header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        return cls.from_stream(buf)  # the verified bytes; nothing is decompressed a second time
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None


def read_volume(path: str | Path, frame: int | None = None) -> Volume:
    """Read a 3D NIfTI file (or a DICOM series folder) as a :class:`Volume` of float32.

    ``data`` float32 [X, Y, Z] (NIfTI scl_slope/scl_inter applied, as nibabel does); ``affine`` float64 4x4
    voxel -> world (mm, RAS+); ``header`` the file's nibabel header; ``meta``: ``dtype`` (on disk),
    ``zooms`` (mm), ``shape``, ``format`` ("nifti"), ``frame`` (when given). ``frame=i`` reads channel i
    of a 4D file [X, Y, Z, C] (same affine and header); a 4D file without ``frame`` is an error saying
    how many channels it holds. A folder is read with :func:`medcfx.data.dicom.read_dicom_series`.

    Errors (:class:`~medcfx.errors.MedcfxError`, one line naming the file): no such file, not NIfTI,
    unreadable/corrupt/truncated file, ``corrupt gzip stream (...)`` (CRC or length mismatch),
    ``header declares <shape> <dtype> (<N> bytes of voxel data) but the file holds only <M> ...``
    (refused before reading), a 4D file without ``frame``, a frame out of range, a 2D/5D volume, NaN/inf.
    """
    path = Path(path)
    if path.is_dir():
        from medcfx.data.dicom import read_dicom_series

        return read_dicom_series(path)
    _exists(path)
    if not is_volume_file(path):
        what = "a DICOM file" if is_dicom_file(path) else f"unsupported file type {suffix_of(path) or '(no suffix)'}"
        raise MedcfxError(f"{path}: {what} where a volume is expected; volumes are {', '.join(VOLUME_SUFFIXES)} files or a DICOM series folder")
    img = _nifti_image(path)
    shape = tuple(int(s) for s in img.shape)
    frames = shape[3] if len(shape) >= 4 and all(s == 1 for s in shape[4:]) else None
    if frame is None:
        slicer, out_shape = None, spatial_shape(shape, path)
    elif frames is None:
        raise MedcfxError(f"{path}: holds a {len(shape)}D volume of shape {shape}, not 4D channels; no frame {frame}")
    elif not 0 <= frame < frames:
        raise MedcfxError(f"{path}: has {frames} channel(s) along the 4th axis; frame {frame} does not exist")
    else:
        slicer, out_shape = (slice(None),) * 3 + (frame,) + (0,) * (len(shape) - 4), shape[:3]
    try:
        data = (np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged")) if slicer is None
                else np.asarray(img.dataobj[slicer], dtype=np.float32))  # one channel: only its bytes are read
    except Exception as exc:
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None
    data = data.reshape(out_shape, order="A") if data.shape != out_shape else data
    data = data if data.flags.writeable else data.copy(order="K")  # a slice of the in-memory stream is read-only
    _check_finite(data, path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    meta = {"dtype": str(img.get_data_dtype()), "zooms": zooms, "shape": out_shape, "format": "nifti"}
    if frame is not None:
        meta["frame"] = int(frame)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path, meta=meta)


def write_nifti(path: str | Path, array: np.ndarray, like: Volume | str | Path) -> Path:
    """Write ``array`` (float32, same shape as ``like``) with ``like``'s affine and header, atomically.

    ``like`` is a :class:`Volume`, the path of a NIfTI file (only its header is read; a 4D file's grid is its
    first three axes) or a DICOM series folder. The header is a
    copy of the input's (qform/sform, units, description kept) with the data type set to float32 and the
    intensity scaling reset, so the values read back are exactly ``array``. A :class:`Volume` without a
    header (a DICOM series) gets a fresh NIfTI-1 header: qform and sform = its affine (code 1, scanner),
    units mm. The file is written to a temporary name in the same folder and moved into place with
    ``os.replace``. Returns ``path``. Errors (MedcfxError naming the output): shape mismatch, a name not
    ending in ``.nii``/``.nii.gz``, an OS error while writing.
    """
    import nibabel as nib

    path = Path(path)
    if isinstance(like, Volume):
        affine, header, shape = like.affine, like.header, like.shape
    elif Path(like).is_dir():  # a DICOM series folder: its grid (this reads the series)
        ref = read_volume(like)
        affine, header, shape = ref.affine, ref.header, ref.shape
    else:
        img = load_nifti_header(like)
        # a 4D multi-channel file (Decathlon): its grid is the first three axes
        shape = tuple(img.shape[:3]) if len(img.shape) == 4 else spatial_shape(img.shape, Path(like))
        affine, header = img.affine, img.header
    array = np.asarray(array)
    if tuple(array.shape) != tuple(shape):
        raise MedcfxError(f"cannot write {path}: array shape {tuple(array.shape)} does not match the input grid {tuple(shape)}")
    if not is_volume_file(path):
        raise MedcfxError(f"cannot write {path}: a NIfTI output must end in .nii or .nii.gz")
    if header is None:
        out = nib.Nifti1Image(array.astype(np.float32, copy=False), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        out.header.set_xyzt_units("mm")
    else:
        hdr = header.copy()
        hdr.set_data_dtype(np.float32)
        cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        out = cls(array.astype(np.float32, copy=False), affine, header=hdr)
    out.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging.staging_path(path)  # ends in the final name, so nibabel picks the same format
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


def read_image(path: str | Path) -> Image2D:
    """Read a 2D image as an :class:`Image2D`: ``data`` float32 [C, H, W] of raw values (C 1 or 3).

    DICOM (DICM marker, any suffix) -> :func:`medcfx.data.dicom.read_dicom_image`; PNG/JPEG/TIFF/BMP by
    suffix (Pillow); ``.npy`` (no pickle). ``meta``: ``bit_depth``, ``integer``, ``mode``, ``notes``,
    ``format`` (plus the DICOM keys). Errors (MedcfxError naming the file): no such file, a ``.dcm``-like
    name without the DICM marker, a NIfTI volume, an unsupported suffix, unreadable data, a multi-frame
    file, NaN/inf.
    """
    path = Path(path)
    _exists(path)
    if is_dicom_file(path):
        from medcfx.data.dicom import read_dicom_image

        return read_dicom_image(path)
    suf = suffix_of(path)
    if suf in PIL_SUFFIXES:
        return _read_pil(path)
    if suf == ".npy":
        return _read_npy(path)
    if suf in DICOM_SUFFIXES:
        raise MedcfxError(f"cannot read {path}: not a DICOM file (no 'DICM' marker at byte 128)")
    if suf in VOLUME_SUFFIXES:
        raise MedcfxError(f"{path}: a NIfTI volume where a 2D image is expected")
    raise MedcfxError(f"{path}: unsupported file type {suf or '(no suffix)'}; supported: {', '.join(SUPPORTED_SUFFIXES)} or DICOM")


def read_any(path: str | Path) -> Volume | Image2D:
    """:func:`read_volume` for NIfTI files and folders (DICOM series), :func:`read_image` for 2D images.

    Same detection rule as :func:`read_image` (DICOM by its marker); anything else is a MedcfxError.
    """
    path = Path(path)
    if path.is_dir() or is_volume_file(path):
        return read_volume(path)
    return read_image(path)
