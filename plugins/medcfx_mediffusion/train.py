"""``medcfx train``: the KL autoencoder (``mediffusion-ae``: L1 + SSIM + small KL, optional patch GAN, then
the latent scale factor and the reconstruction quality on held-out images) and the joint model
(``mediffusion``: latent diffusion + classifier head on the frozen autoencoder's latents, semi-supervised
through --label-fraction)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from medcfx.diffusion import Schedule
from medcfx.errors import MedcfxError, UsageError

from medcfx_mediffusion.autoencoder import AEConfig, AETrainModule, KLAutoencoder, PatchDiscriminator, ae_loss
from medcfx_mediffusion.config import train_config
from medcfx_mediffusion.data import (
    LatentCodec,
    images_tensor,
    load_dataset,
    preprocess_config,
    resolve_ae,
    stored_preprocess,
    train_rows,
)
from medcfx_mediffusion.joint import (
    build_joint,
    choose_pool,
    classify,
    joint_batches,
    joint_loss,
    loss_kind,
    pos_weights,
    subsample_labels,
)
from medcfx_mediffusion.scoring import auroc_table, recon_metrics


def train_autoencoder(request) -> dict:
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
    result = fit(module, loss_fn, uniform_batches(len(x)), train_config(cfg["train"]), run, seed=request.seed,
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


def train_joint(request) -> dict:
    from medcfx.train import fit, register_fit, start_run

    cfg = request.config
    opts = request.options
    reg = request.registry
    ae_entry = resolve_ae(reg, opts["ae"])
    ae_cfg = ae_entry.config
    pp = stored_preprocess(ae_cfg["preprocess"])
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
                 train_config(tcfg), run, seed=request.seed, device=request.device, resume=request.resume,
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
