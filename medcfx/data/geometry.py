"""Geometry: where a voxel is. World orientation, grids, and the reversible map to model-sized slices.

Orientation (NIfTI, DICOM series)
    Every volume is sliced in one canonical orientation, RAS+ (nibabel's closest canonical: voxel axis 0
    increases towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior), decided from
    its affine with :func:`nibabel.orientations.io_orientation`. Slicing axis 2 of
    the canonical array is therefore always axial, whatever the storage order (LPS, LAS, PIR, ...).
    :class:`SliceGeometry` keeps the storage->canonical transform (``ornt``) so that every result (heatmap,
    counterfactual, mask) goes back onto the input's own voxel order, and is written with its own affine.
    :func:`canonical_ornt`, :func:`to_canonical`, :func:`from_canonical` are the three steps, each a thin
    use of :mod:`nibabel.orientations` (``io_orientation``, ``apply_orientation``, ``ornt_transform``).

Grids
    :func:`check_same_grid`: the files of one case (modalities, segmentation) must share shape AND affine
    (within ``GRID_ATOL_MM`` mm on the voxel->world map over the field of view); equal shapes with different
    affines is the case to catch (a segmentation saved in another orientation, a modality not co-registered).

Model slices
    :class:`SliceGeometry`: canonical in-plane shape padded to a square, resized by :func:`resize_matrix`
    (exact area averaging when shrinking, linear interpolation when enlarging), and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from medcfx.errors import MedcfxError

# how far (mm) two grids may place the same voxel apart and still count as one grid
GRID_ATOL_MM = 1e-2
IDENTITY_ORNT = ((0, 1), (1, 1), (2, 1))
MIN_SIDE = 16  # smallest in-plane side (pixels) of an input given to a model


# ---------------------------------------------------------------------------------------------------------
# orientation


def canonical_ornt(affine: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Storage -> RAS+ transform of a voxel->world ``affine`` (4x4): nibabel's ``io_orientation``.

    Row i is (canonical axis of storage axis i, +1 or -1 for a flip); identity for RAS-stored data. An
    oblique affine maps each voxel axis to its closest world axis (as ``nib.as_closest_canonical``).
    Raises MedcfxError for a singular affine (no orientation can be read from it).
    """
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedcfxError(f"affine {affine.tolist()} is singular or not finite: the orientation cannot be read")
    ornt = io_orientation(affine)
    if np.isnan(ornt).any():
        raise MedcfxError(f"affine {affine.tolist()}: a voxel axis has no world direction")
    return tuple((int(a), int(f)) for a, f in ornt)


def volume_orientation(volume, where: str) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """(storage -> RAS+ transform, notes) of a :class:`~medcfx.data.io.Volume`, checking what its header says.

    - NIfTI with qform_code = sform_code = 0 (no orientation recorded; nibabel's affine is a fallback):
      the voxel axes are used as stored (identity, axis 2 taken as axial), with a note saying so.
    - qform and sform both set but placing the voxels differently (more than ``GRID_ATOL_MM``): a note (the
      sform is used, as nibabel does; a tool that reads the qform places input and outputs elsewhere).
    - an oblique affine (obliquity above 0.5 degree, :func:`nibabel.affines.obliquity`): a note (sliced along
      the closest voxel axes, never resampled).

    Raises MedcfxError naming ``where`` for a singular affine.
    """
    from nibabel.affines import obliquity

    notes: list[str] = []
    hdr = volume.header
    if hdr is not None and hasattr(hdr, "get_qform"):
        qc, sc = int(hdr["qform_code"]), int(hdr["sform_code"])
        if qc == 0 and sc == 0:
            notes.append("no orientation in the header (qform and sform codes are 0): the voxel axes are used as "
                         "stored, axis 2 taken as axial; check that this is right")
            return IDENTITY_ORNT, notes
        if qc > 0 and sc > 0:
            diff = grid_mismatch(volume.shape, hdr.get_qform(), volume.shape, hdr.get_sform())
            if diff is not None:
                notes.append(f"qform and sform disagree ({diff.replace('same shape ' + str(tuple(volume.shape)) + ' but ', '')}): "
                             f"the sform is used, as nibabel does; tools that read the qform place it elsewhere")
    try:
        ornt = canonical_ornt(volume.affine)
    except MedcfxError as exc:
        raise MedcfxError(f"{where}: {exc}") from None
    angle = float(np.degrees(np.max(obliquity(np.asarray(volume.affine, dtype=np.float64)))))
    if angle > 0.5:
        notes.append(f"oblique by up to {angle:.1f} degrees: sliced along the closest voxel axes ({axcodes(volume.affine)}), "
                     f"not resampled")
    return ornt, notes


def to_canonical(data: np.ndarray, ornt: Sequence[Sequence[int]]) -> np.ndarray:
    """Array in storage order [X, Y, Z] (trailing dims kept) -> canonical RAS+ order (a view: flips/transposes)."""
    from nibabel.orientations import apply_orientation

    ornt = np.asarray(ornt, dtype=float)
    if np.array_equal(ornt, np.asarray(IDENTITY_ORNT, dtype=float)):
        return data
    return apply_orientation(data, ornt)


def from_canonical(data: np.ndarray, ornt: Sequence[Sequence[int]]) -> np.ndarray:
    """The inverse of :func:`to_canonical`: canonical [*canon_shape, ...] -> storage order."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    ornt = np.asarray(ornt, dtype=float)
    if np.array_equal(ornt, np.asarray(IDENTITY_ORNT, dtype=float)):
        return data
    return apply_orientation(data, ornt_transform(axcodes2ornt("RAS"), ornt))


def axcodes(affine: np.ndarray) -> str:
    """``"LPS"``, ``"RAS"``, ...: nibabel's ``aff2axcodes`` of a voxel->world affine."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def grid_mismatch(shape_a, affine_a, shape_b, affine_b, atol_mm: float = GRID_ATOL_MM) -> str | None:
    """None when two grids are one (same shape, same voxel->world map), else a short description.

    The affines are compared where it matters: the world position of the 8 corner voxels of the field of
    view may differ by at most ``atol_mm`` (so a rounding in the 7th digit of a direction cosine passes, a
    flip, permutation, shift or spacing change does not).
    """
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(shape_a)} vs {tuple(shape_b)}"
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape_a[0] - 1) for j in (0, shape_a[1] - 1)
                        for k in (0, shape_a[2] - 1)]).T
    dist = float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))
    if dist <= atol_mm:
        return None
    return (f"same shape {tuple(shape_a)} but different affines ({axcodes(a)} vs {axcodes(b)}; voxels up to "
            f"{dist:.3g} mm apart)")


def check_same_grid(what: str, items: Sequence[tuple[str, Any]], atol_mm: float = GRID_ATOL_MM) -> None:
    """Raise MedcfxError unless every (name, volume) of ``items`` shares the first one's grid.

    ``volume`` has ``shape`` and ``affine`` (:class:`medcfx.data.io.Volume`). The message names ``what`` (the
    case), both files and the difference; medcfx never resamples silently.
    """
    (name0, v0), rest = items[0], items[1:]
    for name, v in rest:
        diff = grid_mismatch(v0.shape, v0.affine, v.shape, v.affine, atol_mm)
        if diff is not None:
            raise MedcfxError(f"{what}: {name} ({v.path.name}) is not on the grid of {name0} ({v0.path.name}): {diff}; "
                              f"resample it onto {v0.path.name} first (e.g. with nibabel.processing.resample_from_to)")

def check_min_side(plane: tuple[int, int], where: str) -> None:
    """MedcfxError unless both in-plane sides (pixels) are at least ``MIN_SIDE``."""
    if min(plane) < MIN_SIDE:
        raise MedcfxError(f"{where}: the image is {plane[0]} x {plane[1]} pixels; medcfx needs at least "
                          f"{MIN_SIDE} x {MIN_SIDE} (a smaller image carries less detail than the model's coarsest "
                          f"feature map and would still get confident-looking numbers)")


# ---------------------------------------------------------------------------------------------------------
# resizing


@lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``[n_out, n_in]`` float32 matrix of a 1D resize (rows are non-negative and sum to 1).

    Shrinking (n_out <= n_in): exact area averaging. Output pixel i covers the input interval
    [i r, (i + 1) r) with r = n_in / n_out; its weight on input pixel j is |[j, j + 1) ∩ [i r, (i + 1) r)| / r.
    Enlarging: linear interpolation at source coordinate s = (i + 0.5) / (n_out / n_in) - 0.5, clamped at the
    borders (PyTorch's ``align_corners=False`` convention).

    Why a matrix and not scipy.ndimage (measured, numpy 2.4 / scipy 1.17, one BLAS thread): ndimage has no
    area-averaging resize (``zoom(order=1)`` from 240 to 64 px samples instead of averaging: results differ by
    up to 2.7 on unit-variance noise, which keeps 2.7x the area average's standard deviation, i.e. aliasing).
    Enlarging, ``zoom(order=1, grid_mode=True, mode="nearest")`` gives the same numbers (max difference
    4.8e-7, float32 round-off; tested) but is slower than the two GEMMs of :meth:`SliceGeometry.to_original`:
    155 slices 64 -> 240 px 1010 ms vs 19 ms, 128 -> 240 px 1006 vs 47 ms, one 64 -> 512 px image 28 vs 0.2 ms.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError("sizes must be >= 1")
    if n_out <= n_in:
        r = n_in / n_out
        lo = np.arange(n_out)[:, None] * r
        hi = lo + r
        j = np.arange(n_in)[None, :]
        w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / r
    else:
        s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        s = np.clip(s, 0, n_in - 1)
        j0 = np.floor(s).astype(int)
        j1 = np.minimum(j0 + 1, n_in - 1)
        f = s - j0
        w = np.zeros((n_out, n_in))
        rows = np.arange(n_out)
        np.add.at(w, (rows, j0), 1 - f)
        np.add.at(w, (rows, j1), f)
    w = w / w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def _max3x3(x: np.ndarray) -> np.ndarray:
    """3x3 maximum filter over the last two axes (borders padded with -inf).

    = ``scipy.ndimage.maximum_filter(x, size=(1, ..., 3, 3), mode="constant", cval=-inf)`` (tested), kept in
    numpy because it is 4-9x faster (measured, float32: 155 x 64^2 1.2 vs 10.9 ms, 155 x 128^2 12 vs 53 ms;
    it runs twice per lesion mask, where scipy would make :meth:`SliceGeometry.mask_to_model` 25-60% slower).
    """
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    h, w = x.shape[-2:]
    out = p[..., 0:h, 0:w].copy()
    for dy in range(3):
        for dx in range(3):
            np.maximum(out, p[..., dy : dy + h, dx : dx + w], out=out)
    return out


def mask_from_fraction(frac: np.ndarray) -> np.ndarray:
    """Binary mask from an area-fraction map F (last two axes), keeping small lesions.

    M = (F >= 0.5) OR (F > 0 AND F is the maximum of its 3x3 neighbourhood AND no pixel of that
    neighbourhood has F >= 0.5). Large lesions keep their area-correct outline (the >= 0.5 rule); a lesion
    too small to cover half of any output pixel survives as its peak pixel(s) instead of vanishing.
    """
    frac = np.asarray(frac, dtype=np.float32)
    big = frac >= 0.5
    peak = (frac > 0) & (frac >= _max3x3(frac)) & ~(_max3x3(big.astype(np.float32)) > 0)
    return (big | peak).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# model slices


@dataclass(frozen=True)
class SliceGeometry:
    """Reversible map between a case's original grid and its model slices.

    ``shape``: the original spatial shape in STORAGE order, (X, Y, Z) for a volume or (H, W) for an image;
    ``ornt``: the storage -> canonical RAS+ transform (:func:`canonical_ornt` of the affine; identity for 2D
    images); ``axis``: the slicing axis of the CANONICAL array (2 = axial) or None (images); ``size``: model
    side S; ``kept``: the canonical slice indices that became model slices, in order (images: ``(0,)``).

    Arrays go in and come out in storage order: :meth:`to_model` reorients to canonical first,
    :meth:`to_original` reorients back last. The canonical in-plane shape (a, b) (the canonical dims other
    than ``axis``, in order; for an axial slice a runs towards Right, b towards Anterior) is
    padded to the square side max(a, b), centred (the extra pixel, if odd, goes after), then resized to
    S x S by :func:`resize_matrix`. :meth:`to_original` applies the inverse resize (S -> side) and crops the
    padding.
    """

    shape: tuple[int, ...]
    axis: int | None
    size: int
    kept: tuple[int, ...]
    ornt: tuple[tuple[int, int], ...] = IDENTITY_ORNT

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The spatial shape in canonical (RAS+) order (= ``shape`` for 2D images and RAS-stored volumes)."""
        if self.is_2d:
            return tuple(self.shape)
        out = [0, 0, 0]
        for i, (ax, _) in enumerate(self.ornt):
            out[int(ax)] = int(self.shape[i])
        return tuple(out)

    @property
    def is_2d(self) -> bool:
        return self.axis is None

    @property
    def plane(self) -> tuple[int, int]:
        if self.is_2d:
            return (int(self.shape[0]), int(self.shape[1]))
        a, b = [int(s) for i, s in enumerate(self.canonical_shape) if i != self.axis]
        return (a, b)

    @property
    def side(self) -> int:
        return max(self.plane)

    @property
    def pad(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((before, after) along a, (before, after) along b)."""
        out = []
        for n in self.plane:
            extra = self.side - n
            out.append((extra // 2, extra - extra // 2))
        return tuple(out)  # type: ignore[return-value]

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.size / self.side

    def _down(self) -> tuple[np.ndarray, np.ndarray]:
        r = resize_matrix(self.side, self.size)
        (pa, _), (pb, _) = self.pad
        a, b = self.plane
        return r[:, pa : pa + a], r[:, pb : pb + b]

    def _up(self) -> tuple[np.ndarray, np.ndarray]:
        u = resize_matrix(self.size, self.side)
        (pa, _), (pb, _) = self.pad
        a, b = self.plane
        return u[pa : pa + a], u[pb : pb + b]

    def _split_channels(self, array: np.ndarray) -> tuple[np.ndarray, bool]:
        """[C, *shape] or [*shape] -> ([C, *shape], had_channels)."""
        array = np.asarray(array)
        nd = len(self.shape)
        if array.ndim == nd:
            array, chan = array[None], False
        elif array.ndim == nd + 1:
            chan = True
        else:
            raise ValueError(f"expected an array of shape [C, *{self.shape}] or {self.shape}, got {array.shape}")
        if tuple(array.shape[1:]) != tuple(self.shape):
            raise ValueError(f"array shape {array.shape[1:]} does not match the geometry {self.shape}")
        return array, chan

    def _resample(self, planes: np.ndarray) -> np.ndarray:
        """[n, a, b] (any memory order) -> float32 [n, S, S] = Ma @ plane @ Mb^T for each plane.

        The in-plane axis with the smaller stride is contracted first as one large GEMM on a contiguous
        view (NIfTI data is usually Fortran-ordered: x fastest), so no strided copy of the volume is made.
        """
        ma, mb = self._down()
        if planes.strides[1] < planes.strides[2]:
            q = np.ascontiguousarray(planes.transpose(0, 2, 1), dtype=np.float32)  # [n, b, a]
            t = np.matmul(q, ma.T)  # [n, b, S]
            return np.matmul(mb, t).transpose(0, 2, 1)  # [n, S(a), S(b)]
        q = np.ascontiguousarray(planes, dtype=np.float32)  # [n, a, b]
        t = np.matmul(q, mb.T)  # [n, a, S]
        return np.matmul(ma, t)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """[C, *shape] -> float32 [Z', C, S, S] (or [*shape] -> [Z', S, S]): kept slices, padded with 0, resized."""
        array, chan = self._split_channels(array)
        if self.is_2d:
            out = self._resample(array)[None]  # channels act as planes: [1, C, S, S]
            return out if chan else out[:, 0]
        kept = np.asarray(self.kept, dtype=np.intp)
        out = np.empty((len(kept), array.shape[0], self.size, self.size), dtype=np.float32)
        for c in range(array.shape[0]):
            planes = np.moveaxis(to_canonical(array[c], self.ornt), self.axis, 0)  # view [Z, a, b]
            if len(kept) != planes.shape[0] or np.any(kept != np.arange(planes.shape[0])):
                # select before resampling; for a Fortran-ordered volume, index the contiguous transposed view
                if planes.strides[1] < planes.strides[2]:
                    planes = np.ascontiguousarray(planes.transpose(0, 2, 1))[kept].transpose(0, 2, 1)
                else:
                    planes = planes[kept]
            out[:, c] = self._resample(planes)
        return out if chan else out[:, 0]

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """[*shape] lesion mask (any value > 0 is lesion) -> uint8 [Z', S, S] by :func:`mask_from_fraction`."""
        frac = self.to_model((np.asarray(mask) > 0).astype(np.float32))
        return mask_from_fraction(frac)

    def to_original(self, slices: np.ndarray, fill: float = 0.0, index: Sequence[int] | None = None) -> np.ndarray:
        """Model slices back on the original grid: [Z', C, S, S] -> [C, *shape], [Z', S, S] -> [*shape].

        ``index``: the original slice indices of the given slices (default: ``kept``, i.e. one slice per kept
        slice); every other slice is ``fill``. Float input: linear resize back (S -> side), crop of the
        padding. Bool/integer input (masks): the same on the 0/1 indicator, then >= 0.5, in the input dtype.
        """
        slices = np.asarray(slices)
        index = tuple(self.kept if index is None else (int(i) for i in index))
        if slices.ndim == 3:
            slices4, chan = slices[:, None], False
        elif slices.ndim == 4:
            slices4, chan = slices, True
        else:
            raise ValueError(f"expected slices [Z', C, S, S] or [Z', S, S], got {slices.shape}")
        if slices4.shape[0] != len(index) or slices4.shape[-2:] != (self.size, self.size):
            raise ValueError(f"expected {len(index)} slices of {self.size}x{self.size}, got {slices.shape}")
        discrete = slices.dtype == bool or slices.dtype.kind in "iu"
        ua, ub = self._up()
        vals = slices4.astype(np.float32) if not discrete else (slices4 > 0).astype(np.float32)
        planes = np.matmul(np.matmul(ua, vals), ub.T)  # [Z', C, a, b]
        if discrete:
            planes = (planes >= 0.5).astype(slices.dtype)
            fill_value: Any = slices.dtype.type(fill)
            dtype = slices.dtype
        else:
            fill_value, dtype = fill, np.float32
        C = slices4.shape[1]
        if self.is_2d:
            out = planes[0].astype(dtype, copy=False)
            return out if chan else out[0]
        out = np.full((C,) + self.canonical_shape, fill_value, dtype=dtype)
        view = np.moveaxis(out, 1 + self.axis, 0)  # [Z, C, a, b]
        view[list(index)] = planes
        out = np.ascontiguousarray(np.stack([from_canonical(o, self.ornt) for o in out]))  # storage order
        return out if chan else out[0]

    def box_to_model(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) original pixel coordinates (x along the width b, y along the height a) -> model."""
        (pa, _), (pb, _) = self.pad
        s = self.scale
        x0, y0, x1, y1 = box
        return ((x0 + pb) * s, (y0 + pa) * s, (x1 + pb) * s, (y1 + pa) * s)

    def box_to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        (pa, _), (pb, _) = self.pad
        s = self.scale
        x0, y0, x1, y1 = box
        return (x0 / s - pb, y0 / s - pa, x1 / s - pb, y1 / s - pa)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "axis": self.axis, "size": self.size, "kept": list(self.kept),
                "ornt": [list(o) for o in self.ornt]}

    @classmethod
    def from_dict(cls, d: dict) -> "SliceGeometry":
        ornt = tuple((int(a), int(f)) for a, f in d.get("ornt", IDENTITY_ORNT))
        return cls(tuple(int(s) for s in d["shape"]), d["axis"], int(d["size"]), tuple(int(k) for k in d["kept"]), ornt)

