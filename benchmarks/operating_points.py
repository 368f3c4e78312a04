"""Operating points on the demo brains: calibrated Dice beside the oracle Dice, with 95 % CIs over cases.

Every row runs the real CLI: ``medcfx evaluate METHOD [--model REF] --data TEST --val VAL`` calibrates the
thresholds on the validation cases (5 % FPR on healthy foreground voxels; the best validation Dice) with the
method's own settings, then scores the test cases on each input's own grid inside its foreground
(:mod:`medcfx.scoring`), with percentile-bootstrap intervals over cases (1000 resamples, seed 0).

Usage::

    python benchmarks/operating_points.py --work W [--max-slices 24] [--write-docs docs/benchmarks.md]

creates ``W/brain-val`` (4 cases, seed 11) and ``W/brain-test`` (8 cases, seed 12) with ``medcfx data demo
brain`` when missing, evaluates the rows below and prints (or writes between the ``operating-points``
markers of the docs file) one markdown table.
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

ROWS = [  # (label, evaluate arguments)
    ("threshold (FLAIR intensity)", ["threshold"]),
    ("sanchez-demo (cfg w=3, L=0.75, 100 DDIM steps)", ["sanchez", "--model", "sanchez-demo", "--sampler", "paper"]),
    ("restoration-demo (1 - SSIM, 50 steps)", ["restoration", "--model", "restoration-demo"]),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-slices", type=int, default=24, help="scored slices per case (0: all)")
    ap.add_argument("--only", default="", help="evaluate only rows whose label contains this")
    ap.add_argument("--write-docs", type=Path)
    args = ap.parse_args()
    env = {**os.environ, "MEDCFX_HOME": str(args.work / "home"), "MEDCFX_CACHE": str(args.work / "cache")}
    val, test = args.work / "brain-val", args.work / "brain-test"
    for folder, cases, seed in ((val, 4, 11), (test, 8, 12)):
        if not folder.exists():
            medcfx(["data", "demo", "brain", "--out", folder, "--cases", cases, "--seed", seed], env)
    lines = []
    for label, cmd in ROWS:
        if args.only and args.only not in label:
            continue
        out = args.work / ("eval-" + cmd[0])
        t0 = time.perf_counter()
        medcfx(["evaluate", *cmd, "--data", test, "--val", val, "--max-slices", args.max_slices, "--device", "cpu",
                "--out", out], env)
        rep = json.loads((out / "metrics.json").read_text())
        minutes = (time.perf_counter() - t0) / 60
        lines.append(f"| {label} | " + " | ".join(cell(rep, k) for _, k in COLUMNS)
                     + f" | {rep['counts']['pixels']} | {minutes:.1f} |")
        print(lines[-1], flush=True)
    head = ("| method | " + " | ".join(c for c, _ in COLUMNS) + " | scored voxels | minutes |\n|"
            + "---|" * (len(COLUMNS) + 3) + "\n")
    text = (f"Demo brains (`medcfx data demo brain`, 120x120x78 at 2 mm): thresholds calibrated on `brain-val` "
            f"(4 cases, seed 11), scored on `brain-test` (8 cases, seed 12), {args.max_slices or 'all'} slices "
            f"per case spread evenly, on each input's own grid inside its foreground; value [95 % percentile-"
            f"bootstrap interval over the 8 cases, 1000 resamples, seed 0]. Machine: {platform.machine()}, "
            f"{os.cpu_count()} CPU(s), Python {platform.python_version()}; minutes: wall time of the row (calibration "
            f"and test), on a machine shared with other jobs, so not a speed figure (docs/speed.md has those).\n\n" + head + "\n".join(lines)
            + f"\n\nReproduce: `python benchmarks/operating_points.py --work W --max-slices {args.max_slices}"
            f" --write-docs docs/benchmarks.md`\n")
    if args.write_docs:
        doc = args.write_docs.read_text()
        start, end = "<!-- operating-points:start -->", "<!-- operating-points:end -->"
        block = f"{start}\n## Operating points: calibrated vs oracle Dice (`benchmarks/operating_points.py`)\n\n{text}{end}"
        if start in doc:
            doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        args.write_docs.write_text(doc)
    else:
        print(text)


if __name__ == "__main__":
    main()
