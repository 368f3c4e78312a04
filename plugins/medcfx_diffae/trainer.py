"""``medcfx train diffae --data images/``: unsupervised training of the diffusion autoencoder.

Every image of the dataset is used (labels, if any, are ignored). The loss is the epsilon MSE of the
z_sem-conditioned UNet with z_sem = Enc(x_0) computed inside the same forward pass, so one optimiser
trains the encoder and the denoiser jointly (Atad et al. eq. 1; Preechakul et al. 2022).
"""

from __future__ import annotations

from pathlib import Path

from medcfx.errors import MedcfxError, UsageError

from medcfx_diffae.model import build


def check_config(cfg: dict) -> None:
    """The three places that fix the image size and channel count must agree."""
    net, enc, prep = cfg["network"], cfg["encoder"], cfg["preprocess"]
    if not (int(net["image_size"]) == int(enc["image_size"]) == int(prep["size"])):
        raise UsageError(f"diffae config: network.image_size ({net['image_size']}), encoder.image_size "
                         f"({enc['image_size']}) and preprocess.size ({prep['size']}) must be equal")
    ch = prep.get("image_channels")
    if ch is not None and int(ch) != int(net["in_channels"]):
        raise UsageError(f"diffae config: preprocess.image_channels ({ch}) must equal network.in_channels "
                         f"({net['in_channels']})")
    if int(net["out_channels"]) != int(net["in_channels"]):
        raise UsageError("diffae config: network.out_channels must equal network.in_channels (eps prediction)")
    for key in ("encode_steps", "decode_steps"):
        steps = cfg["sample"][key]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= int(cfg["diffusion"]["T"]):
            raise UsageError(f"diffae config: sample.{key} must be an integer in [1, T], got {steps!r}")


def load_images(data: Path, prep: dict):
    """All images of a dataset as a float32 tensor [N, C, S, S] in [-1, 1] (and the SliceSet)."""
    import numpy as np
    import torch

    from medcfx.data import prepare

    from medcfx_diffae.model import preprocess_config

    ss = prepare(data, preprocess_config(prep))
    if len(ss) == 0:
        raise MedcfxError(f"--data {data}: no images found")
    return torch.from_numpy(np.array(ss.images, dtype=np.float32, copy=True)), ss


class Trainer:
    def train(self, request):
        import torch

        from medcfx.diffusion import Schedule
        from medcfx.diffusion.losses import eps_loss
        from medcfx.train import TrainConfig, fit, register_fit, start_run, uniform_batches

        cfg = request.config
        check_config(cfg)
        tcfg = TrainConfig.from_dict(cfg["train"])
        images, ss = load_images(request.data, cfg["preprocess"])
        if images.shape[1] != int(cfg["network"]["in_channels"]):
            raise UsageError(f"--data {request.data}: images have {images.shape[1]} channel(s), the network expects "
                             f"{cfg['network']['in_channels']} (set preprocess.image_channels / network.in_channels)")
        torch.manual_seed(request.seed)
        model = build(cfg)
        schedule = Schedule.create(cfg["diffusion"]["schedule"], int(cfg["diffusion"]["T"]))
        request.log(f"diffae: {len(images)} images of {tuple(images.shape[1:])}, UNet "
                    f"{sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f}M + encoder "
                    f"{sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M parameters")
        device = torch.device(request.device)
        data = images.to(device)

        def loss_fn(net, batch):
            x0 = data[batch.indices.to(device)]
            return eps_loss(net, x0, schedule, batch, cond={"x0": x0}), {}

        run = start_run(request, Path(request.data).name)
        result = fit(model, loss_fn, uniform_batches(len(images)), tcfg, run, seed=request.seed,
                     device=request.device, resume=request.resume)
        if run is None:
            return {"printed": True}
        config = {k: cfg[k] for k in ("network", "encoder", "diffusion", "preprocess", "sample")}
        entry = register_fit(request, result, "diffae", config=config,
                             metrics={"final_loss": result.final_loss, "images": len(images)})
        return {"model": entry.ref, "run": str(run), "steps": result.step, "final_loss": result.final_loss}
