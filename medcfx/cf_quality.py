"""Counterfactual quality rules shared by the methods that explain with counterfactuals (issue 16).

- **inversion self-check**: a method reproduces the input without guidance (its own unguided
  reconstruction); error = mean |x - reconstruction| in [0, 1] intensity units; above a limit the case is
  flagged, because the difference map then shows what the sampler alone changes, not only the edit.
- **flip**: a class probability crosses 0.5 in the requested direction: an addition from < 0.5 to >= 0.5, a
  removal from >= 0.5 to < 0.5; a case that started on the requested side is not counted (None).
- **off-target image change**: mean of the difference map outside the lesion region (a mask, or the union
  of boxes), when one is known.

sanchez's self-check lives in its plugin (it reports per slice, inside the explain loop); mediffusion and
diffae build their per-case records from these functions and aggregate them with :func:`summarise`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["box_region", "flipped", "inversion_check", "mean_or_none", "outside_change", "summarise"]


def inversion_check(x: np.ndarray, rec: np.ndarray, limit: float, scale: float = 1.0) -> dict:
    """{"error", "limit", "flagged"}: error = scale * mean |rec - x| (``scale`` 0.5 for images in model
    units [-1, 1], 1 for [0, 1]); flagged when error > limit."""
    err = float(np.abs(np.asarray(rec, np.float64) - np.asarray(x, np.float64)).mean() * scale)
    return {"error": err, "limit": float(limit), "flagged": bool(err > limit)}


def flipped(before: float, after: float, add: bool) -> bool | None:
    """Whether the probability crossed 0.5 in the requested direction (``add``: towards >= 0.5); None when
    it started on that side."""
    if add:
        return None if before >= 0.5 else bool(after >= 0.5)
    return None if before < 0.5 else bool(after < 0.5)


def box_region(boxes: Iterable, shape: tuple[int, int]) -> np.ndarray | None:
    """The union of boxes (x0, y0, x1, y1) in pixel coordinates (x along the width, exclusive ends; a pixel
    belongs when its centre lies inside) as a bool [H, W] mask; None when no finite box is given."""
    region = np.zeros(shape, bool)
    found = False
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    for b in boxes:
        b = np.asarray(b, np.float64)
        if b.shape != (4,) or not np.isfinite(b).all():
            continue
        found = True
        region |= (xx >= b[0]) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3])
    return region if found else None


def outside_change(diff: np.ndarray, region: np.ndarray | None) -> float | None:
    """Mean of the [H, W] difference map outside ``region``; None without a region, or when the region is
    empty or covers the whole image."""
    if region is None:
        return None
    region = np.asarray(region, bool)
    if not region.any() or region.all():
        return None
    return float(np.asarray(diff, np.float64)[~region].mean())


def mean_or_none(values) -> float | None:
    """The mean of the values that are not None; None when there is none."""
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarise(cases: list[dict]) -> dict:
    """The aggregate of per-case records {"inversion": {error, limit, flagged} | None, "flip": {name:
    {"flipped": bool | None, ...}}, "off_target_probability_change": float | None,
    "off_target_image_change": float | None}: means over the cases that have each value, the flip rate over
    the counted (case, target) pairs, and the limit rule (1.5 x the median error) for a model of your own."""
    inv = [c["inversion"] for c in cases if c.get("inversion")]
    errors = [i["error"] for i in inv]
    counted = [f["flipped"] for c in cases for f in c["flip"].values() if f["flipped"] is not None]
    off_img = [c["off_target_image_change"] for c in cases if c.get("off_target_image_change") is not None]
    return {
        "cases": len(cases),
        "inversion_checked": len(inv),
        "inversion_error_mean": mean_or_none(errors),
        "inversion_error_median": float(np.median(errors)) if errors else None,
        "inversion_limit": inv[0]["limit"] if inv else None,
        "inversion_limit_suggested": 1.5 * float(np.median(errors)) if errors else None,
        "flagged": sum(bool(i["flagged"]) for i in inv),
        "flagged_share": float(np.mean([bool(i["flagged"]) for i in inv])) if inv else None,
        "flip_counted": len(counted),
        "flip_rate": float(np.mean(counted)) if counted else None,
        "off_target_probability_change_mean": mean_or_none(c.get("off_target_probability_change") for c in cases),
        "off_target_image_change_mean": mean_or_none(off_img),
        "off_target_image_cases": len(off_img),
    }
