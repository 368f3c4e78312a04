"""Counterfactual quality, per case and over a test set: the inversion self-check, the flip of the target
findings and the off-target change (docs/methods/mediffusion.md, "Counterfactual quality").

Per case (one input, one counterfactual guided towards ``targets``):

- **inversion self-check**: the same forward noising to t and the same reverse chain as the
  counterfactual, with guidance scale 0 and the same generator seed, decoded; error = mean |input -
  reconstruction| in [0, 1] intensity units. Above ``limit`` the case is flagged: what the difference map
  shows is then not only the guidance's doing (the unguided chain alone moves the image that far).
- **flip** per target: the classifier's probability of the target finding before and after ("after"
  re-encodes the decoded counterfactual). Flipped = it crosses 0.5 in the requested direction: an addition
  from < 0.5 to >= 0.5, a removal from >= 0.5 to < 0.5. A target whose finding is already on the requested
  side before is not counted (``flipped`` None).
- **off-target probability change**: mean |after - before| over the findings that are not targets (None
  when every finding is a target).
- **off-target image change**: mean |counterfactual - input| (intensity in [0, 1], channel mean) outside the
  lesion region (the union of the target findings' boxes, else the lesion mask), when one is known.
"""

from __future__ import annotations

import numpy as np

# mean |input - unguided reconstruction| above which a case is flagged, intensity units [0, 1]: about 1.5x
# the median over 32 demo test radiographs at the default removal setting (t = 300, every step: median
# 0.042, max 0.049; t = 200: median 0.032) with mediffusion-demo; docs/methods/mediffusion.md has the numbers
INVERSION_LIMIT = 0.06


def inversion_check(u_in: np.ndarray, u_rec: np.ndarray, limit: float) -> dict:
    """{"error", "limit", "flagged"} for an input and its unguided reconstruction, both in [0, 1]."""
    err = float(np.abs(np.asarray(u_rec, np.float64) - np.asarray(u_in, np.float64)).mean())
    return {"error": err, "limit": float(limit), "flagged": bool(err > limit)}


def flipped(before: float, after: float, add: bool) -> bool | None:
    """Whether the probability crossed 0.5 in the requested direction; None when it started on that side."""
    if add:
        return None if before >= 0.5 else bool(after >= 0.5)
    return None if before < 0.5 else bool(after < 0.5)


def box_region(boxes, shape: tuple[int, int]) -> np.ndarray | None:
    """The union of boxes (x0, y0, x1, y1) in pixel coordinates (x along the width, exclusive ends; a pixel
    belongs when its centre lies inside) as a bool [H, W] mask; None when no box is given (NaN rows skipped)."""
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


def case_quality(findings: list[str], targets, before, after, inversion: dict | None = None,
                 diff: np.ndarray | None = None, region: np.ndarray | None = None,
                 region_source: str | None = None) -> dict:
    """The quality record of one counterfactual (``targets``: counterfactual.Target)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    flips = {}
    for tg in targets:
        b, a = float(before[tg.index]), float(after[tg.index])
        flips[tg.name] = {"finding": tg.finding, "direction": "add" if tg.add else "remove", "before": b, "after": a,
                          "flipped": flipped(b, a, tg.add)}
    hit = {tg.index for tg in targets}
    others = [k for k in range(len(findings)) if k not in hit]
    off_p = float(np.mean(np.abs(after[others] - before[others]))) if others else None
    off_img = outside_change(diff, region) if diff is not None else None
    return {
        "inversion": inversion,
        "flip": flips,
        "off_target_findings": [findings[k] for k in others],
        "off_target_probability_change": off_p,
        "off_target_image_change": off_img,
        "off_target_region": region_source if off_img is not None else None,
    }


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarise(cases: list[dict]) -> dict:
    """The aggregate over the per-case records of :func:`case_quality` (each mean over the cases that have
    the value; the flip rate over every (case, target) pair that started on the other side of 0.5)."""
    inv = [c["inversion"] for c in cases if c.get("inversion")]
    flips = [f["flipped"] for c in cases for f in c["flip"].values()]
    counted = [f for f in flips if f is not None]
    off_img = [c["off_target_image_change"] for c in cases if c["off_target_image_change"] is not None]
    errors = [i["error"] for i in inv]
    return {
        "cases": len(cases),
        "inversion_checked": len(inv),
        "inversion_error_mean": _mean(errors),
        "inversion_error_median": float(np.median(errors)) if errors else None,
        # D(E(x)) alone, for scale: the part of the error that is the autoencoder's
        "autoencoder_error_mean": _mean(i.get("autoencoder_error") for i in inv),
        "inversion_limit": inv[0]["limit"] if inv else None,
        # the rule the default limit follows (1.5x the median over test images), for a model of your own
        "inversion_limit_suggested": 1.5 * float(np.median(errors)) if errors else None,
        "flagged": sum(bool(i["flagged"]) for i in inv),
        "flagged_share": float(np.mean([bool(i["flagged"]) for i in inv])) if inv else None,
        "flip_counted": len(counted),
        "flip_rate": float(np.mean(counted)) if counted else None,
        "off_target_probability_change_mean": _mean(c["off_target_probability_change"] for c in cases),
        "off_target_image_change_mean": _mean(off_img),
        "off_target_image_cases": len(off_img),
    }


def case_line(q: dict) -> str:
    """A short text of one case's quality for the log and the panel."""
    parts = []
    if q.get("inversion"):
        i = q["inversion"]
        parts.append(f"self-check {i['error']:.3f} (limit {i['limit']:g})" + (" FLAGGED" if i["flagged"] else ""))
    for name, f in q["flip"].items():
        parts.append(f"{name} " + {True: "flipped", False: "not flipped", None: "already there"}[f["flipped"]])
    if q["off_target_probability_change"] is not None:
        parts.append(f"off-target |dp| {q['off_target_probability_change']:.2f}")
    if q["off_target_image_change"] is not None:
        parts.append(f"outside-box |dx| {q['off_target_image_change']:.3f}")
    return ", ".join(parts)


def warning_text(path, inversion: dict) -> str:
    return (f"warning: {path}: the unguided reconstruction differs from the input by {inversion['error']:.3f} "
            f"(mean |x - x_rec|, limit {inversion['limit']:g}): the difference map is not trustworthy for this "
            f"case (it shows what noising and denoising alone change, not only the guidance)")
