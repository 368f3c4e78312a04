"""Operating points of a map-producing method: thresholds calibrated on validation data, and what a
threshold turns a heatmap into (a lesion mask, its connected components and its size).

Decision rule, everywhere in medcfx: a pixel/voxel is flagged as lesion when ``score > threshold``
(strict), with scores compared as float32 (the precision of the metric histograms).

Thresholds (from a :class:`medcfx.metrics.PixelMetrics` streamed over the validation maps, so the
validation set never sits in memory):

- ``fpr_threshold``: the threshold at a target false-positive rate on healthy validation pixels (default
  5 %), the kind of operating point that brain anomaly benchmarks choose on validation data instead of on
  the test labels (issue 16 cites the UPD study, Lagogiannis et al., IEEE TMI 43(1), 2024; the exact
  protocols of the benchmarks vary, so medcfx's definition is stated here on its own). Definition: the
  smallest t such that at most floor(fpr * N) of the N healthy pixels have score > t. On the raw scores
  this t is a healthy score, the inverted-CDF quantile ``np.quantile(healthy, 1 - fpr,
  method="inverted_cdf")``. From the histogram it is the top of the bin
  holding that quantile: t_hist >= t_exact, within one bin (relative 2^-(bits - 9), about 1.2e-4 at the
  default 22 bits), and the false-positive rate it achieves on the validation pixels is still <= fpr.
- ``best_dice_threshold``: the threshold of the best Dice (Dice 1945: 2 TP / (2 TP + FP + FN)) over all
  thresholds on annotated validation data, i.e. the histogram's "ideal Dice" threshold: an oracle on the
  test set, a legitimate calibration on validation data.

:class:`Calibration` records both with the data they came from (plain YAML/JSON types, for the registry).

Lesion masks: ``lesion_mask`` thresholds a 2D or 3D heatmap, labels connected components (scipy.ndimage;
default full connectivity: 26 neighbours in 3D, 8 in 2D) and removes the components smaller than a minimum
size. ``lesion_volume_ml`` / ``lesion_size`` convert voxel counts to physical units from the spacing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from medcfx.metrics import PixelMetrics, threshold_flagging_from

__all__ = [
    "Calibration",
    "LesionMask",
    "best_dice_threshold",
    "calibrate",
    "fpr_threshold",
    "lesion_mask",
    "lesion_size",
    "lesion_volume_ml",
]

DEFAULT_FPR = 0.05
RULE = "score > threshold"


def _check_fpr(fpr) -> float:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}")
    return float(fpr)


def fpr_threshold(pm: PixelMetrics, fpr: float = DEFAULT_FPR) -> tuple[float, float]:
    """Threshold at a target false-positive rate on the healthy pixels streamed into ``pm``.

    ``pm`` holds the validation pixels: its ``neg`` counts are the healthy (non-lesion, inside the valid
    mask) pixels; lesion pixels are ignored. ``fpr`` in (0, 1), a fraction (0.05 = 5 %).

    Returns ``(threshold, achieved_fpr)``: the smallest bin-top threshold t such that
    #{healthy: score > t} <= floor(fpr * N), and that fraction #{healthy: score > t} / N on the validation
    pixels (<= fpr). See the module docstring for the relation to the exact quantile (one bin). Raises
    ValueError when ``pm`` has no healthy pixel.
    """
    fpr = _check_fpr(fpr)
    n = int(pm.neg.sum())
    if n == 0:
        raise ValueError("no healthy pixels to calibrate a false-positive rate on")
    allowed = math.floor(fpr * n)
    nz = np.nonzero(pm.neg)[0]  # occupied healthy bins, ascending
    above = n - np.cumsum(pm.neg[nz])  # healthy pixels in bins strictly above each occupied bin
    i = int(np.argmax(above <= allowed))  # first (lowest) bin whose upper part holds <= allowed pixels
    b = int(nz[i])
    # the empty bins between nz[i] and the next occupied bin hold no healthy pixel: flag from b + 1
    return threshold_flagging_from(b + 1, pm.bits), float(above[i]) / n


def best_dice_threshold(pm: PixelMetrics) -> tuple[float, float] | None:
    """The threshold of the best pooled Dice over the pixels streamed into ``pm`` (annotated validation data).

    Returns ``(threshold, dice)`` for the rule ``score > threshold`` (dice = 2 TP / (2 TP + FP + FN) pooled
    over all pixels at that threshold, scores quantised to ``pm``'s bins), or None when ``pm`` holds no
    lesion pixel (the Dice is then undefined).
    """
    tp, fp, n_pos = pm._curve()
    if n_pos == 0:
        return None
    d = 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(d))
    b = int(np.nonzero(pm.pos + pm.neg)[0][::-1][best])  # lowest flagged bin
    return threshold_flagging_from(b, pm.bits), float(d[best])


# -- the record stored with a model ------------------------------------------------------------------------


def _num(d: dict, name: str, lo: float | None = None, hi: float | None = None, optional: bool = False):
    v = d.get(name)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"calibration: {name} must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"calibration: {name} must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(d: dict, name: str, lo: int) -> int:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"calibration: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _str(d: dict, name: str) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v:
        raise ValueError(f"calibration: {name} must be a non-empty string, got {v!r}")
    return v


@dataclass(frozen=True)
class Calibration:
    """Thresholds of one method/map on one validation set, for the rule ``score > threshold``.

    - ``method``: the method / map name the thresholds belong to (e.g. "sanchez").
    - ``fpr``: the target false-positive rate on healthy pixels, a fraction in (0, 1);
      ``threshold_fpr`` the threshold (see ``fpr_threshold``), ``achieved_fpr`` its rate on the validation
      pixels (<= fpr).
    - ``threshold_best_dice`` / ``best_dice``: the best-Dice threshold and the Dice it gives on the
      validation data, both None when the validation set has no lesion pixel.
    - ``n_cases``, ``n_pixels`` (pixels inside the valid masks), ``n_healthy_pixels``.
    - ``data_fingerprint``: identifies the validation data (the registry's fingerprint string).
    - ``bits``: resolution of the histogram the thresholds come from (relative 2^-(bits - 9)).
    - ``rule``: always "score > threshold" (stored so that a reader of the registry entry knows).

    ``to_dict`` gives plain types (str, int, float, None); ``from_dict`` validates and names the field
    at fault. Construction validates too.
    """

    method: str
    fpr: float
    threshold_fpr: float
    achieved_fpr: float
    n_cases: int
    n_pixels: int
    n_healthy_pixels: int
    data_fingerprint: str
    threshold_best_dice: float | None = None
    best_dice: float | None = None
    bits: int = 22
    rule: str = RULE

    def __post_init__(self) -> None:
        self._validate(dataclasses.asdict(self))

    @staticmethod
    def _validate(d: dict) -> dict:
        out = {"method": _str(d, "method"), "fpr": _num(d, "fpr")}
        if not 0.0 < out["fpr"] < 1.0:
            raise ValueError(f"calibration: fpr must be in (0, 1), got {out['fpr']!r}")
        out["threshold_fpr"] = _num(d, "threshold_fpr")
        out["achieved_fpr"] = _num(d, "achieved_fpr", 0.0, out["fpr"])
        out["n_cases"] = _int(d, "n_cases", 1)
        out["n_pixels"] = _int(d, "n_pixels", 1)
        out["n_healthy_pixels"] = _int(d, "n_healthy_pixels", 1)
        if out["n_healthy_pixels"] > out["n_pixels"]:
            raise ValueError(f"calibration: n_healthy_pixels ({out['n_healthy_pixels']}) exceeds n_pixels "
                             f"({out['n_pixels']})")
        out["data_fingerprint"] = _str(d, "data_fingerprint")
        out["threshold_best_dice"] = _num(d, "threshold_best_dice", optional=True)
        out["best_dice"] = _num(d, "best_dice", 0.0, 1.0, optional=True)
        if (out["threshold_best_dice"] is None) != (out["best_dice"] is None):
            raise ValueError("calibration: threshold_best_dice and best_dice are given together or not at all")
        out["bits"] = _int(d, "bits", 8)
        if out["bits"] > 26:
            raise ValueError(f"calibration: bits must be in [8, 26], got {out['bits']}")
        if d.get("rule", RULE) != RULE:
            raise ValueError(f"calibration: rule must be {RULE!r}, got {d.get('rule')!r}")
        out["rule"] = RULE
        return out

    def to_dict(self) -> dict:
        return self._validate(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d) -> "Calibration":
        if not isinstance(d, dict):
            raise ValueError(f"calibration must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"calibration: unknown field(s) {', '.join(map(str, unknown))}")
        optional = {"threshold_best_dice", "best_dice", "bits", "rule"}
        missing = sorted(fields - optional - set(d))
        if missing:
            raise ValueError(f"calibration: missing field(s) {', '.join(missing)}")
        return cls(**cls._validate({"bits": 22, **d}))

    def thresholds(self) -> dict[str, float]:
        """Named thresholds for evaluation: ``fpr<percent>`` (e.g. "fpr5") and, when calibrated on
        annotated data, ``valDice`` (the best-Dice threshold of the validation set)."""
        out = {f"fpr{self.fpr * 100:g}": self.threshold_fpr}
        if self.threshold_best_dice is not None:
            out["valDice"] = self.threshold_best_dice
        return out


def calibrate(pm: PixelMetrics, *, method: str, data_fingerprint: str, n_cases: int,
              fpr: float = DEFAULT_FPR) -> Calibration:
    """A :class:`Calibration` from the validation pixels streamed into ``pm`` (scores of ``method``'s maps,
    lesion masks, valid masks): the threshold at ``fpr`` on the healthy pixels, and the best-Dice threshold
    when ``pm`` holds lesion pixels. Unannotated validation data should be healthy: every pixel streamed
    with an all-False lesion mask counts as healthy."""
    t, achieved = fpr_threshold(pm, fpr)
    best = best_dice_threshold(pm)
    return Calibration(
        method=method, fpr=float(fpr), threshold_fpr=t, achieved_fpr=achieved, n_cases=int(n_cases),
        n_pixels=int(pm.pos.sum() + pm.neg.sum()), n_healthy_pixels=int(pm.neg.sum()),
        data_fingerprint=data_fingerprint, threshold_best_dice=None if best is None else best[0],
        best_dice=None if best is None else best[1], bits=pm.bits,
    )


# -- from a heatmap to a lesion mask ---------------------------------------------------------------------

_RANK = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


class LesionMask(NamedTuple):
    """``mask``: bool array of the heatmap's shape; ``n_components``: number of connected components kept;
    ``sizes``: int64 [n_components], their sizes in voxels (pixels in 2D), largest first."""

    mask: np.ndarray
    n_components: int
    sizes: np.ndarray


def lesion_mask(heatmap, threshold: float, min_size_voxels: int = 1, connectivity: int | None = None,
                valid=None) -> LesionMask:
    """The lesion mask of a heatmap: ``heatmap > threshold`` (as float32), inside ``valid`` (optional bool
    mask of the same shape, e.g. the brain), connected components smaller than ``min_size_voxels`` removed.

    ``heatmap``: float array, 2D [H, W] or 3D [D, H, W] (any axis order; components are found on the array
    grid). ``connectivity``: neighbours that connect two voxels: 6 (faces), 18 (faces, edges) or 26 (faces,
    edges, corners) in 3D; 4 or 8 in 2D; default None = full (26 in 3D, 8 in 2D). Note that on an
    anisotropic grid the neighbourhood is in voxels, not millimetres.
    """
    h = np.asarray(heatmap)
    if h.ndim not in _RANK:
        raise ValueError(f"heatmap must be 2D or 3D, got shape {h.shape}")
    h = h.astype(np.float32, copy=False)
    if not np.isfinite(h).all():
        raise ValueError("heatmap contains NaN or infinity")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
            or math.isnan(float(threshold)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if isinstance(min_size_voxels, bool) or not isinstance(min_size_voxels, (int, np.integer)) \
            or min_size_voxels < 1:
        raise ValueError(f"min_size_voxels must be an integer >= 1, got {min_size_voxels!r}")
    conn = max(_RANK[h.ndim]) if connectivity is None else connectivity
    if conn not in _RANK[h.ndim]:
        raise ValueError(f"connectivity for {h.ndim}D must be one of {sorted(_RANK[h.ndim])}, got {connectivity!r}")
    from scipy import ndimage

    raw = h > np.float32(threshold)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != h.shape:
            raise ValueError(f"valid mask {valid.shape} and heatmap {h.shape} differ in shape")
        raw &= valid
    labels, n = ndimage.label(raw, structure=ndimage.generate_binary_structure(h.ndim, _RANK[h.ndim][conn]))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts >= min_size_voxels
    keep[0] = False
    mask = keep[labels]
    sizes = np.sort(counts[keep])[::-1].astype(np.int64)
    return LesionMask(mask, int(keep.sum()), sizes)


def _spacing(zooms, ndim: int) -> tuple[float, ...]:
    z = tuple(float(v) for v in zooms)
    if len(z) != ndim or not all(math.isfinite(v) and v > 0 for v in z):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm), got {tuple(zooms)}")
    return z


def lesion_volume_ml(mask, zooms_mm: Sequence[float]) -> float:
    """Volume of a 3D boolean mask in millilitres: voxels x (product of the voxel spacing in mm) / 1000
    (1 ml = 1000 mm^3). ``zooms_mm``: the spacing along the mask's three axes, in the mask's axis order."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"lesion_volume_ml needs a 3D mask, got shape {m.shape}")
    return int(m.sum()) * math.prod(_spacing(zooms_mm, 3)) / 1000.0


def lesion_size(mask, spacing_mm: Sequence[float] | None = None) -> tuple[float, str]:
    """Size of a boolean mask with its unit: 3D with spacing -> (millilitres, "ml"); 2D with pixel spacing
    -> (area in mm^2, "mm^2"); without spacing -> (the count, "voxels" in 3D or "pixels" in 2D)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {m.shape}")
    if spacing_mm is None:
        return float(m.sum()), "voxels" if m.ndim == 3 else "pixels"
    if m.ndim == 3:
        return lesion_volume_ml(m, spacing_mm), "ml"
    return int(m.sum()) * math.prod(_spacing(spacing_mm, 2)), "mm^2"
