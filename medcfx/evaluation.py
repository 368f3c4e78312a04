"""Shared evaluation of anomaly / lesion maps over an annotated test set (sanchez, restoration, baselines).

``evaluate_maps`` runs a method's ``map_fn`` over the slices of a test set in batches, resamples each map
from the model's resolution to the evaluation resolution (bilinear; the paper evaluates at 128 x 128) and
streams them into :class:`medcfx.metrics.PixelMetrics` against the masks prepared at that resolution, so a
BraTS-sized test set never has to fit in memory. Image-level scores are the mean of each map.
``evaluate_maps`` is what training's quick validation uses; ``medcfx evaluate`` scores on each input's own
grid (:mod:`medcfx.scoring`) and ``report`` prints the table and writes ``metrics.json`` and ``metrics.md``
with bootstrap intervals over cases.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medcfx import staging
from medcfx.data.preprocess import PreprocessConfig, prepare
from medcfx.errors import MedcfxError
from medcfx.metrics import PixelMetrics, image_metrics
from medcfx.provenance import write_json


def select_rows(n: int, stride: int = 1, max_slices: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """Every ``stride``-th row, then at most ``max_slices`` of them spread evenly (deterministic)."""
    idx = np.arange(n) if rows is None else np.asarray(rows)
    idx = idx[:: max(1, stride)]
    if max_slices and len(idx) > max_slices:
        idx = idx[np.linspace(0, len(idx) - 1, max_slices).round().astype(int)]
    return idx


def test_sets(data: Path, cfg: PreprocessConfig, eval_size: int, progress: bool = False):
    """The test set at the model's size (inputs) and at the evaluation size (masks), rows aligned."""
    model_set = prepare(data, cfg, progress=progress)
    eval_cfg = PreprocessConfig.from_dict({**cfg.to_dict(), "size": eval_size})
    eval_set = model_set if eval_size == cfg.size else prepare(data, eval_cfg, progress=progress)
    if model_set.masks is None:
        raise MedcfxError(f"{data}: evaluation needs lesion masks (a _seg per case, or masks/)")
    same = (len(model_set) == len(eval_set) and np.array_equal(model_set.case_ids, eval_set.case_ids)
            and np.array_equal(model_set.slice_index, eval_set.slice_index))
    if not same:
        raise MedcfxError("internal: model-size and evaluation-size slices of the test set do not align")
    return model_set, eval_set


def evaluate_maps(map_fn: Callable[[torch.Tensor, np.ndarray], torch.Tensor], model_set, eval_set,
                  rows: np.ndarray, batch_size: int = 8, device: str = "cpu", progress=None,
                  keep_maps: int = 0) -> dict:
    """Metrics of ``map_fn(images [b, C, S, S], rows) -> maps [b, S, S]`` over ``rows`` of the test set.

    Only rows whose mask is known count. Returns pixel_AUPRC, pixel_ideal_Dice, image_AUROC, image_AP and
    counts; ``keep_maps`` > 0 also returns the first few maps (for figures) under "examples".
    """
    rows = np.asarray([r for r in rows if model_set.has_mask[r]], dtype=np.int64)
    if len(rows) == 0:
        raise MedcfxError("no annotated slices to evaluate")
    pm = PixelMetrics()
    scores, labels, examples = [], [], []
    size = eval_set.size
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        b = rows[start:start + batch_size]
        x = torch.from_numpy(np.asarray(model_set.images[b])).to(device)
        maps = map_fn(x, b).float()
        if maps.shape[-1] != size:
            maps = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear",
                                                   align_corners=False)[:, 0]
        maps = maps.cpu().numpy()
        masks = np.asarray(eval_set.masks[b]) > 0
        pm.update(maps, masks)
        scores.extend(maps.reshape(len(b), -1).mean(1).tolist())
        labels.extend(masks.reshape(len(b), -1).any(1).tolist())
        if len(examples) < keep_maps:
            for i in range(min(len(b), keep_maps - len(examples))):
                examples.append((int(b[i]), maps[i], masks[i]))
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    out = {**pm.compute(), **image_metrics(scores, labels), "slices": int(len(rows)),
           "seconds": round(time.perf_counter() - t0, 1)}
    out["seconds_per_slice"] = round(out["seconds"] / len(rows), 3)
    if keep_maps:
        out["examples"] = examples
    return out


METRIC_ORDER = ("pixel_AUPRC", "pixel_AUROC", "pixel_ideal_Dice_oracle", "pixel_Dice@valDice", "pixel_Dice@fpr5",
                "volume_Dice_mean@valDice", "volume_Dice_sd@valDice", "volume_Dice_mean@fpr5", "volume_Dice_sd@fpr5",
                "image_AUROC", "image_AP")
DEFAULT_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def _with_ci(m: dict) -> str:
    """"0.5120 [0.4410, 0.5830]" (value and its interval), "nan" when undefined."""
    if m["value"] is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "nan"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    ci = "" if lo is None or math.isnan(lo) else f" [{lo:.4f}, {hi:.4f}]"
    return f"{m['value']:.4f}{ci}"


def cases_reader(cfg: PreprocessConfig, channels: int, options: dict, log=None):
    """``cases_of(path)``: the cases of a data folder read one at a time, each restricted to every
    ``options["slice_stride"]``-th sampled slice and at most ``options["max_slices"]`` of them (spread evenly;
    only those slices' voxels are then scored). ``cases_of(path)`` raises MedcfxError on the call when ``path``
    cannot be read as a dataset (:func:`medcfx.inputs.iter_cases`: missing, no known layout, a case without one
    of the modalities), before any case is read; a file that cannot be decoded is found when its case is read.
    ``log(line, where)``: called with one line per note of each case (what the readers changed or assumed: a
    z-scored background, an oblique or header-less volume, a DICOM LUT), as explain says them, and the folder
    read (so the same note of a same-named case in another set is said again)."""
    from medcfx.inputs import iter_cases

    stride, most = int(options.get("slice_stride") or 1), int(options.get("max_slices") or 0)

    def cases_of(path):
        say = None if log is None else (lambda line: log(line, str(Path(path).absolute())))
        cases = iter_cases(Path(path), cfg, channels, log=say)
        if stride > 1 or most:
            return (case.subset(select_rows(len(case.slice_index), stride, most)) for case in cases)
        return cases

    return cases_of


def evaluate_cases(request, method: str, entry, map_batch, cases_of, batch_size: int, context: dict,
                   self_check=None, flips=None) -> dict:
    """``medcfx evaluate`` for a map-producing method: thresholds from ``--val`` (calibrated now on that
    validation set with the same settings), else from the calibration stored with ``entry``, else none (only
    the threshold-free metrics and the oracle); then every case of ``request.data`` scored on its own grid
    (:func:`medcfx.scoring.score_cases`) and reported with intervals (:func:`report`).

    ``map_batch``: see :mod:`medcfx.scoring`; ``cases_of(path)``: an iterator of the InputCases of a data
    folder as the method reads them; ``context``: the settings to report (sampling parameters ...);
    ``self_check(case) -> dict | None``: a counterfactual method's inversion self-check of one case (keys
    ``mean_abs_error`` (list), ``limit``, ``flagged``), reported per case and summarised; ``flips``: a
    classifier-guided method's recorder of P(target) before / after (``take(n_slices, heatmap, lesion,
    region) -> record`` per case, ``summary(records)``; see medcfx_sanchez.flip), reported per case and as
    ``flip`` in the settings."""
    from medcfx.scoring import calibrate_cases, calibration_of, score_cases
    from medcfx.train import data_fingerprint

    thresholds: dict[str, float] = {}
    val = request.extra.get("val")
    test_cases = cases_of(request.data)  # an incomplete test set layout fails here, before the calibration runs
    if val is not None:
        cal = calibrate_cases(cases_of(val), map_batch, batch_size, request.device, method=method,
                              data_fingerprint=data_fingerprint(val), fpr=float(request.extra.get("fpr") or 0.05),
                              unannotated_healthy=bool(request.extra.get("healthy")),
                              progress=None if flips is None else lambda case, heat: flips.take(len(case.slice_index)))
        thresholds = cal.thresholds()
        context["calibration"] = {"source": f"--val {Path(val).absolute()}", **cal.to_dict()}
    elif (stored := calibration_of(entry)) is not None:
        thresholds = stored[0].thresholds()
        context["calibration"] = {"source": entry.ref, **stored[0].to_dict()}
    else:
        how = "run `medcfx calibrate` or give --val" if entry is not None else "give --val VALIDATION_SET"
        context["calibration"] = f"none: no thresholded Dice ({how})"
        request.log(f"{entry.ref if entry else method} has no calibration: Dice at an operating point is not "
                    f"reported ({how})")
    slices, checks, flip_records = [0], {}, {}

    def done(case, heat) -> None:
        slices[0] += len(case.slice_index)
        if flips is not None:  # first: the recorder holds this case's slices until taken
            flip_records[case.id] = flips.take(len(case.slice_index), heat, case.result.lesion, case.scored_region)
        if self_check is not None and (c := self_check(case)) is not None:
            checks[case.id] = c

    t0 = time.perf_counter()
    cm = score_cases(test_cases, map_batch, batch_size, request.device, thresholds, progress=done)
    seconds = time.perf_counter() - t0
    context.update({"thresholds": thresholds, "slices": slices[0], "seconds": round(seconds, 1),
                    "seconds_per_slice": round(seconds / max(slices[0], 1), 3)})
    if checks:
        worst = [max(c["mean_abs_error"]) for c in checks.values()]
        context["self_check"] = {"cases": len(checks), "flagged": sum(c["flagged"] for c in checks.values()),
                                 "limit": next(iter(checks.values()))["limit"], "mean_worst_error": float(np.mean(worst)),
                                 "max_error": float(max(worst))}
    per_case = {k: {"self_check_error": max(c["mean_abs_error"]), "self_check_flagged": c["flagged"]}
                for k, c in checks.items()}
    if flip_records:
        context["flip"] = f = flips.summary(list(flip_records.values()))
        for k, r in flip_records.items():
            per_case.setdefault(k, {}).update({
                "p_target_before": r["p_target_before_mean"], "p_target_after": r["p_target_after_mean"],
                "flip_rate": r["flip_rate"], "off_target_image_change": r["off_target_image_change"]})
        rate = "n/a (no slice started on the other side)" if f["flip_rate"] is None else f"{f['flip_rate']:.3f}"
        request.log(f"flip to {f['target']} ({f['judge']}): {f['flipped']} of the {f['counted']} counted slices "
                    f"({f['slices']} sampled; {f['slices'] - f['counted']} already {f['target']}), rate {rate}; "
                    f"mean P({f['target']}) {f['p_target_before_mean']:.3f} -> {f['p_target_after_mean']:.3f}")
    return report(request, method, entry.ref if entry is not None else "-", cm, context,
                  request.extra.get("n_resamples"), per_case_extra=per_case)


def calibrate_entry(request, method: str, entry, map_batch, cases_of, batch_size: int, settings: dict) -> dict:
    """``medcfx calibrate``: operating points of ``entry`` on the validation set ``request.data``
    (:func:`medcfx.scoring.calibrate_cases`) stored as a new version of the model
    (``Registry.derive``: fields ``calibration`` and ``calibration_settings``, the sampling settings they
    hold for). Returns the command's output dict."""
    from medcfx.scoring import calibrate_cases
    from medcfx.train import data_fingerprint

    cal = calibrate_cases(cases_of(request.data), map_batch, batch_size, request.device, method=method,
                          data_fingerprint=data_fingerprint(request.data),
                          fpr=float(request.extra.get("fpr") or 0.05),
                          unannotated_healthy=bool(request.extra.get("healthy")))
    new = request.registry.derive(entry.ref, {"calibration": cal.to_dict(),
                                              "calibration_settings": _plain_dict(settings)})
    named = ", ".join(f"{k} > {v:.6g}" for k, v in cal.thresholds().items())
    best = f"; best validation Dice {cal.best_dice:.3f}" if cal.best_dice is not None else ""
    request.log(f"calibrated {entry.ref} on {cal.n_cases} case(s) of {request.data}: {named} (achieved FPR "
                  f"{cal.achieved_fpr:.4f}{best}) -> {new.ref}")
    return {"printed": request.console is not None, "model": new.ref, "calibration": cal.to_dict()}


def _plain_dict(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}


def undefined_metrics(counts: dict) -> list[str]:
    """Why some metrics of an evaluation are nan, one line per reason, from its ``counts`` (keys
    ``lesion_pixels``, ``pixels``, ``images``, ``positive_images``): no lesion voxel (or only lesion voxels) in
    the scored slices leaves the pixel metrics undefined; slices all with or all without a lesion, the image
    metrics."""
    out = []
    lesion, pixels = counts.get("lesion_pixels"), counts.get("pixels")
    if lesion == 0 or (lesion is not None and lesion == pixels):
        out.append(f"{'no' if lesion == 0 else 'only'} lesion voxels in the scored slices: pixel AP, AUROC and Dice "
                   "are undefined (nan); score more slices (--max-slices) or check the segmentations")
    pos, images = counts.get("positive_images"), counts.get("images")
    if pos is not None and images and pos in (0, images):
        out.append(f"{'no' if pos == 0 else 'every'} scored slice has a lesion: image AUROC and AP are undefined (nan)")
    return out


def report(request, method: str, model: str, cm, context: dict, n_resamples: int | None = None,
           per_case_extra: dict[str, dict] | None = None) -> dict:
    """The end of every ``Scorer.evaluate``: the metrics of ``cm`` (a :class:`~medcfx.case_metrics.CaseMetrics`
    scored on the inputs' own grids, see :mod:`medcfx.scoring`) with 95 % percentile-bootstrap intervals over
    cases (``n_resamples``, default 1000, fixed seed 0), printed as a table and written to ``request.out``
    as ``metrics.json`` (values, intervals, counts, the per-case table, settings) and ``metrics.md``.
    ``per_case_extra``: case id -> further columns of that case's row. Returns the command's output dict
    (metric key -> value, plus counts)."""
    n = DEFAULT_RESAMPLES if n_resamples is None else int(n_resamples)
    summary = cm.summary(n_resamples=n, seed=BOOTSTRAP_SEED) if n > 0 else {
        "metrics": {k: {"value": v, "ci_low": None, "ci_high": None, "n_skipped": None}
                    for k, v in cm.compute().items()}, "counts": cm.counts(), "bootstrap": {"n_resamples": 0}}
    metrics = summary["metrics"]
    values = {k: _plain(m["value"]) for k, m in metrics.items()}
    ctx = {"method": method, "model": model, "data": str(Path(request.data).absolute()), **context}
    title = f"{method} on {Path(request.data).name}"
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    per_case = [{k: _plain(v) for k, v in {**row, **(per_case_extra or {}).get(row["case"], {})}.items()}
                for row in cm.case_table()]
    write_json(out / "metrics.json", {
        "title": title, "metrics": values,
        "intervals": {k: {"ci_low": _plain(m.get("ci_low")), "ci_high": _plain(m.get("ci_high")),
                          "n_skipped": m.get("n_skipped")} for k, m in metrics.items()},
        "labels": {k: _label(k) for k in metrics}, "counts": summary["counts"], "bootstrap": summary["bootstrap"],
        "per_case": per_case, **ctx})
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    md = f"# {title}\n\nScored on each input's own grid inside its foreground; value [95 % bootstrap interval " \
         f"over cases, {n} resamples, seed {BOOTSTRAP_SEED}].\n\n| metric | value [95 % CI] |\n|---|---|\n"
    md += "".join(f"| {_label(k)} | {_with_ci(metrics[k])} |\n" for k in keys)
    case_cols = tuple(per_case[0]) if per_case else ()
    md += "\n## Per case\n\n" + markdown_table(per_case, case_cols)
    md += "\n## Settings\n\n" + "".join(f"- {k}: {v}\n" for k, v in ctx.items())
    staging.atomic_write_bytes(out / "metrics.md", md.encode())
    request.log(f"wrote {out / 'metrics.json'} and metrics.md (per-case rows, settings)")
    for line in undefined_metrics(summary["counts"]):
        request.log(f"note: {line}")
    if request.console is not None:
        from rich.table import Table

        table = Table(title=f"{title} (95 % CI over {summary['counts']['cases']} cases)")
        table.add_column("metric")
        table.add_column("value [95 % CI]")
        for k in keys:
            table.add_row(_label(k), _with_ci(metrics[k]))
        request.console.print(table)
    return {"printed": True, **values, **summary["counts"]}


def flat_metrics(report: dict) -> dict:
    """One flat dict from a ``metrics.json`` written by :func:`report`, for scripts: every metric, the counts,
    ``slices`` / ``seconds_per_slice``, and ``pixel_ideal_Dice`` (= the oracle ``pixel_ideal_Dice_oracle``,
    the name older benchmark scripts and tables use)."""
    m = {k: (math.nan if v is None else v) for k, v in report["metrics"].items()}
    return {**m, **report.get("counts", {}), "pixel_ideal_Dice": m.get("pixel_ideal_Dice_oracle", math.nan),
            "slices": report.get("slices"), "seconds_per_slice": report.get("seconds_per_slice")}


def _label(key: str) -> str:
    from medcfx.case_metrics import metric_label

    return metric_label(key)


def _plain(v):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v
