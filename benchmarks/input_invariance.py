"""The same demo case stored as users have it: does the heatmap stay the same?

Explains the bundled demo brain (``models/demo-inputs/brain/demo_case``) with the bundled ``sanchez-demo``
model as generated (RAS), re-stored in LPS and PIR voxel order (nibabel's ``as_reoriented``: the same world
image) and z-score normalised per modality over the brain (background left 0), and prints the voxel AUPRC of
each heatmap against the tumour mask in world space (after ``as_closest_canonical``), plus the largest
difference from the RAS heatmap.

    python benchmarks/input_invariance.py [--out /tmp/invariance]

The numbers are quoted in docs/data.md ("Reading real data").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from sklearn.metrics import average_precision_score

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "models" / "demo-inputs" / "brain" / "demo_case"


def restore(src: Path, dst: Path, codes: str | None) -> None:
    """Copy every file of a case re-stored in voxel order ``codes``, or z-scored when codes is None."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.nii.gz")):
        img = nib.load(str(f))
        if codes is not None:
            img = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(dst / f.name))
            continue
        x = np.asarray(img.get_fdata(), np.float64)
        if not f.name.endswith("_seg.nii.gz"):
            fg = x != 0
            x[fg] = (x[fg] - x[fg].mean()) / x[fg].std()
        nib.save(nib.Nifti1Image(x.astype(np.float32), img.affine), str(dst / f.name))


def canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/medcfx-invariance"))
    args = ap.parse_args()
    variants = {"RAS (as generated)": None, "LPS": "LPS", "PIR": "PIR", "z-scored": "z"}
    seg = canonical(CASE / "demo_case_seg.nii.gz") > 0
    exe = Path(sys.executable).parent / "medcfx"
    ref = None
    print("| storage | voxel AUPRC | max abs difference from RAS |\n| --- | --- | --- |")
    for label, codes in variants.items():
        src = CASE
        if codes is not None:
            src = args.out / label.split()[0] / "demo_case"
            restore(CASE, src, None if codes == "z" else codes)
        out = args.out / f"out-{label.split()[0]}"
        subprocess.run([str(exe), "explain", str(src), "--model", "sanchez-demo", "--out", str(out)], check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        heat = canonical(out / "demo_case" / "heatmap.nii.gz")
        ref = heat if ref is None else ref
        print(f"| {label} | {average_precision_score(seg.ravel(), heat.ravel()):.4f} | {np.abs(heat - ref).max():.2g} |")


if __name__ == "__main__":
    main()
