"""Networks and configuration presets of the sanchez plugin.

The denoiser is medcfx's UNet. ``paper`` reproduces Sanchez et al.'s BraTS network (64x64x4 input, 64
base channels, mult (1,2,3,4), 2 res blocks, attention at 32/16/8, tau(c) a 256x256 token matrix:
27.2M parameters, 22.9 GFLOP per forward) and optimiser (AdamW 1e-4, weight decay 0.01, batch 64, EMA
0.9999, 50k iterations). ``demo`` is a 1.4M-parameter network at 48 x 48 sized to train on one CPU core
in under an hour on the synthetic demo brains (2000 steps of 32 slices, bf16 autocast).

``NoisyClassifier`` is the noise-aware classifier of the CDPM + classifier baseline (Wolleb et al. 2022,
after Dhariwal & Nichol): the UNet's encoder half with the time embedding, global average pooling and a
linear head over {healthy, unhealthy}.
"""

from __future__ import annotations

import torch
from torch import nn

from medcfx.nn.blocks import GroupNorm32, timestep_embedding
from medcfx.nn.unet import HalfUNetConfig, UNetEncoderPath

PAPER_NETWORK = {  # one attention head, as the authors' code (num_heads 1, no num_head_channels)
    "in_channels": 4, "out_channels": 4, "image_size": 64, "model_channels": 64, "channel_mult": [1, 2, 3, 4],
    "num_res_blocks": 2, "attention_resolutions": [32, 16, 8], "dropout": 0.1, "num_head_channels": 0,
    "num_heads": 1, "num_classes": 2, "label_in_time_embedding": True, "attention_conditioning": True,
    "label_tokens": 256, "label_token_dim": 256, "num_groups": 32,
}
DEMO_NETWORK = {
    **PAPER_NETWORK, "image_size": 48, "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
    "attention_resolutions": [12], "dropout": 0.0, "num_head_channels": 32, "num_heads": 0, "label_tokens": 8,
    "label_token_dim": 64, "num_groups": 16,
}
PAPER_CLASSIFIER = {  # the encoder half of the paper network, 2 logits
    "in_channels": 4, "image_size": 64, "out_dim": 2, "model_channels": 64, "channel_mult": [1, 2, 3, 4],
    "num_res_blocks": 2, "attention_resolutions": [32, 16, 8], "dropout": 0.1, "num_head_channels": 64,
    "num_groups": 32,
}
DEMO_CLASSIFIER = {**PAPER_CLASSIFIER, "image_size": 48, "model_channels": 32, "channel_mult": [1, 2, 2],
                   "num_res_blocks": 1, "attention_resolutions": [12], "dropout": 0.0, "num_head_channels": 32,
                   "num_groups": 16}

DEFAULTS = {
    "conditioning": "attention",  # attention (label tokens in every attention layer + AdaGN) | adagn (baseline)
    "network": PAPER_NETWORK,
    "classifier": PAPER_CLASSIFIER,
    "diffusion": {"schedule": "linear", "T": 1000},
    "preprocess": {"size": 64, "modalities": ["t1", "t1ce", "t2", "flair"], "percentile": 99.0, "clip": True,
                   "axis": 2, "min_foreground": 0.05, "intensity": "percentile"},
    "train": {"steps": 50000, "batch_size": 64, "lr": 1e-4, "weight_decay": 0.01, "ema_decay": 0.9999,
              "ema_warmup": False, "grad_clip": 1.0, "bf16": False, "warmup_steps": 0, "log_every": 50,
              "ckpt_every": 2000, "val_every": 0, "early_stopping": 0},
    "cfg_dropout": 0.35,  # share of labels replaced by the null label in each batch
    "val_cases": 0.1,  # share of the training cases held out for validation metrics (at least 1)
    "val_slices": 32,  # validation slices scored after training (with the explain defaults)
    "explain": {"sampler": "fast", "guidance": 3.0, "noise_level": 0.75, "steps": 100, "dn_percentile": 0.99,
                "solver": "ddim", "guidance_interval": "0:1", "reuse_inversion": False, "batch_size": 8},
    "presets": {
        "paper": {},
        "demo": {
            "network": DEMO_NETWORK,
            "classifier": DEMO_CLASSIFIER,
            "preprocess": {"size": 48},
            "train": {"steps": 2000, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.01, "ema_decay": 0.999,
                      "ema_warmup": True, "bf16": True, "warmup_steps": 100, "log_every": 25, "ckpt_every": 250},
            "val_slices": 24,
        },
    },
}


class NoisyClassifier(nn.Module):
    """logits = head(pool(encoder_half(x_t, emb(t))))  — a classifier of noisy images x_t at timestep t."""

    def __init__(self, config: dict | HalfUNetConfig):
        super().__init__()
        cfg = HalfUNetConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = cfg
        mc, emb = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.encoder = UNetEncoderPath(cfg, emb_channels=emb, z_dim=0, token_dim=0, use_scale_shift_norm=True)
        ch = self.encoder.out_channels
        self.norm = GroupNorm32(cfg.num_groups, ch)
        self.head = nn.Linear(ch, cfg.out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h, _, _ = self.encoder(x, emb)
        return self.head(torch.nn.functional.silu(self.norm(h)).mean(dim=(2, 3))).float()


def network_config(config: dict, unconditional: bool = False) -> dict:
    """The UNet config for a run: the conditioning option applied, or no label at all (CDPM baselines)."""
    net = dict(config["network"])
    if unconditional:
        net.update(num_classes=0, attention_conditioning=False)
    elif config["conditioning"] == "adagn":
        net.update(attention_conditioning=False, label_in_time_embedding=True)
    elif config["conditioning"] == "attention":
        net.update(attention_conditioning=True)
    else:
        from medcfx.errors import UsageError

        raise UsageError(f"conditioning must be 'attention' or 'adagn', got {config['conditioning']!r}")
    return net
