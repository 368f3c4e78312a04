"""Figures quoted in docs/data.md for the offline demo datasets.

    python benchmarks/demo_stats.py                     # FLAIR-threshold Dice + generation times
    python benchmarks/demo_stats.py --cases 8 --shape 240 240 155
    python benchmarks/demo_stats.py --figures docs/img  # also redraw docs/img/demo_{brain,vertebra,chest}.png

Prints:

* FLAIR-threshold Dice: for ``--cases`` tumour-bearing brain subjects, the best Dice of ``FLAIR >= t``
  against the whole tumour (seg > 0) over brain voxels, brute force over every threshold
  (:func:`medcfx.demo.brain.best_threshold_dice`): per case, their mean, and one threshold for all
  cases pooled after dividing each FLAIR by its median brain intensity.
* Generation time per case: ``brain_case`` alone, and ``make_demo`` per case (generation plus writing the
  files) for each kind.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from medcfx.demo import brain as demo_brain, chest as demo_chest, make_demo, vertebra as demo_vertebra
from medcfx.demo.common import case_rng


def flair_study(cases: int, shape, seed: int, anatomy: str) -> None:
    source = demo_brain.resolve_anatomy(anatomy)
    print(f"FLAIR-threshold Dice, {cases} tumour cases, shape {tuple(shape)}, seed {seed}, anatomy {source}")
    demo_brain.load_atlas(source)  # not timed: loaded once per process
    r = demo_brain.flair_dice_study(cases, seed, tuple(shape), anatomy=source)
    print("  per case:", " ".join(f"{d:.3f}" for d in r["per_case_dice"]))
    print(f"  mean per-case best Dice: {r['mean_per_case_dice']:.3f}")
    print(f"  pooled best Dice (one threshold, FLAIR / median): {r['pooled_dice']:.3f} "
          f"at {r['pooled_threshold']:.3f} x median")
    t = np.array(r["seconds_per_case"])
    print(f"  brain_case seconds per case: mean {t.mean():.2f}, min {t.min():.2f}, max {t.max():.2f}")


def write_times(brain_shape) -> None:
    with tempfile.TemporaryDirectory() as d:
        for kind, n, opts in (
            ("brain", 3, {"shape": tuple(brain_shape), "tumour_free_fraction": 0.0}),
            ("vertebra", 50, {}),
            ("chest", 50, {}),
        ):
            t0 = time.perf_counter()
            make_demo(kind, Path(d) / kind, cases=n, seed=0, **opts)
            dt = (time.perf_counter() - t0) / n
            size = sum(p.stat().st_size for p in (Path(d) / kind).rglob("*") if p.is_file()) / n
            print(f"  make_demo {kind:8s}: {dt:6.3f} s per case (generate + write), {size / 1e6:.2f} MB per case")


# ------------------------------------------------------------------------------------------------ figures


def _box(rgb: np.ndarray, box, colour) -> None:
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0] = colour
    rgb[y0:y1, x1 - 1] = colour
    rgb[y0, x0:x1] = colour
    rgb[y1 - 1, x0:x1] = colour


def brain_figure(path: Path) -> None:
    from medcfx.viz import grid, save_png, to_uint8

    rows, titles = [], []
    picks = [(0, True), (3, True), (1, False)]
    for i, tumour in picks:
        res = demo_brain.brain_case(case_rng("brain", 0, i), demo_brain.DEFAULT_SHAPE, tumour=tumour)
        seg = res["seg"]
        z = int(np.argmax((seg > 0).sum((0, 1)))) if seg.any() else seg.shape[2] // 2 + 10
        row, tit = [], []

        def view(a):  # axial slice, anterior up, 2x2 block average (smaller file, same look)
            s = a[:, :, z].T[::-1].astype(np.float64)
            return s.reshape(s.shape[0] // 2, 2, s.shape[1] // 2, 2).mean((1, 3))

        for m in demo_brain.MODALITIES:
            v = res["images"][m]
            hi = np.percentile(v[v > 0], 99.5)
            row.append(to_uint8(view(v), 0, hi))
            tit.append(m.upper())
        flair = to_uint8(view(res["images"]["flair"]), 0, np.percentile(res["images"]["flair"][res["brain"]], 99.5))
        s = seg[:, :, z].T[::-1][::2, ::2]
        lab = np.zeros(s.shape + (3,), np.uint8)
        lab[s == 2] = (60, 200, 60)
        lab[s == 1] = (230, 60, 60)
        lab[s == 4] = (250, 220, 40)
        over = np.repeat(flair[..., None], 3, 2).astype(np.float64)
        a = (s > 0)[..., None] * 0.55
        over = np.round((1 - a) * over + a * lab).astype(np.uint8)
        row.append(over)
        tit.append("seg on FLAIR" if seg.any() else "no tumour")
        rows.append(row)
        titles.append(tit)
    save_png(grid(rows, titles, scale=1).quantize(256), path)


def vertebra_figure(path: Path) -> None:
    from medcfx.viz import grid, save_png, to_uint8

    rows, titles = [], []
    k = 0
    for grade in (0, 1, 2, 3):
        row, tit = [], []
        for shape in demo_vertebra.DEFORMITIES:
            img, p = demo_vertebra.vertebra_image(case_rng("vertebra", 0, 1000 + k), grade, 96, deformity=shape)
            k += 1
            row.append(to_uint8(img.astype(np.float64) - 1024, -300, 1200))  # bone-ish window
            tit.append(f"G{p['grade']} {shape} {100 * p['height_loss']:.0f}%")
        rows.append(row)
        titles.append(tit)
    save_png(grid(rows, titles, scale=2).quantize(256), path)


def chest_figure(path: Path) -> None:
    from medcfx.viz import grid, save_png

    colours = {"cardiomegaly": (230, 60, 60), "effusion": (60, 160, 250), "nodule": (250, 220, 40)}
    combos = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1), (0, 1, 1), (0, 0, 0)]
    rows, titles, row, tit = [], [], [], []
    for i, c in enumerate(combos):
        img, info = demo_chest.chest_image(case_rng("chest", 0, 2000 + i), *map(bool, c), size=128)
        rgb = np.repeat(img[..., None], 3, 2)
        for f, b in info["bbox"].items():
            if b:
                _box(rgb, b, colours[f])
        names = [f[:4] for f in demo_chest.FINDINGS if info["labels"][f]]
        row.append(rgb)
        tit.append(f"ctr {info['ctr']:.2f} " + ("+".join(names) if names else "normal"))
        if len(row) == 4:
            rows.append(row)
            titles.append(tit)
            row, tit = [], []
    save_png(grid(rows, titles, scale=2).quantize(256), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8, help="tumour cases for the FLAIR study (default 8; 0 skips it)")
    ap.add_argument("--shape", type=int, nargs=3, default=list(demo_brain.DEFAULT_SHAPE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anatomy", default="auto", choices=["auto", "template", "procedural"])
    ap.add_argument("--no-write", action="store_true", help="skip the make_demo timings")
    ap.add_argument("--figures", type=Path, help="folder to (re)draw demo_{brain,vertebra,chest}.png into")
    args = ap.parse_args()
    if args.cases > 0:
        flair_study(args.cases, args.shape, args.seed, args.anatomy)
    if not args.no_write:
        print("Writing speed:")
        write_times(args.shape)
    if args.figures:
        for name, fn in (("brain", brain_figure), ("vertebra", vertebra_figure), ("chest", chest_figure)):
            out = args.figures / f"demo_{name}.png"
            fn(out)
            print(f"  wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
