"""Maps scored, calibrated and thresholded where the user's data lives: on each input's own grid.

Every map-producing method (sanchez and its baselines, the threshold baseline, restoration) hands this
module one callable, ``map_batch(x, start) -> maps``: model-sized input slices ``x`` float32 [b, C, S, S] on
the device (``start``: the index of ``x[0]`` among the case's slices, for methods whose noise depends on
it) to maps float32 [b, S, S], larger = more anomalous. The maps of a case's slices are brought back onto
the input's grid exactly as ``explain`` writes them (:meth:`medcfx.inputs.InputCase.to_original`: linear
resize, padding cropped, the input's voxel order; slices not sampled score 0), and compared there with
the lesion mask as stored, inside the case's foreground (the brain: voxels of any channel above its
background value; all pixels of a 2D image). So every method is scored by the same code on the same
voxels, whatever its model size.

- :func:`score_cases`: a :class:`~medcfx.case_metrics.CaseMetrics` over annotated cases (pixel AP,
  AUROC, the ideal Dice as the oracle it is, Dice and per-volume Dice at named thresholds, image AUROC / AP
  over slices), with bootstrap intervals over cases from ``CaseMetrics.summary``.
- :func:`calibrate_cases`: the operating points of :mod:`medcfx.operating_points` from validation cases.
- :func:`decide`: one case's heatmap at a calibrated threshold -> lesion mask, components, volume in ml,
  image-level score and decision (what ``explain`` writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from medcfx.case_metrics import CaseMetrics
from medcfx.errors import MedcfxError, UsageError
from medcfx.inputs import InputCase
from medcfx.metrics import PixelMetrics
from medcfx.operating_points import DEFAULT_FPR, Calibration, calibrate, lesion_mask, lesion_size

MapBatch = Callable[[torch.Tensor, int], torch.Tensor]

__all__ = ["Decision", "MapBatch", "calibrate_cases", "calibration_of", "decide", "image_score", "most_anomalous", "native_map", "operating_point", "score_cases",
           "slice_maps"]


def slice_maps(case: InputCase, map_batch: MapBatch, batch_size: int, device: str = "cpu") -> np.ndarray:
    """The maps of every slice of ``case``: float32 [n, S, S] (n = the case's sampled slices)."""
    x_all = torch.from_numpy(np.ascontiguousarray(case.images))
    out = [map_batch(x_all[i:i + batch_size].to(device), i).float().cpu() for i in range(0, len(x_all), batch_size)]
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def native_map(case: InputCase, maps: np.ndarray) -> np.ndarray:
    """Model-sized maps [n, S, S] on the input's grid (volume: its storage shape; 2D image: [H, W])."""
    return case.to_original(np.asarray(maps, dtype=np.float32)).astype(np.float32, copy=False)


def _slice_labels(case: InputCase) -> tuple[np.ndarray, np.ndarray]:
    """Image-level labels per sampled slice (lesion present) and which of them are known."""
    labels = np.asarray(case.result.labels[:, 0], dtype=np.float64)
    return labels > 0.5, np.isfinite(labels)


def score_cases(cases: Iterable[InputCase], map_batch: MapBatch, batch_size: int, device: str = "cpu",
                thresholds: dict[str, float] | None = None,
                progress: Callable[[InputCase, np.ndarray], None] | None = None) -> CaseMetrics:
    """Stream the cases' maps, on each input's grid inside its foreground, into a CaseMetrics with the named
    ``thresholds`` (rule ``score > threshold``); ``progress(case, heatmap)`` after each case, with its map on
    the input's grid. Image-level scores: the mean of each sampled slice's
    model-sized map, labelled by whether the slice holds lesion. Raises MedcfxError naming a case without a
    lesion mask (an evaluation needs one per case) or when there is no case."""
    cm = CaseMetrics(thresholds or {})
    n = 0
    for case in cases:
        lesion = case.result.lesion
        if lesion is None:
            raise MedcfxError(f"{case.source}: case {case.id} has no lesion mask; evaluation needs one per case "
                              f"(a _seg file, masks/, or an nnU-Net label)")
        maps = slice_maps(case, map_batch, batch_size, device)
        heat = native_map(case, maps)
        cm.update(case.id, heat, lesion, case.scored_region)
        labels, known = _slice_labels(case)
        if known.any():
            cm.add_images(case.id, maps.reshape(len(maps), -1).mean(1)[known], labels[known])
        n += 1
        if progress is not None:
            progress(case, heat)
    if n == 0:
        raise MedcfxError("no case to evaluate")
    return cm


def calibrate_cases(cases: Iterable[InputCase], map_batch: MapBatch, batch_size: int, device: str, *, method: str,
                    data_fingerprint: str, fpr: float = DEFAULT_FPR, unannotated_healthy: bool = False,
                    progress: Callable[[InputCase, np.ndarray], None] | None = None) -> Calibration:
    """Operating points from validation cases (:func:`medcfx.operating_points.calibrate`): the threshold at
    ``fpr`` on healthy foreground voxels and, with lesion masks, the best-Dice threshold. A case without a
    lesion mask is refused (UsageError naming it) unless ``unannotated_healthy`` says such cases hold no
    lesion (then all its foreground voxels count as healthy)."""
    pm = PixelMetrics(bits=22)
    n = 0
    for case in cases:
        lesion = case.result.lesion
        if lesion is None:
            if not unannotated_healthy:
                raise UsageError(f"{case.source}: case {case.id} has no lesion mask; give annotated validation "
                                 f"cases, or --healthy if every unannotated case is healthy")
            lesion = np.zeros(case.result.foreground.shape, bool)
        heat = native_map(case, slice_maps(case, map_batch, batch_size, device))
        pm.update(heat, lesion, case.scored_region)
        n += 1
        if progress is not None:
            progress(case, heat)
    if n == 0:
        raise MedcfxError("no validation case to calibrate on")
    if pm.neg.sum() == 0:
        raise MedcfxError("the validation cases hold no healthy voxel: the false-positive rate is undefined")
    return calibrate(pm, method=method, data_fingerprint=data_fingerprint, n_cases=n, fpr=fpr)


def calibration_of(entry, operating_point: str | None = None) -> tuple[Calibration, str, float] | None:
    """The calibration stored with a registry entry (``medcfx calibrate``), the name of the operating point
    to use and its threshold; None when the entry has none. ``operating_point``: a name of
    ``Calibration.thresholds()`` ("fpr5", "valDice"); default the false-positive-rate threshold. UsageError
    for an unknown name; MedcfxError when the stored record is malformed."""
    record = (entry.extra or {}).get("calibration") if entry is not None else None
    if record is None:
        if operating_point is not None:
            raise UsageError(f"--operating-point {operating_point}: {entry.ref if entry else 'this method'} has no "
                             f"calibration (run `medcfx calibrate` first)")
        return None
    try:
        cal = Calibration.from_dict(record)
    except ValueError as exc:
        raise MedcfxError(f"{entry.ref}: stored calibration is malformed: {exc}") from None
    named = cal.thresholds()
    name = operating_point or next(iter(named))
    if name not in named:
        raise UsageError(f"--operating-point {name}: {entry.ref} is calibrated at {', '.join(named)}")
    return cal, name, named[name]


@dataclass
class Decision:
    """One case at an operating point. ``mask``: bool, the input's grid; ``threshold`` and its ``name``;
    ``n_components`` and ``component_sizes`` (each in ``unit``), ``lesion_size`` (ml for a volume with
    spacing, mm^2 for a 2D image with pixel spacing, else voxels / pixels), ``image_score``: the largest
    map value inside the foreground; ``decision``: "lesion" when at least one component of at least the
    minimum size remains, else "no lesion"."""

    mask: np.ndarray
    threshold: float
    name: str
    n_components: int
    component_sizes: list[float]
    lesion_size: float
    unit: str
    image_score: float
    decision: str

    def to_dict(self) -> dict:
        return {"operating_point": self.name, "threshold": self.threshold, "rule": "score > threshold",
                "decision": self.decision, "image_score": self.image_score, "n_components": self.n_components,
                f"lesion_size_{self.unit.replace('^', '')}": self.lesion_size,
                f"component_sizes_{self.unit.replace('^', '')}": self.component_sizes}


def decide(case: InputCase, heatmap: np.ndarray, name: str, threshold: float, min_size_voxels: int = 1) -> Decision:
    """Threshold one case's heatmap on the input's grid (``heatmap`` from :func:`native_map`): components
    with full connectivity (26 neighbours in 3D, 8 in 2D) of at least ``min_size_voxels`` inside the
    foreground (:func:`medcfx.operating_points.lesion_mask`), sizes from the voxel spacing (mm)."""
    lm = lesion_mask(heatmap, threshold, min_size_voxels=min_size_voxels, valid=case.scored_region)
    spacing = None
    if case.is_volume and len(case.grid.zooms) >= 3:
        spacing = case.grid.zooms[:3]
    size, unit = lesion_size(lm.mask, spacing)
    per_voxel = size / max(int(lm.mask.sum()), 1)
    return Decision(lm.mask, float(threshold), name, lm.n_components, [float(s) * per_voxel for s in lm.sizes],
                    float(size), unit, image_score(case, heatmap), "lesion" if lm.n_components else "no lesion")


def most_anomalous(case: InputCase, maps: np.ndarray) -> int:
    """The slice index (the input's, as in the panel names) whose model-sized map [n, S, S] has the largest
    mean."""
    means = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1).mean(1)
    return int(case.slice_index[int(np.argmax(means))])


def image_score(case: InputCase, heatmap: np.ndarray) -> float:
    """A case's image-level score: the largest value of its map (on the input's grid) inside the scored
    region (the foreground of the explained slices)."""
    region = case.scored_region
    return float(heatmap[region].max()) if region is not None and region.any() else float(heatmap.max())


def operating_point(request, entry, params: dict, method: str) -> tuple[tuple[str, float] | None, dict]:
    """The (name, threshold) ``explain`` applies, from the calibration stored with ``entry`` and the
    ``--operating-point`` option (None without calibration), and what to tell the user once in the
    command's summary: ``{"operating_point": {...}}``, or ``{"calibration": "none: ..."}``, plus a
    ``"warning"`` when the sampling settings differ from those the calibration was made with
    (``calibration_settings``): the threshold belongs to the maps of those settings."""
    found = calibration_of(entry, request.options.get("operating_point"))
    if found is None:
        if entry is None:  # a method without a model (the threshold baseline) has nowhere to store one
            return None, {"calibration": f"none: heatmap only (no mask, volume or decision); {method} has no model "
                                         f"to store a calibration with: `medcfx evaluate {method} --val "
                                         f"VALIDATION_SET` reports its Dice at calibrated thresholds"}
        return None, {"calibration": f"none: heatmap only (no mask, volume or decision); run `medcfx calibrate "
                                     f"{entry.ref} --data VALIDATION_SET` first"}
    cal, name, threshold = found
    said = {"operating_point": {"name": name, "threshold": threshold, "rule": "score > threshold",
                                "calibrated_on": cal.data_fingerprint[:12], "calibrated_cases": cal.n_cases}}
    saved = (entry.extra or {}).get("calibration_settings") or {}
    differ = [f"{k} {params[k]!r} (calibrated at {saved[k]!r})" for k in sorted(saved)
              if k in params and params[k] != saved[k]]
    if differ:
        said["warning"] = (f"{entry.ref}'s calibration was made with other sampling settings: {', '.join(differ)}; "
                           f"the threshold may not fit these maps")
    return (name, threshold), said
