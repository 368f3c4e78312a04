"""DICOM readers: one single-frame file as a 2D image, one series folder as a 3D volume.

Needs the optional ``pydicom`` (``pip install 'medcfx[dicom]'``); every pixel transform is pydicom's own
(:func:`pydicom.pixels.apply_modality_lut`, :func:`~pydicom.pixels.apply_voi_lut`,
:func:`~pydicom.pixels.convert_color_space`, :func:`~pydicom.pixels.apply_color_lut`). A file is DICOM when it
carries the ``DICM`` marker at byte 128 (:func:`medcfx.data.io.is_dicom_file`), whatever its suffix.

:func:`read_dicom_image` -> :class:`~medcfx.data.io.Image2D`
    modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then the VOI LUT or window when the
    file has one (``meta["voi_range"]`` = its output range), then MONOCHROME1 inverted so that larger always
    means brighter (:func:`invert_monochrome1`); ``meta["nominal_range"]``: what the storage can hold
    through the modality LUT (:func:`nominal_range`).
:func:`read_dicom_series` -> :class:`~medcfx.data.io.Volume`
    all files of one series sorted along the slice normal; ``data`` [columns, rows, slices]; ``affine``
    voxel -> RAS+ world (mm), as nibabel's NIfTI affines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medcfx.data.io import DICOM_HINT, Image2D, Volume, _check_finite, _reason, _to_chw, is_dicom_file
from medcfx.errors import MedcfxError

# DICOM patient coordinates are LPS (+x left, +y posterior); NIfTI/nibabel world coordinates are RAS
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom(path: Path):
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError:
        raise MedcfxError(f"cannot read {path}: {DICOM_HINT}") from None
    return pydicom


def _dcmread(path: Path):
    pydicom = _pydicom(path)
    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:  # InvalidDicomError, OSError, struct errors on a truncated header ...
        raise MedcfxError(f"cannot read {path}: {_reason(exc)}") from None


def _decode(ds, path: Path) -> tuple[np.ndarray, str]:
    """(stored pixel array without colour conversion, the photometric interpretation of that array)."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise MedcfxError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MedcfxError(f"{path}: multi-frame DICOM ({frames} frames); expected a single 2D image")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr, info = get_decoder(ts).as_array(ds, raw=True)
    except Exception as exc:  # the decoder names the missing packages (gdcm, pylibjpeg, ...) in its message
        name = getattr(ts, "name", None) or str(ts or "unknown")
        raise MedcfxError(f"cannot read {path}: pixel data not decodable (transfer syntax {name}): {_reason(exc)}") from None
    photometric = str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", "MONOCHROME2")))
    return np.asarray(arr), photometric.strip().upper()


def padding_mask(stored: np.ndarray, ds) -> np.ndarray | None:
    """bool mask (shape of ``stored``) of the PixelPaddingValue pixels, or None when the file declares none.

    ``stored``: the stored values (before the modality LUT). With a PixelPaddingRangeLimit every stored value
    between PixelPaddingValue and the limit (inclusive, either order) is padding.
    """
    value = ds.get("PixelPaddingValue")
    if value is None or stored.ndim != 2:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == int(value)
    lo, hi = sorted((int(value), int(limit)))
    return (stored >= lo) & (stored <= hi)


def _modality_lut(stored: np.ndarray, ds, notes: list[str]) -> tuple[np.ndarray, bool]:
    """(values after pydicom's modality LUT / rescale, whether that changed the values)."""
    from pydicom.pixels import apply_modality_lut

    has_slope, has_inter = "RescaleSlope" in ds, "RescaleIntercept" in ds
    if has_slope != has_inter:  # pydicom applies a rescale only when both are present
        if not has_slope:
            ds.RescaleSlope = 1
        else:
            ds.RescaleIntercept = 0
        notes.append("RescaleSlope/RescaleIntercept incomplete: the missing one taken as " + ("1" if not has_slope else "0"))
    if ds.get("ModalityLUTSequence"):
        notes.append("modality LUT sequence applied")
        return np.asarray(apply_modality_lut(stored, ds)), True
    if "RescaleSlope" in ds:
        slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return np.asarray(apply_modality_lut(stored, ds)), (slope, inter) != (1.0, 0.0)
    return stored, False


def _is_hu(ds) -> bool:
    """True when the modality LUT output of this CT file is in Hounsfield units (RescaleType HU or absent)."""
    if str(ds.get("Modality", "")).upper() != "CT":
        return False
    if ds.get("ModalityLUTSequence"):
        kind = ds.ModalityLUTSequence[0].get("ModalityLUTType")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        kind = ds.get("RescaleType")
    else:
        return False  # no modality LUT: the stored values are not known to be HU
    return kind is None or str(kind).strip().upper() in ("", "HU")


def _voi(x: np.ndarray, ds, notes: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Apply the file's VOI LUT or window (pydicom's apply_voi_lut); (values, output range) or (x, None)."""
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
    window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not lut and not window:
        return x, None
    try:
        if lut:
            n, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
            if x.dtype.kind == "f" and np.array_equal(x, np.round(x)):
                x = x.astype(np.int64)  # a VOI LUT indexes integers (a rescale yields integral floats)
            y = np.asarray(apply_voi_lut(x, ds))
            table = np.asarray(apply_voi_lut(np.arange(first, first + n, dtype=np.int64), ds))
            rng = (float(table.min()), float(table.max()))
            notes.append(f"VOI LUT applied (output {rng[0]:g}..{rng[1]:g})" + (f"; first of {len(seq)} VOI LUTs" if len(seq) > 1 else ""))
        else:
            y = np.asarray(apply_voi_lut(x.astype(np.float64), ds))
            with np.errstate(over="ignore"):  # a SIGMOID window at +-inf: exp overflows to its asymptote
                ends = np.asarray(apply_voi_lut(np.array([-1e300, 1e300]), ds))
            rng = (float(ends.min()), float(ends.max()))
            c, w = (ds[k].value[0] if ds[k].VM > 1 else ds[k].value for k in ("WindowCenter", "WindowWidth"))
            many = f"; first of {ds['WindowCenter'].VM} windows" if ds["WindowCenter"].VM > 1 else ""
            notes.append(f"VOI window applied (center {float(c):g}, width {float(w):g}, output {rng[0]:g}..{rng[1]:g}){many}")
    except Exception as exc:  # a broken window (width 0, unknown VOILUTFunction): values kept, said in notes
        notes.append(f"VOI LUT/window not applied ({_reason(exc)})")
        return x, None
    return y.astype(np.float64), rng


def invert_monochrome1(x: np.ndarray, padding: np.ndarray | None,
                       voi_range: tuple[float, float] | None) -> tuple[np.ndarray, tuple[float, float]]:
    """MONOCHROME1 (the minimum sample is displayed white) -> larger is brighter; returns (x', (lo, hi)).

    With a VOI window: x' = lo + hi - x over its output range (lo, hi). Without one a MONOCHROME1 file does
    not record where black is, so the actual range (lo, hi) of the valid (non-padding) values is inverted
    and the darkest value placed at 0: x' = hi - x. A MONOCHROME2 copy whose darkest pixel is 0 (a
    radiograph with a black border) then gives the same array, whether the MONOCHROME1 file was written as
    the complement over the nominal range (2**BitsStored - 1 - v) or over its own range.
    """
    if voi_range is not None:
        lo, hi = (float(v) for v in voi_range)
        return (lo + hi) - x, (lo, hi)
    valid = x[~padding] if padding is not None and not padding.all() else x
    lo, hi = float(valid.min()), float(valid.max())
    return hi - x, (lo, hi)


def nominal_range(ds, stored: np.ndarray) -> tuple[float, float]:
    """The values the file's storage can hold, through its modality LUT: (lo, hi).

    The stored range is [0, 2**BitsStored - 1] (or the signed range for PixelRepresentation 1); pydicom's
    ``apply_modality_lut`` maps both ends (a RescaleSlope may be negative: the result is sorted).
    """
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8) or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.int64)
    if ds.get("ModalityLUTSequence") or "RescaleSlope" in ds:
        try:
            ends = np.asarray(apply_modality_lut(ends.astype(stored.dtype if stored.dtype.kind in "iu" else np.int64), ds),
                              dtype=np.float64)
        except Exception:  # a LUT that cannot take the ends: the stored range itself
            pass
    return float(np.min(ends)), float(np.max(ends))


def read_dicom_image(path: str | Path) -> Image2D:
    """Read a single-frame DICOM file as an :class:`~medcfx.data.io.Image2D`.

    Returns ``data`` float32 [C, H, W] (C = 1 for MONOCHROME1/2, 3 for RGB, YBR_* converted to RGB and
    PALETTE COLOR through its palette). Grey values: stored value -> modality LUT (RescaleSlope/Intercept;
    HU for CT) -> VOI LUT or window when the file has one (not for CT in HU: those are scaled by one fixed HU
    window, :data:`medcfx.data.intensity.HU_WINDOW`, whatever window a file carries) -> MONOCHROME1
    inverted by :func:`invert_monochrome1`.

    ``meta``: ``format`` "dicom"; ``mode`` the photometric interpretation; ``modality`` (ds.Modality or
    None); ``hu`` (CT whose modality LUT gives Hounsfield units: the values are HU); ``bit_depth``
    (BitsStored); ``integer`` (True when the values are the stored integers, only inverted for
    MONOCHROME1); ``voi_range`` (lo, hi) or None; ``nominal_range`` (lo, hi) of the storage through the
    modality LUT (after a MONOCHROME1 inversion: (0, hi - lo)) or None when a VOI applied; ``padding`` bool
    [H, W] of the PixelPaddingValue pixels or None; ``rescale`` [slope, intercept] or None; ``notes``.

    Errors (:class:`~medcfx.errors.MedcfxError`, one line naming the file): pydicom missing, unreadable
    file, no pixel data, multi-frame, pixel data pydicom cannot decode (with pydicom's full reason),
    NaN/inf values.
    """
    path = Path(path)
    ds = _dcmread(path)
    stored, photometric = _decode(ds, path)
    notes: list[str] = []
    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8) or stored.dtype.itemsize * 8)
    modality = str(ds.Modality).strip() if ds.get("Modality") else None
    meta = {"format": "dicom", "mode": photometric, "modality": modality, "hu": False, "bit_depth": bits,
            "integer": True, "voi_range": None, "padding": None, "rescale": None, "notes": notes}
    if stored.ndim == 3 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            stored = convert_color_space(stored, photometric, "RGB")
            notes.append(f"{photometric} converted to RGB")
        elif photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            try:
                stored = np.asarray(apply_color_lut(stored, ds))
            except Exception as exc:
                raise MedcfxError(f"cannot read {path}: palette colour lookup failed: {_reason(exc)}") from None
            notes.append("palette colour applied")
            meta["bit_depth"] = stored.dtype.itemsize * 8
        elif photometric != "RGB":
            raise MedcfxError(f"{path}: unsupported photometric interpretation {photometric}")
        data = np.ascontiguousarray(_to_chw(stored, path, channels_last=True), dtype=np.float32)
        _check_finite(data, path)
        return Image2D(data=data, path=path, meta=meta)
    pad = padding_mask(stored, ds)
    meta["padding"] = pad
    if pad is not None and pad.any():
        notes.append(f"{int(pad.sum())} padding pixel(s) (PixelPaddingValue {ds.PixelPaddingValue})")
    x, changed = _modality_lut(stored, ds, notes)
    if "RescaleSlope" in ds and not ds.get("ModalityLUTSequence"):
        meta["rescale"] = [float(ds.RescaleSlope), float(ds.RescaleIntercept)]
    meta["hu"] = _is_hu(ds)
    if modality == "CT" and not meta["hu"]:
        notes.append("CT values are not Hounsfield units (RescaleType " + str(ds.get("RescaleType", "absent, no rescale")) + ")")
    if meta["hu"]:
        voi_range = None  # CT in HU: one fixed HU window for every file (medcfx.data.intensity.HU_WINDOW)
        if ds.get("WindowCenter") is not None or ds.get("VOILUTSequence"):
            notes.append("CT in Hounsfield units: the file's VOI window is not applied (the fixed HU window is)")
    else:
        x, voi_range = _voi(x, ds, notes)
    meta["voi_range"] = voi_range
    meta["integer"] = not changed and voi_range is None
    x = np.asarray(x, dtype=np.float64)
    n0, n1 = nominal_range(ds, stored)
    meta["nominal_range"] = None if voi_range is not None else (n0, n1)
    if photometric == "MONOCHROME1":
        x, (lo, hi) = invert_monochrome1(x, pad, voi_range)
        notes.append(f"MONOCHROME1 inverted ({lo:g}..{hi:g} -> {hi:g}..{lo:g}, darkest pixel 0)" if voi_range is None
                     else f"MONOCHROME1 inverted over the VOI output range {lo:g}..{hi:g}")
        if voi_range is None:
            meta["nominal_range"] = (0.0, n1 - n0)
    data = np.ascontiguousarray(x[None], dtype=np.float32)
    _check_finite(data, path)
    return Image2D(data=data, path=path, meta=meta)


# ---------------------------------------------------------------------------------------------------------
# series -> volume


def _floats(ds, key: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(key)
    if value is None:
        raise MedcfxError(f"{path}: DICOM slice has no {key}; a series folder needs it to place the slice")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise MedcfxError(f"{path}: {key} must hold {n} numbers, got {value!r}")
    return arr


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (by the DICM marker; hidden files and DICOMDIR skipped), sorted."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise MedcfxError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [p for p in entries if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file() and is_dicom_file(p)]


def is_dicom_series(folder: str | Path) -> bool:
    """True when every visible file of ``folder`` is DICOM and the first carries ImagePositionPatient and
    ImageOrientationPatient (slices of a volume; radiographs carry neither and stay a folder of images).
    Reads one header; never raises."""
    folder = Path(folder)
    try:
        visible = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name.upper() != "DICOMDIR"]
        files = dicom_files(folder)
        if not files or len(files) != len(visible):
            return False
        import pydicom

        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        return ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient") is not None
    except Exception:
        return False


def read_dicom_series(folder: str | Path) -> Volume:
    """Read the DICOM files of one series in ``folder`` as a 3D :class:`~medcfx.data.io.Volume`.

    Slices are sorted by their position along the slice normal (normal = row cosines x column cosines of
    ImageOrientationPatient; position = normal . ImagePositionPatient); each slice's modality LUT is
    applied (CT in Hounsfield units); no VOI window. ``data`` float32 [columns, rows, slices]: voxel
    (i, j, k) is column i, row j of the k-th slice. ``affine`` float64 4x4 maps (i, j, k, 1) to RAS+ world
    mm (DICOM's LPS with the first two axes negated), as nibabel's NIfTI affines; the slice axis is the
    mean step between consecutive ImagePositionPatient. ``header`` is None (``write_nifti`` builds one).
    ``meta``: ``zooms`` (column spacing, row spacing, slice spacing) mm, ``dtype`` (stored dtype),
    ``shape``, ``modality``, ``hu``, ``series_uid``, ``files`` (in slice order), ``padding`` bool
    [columns, rows, slices] or None, ``format`` "dicom", ``notes``.

    Errors (one line naming the folder or file): no DICOM files; several series (each listed); a slice
    without ImagePositionPatient / ImageOrientationPatient / PixelSpacing; slices with different
    orientation, size or spacing; two slices at the same position; uneven slice positions (a missing
    slice); colour or multi-frame slices; undecodable pixel data; NaN/inf.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedcfxError(f"cannot read {folder}: not a folder")
    files = dicom_files(folder)
    if not files:
        raise MedcfxError(f"{folder}: folder holds no DICOM files (none with the DICM marker at byte 128)")
    headers = [(f, _dcmread(f)) for f in files]
    notes: list[str] = []
    no_pixels = [f.name for f, ds in headers if "PixelData" not in ds]
    if no_pixels:
        notes.append(f"{len(no_pixels)} DICOM file(s) without pixel data skipped: {', '.join(no_pixels[:5])}")
    series: dict[str, list] = {}
    for f, ds in headers:
        if "PixelData" in ds:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if not series:
        raise MedcfxError(f"{folder}: no DICOM file in the folder holds pixel data")
    if len(series) > 1:
        desc = "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(fs)} file(s), e.g. {fs[0][0].name})" for uid, fs in sorted(series.items()))
        raise MedcfxError(f"{folder}: holds {len(series)} DICOM series: {desc}; put each series in its own folder")
    uid, chosen = next(iter(series.items()))
    slices = []
    for f, ds in chosen:
        iop = _floats(ds, "ImageOrientationPatient", 6, f)
        ipp = _floats(ds, "ImagePositionPatient", 3, f)
        spacing = _floats(ds, "PixelSpacing", 2, f)
        slices.append((f, ds, iop, ipp, spacing))
    f0, ds0, iop0, _, sp0 = slices[0]
    for f, ds, iop, _, sp in slices[1:]:
        if not np.allclose(iop, iop0, atol=1e-4):
            raise MedcfxError(f"{f}: ImageOrientationPatient {list(iop)} differs from {f0.name}'s {list(iop0)} in the same series")
        if not np.allclose(sp, sp0, rtol=1e-4):
            raise MedcfxError(f"{f}: PixelSpacing {list(sp)} differs from {f0.name}'s {list(sp0)} in the same series")
        if (ds.Rows, ds.Columns) != (ds0.Rows, ds0.Columns):
            raise MedcfxError(f"{f}: {ds.Rows} x {ds.Columns} pixels, {f0.name} has {ds0.Rows} x {ds0.Columns}")
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-3):
        raise MedcfxError(f"{f0}: ImageOrientationPatient {list(iop0)} is not two orthogonal unit vectors")
    slices.sort(key=lambda s: float(normal @ s[3]))
    pos = np.array([float(normal @ s[3]) for s in slices])
    gaps = np.diff(pos)
    for k in np.flatnonzero(np.abs(gaps) < 1e-3):
        raise MedcfxError(f"{folder}: {slices[k][0].name} and {slices[k + 1][0].name} are at the same position "
                          f"{pos[k]:.3f} mm along the slice normal (duplicate slice)")
    ipps = np.array([s[3] for s in slices])
    if len(slices) > 1:
        diffs = np.diff(ipps, axis=0)
        usual = diffs[np.argsort(np.linalg.norm(diffs, axis=1))[len(diffs) // 2]]
        dev = np.linalg.norm(diffs - usual, axis=1)
        if dev.max() > 1e-3 + 0.01 * np.linalg.norm(usual):  # a missing slice, or positions off the normal
            k = int(np.argmax(dev))
            raise MedcfxError(f"{folder}: slices are not evenly spaced: {gaps[k]:.3f} mm between {slices[k][0].name} and "
                              f"{slices[k + 1][0].name}, {float(np.linalg.norm(usual)):.3f} mm elsewhere (missing slice?)")
        step = (ipps[-1] - ipps[0]) / (len(slices) - 1)
    else:
        thick = ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0
        step = normal * float(thick)
        notes.append(f"a single slice: slice spacing {float(thick):g} mm from SpacingBetweenSlices/SliceThickness")
    arrays, pads = [], []
    photometric = "MONOCHROME2"
    for f, ds, *_ in slices:
        stored, photometric = _decode(ds, f)
        if stored.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise MedcfxError(f"{f}: a {photometric} slice; a DICOM series volume must be greyscale")
        pads.append(padding_mask(stored, ds))
        x, _ = _modality_lut(stored, ds, [])
        arrays.append(np.asarray(x, dtype=np.float64).T)  # [rows, columns] -> [columns, rows]
    dtype = str(stored.dtype)
    data = np.stack(arrays, axis=-1)
    padding = None if all(p is None for p in pads) else np.stack(
        [(p if p is not None else np.zeros((ds0.Rows, ds0.Columns), bool)).T for p in pads], axis=-1)
    if photometric == "MONOCHROME1":
        data, (lo, hi) = invert_monochrome1(data, padding, None)
        notes.append(f"MONOCHROME1 inverted ({lo:g}..{hi:g} -> {hi:g}..{lo:g}, darkest voxel 0)")
    data = np.ascontiguousarray(data, dtype=np.float32)
    _check_finite(data, folder)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * sp0[1]  # i: along a row (next column), PixelSpacing[1] = column spacing
    lps[:3, 1] = col_cos * sp0[0]  # j: down a column (next row), PixelSpacing[0] = row spacing
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    affine = LPS_TO_RAS @ lps
    hu = _is_hu(ds0)
    modality = str(ds0.Modality).strip() if ds0.get("Modality") else None
    meta = {"format": "dicom", "zooms": (float(sp0[1]), float(sp0[0]), float(np.linalg.norm(step))), "dtype": dtype,
            "shape": tuple(data.shape), "modality": modality, "hu": hu, "series_uid": uid or None,
            "files": [s[0] for s in slices], "padding": padding, "notes": notes}
    return Volume(data=data, affine=affine, header=None, path=folder, meta=meta)
