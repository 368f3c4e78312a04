"""Configuration of the restoration plugin: the paper's setting and a CPU-sized demo.

``paper`` follows Baugh et al. 2024 and, where the paper is silent, the authors' public code
(img-cond-diffusion-model-ad): a diffusers-style UNet (blocks of 128, 256, 256, 512 channels, 2 ResBlocks
per level, attention at the three lower resolutions with 8-channel heads, additive time embedding,
convolutional down/upsampling, no dropout) on 128 x 128 single-contrast slices (T2, the paper's
BraTS-T2 setting), the corrupted image concatenated as extra input channels; T = 1000 linear betas,
epsilon prediction with min-SNR weighting (gamma 1) and noise offset 0.1; AdamW lr 1e-4, weight decay
0.01, 500 warm-up steps, EMA 0.9999, batch 32, up to 500k steps with validation every 500 steps and early
stopping after 100 validations without improvement. Sampling: 50 DDPM steps (timesteps 980, 960, ..., 0 as
diffusers' DDPMScheduler.set_timesteps(50)), x0 clipped to [-1, 1].

``demo`` is a 0.35M-parameter UNet at 48 x 48 that trains on one CPU core in about 45 minutes
(8000 steps of 32 slices, bf16 autocast; 2.8-3.2 steps/s measured with one thread per run). 8000 steps and
not the earlier 2000: chosen on the validation set (benchmarks/restoration_study.py; pixel AP 0.126 -> 0.396
with the 1 - SSIM map, the validation loss still falling at 8000).
"""

from __future__ import annotations

from medcfx.anomalies import AnomalyConfig

PAPER_NETWORK = {
    "in_channels": 1, "out_channels": 1, "image_size": 128, "model_channels": 128, "channel_mult": [1, 2, 2, 4],
    "num_res_blocks": 2, "attention_resolutions": [64, 32, 16], "dropout": 0.0, "num_head_channels": 8,
    "resblock_updown": False, "use_scale_shift_norm": False, "num_groups": 32,
}
DEMO_NETWORK = {
    **PAPER_NETWORK, "image_size": 48, "model_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
    "attention_resolutions": [12], "num_head_channels": 16, "resblock_updown": True,
    "use_scale_shift_norm": True, "num_groups": 8,
}

DEFAULTS = {
    "network": PAPER_NETWORK,  # in/out (and conditioning) channels follow the data
    "diffusion": {"schedule": "linear", "T": 1000},
    "preprocess": {"size": 128, "modalities": ["t2"], "percentile": 99.0, "clip": True, "axis": 2,
                   "min_foreground": 0.05, "intensity": "percentile"},
    "train": {"steps": 500000, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01, "ema_decay": 0.9999,
              "ema_warmup": True, "grad_clip": 1.0, "bf16": False, "warmup_steps": 500, "log_every": 100,
              "ckpt_every": 5000, "val_every": 500, "early_stopping": 100},
    "loss": {"snr_gamma": 1.0, "noise_offset": 0.1},  # min-SNR weighting (0: off), offset noise (0: off)
    "fold": 0,  # cross-validation fold 0..9: 3 training tasks, 2 validation tasks
    "no_task_prob": 0.2,  # share of training samples left uncorrupted (the paper's 20%)
    "anomalies": AnomalyConfig().to_dict(),
    # inter-dataset blending source: another dataset (null: the training images with inverted contrast)
    "foreign": {"data": None, "modalities": None},
    "val_cases": 0.1,  # share of the healthy training cases held out for the validation loss
    "val_slices": 64,  # held-out slices, corrupted with the fold's validation tasks
    # samples: restorations per model whose maps are averaged (1: the paper; an ensemble averages each member's)
    "explain": {"steps": 50, "map": "ssim", "batch_size": 16, "noise_level": 0.5, "samples": 1},
    "presets": {
        "paper": {},
        "demo": {
            "network": DEMO_NETWORK,
            "preprocess": {"size": 48},
            "train": {"steps": 8000, "batch_size": 32, "lr": 3e-4, "ema_decay": 0.999, "bf16": True,
                      "warmup_steps": 100, "log_every": 25, "ckpt_every": 250, "val_every": 250,
                      "early_stopping": 0},
            "val_slices": 32,
        },
    },
}


def network_config(config: dict, channels: int, conditional: bool) -> dict:
    """The UNet config of a run: in/out channels = the data's channels; the corrupted image enters as
    ``channels`` extra input channels (``cond_image_channels``) when ``conditional``."""
    net = dict(config["network"])
    net.update(in_channels=channels, out_channels=channels, cond_image_channels=channels if conditional else 0,
               image_size=int(config["preprocess"]["size"]))
    return net
