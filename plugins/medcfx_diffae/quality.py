"""Counterfactual quality of the diffae methods, per case and over a test set (docs/methods/diffae.md,
"Counterfactual quality").

- **inversion self-check**: the reconstruction that ``explain`` / ``grade`` / ``evaluate`` already make
  (x_T by DDIM inversion with the image's own z_sem, decoded with the same z_sem) against the input:
  error = mean |x - reconstruction| in [0, 1] intensity units (half the MAE in model units [-1, 1]). Above
  the limit the case is flagged: the difference maps then carry an inversion error, not only the edit.
- **flip** of the binary counterfactual (the reflection across the grader's hyperplane): the class
  probability P(positive) of the input's code before and of the re-encoded counterfactual after. The
  requested direction is the reflection's: towards negative when the input's distance is > 0, else towards
  positive. Flipped = the probability crosses 0.5 that way (positive side: >= 0.5); None when it already
  started on the requested side (possible for an SVM, whose Platt probability is 0.5 at a distance
  -B/A, not at 0).
- **off-target change**: the grader has one class, so there is no other class whose probability could
  change (None, said so); the image change outside the lesion (mean |counterfactual - input| in [0, 1]
  outside the mask or the label column's box) when the data carry one (``evaluate``).
"""

from __future__ import annotations

import numpy as np

from medcfx import cf_quality as core

from medcfx_diffae.configs import INVERSION_LIMIT  # noqa: F401  (the default limit, measured: see configs.py)

ONE_CLASS = "the grader has one class: no other class or finding whose probability could change"


def inversion_check(x: np.ndarray, rec: np.ndarray, limit: float) -> dict:
    """{"error", "limit", "flagged"} for an image and its reconstruction, both in model units [-1, 1]
    (:func:`medcfx.cf_quality.inversion_check` with scale 1/2, so the error is in [0, 1] units)."""
    return core.inversion_check(x, rec, limit, scale=0.5)


def flip(before: float, after: float, distance: float, distance_after: float | None = None) -> dict:
    """The binary counterfactual's flip record (see the module docstring; the rule is
    :func:`medcfx.cf_quality.flipped`); with the re-encoded counterfactual's distance, also whether it
    crossed the hyperplane (the sign of the distance changed)."""
    towards_negative = distance > 0
    out = {"direction": "to negative" if towards_negative else "to positive", "before": float(before),
           "after": float(after), "flipped": core.flipped(before, after, add=not towards_negative)}
    if distance_after is not None:
        out.update(distance_before=float(distance), distance_after=float(distance_after),
                   crossed_hyperplane=bool((distance_after <= 0) if towards_negative else (distance_after > 0)))
    return out


outside_change = core.outside_change


def box_region(box, shape) -> np.ndarray | None:
    """One box (x0, y0, x1, y1) in model pixels as a bool mask (:func:`medcfx.cf_quality.box_region`)."""
    return core.box_region([box], shape)


def case_quality(inversion: dict | None, flip_record: dict | None = None, diff=None, region=None,
                 region_source: str | None = None) -> dict:
    off_img = outside_change(diff, region) if diff is not None else None
    return {"inversion": inversion,
            "flip": {"counterfactual": flip_record} if flip_record is not None else {},
            "off_target_findings": [],
            "off_target_probability_change": None,
            "off_target_probability_note": ONE_CLASS,
            "off_target_image_change": off_img,
            "off_target_region": region_source if off_img is not None else None}


def summarise(cases: list[dict]) -> dict:
    """Aggregate of :func:`case_quality` records (:func:`medcfx.cf_quality.summarise`), plus the share of
    counterfactuals that crossed the hyperplane (every case counts) and why there is no off-target
    probability."""
    crossed = [f["crossed_hyperplane"] for c in cases for f in c["flip"].values() if "crossed_hyperplane" in f]
    out = core.summarise(cases)
    out.update(hyperplane_cross_rate=float(np.mean(crossed)) if crossed else None,
               off_target_probability_change_mean=None, off_target_probability_note=ONE_CLASS)
    return out


def case_line(q: dict) -> str:
    parts = []
    if q.get("inversion"):
        i = q["inversion"]
        parts.append(f"self-check {i['error']:.4f} (limit {i['limit']:g})" + (" FLAGGED" if i["flagged"] else ""))
    f = q["flip"].get("counterfactual")
    if f is not None:
        parts.append(f"P(positive) {f['before']:.2f} -> {f['after']:.2f} "
                     + {True: "flipped", False: "not flipped", None: "(already on that side)"}[f["flipped"]]
                     + ("" if "crossed_hyperplane" not in f else
                        ", hyperplane " + ("crossed" if f["crossed_hyperplane"] else "not crossed")))
    if q["off_target_image_change"] is not None:
        parts.append(f"outside-lesion |dx| {q['off_target_image_change']:.4f}")
    return ", ".join(parts)


def warning_text(path, inversion: dict) -> str:
    return (f"warning: {path}: the reconstruction (inversion + decoding, no edit) differs from the input by "
            f"{inversion['error']:.4f} (mean |x - x_rec| in [0, 1], limit {inversion['limit']:g}): the "
            f"difference maps are not trustworthy for this case")


def text(q: dict) -> str:
    """One line of the aggregate for metrics.md and the console."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"Counterfactual quality ({q['cases']} test images, reflection, {q.get('classifier', '')}): inversion "
            f"self-check error mean {f(q['inversion_error_mean'], '.4f')}, median "
            f"{f(q['inversion_error_median'], '.4f')}, flagged {q['flagged']} of {q['inversion_checked']} (limit "
            f"{f(q['inversion_limit'], 'g')}); flip rate {f(q['flip_rate'], '.2f')} over {q['flip_counted']} "
            f"(hyperplane crossed: {f(q.get('hyperplane_cross_rate'), '.2f')} of {q['cases']}); "
            f"off-target probability change - (one class); off-target image change "
            f"{f(q['off_target_image_change_mean'], '.4f')} ({q['off_target_image_cases']} with a mask or box).")
