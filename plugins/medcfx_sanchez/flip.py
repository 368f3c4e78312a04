"""Flip rate of the classifier-guided baseline (``cdpm-classifier``; issue 16, counterfactual quality).

The CDPM + classifier baseline (Wolleb et al. 2022) decodes towards "healthy" along the gradient of its own
noise-aware classifier. Whether it got there is measured by the same classifier at t = 0 (no noise):

    p_before = P(healthy | x, t = 0),  p_after = P(healthy | x_cf, t = 0)      (softmax of its two logits)

per sampled slice. A slice counts towards the flip rate when it started on the unhealthy side
(p_before < 0.5); it flipped when p_after >= 0.5 (:func:`medcfx.cf_quality.flipped`). The off-target image
change is the mean heatmap (mean |x - x_cf| over channels, images in [-1, 1]) over foreground voxels outside
the lesion mask, beside the same mean inside it, when the case has a lesion mask.

The classifier is the guide, not an independent judge: a high flip rate says the guidance reached its
target, not that the counterfactual is healthy (docs/methods/sanchez.md).
"""

from __future__ import annotations

import numpy as np
import torch

from medcfx.cf_quality import flipped, mean_or_none

from .counterfactual import HEALTHY


class FlipRecorder:
    """Collects P(healthy) before and after of the slices mapped for one case (:meth:`add` per batch, in
    slice order), then :meth:`take` returns the case's record and starts the next case."""

    def __init__(self, classifier: torch.nn.Module):
        self.classifier = classifier
        self._before: list[np.ndarray] = []
        self._after: list[np.ndarray] = []

    @torch.no_grad()
    def probability(self, x: torch.Tensor) -> np.ndarray:
        """P(healthy | x, t = 0) of a batch x [b, C, S, S] in [-1, 1]: float64 [b]."""
        t = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return torch.softmax(self.classifier(x, t).float(), dim=1)[:, HEALTHY].double().cpu().numpy()

    def reset(self) -> None:
        """Forget what was recorded (a case that failed half-way must not leak into the next one)."""
        self._before, self._after = [], []

    def add(self, x: torch.Tensor, x_cf: torch.Tensor) -> None:
        """Record one batch: inputs and their counterfactuals [b, C, S, S]."""
        self._before.append(self.probability(x))
        self._after.append(self.probability(x_cf))

    def take(self, n_slices: int, heat: np.ndarray | None = None, lesion: np.ndarray | None = None,
             region: np.ndarray | None = None) -> dict:
        """The record of the case just mapped (its ``n_slices`` slices) and a fresh start:
        ``p_target_before`` / ``p_target_after`` (P(healthy) per slice, lists), their means, ``counted`` (slices with
        p_before < 0.5), ``flipped``, ``flip_rate`` (None when none counted), and, given the case's native
        heatmap, lesion mask and foreground (same shape), ``off_target_image_change`` / ``lesion_image_change``
        (means of the heatmap outside / inside the lesion within the foreground; None without a mask or where
        that part is empty: a case whose mask is empty has only an off-target change, over its whole
        foreground). RuntimeError when the recorded slices are not the case's."""
        before = np.concatenate(self._before) if self._before else np.zeros(0)
        after = np.concatenate(self._after) if self._after else np.zeros(0)
        self.reset()
        if len(before) != n_slices:
            raise RuntimeError(f"flip record holds {len(before)} slices, the case has {n_slices}")
        flips = [flipped(b, a, add=True) for b, a in zip(before, after)]
        counted = [f for f in flips if f is not None]
        out = {"target": "healthy", "judge": "the model's noise-aware classifier at t = 0",
               "p_target_before": before.tolist(), "p_target_after": after.tolist(),
               "p_target_before_mean": float(before.mean()) if n_slices else None,
               "p_target_after_mean": float(after.mean()) if n_slices else None,
               "counted": len(counted), "flipped": int(sum(counted)),
               "flip_rate": float(np.mean(counted)) if counted else None,
               "off_target_image_change": None, "lesion_image_change": None}
        if heat is not None and lesion is not None:  # a known lesion mask, possibly empty (a healthy case)
            inside = np.asarray(lesion, bool)
            fg = np.ones(inside.shape, bool) if region is None else np.asarray(region, bool)
            outside, inside = fg & ~inside, fg & inside
            h = np.asarray(heat, np.float64)
            if outside.any():  # in a case without lesion every change is off-target
                out["off_target_image_change"] = float(h[outside].mean())
            if inside.any():
                out["lesion_image_change"] = float(h[inside].mean())
        return out

    @staticmethod
    def summary(records: list[dict]) -> dict:
        """The evaluate summary of per-case :meth:`take` records: slices counted and flipped over all cases, the
        pooled flip rate, mean P(healthy) before / after over all slices, and the means over cases of the
        off-target and in-lesion image change (over the cases that have them)."""
        before = np.concatenate([r["p_target_before"] for r in records]) if records else np.zeros(0)
        after = np.concatenate([r["p_target_after"] for r in records]) if records else np.zeros(0)
        counted = sum(r["counted"] for r in records)
        flips = sum(r["flipped"] for r in records)
        return {"target": "healthy", "judge": "the model's noise-aware classifier at t = 0", "cases": len(records),
                "slices": int(len(before)), "counted": counted, "flipped": flips,
                "flip_rate": flips / counted if counted else None,
                "p_target_before_mean": float(before.mean()) if len(before) else None,
                "p_target_after_mean": float(after.mean()) if len(after) else None,
                "off_target_image_change_mean": mean_or_none(r["off_target_image_change"] for r in records),
                "lesion_image_change_mean": mean_or_none(r["lesion_image_change"] for r in records)}
