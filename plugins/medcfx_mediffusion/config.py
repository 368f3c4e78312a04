"""Settings of the plugin's two methods: the defaults and presets of ``mediffusion-ae`` (the latent
autoencoder) and ``mediffusion`` (the joint diffusion classifier), and the training-loop settings built
from them."""

from __future__ import annotations

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

CF_IMAGES = 8  # test images whose counterfactuals evaluate checks by default


def train_config(cfg: dict):
    from medcfx.train import TrainConfig

    return TrainConfig.from_dict(cfg)
