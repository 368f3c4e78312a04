"""What explain's PNG panels cost: milliseconds per panel, matplotlib panels vs the former Pillow tiles.

Usage::

    python benchmarks/panels.py [--work W] [--repeat 3]

Draws and writes the panels of (a) the bundled demo case (models/demo-inputs/brain/demo_case, 120 x 120
x 12, shown at 240 px per tile) and (b) a BraTS-sized demo brain (240 x 240 x 155, written to W with
``medcfx data demo`` when missing), with a FLAIR-intensity map and a decision mask, as
:class:`medcfx.figures.CasePanels` (what sanchez / threshold / restoration explain write since the pictures
of issue 20) and as the former Pillow panel (four 48 px model-sized tiles enlarged 3x by
:func:`medcfx.viz.panel`). Prints one line per case and kind: slices, ms per panel (best of ``--repeat``
runs, matplotlib already imported), PNG size. The first panel of a process also pays matplotlib's import
(printed once).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _case(path: Path, size: int = 48):
    from medcfx.data.preprocess import PreprocessConfig
    from medcfx.inputs import load_cases

    return load_cases(path, PreprocessConfig(size=size), 4)[0]


def _inputs(case):
    from medcfx.scoring import Decision, native_map

    show = case.channels.index("flair")
    hm = (case.images[:, show] + 1) / 2
    heat = native_map(case, hm)
    thr = float(np.quantile(heat[case.scored_region], 0.95))
    dec = Decision(heat > thr, thr, "fpr0.05", 1, [1.0], 1.0, "ml", float(heat.max()), "lesion")
    return show, hm, heat, dec


def matplotlib_panels(case, out: Path) -> list[Path]:
    from medcfx import figures

    show, hm, heat, dec = _inputs(case)
    return figures.CasePanels(case, [("input", case.images[:, show]), ("counterfactual", case.images[:, show])],
                              heat, figures.MapScale("heatmap", 1.0), channel="flair", model="bench",
                              map_title="heatmap", decision=dec).write(out)


def pillow_panels(case, out: Path) -> list[Path]:
    from medcfx import viz

    show, hm, heat, dec = _inputs(case)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    vmax = float(np.percentile(hm, 99.5)) or 1.0
    paths = []
    for j, k in enumerate(case.slice_index):
        img = case.images[j, show]
        over = viz.outline(viz.overlay(viz.to_uint8(img, -1, 1), viz.heat_rgb(hm[j], vmax=vmax)), hm[j] > dec.threshold)
        tiles = [viz.to_uint8(img, -1, 1), viz.to_uint8(img, -1, 1), over,
                 viz.to_uint8(case.masks[j].astype(np.float32), 0, 1)]
        paths.append(viz.save_png(viz.panel(tiles, ["input", "counterfactual", "heatmap", "mask"], scale=3),
                                  out / "panels" / f"slice_{int(k):03d}.png"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medcfx-bench-panels")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    big = args.work / "brain-240"
    if not big.exists():
        from medcfx.demo import make_demo

        make_demo("brain", big, cases=1, seed=0, shape=(240, 240, 155), tumour_free_fraction=0.0)
    t0 = time.perf_counter()
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    print(f"matplotlib import: {(time.perf_counter() - t0) * 1000:.0f} ms (once per process)")
    cases = [("bundled demo case", ROOT / "models" / "demo-inputs" / "brain" / "demo_case"),
             ("BraTS-sized demo brain", next(p for p in sorted(big.iterdir()) if p.is_dir()))]
    for name, path in cases:
        case = _case(path)
        shape = case.result.geometry.shape
        for kind, fn in (("matplotlib", matplotlib_panels), ("pillow (former)", pillow_panels)):
            best = float("inf")
            for r in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    paths = fn(case, Path(tmp))
                    best = min(best, (time.perf_counter() - t) / len(paths))
                    from PIL import Image

                    size = Image.open(paths[len(paths) // 2]).size
            print(f"{name} {tuple(shape)}, {len(case.slice_index)} slices, {kind}: {best * 1000:.1f} ms per panel, "
                  f"PNG {size[0]} x {size[1]}")


if __name__ == "__main__":
    main()
