"""The grade strip of ``medcfx grade`` (``strip.png``) and the check of whether each grade target was reached.

The strip (a matplotlib figure, :mod:`medcfx.figures`): top row the input and one frame per target grade,
bottom row the reflection (binary counterfactual) and one difference map per grade, every tile on the input
image's own pixel grid (the model's frames brought back by the input's
:class:`~medcfx.data.geometry.SliceGeometry`; enlarged by a whole factor when the input is small), the
difference maps on one colour scale with a colour bar, and a legend under the tiles saying what every label
means. A target grade whose frame the grader reads back more than :data:`GRADE_TOLERANCE` away from it is
"not reached": its title says so in red, the legend names it, and ``result.json`` records it
(:func:`target_check`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from medcfx import figures

# a target grade counts as reached when the grade read back from its frame is within this of it: a quarter
# of one grade step, half way to where the grader's rounding would call the frame the neighbouring grade
GRADE_TOLERANCE = 0.25
NOT_REACHED_COLOUR = "#d62728"


def _label(g: float) -> str:
    return f"G{int(g)}" if float(g) == int(g) else f"G{g:g}"


def target_check(grades, names, scores: dict, tolerance: float = GRADE_TOLERANCE) -> dict:
    """Per target grade: the grade read back from its frame, the gap (read - target) and ``reached``
    (|gap| <= ``tolerance``); ``not_reached``: the frame names that missed; ``note``: one sentence naming
    them (None when every target was reached)."""
    frames, missed = {}, []
    for g, n in zip(grades, names):
        read = float(scores[n]["grade"])
        ok = bool(abs(read - float(g)) <= tolerance)
        frames[n] = {"target": float(g), "read": read, "gap": read - float(g), "reached": ok}
        if not ok:
            missed.append(n)
    note = None
    if missed:
        said = ", ".join(f"{_label(frames[n]['target'])} (reads {frames[n]['read']:.2f})" for n in missed)
        note = (f"target{'s' if len(missed) > 1 else ''} not reached: {said}; the grader reads "
                f"{'these frames' if len(missed) > 1 else 'this frame'} more than {tolerance:g} from the grade "
                f"aimed at, so read {'them' if len(missed) > 1 else 'it'} as a move towards that grade, not as "
                f"an image of it")
    return {"tolerance": tolerance, "rule": f"reached when |grade read from the frame - target| <= {tolerance:g}",
            "frames": frames, "not_reached": missed, "note": note}


def strip_figure(geometry, x: np.ndarray, frames: dict, scores: dict, prediction: dict, grades, names,
                 check: dict, *, flip: dict | None = None, classifier: str = "svm", title: str = ""):
    """The strip as a figure. ``geometry``: the input's SliceGeometry (2D); ``x`` and ``frames[name]``:
    model images [C, S, S] in [-1, 1]; ``scores[name]["grade"]``: the grade read from each frame;
    ``prediction``: the input's grade (``grade``, ``grade_rounded``); ``check``: :func:`target_check`;
    ``flip``: the reflection's flip record (quality.flip) for the legend."""

    def native(img):  # a model image [C, S, S] or map [S, S] on the input's grid, channel mean
        a = np.asarray(img, dtype=np.float32)
        a = a.mean(axis=0) if a.ndim == 3 else a
        return geometry.to_original(a[None])

    def diff(f):
        return np.abs(np.asarray(x, np.float64) - np.asarray(f, np.float64)).mean(axis=0)

    H, W = (int(s) for s in geometry.shape[:2])
    S = int(np.asarray(x).shape[-1])
    diffs = [diff(frames[n]) for n in names]
    vmax = max([float(d.max()) for d in diffs] + [float(diff(frames["counterfactual"]).max()), 1e-6])
    f = figures.tile_factor((H, W))
    cols = 1 + len(names)
    width_px = 2 * figures.MARGIN + cols * W * f + (cols - 1) * figures.GAP
    chars = max(60, int((width_px - 2 * figures.MARGIN) / 6.4))
    p = prediction
    legend = [
        f"input: the image as the model sees it ({S} x {S} px), shown on the input's {H} x {W} px grid, with the "
        f"grade the {classifier} grader gives it (continuous, then rounded to G{int(p['grade_rounded'])}).",
        "target Gk: the image decoded from the same noise with its semantic code moved to grade k; \"reads\" is "
        "the grade the grader gives that generated image (re-encoded); a target counts as reached when it reads "
        f"within {check['tolerance']:g} of k.",
        "reflection: the binary counterfactual (the code mirrored across the classifier's hyperplane) and the "
        "grade it reads" + (f"; P(positive) {flip['before']:.2f} -> {flip['after']:.2f}, "
                           f"{'flipped' if flip['flipped'] else 'did not flip'}." if flip else "."),
        "|input - Gk|: per pixel, the mean over channels of |input - frame| (images in [-1, 1]); colour bar below.",
    ]
    lines = [ln for item in legend for ln in textwrap.wrap(item, chars)]
    warn = textwrap.wrap(check["note"][0].upper() + check["note"][1:], chars) if check["note"] else []
    bottom = 56 + 12 * (len(lines) + len(warn)) + 6
    lay = figures.tile_figure(2, cols, (H * f, W * f), top_px=28, bottom_px=bottom, row_title_px=30)
    fig = lay.fig
    fig.suptitle(title or "grade strip", fontsize=9, y=1 - 6 / fig.bbox.height, va="top")
    big = lambda a: figures.enlarge(a, f)  # noqa: E731
    lay.put(0, 0, big(figures.grey(native(x))), f"input\ngrade {p['grade']:.2f} (G{int(p['grade_rounded'])})")
    for c, (g, n) in enumerate(zip(grades, names), start=1):
        rec = check["frames"][n]
        t = f"target {_label(g)}" + ("" if rec["reached"] else ": NOT REACHED") + f"\nreads {rec['read']:.2f}"
        lay.put(0, c, big(figures.grey(native(frames[n]))), t, colour="black" if rec["reached"] else NOT_REACHED_COLOUR)
    lay.put(1, 0, big(figures.grey(native(frames["counterfactual"]))),
            f"reflection\nreads {scores['counterfactual']['grade']:.2f}")
    for c, (g, d) in enumerate(zip(grades, diffs), start=1):
        lay.put(1, c, big(figures.coloured(native(d), 0.0, vmax)), f"difference\n|input - {_label(g)}|")
    Wf, Hf = fig.bbox.width, fig.bbox.height
    y = lay.bottom_top + 8
    figures.colour_bar(fig, (figures.MARGIN + 4, y, int(Wf) - 2 * figures.MARGIN - 8, 10), 0.0, vmax,
                       f"|input - frame|, mean over channels: colour scale 0 to {vmax:.3g} (the largest difference "
                       f"over this image's frames)")
    y += 48
    for ln in lines:
        fig.text(figures.MARGIN / Wf, 1 - y / Hf, ln, fontsize=8, va="top", ha="left")
        y += 12
    for ln in warn:
        fig.text(figures.MARGIN / Wf, 1 - y / Hf, ln, fontsize=8, va="top", ha="left", color=NOT_REACHED_COLOUR,
                 weight="bold")
        y += 12
    return fig


def write_strip(path: str | Path, image: Path, prep: dict, channels: int, x, analysis, grades, names, check: dict,
                quality: dict, classifier: str, title: str = "") -> Path:
    """Draw the strip of one graded image (``analysis``: commands.Analysis) and write it to ``path``; the
    input's grid is read again from ``image`` with the model's preprocessing ``prep``."""
    from medcfx.inputs import load_image

    from medcfx_diffae.model import preprocess_config

    geometry = load_image(Path(image), preprocess_config(prep), channels).result.geometry
    flip = (quality.get("flip") or {}).get("counterfactual")
    fig = strip_figure(geometry, x, analysis.frames, analysis.scores, analysis.prediction, grades, names, check,
                       flip=flip, classifier=classifier, title=title)
    return figures.save(fig, path)
