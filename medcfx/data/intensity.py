"""Intensity: which voxels are the patient, and what number the model sees for each of them.

Every rule maps raw values to u in [0, 1] (the model then sees 2u - 1). One function per step:

:func:`background_value`
    The value of a volume's background: the value most of its 8 corner voxels share (at least 4 of 8),
    or None when the corners disagree (no constant background, e.g. an image that is not skull-stripped).
:func:`foreground_mask`
    Foreground = voxels that differ from their volume's background value in ANY channel. Not the sign of
    the values: a z-score normalised case (negative values inside the brain, background exactly 0) keeps
    every brain voxel. A channel without a constant background marks every voxel foreground.
:func:`scale_volume`
    Per channel: lo = min(0, min over the foreground), p = the ``percentile`` of the foreground (numpy's
    linear interpolation), u = (x - lo) / (p - lo), clipped to [0, 1] when ``clip``; background voxels 0.
    For raw non-negative MRI (lo = 0) this is x / p exactly, the rule of Sanchez et al. 2022 (sec. 4.1);
    a z-scored case is shifted by its foreground minimum first, so the model sees (x - min) / (p - min) of
    the original intensities (reported in a note).
:func:`scale_image` (2D images), by the model's recorded rule (``PreprocessConfig.intensity``):

    ``percentile`` (default for models trained since the rule was recorded)
        The same formula over the image's valid pixels (all but DICOM padding): lo = min(0, min), p = the
        ``percentile``. Invariant to how the same content is stored: 8-bit vs 16-bit PNG (x 257), JPEG
        (within its rounding), RGB of grey, palette PNG, DICOM of any BitsStored, MONOCHROME1 (inverted by
        the reader over its actual range).
    ``nominal``
        Images over the nominal range of their storage, u = (x - lo) / (hi - lo): 8-bit PNG/JPEG (0, 255);
        16-bit PNG (0, 65535), so an 8-bit image widened to 16 bits by x 257 is the same array; DICOM: its
        BitsStored range through its modality LUT (``meta["nominal_range"]`` of the reader, so a RescaleSlope
        that maps 12 stored bits onto 0..255 is scaled over 0..255); float images by the percentile rule. A
        note is added when an image uses less than 1/16 of its nominal range (8-bit content in a 15-bit
        DICOM, say): its scaled values are dark.
    ``legacy``
        What models trained before the rule was recorded saw: 8-bit integer images / 255, every other image
        by the percentile rule. Registry entries without a recorded rule are replayed with it.

    In every rule, DICOM CT in Hounsfield units is scaled by the fixed window ``HU_WINDOW`` (u = (HU + 1024)
    / 4095, clipped), never by the image's own minimum; a DICOM whose VOI LUT or window the reader applied is
    scaled over that window's output range.
"""

from __future__ import annotations

import numpy as np

from medcfx.errors import MedcfxError

INTENSITY_RULES = ("percentile", "nominal", "legacy")
HU_WINDOW = (-1024.0, 3071.0)  # the 12-bit CT range: air -1000 HU lands at 0.006, dense bone 3000 HU at 0.98
CHANNEL_NAMES_2D = {1: ["grey"], 3: ["red", "green", "blue"]}


def background_value(x: np.ndarray) -> float | None:
    """The background value of a 3D array: the value shared by at least 4 of its 8 corner voxels, else None."""
    x = np.asarray(x)
    corners = x[np.ix_(*[[0, n - 1] for n in x.shape[:3]])].ravel()
    vals, counts = np.unique(corners, return_counts=True)
    k = int(np.argmax(counts))
    return float(vals[k]) if counts[k] >= 4 else None


def foreground_mask(channels: list[np.ndarray], names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """bool [X, Y, Z]: voxels differing from their channel's :func:`background_value` in any channel.

    ``channels``: float arrays of one shape. Returns (mask, notes); notes say which channel had no constant
    background (every voxel counted as foreground) or a non-zero one.
    """
    names = names or [f"channel {i}" for i in range(len(channels))]
    notes: list[str] = []
    fg = np.zeros(channels[0].shape, dtype=bool)
    for name, x in zip(names, channels):
        b = background_value(x)
        if b is None:
            notes.append(f"{name}: no constant background at the corners; every voxel counts as foreground")
            fg[...] = True
            continue
        if b != 0:
            notes.append(f"{name}: background value {b:g} (not 0)")
        fg |= x != np.float32(b)
    return fg, notes


def scale_volume(x: np.ndarray, fg: np.ndarray, percentile: float, clip: bool, name: str = "volume") -> tuple[np.ndarray, list[str]]:
    """Scale ``x`` (float32 [X, Y, Z], modified IN PLACE) by the foreground rule; returns (x, notes).

    Raises MedcfxError when the percentile does not exceed the foreground's minimum (a channel constant
    over the foreground: an empty or missing modality, a mask stored as an image).
    """
    notes: list[str] = []
    vals = x[fg]
    vmin = float(vals.min())
    lo = min(0.0, vmin)
    p = float(np.percentile(vals, percentile, overwrite_input=True))  # vals is a copy: sorted in place
    del vals
    if not p > vmin:
        raise MedcfxError(f"{name}: constant over the foreground (its {percentile:g}th percentile {p:g} equals its "
                          f"minimum): no contrast to normalise (an empty or missing modality?)")
    if lo < 0:
        notes.append(f"{name}: foreground holds negative values (z-score normalised?): shifted by its minimum {lo:.4g}")
        x -= np.float32(lo)
    x *= np.float32(1.0 / (p - lo))
    if clip:
        np.clip(x, 0.0, 1.0, out=x)
    if lo < 0 or not fg.all():
        x[~fg] = 0.0
    return x, notes


def _percentile_rule(x: np.ndarray, valid: np.ndarray | None, percentile: float) -> np.ndarray:
    vals = x[:, valid] if valid is not None else x
    if vals.size == 0:
        raise MedcfxError("every pixel is padding (PixelPaddingValue): nothing to scale")
    lo = min(0.0, float(vals.min()))
    hi = float(np.percentile(vals, percentile))
    if hi <= lo:
        hi = float(vals.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def scale_image(data: np.ndarray, meta: dict, rule: str = "percentile", percentile: float = 99.0,
                clip: bool = True) -> np.ndarray:
    """Raw 2D image values float [C, H, W] -> float32 [C, H, W] in [0, 1] by ``rule`` (module docstring).

    ``meta`` is the reader's (:class:`medcfx.data.io.Image2D`): ``integer``, ``bit_depth``, and for DICOM
    ``hu`` (CT in HU), ``voi_range`` (lo, hi), ``nominal_range`` (lo, hi) and ``padding`` (bool [H, W]);
    padding pixels come out 0. A note is appended to ``meta["notes"]`` when the nominal rule meets an image
    using < 1/16 of its range.
    Raises MedcfxError for an unknown rule.
    """
    if rule not in INTENSITY_RULES:
        raise MedcfxError(f"unknown intensity rule {rule!r}; known: {', '.join(INTENSITY_RULES)}")
    x = np.asarray(data, dtype=np.float32)
    pad = meta.get("padding")
    valid = None if pad is None else ~np.asarray(pad, dtype=bool)
    integer, bits = bool(meta.get("integer")), int(meta.get("bit_depth", 0) or 0)
    nominal = meta.get("nominal_range") or ((0.0, float(2**bits - 1)) if integer and bits > 0 else None)
    if meta.get("hu"):
        u = (x - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])
    elif meta.get("voi_range") is not None:
        lo, hi = (float(v) for v in meta["voi_range"])
        u = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    elif rule == "nominal" and nominal is not None and nominal[1] > nominal[0]:
        lo, hi = (float(v) for v in nominal)
        used = float((x if valid is None else x[:, valid]).max()) - lo
        if used < (hi - lo) / 16:
            meta.setdefault("notes", []).append(
                f"uses less than 1/16 of its nominal range {lo:g}..{hi:g} (max {used + lo:g}): it reaches the model dark")
        u = (x - lo) / (hi - lo)
    elif rule == "legacy" and integer and bits == 8:
        u = x / 255.0
    else:
        u = _percentile_rule(x, valid, percentile)
    if clip:
        u = np.clip(u, 0.0, 1.0)
    if valid is not None:
        u = np.where(valid[None], u, 0.0)
    return u.astype(np.float32, copy=False)


def convert_channels(u: np.ndarray, channels: int) -> np.ndarray:
    """[C, H, W] -> [channels, H, W]: grey -> RGB repeats, RGB -> grey by ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B.

    Raises MedcfxError for any other conversion.
    """
    if u.shape[0] == channels:
        return u
    if channels == 3 and u.shape[0] == 1:
        return np.repeat(u, 3, axis=0)
    if channels == 1 and u.shape[0] == 3:
        return (0.299 * u[0] + 0.587 * u[1] + 0.114 * u[2])[None].astype(np.float32)
    raise MedcfxError(f"cannot convert a {u.shape[0]}-channel image to {channels} channels")
