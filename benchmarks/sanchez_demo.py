#!/usr/bin/env python
"""Sanchez et al. (2022) Tables 1 and 2 on the synthetic demo brains, through the real CLI.

    python benchmarks/sanchez_demo.py --train DIR --val DIR --test DIR [--steps 2000] [--max-slices 12] [--reuse]
        [--seeds 0,1,2]

Trains (unless --reuse finds them in the registry) the demo preset of: sanchez (attention conditioning),
sanchez with AdaGN-only conditioning, cdpm-healthy and cdpm-classifier, all with the same training budget,
then evaluates every row of the paper's tables with ``medcfx evaluate ... --val VAL``: thresholds calibrated
on the validation cases with the row's own settings, the test cases scored on each input's own grid inside
its foreground, 95 % bootstrap intervals over cases. Writes the tables, with the commands that produced
them, into docs/benchmarks.md (section "sanchez").

``--seeds 0,1,2``: every model is trained once per seed (names ``bench-...-sS``) and every row evaluated with
each seed's models (results in ``--out``/seedS); the tables then show mean +- sd over the seeds (ddof 1), and
each seed's values and intervals stay in its results.json. One seed: the value with its 95 % interval.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from common import case_count, grid_text, write_section
from medcfx.evaluation import flat_metrics
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDCFX = [sys.executable, "-m", "medcfx"]


def sh(args: list, log: Path | None = None) -> str:
    cmd = [str(a) for a in args]
    print("$ medcfx " + " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr + "\n")
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def models() -> dict:
    out = json.loads(sh(MEDCFX + ["models", "list", "--json"]))
    return {e["name"]: e["ref"] for e in out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True, help="annotated validation cases (the thresholds)")
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000, help="training steps of every model (demo preset: 2000)")
    ap.add_argument("--max-slices", type=int, default=12, help="slices scored per case (spread evenly)")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (several: mean +- sd over them)")
    ap.add_argument("--reuse", action="store_true",
                    help="use models already registered under the bench names and evaluations already in --out")
    ap.add_argument("--only-eval", action="store_true")
    ap.add_argument("--attn-model", default=None,
                    help="use this registered sanchez model (e.g. sanchez-demo, same preset, seed 0) for the attention "
                         "rows of seed 0")
    ap.add_argument("--cdpm-classifier-guidance", type=float, default=None,
                    help="the classifier scale s of the CDPM + classifier row, chosen on validation data (`medcfx "
                         "sweep cdpm-classifier --data VAL`); default the method's (100)")
    ap.add_argument("--out", type=Path, default=Path("bench-sanchez"))
    ap.add_argument("--rows", default="", help="evaluate only these rows (comma-separated indices; docs are not written)")
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",") if r]
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = {s: run_seed(args, s, args.out if len(seeds) == 1 else args.out / f"seed{s}") for s in seeds}
    if not args.rows:
        write_docs(args, per_seed)


def run_seed(args, s: int, out: Path) -> dict:
    """Train what is missing and evaluate every row with the models of training seed ``s``; returns (and
    writes to out/results.json) {"rows": [...], "train_seconds": {...}}."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    attn_model = args.attn_model if s == 0 else None
    specs = {  # registry name -> (method, extra train args)
        f"bench-sanchez-attn-s{s}": ("sanchez", []),
        f"bench-sanchez-adagn-s{s}": ("sanchez", ["--set", "conditioning=adagn"]),
        f"bench-cdpm-healthy-s{s}": ("cdpm-healthy", []),
        f"bench-cdpm-classifier-s{s}": ("cdpm-classifier", []),
    }
    have = models()
    train_seconds = {}
    if attn_model:
        specs.pop(f"bench-sanchez-attn-s{s}")
    for name, (method, extra) in specs.items():
        if (args.reuse and name in have) or args.rows:  # a partial evaluation trains nothing
            continue
        if args.only_eval:
            sys.exit(f"--only-eval: {name} is not registered")
        t0 = time.time()
        sh(MEDCFX + ["train", method, "--data", args.train, "--preset", "demo", "--set", f"train.steps={args.steps}",
                     "--name", name, "--seed", s, "--device", "cpu", "--runs-dir", out / "runs", *extra], log)
        train_seconds[name] = round(time.time() - t0)
    have = models()
    if attn_model:
        have[f"bench-sanchez-attn-s{s}"] = attn_model
    slices = {}  # training slices each model's entry records (the attention rows may use an older model)
    for name in [*specs, f"bench-sanchez-attn-s{s}"]:
        if name in have:
            entry = json.loads(sh(MEDCFX + ["models", "show", have[name], "--json"]))
            slices[have[name]] = entry.get("metrics", {}).get("train_slices")
            if name not in train_seconds and name in specs:  # reused: the time its registry entry recorded
                train_seconds[name] = entry.get("provenance", {}).get("train_seconds")
    train_seconds = {"seconds": train_seconds, "train_slices": slices}
    common = ["--data", args.test, "--val", args.val, "--max-slices", args.max_slices, "--device", "cpu"]
    rows = [  # (table, row label, method, model name or None, extra evaluate args, trained on)
        (1, "Thresholding (native grid, / median, 5 x 5 median filter, channel of best val. AP)", "threshold", None,
         ["--channel", "auto"], "Not"),
        (1, "CDPM_healthy", "cdpm-healthy", f"bench-cdpm-healthy-s{s}", [], "Healthy"),
        (1, "CDPM + classifier" + (f" (s = {args.cdpm_classifier_guidance:g}, chosen on val.)"
                                   if args.cdpm_classifier_guidance is not None else ""),
         "cdpm-classifier", f"bench-cdpm-classifier-s{s}",
         ["--guidance", args.cdpm_classifier_guidance] if args.cdpm_classifier_guidance is not None else [], "Full"),
        (1, "Ours (sanchez)", "sanchez", f"bench-sanchez-attn-s{s}", [], "Full"),
        (2, "CDPM (no guidance)", "sanchez", f"bench-sanchez-attn-s{s}", ["--guidance", "0", "--dn-percentile", "0"], "Full"),
        (2, "+ implicit guidance (AdaGN)", "sanchez", f"bench-sanchez-adagn-s{s}", ["--dn-percentile", "0"], "Full"),
        (2, "+ attention conditioning", "sanchez", f"bench-sanchez-attn-s{s}", ["--dn-percentile", "0"], "Full"),
        (2, "+ dynamic normalisation", "sanchez", f"bench-sanchez-attn-s{s}", [], "Full"),
    ]
    results, seen = [], {}
    for i, (table, label, method, model, extra, trained_on) in enumerate(rows):
        if args.rows and i not in args.rows:
            continue
        where = seen.setdefault((method, model, tuple(extra)), out / f"eval-{i}")  # one run per distinct row
        paper = ["--sampler", "paper"] if method == "sanchez" else []  # the paper's loop, not the fast default
        if method != "threshold":
            paper += ["--self-check-slices", "0"]  # not reported by the tables
        cmd = ["evaluate", method, *(["--model", have[model]] if model else []), *common, *paper, "--out", where, *extra]
        if not ((args.reuse or where.name != f"eval-{i}") and (where / "metrics.json").exists()):
            sh(MEDCFX + cmd, log)
        rep = json.loads((where / "metrics.json").read_text())
        results.append({"table": table, "label": label, "trained_on": trained_on, "metrics": flat_metrics(rep),
                        "intervals": rep["intervals"], "flip": rep.get("flip"), "pixels": rep["counts"]["pixels"],
                        "command": "medcfx " + " ".join(map(str, cmd))})
    result = {"seed": s, "rows": results, "train_seconds": train_seconds}
    if not args.rows:
        (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def pct_cell(rows: list[dict], key: str) -> str:
    """One table cell in percent, as in the paper: a row of one seed as value [95 % interval over cases]; the
    same row of several seeds as mean +- sd over the seeds (ddof 1; a seed without a value is left out)."""
    values = [r["metrics"].get(key) for r in rows]
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    if len(rows) == 1:
        ci = rows[0]["intervals"].get(key, {})
        if ci.get("ci_low") is None:
            return f"{100 * values[0]:.1f}"
        return f"{100 * values[0]:.1f} [{100 * ci['ci_low']:.1f}, {100 * ci['ci_high']:.1f}]"
    v = 100 * np.asarray(values, dtype=float)
    sd = f" +- {v.std(ddof=1):.1f}" if len(v) > 1 else ""
    return f"{v.mean():.1f}{sd}" + (f" ({len(v)} of {len(rows)} seeds)" if len(v) < len(rows) else "")


def write_docs(args, per_seed: dict) -> None:
    seeds = list(per_seed)
    first = per_seed[seeds[0]]["rows"]
    by_row = [[per_seed[s]["rows"][i] for s in seeds] for i in range(len(first))]  # the same row over the seeds
    for rows in by_row:
        assert len({r["label"] for r in rows}) == 1, [r["label"] for r in rows]

    def t(rows, cols):
        head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
        return head + "".join("| " + " | ".join(f(r) for _, f in cols) + " |\n" for r in rows)

    def pct(key):
        return lambda rows: pct_cell(rows, key)

    label = lambda rows: rows[0]["label"]  # noqa: E731
    dice = [("ideal Dice (oracle)", pct("pixel_ideal_Dice_oracle")), ("Dice @ val. best", pct("pixel_Dice@valDice")),
            ("Dice @ 5 % FPR", pct("pixel_Dice@fpr5"))]
    t1 = t([rows for rows in by_row if rows[0]["table"] == 1],
           [("Method", label), ("AUPRC", pct("pixel_AUPRC")), *dice,
            ("image AUROC", pct("image_AUROC")), ("Trained on", lambda rows: rows[0]["trained_on"])])
    t2 = t([rows for rows in by_row if rows[0]["table"] == 2]
           + [rows for rows in by_row if rows[0]["label"].startswith(("CDPM_healthy", "CDPM + classifier"))],
           [("Improvements", label), ("AUPRC", pct("pixel_AUPRC")), *dice])
    flips = ""
    for rows in by_row:
        f = [(s, r["flip"]) for s, r in zip(seeds, rows) if r.get("flip") and r["flip"]["counted"]]
        if f:
            flips += (f"- {rows[0]['label']}: of the test slices its classifier (t = 0) called unhealthy, the "
                      "counterfactual flipped to healthy " + ", ".join(
                          f"{x['flipped']} of {x['counted']} (seed {s}; mean P(healthy) {x['p_target_before_mean']:.2f} "
                          f"-> {x['p_target_after_mean']:.2f})" for s, x in f) + ".\n")
    many = len(seeds) > 1
    spread = ("mean +- sd over the training seeds (ddof 1; each seed's values and 95 % intervals over cases in "
              "its results.json)" if many else
              "[95 % percentile-bootstrap interval over the test cases, 1000 resamples, seed 0]")
    cmds = "\n".join(r["command"] for r in first)
    seconds = {s: per_seed[s]["train_seconds"]["seconds"] for s in seeds}
    slices = {s: per_seed[s]["train_seconds"]["train_slices"] for s in seeds}
    section = f"""## sanchez: Tables 1 and 2 on the demo brains

Synthetic demo brains (`medcfx data demo brain`): trained on `{args.train.name}` ({grid_text(args.train)}), thresholds
calibrated on `{args.val.name}` ({case_count(args.val)} cases), scored on `{args.test.name}` ({case_count(args.test)} held-out cases,
{grid_text(args.test)}): {args.max_slices} slices per case spread evenly ({first[0]['metrics']['slices']} test slices,
{first[0]['pixels']} foreground voxels), on each input's own grid inside its foreground; training seed{'s' if many else ''}
{', '.join(map(str, seeds))} (every model trained once per seed), every model trained for {args.steps} steps of the demo
preset; sanchez rows with the paper's sampling loop (`--sampler paper`: 100 DDIM steps, L = 0.75). Percentages as
in the paper; {spread}. "ideal Dice" is the oracle (best threshold chosen on the test labels); "Dice @ val. best"
and "Dice @ 5 % FPR" use thresholds from the validation cases only.

Table 1 (shape of the paper's Table 1):

{t1}
Table 2 (shape of the paper's Table 2; "CDPM (no guidance)" is the null branch of the sanchez model):

{t2}
{flips}
Training wall time per seed (s, recorded at registration; this machine, other jobs running): {json.dumps(seconds)}.
Training slices each model's registry entry records: {json.dumps(slices)} (the same generated cases; a model
trained before the foreground rule of the real-world-inputs work selected a few slices fewer).

Reproduce (the evaluations of seed {seeds[0]} below; the other seeds' are the same with their own models):

```
python benchmarks/sanchez_demo.py --train {args.train} --val {args.val} --test {args.test} --steps {args.steps} --max-slices {args.max_slices} --seeds {args.seeds}{' --attn-model ' + args.attn_model if args.attn_model else ''}{' --cdpm-classifier-guidance %g' % args.cdpm_classifier_guidance if args.cdpm_classifier_guidance is not None else ''} --reuse
{cmds}
```
"""
    write_section(ROOT / "docs" / "benchmarks.md", "sanchez", section)
    print(section)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
