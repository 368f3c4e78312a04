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

from medcfx import cf_quality as core

# mean |input - unguided reconstruction| above which a case is flagged, intensity units [0, 1]: about 1.5x
# the median over 32 demo test radiographs at the default removal setting (t = 300, every step: median
# 0.042, max 0.049; t = 200: median 0.032) with mediffusion-demo; docs/methods/mediffusion.md has the numbers
INVERSION_LIMIT = 0.06


def inversion_check(u_in: np.ndarray, u_rec: np.ndarray, limit: float) -> dict:
    """{"error", "limit", "flagged"} for an input and its unguided reconstruction, both in [0, 1]
    (:func:`medcfx.cf_quality.inversion_check`)."""
    return core.inversion_check(u_in, u_rec, limit)


flipped = core.flipped
box_region = core.box_region
outside_change = core.outside_change


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


def summarise(cases: list[dict]) -> dict:
    """The aggregate over the per-case records of :func:`case_quality` (:func:`medcfx.cf_quality.summarise`),
    plus the autoencoder's own share of the self-check error (D(E(x)) alone), for scale."""
    out = core.summarise(cases)
    out["autoencoder_error_mean"] = core.mean_or_none(
        c["inversion"].get("autoencoder_error") for c in cases if c.get("inversion"))
    return out


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
