#!/usr/bin/env python
"""Counterfactual sampling speed: the authors' loop versus medcfx's paths, side by side in one run.

    python benchmarks/sampling.py [--batches 1,8] [--quick] [--demo-model REF --test DIR]

Network: the sanchez paper preset (4x64x64, 27.2M parameters, 22.9 GFLOP per forward) with fixed,
deterministic weights (seed 0, perturbed so the output layers are not zero). Loop: L = 75% of the steps,
w = 3, dynamic normalisation (99%). Paths:

- reference: the authors' sampling loop: 100 DDIM steps, two separate forward passes per guided step, fp32
  eager, NCHW;
- medcfx's paper loop (both CFG branches in one forward of 2B), with bf16 + channels_last, through
  onnxruntime (CPU provider);
- the fast sampler (`explain --sampler fast`, medcfx's default: DPM-Solver++(2M) at fewer steps, with its
  guidance interval) through torch and onnxruntime, and fewer steps / shorter guidance intervals beyond it.

Reported per path and batch size: UNet forwards per slice, seconds per slice, achieved GFLOP/s, max |heatmap -
reference heatmap|. With --demo-model/--test, the ideal Dice of each setting (DICE_RUNS) is measured on the demo
test set with the trained demo model through `medcfx evaluate`, and the peak RSS of `medcfx explain` and
`medcfx evaluate` at batch 8. Writes the "sampling" section of docs/benchmarks.md.
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
from pathlib import Path

import torch
from common import write_section

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
    ap.add_argument("--max-slices", type=int, default=12, help="scored slices per test case (evaluate's)")
    ap.add_argument("--work", type=Path, default=Path("bench-sampling"), help="evaluations kept (and reused) here")
    ap.add_argument("--dice-only", action="store_true", help="only run the ideal-Dice evaluations (no timing)")
    ap.add_argument("--no-docs", action="store_true", help="print the rows only; leave docs/benchmarks.md alone")
    ap.add_argument("--rss-only", action="store_true", help="only re-measure the peak RSS line of the section")
    args = ap.parse_args()
    if args.dice_only:
        demo_dice(args)
        return
    if args.rss_only:
        rss_line = rss_text(explain_rss(args))
        bench = ROOT / "docs" / "benchmarks.md"
        text = bench.read_text()
        a = text.index("\nPeak RSS at batch 8", text.index("<!-- sampling:start -->"))
        b = text.index("\n", a + 1)
        bench.write_text(text[:a] + rss_line.rstrip("\n") + text[b:])
        print(rss_line)
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
    from medcfx_sanchez.methods import FAST_SAMPLER

    iv = tuple(float(v) for v in FAST_SAMPLER["guidance_interval"].split(":"))
    fast = round(steps * FAST_SAMPLER["step_fraction"])
    fast_kw = dict(steps=fast, solver=FAST_SAMPLER["solver"], guidance_interval=iv,
                   reuse_inversion=FAST_SAMPLER["reuse_inversion"])
    what = f"{FAST_SAMPLER['solver']} {fast}" + (", reuse inversion" if FAST_SAMPLER["reuse_inversion"] else "") + \
        (f", guidance {FAST_SAMPLER['guidance_interval']}" if iv != (0.0, 1.0) else "")
    paths = [SamplingPath("reference (2 passes, fp32, NCHW)", batched_cfg=False),
             SamplingPath("batched cfg, fp32 (--sampler paper)"),
             SamplingPath("batched cfg, bf16 + channels_last", bf16=True, channels_last=True),
             SamplingPath("onnxruntime cpu, fp32", onnx=onnx),
             SamplingPath(f"onnxruntime cpu, dpm++2m {fast}", onnx=onnx, steps=fast, solver="dpm++2m"),
             SamplingPath(f"onnxruntime cpu, dpm++2m {fast}, guidance 0.25:1", onnx=onnx, steps=fast,
                          solver="dpm++2m", guidance_interval=(0.25, 1.0)),
             SamplingPath(f"fast sampler, torch fp32 ({what})", **fast_kw),
             SamplingPath(f"fast sampler, bf16 + channels_last ({what})", bf16=True, channels_last=True, **fast_kw),
             SamplingPath(f"fast sampler, onnxruntime cpu ({what})", onnx=onnx, **fast_kw)]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = example_batch(unet, batch)
        ref_maps = None
        for p in paths:
            if any(s in p.name and (b is None or int(b) == batch) for s, b in skip):
                continue
            n_fwd = forwards_per_slice(schedule, p.steps or steps, 0.75, True, p.guidance_interval, p.reuse_inversion,
                                       p.solver)
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


# (name, explain settings): every row through `medcfx evaluate` with the trained demo model; the names are the
# folders in --work, so evaluations are reused (accuracy does not depend on machine load: they may run
# before the quiet timing run). The onnx backend agrees with torch fp32 to 3e-4 in the heatmap, so fp32 rows
# stand for both.
DICE_RUNS = [
    ("ddim100", "--sampler paper --steps 100"),
    ("ddim40", "--sampler paper --steps 40"),
    ("dpm50", "--steps 50 --solver dpm++2m"),
    ("dpm40", "--steps 40 --solver dpm++2m"),
    ("dpm30", "--steps 30 --solver dpm++2m"),
    ("dpm50_i25", "--steps 50 --solver dpm++2m --guidance-interval 0.25:1"),
    ("dpm50_i40", "--steps 50 --solver dpm++2m --guidance-interval 0.4:1"),
    ("dpm50_i0_50", "--steps 50 --solver dpm++2m --guidance-interval 0:0.5"),
    ("dpm40_i25", "--steps 40 --solver dpm++2m --guidance-interval 0.25:1"),
    ("dpm50_r", "--steps 50 --solver dpm++2m --reuse-inversion"),
    ("dpm40_r", "--steps 40 --solver dpm++2m --reuse-inversion"),
    ("dpm3m30", "--steps 30 --solver dpm++3m"),
]


def demo_dice(args) -> list[dict]:
    """Ideal Dice and AUPRC of the demo model for each of DICE_RUNS on the demo test set, scored on each
    input's own grid (`--max-slices` per case), with the forward passes per slice of that setting."""
    from medcfx.bench import forwards_per_slice
    from medcfx.diffusion import Schedule

    schedule = Schedule.create("linear", 1000)
    out = []
    for name, settings in DICE_RUNS:
        d = args.work / name
        cmd = [sys.executable, "-m", "medcfx", "evaluate", "sanchez", "--model", args.demo_model, "--data",
               str(args.test), "--max-slices", str(args.max_slices), "--self-check-slices", "0", *settings.split(),
               "--out", str(d)]
        if not (d / "metrics.json").exists():
            subprocess.run(cmd, check=True, capture_output=True)
        m = flat_metrics(json.loads((d / "metrics.json").read_text()))
        words = [w for w in settings.split() if w != "--reuse-inversion"]  # the one flag without a value
        opts = dict(zip(words[::2], words[1::2]))
        lo_hi = tuple(float(v) for v in opts.get("--guidance-interval", "0:1").split(":"))
        solver = opts.get("--solver", "ddim" if opts.get("--sampler") == "paper" else "dpm++2m")
        n_fwd = forwards_per_slice(schedule, int(opts["--steps"]), 0.75, True, lo_hi, "--reuse-inversion" in settings,
                                   solver)
        out.append({"name": name, "settings": settings, "forwards": n_fwd, "ideal_Dice": m["pixel_ideal_Dice"],
                    "AUPRC": m["pixel_AUPRC"], "command": " ".join(cmd[2:-2])})
        print(json.dumps(out[-1]), flush=True)
    return out


def _peak_rss(cmd: list[str]) -> int:
    """Peak RSS in MiB of one command (medcfx.bench_volume.measured_run: not inflated by this process)."""
    from medcfx.bench_volume import measured_run

    _, mib, code, err = measured_run(cmd)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-300:]}")
    return round(mib)


def explain_rss(args) -> list[dict]:
    """Peak RSS of `medcfx explain` at batch 8 on a case of 8 and of 32 slices (flat in the slice count), and
    of `medcfx evaluate` at batch 8 on the demo test set (--test), 4 steps each (memory does not depend on
    the number of steps)."""
    from medcfx.demo import make_demo

    out = []
    with tempfile.TemporaryDirectory() as d:
        for n in (8, 32):
            data = make_demo("brain", Path(d) / f"b{n}", cases=1, seed=5, shape=(120, 120, n + 4),
                             tumour_free_fraction=0.0)
            case = next(p for p in data.iterdir() if p.is_dir())
            cmd = [sys.executable, "-m", "medcfx", "explain", str(case), "--model", args.demo_model,
                   "--batch-size", "8", "--steps", "4", "--out", str(Path(d) / f"o{n}")]
            mib = _peak_rss(cmd)
            slices = len(list((Path(d) / f"o{n}" / case.name / "panels").iterdir()))
            out.append({"command": "explain", "slices": slices, "peak_rss_mb": mib})
            print(json.dumps(out[-1]), flush=True)
        if args.test:
            cmd = [sys.executable, "-m", "medcfx", "evaluate", "sanchez", "--model", args.demo_model, "--data",
                   str(args.test), "--batch-size", "8", "--steps", "4", "--out", str(Path(d) / "ev")]
            out.append({"command": "evaluate", "slices": "all of --test", "peak_rss_mb": _peak_rss(cmd)})
            print(json.dumps(out[-1]), flush=True)
    return out


def rss_text(rss: list[dict]) -> str:
    return ("\nPeak RSS at batch 8 (demo model): "
            + ", ".join(f"`{r['command']}` of {r['slices']} slices {r['peak_rss_mb']} MiB" for r in rss)
            + " (`--rss-only` re-measures this line).\n")


def write_docs(rows, dice, rss, gflop, steps, args) -> None:
    def ratio(r):
        ref = next(q for q in rows if q["batch"] == r["batch"])
        return ref["s_per_slice"] / r["s_per_slice"]

    lines = ["| path | batch | forwards / slice | s / slice | GFLOP/s | speed-up vs reference | max heatmap diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['batch']} | {r['forwards']} | {r['s_per_slice']:.2f} | "
                     f"{r['gflop_per_s']:.0f} | {ratio(r):.2f}x | {r['max_heatmap_diff']:.1e} |")
    dl = ""
    if dice:
        ref = dice[0]
        dl = ("\nThe same settings with the trained demo model on the demo test set (`medcfx evaluate`, each input's "
              "own grid, ideal Dice = the oracle threshold; forwards = UNet evaluations per slice, batch-1 "
              "equivalents):\n\n"
              "| settings | forwards / slice | ideal Dice | cost vs first row | AUPRC | command |\n"
              "|---|---|---|---|---|---|\n"
              + "".join(f"| {d['settings']} | {d['forwards']} | {d['ideal_Dice']:.4f} | "
                        f"{ref['ideal_Dice'] - d['ideal_Dice']:+.4f} | {d['AUPRC']:.4f} | `{d['command']}` |\n"
                        for d in dice))
    rl = rss_text(rss) if rss else ""
    cmd = "python benchmarks/sampling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = f"""## Counterfactual sampling speed (issue: ONNX export and fast sampling)

Paper preset network ({gflop:.1f} GFLOP per forward), fixed seeded weights, L = 75% of {steps} DDIM steps,
w = 3, dynamic normalisation; this machine ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()}
threads), all paths in one run. "max heatmap diff" is against the reference path at the same batch size.

{chr(10).join(lines)}
{dl}{rl}
Reproduce: `{cmd}`
"""
    write_section(ROOT / "docs" / "benchmarks.md", "sampling", section)
    print(section)


if __name__ == "__main__":
    main()
