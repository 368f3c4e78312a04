"""The settings a user may change: every leaf key of a method's defaults, with a one-line meaning.

``medcfx methods NAME`` lists them (table and ``--json``); each is what ``--set KEY=VALUE`` (or a ``-c``
YAML file) may change. A key is *dotted* (``train.steps``, ``network.channel_mult``); ``presets`` is not a
setting but a set of named overrides (``--preset NAME``), listed separately by :func:`presets`.

Meanings come from :data:`MEANINGS` (exact dotted keys) and, for the keys of a network section
(``network``, ``classifier``, ``encoder``), from :data:`NETWORK_MEANINGS` by the key's last part. Keys
without a known meaning are listed with an empty one. No torch import here: ``medcfx methods`` stays fast.
"""

from __future__ import annotations

from typing import Any

# the sections whose keys are those of medcfx's UNet / half-UNet configs (medcfx/nn/unet.py)
NETWORK_SECTIONS = ("network", "classifier", "encoder")

NETWORK_MEANINGS = {
    "in_channels": "input channels (MRI contrasts / grey 1 / RGB 3)",
    "out_channels": "output channels of the denoiser",
    "image_size": "side of the square input in pixels",
    "model_channels": "base width (channels at the first level)",
    "channel_mult": "width multiplier per resolution level (one level per entry)",
    "num_res_blocks": "residual blocks per level",
    "attention_resolutions": "feature-map sizes that get self-attention",
    "dropout": "dropout in the residual blocks",
    "num_head_channels": "channels per attention head (0: use num_heads)",
    "num_heads": "fixed number of attention heads (0: use num_head_channels)",
    "resblock_updown": "residual blocks do the down/up-sampling",
    "use_scale_shift_norm": "AdaGN: the time embedding scales and shifts the normalised features",
    "num_classes": "class labels the denoiser is conditioned on (the null label is num_classes)",
    "label_in_time_embedding": "the label is added to the time embedding (AdaGN conditioning)",
    "attention_conditioning": "label tokens enter every attention layer (Sanchez et al.)",
    "label_tokens": "number of label tokens tau(c)",
    "label_token_dim": "width of each label token",
    "z_sem_dim": "size of the semantic code z_sem (diffusion autoencoder)",
    "out_dim": "output size (classes of a classifier, z_sem of an encoder)",
    "num_groups": "groups of the GroupNorm layers",
}

MEANINGS = {
    # training loop (medcfx.train.TrainConfig)
    "train.steps": "optimizer steps of the run",
    "train.batch_size": "global batch (split across processes)",
    "train.lr": "AdamW learning rate",
    "train.weight_decay": "AdamW weight decay",
    "train.ema_decay": "decay of the EMA copy of the weights (the EMA weights are registered)",
    "train.ema_warmup": "EMA decay ramps up as (1 + step) / (10 + step)",
    "train.grad_clip": "gradient-norm clipping (0: off)",
    "train.bf16": "bf16 autocast while training",
    "train.warmup_steps": "linear learning-rate warm-up steps",
    "train.log_every": "steps between lines of metrics.jsonl",
    "train.ckpt_every": "steps between checkpoints (for --resume)",
    "train.val_every": "steps between validations (0: only at the end)",
    "train.early_stopping": "stop after this many validations without improvement (0: off)",
    # diffusion
    "diffusion.schedule": "noise schedule (linear or cosine)",
    "diffusion.T": "diffusion timesteps of the model",
    # preprocessing (medcfx.data.preprocess.PreprocessConfig; fixed by a trained model)
    "preprocess.size": "slice side in pixels the model sees",
    "preprocess.modalities": "MRI channels, in order",
    "preprocess.percentile": "foreground percentile that maps to intensity 1",
    "preprocess.clip": "clip scaled intensities to [0, 1]",
    "preprocess.axis": "slicing axis in RAS+ (0 sagittal, 1 coronal, 2 axial)",
    "preprocess.min_foreground": "skip slices with less foreground than this share of the largest slice",
    "preprocess.image_channels": "2D images: 1 grey, 3 RGB (null: as the first image)",
    "preprocess.intensity": "2D intensity rule: percentile, nominal or legacy",
    # counterfactual sampling (sanchez and its baselines, restoration)
    "explain.guidance": "guidance scale (classifier-free w, or the classifier-gradient scale)",
    "explain.noise_level": "encoding depth as a fraction of the respaced steps",
    "explain.steps": "respaced sampling steps (of --sampler paper; the fast sampler has its own, docs/speed.md)",
    "explain.dn_percentile": "dynamic normalisation percentile (0: static clipping)",
    "explain.solver": "encode/decode solver: ddim or dpm++2m (of --sampler paper, like explain.steps)",
    "explain.sampler": "fast (the measured fast path: docs/speed.md) or paper (the authors' loop at explain.steps)",
    "explain.guidance_interval": "LO:HI: guidance only where LO <= t/T <= HI (0:1: every step)",
    "explain.reuse_inversion": "the decode's null branch from the inversion at the same timestep (one forward per step)",
    "explain.eval_size": "resolution of the evaluation",
    "explain.batch_size": "slices per batch",
    # method-level keys (sanchez, restoration)
    "conditioning": "attention (label tokens + AdaGN, the paper) or adagn (the baseline)",
    "cfg_dropout": "share of labels replaced by the null label (classifier-free guidance)",
    "val_cases": "share of the training cases held out for validation (at least 1)",
    "val_slices": "held-out slices scored after training",
    "sample.encode_steps": "DDIM inversion steps",
    "sample.decode_steps": "DDIM decoding steps",
}


def leaf_keys(defaults: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of ``defaults`` as ``(dotted key, default value)`` in the dict's order; ``presets`` at the
    top level is left out. A non-empty mapping is descended into; anything else (an empty mapping too) is a
    leaf, which is exactly what ``--set`` accepts (:func:`medcfx.config.check_keys`)."""
    out: list[tuple[str, Any]] = []
    for key, value in defaults.items():
        if not prefix and key == "presets":
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaf_keys(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def meaning(key: str) -> str:
    """The one-line meaning of a dotted key, or "" when none is known."""
    if key in MEANINGS:
        return MEANINGS[key]
    section, _, leaf = key.rpartition(".")
    if section in NETWORK_SECTIONS:
        return NETWORK_MEANINGS.get(leaf, "")
    return ""


def settings(defaults: dict) -> list[dict]:
    """``[{"key", "default", "meaning"}, ...]`` for every key a user may ``--set``."""
    return [{"key": k, "default": _plain(v), "meaning": meaning(k)} for k, v in leaf_keys(defaults)]


def presets(defaults: dict) -> dict[str, dict]:
    """Each preset as ``{dotted key: value}`` of what it changes ({} = the defaults themselves)."""
    return {name: {k: _plain(v) for k, v in leaf_keys(over or {})}
            for name, over in (defaults.get("presets") or {}).items()}


def preset_summary(changes: dict) -> str:
    """``{"train.steps": 2000, "train.lr": 3e-4, "val_slices": 24}`` -> "train (2 keys), val_slices=24"."""
    if not changes:
        return "the defaults"
    groups: dict[str, list[str]] = {}
    for key in changes:
        groups.setdefault(key.split(".")[0], []).append(key)
    parts = []
    for head, keys in groups.items():
        if len(keys) == 1:
            parts.append(f"{keys[0]}={format_value(changes[keys[0]])}")
        else:
            parts.append(f"{head}.* ({len(keys)} keys)")
    return ", ".join(parts)


def format_value(value: Any) -> str:
    """A default as the user would type it after ``--set KEY=`` (YAML flow style)."""
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_plain(value))
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
