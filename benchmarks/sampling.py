#!/usr/bin/env python
"""Counterfactual sampling speed: the authors' loop versus medcfx's paths, side by side in one run.

    python benchmarks/sampling.py [--batches 1,8] [--quick] [--demo-model REF --test DIR]

Network: the sanchez paper preset (4x64x64, 27.2M parameters, 22.9 GFLOP per forward) with fixed,
deterministic weights (seed 0, perturbed so the output layers are not zero). Loop: L = 75 of 100 DDIM steps,
w = 3, dynamic normalisation (99%). Paths:

- reference: the authors' sampling loop: two separate forward passes per guided step, fp32 eager, NCHW;
- batched: both CFG branches in one forward of 2B (medcfx's default);
- + channels_last; + bf16 autocast; + torch.compile (when it compiles here); onnxruntime (CPU provider);
- reduced steps: 50 and 25 respaced steps (L = 75% of them) with bf16, and with DPM-Solver++(2M) (same
  number of network calls per step as DDIM) through onnxruntime and bf16.

Reported per path and batch size: seconds per slice, achieved GFLOP/s, max |heatmap - reference heatmap|.
With --demo-model/--test, the ideal Dice of the reduced-step decodes is measured on the demo test set with
the trained demo model (its own preset) through `medcfx evaluate`, and the peak RSS of `medcfx explain` at
batch 8 for 8 and 32 slices. Writes the "sampling" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

from medcfx.evaluation import flat_metrics
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def paper_unet():
    from medcfx.nn import UNet
    from medcfx_sanchez.networks import PAPER_NETWORK

    torch.manual_seed(0)
    unet = UNet(PAPER_NETWORK).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--quick", action="store_true", help="10 steps instead of 100 (smoke test of the script)")
    ap.add_argument("--skip", default="",
                    help="';'-separated substrings of path names to skip (e.g. compile); NAME@B skips it at batch B only")
    ap.add_argument("--demo-model", default=None)
    ap.add_argument("--test", type=Path, default=None)
    ap.add_argument("--max-slices", type=int, default=96)
    ap.add_argument("--work", type=Path, default=Path("bench-sampling"), help="evaluations kept (and reused) here")
    ap.add_argument("--dice-only", action="store_true", help="only run the ideal-Dice evaluations (no timing)")
    ap.add_argument("--no-docs", action="store_true", help="print the rows only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.dice_only:
        demo_dice(args)
        return

    from medcfx.bench import SamplingPath, example_batch, forwards_per_slice, time_path
    from medcfx.diffusion import Schedule
    from medcfx.export import OnnxDenoiser, export_unet
    from medcfx.nn.flops import count_flops

    unet = paper_unet()
    schedule = Schedule.create("linear", 1000)
    steps = 10 if args.quick else 100
    gflop = count_flops(unet, unet.onnx_inputs(1)[1]) / 1e9
    tmp = Path(tempfile.mkdtemp())
    export_unet(unet, tmp / "paper.onnx")
    onnx = OnnxDenoiser(tmp / "paper.onnx")
    skip = [tuple(s.split("@")) if "@" in s else (s, None) for s in args.skip.split(";") if s]
    paths = [SamplingPath("reference (2 passes, fp32, NCHW)", batched_cfg=False),
             SamplingPath("batched cfg, fp32"),
             SamplingPath("batched cfg, channels_last", channels_last=True),
             SamplingPath("batched cfg, bf16 autocast", bf16=True),
             SamplingPath("batched cfg, bf16 + channels_last", bf16=True, channels_last=True),
             SamplingPath("torch.compile, fp32", compile=True),
             SamplingPath("onnxruntime cpu, fp32", onnx=onnx),
             SamplingPath("onnxruntime cpu, 2 passes", onnx=onnx, batched_cfg=False),
             SamplingPath(f"bf16, {steps // 2} steps", bf16=True, steps=steps // 2),
             SamplingPath(f"bf16, {steps // 4} steps", bf16=True, steps=steps // 4),
             SamplingPath(f"onnxruntime cpu, dpm++2m {steps // 2} steps", onnx=onnx, steps=steps // 2,
                          solver="dpm++2m"),
             SamplingPath(f"onnxruntime cpu, dpm++2m {steps * 2 // 5} steps", onnx=onnx, steps=steps * 2 // 5,
                          solver="dpm++2m"),
             SamplingPath(f"onnxruntime cpu, dpm++2m {steps // 4} steps", onnx=onnx, steps=steps // 4,
                          solver="dpm++2m"),
             SamplingPath(f"bf16, dpm++2m {steps // 4} steps", bf16=True, steps=steps // 4, solver="dpm++2m")]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = example_batch(unet, batch)
        ref_maps = None
        for p in paths:
            if any(s in p.name and (b is None or int(b) == batch) for s, b in skip):
                continue
            n_fwd = forwards_per_slice(p.steps or steps, 0.75, True)
            try:
                sec, maps = time_path(unet, schedule, x, p, steps=steps)
            except Exception as exc:  # e.g. torch.compile without a working compiler
                print(f"{p.name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
                continue
            ref_maps = maps if ref_maps is None else ref_maps
            row = {"path": p.name, "batch": batch, "s_per_slice": sec, "gflop_per_s": gflop * n_fwd / sec,
                   "max_heatmap_diff": float((maps - ref_maps).abs().max()), "forwards": n_fwd}
            rows.append(row)
            print(json.dumps(row), flush=True)
    dice = demo_dice(args) if args.demo_model and args.test else []
    rss = explain_rss(args) if args.demo_model else []
    if not args.no_docs:
        write_docs(rows, dice, rss, gflop, steps, args)


DICE_RUNS = [(100, False, "ddim"), (100, True, "ddim"), (50, False, "ddim"), (50, True, "ddim"), (25, True, "ddim"),
             (50, False, "dpm++2m"), (40, False, "dpm++2m"), (25, False, "dpm++2m"), (25, True, "dpm++2m")]


def demo_dice(args) -> list[dict]:
    """Ideal Dice of the demo model at 100, 50 and 25 steps, DDIM and DPM-Solver++(2M) (evaluations kept in
    --work and reused: accuracy does not depend on machine load, so they may run before the quiet timing run;
    the onnx backend agrees with torch fp32 to 3e-4 in the heatmap, so fp32 rows stand for both)."""
    out = []
    for steps, bf16, solver in DICE_RUNS:
        d = args.work / f"dice-{steps}{'-bf16' if bf16 else ''}{'' if solver == 'ddim' else '-' + solver}"
        cmd = [sys.executable, "-m", "medcfx", "evaluate", "sanchez", "--model", args.demo_model, "--data",
               str(args.test), "--max-slices", str(args.max_slices), "--steps", str(steps),
               *(["--bf16"] if bf16 else []), *(["--solver", solver] if solver != "ddim" else []), "--out", str(d)]
        if not (d / "metrics.json").exists():
            subprocess.run(cmd, check=True, capture_output=True)
        m = flat_metrics(json.loads((d / "metrics.json").read_text()))
        out.append({"steps": steps, "bf16": bf16, "solver": solver, "ideal_Dice": m["pixel_ideal_Dice"],
                    "AUPRC": m["pixel_AUPRC"],
                    "command": " ".join(cmd[2:-2])})
        print(json.dumps(out[-1]), flush=True)
    return out


def explain_rss(args) -> list[dict]:
    """Peak RSS of `medcfx explain` at batch 8 on a case of 8 and of 32 slices (flat in the slice count)."""
    from medcfx.demo import make_demo

    out = []
    with tempfile.TemporaryDirectory() as d:
        for n in (8, 32):
            data = make_demo("brain", Path(d) / f"b{n}", cases=1, seed=5, shape=(120, 120, n + 4),
                             tumour_free_fraction=0.0)
            case = next(p for p in data.iterdir() if p.is_dir())
            cmd = [sys.executable, "-c",
                   "import resource,subprocess,sys;"
                   "subprocess.run(sys.argv[1:],check=True,capture_output=True);"
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
                   sys.executable, "-m", "medcfx", "explain", str(case), "--model", args.demo_model,
                   "--batch-size", "8", "--steps", "10", "--out", str(Path(d) / f"o{n}")]
            t0 = time.time()
            kb = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
            slices = len(list((Path(d) / f"o{n}" / case.name / "panels").iterdir()))
            out.append({"slices": slices, "peak_rss_mb": round(kb / 1024), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(out[-1]), flush=True)
    return out


def write_docs(rows, dice, rss, gflop, steps, args) -> None:
    def ratio(r):
        ref = next(q for q in rows if q["batch"] == r["batch"])
        return ref["s_per_slice"] / r["s_per_slice"]

    lines = ["| path | batch | s / slice | GFLOP/s | speed-up vs reference | max heatmap diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['batch']} | {r['s_per_slice']:.2f} | {r['gflop_per_s']:.0f} | "
                     f"{ratio(r):.2f}x | {r['max_heatmap_diff']:.1e} |")
    dl = ""
    if dice:
        dl = ("\nReduced-step decodes with the trained demo model on the demo test set (`medcfx evaluate`):\n\n"
              "| steps | solver | precision | ideal Dice | AUPRC | command |\n|---|---|---|---|---|---|\n"
              + "".join(f"| {d['steps']} | {d['solver']} | {'bf16' if d['bf16'] else 'fp32'} | "
                        f"{d['ideal_Dice']:.4f} | "
                        f"{d['AUPRC']:.4f} | `{d['command']}` |\n"
                        for d in dice))
    rl = ""
    if rss:
        rl = ("\nPeak RSS of `medcfx explain` at batch 8 (demo model): "
              + ", ".join(f"{r['slices']} slices: {r['peak_rss_mb']} MB" for r in rss) + ".\n")
    cmd = "python benchmarks/sampling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = f"""<!-- sampling:start -->
## Counterfactual sampling speed (issue: ONNX export and fast sampling)

Paper preset network ({gflop:.1f} GFLOP per forward), fixed seeded weights, L = 75% of {steps} DDIM steps,
w = 3, dynamic normalisation; this machine ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()}
threads), all paths in one run. "max heatmap diff" is against the reference path at the same batch size.

{chr(10).join(lines)}
{dl}{rl}
Reproduce: `{cmd}`
<!-- sampling:end -->"""
    bench = ROOT / "docs" / "benchmarks.md"
    text = bench.read_text() if bench.exists() else "# Benchmarks\n"
    a, b = "<!-- sampling:start -->", "<!-- sampling:end -->"
    text = (text[: text.index(a)] + section + text[text.index(b) + len(b):]) if a in text else text.rstrip() + "\n\n" + section + "\n"
    bench.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
