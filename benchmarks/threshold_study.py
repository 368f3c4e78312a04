#!/usr/bin/env python
"""Why is FLAIR thresholding weaker in the sanchez benchmark than on the raw demo volumes?

    python benchmarks/threshold_study.py --data /work/demo-data/brain-test

Best pooled Dice of ``FLAIR >= t`` against the whole tumour (brute force over every threshold,
``medcfx.demo.brain.best_threshold_dice``), with the preprocessing steps of the benchmark added one at a
time: (a) brain voxels, each scan divided by its median brain intensity (the measure of docs/data.md);
(b) every voxel, each scan divided by its 99th brain percentile and clipped to [0, 1] (the paper's
normalisation, ``medcfx.data.preprocess``; the clip alone changes nothing at full resolution); (c) as (b),
each axial slice then area-resized to 64 x 64 (the threshold baseline's model size) and bilinearly back to
128 x 128 (the evaluation size), masks nearest-resized.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medcfx.demo.brain import best_threshold_dice


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=128)
    args = ap.parse_args()
    rows = {"a": ([], []), "b": ([], []), "c": ([], [])}
    for case in sorted(p for p in args.data.iterdir() if p.is_dir()):
        f = np.asarray(nib.load(str(case / f"{case.name}_flair.nii.gz")).dataobj, dtype=np.float32)
        s = np.asarray(nib.load(str(case / f"{case.name}_seg.nii.gz")).dataobj) > 0
        brain = f > 0
        rows["a"][0].append(f[brain] / np.median(f[brain]))
        rows["a"][1].append(s[brain])
        u = np.clip(f / np.percentile(f[brain], 99), 0.0, 1.0)
        rows["b"][0].append(u.ravel())
        rows["b"][1].append(s.ravel())
        t = torch.from_numpy(u).permute(2, 0, 1)[:, None]
        lo = F.interpolate(t, size=(args.model_size,) * 2, mode="area")
        hi = F.interpolate(lo, size=(args.eval_size,) * 2, mode="bilinear", align_corners=False)
        m = F.interpolate(torch.from_numpy(s.astype(np.float32)).permute(2, 0, 1)[:, None],
                          size=(args.eval_size,) * 2, mode="nearest") > 0.5
        rows["c"][0].append(hi.numpy().ravel())
        rows["c"][1].append(m.numpy().ravel())
    labels = {"a": "brain voxels, FLAIR / median brain intensity",
              "b": "every voxel, FLAIR / 99th brain percentile, clipped to [0, 1]",
              "c": f"(b) at {args.model_size} px, scored at {args.eval_size} px"}
    print(f"{len(rows['a'][0])} cases of {args.data}")
    for k, (v, y) in rows.items():
        dice, thr = best_threshold_dice(np.concatenate(v), np.concatenate(y))
        print(f"({k}) {labels[k]}: best pooled Dice {dice:.3f} at {thr:.3f}")


if __name__ == "__main__":
    main()
