#!/usr/bin/env python
"""How strong is the thresholding baseline, and which step makes it so? (issue 18: an honest yardstick)

    python benchmarks/threshold_study.py --work W --val VAL --test TEST [--max-slices 12] [--write-docs docs/benchmarks.md]

Runs ``medcfx evaluate threshold`` with the baseline's steps added one at a time, from medcfx's older
baseline (each scan / its 99th foreground percentile, clipped to [0, 1], slices resized to 64 px and the map
brought back) to the current default (native resolution, / the median foreground intensity without clip,
5 x 5 median filter), then ``--channel auto``. Every variant is scored on the validation cases (what a user
may look at to choose) and on the test cases with thresholds calibrated on the validation cases, on each
input's own grid inside its foreground, like every method. Writes the ``threshold-study`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import case_count, grid_text

OLD = ["--set", "preprocess.size=64", "--set", "preprocess.percentile=99", "--set", "preprocess.clip=true"]
VARIANTS = [  # (label, evaluate arguments); cumulative
    ("medcfx's older baseline: FLAIR / 99th percentile, clipped, at 64 px", OLD + ["--median-filter", "1"]),
    ("+ native resolution", ["--set", "preprocess.percentile=99", "--set", "preprocess.clip=true",
                             "--median-filter", "1"]),
    ("+ / median foreground intensity, no clip", ["--median-filter", "1"]),
    ("+ 5 x 5 median filter (the default)", []),
    ("+ --channel auto (best validation pixel AP)", ["--channel", "auto"]),
]


def run(args: list, env: dict) -> None:
    print("$ medcfx " + " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "medcfx", *map(str, args)], env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--max-slices", type=int, default=12)
    ap.add_argument("--write-docs", type=Path)
    a = ap.parse_args()
    env = {**os.environ, "MEDCFX_HOME": str(a.work / "home"), "MEDCFX_CACHE": str(a.work / "cache")}
    common = ["--max-slices", a.max_slices, "--device", "cpu", "--n-resamples", 1000]
    rows = []
    for i, (label, extra) in enumerate(VARIANTS):
        val_out, test_out = a.work / f"val-{i}", a.work / f"test-{i}"
        if not (val_out / "metrics.json").exists():
            run(["evaluate", "threshold", "--data", a.val, "--out", val_out, *common,
                 *([] if "auto" in extra else extra), *(["--channel", "flair"] if "auto" in extra else [])], env)
        if not (test_out / "metrics.json").exists():
            run(["evaluate", "threshold", "--data", a.test, "--val", a.val, "--out", test_out, *common, *extra], env)
        v = json.loads((val_out / "metrics.json").read_text())
        t = json.loads((test_out / "metrics.json").read_text())
        rows.append((label, v, t, extra))
        print(label, v["metrics"]["pixel_AUPRC"], t["metrics"]["pixel_AUPRC"], flush=True)
    text = docs_text(a, rows)
    if a.write_docs:
        doc = a.write_docs.read_text()
        start, end = "<!-- threshold-study:start -->", "<!-- threshold-study:end -->"
        block = f"{start}\n{text}{end}"
        doc = (doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]) if start in doc \
            else doc.rstrip("\n") + "\n\n" + block + "\n"
        a.write_docs.write_text(doc)
    print(text)


def docs_text(a, rows) -> str:
    def c(rep, key):
        v, ci = rep["metrics"].get(key), rep["intervals"].get(key, {})
        if v is None:
            return "n/a"
        return f"{v:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" if ci.get("ci_low") is not None else f"{v:.3f}"

    head = ("| thresholding map | val. pixel AP | val. ideal Dice | test pixel AP | test ideal Dice (oracle) | "
            "test Dice @ val. best | test Dice @ 5 % FPR | test image AUROC |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {label} | {c(v, 'pixel_AUPRC')} | {c(v, 'pixel_ideal_Dice_oracle')} | {c(t, 'pixel_AUPRC')} | "
                   f"{c(t, 'pixel_ideal_Dice_oracle')} | {c(t, 'pixel_Dice@valDice')} | {c(t, 'pixel_Dice@fpr5')} | "
                   f"{c(t, 'image_AUROC')} |\n" for label, v, t, _ in rows)
    choice = rows[-1][2].get("channel_choice")
    chosen = ""
    if choice:
        aps = ", ".join(f"{k} {x:.3f}" for k, x in choice["validation_AP"].items())
        chosen = f"\n`--channel auto` chose `{rows[-1][2]['channel']}` (validation pixel AP {aps}).\n"
    cmds = "\n".join(f"medcfx evaluate threshold --data {a.test} --val {a.val} --max-slices {a.max_slices} "
                     + " ".join(map(str, extra)) for _, _, _, extra in rows)
    return f"""## The thresholding baseline, step by step (`benchmarks/threshold_study.py`)

Demo brains: `{a.val.name}` ({case_count(a.val)} cases) and `{a.test.name}` ({case_count(a.test)} cases,
{grid_text(a.test)}), {a.max_slices} slices per case spread evenly, scored on each input's own grid inside its
foreground; test thresholds calibrated on the validation cases; [95 % bootstrap interval over cases]. Each row
adds one step to the row above.

{head}{body}{chosen}
Reproduce: `python benchmarks/threshold_study.py --work W --val {a.val} --test {a.test} --max-slices {a.max_slices} --write-docs docs/benchmarks.md`

```
{cmds}
```
"""


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
