"""Restoration (Baugh et al. 2024) on the synthetic demo brains, sized for a CPU.

    python benchmarks/restoration_demo.py --work W --home H --train /work/demo-data/brain-train \\
        --val /work/demo-data/brain-val --test /work/demo-data/brain-test          # trains what is missing
    python benchmarks/restoration_demo.py ... --write-docs docs/benchmarks.md     # also write the section

Models (trained with the documented commands when a reference is not in the registry yet; demo preset, T2
at 48 x 48, healthy slices of the training set only):

    medcfx train restoration --data TRAIN --preset demo --fold 0 --seed 0     -> restoration-fold0
    medcfx train restoration --data TRAIN --preset demo --fold 9 --seed 9     -> restoration-fold9 (each --folds K)
    medcfx train restoration --data TRAIN --preset demo --fold 0 --seed 1     -> restoration-fold0-s1 (--fold0-seeds)
    medcfx train recon-ddpm  --data TRAIN --preset demo --seed 0              -> recon-ddpm
    (--suffix S appends S to every name, e.g. -8k for the models of the 8000-step preset: restoration-fold5-8k,
    restoration-fold0-8k-s1, recon-ddpm-8k)

Evaluations (``medcfx evaluate ... --val VAL``: thresholds calibrated on the validation cases with the row's
own settings; the same ``--max-slices`` slices per test case for every row, scored on each input's own grid
inside its foreground, 95 % bootstrap intervals over cases; image score = mean of the map):

    every fold model alone and the ensemble of the folds (mean map), each with the 1 - SSIM map (the paper) and
    the |residual| map (fold 0 trains on intra_blend, inter_blend, sink; fold 5 on intra_blend, source,
    intensity; fold 9 on sink, source, intensity: together every task, four of them twice); fold 0 of other seeds
    --samples K: fold 0 and the ensemble again with K restorations per model (maps averaged)
    --extra "LABEL=REF;...": further registered models (e.g. a longer-trained fold 0) on the same slices
    recon-ddpm: noise level chosen on the VALIDATION set among --levels (best pixel AP), SSIM and residual
    thresholding of T2 (the models' channel) and of FLAIR (/ median, native grid, 5 x 5 median filter)

Results go to W/results.json and W/results.md (and the docs section with --write-docs); an example figure
(input, restoration, map, mask for a few test lesions) to docs/img/restoration_demo.png.
``--fold0-model REF`` takes an already trained fold-0 model (e.g. the bundled restoration-demo, which is
``restoration-fold0`` trained by the command above) instead of training one.
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

import numpy as np
from common import case_count, grid_text, write_section

from medcfx.evaluation import flat_metrics

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def medcfx(args, env) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "medcfx"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "medcfx"]), *map(str, args)]
    log("$ medcfx " + " ".join(map(str, args)))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"medcfx failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ensure_model(ref: str, train_args: list | None, env) -> dict:
    """The registry entry of ``ref`` as a dict, trained with ``train_args`` first when it is not registered
    (``None``: it must be)."""
    from medcfx.registry import Registry

    reg = Registry(env["MEDCFX_HOME"])
    try:
        return reg.resolve(ref).to_dict()
    except Exception:  # not registered yet: train it
        if train_args is None:
            raise SystemExit(f"{ref} is not registered in {env['MEDCFX_HOME']}")
        medcfx(["train", *train_args, "--name", ref], env)
        return reg.resolve(ref).to_dict()


def evaluate(method: str, model: str, data: Path, out: Path, opts: list, env) -> dict:
    """flat metrics of one evaluate run, plus "intervals" (metric -> ci_low / ci_high); reused when done."""
    if not (out / "metrics.json").exists():
        medcfx(["evaluate", method, *(["--model", model] if model else []), "--data", data, "--out", out,
                "--device", "cpu", *opts], env)
    rep = json.loads((out / "metrics.json").read_text())
    return {**flat_metrics(rep), "intervals": rep["intervals"]}


def figure(env, models: str, test: Path, path: Path, n: int = 4, steps: int = 50) -> None:
    """Input, restoration, 1 - SSIM map and mask for ``n`` test slices with the largest lesions."""

    import numpy as np
    import torch

    os.environ["MEDCFX_HOME"] = env["MEDCFX_HOME"]
    from medcfx import viz
    from medcfx.data.preprocess import PreprocessConfig, prepare
    from medcfx.registry import Registry
    from medcfx_restoration.infer import METHOD, Mapper, Params, load_members

    members, pre = load_members(Registry(env["MEDCFX_HOME"]), models.split(","), METHOD, "cpu")
    ss = prepare(test, PreprocessConfig.from_dict(pre))
    area = np.asarray(ss.masks[:]).reshape(len(ss), -1).sum(1).astype(np.int64)
    rows = np.argsort(-area)[: 12 * n : 12]  # large lesions from different cases / depths
    x = torch.from_numpy(np.asarray(ss.images[np.sort(rows)]))
    rest, amap = Mapper(members, Params(steps=steps), seed=0, method=METHOD)(x)
    tiles = []
    for j, r in enumerate(np.sort(rows)):
        img = viz.to_uint8(x[j, 0].numpy(), -1, 1)
        tiles.append([img, viz.to_uint8(rest[j, 0].numpy(), -1, 1), viz.heat_rgb(amap[j].numpy(), vmax=1.0),
                      viz.to_uint8(np.asarray(ss.masks[r]).astype(np.float32), 0, 1)])
    titles = [["input (T2)", "restoration", "1 - SSIM", "lesion mask"]] * len(tiles)
    viz.save_png(viz.grid(tiles, titles, scale=3), path)
    log(f"wrote {path}")


COLUMNS = (("pixel AP", "pixel_AUPRC"), ("ideal Dice (oracle)", "pixel_ideal_Dice_oracle"),
           ("Dice @ val. best", "pixel_Dice@valDice"), ("Dice @ 5 % FPR", "pixel_Dice@fpr5"),
           ("image AUROC", "image_AUROC"), ("image AP", "image_AP"))


def table(rows: list[dict]) -> str:
    """Markdown: one row per evaluation, value [95 % CI over cases] per metric, seconds per slice."""
    def cell(r, key):
        v, ci = r.get(key), r["intervals"].get(key, {})
        if v is None or v != v:
            return "n/a"
        return f"{v:.3f}" if ci.get("ci_low") is None else f"{v:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"

    out = "| row | " + " | ".join(c for c, _ in COLUMNS) + " | s / slice |\n|" + "---|" * (len(COLUMNS) + 2) + "\n"
    for r in rows:
        out += f"| {r['row']} | " + " | ".join(cell(r, k) for _, k in COLUMNS) + f" | {r['seconds_per_slice']:.3f} |\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--home", type=Path, required=True, help="MEDCFX_HOME holding (or receiving) the models")
    ap.add_argument("--train", type=Path, default=Path("/work/demo-data/brain-train"))
    ap.add_argument("--val", type=Path, default=Path("/work/demo-data/brain-val"))
    ap.add_argument("--test", type=Path, default=Path("/work/demo-data/brain-test"))
    ap.add_argument("--folds", default="0,9", help="fold models to train and evaluate (two or more: also their ensemble)")
    ap.add_argument("--max-slices", type=int, default=12, help="slices scored per case (spread evenly)")
    ap.add_argument("--fold0-model", default=None, help="use this registered fold-0 restoration model")
    ap.add_argument("--fold0-seeds", default="", help="other training seeds of the first fold (e.g. 1,2; models "
                    "restoration-foldK-sS, trained when missing): their rows and the mean +- sd over the seeds")
    ap.add_argument("--samples", type=int, default=1, help="also rows with this many restorations per model "
                    "(maps averaged; choose it on the validation set, benchmarks/restoration_study.py)")
    ap.add_argument("--extra", default="", help="LABEL=REF;... further registered restoration models scored on the "
                    "same slices (e.g. 'fold 0, 8000 steps=restoration-f0-8k')")
    ap.add_argument("--suffix", default="", help="appended to the names of the models trained / looked up here "
                    "(e.g. -8k: restoration-fold5-8k, restoration-fold0-8k-s1, recon-ddpm-8k)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--levels", default="0.2,0.35,0.5", help="baseline noise levels tried on the validation set")
    ap.add_argument("--write-docs", type=Path, default=None)
    ap.add_argument("--section", default="restoration", help="the docs section (marker) to write; another name keeps "
                    "the main table, e.g. restoration-2000 for the models of the former 2000-step preset")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "img" / "restoration_demo.png")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MEDCFX_HOME=str(a.home), MEDCFX_CACHE=str(a.home / "cache"))
    env.setdefault("OMP_NUM_THREADS", "1")
    common = ["--data", a.train, "--preset", "demo", "--device", "cpu", "--runs-dir", a.work / "runs"]
    folds = [int(f) for f in a.folds.split(",")]
    models = {f"restoration-fold{k}": ensure_model(a.fold0_model if (k == 0 and a.fold0_model) else f"restoration-fold{k}{a.suffix}",
                                                   ["restoration", *common, "--fold", k, "--seed", k], env)
              for k in folds}
    name = {k: f"{v['name']}:{v['version']}" for k, v in models.items()}
    recon = f"recon-ddpm{a.suffix}"
    models[recon] = ensure_model(recon, ["recon-ddpm", *common, "--seed", 0], env)
    ev = ["--max-slices", a.max_slices, "--steps", a.steps, "--seed", 0, "--val", a.val]
    rows = []

    def add(name, method, model, opts, data=a.test, tag=None):
        m = evaluate(method, model, data, a.work / "eval" / (tag or name.replace(" ", "_")), opts, env)
        rows.append({"row": name, **m})
        log(f"{name}: " + ", ".join(f"{k} {m[k]:.3f}" for k in ("image_AP", "image_AUROC", "pixel_AUPRC",
                                                                    "pixel_ideal_Dice")))

    k0 = folds[0]
    kinds = (("1 - SSIM (paper)", "ssim", []), ("absolute residual", "res", ["--map", "residual"]))
    for k in folds:
        for label, tag, opt in kinds:
            add(f"restoration fold {k}, {label}", "restoration", name[f"restoration-fold{k}"], ev + opt, tag=f"f{k}_{tag}")
    if len(folds) > 1:
        for label, tag, opt in kinds:
            add(f"restoration ensemble of folds {'+'.join(map(str, folds))}, {label}", "restoration",
                ",".join(name[f"restoration-fold{k}"] for k in folds), ev + opt, tag=f"ens_{tag}")
    if a.samples > 1:  # K restorations per model, maps averaged (K chosen on the validation set)
        K = ["--samples", a.samples]
        for label, tag, opt in kinds:
            add(f"restoration fold {k0}, {a.samples} samples, {label}", "restoration", name[f"restoration-fold{k0}"],
                ev + opt + K, tag=f"f{k0}_k{a.samples}_{tag}")
        if len(folds) > 1:
            for label, tag, opt in kinds:
                add(f"restoration ensemble of folds {'+'.join(map(str, folds))}, {a.samples} samples each, {label}",
                    "restoration", ",".join(name[f"restoration-fold{k}"] for k in folds), ev + opt + K,
                    tag=f"ens_k{a.samples}_{tag}")
    for item in filter(None, a.extra.split(";")):  # further registered models on the same slices
        label, ref = item.split("=")
        models[ref] = ensure_model(ref, None, env)
        for kl, tag, opt in kinds:
            add(f"restoration {label} ({ref}), {kl}", "restoration", ref, ev + opt, tag=f"{ref}_{tag}")
    spread = {tag: [rows[folds.index(k0) * 2 + j]] for j, (_, tag, _) in enumerate(kinds)}
    for sd in [int(x) for x in a.fold0_seeds.split(",") if x]:  # the spread of one fold over training seeds
        ref = f"restoration-fold{k0}{a.suffix}-s{sd}"
        models[ref] = ensure_model(ref, ["restoration", *common, "--fold", k0, "--seed", sd], env)
        for label, tag, opt in kinds:
            add(f"restoration fold {k0}, seed {sd}, {label}", "restoration", f"{ref}:{models[ref]['version']}",
                ev + opt, tag=f"f{k0}s{sd}_{tag}")
            spread[tag].append(rows[-1])
    # baseline: the noise level is chosen on the validation set (best pixel AP), then scored on the test set
    val = {}
    for lv in a.levels.split(","):
        m = evaluate("recon-ddpm", recon, a.val, a.work / "eval" / f"recon_val_{lv}",
                     ["--max-slices", a.max_slices, "--steps", a.steps, "--seed", 0, "--noise-level", lv], env)
        val[lv] = m["pixel_AUPRC"]
        log(f"recon-ddpm level {lv} on validation: pixel AP {m['pixel_AUPRC']:.3f}")
    best = max(val, key=val.get)
    add(f"recon-ddpm (level {best}), 1 - SSIM", "recon-ddpm", recon, ev + ["--noise-level", best],
        tag="recon_ssim")
    add(f"recon-ddpm (level {best}), absolute residual", "recon-ddpm", recon,
        ev + ["--noise-level", best, "--map", "residual"], tag="recon_res")

    # the literature's thresholding baseline on the channel the models read (native grid, / median, 5 x 5 median
    # filter; --steps is not one of its options), and on FLAIR, which the T2 models never see
    for ch in ("t2", "flair"):
        add(f"thresholding {ch.upper() if ch == 't2' else 'FLAIR'} (/ median, native grid, 5 x 5 median filter)",
            "threshold", None, ["--max-slices", a.max_slices, "--val", a.val, "--channel", ch], tag=f"threshold_{ch}")
        rows[-1]["seconds_per_slice"] = rows[-1].get("seconds_per_slice") or 0.0
    figure(env, name[f"restoration-fold{k0}"], a.test, a.figure, steps=a.steps)
    train_info = {k: {"steps": v["provenance"].get("steps"), "train_seconds": v["provenance"].get("train_seconds"),
                      "metrics": v["metrics"]} for k, v in models.items()}
    seed_spread = ({kind: {key: [r[key] for r in rs] for _, key in COLUMNS} for kind, rs in spread.items()}
                   if a.fold0_seeds else {})
    result = {"rows": rows, "baseline_validation_pixel_AP": val, "seed_spread": seed_spread, "samples": a.samples,
              "extra": a.extra, "suffix": a.suffix,
              "fold0_seeds": [0] + [int(x) for x in a.fold0_seeds.split(",") if x], "models": train_info, "folds": a.folds,
              "max_slices": a.max_slices, "steps": a.steps, "slices": rows[0]["slices"], "fold0_model": a.fold0_model,
              "pixels": rows[0]["pixels"], "grid": grid_text(a.test), "train_grid": grid_text(a.train),
              "cases": {"train": case_count(a.train), "val": case_count(a.val), "test": case_count(a.test)},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}"}
    (a.work / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = table(rows)
    (a.work / "results.md").write_text(md)
    print(md)
    if a.write_docs:
        write_docs(a, result, md)


def mean_sd(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} +- {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def spread_text(result: dict) -> str:
    """One line per map kind: mean +- sd (ddof 1) over the first fold's training seeds."""
    if not result.get("seed_spread"):
        return ""
    out = f"Fold {result['folds'].split(',')[0]} over training seeds {', '.join(map(str, result['fold0_seeds']))} (mean +- sd): "
    parts = []
    for kind, m in result["seed_spread"].items():
        parts.append(f"{'1 - SSIM' if kind == 'ssim' else 'residual'}: pixel AP {mean_sd(m['pixel_AUPRC'])}, ideal Dice "
                     f"{mean_sd(m['pixel_ideal_Dice_oracle'])}, Dice @ val. best {mean_sd(m['pixel_Dice@valDice'])}, "
                     f"image AUROC {mean_sd(m['image_AUROC'])}")
    return out + "; ".join(parts) + ".\n\n"


def write_docs(a, result: dict, md: str) -> None:
    models = result["models"]
    secs = {k: v["train_seconds"] for k, v in models.items()}
    trained = " / ".join(str(s) for s in sorted({v["steps"] for v in models.values()}))
    title = "Restoration" if a.section == "restoration" else f"Restoration, models of {trained} training steps"
    body = f"""## {title} (`benchmarks/restoration_demo.py`)

Synthetic demo brains (T2 only, the models work at 48 x 48): trained on the HEALTHY slices of `brain-train`
({result['cases']['train']} cases, {result['train_grid']}); thresholds calibrated and the baseline's noise level
chosen on `brain-val` ({result['cases']['val']} cases); scored on `brain-test` ({result['cases']['test']} cases,
{result['grid']}): {result['max_slices']} slices per case spread evenly ({result['slices']} slices,
{result['pixels']} foreground voxels), on each input's own grid inside its foreground; value [95 % percentile-bootstrap
interval over the test cases, 1000 resamples, seed 0]; "ideal Dice" is the oracle (threshold chosen on the test
labels); image score = mean of the map; {result['steps']} DDPM steps. Machine:
{result['machine']}, shared with other jobs. Training: demo preset, {trained} steps of 32 (each model's steps are in results.json); wall seconds recorded
at registration (for a run continued with `--resume`, its last leg only): {', '.join(f'{k} {v}' for k, v in secs.items())}.

{md}
{spread_text(result)}Baseline validation pixel AP by noise level: {', '.join(f'{k}: {v:.3f}' for k, v in result['baseline_validation_pixel_AP'].items())}.

Reproduce: `python benchmarks/restoration_demo.py --work W --home H --train TRAIN --val VAL --test TEST --folds {result['folds']}
--max-slices {result['max_slices']}{' --suffix=' + result['suffix'] if result.get('suffix') else ''}{' --samples ' + str(result['samples']) if result['samples'] > 1 else ''}{' --fold0-seeds ' + ','.join(map(str, result['fold0_seeds'][1:])) if result['seed_spread'] else ''}{' --fold0-model ' + result['fold0_model'] if result.get('fold0_model') else ''}{chr(32) + '--extra "' + result['extra'] + '"' if result.get('extra') else ''}{'' if a.section == 'restoration' else ' --section ' + a.section} --write-docs docs/benchmarks.md`
(trains the fold models and `recon-ddpm{result.get('suffix', '')}` in H when missing{'; fold 0 is ' + result['fold0_model'] + ', trained by the same command' if result.get('fold0_model') else ''})."""
    write_section(a.write_docs, a.section, body)
    log(f"wrote the {a.section} section of {a.write_docs}")


if __name__ == "__main__":
    main()
