"""The two medcfx methods of this plugin: ``mediffusion-ae`` (the latent autoencoder) and ``mediffusion``
(the joint diffusion classifier: train, predict, evaluate, explain, sample)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from medcfx import viz
from medcfx.diffusion import Schedule
from medcfx.errors import MedcfxError, UsageError
from medcfx.inputs import CaseLog, OutputDir
from medcfx.method import Method, Option
from medcfx.provenance import record, write_json
from medcfx.staging import atomic_write_bytes, staged_folder

from medcfx_mediffusion import counterfactual as cf
from medcfx_mediffusion import quality as cq
from medcfx_mediffusion.autoencoder import AEConfig, AETrainModule, KLAutoencoder, PatchDiscriminator, ae_loss, ssim
from medcfx_mediffusion.data import (
    LatentCodec,
    eval_rows,
    expand_inputs,
    images_tensor,
    load_dataset,
    load_joint,
    preprocess_config,
    read_input,
    resolve_ae,
    train_rows,
)
from medcfx_mediffusion.joint import (
    build_joint,
    choose_pool,
    joint_batches,
    joint_loss,
    loss_kind,
    pos_weights,
    probabilities,
    subsample_labels,
)

# ------------------------------------------------------------------------------------------ configuration

AE_DEFAULTS = {
    "preprocess": {"size": 64, "image_channels": None, "intensity": "percentile"},
    "network": {"latent_channels": 4, "base_channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1,
                "num_groups": 8},
    "loss": {"l1": 1.0, "ssim": 0.5, "kl": 1.0e-6, "adv": 0.0, "disc_start": 0, "disc_lr": 1.0e-4,
             "disc_channels": 32},
    "val_fraction": 0.1,
    "train": {"steps": 1500, "batch_size": 16, "lr": 1.0e-3, "ema_decay": 0.999, "ema_warmup": True,
              "grad_clip": 1.0, "log_every": 25, "ckpt_every": 500},
}
AE_PRESETS = {
    "demo": {},  # the defaults: 64 px, f = 4, 16x16x4 latents, ~1500 CPU steps
    "paper": {  # appendix C: 256 px, base 128, mult (1, 2, 4, 4), 2 res blocks, 32x32x4 latents
        "preprocess": {"size": 256},
        "network": {"latent_channels": 4, "base_channels": 128, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                    "num_groups": 32},
        "loss": {"adv": 0.5, "disc_start": 50000, "disc_lr": 4.5e-6, "disc_channels": 64},
        "train": {"steps": 300000, "batch_size": 64, "lr": 4.5e-6, "ema_decay": 0.9999, "log_every": 100,
                  "ckpt_every": 5000},
    },
}

DEFAULTS = {
    "network": {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                "dropout": 0.0, "num_head_channels": 32, "num_groups": 16},
    "diffusion": {"schedule": "linear", "T": 1000, "weight": 1.0},
    "classifier": {"hidden": 128, "dropout": 0.0, "max_features": 1024, "loss": "auto", "lambda": 0.05,
                   "cls_start": 200, "head_lr": 1.0e-3, "class_batch": 16, "cls_t_max": 1000},
    "train": {"steps": 2000, "batch_size": 32, "lr": 5.0e-4, "ema_decay": 0.999, "ema_warmup": True,
              "grad_clip": 1.0, "log_every": 25, "ckpt_every": 500},
    "explain": {"t_remove": 300, "t_add": 200, "scale_remove": 500.0, "scale_add": 200.0, "steps": "all",
                "sampler": "ddpm"},
    # the paper generates with DDIM, 50 steps (--sampler ddim --steps 50); with the CPU-trained demo model
    # those samples are noise-like, ancestral sampling over 250 steps gives radiographs (docs/methods/mediffusion.md)
    "sample": {"scale": 300.0, "steps": 250, "sampler": "ddpm"},
}
PRESETS = {
    "demo": {},  # the defaults: a 1.5M-parameter latent UNet for 16x16x4 latents, ~2000 CPU steps
    "paper": {  # appendix D (ChestX-ray14, >= 10% labels; 2%: lambda 5e-5, head_lr 1e-5; 5%: 1.5e-4, 2e-5)
        "network": {"model_channels": 256, "channel_mult": [1, 2, 4], "num_res_blocks": 2,
                    "attention_resolutions": [32, 16, 8], "num_head_channels": 32, "num_groups": 32},
        "classifier": {"hidden": 512, "max_features": 10000, "lambda": 0.001, "cls_start": 5000, "head_lr": 5.0e-5,
                       "class_batch": 32},
        "train": {"steps": 200000, "batch_size": 64, "lr": 5.0e-5, "ema_decay": 0.9999, "ema_warmup": False,
                  "log_every": 100, "ckpt_every": 5000},
    },
}


def _train_config(cfg: dict):
    from medcfx.train import TrainConfig

    return TrainConfig.from_dict(cfg)


# ------------------------------------------------------------------------------------------ autoencoder


def recon_metrics(codec_ae: KLAutoencoder, x: torch.Tensor, batch: int = 64) -> dict:
    """Reconstruction quality of x -> D(mu(x)) in [0, 1] intensity units: MAE, PSNR (peak 1), SSIM."""
    maes, mses, ssims = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            rec, _, _ = codec_ae(xb)
            a, b = (xb + 1) / 2, (rec.clamp(-1, 1) + 1) / 2
            maes.append((a - b).abs().flatten(1).mean(1))
            mses.append((a - b).pow(2).flatten(1).mean(1))
            ssims.append(ssim(a, b, data_range=1.0))
    mae, mse, s = torch.cat(maes), torch.cat(mses), torch.cat(ssims)
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-12))
    return {"recon_MAE": float(mae.mean()), "recon_PSNR": float(psnr.mean()), "recon_SSIM": float(s.mean()),
            "images": int(len(x))}


class AETrainer:
    def train(self, request) -> dict:
        from medcfx.train import fit, register_fit, start_run

        cfg = request.config
        pp = preprocess_config(cfg["preprocess"])
        ss = load_dataset(request.data, pp)
        rows = train_rows(ss)
        vf = float(cfg["val_fraction"])
        if not 0.0 <= vf < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {vf}")
        perm = np.random.Generator(np.random.PCG64(request.seed)).permutation(len(rows))
        n_val = int(round(vf * len(rows))) if len(rows) > 1 else 0
        val_rows, fit_rows = np.sort(rows[perm[:n_val]]), np.sort(rows[perm[n_val:]])
        x = images_tensor(ss, fit_rows)
        net_cfg = AEConfig.from_dict({**cfg["network"], "in_channels": int(x.shape[1])})
        if pp.size % net_cfg.factor:
            raise UsageError(f"preprocess.size {pp.size} is not a multiple of the downsampling factor {net_cfg.factor}")
        torch.manual_seed(request.seed)
        lw = cfg["loss"]
        ae = KLAutoencoder(net_cfg)
        disc = PatchDiscriminator(net_cfg.in_channels, int(lw["disc_channels"])) if float(lw["adv"]) > 0 else None
        module = AETrainModule(ae, disc)
        groups = [{"params": list(ae.parameters())}]
        if disc is not None:
            groups.append({"params": list(disc.parameters()), "lr": float(lw["disc_lr"])})
        weights = {k: float(lw[k]) for k in ("l1", "ssim", "kl", "adv")}
        zc, h = net_cfg.latent_channels, pp.size // net_cfg.factor
        request.log(f"mediffusion-ae: {len(fit_rows)} training images ({len(val_rows)} held out), {pp.size} px, "
                    f"latent {zc}x{h}x{h} (f={net_cfg.factor}), {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M parameters")

        def loss_fn(net, batch):
            xb = x[batch.indices].to(batch.device)
            noise = batch.randn(zc, h, h)
            return ae_loss(net, xb, noise, weights, adversarial=batch.step >= int(lw["disc_start"]))

        from medcfx.train import uniform_batches

        run = start_run(request, Path(request.data).name)
        result = fit(module, loss_fn, uniform_batches(len(x)), _train_config(cfg["train"]), run, seed=request.seed,
                     device=request.device, resume=request.resume, param_groups=groups)
        if run is None:
            return {"printed": True}
        ema_ae = result.ema.ae.cpu().eval()
        mu = LatentCodec(ema_ae, 1.0).encode(x)
        scale = float(1.0 / mu.std().clamp(min=1e-6))
        held = images_tensor(ss, val_rows) if len(val_rows) else x
        metrics = recon_metrics(ema_ae, held)
        metrics["recon_on"] = "held-out images" if len(val_rows) else "training images"
        metrics["final_loss"] = result.final_loss
        config = {"network": net_cfg.to_dict(), "preprocess": pp.to_dict(), "scale_factor": scale,
                  "latent_size": h, "loss": lw, "label_names": ss.label_names}
        entry = register_fit(request, dataclasses.replace(result, ema=ema_ae), "mediffusion-ae", config=config,
                             metrics=metrics)
        request.log(f"reconstruction on {metrics['images']} {metrics['recon_on']}: MAE {metrics['recon_MAE']:.4f}, "
                    f"PSNR {metrics['recon_PSNR']:.2f} dB, SSIM {metrics['recon_SSIM']:.4f}")
        return {"model": entry.ref, "run": str(run), "metrics": metrics}


class AEScorer:
    def evaluate(self, request) -> dict:
        from medcfx_mediffusion.data import default_model

        entry = request.registry.resolve(request.model or default_model(request.registry, ("mediffusion-ae", "mediffusion-ae-demo")))
        if entry.method != "mediffusion-ae":
            raise MedcfxError(f"--model {entry.ref} is a '{entry.method}' model, not a mediffusion-ae autoencoder")
        ae = KLAutoencoder(entry.config["network"])
        from medcfx.loading import load_state

        load_state(ae, request.registry.load_tensors(entry, "weights"), f"{entry.ref} (weights)")
        pp = _pp_of(entry.config["preprocess"])
        ss = load_dataset(request.data, pp)
        rows = eval_rows(ss)
        metrics = recon_metrics(ae.eval(), images_tensor(ss, rows))
        out = {"model": entry.ref, "data": str(request.data), **metrics}
        request.out.mkdir(parents=True, exist_ok=True)
        write_json(request.out / "metrics.json", out)
        write_json(request.out / "provenance.json", record(request, entry, {"rows": "test split" if len(rows) < len(ss) else "all"}))
        return out


def _pp_of(d: dict):
    from medcfx.data import PreprocessConfig

    return PreprocessConfig.from_dict(d)


# ------------------------------------------------------------------------------------------ joint model


class JointTrainer:
    def train(self, request) -> dict:
        from medcfx.train import fit, register_fit, start_run

        cfg = request.config
        opts = request.options
        reg = request.registry
        ae_entry = resolve_ae(reg, opts["ae"])
        ae_cfg = ae_entry.config
        pp = _pp_of(ae_cfg["preprocess"])
        ss = load_dataset(request.data, pp)
        if not ss.label_names:
            raise MedcfxError(f"--data {request.data}: no label columns; the classifier needs labels.csv findings")
        if list(ss.images.shape[1:2]) != [ae_cfg["network"]["in_channels"]]:
            raise MedcfxError(f"--data {request.data}: images have {ss.images.shape[1]} channels, the autoencoder "
                              f"{ae_entry.ref} expects {ae_cfg['network']['in_channels']}")
        rows = train_rows(ss)
        all_labels = np.asarray(ss.labels)[rows]
        labels = subsample_labels(all_labels, opts["label_fraction"], opts["label_seed"])
        labelled = np.flatnonzero(~np.isnan(labels).all(axis=1))
        ccfg = cfg["classifier"]
        kind = loss_kind(labels, ccfg["loss"])
        pw = pos_weights(labels) if kind == "bce" else np.ones(labels.shape[1], np.float32)
        # latents of every training image with the (frozen) autoencoder
        ae = KLAutoencoder(ae_cfg["network"])
        from medcfx.loading import load_state

        load_state(ae, reg.load_tensors(ae_entry, "weights"), f"{ae_entry.ref} (weights)")
        codec = LatentCodec(ae, ae_cfg["scale_factor"])
        latents = codec.encode(images_tensor(ss, rows))
        zc, h = int(latents.shape[1]), int(latents.shape[2])
        network = {**cfg["network"], "in_channels": zc, "out_channels": zc, "image_size": h}
        torch.manual_seed(request.seed)
        from medcfx.nn import UNet

        probe = UNet.from_config(network)
        pool = choose_pool(probe.feature_channels(), probe.feature_resolutions(), int(ccfg["max_features"]))
        del probe
        clf_cfg = {"hidden": int(ccfg["hidden"]), "dropout": float(ccfg["dropout"]), "pool": pool}
        torch.manual_seed(request.seed)
        model = build_joint(network, clf_cfg, labels.shape[1])
        dcfg = cfg["diffusion"]
        schedule = Schedule.create(dcfg["schedule"], int(dcfg["T"]))
        w_diff = float(dcfg["weight"])
        diffusion_batch = int(cfg["train"]["batch_size"]) if w_diff > 0 else 0
        class_batch = int(ccfg["class_batch"])
        if diffusion_batch + class_batch < 1:
            raise UsageError("train.batch_size + classifier.class_batch must be >= 1")
        cls_t_max = int(ccfg["cls_t_max"])
        if not 1 <= cls_t_max <= schedule.T:
            raise UsageError(f"classifier.cls_t_max must be in [1, {schedule.T}], got {cls_t_max}")
        lopts = {"diffusion_batch": diffusion_batch, "diffusion_weight": w_diff, "lambda": float(ccfg["lambda"]),
                 "cls_start": int(ccfg["cls_start"]), "cls_t_max": cls_t_max, "kind": kind,
                 "pos_weight": torch.from_numpy(pw)}
        labels_t = torch.from_numpy(labels)
        tcfg = dict(cfg["train"], batch_size=diffusion_batch + class_batch)
        groups = [{"params": list(model.unet.parameters())},
                  {"params": list(model.head.parameters()), "lr": float(ccfg["head_lr"])}]
        n_params = sum(p.numel() for p in model.parameters())
        request.log(f"mediffusion: {len(rows)} training images, {len(labelled)} labelled "
                    f"(label fraction {opts['label_fraction']:g}), findings {', '.join(ss.label_names)} ({kind}), "
                    f"latent {zc}x{h}x{h} from {ae_entry.ref}, {n_params / 1e6:.2f}M parameters, features pooled to {pool}x{pool}")
        run = start_run(request, Path(request.data).name)

        def loss_fn(net, batch):
            return joint_loss(net, batch, latents, labels_t, schedule, lopts)

        result = fit(model, loss_fn, joint_batches(len(latents), labelled, diffusion_batch, class_batch),
                     _train_config(tcfg), run, seed=request.seed, device=request.device, resume=request.resume,
                     param_groups=groups)
        if run is None:
            return {"printed": True}
        ema = result.ema.cpu().eval()
        metrics = {"final_loss": result.final_loss, "train_images": int(len(rows)), "labelled_images": int(len(labelled)),
                   "label_fraction": float(opts["label_fraction"])}
        # held-out check: the labelled training rows whose labels the fraction removed (none at 100%)
        dropped = np.flatnonzero(~np.isnan(all_labels).all(axis=1) & np.isnan(labels).all(axis=1))
        if len(dropped):
            probs = classify(ema, latents[dropped], kind)
            metrics.update({f"heldout_{k}": v for k, v in auroc_table(probs, all_labels[dropped], ss.label_names).items()})
            request.log(f"AUROC on the {len(dropped)} training images whose labels were left out: "
                        f"{metrics['heldout_mean_AUROC']:.3f}")
        config = {
            "network": network,
            "classifier": {**clf_cfg, "findings": ss.label_names, "kind": kind, "pos_weight": pw.tolist()},
            "diffusion": {"schedule": dcfg["schedule"], "T": int(dcfg["T"])},
            "preprocess": pp.to_dict(),
            "ae": {"ref": ae_entry.ref, "sha256": ae_entry.digest, "network": ae_cfg["network"],
                   "scale_factor": ae_cfg["scale_factor"], "latent_size": h},
            "training": {"label_fraction": float(opts["label_fraction"]), "label_seed": int(opts["label_seed"]),
                         "lambda": lopts["lambda"], "cls_start": lopts["cls_start"], "head_lr": float(ccfg["head_lr"]),
                         "diffusion_weight": w_diff, "cls_t_max": cls_t_max},
        }
        ae_path = reg.artifact_path(ae_entry, "weights")
        entry = register_fit(request, dataclasses.replace(result, ema=ema.unet), "mediffusion", config=config,
                             metrics=metrics, artifacts={"ae": ae_path}, modules={"head": ema.head})
        return {"model": entry.ref, "run": str(run), "metrics": metrics}


@torch.no_grad()
def classify(model, z: torch.Tensor, kind: str, t: int = 0, batch: int = 128) -> np.ndarray:
    """Per-finding probabilities of latents z at timestep t (default 0: clean latents)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(z), batch):
        zb = z[i:i + batch].to(dev)
        tt = torch.full((len(zb),), int(t), dtype=torch.int64, device=dev)
        out.append(probabilities(kind, model.logits(zb, tt)).cpu())
    return torch.cat(out).numpy()


def auroc_table(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """AUROC and AP per finding over its labelled rows (NaN when a class is absent), and their means."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out: dict = {}
    aucs, aps = [], []
    for k, name in enumerate(names):
        m = ~np.isnan(labels[:, k])
        y = labels[m, k].astype(int)
        if m.sum() == 0 or len(np.unique(y)) < 2:
            out[f"{name}_AUROC"] = float("nan")
            out[f"{name}_AP"] = float("nan")
            continue
        auc = float(roc_auc_score(y, probs[m, k]))
        ap = float(average_precision_score(y, probs[m, k]))
        out[f"{name}_AUROC"], out[f"{name}_AP"] = auc, ap
        aucs.append(auc)
        aps.append(ap)
    out["mean_AUROC"] = float(np.mean(aucs)) if aucs else float("nan")
    out["mean_AP"] = float(np.mean(aps)) if aps else float("nan")
    return out


class JointScorer:
    def predict(self, request) -> dict:
        model, codec, entry = load_joint(request.registry, request.model, request.device)
        ccfg = entry.config["classifier"]
        pp = _pp_of(entry.config["preprocess"])
        paths = expand_inputs(request.inputs)
        rows = []
        for p in paths:
            x, _ = read_input(p, pp, int(entry.config["ae"]["network"]["in_channels"]), log=request.log)
            probs = classify(model, codec.encode(x.to(request.device)).cpu(), ccfg["kind"])[0]
            rows.append({"file": str(p), **{f: round(float(v), 6) for f, v in zip(ccfg["findings"], probs)}})
        from rich.table import Table

        table = Table(title=f"mediffusion {entry.ref}: probability per finding")
        table.add_column("file")
        for f in ccfg["findings"]:
            table.add_column(f, justify="right")
        for r in rows:
            table.add_row(Path(r["file"]).name, *(f"{r[f]:.3f}" for f in ccfg["findings"]))
        if request.console is not None:
            request.console.print(table)
        if request.out is not None:
            request.out.mkdir(parents=True, exist_ok=True)
            import csv
            import io

            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["file", *ccfg["findings"]])
            for r in rows:
                w.writerow([r["file"], *(r[f] for f in ccfg["findings"])])
            atomic_write_bytes(request.out / "predictions.csv", buf.getvalue().encode())
            write_json(request.out / "provenance.json", record(request, entry, {"t": 0}, paths, predictions=rows))
        return {"printed": True} if request.console is not None else {"model": entry.ref, "predictions": rows}

    def evaluate(self, request) -> dict:
        model, codec, entry = load_joint(request.registry, request.model, request.device)
        ccfg = entry.config["classifier"]
        ss = load_dataset(request.data, _pp_of(entry.config["preprocess"]))
        findings = ccfg["findings"]
        missing = [f for f in findings if f not in ss.label_names]
        if missing:
            raise MedcfxError(f"--data {request.data}: no label column for {', '.join(missing)} (has: {', '.join(ss.label_names) or 'none'})")
        rows = eval_rows(ss)
        labels = np.asarray(ss.labels)[rows][:, [ss.label_names.index(f) for f in findings]]
        z = codec.encode(images_tensor(ss, rows).to(request.device)).cpu()
        probs = classify(model, z, ccfg["kind"])
        metrics = auroc_table(probs, labels, findings)
        out = {"model": entry.ref, "data": str(request.data), "images": int(len(rows)), **metrics}
        n_cf = int(request.options.get("cf_images", CF_IMAGES))
        quality = self._cf_quality(request, model, codec, entry, ss, rows, n_cf) if n_cf > 0 else None
        if quality is not None:
            out["counterfactual_quality"] = {**quality["settings"], **quality["summary"]}
        request.out.mkdir(parents=True, exist_ok=True)
        write_json(request.out / "metrics.json", out)
        if quality is not None:
            write_json(request.out / "counterfactual_quality.json", quality)
        lines = ["| finding | AUROC | AP |", "|---|---:|---:|"]
        for f in findings:
            lines.append(f"| {f} | {metrics[f + '_AUROC']:.4f} | {metrics[f + '_AP']:.4f} |")
        lines.append(f"| mean | {metrics['mean_AUROC']:.4f} | {metrics['mean_AP']:.4f} |")
        if quality is not None:
            lines += ["", _quality_text(out["counterfactual_quality"])]
        (request.out / "metrics.md").write_text("\n".join(lines) + "\n")
        write_json(request.out / "provenance.json", record(request, entry, {"rows": len(rows), "cf_images": n_cf}, []))
        if quality is not None:
            request.log(_quality_text(out["counterfactual_quality"]))
        return out

    def _cf_quality(self, request, model, codec, entry, ss, rows, n: int) -> dict:
        """Counterfactuals of at most ``n`` test images (the first rows labelled on the targets' starting
        side: positive for a removal, negative for an addition), each with its inversion self-check, flip
        and off-target change (quality.py); per case and summarised."""
        c = entry.config
        findings, kind = c["classifier"]["findings"], c["classifier"]["kind"]
        o = request.options
        schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
        spec = o.get("cf_target") or [f"no-{findings[0]}"]
        targets, t, scales, steps, sampler = cf_settings(spec, findings, request.config["explain"], schedule)
        limit = float(o.get("inversion_limit") or cq.INVERSION_LIMIT)
        lab = np.asarray(ss.labels)
        cols = [ss.label_names.index(tg.finding) for tg in targets]
        eligible = [int(r) for r in rows if all(lab[r, k] == (0.0 if tg.add else 1.0) for k, tg in zip(cols, targets))]
        chosen = eligible[:n]
        boxes = ss.bbox or {}
        masks, has_mask = ss.masks, (ss.has_mask if ss.masks is not None else None)
        request.log(f"counterfactual quality: {','.join(tg.name for tg in targets)} on {len(chosen)} of the "
                    f"{len(eligible)} test images labelled for it (t={t}, steps {steps}, {sampler}; two reverse "
                    f"chains per image)")
        cases = []
        for r in chosen:
            x = images_tensor(ss, np.array([r])).to(request.device)
            x_cf, x_ae, x_inv, z0 = run_counterfactual(model, codec, schedule, x, kind, targets, scales, t, steps,
                                                       sampler, int(request.seed))
            before = classify(model, z0.cpu(), kind)[0]
            after = classify(model, codec.encode(x_cf.clamp(-1, 1).to(request.device)).cpu(), kind)[0]
            u_in = _unit(x[0].cpu())
            diff = np.abs(_unit(x_cf[0]) - u_in).mean(axis=0)
            region = cq.box_region([boxes[tg.finding][r] for tg in targets if tg.finding in boxes], diff.shape)
            source = "box" if region is not None else None
            if region is None and masks is not None and bool(has_mask[r]):
                region, source = np.asarray(masks[r]) > 0, "mask"
            inversion = cq.inversion_check(u_in, _unit(x_inv[0]), limit)
            inversion["autoencoder_error"] = float(np.abs(_unit(x_ae[0]) - u_in).mean())
            q = cq.case_quality(findings, targets, before, after, inversion, diff, region, source)
            cases.append({"case": str(ss.case_ids[r]), "probabilities": {
                f: {"before": float(b), "after": float(a)} for f, b, a in zip(findings, before, after)}, **q})
            request.log(f"  {ss.case_ids[r]}: {cq.case_line(q)}")
        settings = {"targets": [tg.name for tg in targets], "t": t, "scales": scales, "steps": steps,
                    "sampler": sampler, "seed": int(request.seed), "eligible_images": len(eligible),
                    "selection": "the first test rows labelled positive for each removed finding and negative for "
                                 "each added one"}
        return {"settings": settings, "summary": cq.summarise(cases), "cases": cases}


def _quality_text(q: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"Counterfactual quality ({', '.join(q['targets'])}, {q['cases']} test images): inversion self-check "
            f"error mean {f(q['inversion_error_mean'], '.4f')}, median {f(q['inversion_error_median'], '.4f')}, "
            f"flagged {q['flagged']} of {q['inversion_checked']} (limit {f(q['inversion_limit'], 'g')}); flip rate "
            f"{f(q['flip_rate'], '.2f')} over {q['flip_counted']}; off-target probability change "
            f"{f(q['off_target_probability_change_mean'], '.3f')}; off-target image change "
            f"{f(q['off_target_image_change_mean'], '.4f')} ({q['off_target_image_cases']} with a box or mask).")


def _titles_text(findings, before, after) -> list[str]:
    return [f"{f}: {b:.2f} -> {a:.2f}" for f, b, a in zip(findings, before, after)]


def _with_text(img, lines: list[str]):
    """The panel image with lines of text below it (white on black)."""
    from PIL import Image, ImageDraw

    h = 14 * len(lines) + 8
    canvas = Image.new("RGB", (img.width, img.height + h), (0, 0, 0))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, img.height + 4 + 14 * i), line, fill=(255, 255, 255))
    return canvas


def _unit(x: torch.Tensor) -> np.ndarray:
    """[C, S, S] model image in [-1, 1] -> [C, S, S] in [0, 1]."""
    return ((x.clamp(-1, 1) + 1) / 2).numpy()


def _gray_u8(u: np.ndarray) -> np.ndarray:
    a = u[0] if u.shape[0] == 1 else np.moveaxis(u, 0, -1)
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def cf_settings(target_spec, findings: list[str], ecfg: dict, schedule, t=None, scale=None, steps=None,
                sampler=None):
    """(targets, t, scales, steps, sampler) of a counterfactual: the given values, else the ``explain``
    config's (t: t_remove when any target is a removal, else t_add; scale per target by its direction);
    t / steps / sampler are checked before any work."""
    targets = cf.parse_targets(target_spec, findings)
    removing = any(not tg.add for tg in targets)
    t = int(t) if t is not None else int(ecfg["t_remove"] if removing else ecfg["t_add"])
    scales = [float(scale) if scale is not None else float(ecfg["scale_add"] if tg.add else ecfg["scale_remove"])
              for tg in targets]
    steps = steps if steps is not None else ecfg["steps"]
    sampler = sampler or ecfg["sampler"]
    cf.chain(schedule, t, steps)  # check t / steps before any work
    if sampler not in ("ddpm", "ddim"):
        raise UsageError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    return targets, t, scales, steps, sampler


def run_counterfactual(model, codec, schedule, x: torch.Tensor, kind: str, targets, scales, t: int, steps,
                       sampler: str, seed: int, self_check: bool = True):
    """(x_cf, x_ae, x_inv, z0) for images x [B, C, S, S] in [-1, 1] on the model's device: x_cf the decoded
    guided counterfactual, x_ae = D(E(x)) and x_inv the inversion self-check, i.e. the same forward noising
    and the same reverse chain with guidance scale 0, drawn from a fresh generator with the same seed (so
    the same noise throughout), decoded (None without ``self_check``); images on the CPU."""
    z0 = codec.encode(x)
    z_cf = cf.counterfactual(model, schedule, z0, kind, targets, scales, t, steps, sampler,
                             torch.Generator().manual_seed(int(seed)))
    x_inv = None
    if self_check:
        z_inv = cf.counterfactual(model, schedule, z0, kind, targets, [0.0] * len(targets), t, steps, sampler,
                                  torch.Generator().manual_seed(int(seed)))
        x_inv = codec.decode(z_inv).cpu()
    return codec.decode(z_cf).cpu(), codec.decode(z0).cpu(), x_inv, z0


class JointSampler:
    def explain(self, request) -> dict:
        model, codec, entry = load_joint(request.registry, request.model, request.device)
        c = entry.config
        ccfg, ecfg = c["classifier"], request.config["explain"]
        findings = ccfg["findings"]
        o = request.options
        schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
        targets, t, scales, steps, sampler = cf_settings(o["target"], findings, ecfg, schedule, o["t"], o["scale"],
                                                         o["steps"], o["sampler"])
        pp = _pp_of(c["preprocess"])
        channels = int(c["ae"]["network"]["in_channels"])
        paths = expand_inputs(request.inputs)
        out = Path(request.out)
        self_check = bool(o.get("self_check", True))
        limit = float(o.get("inversion_limit") or cq.INVERSION_LIMIT)
        params = {"targets": [tg.name for tg in targets], "t": t, "scales": scales, "steps": steps, "sampler": sampler,
                  "noising": "forward q_sample to t", "guidance": "eps - sqrt(1-abar_t) * grad sum_j s_j log p_j",
                  "diff": "|counterfactual - input| (intensity in [0, 1], channel mean)",
                  "self_check": ("the same noising and reverse chain with guidance scale 0 (same seed), decoded; "
                                 f"error = mean |input - reconstruction| in [0, 1], flagged above {limit:g}")
                  if self_check else "off"}
        results = []
        used: set[str] = set()
        log = CaseLog()  # an image that cannot be read is reported at the end; the others go on
        for path in paths:
            name = _unique(Path(path).stem, used)
            with log.case(str(path), Path(path).name):
                x, geom = read_input(path, pp, channels, log=request.log)
                results.append(self._explain_one(request, entry, model, codec, schedule, path, x, geom, out / name,
                                                 targets, scales, t, steps, sampler, params,
                                                 limit if self_check else None))
        if self_check and results:
            n_flag = sum(bool(r["quality"]["inversion"]["flagged"]) for r in results)
            request.log(f"self-check: {n_flag} of {len(results)} case(s) flagged (unguided reconstruction error "
                        f"above {limit:g})")
        return log.finish({"printed": True} if request.console is not None else {"model": entry.ref, "outputs": results})

    def _explain_one(self, request, entry, model, codec, schedule, path, x, geom, final: Path, targets, scales,
                     t, steps, sampler, params, limit) -> dict:
        findings, kind = entry.config["classifier"]["findings"], entry.config["classifier"]["kind"]
        x = x.to(request.device)
        x_cf, x_rec, x_inv, z0 = run_counterfactual(model, codec, schedule, x, kind, targets, scales, t, steps,
                                                    sampler, int(request.seed), self_check=limit is not None)
        before = classify(model, z0.cpu(), kind)[0]
        after = classify(model, codec.encode(x_cf.clamp(-1, 1).to(request.device)).cpu(), kind)[0]
        u_in, u_cf, u_rec = _unit(x[0].cpu()), _unit(x_cf[0]), _unit(x_rec[0])
        diff = np.abs(u_cf - u_in).mean(axis=0)
        inversion = None
        if x_inv is not None:
            inversion = cq.inversion_check(u_in, _unit(x_inv[0]), limit)
            inversion["autoencoder_error"] = float(np.abs(u_rec - u_in).mean())
        quality = cq.case_quality(findings, targets, before, after, inversion)
        with OutputDir(final.parent, final.name) as folder:
            viz.save_png(_gray_u8(geom.to_original(u_cf[None])), folder / "counterfactual.png")
            orig_diff = geom.to_original(diff[None])
            viz.save_png(viz.heat_rgb(orig_diff, vmax=max(float(diff.max()), 1e-6)), folder / "difference.png")
            tiles = [_gray_u8(u_in), _gray_u8(u_rec), _gray_u8(u_cf), viz.heat_rgb(diff), viz.overlay(_gray_u8(u_in), diff)]
            titles = ["input", "AE recon", "counterfactual", f"|diff| max {diff.max():.2f}", "overlay"]
            lines = [f"target {','.join(tg.name for tg in targets)}  t={t}  scale={','.join(f'{s:g}' for s in scales)}",
                     "probability before -> after:", *_titles_text(findings, before, after)]
            if inversion is not None:
                lines.append(f"self-check |x - unguided rec| {inversion['error']:.3f} (limit {inversion['limit']:g})"
                             + (": MAP NOT TRUSTWORTHY" if inversion["flagged"] else ": ok"))
            viz.save_png(_with_text(viz.panel(tiles, titles, scale=3), lines), folder / "panel.png")
            probs = {f: {"before": float(b), "after": float(a)} for f, b, a in zip(findings, before, after)}
            write_json(folder / "provenance.json", record(request, entry, params, [path], probabilities=probs,
                                                         diff_max=float(diff.max()), diff_mean=float(diff.mean()),
                                                         quality=quality))
        request.log(f"{path}: " + ", ".join(f"{f} {b:.2f}->{a:.2f}" for f, b, a in zip(findings, before, after))
                    + f"; {cq.case_line(quality)}  -> {final}")
        if inversion is not None and inversion["flagged"]:
            request.log(cq.warning_text(path, inversion))
        return {"input": str(path), "folder": str(final), "probabilities": probs, "quality": quality}

    def sample(self, request) -> dict:
        model, codec, entry = load_joint(request.registry, request.model, request.device)
        c = entry.config
        ccfg, scfg = c["classifier"], request.config["sample"]
        findings, kind = ccfg["findings"], ccfg["kind"]
        o = request.options
        targets = cf.parse_targets(o["target"], findings) if o["target"] else []
        scale = float(o["scale"]) if o["scale"] is not None else float(scfg["scale"])
        scales = [scale] * len(targets)
        steps = o["steps"] if o["steps"] is not None else scfg["steps"]
        sampler = o["sampler"] or scfg["sampler"]
        schedule = Schedule.create(c["diffusion"]["schedule"], int(c["diffusion"]["T"]))
        grid = cf.chain(schedule, schedule.T - 1, steps)
        n = int(request.extra["n"])
        zc, h = int(c["network"]["in_channels"]), int(c["network"]["image_size"])
        g = torch.Generator().manual_seed(int(request.seed))
        den = cf.guided_denoiser(model, schedule, kind, targets, scales)
        images, probs = [], []
        for i in range(0, n, 16):
            b = min(16, n - i)
            z_T = torch.randn((b, zc, h, h), generator=g)
            z0 = cf.reverse(den, z_T.to(request.device), grid, sampler, g)
            x = codec.decode(z0).cpu().clamp(-1, 1)
            probs.append(classify(model, codec.encode(x.to(request.device)).cpu(), kind))
            images.append(x)
        x = torch.cat(images)
        p = np.concatenate(probs)
        out = Path(request.out)
        with staged_folder(out) as folder:
            tiles = [_gray_u8(_unit(xi)) for xi in x]
            per_row = int(np.ceil(np.sqrt(n)))
            rows = [tiles[r:r + per_row] for r in range(0, n, per_row)]
            titles = [[" ".join(f"{pi[k]:.2f}" for k in range(len(findings))) for pi in p[r:r + per_row]] for r in range(0, n, per_row)]
            viz.save_png(viz.grid(rows, titles, scale=2), folder / "samples.png")
            for j, tile in enumerate(tiles):
                viz.save_png(tile, folder / f"sample_{j:03d}.png")
            params = {"targets": [tg.name for tg in targets], "scale": scale, "steps": steps, "sampler": sampler,
                      "n": n, "grid titles": "probabilities in the order " + ", ".join(findings)}
            write_json(folder / "provenance.json", record(request, entry, params, [], probabilities=[
                {f: float(v) for f, v in zip(findings, pi)} for pi in p]))
        mean = {f: float(p[:, k].mean()) for k, f in enumerate(findings)}
        request.log(f"wrote {n} samples to {out} (mean probability: " + ", ".join(f"{f} {v:.2f}" for f, v in mean.items()) + ")")
        return {"model": entry.ref, "out": str(out), "mean_probability": mean, "printed": request.console is not None}


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


# ------------------------------------------------------------------------------------------ registration

CF_IMAGES = 8  # test images whose counterfactuals evaluate checks by default
INVERSION_OPTION = Option("inversion_limit", float, cq.INVERSION_LIMIT,
                          "self-check limit: mean |input - unguided reconstruction| (intensity 0-1) above which "
                          "a case is flagged", bounds="(0, inf)")
TARGET_HELP = "<finding> adds it, no-<finding> removes it; comma-separated for several (e.g. no-cardiomegaly,no-effusion)"


def methods() -> list[Method]:
    ae_defaults = copy.deepcopy(AE_DEFAULTS)
    ae_defaults["presets"] = copy.deepcopy(AE_PRESETS)
    defaults = copy.deepcopy(DEFAULTS)
    defaults["presets"] = copy.deepcopy(PRESETS)
    return [
        Method(
            name="mediffusion-ae",
            summary="KL autoencoder for mediffusion's latent space (L1 + SSIM + small KL, optional patch GAN)",
            capabilities={"train", "evaluate"},
            trainer=AETrainer(), scorer=AEScorer(), input_channels=(1, 3), defaults=ae_defaults,
            deterministic={"evaluate": "mediffusion-ae evaluate decodes the posterior mean (deterministic)"},
        ),
        Method(
            name="mediffusion",
            summary="joint latent diffusion classifier (Kaleta et al. 2025): semi-supervised, self-explaining",
            capabilities={"train", "explain", "sample", "predict", "evaluate"},
            trainer=JointTrainer(), sampler=JointSampler(), scorer=JointScorer(), input_channels=(1, 3),
            conditioning=("classifier",), targets=("<finding>", "no-<finding>"), defaults=defaults,
            deterministic={"predict": "mediffusion classifies the clean latent (deterministic)"},
            options={
                "train": [
                    Option("label_fraction", float, 1.0, "share of the labelled images whose labels are used (0-1]",
                           bounds="(0, 1]"),
                    Option("label_seed", int, 0, "seed of the (nested) label subsampling"),
                    Option("ae", str, "mediffusion-ae", "registry reference of the trained autoencoder"),
                ],
                "explain": [
                    Option("target", list, [], TARGET_HELP),
                    Option("t", int, None, "noise the latent to this timestep (default 300 to remove, 200 to add)",
                           bounds="[1, inf)"),
                    Option("scale", float, None, "guidance scale for every target (default 500 to remove, 200 to add)",
                           bounds="[0, inf)"),
                    Option("steps", str, None, "reverse steps from t to 0: a number or 'all' (default all)"),
                    Option("sampler", str, None, "ddpm (ancestral, default) or ddim", choices=("ddpm", "ddim")),
                    Option("self_check", bool, True, "inversion self-check: the same chain unguided, its error "
                                                     "reported and the case flagged above --inversion-limit "
                                                     "(--self-check=false skips it, about a third of the time)"),
                    INVERSION_OPTION,
                ],
                "evaluate": [
                    Option("cf_images", int, CF_IMAGES, "test images with a counterfactual quality check (0: "
                                                        "none); each runs a guided and an unguided reverse chain "
                                                        "(explain.* settings)", bounds="[0, inf)"),
                    Option("cf_target", list, [], "target(s) of the quality check (default no-<first finding>)"),
                    INVERSION_OPTION,
                ],
                "sample": [
                    Option("target", list, [], TARGET_HELP + "; none: unguided"),
                    Option("scale", float, None, "guidance scale (default 300)", bounds="[0, inf)"),
                    Option("steps", str, None, "reverse steps from T to 0 (default 250; the paper: DDIM 50)"),
                    Option("sampler", str, None, "ddpm (ancestral, default) or ddim (the paper's)", choices=("ddpm", "ddim")),
                ],
            },
        ),
    ]
