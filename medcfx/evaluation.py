"""Shared evaluation of anomaly / lesion maps over an annotated test set (sanchez, restoration, baselines).

``evaluate_maps`` runs a method's ``map_fn`` over the slices of a test set in batches, resamples each map
from the model's resolution to the evaluation resolution (bilinear; the paper evaluates at 128 x 128) and
streams them into :class:`medcfx.metrics.PixelMetrics` against the masks prepared at that resolution, so a
BraTS-sized test set never has to fit in memory. Image-level scores are the mean of each map.
``write_report`` prints the table and writes ``metrics.json`` and ``metrics.md``.
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


METRIC_ORDER = ("pixel_AUPRC", "pixel_ideal_Dice", "image_AUROC", "image_AP", "slices", "seconds_per_slice")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def report(request, method: str, model: str, result: dict) -> dict:
    """The end of every ``Scorer.evaluate``: ``result`` (metrics plus a "context" dict of settings) printed
    and written to ``request.out``, titled "<method> on <data folder>"; returns the command's output dict."""
    result = dict(result)
    ctx = {"method": method, "model": model, "data": str(request.data), **result.pop("context", {})}
    metrics = write_report(request.out, f"{method} on {Path(request.data).name}", result, ctx, request.console)
    return {"printed": True, **metrics}


def write_report(out: Path, title: str, metrics: dict, context: dict, console=None) -> dict:
    """Print the metrics as a table and write metrics.json + metrics.md into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in metrics.items() if k != "examples"}
    row = {"model": context.get("model", ""), **clean}
    write_json(out / "metrics.json", {"title": title, "metrics": clean, **context})
    md = f"# {title}\n\n" + markdown_table([row], ("model",) + METRIC_ORDER)
    md += "\n" + "".join(f"- {k}: {v}\n" for k, v in context.items())
    staging.atomic_write_bytes(out / "metrics.md", md.encode())
    if console is not None:
        from rich.table import Table

        table = Table(title=title)
        for c in METRIC_ORDER:
            table.add_column(c)
        table.add_row(*(_fmt(clean.get(c, "")) for c in METRIC_ORDER))
        console.print(table)
    return clean
