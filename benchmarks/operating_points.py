"""Operating points on the demo brains: calibrated Dice beside the oracle Dice, with 95 % CIs over cases.

Every row runs the real CLI: ``medcfx evaluate METHOD [--model REF] --data TEST --val VAL`` calibrates the
thresholds on the validation cases (5 % FPR on healthy foreground voxels; the best validation Dice) with the
method's own settings, then scores the test cases on each input's own grid inside its foreground
(:mod:`medcfx.scoring`), with percentile-bootstrap intervals over cases (1000 resamples, seed 0).

Usage::

    python benchmarks/operating_points.py --work W [--max-slices 24] [--chest-images 48] [--write-docs docs/benchmarks.md]

creates ``W/brain-val`` (4 cases, seed 11) and ``W/brain-test`` (8 cases, seed 12) with ``medcfx data demo
brain`` when missing, evaluates the rows below (a row whose earlier run in W scored the same model version on
the same slices, as its ``row.json`` there records, is read back instead) and prints (or writes between the ``operating-points``
markers of the docs file) a markdown table. Then the chest table: ``W/chest-val`` (200 images, seed 2) and
``W/chest-test`` (400, seed 1) with ``medcfx data demo chest``; ``medcfx calibrate mediffusion-demo --target
T --cf-images N`` on the validation images, ``medcfx evaluate mediffusion --localise-images N`` on the test
images (difference maps against the finding's boxes, each image a case of the bootstrap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import case_count, grid_text, write_section

ROWS = [  # (label, evaluate arguments)
    ("threshold (FLAIR / median, native grid, 5 x 5 median filter)", ["threshold"]),
    ("sanchez-demo (cfg w=3, L=0.75, 100 DDIM steps)", ["sanchez", "--model", "sanchez-demo", "--sampler", "paper"]),
    ("restoration-demo (1 - SSIM, 50 steps)", ["restoration", "--model", "restoration-demo"]),
]
CHEST_ROWS = [  # (label, target)
    ("mediffusion-demo, no-cardiomegaly (t 300, scale 500, ancestral DDPM, all 300 steps)", "no-cardiomegaly"),
    ("mediffusion-demo, no-effusion (t 300, scale 500, ancestral DDPM, all 300 steps)", "no-effusion"),
]
COLUMNS = [("pixel AP", "pixel_AUPRC"), ("pixel AUROC", "pixel_AUROC"),
           ("ideal Dice (oracle)", "pixel_ideal_Dice_oracle"), ("Dice @ val. best", "pixel_Dice@valDice"),
           ("Dice @ 5 % FPR", "pixel_Dice@fpr5"), ("per-volume Dice @ 5 % FPR", "volume_Dice_mean@fpr5"),
           ("image AUROC", "image_AUROC")]


def medcfx(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "medcfx", *map(str, args)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def cell(report: dict, key: str) -> str:
    v = report["metrics"].get(key)
    if v is None:
        return "n/a"
    ci = report["intervals"].get(key, {})
    if ci.get("ci_low") is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"


def model_ref(cmd: list, env: dict) -> str | None:
    """The versioned reference (``restoration-demo:2``) that the row's ``--model`` resolves to now; None without."""
    if "--model" not in cmd:
        return None
    shown = subprocess.run([sys.executable, "-m", "medcfx", "models", "show", cmd[cmd.index("--model") + 1], "--json"],
                           env=env, check=True, capture_output=True, text=True)
    return json.loads(shown.stdout)["ref"]


def earlier_row(out: Path, ref: str | None, max_slices: int) -> tuple[dict | None, float | None]:
    """(report, minutes) of an earlier run of the row in ``out`` when it scored the same model version on the
    same slices (its ``row.json`` says so); (None, None) otherwise, so a re-bundled model is evaluated again."""
    try:
        row = json.loads((out / "row.json").read_text())
        rep = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None, None
    if row.get("model") != ref or row.get("max_slices") != max_slices or (ref and rep.get("model") != ref):
        return None, None
    return rep, row["minutes"]


def demo_sets(work: Path, kind: str, sizes, env) -> tuple[Path, Path]:
    """W/KIND-val and W/KIND-test made by ``medcfx data demo KIND`` when missing (``sizes``: (cases, seed) of
    each)."""
    out = (work / f"{kind}-val", work / f"{kind}-test")
    for folder, (cases, seed) in zip(out, sizes):
        if not folder.exists():
            medcfx(["data", "demo", kind, "--out", folder, "--cases", cases, "--seed", seed], env)
    return out


def chest_rows(args, env) -> list[str]:
    """mediffusion-demo's difference maps, per target: calibrated on W/chest-val, scored on W/chest-test."""
    val, test = demo_sets(args.work, "chest", ((200, 2), (400, 1)), env)
    lines = []
    for label, target in CHEST_ROWS:
        if args.only and args.only not in label:
            continue
        t0 = time.perf_counter()
        out = args.work / f"eval-mediffusion-{target}"
        medcfx(["calibrate", "mediffusion-demo:1", "--data", val, "--target", target, "--cf-images", args.chest_images],
               env)
        shown = subprocess.run([sys.executable, "-m", "medcfx", "models", "show", "mediffusion-demo", "--json"],
                               env=env, check=True, capture_output=True, text=True)
        ref = json.loads(shown.stdout)["ref"]  # the newest version: the calibration just stored
        medcfx(["evaluate", "mediffusion", "--model", ref, "--data", test, "--localise-images", args.chest_images,
                "--cf-images", 0, "--device", "cpu", "--out", out], env)
        rep = json.loads((out / "localisation" / "metrics.json").read_text())
        minutes = (time.perf_counter() - t0) / 60
        lines.append(f"| {label} | " + " | ".join(cell(rep, k) for _, k in COLUMNS)
                     + f" | {rep['images']} ({rep['positive_images']} with the finding) | {minutes:.1f} |")
        print(lines[-1], flush=True)
    return lines


def chest_text(args, lines: list[str]) -> str:
    head = ("| mediffusion-demo difference map | " + " | ".join(c for c, _ in COLUMNS).replace("per-volume", "per-image")
            + " | test images | minutes |\n|" + "---|" * (len(COLUMNS) + 3) + "\n")
    return (f"Chest radiographs (`medcfx data demo chest`, 128 px, the model works at 64 px): `mediffusion-demo`'s "
            f"difference maps |counterfactual - input| of one removal target, calibrated on the first "
            f"{args.chest_images} usable images of `chest-val` (200 images, seed 2; `medcfx calibrate --target T "
            f"--cf-images {args.chest_images}`) and scored on the first {args.chest_images} of `chest-test` (400, "
            f"seed 1; `medcfx evaluate mediffusion --localise-images {args.chest_images}`): lesion = the finding's "
            f"box, every pixel of an image without the finding healthy; image score = the largest difference; "
            f"intervals over images.\n\n" + head + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-slices", type=int, default=24, help="scored slices per case (0: all)")
    ap.add_argument("--only", default="", help="evaluate only rows whose label contains this")
    ap.add_argument("--chest-images", type=int, default=48,
                    help="validation and test images of each mediffusion row (0: no chest table)")
    ap.add_argument("--write-docs", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "MEDCFX_HOME": str(args.work / "home"), "MEDCFX_CACHE": str(args.work / "cache")}
    val, test = demo_sets(args.work, "brain", ((4, 11), (8, 12)), env)
    lines = []
    for label, cmd in ROWS:
        if args.only and args.only not in label:
            continue
        out = args.work / ("eval-" + cmd[0])
        ref = model_ref(cmd, env)
        rep, minutes = earlier_row(out, ref, args.max_slices)
        if rep is None:
            t0 = time.perf_counter()
            medcfx(["evaluate", *cmd, "--data", test, "--val", val, "--max-slices", args.max_slices, "--device",
                    "cpu", "--out", out], env)
            rep = json.loads((out / "metrics.json").read_text())
            minutes = (time.perf_counter() - t0) / 60
            (out / "row.json").write_text(json.dumps({"model": ref, "max_slices": args.max_slices, "minutes": minutes}))
        lines.append(f"| {label} | " + " | ".join(cell(rep, k) for _, k in COLUMNS)
                     + f" | {rep['counts']['pixels']} | {minutes:.1f} |")
        print(lines[-1], flush=True)
    chest = chest_rows(args, env) if args.chest_images else []
    head = ("| method | " + " | ".join(c for c, _ in COLUMNS) + " | scored voxels | minutes |\n|"
            + "---|" * (len(COLUMNS) + 3) + "\n")
    sections = []
    if lines:
        sections.append(("operating-points", "Operating points: calibrated vs oracle Dice",
                         f"Demo brains (`medcfx data demo brain`, {grid_text(test)}): thresholds calibrated on "
                         f"`brain-val` ({case_count(val)} cases, seed 11), scored on `brain-test` ({case_count(test)} "
                         f"cases, seed 12), {args.max_slices or 'all'} slices per case spread evenly, on each input's "
                         f"own grid inside its foreground; value [95 % percentile-bootstrap interval over the test "
                         f"cases, 1000 resamples, seed 0]. Machine: {platform.machine()}, {os.cpu_count()} CPU(s), "
                         f"Python {platform.python_version()}; minutes: wall time of the row (calibration and test), on "
                         f"a machine shared with other jobs, so not a speed figure (docs/speed.md has those).\n\n"
                         + head + "\n".join(lines)
                         + f"\n\nReproduce: `python benchmarks/operating_points.py --work W --max-slices "
                           f"{args.max_slices} --chest-images 0 --write-docs docs/benchmarks.md`\n"))
    if chest:
        sections.append(("operating-points-chest", "Operating points of mediffusion's difference maps (chest demo)",
                         chest_text(args, chest) + f"\n\nReproduce: `python benchmarks/operating_points.py --work W "
                         f"--only mediffusion --chest-images {args.chest_images} --write-docs docs/benchmarks.md`\n"))
    for marker, title, text in sections:
        if args.write_docs:
            write_section(args.write_docs, marker, f"## {title} (`benchmarks/operating_points.py`)\n\n{text}")
        else:
            print(text)


if __name__ == "__main__":
    main()
