"""Mediffusion on the synthetic chest demo data: the paper's Tables 1/3 (semi-supervised AUROC) and
Table 4/5 + Fig. 4 (counterfactual effect), sized for a CPU.

    python benchmarks/mediffusion_demo.py --work /tmp/mdf-bench                      # everything
    python benchmarks/mediffusion_demo.py --work W --ae mediffusion-ae --home H       # reuse an autoencoder
    python benchmarks/mediffusion_demo.py --work W --cf-model mediffusion-demo       # effect of that model
    python benchmarks/mediffusion_demo.py --work W --write-docs docs/benchmarks.md    # also write the section

(1) Classification: for label fractions 2, 5, 10, 20, 100 % of the training images (the same nested
    subsample for every model: ``subsample_labels`` with seed 0) three models are trained and scored by
    AUROC (mean over the three findings) on a separate test set:
      - mediffusion: ``medcfx train mediffusion --label-fraction f`` (diffusion loss on every image +
        lambda * classification loss on the labelled ones);
      - UNet w/o diffusion: the same command with ``--set diffusion.weight=0 --set classifier.cls_t_max=1``
        (the same UNet + head trained on the labelled images only, clean latents; paper Table 3);
      - supervised CNN: a small pixel-space CNN trained on the labelled images only (the paper's DenseNet
        baseline, scaled down).
(2) Counterfactuals of one mediffusion model (``--cf-model``, default the 100 % model of (1)):
    removal (``no-<finding>``, t = 300, scale 500) on test images with the finding, addition (``<finding>``,
    t = 200, scale 200) on test images without any finding, and a no-guidance control (removal settings,
    scale 0). Scored by an INDEPENDENT classifier (a CNN trained on all training labels, standing in for the
    paper's CheXNet): mean probability of the target before / after, and the mean absolute change of the
    other findings; for removals with a box, the mean |x' - x| inside and outside the finding's box.
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
import torch
from common import write_section
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.02, 0.05, 0.10, 0.20, 1.0)


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


# ------------------------------------------------------------------------------------------ a pixel CNN


class SmallCNN(nn.Module):
    """4 x (conv3x3 - GroupNorm - ReLU - conv3x3 - GroupNorm - ReLU - maxpool2), global average pool, linear."""

    def __init__(self, channels: int, outputs: int, width: int = 16) -> None:
        super().__init__()
        layers, c = [], channels
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, outputs)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def train_cnn(x: torch.Tensor, labels: np.ndarray, steps: int, seed: int, width: int = 16, batch: int = 32,
              lr: float = 1e-3) -> SmallCNN:
    """BCE with pos_weight on the labelled rows only (NaN-masked), Adam, random horizontal shifts."""
    from medcfx_mediffusion.joint import masked_bce, pos_weights

    torch.manual_seed(seed)
    rows = np.flatnonzero(~np.isnan(labels).all(axis=1))
    y = torch.from_numpy(labels)
    pw = torch.from_numpy(pos_weights(labels[rows]))
    net = SmallCNN(x.shape[1], labels.shape[1], width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.from_numpy(rows)[torch.randint(len(rows), (batch,), generator=g)]
        xb = x[idx]
        shift = int(torch.randint(-3, 4, (1,), generator=g))
        xb = torch.roll(xb, shift, dims=3)
        loss = masked_bce(net(xb), y[idx], pw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def cnn_probs(net: SmallCNN, x: torch.Tensor) -> np.ndarray:
    return torch.cat([torch.sigmoid(net(x[i:i + 128])) for i in range(0, len(x), 128)]).numpy()


# ------------------------------------------------------------------------------------------ the study


def make_data(work: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    from medcfx.demo import make_demo

    train, test = work / "chest-train", work / "chest-test"
    for path, n, seed in ((train, n_train, 0), (test, n_test, 1)):
        if not (path / "labels.csv").exists():
            log(f"writing {n} demo chest radiographs to {path}")
            make_demo("chest", path, cases=n, seed=seed)
    return train, test


def classification_study(args, env, train: Path, test: Path, ae: str) -> dict:
    from medcfx.data import PreprocessConfig
    from medcfx_mediffusion.joint import subsample_labels
    from medcfx_mediffusion.scoring import auroc_table
    from medcfx_mediffusion.data import images_tensor, load_dataset, train_rows

    results: dict = {}
    ss_tr = load_dataset(train, PreprocessConfig(size=64, image_channels=1))
    ss_te = load_dataset(test, PreprocessConfig(size=64, image_channels=1))
    x_tr = images_tensor(ss_tr, train_rows(ss_tr))
    lab_tr = np.asarray(ss_tr.labels)[train_rows(ss_tr)]
    x_te, lab_te = images_tensor(ss_te, np.arange(len(ss_te))), np.asarray(ss_te.labels)
    names = ss_tr.label_names
    common = ["--ae", ae, "--runs-dir", args.work / "runs", "--seed", "0"]
    user_sets = [a for item in args.set for a in ("--set", item)]  # before each model's own settings
    for f in args.fractions:
        tag = f"{round(f * 100):03d}"
        row: dict = {"labelled": int((~np.isnan(subsample_labels(lab_tr, f, 0)).all(1)).sum())}
        for model, extra, steps in (
            ("mediffusion", [f"train.batch_size={args.batch}", f"classifier.class_batch={args.class_batch}"], args.steps),
            ("unet", ["diffusion.weight=0", "classifier.cls_t_max=1", "classifier.cls_start=0", "classifier.lambda=1",
                      f"classifier.class_batch={args.batch}"], args.steps_unet),
        ):
            name = f"bench-{model}-{tag}"
            t0 = time.time()
            sets = [a for item in extra for a in ("--set", item)]
            medcfx(["train", "mediffusion", "--data", train, "--label-fraction", f, "--name", name,
                    "--set", f"train.steps={steps}", *user_sets, *sets, *common], env)
            secs = time.time() - t0
            medcfx(["evaluate", "mediffusion", "--model", name, "--data", test, "--out", args.work / "eval" / name], env)
            m = json.loads((args.work / "eval" / name / "metrics.json").read_text())
            row[model] = {"mean_AUROC": m["mean_AUROC"], **{n: m[f"{n}_AUROC"] for n in names}, "train_s": round(secs),
                          "steps": steps}
            log(f"{name}: mean AUROC {m['mean_AUROC']:.3f} ({secs:.0f} s)")
        t0 = time.time()
        cnn = train_cnn(x_tr, subsample_labels(lab_tr, f, 0), args.steps_cnn, seed=0, batch=args.batch)
        secs = time.time() - t0
        m = auroc_table(cnn_probs(cnn, x_te), lab_te, names)
        row["cnn"] = {"mean_AUROC": m["mean_AUROC"], **{n: m[f"{n}_AUROC"] for n in names}, "train_s": round(secs),
                      "steps": args.steps_cnn}
        log(f"cnn {tag}: mean AUROC {m['mean_AUROC']:.3f} ({secs:.0f} s)")
        results[f"{f:g}"] = row
        (args.work / "classification.json").write_text(json.dumps(results, indent=1))
    return results


def counterfactual_study(args, env, train: Path, test: Path, model_ref: str) -> dict:
    from medcfx.data import PreprocessConfig
    from medcfx.diffusion import Schedule
    from medcfx.registry import Registry
    from medcfx_mediffusion import counterfactual as cf
    from medcfx_mediffusion.data import images_tensor, load_dataset, load_joint, train_rows
    from medcfx_mediffusion.config import DEFAULTS
    from medcfx_mediffusion.joint import classify
    from medcfx_mediffusion.scoring import auroc_table

    reg = Registry(os.environ["MEDCFX_HOME"])
    model, codec, entry = load_joint(reg, model_ref)
    findings, kind = entry.config["classifier"]["findings"], entry.config["classifier"]["kind"]
    pp = PreprocessConfig.from_dict(entry.config["preprocess"])
    ss_tr, ss_te = load_dataset(train, pp), load_dataset(test, pp)
    x_tr, lab_tr = images_tensor(ss_tr, train_rows(ss_tr)), np.asarray(ss_tr.labels)[train_rows(ss_tr)]
    x_te, lab_te = images_tensor(ss_te, np.arange(len(ss_te))), np.asarray(ss_te.labels)
    t0 = time.time()
    ext = train_cnn(x_tr, lab_tr, args.steps_ext, seed=1, width=24)
    ext_auc = auroc_table(cnn_probs(ext, x_te), lab_te, findings)
    log(f"independent classifier: test mean AUROC {ext_auc['mean_AUROC']:.3f} ({time.time() - t0:.0f} s)")
    own_auc = auroc_table(classify(model, codec.encode(x_te), kind), lab_te, findings)
    schedule = Schedule.create(entry.config["diffusion"]["schedule"], int(entry.config["diffusion"]["T"]))
    e = DEFAULTS["explain"]
    healthy = np.flatnonzero((lab_te == 0).all(axis=1))
    boxes = ss_te.bbox or {}
    out: dict = {"model": entry.ref, "steps": args.cf_steps, "external_AUROC": ext_auc, "model_AUROC": own_auc, "rows": []}
    n = args.cf_images
    for k, finding in enumerate(findings):
        positives = np.flatnonzero(lab_te[:, k] == 1)[:n]
        runs = [("remove", f"no-{finding}", positives, e["t_remove"], e["scale_remove"]),
                ("control (scale 0)", f"no-{finding}", positives, e["t_remove"], 0.0),
                ("add", finding, healthy[:n], e["t_add"], e["scale_add"])]
        for what, target, rows, t, scale in runs:
            if len(rows) == 0:
                continue
            targets = cf.parse_targets(target, findings)
            x = x_te[rows]
            t0 = time.time()
            z_cf = cf.counterfactual(model, schedule, codec.encode(x), kind, targets, [scale], int(t), args.cf_steps,
                                     e["sampler"], torch.Generator().manual_seed(0))
            x_cf = codec.decode(z_cf).clamp(-1, 1)
            secs = time.time() - t0
            p0, p1 = cnn_probs(ext, x), cnn_probs(ext, x_cf)
            q0 = classify(model, codec.encode(x), kind)
            q1 = classify(model, codec.encode(x_cf), kind)
            others = [j for j in range(len(findings)) if j != k]
            diff = ((x_cf - x).abs() / 2).mean(dim=1).numpy()  # intensity units [0, 1]
            inside, outside = [], []
            if finding in boxes:
                for i, r in enumerate(rows):
                    b = boxes[finding][r]
                    if np.isnan(b).any():
                        continue
                    yy, xx = np.mgrid[: diff.shape[1], : diff.shape[2]] + 0.5
                    m = (xx >= b[0]) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3])
                    if m.any() and (~m).any():
                        inside.append(float(diff[i][m].mean()))
                        outside.append(float(diff[i][~m].mean()))
            row = {"finding": finding, "direction": what, "target": target, "images": int(len(rows)), "t": int(t),
                   "scale": float(scale), "ext_before": float(p0[:, k].mean()), "ext_after": float(p1[:, k].mean()),
                   "ext_other_abs_change": float(np.abs(p1[:, others] - p0[:, others]).mean()),
                   "own_before": float(q0[:, k].mean()), "own_after": float(q1[:, k].mean()),
                   "diff_inside_box": float(np.mean(inside)) if inside else None,
                   "diff_outside_box": float(np.mean(outside)) if outside else None,
                   "seconds": round(secs, 1)}
            out["rows"].append(row)
            log(f"{target:>18} ({what}): external {row['ext_before']:.2f} -> {row['ext_after']:.2f}, other |change| "
                f"{row['ext_other_abs_change']:.3f}; own {row['own_before']:.2f} -> {row['own_after']:.2f} ({secs:.0f} s)")
            (args.work / "counterfactuals.json").write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------ report


def markdown(args, cls: dict | None, cfx: dict | None, meta: dict) -> str:
    lines = ["## Mediffusion (`benchmarks/mediffusion_demo.py`)", ""]
    lines.append(f"Data: `medcfx data demo chest` at 64 px: {meta['n_train']} training radiographs (seed 0) and a "
                 f"separate test set of {meta['n_test']} (seed 1); findings cardiomegaly, effusion, nodule. "
                 f"Autoencoder {meta['ae']} ({meta.get('ae_metrics', '')}). Machine: {meta['machine']}.")
    lines.append("")
    if cls:
        lines.append("### Semi-supervised classification (paper Tables 1 and 3), test AUROC (mean of the three findings)")
        lines.append("")
        lines.append("| model | " + " | ".join(f"{float(f) * 100:g}% ({cls[f]['labelled']} labels)" for f in cls) + " |")
        lines.append("|---|" + "---:|" * len(cls))
        for key, label in (("cnn", "supervised CNN (pixels, labelled only)"),
                           ("unet", "UNet w/o diffusion (latents, labelled only)"),
                           ("mediffusion", "Mediffusion (diffusion on all + classifier)")):
            lines.append(f"| {label} | " + " | ".join(f"{cls[f][key]['mean_AUROC']:.3f}" for f in cls) + " |")
        first = next(iter(cls.values()))
        lines.append("")
        b, cb = meta["batch"], meta["class_batch"]
        lines.append(f"Training steps: mediffusion {first['mediffusion']['steps']} (batch {b} images for the diffusion "
                     f"loss + {cb} labelled), UNet w/o diffusion {first['unet']['steps']} (batch {b} labelled), CNN "
                     f"{first['cnn']['steps']} (batch {b} labelled); extra settings: {meta['sets'] or 'none'}; one seed "
                     f"each, so differences of a few hundredths are within noise. Per-finding AUROCs: "
                     f"`classification.json` in the work folder.")
        lines.append("")
        lines.append("| model | " + " | ".join(f"{float(f) * 100:g}%" for f in cls) + " |")
        lines.append("|---|" + "---:|" * len(cls))
        names = [k for k in first["mediffusion"] if k not in ("mean_AUROC", "train_s", "steps")]
        for key in ("cnn", "unet", "mediffusion"):
            for n in names:
                lines.append(f"| {key} {n} | " + " | ".join(f"{cls[f][key][n]:.3f}" for f in cls) + " |")
        lines.append("")
    if cfx:
        lines.append(f"### Counterfactuals (paper Tables 4/5, Fig. 4) of `{cfx['model']}`")
        lines.append("")
        ext = cfx["external_AUROC"]
        lines.append(f"Scored by an independent pixel CNN trained on all training labels (test AUROC "
                     f"{ext['mean_AUROC']:.3f}: " + ", ".join(f"{k[:-6]} {v:.3f}" for k, v in ext.items()
                                                             if k.endswith("_AUROC") and not k.startswith("mean")) + "). "
                     f"Removal: test images with the finding, `--target no-<finding>` (t=300, scale 500); addition: "
                     f"test images with no finding, `--target <finding>` (t=200, scale 200); control: removal "
                     f"settings with scale 0 (noise + denoise + autoencoder only). Reverse chain: {cfx['steps']} steps "
                     f"from t to 0, ancestral DDPM.")
        lines.append("")
        lines.append("| target | images | external p before | after | diff | other findings mean abs change | "
                     "mediffusion p before | after | mean abs change in box | outside box |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in cfx["rows"]:
            box = (f"{r['diff_inside_box']:.4f} | {r['diff_outside_box']:.4f}" if r["diff_inside_box"] is not None
                   else "- | -")
            lines.append(f"| {r['target']} ({r['direction']}) | {r['images']} | {r['ext_before']:.2f} | {r['ext_after']:.2f} | "
                         f"{r['ext_after'] - r['ext_before']:+.2f} | {r['ext_other_abs_change']:.3f} | {r['own_before']:.2f} | "
                         f"{r['own_after']:.2f} | {box} |")
        lines.append("")
    lines.append(f"Reproduce: `{meta['command']}` ({meta['minutes']:.0f} min on this machine).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work folder (data, runs, registry, results)")
    ap.add_argument("--home", type=Path, default=None, help="MEDCFX_HOME to use (default WORK/home)")
    ap.add_argument("--train-cases", type=int, default=1600)
    ap.add_argument("--test-cases", type=int, default=400)
    ap.add_argument("--ae", default=None, help="reuse this registered autoencoder (default: train one)")
    ap.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    ap.add_argument("--steps", type=int, default=600, help="mediffusion training steps per fraction")
    ap.add_argument("--steps-unet", type=int, default=600, help="UNet-without-diffusion steps per fraction")
    ap.add_argument("--steps-cnn", type=int, default=600, help="supervised CNN steps per fraction")
    ap.add_argument("--batch", type=int, default=32, help="diffusion batch of mediffusion; labelled batch of the baselines")
    ap.add_argument("--class-batch", type=int, default=16, help="labelled batch of mediffusion")
    ap.add_argument("--set", action="append", default=[], help="extra --set for both latent models (repeatable)")
    ap.add_argument("--steps-ext", type=int, default=1500, help="independent (scoring) CNN steps")
    ap.add_argument("--cf-model", default=None, help="model for the counterfactual study (default: the 100%% model)")
    ap.add_argument("--cf-images", type=int, default=16, help="test images per finding and direction")
    ap.add_argument("--cf-steps", default="all", help="reverse steps from t to 0 (default all, as explain)")
    ap.add_argument("--skip-classification", action="store_true")
    ap.add_argument("--skip-counterfactuals", action="store_true")
    ap.add_argument("--write-docs", type=Path, default=None, help="replace the mediffusion section of this file")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    home = args.home or args.work / "home"
    os.environ["MEDCFX_HOME"] = str(home)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    train, test = make_data(args.work, args.train_cases, args.test_cases)
    ae = args.ae
    if ae is None:
        medcfx(["train", "mediffusion-ae", "--data", train, "--name", "bench-ae", "--runs-dir", args.work / "runs"], env)
        ae = "bench-ae"
    from medcfx.registry import Registry

    ae_entry = Registry(home).resolve(ae)
    am = ae_entry.metrics
    meta = {"n_train": args.train_cases, "n_test": args.test_cases, "ae": ae_entry.ref,
            "ae_metrics": f"held-out reconstruction MAE {am.get('recon_MAE', float('nan')):.4f}, PSNR "
                          f"{am.get('recon_PSNR', float('nan')):.1f} dB, SSIM {am.get('recon_SSIM', float('nan')):.3f}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s) shared, torch {torch.__version__}, "
                       f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
            "command": "python benchmarks/mediffusion_demo.py " + " ".join(sys.argv[1:]), "batch": args.batch,
            "class_batch": args.class_batch, "sets": ", ".join(args.set)}
    cls = None
    if not args.skip_classification:
        cls = classification_study(args, env, train, test, ae)
    elif (args.work / "classification.json").exists():
        cls = json.loads((args.work / "classification.json").read_text())
    cfx = None
    if not args.skip_counterfactuals:
        ref = args.cf_model or "bench-mediffusion-100"
        cfx = counterfactual_study(args, env, train, test, ref)
    elif (args.work / "counterfactuals.json").exists():
        cfx = json.loads((args.work / "counterfactuals.json").read_text())
    meta["minutes"] = (time.time() - t_start) / 60
    block = markdown(args, cls, cfx, meta)
    print(block)
    (args.work / "section.md").write_text(block + "\n")
    if args.write_docs:
        write_section(args.write_docs, "mediffusion", block)


if __name__ == "__main__":
    main()
