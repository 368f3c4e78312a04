#!/usr/bin/env python
"""diffae on the synthetic vertebra demo: a table shaped like Atad et al. (2024) Table 3.

    python benchmarks/diffae_demo.py [--work runs/diffae-bench] [--model diffae-demo | --train]
                                     [--write-docs]

Steps (every one a real `medcfx` command, printed before it runs):

1. data: `medcfx data demo vertebra --out WORK/vert-train --cases 600 --seed 0` (fracture label for every
   row, Genant grade for ~30 %: the paper's "few graded samples"); the test set is 300 images of seed 1
   with every row graded (`make_demo(..., graded_fraction=1.0)`, the CLI has no flag for it).
2. autoencoder: the bundled `diffae-demo` (default) or, with --train, `medcfx train diffae --data
   WORK/vert-train --preset demo` (unsupervised, labels unused).
3. graders: `medcfx train diffae-grader --model AE --data WORK/vert-train` (linear calibration) and the
   same with `--set grader.degree=3`.
4. `medcfx evaluate diffae --model GRADER --data WORK/vert-test` (the degree-1 grader with the CNN baseline
   and the reconstruction error; the degree-3 grader without them).

The markdown table goes to WORK/table.md, and with --write-docs into docs/benchmarks.md between the
markers <!-- diffae:start --> / <!-- diffae:end -->. Numbers are as measured on this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDCFX = [str(Path(sys.executable).parent / "medcfx")] if (Path(sys.executable).parent / "medcfx").exists() \
    else [sys.executable, "-m", "medcfx"]


def run(args, env, log) -> float:
    shown = "medcfx " + " ".join(shlex.quote(str(a)) for a in args)
    print(f"$ {shown}", flush=True)
    log.append(shown)
    t0 = time.perf_counter()
    subprocess.run(MEDCFX + [str(a) for a in args], env=env, check=True)
    return time.perf_counter() - t0


def fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "diffae-bench")
    ap.add_argument("--model", default="diffae-demo", help="autoencoder to use (ignored with --train)")
    ap.add_argument("--train", action="store_true", help="train the autoencoder with --preset demo first")
    ap.add_argument("--baseline-steps", type=int, default=600)
    ap.add_argument("--recon-images", type=int, default=16)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MEDCFX_HOME", str(work / "home"))
    env.setdefault("MEDCFX_CACHE", str(work / "home" / "cache"))
    env.setdefault("OMP_NUM_THREADS", "1")
    log: list[str] = []
    seconds = {}
    train, test = work / "vert-train", work / "vert-test"
    if not train.exists():
        run(["data", "demo", "vertebra", "--out", train, "--cases", 600, "--seed", 0], env, log)
    if not test.exists():
        from medcfx.demo import make_demo

        print("$ python -c \"make_demo('vertebra', 'vert-test', cases=300, seed=1, graded_fraction=1.0)\"")
        log.append("python -c \"from medcfx.demo import make_demo; "
                   "make_demo('vertebra', 'vert-test', cases=300, seed=1, graded_fraction=1.0)\"")
        make_demo("vertebra", test, cases=300, seed=1, graded_fraction=1.0)
    ae = args.model
    if args.train:
        seconds["train autoencoder"] = run(["train", "diffae", "--data", train, "--preset", "demo", "--name",
                                            "diffae-bench", "--runs-dir", work / "runs"], env, log)
        ae = "diffae-bench"
    seconds["train grader"] = run(["train", "diffae-grader", "--model", ae, "--data", train, "--name",
                                   "bench-grader"], env, log)
    run(["train", "diffae-grader", "--model", ae, "--data", train, "--name", "bench-grader-deg3",
         "--set", "grader.degree=3"], env, log)
    seconds["evaluate"] = run(["evaluate", "diffae", "--model", "bench-grader", "--data", test, "--out",
                               work / "eval", "--baseline-steps", args.baseline_steps, "--recon-images",
                               args.recon_images], env, log)
    run(["evaluate", "diffae", "--model", "bench-grader-deg3", "--data", test, "--out", work / "eval-deg3",
         "--baseline=false", "--recon-images", 0], env, log)
    # the same grader with scikit-learn's default C = 1 instead of the cross-validated choice
    run(["train", "diffae-grader", "--model", ae, "--data", train, "--name", "bench-grader-c1",
         "--set", "grader.svm_C=1", "--set", "grader.logreg_C=1"], env, log)
    run(["evaluate", "diffae", "--model", "bench-grader-c1", "--data", test, "--out", work / "eval-c1",
         "--baseline=false", "--recon-images", 0], env, log)
    m1 = json.loads((work / "eval" / "metrics.json").read_text())
    m3 = json.loads((work / "eval-deg3" / "metrics.json").read_text())
    mc = json.loads((work / "eval-c1" / "metrics.json").read_text())

    lines = ["| Model | Encoder | Classifier | C | Calibration | Detection (AUC) | Detection (F1) | Grading (macro-F1) "
             "| Grading (MAE) |", "|---|---|---|---|---|---|---|---|---|"]
    for m, cal, how in ((m1, "linear (deg=1)", "cv"), (m3, "polynomial (deg=3)", "cv"), (mc, "linear (deg=1)", "fixed")):
        for r in m["rows"]:
            if r["classifier"] == "CNN":
                continue
            lines.append(f"| DAE | DAE | {r['classifier']} | {r.get('C', float('nan')):g} ({how}) | {cal} | "
                         f"{fmt(r['detection_AUROC'])} | {fmt(r['detection_F1'])} | {fmt(r['grading_macro_F1'])} | "
                         f"{fmt(r['grading_MAE'])} |")
    for r in m1["rows"]:
        if r["classifier"] == "CNN":
            lines.append(f"| small CNN, baseline (end-to-end, {args.baseline_steps} steps) | - | - | - | - | "
                         f"{fmt(r['detection_AUROC'])} | {fmt(r['detection_F1'])} | {fmt(r['grading_macro_F1'])} | "
                         f"{fmt(r['grading_MAE'])} |")
    rows = m1["rows"][0]
    table = "\n".join(lines)
    recon = (f"Reconstruction of {m1.get('reconstruction_n', 0)} test images (DDIM inversion "
             f"{m1['encode_steps']} steps, decoding {m1['decode_steps']} steps, images in [-1, 1]): "
             f"MSE {m1.get('reconstruction_mse', float('nan')):.5f}, MAE {m1.get('reconstruction_mae', float('nan')):.4f}, "
             f"PSNR {m1.get('reconstruction_psnr_db', float('nan')):.1f} dB.")
    rel = m1.get("semantic_reliance") or {}
    recon += (" Reliance of the denoiser on z_sem (eps-MSE with another image's code / with its own code; 1 = "
              "ignored): " + ", ".join(f"t={t}: {v[2]:.3f}" for t, v in rel.items()) + ".") if rel else ""
    cvn = m1.get("code_vs_noise") or {}
    recon += (f" What decides a decoded image (fresh x_T, {cvn['steps']} DDIM steps, {cvn['images']} test codes): "
              f"changing z_sem moves it by {cvn['code']:.3f}, changing x_T by {cvn['noise']:.3f} (ratio "
              f"{cvn['ratio']:.2f}; see docs/methods/diffae.md).") if cvn else ""
    counts = (f"Test set: {rows['detection_n']} images with a detection target ({rows.get('detection_positive', '?')} "
              f"positive = G2-G3, negatives = G0; G1 excluded), {rows['grading_n']} graded images.")
    body = (f"Autoencoder `{m1['autoencoder']}`, graders trained on `vert-train` (600 images, seed 0), evaluated "
            f"on `vert-test` (300 images, seed 1). Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n\n"
            + table + "\n\n" + counts + "\n\n" + recon + "\n\nCommands:\n\n```\n" + "\n".join(log) + "\n```\n")
    (work / "table.md").write_text(body)
    print("\n" + body)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", body)


def write_section(path: Path, body: str) -> None:
    """Create or replace this benchmark's block between its markers (other sections are left alone)."""
    start, end = "<!-- diffae:start -->", "<!-- diffae:end -->"
    block = f"{start}\n## diffae: vertebra demo (Atad et al. 2024, Table 3 layout)\n\n{body}{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"wrote the diffae section of {path}")


if __name__ == "__main__":
    main()
