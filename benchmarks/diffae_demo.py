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
3. graders, for every seed S of --seeds (default 0,1,2): a training set of its own (600 images of data
   seed 0 for S = 0, else 100 + S; never the test set's seed 1), `medcfx train diffae-grader --model AE
   --data TRAIN_S --seed S` (linear calibration, C by cross-validation), the same with
   `--set grader.degree=3` and with C fixed at 1. With one training set the linear graders barely depend
   on their seed (the cross-validation chooses the same C); the spread over seeds is mostly that of the
   labelled sample, as when a user labels another few hundred images.
4. `medcfx evaluate diffae --model GRADER --data WORK/vert-test --seed S` (the degree-1 grader with the CNN
   baseline of that seed, the first seed also with the reconstruction error; the others without them).
   The table gives mean +- sd over the seeds.

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

from common import write_section

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


def mean_sd(values) -> str:
    """"mean +- sd" (sample sd, ddof 1) of the finite values; one value alone without the spread."""
    v = [x for x in values if x is not None and x == x]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{m:.2f} +- {sd:.2f}"


def train_set(work: Path, seed: int, env, log) -> Path:
    """The training set of a seed: 600 demo vertebrae of data seed 0 for seed 0, else 100 + seed (the test set
    is data seed 1, which no training set may share)."""
    data_seed = 0 if seed == 0 else 100 + seed
    path = work / ("vert-train" if seed == 0 else f"vert-train-s{seed}")
    args = ["data", "demo", "vertebra", "--out", path, "--cases", 600, "--seed", data_seed]
    if path.exists():  # made by an earlier run: the command is still part of the recipe
        log.append("medcfx " + " ".join(shlex.quote(str(a)) for a in args))
    else:
        run(args, env, log)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "diffae-bench")
    ap.add_argument("--model", default="diffae-demo", help="autoencoder to use (ignored with --train)")
    ap.add_argument("--train", action="store_true", help="train the autoencoder with --preset demo first")
    ap.add_argument("--baseline-steps", type=int, default=600)
    ap.add_argument("--recon-images", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2", help="grader seeds; the table gives mean +- sd over them")
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
    train, test = train_set(work, 0, env, log), work / "vert-test"
    log.append("python -c \"from medcfx.demo import make_demo; "
               "make_demo('vertebra', 'vert-test', cases=300, seed=1, graded_fraction=1.0)\"")
    if not test.exists():
        from medcfx.demo import make_demo

        print("$ " + log[-1])
        make_demo("vertebra", test, cases=300, seed=1, graded_fraction=1.0)
    ae = args.model
    if args.train:
        seconds["train autoencoder"] = run(["train", "diffae", "--data", train, "--preset", "demo", "--name",
                                            "diffae-bench", "--runs-dir", work / "runs"], env, log)
        ae = "diffae-bench"
    seeds = [int(k) for k in args.seeds.split(",")]
    evals: dict[str, list[dict]] = {"cv": [], "deg3": [], "fixed": []}
    for s in seeds:  # the seed draws the training set and seeds the grader and the CNN baseline
        t0 = time.perf_counter()
        train = train_set(work, s, env, log)
        for tag, extra in (("", []), ("-deg3", ["--set", "grader.degree=3"]),
                           ("-c1", ["--set", "grader.svm_C=1", "--set", "grader.logreg_C=1"])):
            run(["train", "diffae-grader", "--model", ae, "--data", train, "--name", f"bench-grader{tag}-s{s}",
                 "--seed", s, *extra], env, log)
        seconds[f"train graders (seed {s})"] = time.perf_counter() - t0
        first = s == seeds[0]
        seconds[f"evaluate (seed {s})"] = run(
            ["evaluate", "diffae", "--model", f"bench-grader-s{s}", "--data", test, "--out", work / f"eval-s{s}",
             "--seed", s, "--baseline-steps", args.baseline_steps, "--recon-images", args.recon_images if first else 0],
            env, log)
        for tag, key in (("-deg3", "deg3"), ("-c1", "fixed")):
            run(["evaluate", "diffae", "--model", f"bench-grader{tag}-s{s}", "--data", test, "--out",
                 work / f"eval{tag}-s{s}", "--seed", s, "--baseline=false", "--recon-images", 0], env, log)
            evals[key].append(json.loads((work / f"eval{tag}-s{s}" / "metrics.json").read_text()))
        evals["cv"].append(json.loads((work / f"eval-s{s}" / "metrics.json").read_text()))
    m1 = evals["cv"][0]
    (work / "seeds.json").write_text(json.dumps(evals, indent=1, default=str))

    metrics = ("detection_AUROC", "detection_F1", "grading_macro_F1", "grading_MAE")
    lines = ["| Model | Encoder | Classifier | C | Calibration | Detection (AUC) | Detection (F1) | Grading (macro-F1) "
             "| Grading (MAE) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, cal, how in (("cv", "linear (deg=1)", "cv"), ("deg3", "polynomial (deg=3)", "cv"),
                          ("fixed", "linear (deg=1)", "fixed")):
        for clf in ("SVM", "LR"):
            rs = [r for m in evals[key] for r in m["rows"] if r["classifier"] == clf]
            Cs = sorted({f"{r.get('C', float('nan')):g}" for r in rs})
            lines.append(f"| DAE | DAE | {clf} | {'/'.join(Cs)} ({how}) | {cal} | "
                         + " | ".join(mean_sd([r[k] for r in rs]) for k in metrics) + " |")
    rs = [r for m in evals["cv"] for r in m["rows"] if r["classifier"] == "CNN"]
    lines.append(f"| small CNN, baseline (end-to-end, {args.baseline_steps} steps) | - | - | - | - | "
                 + " | ".join(mean_sd([r[k] for r in rs]) for k in metrics) + " |")
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
    body = (f"Autoencoder `{m1['autoencoder']}`, graders trained on a `vert-train` set, evaluated "
            f"on `vert-test` (300 images, seed 1); mean +- sd over seeds {args.seeds}: seed S draws the training set "
            f"(600 images of data seed 0 for S = 0, else 100 + S) and seeds the grader (cross-validation folds that "
            f"choose C, LinearSVC's coordinate order) and the CNN baseline (initialisation, batches); the "
            f"autoencoder is one. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n\n"
            + table + "\n\n" + counts + "\n\n" + recon + "\n\nCommands:\n\n```\n" + "\n".join(log) + "\n```\n")
    (work / "table.md").write_text(body)
    print("\n" + body)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "diffae",
                      "## diffae: vertebra demo (Atad et al. 2024, Table 3 layout)\n\n" + body)


if __name__ == "__main__":
    main()
